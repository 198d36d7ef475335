"""torchvision's FakeData: random images, for tests."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.loader import (
    NATURAL_RECIPE,
    DatasetSource,
    LoadOptions,
    RawDataset,
    Split,
)
from meal_cache.errors import UserError


def _load_fake(arg: str | None, options: LoadOptions) -> RawDataset:
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
    return RawDataset(parts[0], parts[1], tuple(str(c) for c in range(10)), NATURAL_RECIPE)


SOURCES = (DatasetSource("fake", _load_fake, False, "fake[:N] random images for tests"),)
