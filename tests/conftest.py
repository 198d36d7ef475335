from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from meal_cache.data.datasets import load_dataset


def pytest_collection_modifyitems(config, items):
    # The cuda tests are collected everywhere, so a CPU run counts them as skipped (and says why) instead of
    # hiding them; `make gpu-check` runs them where a GPU is lent.
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """datasets' Arrow cache (of parquet files and fetched object storage) and the tar shards' index cache in the
    session's own folders, never the user's: set before anything imports datasets, which reads it once, and
    inherited by the console scripts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        patch.setenv("MEAL_CACHE_WDS_INDEX", str(tmp_path_factory.mktemp("wds-index")))
        yield


def _suite_threads() -> int:
    # The suite is sized for a 2-core machine: two threads in one process, or one in each of `make test`'s two
    # pytest-xdist workers, so torch never oversubscribes it.
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def pytest_configure(config):
    # Before any fixture: the session fixtures (the teachers, the stores) are set up before a function-scoped
    # autouse fixture runs, and two workers of torch's default threads each spin-waiting on 2 cores made their
    # setup 30 times slower (378 s against 13 s alone).
    torch.set_num_threads(_suite_threads())


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(_suite_threads())  # again for each test: a test may change it


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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, digits):
    """Two small teachers of different families, trained for three epochs on digits."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    folder = tmp_path_factory.mktemp("teachers")
    for arch in ("resnet8_w4", "densenet_k12"):
        config = TrainConfig(arch=arch, data="digits", epochs=3, seed=0, device="cpu")
        train_supervised(config, folder / f"{arch}.pt", progress=False, dataset=digits)
    return folder


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, teacher_dir, digits):
    """A complete store: both teachers, 2 augmented views plus the identity view, 256-row chunks."""
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    config = ExtractConfig(
        teachers=["resnet8_w4", "densenet_k12"],
        views=2,
        identity_view=True,
        teacher_dir=str(teacher_dir),
        rows_per_chunk=256,
        batch_size=128,
        grid=2,
        device="cpu",
    )
    path = tmp_path_factory.mktemp("stores") / "feats.zarr"
    extract(config, path, progress=False, dataset=digits)
    return path, config


@pytest.fixture
def interrupt_on_call(monkeypatch):
    """``interrupt_on_call(module, "name", n)`` makes the n-th call of ``module.name`` raise KeyboardInterrupt
    (a user's Ctrl-C at that point); the earlier calls run as usual. Returns the undo function."""

    def install(module, name: str, n: int):
        real = getattr(module, name)
        calls = {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, interrupted)
        return lambda: monkeypatch.setattr(module, name, real)

    return install
