"""Digit pairs: 100 classes of real pixels, offline (two scikit-learn digits side by side)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.loader import (
    DIGIT_RECIPE,
    DatasetSource,
    LoadOptions,
    RawDataset,
    Split,
    stratified_split,
    to_nchw_rgb,
)
from meal_cache.errors import UserError

# Digit pairs: 100 balanced classes at sizes that train in seconds on a CPU (36 test pairs a class).
DIGIT_PAIRS_TRAIN = 20_000


DIGIT_PAIRS_TEST = 3_600


_DIGIT_PAIRS_SEED = {"train": 1, "test": 2}


def _load_digit_pairs(arg: str | None, options: LoadOptions) -> RawDataset:
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
        tensor = to_nchw_rgb(images)
        if size != tensor.shape[-1]:
            tensor = TF.resize(tensor, [size, size], antialias=True)
        splits.append(Split(tensor.contiguous(), torch.from_numpy(pair_labels)))
    return RawDataset(splits[0], splits[1], tuple(f"{c:02d}" for c in range(100)), DIGIT_RECIPE)


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


SOURCES = (
    DatasetSource(
        "digit-pairs",
        _load_digit_pairs,
        False,
        f"two digits side by side, class 10a+b: 100 classes at 16 px, offline ({DIGIT_PAIRS_TRAIN:,} training and "
        f"{DIGIT_PAIRS_TEST:,} test pairs, no digit image in both; digit-pairs:N for N training pairs)",
    ),
)
