"""Datasets: a spec resolved through the source registry (:mod:`meal_cache.data.registry`, one file a source) to
an :class:`ImageDataset`; small datasets held in memory as uint8 tensors, image folders streamed from disk.

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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.loader import SPLITS, AnySplit, LoadOptions, Split, stratified_split
from meal_cache.data.registry import dataset_sources
from meal_cache.data.source import DECODER, FileSplit
from meal_cache.data.spec import LOADER_OPTIONS, Modifiers, corrupt_labels, fold_split, parse_modifiers
from meal_cache.errors import UserError, unknown_choice
from meal_cache.views import augment


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


def dataset_names() -> list[str]:
    return sorted(dataset_sources())


def parse_spec(spec: str) -> tuple[str, str | None, Modifiers]:
    """``NAME[:ARG][?OPTION=VALUE&...]`` -> (kind, arg, modifiers), with every part checked."""
    base, modifiers = spec, Modifiers()
    head, sep, tail = spec.rpartition("?")
    if sep and "=" in tail:
        base, modifiers = head, parse_modifiers(tail)
    kind, _, arg = base.partition(":")
    sources = dataset_sources()
    if kind not in sources:
        raise unknown_choice("dataset", kind, list(sources))
    source = sources[kind]
    if source.needs_arg and not arg:
        raise UserError(f"dataset '{kind}' needs a path: {source.help}")
    for flag in LOADER_OPTIONS:
        if getattr(modifiers, flag) and not source.file_options:
            takers = ", ".join(name for name, s in sources.items() if s.file_options)
            raise UserError(f"dataset option {flag} applies to {takers} only, not {kind}")
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
    raw = dataset_sources()[kind].loader(arg, options)
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
