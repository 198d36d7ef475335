"""An .npz archive of uint8 images and integer labels."""

from __future__ import annotations

import numpy as np

from meal_cache.data.loader import (
    DIGIT_RECIPE,
    NATURAL_RECIPE,
    DatasetSource,
    LoadOptions,
    RawDataset,
    local_path,
    split_by_mask,
    stratified_split,
    to_nchw_rgb,
)
from meal_cache.errors import UserError


def _load_npz(arg: str | None, options: LoadOptions) -> RawDataset:
    """``images`` uint8 (N,H,W) or (N,H,W,3), ``labels`` int (N,) in 0..C-1, optional ``split`` (0 train,
    1 test; without it a seeded stratified 80/20 split) and optional ``classes`` (C names). Grey-scale images
    are treated as digit-like (crop, never flip)."""
    path = local_path("npz", arg)
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
    train, test = split_by_mask(to_nchw_rgb(images), labels, test_mask)
    return RawDataset(train, test, classes, recipe)


SOURCES = (DatasetSource("npz", _load_npz, True, "npz:PATH with images, labels[, split, classes]"),)
