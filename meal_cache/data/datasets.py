"""Datasets: one registry; small datasets held in memory as uint8 tensors, image folders streamed from disk.

A dataset spec is ``NAME`` or ``NAME:ARG`` (``digits``, ``cifar10``, ``npz:/path/data.npz``,
``imagefolder:/path/root``, ``fake:256``), optionally followed by ``?OPTION=VALUE&...`` (label noise, a training
fraction, a k-fold re-split such as ``digits?folds=5&fold=0``, ``glyphs`` for images a mirror would turn into
other glyphs, and for image folders ``in_memory`` and ``skip_bad``: see :class:`~meal_cache.data.spec.Modifiers`).
:func:`load_dataset` resolves it to an :class:`ImageDataset`: a train and a test split with ``int64`` labels, the
number of classes, the normalisation, the augmentation recipe and a stable fingerprint of each split's rows. A
split is either a :class:`Split` of ``uint8`` images shaped ``(N, 3, H, W)`` in memory or a
:class:`~meal_cache.data.source.FileSplit` of image files decoded on demand; both are read through the source their
``open()`` returns (see :mod:`meal_cache.data.source`).

Grey-scale sources are replicated to three channels so every architecture takes every dataset unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from meal_cache.views import augment
from meal_cache.data.spec import LOADER_OPTIONS, Modifiers, corrupt_labels, fold_split, parse_modifiers
from meal_cache.errors import UserError, unknown_choice
from meal_cache.data.source import DECODER, FileSplit, find_unreadable, list_image_folder

SPLITS = ("train", "test")
# Augmentation recipes (see augment.py): digit-like images are never mirrored, since a mirrored glyph is
# another glyph; natural images are.
DIGIT_RECIPE = "digits"
NATURAL_RECIPE = "natural"
# Hash every pixel of a split up to this size; above it, an evenly strided sample of rows.
_FULL_HASH_BYTES = 256 * 2**20
_HASH_SAMPLE_ROWS = 4096


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 ``(N, 3, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,) and match the images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def take(self, index: torch.Tensor) -> Split:
        return Split(self.images[index].contiguous(), self.labels[index].contiguous())

    def relabel(self, labels: torch.Tensor) -> Split:
        return Split(self.images, labels)

    def concat(self, other: Split) -> Split:
        return Split(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]))

    def fingerprint(self, kind: str, split: str) -> str:
        return fingerprint_rows(kind, split, self.images, self.labels)

    def source_sizes(self, workers: int | None = None) -> torch.Tensor:
        """Every row's (H, W): the square size of the held images."""
        return augment.square_sizes(len(self), self.image_size)

    def eval_view(self, workers: int | None = None) -> augment.ViewParams:
        """The un-augmented view: the whole image."""
        return augment.identity(self.source_sizes())

    def open(self, device: torch.device, workers: int | None = None, out_size: int | None = None,
             decode: str = "auto"):  # fmt: skip
        """A :class:`~meal_cache.data.source.MemorySource` of these images on ``device``, rendered at ``out_size`` px
        (default: the data's size; ``workers`` and ``decode`` are unused: nothing is decoded)."""
        from meal_cache.data.source import MemorySource

        return MemorySource(self.images, device, out_size or self.image_size)

    def sample_pixels(self, count: int) -> torch.Tensor:
        return self.images[:count]


AnySplit = Split | FileSplit


@dataclass(frozen=True)
class ImageDataset:
    """A loaded dataset: both splits plus everything needed to train on and identify it."""

    spec: str
    kind: str
    train: AnySplit
    test: AnySplit
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: str
    options: dict = field(default_factory=dict)
    # The training labels before label noise was applied (None without noise): for measuring label inspection.
    clean_train_labels: torch.Tensor | None = None
    glyphs: bool = False  # ?glyphs=1: glyph-like images, never mirrored unless --hflip/--vflip say so

    def view_recipe(self, options: augment.AugmentOptions | None = None) -> augment.Recipe:
        """How this data's views are drawn: its recipe at its size, changed by ``options`` (``--scale``,
        ``--ratio``, ``--hflip``, ``--vflip``) and by ``?glyphs=1``."""
        recipe = augment.recipe_for(self.recipe, self.image_size)
        return recipe.with_options(options or augment.AugmentOptions(), glyphs=self.glyphs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def streamed(self) -> bool:
        """Whether the images are decoded from files on demand rather than held in memory."""
        return isinstance(self.train, FileSplit)

    def split(self, name: str) -> AnySplit:
        if name not in SPLITS:
            raise unknown_choice("split", name, SPLITS)
        return self.train if name == "train" else self.test

    def fingerprint(self, split: str) -> str:
        """A hash of what defines the split's rows: the dataset kind, the split, labels and pixels."""
        return self.split(split).fingerprint(self.kind, split)

    def describe(self) -> dict:
        """JSON-able identity of the dataset, recorded in checkpoints and stores to reload and verify it. A streamed
        dataset also records its decoder: another decoder build may differ by a few levels per pixel."""
        streamed = {"source": "files", "decoder": DECODER} if self.streamed else {}
        return {
            **streamed,
            "spec": self.spec,
            "kind": self.kind,
            "options": dict(self.options),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "recipe": self.recipe,
            "sizes": {s: len(self.split(s)) for s in SPLITS},
            "fingerprint": {s: self.fingerprint(s) for s in SPLITS},
        }


def fingerprint_rows(kind: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{kind}|{split}|{tuple(images.shape)}".encode())
    digest.update(labels.to(torch.int64).numpy().tobytes())
    rows = images
    if images.numel() > _FULL_HASH_BYTES:
        step = max(1, images.shape[0] // _HASH_SAMPLE_ROWS)
        rows = images[::step]
    digest.update(rows.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Raw:
    """What a loader returns before normalisation statistics and resizing are applied."""

    train: AnySplit
    test: AnySplit
    classes: tuple[str, ...]
    recipe: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


Loader = Callable[[str | None, "LoadOptions"], _Raw]


@dataclass(frozen=True)
class LoadOptions:
    root: Path
    download: bool
    image_size: int | None
    seed: int
    in_memory: bool = False
    skip_bad: bool = False
    workers: int | None = None


@dataclass(frozen=True)
class DatasetEntry:
    loader: Loader
    needs_arg: bool
    help: str


def _to_nchw_rgb(images: np.ndarray) -> torch.Tensor:
    """(N,H,W) or (N,H,W,3) or (N,H,W,1) uint8 -> (N,3,H,W) uint8, grey replicated to three channels."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.contiguous()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test rows: a seeded split that keeps class proportions where every class allows it."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    _, test_idx = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=stratify)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    return mask


def _split_by_mask(images: torch.Tensor, labels: np.ndarray, test_mask: np.ndarray) -> tuple[Split, Split]:
    labels_t = torch.from_numpy(labels.astype(np.int64))
    train_idx = torch.from_numpy(np.flatnonzero(~test_mask))
    test_idx = torch.from_numpy(np.flatnonzero(test_mask))
    return (
        Split(images[train_idx].contiguous(), labels_t[train_idx].contiguous()),
        Split(images[test_idx].contiguous(), labels_t[test_idx].contiguous()),
    )


def _load_digits(arg: str | None, options: LoadOptions) -> _Raw:
    """scikit-learn's 8x8 digits (1,797 images, ships offline): intensities 0-16 scaled to 0-255, upsampled
    bilinearly to 16x16 (or --image-size), replicated to 3 channels; a fixed stratified 80/20 split
    (seed 0: 1,437 train, 360 test)."""
    if arg is not None:
        raise UserError(f"digits takes no ':{arg}' (its 1,437 training rows are fixed); digits?train_fraction=F "
                        "keeps a stratified share of them, digit-pairs:N makes N 100-class pairs")  # fmt: skip
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = _to_nchw_rgb(pixels)
    size = options.image_size or 16
    images = TF.resize(images, [size, size], antialias=True)
    labels = bunch.target.astype(np.int64)
    train, test = _split_by_mask(images, labels, stratified_split(labels, 0.2, seed=0))
    return _Raw(train, test, tuple(str(c) for c in range(10)), DIGIT_RECIPE)


# Digit pairs: 100 balanced classes at sizes that train in seconds on a CPU (36 test pairs a class).
DIGIT_PAIRS_TRAIN = 20_000
DIGIT_PAIRS_TEST = 3_600
_DIGIT_PAIRS_SEED = {"train": 1, "test": 2}


def _load_digit_pairs(arg: str | None, options: LoadOptions) -> _Raw:
    """Two scikit-learn digits side by side, class ``10 * left + right``: 100 classes of real pixels, offline.

    Each 8x8 digit is kept at its own resolution, the pair centred in a 16x16 image (or resized to --image-size).
    Training pairs are drawn only from the digits' training split and test pairs only from its test split (the
    ``digits`` dataset's fixed 80/20 split), so no digit image is in both. ``digit-pairs:N`` draws N training pairs
    (default 20,000); the test split is always 3,600 pairs. Every class gets the same number of pairs (N / 100,
    the remainder to the first classes), drawn from a fixed seed per split: the same rows for every user."""
    from sklearn.datasets import load_digits

    count = _pair_count(arg)
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    test_mask = stratified_split(labels, 0.2, seed=0)
    size = options.image_size or 16
    splits = []
    for name, rows, pairs in (("train", ~test_mask, count), ("test", test_mask, DIGIT_PAIRS_TEST)):
        images, pair_labels = _draw_pairs(pixels[rows], labels[rows], pairs, _DIGIT_PAIRS_SEED[name])
        tensor = _to_nchw_rgb(images)
        if size != tensor.shape[-1]:
            tensor = TF.resize(tensor, [size, size], antialias=True)
        splits.append(Split(tensor.contiguous(), torch.from_numpy(pair_labels)))
    return _Raw(splits[0], splits[1], tuple(f"{c:02d}" for c in range(100)), DIGIT_RECIPE)


def _pair_count(arg: str | None) -> int:
    if arg is None:
        return DIGIT_PAIRS_TRAIN
    try:
        count = int(arg)
    except ValueError:
        count = 0
    if count < 100:
        raise UserError(f"digit-pairs:N takes the number of training pairs, a whole number of at least 100 (one a "
                        f"class); got '{arg}'")  # fmt: skip
    return count


def _draw_pairs(digits: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of the 8x8 ``digits``, class-balanced and shuffled: (count, 16, 16) uint8 images, the pair in
    rows 4-11 (left digit in columns 0-7), and their labels ``10 * left + right``."""
    rng = np.random.default_rng(seed)
    classes = np.arange(count) % 100
    rng.shuffle(classes)
    by_digit = np.argsort(labels, kind="stable")  # the images of digit d are by_digit[starts[d]:starts[d] + sizes[d]]
    sizes = np.bincount(labels, minlength=10)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def draw(digit: np.ndarray) -> np.ndarray:
        return by_digit[starts[digit] + rng.integers(0, sizes[digit])]

    left, right = draw(classes // 10), draw(classes % 10)
    images = np.zeros((count, 16, 16), dtype=np.uint8)
    images[:, 4:12, 0:8] = digits[left]
    images[:, 4:12, 8:16] = digits[right]
    return images, classes.astype(np.int64)


def _torchvision_loader(name: str) -> Loader:
    def load(arg: str | None, options: LoadOptions) -> _Raw:
        from torchvision import datasets

        parts = {}
        for split in SPLITS:
            try:
                if name == "svhn":
                    ds = datasets.SVHN(str(options.root), split=split, download=options.download)
                else:
                    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
                    ds = cls(str(options.root), train=split == "train", download=options.download)
            except RuntimeError as err:
                hint = "" if options.download else "; pass --download to fetch it (needs internet)"
                raise UserError(f"{name} {split} split not found under '{options.root}' ({err}){hint}") from err
            except (OSError, http.client.HTTPException) as err:  # urllib's URLError is an OSError
                raise UserError(
                    f"could not download {name} into '{options.root}' ({type(err).__name__}: {err}); "
                    f"on a machine without network, copy torchvision's {name} files into "
                    f"'{options.root}' from one that has it, and leave --download out"
                ) from err
            if name == "svhn":
                images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, H, W)
                labels = np.asarray(ds.labels, dtype=np.int64)
                classes = tuple(str(c) for c in range(10))
            else:
                images = _to_nchw_rgb(ds.data)
                labels = np.asarray(ds.targets, dtype=np.int64)
                classes = tuple(ds.classes)
            parts[split] = Split(images, torch.from_numpy(labels))
        # SVHN holds house-number digits: never mirrored.
        recipe = DIGIT_RECIPE if name == "svhn" else NATURAL_RECIPE
        return _Raw(parts["train"], parts["test"], classes, recipe)

    return load


def _local_path(kind: str, arg: str) -> Path:
    """A dataset's path on this machine; a URL is refused by name (Path would fold ``s3://b`` into ``s3:/b``)."""
    if "://" in arg:
        raise UserError(f"{kind} '{arg}': data from object storage is not supported; copy it locally or mount it "
                        "(stores, not datasets, may be URLs)")  # fmt: skip
    return Path(arg)


def _load_npz(arg: str | None, options: LoadOptions) -> _Raw:
    """``images`` uint8 (N,H,W) or (N,H,W,3), ``labels`` int (N,) in 0..C-1, optional ``split`` (0 train,
    1 test; without it a seeded stratified 80/20 split) and optional ``classes`` (C names). Grey-scale images
    are treated as digit-like (crop, never flip)."""
    path = _local_path("npz", arg)
    if not path.is_file():
        raise UserError(f"npz file not found: '{path}'")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"'{path}' is not a readable .npz archive ({err})") from err
    with archive:
        missing = [key for key in ("images", "labels") if key not in archive.files]
        if missing:
            raise UserError(
                f"'{path}' lacks array(s) {', '.join(missing)}; it has {', '.join(archive.files) or 'none'} "
                "(expected: images, labels, optional split and classes)"
            )
        images = archive["images"]
        labels = archive["labels"]
        split = archive["split"] if "split" in archive.files else None
        names = archive["classes"] if "classes" in archive.files else None
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise UserError(
            f"'{path}': images must be uint8 of shape (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"'{path}': labels must be integers of shape ({images.shape[0]},), got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] == 0:
        raise UserError(f"'{path}' holds no images")
    if labels.min() < 0:
        raise UserError(f"'{path}': labels must be non-negative class indices")
    labels = labels.astype(np.int64)
    num_classes = int(labels.max()) + 1
    if names is not None:
        if len(names) < num_classes:
            raise UserError(f"'{path}': {len(names)} class names for labels up to {num_classes - 1}")
        classes = tuple(str(n) for n in names)
    else:
        classes = tuple(str(c) for c in range(num_classes))
    if split is not None:
        if split.shape != labels.shape or not np.isin(split, (0, 1)).all():
            raise UserError(f"'{path}': split must be (N,) with 0 (train) or 1 (test) per row")
        test_mask = split.astype(bool)
        if test_mask.all() or not test_mask.any():
            raise UserError(f"'{path}': split leaves the train or the test split empty")
    else:
        test_mask = stratified_split(labels, 0.2, seed=options.seed)
    recipe = DIGIT_RECIPE if images.ndim == 3 or images.shape[-1] == 1 else NATURAL_RECIPE
    train, test = _split_by_mask(_to_nchw_rgb(images), labels, test_mask)
    return _Raw(train, test, classes, recipe)


# ImageNet's statistics: streamed folders are too large to measure, and pretrained teachers expect these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAM_IMAGE_SIZE = 224
IN_MEMORY_IMAGE_SIZE = 32


def _load_imagefolder(arg: str | None, options: LoadOptions) -> _Raw:
    """``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``test/``), streamed: decoded on demand at full
    resolution (random-resized crops in each image's own coordinates) and served at --image-size (default 224).
    With ``?in_memory=1``: decoded once, the shorter side resized to --image-size (default 32), centre-cropped
    square and held in memory. ``?skip_bad=1`` decodes every file first and leaves out (and counts) the ones
    that do not decode."""
    root = _local_path("imagefolder", arg)
    if not root.is_dir():
        raise UserError(
            f"imagefolder '{root}': " + ("is a file, not a folder" if root.exists() else "folder does not exist")
        )
    held_out = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or held_out is None:
        raise UserError(f"imagefolder '{root}' needs a train/ and a val/ (or test/) folder of class subfolders")
    train_files, train_labels, classes = list_image_folder(root / "train")
    test_files, test_labels, _ = list_image_folder(held_out, {c: i for i, c in enumerate(classes)})
    parts = []
    for folder, files, labels in ((root / "train", train_files, train_labels), (held_out, test_files, test_labels)):
        relative = [os.path.join(folder.name, name) for name in files]
        if options.skip_bad:
            relative, labels = _without_unreadable(root, relative, labels, options.workers)
        parts.append((relative, labels))
    if options.in_memory:
        size = options.image_size or IN_MEMORY_IMAGE_SIZE
        train, test = (Split(_decode_all(root, files, size), torch.from_numpy(labels)) for files, labels in parts)
        return _Raw(train, test, tuple(classes), NATURAL_RECIPE)
    size = options.image_size or STREAM_IMAGE_SIZE
    train, test = (
        FileSplit(str(root), np.array([os.fsencode(f) for f in files], dtype=bytes),
                  torch.from_numpy(labels), np.array([os.path.getsize(root / f) for f in files], dtype=np.int64), size)
        for files, labels in parts
    )  # fmt: skip
    return _Raw(train, test, tuple(classes), augment.FULL_RECIPE, IMAGENET_MEAN, IMAGENET_STD)


def _without_unreadable(
    root: Path, files: list[str], labels: np.ndarray, workers: int | None
) -> tuple[list[str], np.ndarray]:
    from tqdm.auto import tqdm

    bad = find_unreadable([str(root / f) for f in files], workers)
    if bad:
        shown = "; ".join(f"{files[i]} ({reason})" for i, reason in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        tqdm.write(f"skip_bad: left out {len(bad)} of {len(files)} file(s) that do not decode: {shown}{more}")
    keep = [i for i in range(len(files)) if i not in bad]
    return [files[i] for i in keep], labels[keep]


def _decode_all(root: Path, files: list[str], size: int) -> torch.Tensor:
    from meal_cache.data.source import DECODE_ERRORS, decode_rgb, first_line

    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for row, name in enumerate(files):
        try:
            tensor = decode_rgb(str(root / name))
        except DECODE_ERRORS as err:
            raise UserError(
                f"imagefolder: '{root / name}' is not a readable image ({first_line(err)}); "
                "remove it, or load the data with ?skip_bad=1 to leave unreadable files out"
            ) from err
        images[row] = TF.center_crop(TF.resize(tensor, size, antialias=True), [size, size])
    return images


def _load_fake(arg: str | None, options: LoadOptions) -> _Raw:
    """torchvision's FakeData: N random train images (default 64, ``fake:N``), N/4 test, 10 classes, 16 px."""
    from torchvision.datasets import FakeData

    try:
        n_train = int(arg) if arg else 64
    except ValueError as err:
        raise UserError(f"fake:N takes a number of training images, got '{arg}'") from err
    size = options.image_size or 16
    parts = []
    for offset, count in ((0, n_train), (n_train, max(1, n_train // 4))):
        ds = FakeData(count, image_size=(3, size, size), num_classes=10, random_offset=options.seed * 10**6 + offset)
        images = torch.stack([TF.pil_to_tensor(ds[i][0]) for i in range(count)])
        labels = torch.tensor([int(ds[i][1]) for i in range(count)], dtype=torch.int64)
        parts.append(Split(images, labels))
    return _Raw(parts[0], parts[1], tuple(str(c) for c in range(10)), NATURAL_RECIPE)


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(_load_digits, False, "scikit-learn 8x8 digits at 16 px, offline (the default)"),
    "digit-pairs": DatasetEntry(
        _load_digit_pairs,
        False,
        f"two digits side by side, class 10a+b: 100 classes at 16 px, offline ({DIGIT_PAIRS_TRAIN:,} training and "
        f"{DIGIT_PAIRS_TEST:,} test pairs, no digit image in both; digit-pairs:N for N training pairs)",
    ),
    "cifar10": DatasetEntry(_torchvision_loader("cifar10"), False, "CIFAR-10 from --data-root (--download)"),
    "cifar100": DatasetEntry(_torchvision_loader("cifar100"), False, "CIFAR-100 from --data-root (--download)"),
    "svhn": DatasetEntry(_torchvision_loader("svhn"), False, "SVHN from --data-root (--download)"),
    "imagefolder": DatasetEntry(
        _load_imagefolder, True, "imagefolder:PATH with train/ and val/ class folders, streamed (?in_memory=1: held)"
    ),
    "npz": DatasetEntry(_load_npz, True, "npz:PATH with images, labels[, split, classes]"),
    "fake": DatasetEntry(_load_fake, False, "fake[:N] random images for tests"),
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def parse_spec(spec: str) -> tuple[str, str | None, Modifiers]:
    """``NAME[:ARG][?OPTION=VALUE&...]`` -> (kind, arg, modifiers), with every part checked."""
    base, modifiers = spec, Modifiers()
    head, sep, tail = spec.rpartition("?")
    if sep and "=" in tail:
        base, modifiers = head, parse_modifiers(tail)
    kind, _, arg = base.partition(":")
    if kind not in DATASETS:
        raise unknown_choice("dataset", kind, list(DATASETS))
    entry = DATASETS[kind]
    if entry.needs_arg and not arg:
        raise UserError(f"dataset '{kind}' needs a path: {entry.help}")
    for flag in LOADER_OPTIONS:
        if getattr(modifiers, flag) and kind != "imagefolder":
            raise UserError(f"dataset option {flag} applies to imagefolder only, not {kind}")
    return kind, (arg or None), modifiers


def _apply_modifiers(
    train: AnySplit, test: AnySplit, num_classes: int, modifiers: Modifiers
) -> tuple[AnySplit, AnySplit, torch.Tensor | None]:
    """The modifiers in their documented order: fold split, train fraction, label noise (train part only)."""
    if modifiers.folds is not None:  # parsing made sure fold is set with it
        # Pooled as train rows then test rows, so a fold is defined by the source's own row order.
        pooled = train.concat(test)
        mask = fold_split(pooled.labels.numpy(), modifiers.folds, modifiers.fold, modifiers.fold_seed)
        train = pooled.take(torch.from_numpy(np.flatnonzero(~mask)))
        test = pooled.take(torch.from_numpy(np.flatnonzero(mask)))
    if modifiers.train_fraction < 1.0:
        keep = ~stratified_split(train.labels.numpy(), 1.0 - modifiers.train_fraction, modifiers.fraction_seed)
        train = train.take(torch.from_numpy(np.flatnonzero(keep)))
    if modifiers.label_noise == 0.0:
        return train, test, None
    noisy = corrupt_labels(train.labels, num_classes, modifiers.label_noise, modifiers.noise, modifiers.noise_seed)
    return train.relabel(noisy), test, train.labels


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Chunked so a 50,000-image set never needs a float64 copy of itself.
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        pixels = chunk.to(torch.float64).div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-6).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def load_recorded(recorded: dict, spec: str | None = None, root: str | None = None,
                  download: bool = False) -> ImageDataset:  # fmt: skip
    """The dataset a recorded description names (``ImageDataset.describe()``, as stores and checkpoints keep it):
    its spec, root and image size, with ``spec`` and ``root`` overriding the recorded ones where given."""
    options = recorded.get("options", {})
    return load_dataset(spec or recorded["spec"], root or options.get("root", "data"), download,
                        options.get("image_size"))  # fmt: skip


def load_dataset(
    spec: str,
    root: str | Path = "data",
    download: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> ImageDataset:
    """Load a dataset by spec (see the module doc): in memory, or as lists of files for a streamed image folder.

    ``image_size`` resizes every image to a square of that side (antialiased; a streamed folder serves its views
    at that size); ``seed`` only matters for sources that draw a split (``npz`` without ``split``, ``fake``);
    ``workers`` is the processes that check files for ``?skip_bad=1``.
    """
    kind, arg, modifiers = parse_spec(spec)
    if image_size is not None and image_size < 8:
        raise UserError(f"--image-size must be at least 8, got {image_size}")
    options = LoadOptions(Path(root), download, image_size, seed, bool(modifiers.in_memory), bool(modifiers.skip_bad),
                          workers)  # fmt: skip
    raw = DATASETS[kind].loader(arg, options)
    train, test = raw.train, raw.test
    if image_size is not None and train.image_size != image_size and isinstance(train, Split):
        train, test = (
            Split(TF.resize(s.images, [image_size, image_size], antialias=True), s.labels) for s in (train, test)
        )
    train, test, clean_labels = _apply_modifiers(train, test, len(raw.classes), modifiers)
    if raw.mean is not None and raw.std is not None:
        mean, std = raw.mean, raw.std
    else:
        mean, std = _channel_stats(train.images)
    recorded = {"root": str(root), "image_size": image_size, "seed": seed}
    return ImageDataset(spec, kind, train, test, raw.classes, mean, std, raw.recipe, recorded, clean_labels,
                        glyphs=bool(modifiers.glyphs))  # fmt: skip
