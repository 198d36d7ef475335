"""What a dataset source gives: :class:`RawDataset` (a train and a test split, class names, the augmentation
recipe, optionally the normalisation), from a :class:`DatasetSource`'s loader, and the helpers sources share.

A source is one file: a module of :mod:`meal_cache.data.sources` (or a plug-in's, by the entry-point group
``meal_cache.datasets``) whose ``SOURCES`` names its :class:`DatasetSource` objects. A split is a :class:`Split` of
uint8 images in memory or a :class:`~meal_cache.data.source.FileSplit` of files decoded on demand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meal_cache.data.source import FileSplit
from meal_cache.errors import UserError
from meal_cache.views import augment

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
class RawDataset:
    """What a loader returns before normalisation statistics and resizing are applied."""

    train: AnySplit
    test: AnySplit
    classes: tuple[str, ...]
    recipe: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


Loader = Callable[[str | None, "LoadOptions"], RawDataset]


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
class DatasetSource:
    """A dataset by name: ``--data NAME[:ARG]`` calls ``loader(ARG or None, options)``. ``needs_arg``: ARG is
    required (a path); ``file_options``: the source takes ``?in_memory`` and ``?skip_bad`` (files on disk)."""

    name: str
    loader: Loader
    needs_arg: bool
    help: str
    file_options: bool = False


def to_nchw_rgb(images: np.ndarray) -> torch.Tensor:
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


def split_by_mask(images: torch.Tensor, labels: np.ndarray, test_mask: np.ndarray) -> tuple[Split, Split]:
    labels_t = torch.from_numpy(labels.astype(np.int64))
    train_idx = torch.from_numpy(np.flatnonzero(~test_mask))
    test_idx = torch.from_numpy(np.flatnonzero(test_mask))
    return (
        Split(images[train_idx].contiguous(), labels_t[train_idx].contiguous()),
        Split(images[test_idx].contiguous(), labels_t[test_idx].contiguous()),
    )


# What a streamed source (image files, tar shards, parquet) is normalised with and served at unless --image-size
# says: ImageNet's statistics (such datasets are too large to measure, and pretrained teachers expect these) and
# its usual 224 px.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAM_IMAGE_SIZE = 224


def local_path(kind: str, arg: str) -> Path:
    """A dataset's path on this machine; a URL is refused by name (Path would fold ``s3://b`` into ``s3:/b``)."""
    if "://" in arg:
        raise UserError(f"{kind} '{arg}': data from object storage is not supported; copy it locally or mount it "
                        "(stores may be URLs, and so may wds: shards and hf: parquet files)")  # fmt: skip
    return Path(arg)
