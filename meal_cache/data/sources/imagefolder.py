"""An image folder, ``PATH/train/<class>/`` and ``PATH/val/<class>/``: streamed, or held with ``?in_memory=1``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NATURAL_RECIPE,
    STREAM_IMAGE_SIZE,
    DatasetSource,
    LoadOptions,
    RawDataset,
    Split,
    local_path,
)
from meal_cache.data.source import FileSplit, find_unreadable, list_image_folder
from meal_cache.errors import UserError
from meal_cache.views import augment

IN_MEMORY_IMAGE_SIZE = 32


def _load_imagefolder(arg: str | None, options: LoadOptions) -> RawDataset:
    """``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``test/``), streamed: decoded on demand at full
    resolution (random-resized crops in each image's own coordinates) and served at --image-size (default 224).
    With ``?in_memory=1``: decoded once, the shorter side resized to --image-size (default 32), centre-cropped
    square and held in memory. ``?skip_bad=1`` decodes every file first and leaves out (and counts) the ones
    that do not decode."""
    root = local_path("imagefolder", arg)
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
        return RawDataset(train, test, tuple(classes), NATURAL_RECIPE)
    size = options.image_size or STREAM_IMAGE_SIZE
    train, test = (
        FileSplit(str(root), np.array([os.fsencode(f) for f in files], dtype=bytes),
                  torch.from_numpy(labels), np.array([os.path.getsize(root / f) for f in files], dtype=np.int64), size)
        for files, labels in parts
    )  # fmt: skip
    return RawDataset(train, test, tuple(classes), augment.FULL_RECIPE, IMAGENET_MEAN, IMAGENET_STD)


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


SOURCES = (
    DatasetSource(
        "imagefolder",
        _load_imagefolder,
        True,
        "imagefolder:PATH with train/ and val/ class folders, streamed (?in_memory=1: held)",
        file_options=True,
    ),
)
