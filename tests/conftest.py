from __future__ import annotations

import numpy as np
import pytest
import torch

from meal_cache.data import load_dataset


@pytest.fixture(autouse=True)
def _two_threads():
    # The suite is sized for a 2-core machine; keep torch from oversubscribing it.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def npz_path(tmp_path):
    """A small grey-scale npz dataset, 3 classes separable by brightness."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    images = (rng.integers(0, 40, size=(60, 12, 12)) + labels[:, None, None] * 100).astype(np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, images=images, labels=labels)
    return path
