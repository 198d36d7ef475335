"""scikit-learn's digits, offline: the default dataset."""

from __future__ import annotations

import numpy as np
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.loader import (
    DIGIT_RECIPE,
    DatasetSource,
    LoadOptions,
    RawDataset,
    split_by_mask,
    stratified_split,
    to_nchw_rgb,
)
from meal_cache.errors import UserError


def _load_digits(arg: str | None, options: LoadOptions) -> RawDataset:
    """scikit-learn's 8x8 digits (1,797 images, ships offline): intensities 0-16 scaled to 0-255, upsampled
    bilinearly to 16x16 (or --image-size), replicated to 3 channels; a fixed stratified 80/20 split
    (seed 0: 1,437 train, 360 test)."""
    if arg is not None:
        raise UserError(f"digits takes no ':{arg}' (its 1,437 training rows are fixed); digits?train_fraction=F "
                        "keeps a stratified share of them, digit-pairs:N makes N 100-class pairs")  # fmt: skip
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = to_nchw_rgb(pixels)
    size = options.image_size or 16
    images = TF.resize(images, [size, size], antialias=True)
    labels = bunch.target.astype(np.int64)
    train, test = split_by_mask(images, labels, stratified_split(labels, 0.2, seed=0))
    return RawDataset(train, test, tuple(str(c) for c in range(10)), DIGIT_RECIPE)


SOURCES = (DatasetSource("digits", _load_digits, False, "scikit-learn 8x8 digits at 16 px, offline (the default)"),)
