"""torchvision's CIFAR-10, CIFAR-100 and SVHN, from --data-root (downloaded only with --download)."""

from __future__ import annotations

import http.client

import numpy as np
import torch

from meal_cache.data.loader import (
    DIGIT_RECIPE,
    NATURAL_RECIPE,
    SPLITS,
    DatasetSource,
    Loader,
    LoadOptions,
    RawDataset,
    Split,
    to_nchw_rgb,
)
from meal_cache.errors import UserError


def _torchvision_loader(name: str) -> Loader:
    def load(arg: str | None, options: LoadOptions) -> RawDataset:
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
                images = to_nchw_rgb(ds.data)
                labels = np.asarray(ds.targets, dtype=np.int64)
                classes = tuple(ds.classes)
            parts[split] = Split(images, torch.from_numpy(labels))
        # SVHN holds house-number digits: never mirrored.
        recipe = DIGIT_RECIPE if name == "svhn" else NATURAL_RECIPE
        return RawDataset(parts["train"], parts["test"], classes, recipe)

    return load


SOURCES = (
    DatasetSource("cifar10", _torchvision_loader("cifar10"), False, "CIFAR-10 from --data-root (--download)"),
    DatasetSource("cifar100", _torchvision_loader("cifar100"), False, "CIFAR-100 from --data-root (--download)"),
    DatasetSource("svhn", _torchvision_loader("svhn"), False, "SVHN from --data-root (--download)"),
)
