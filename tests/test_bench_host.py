"""make bench's host section (benchmarks/bench_host.py) times extract with networks that cost nothing: what it
times must be extract's own work on the real shapes, not a real network's forward. No timings are asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_host import free_teachers, host_folder, host_teacher  # noqa: E402

from meal_cache.data.datasets import load_dataset  # noqa: E402
from meal_cache.extract.config import ExtractConfig  # noqa: E402
from meal_cache.extract.run import extract  # noqa: E402
from meal_cache.views import augment  # noqa: E402


def test_free_teachers_store_the_real_block_shapes_and_logits_taken_from_the_pixels(tmp_path):
    root = host_folder(tmp_path / "folder", 20, 24)
    spec = f"imagefolder:{root}"
    teacher = host_teacher(tmp_path / "teachers", spec, 16)
    config = ExtractConfig(teachers=[teacher], data=spec, image_size=16, views=2, teacher_dir=str(tmp_path /
                           "teachers"), device="cpu", workers=0, batch_size=8, rows_per_chunk=8)  # fmt: skip
    with free_teachers():
        store = extract(config, tmp_path / "s.zarr", progress=False)
    real = extract(config, tmp_path / "real.zarr", progress=False)
    assert [(b.name, b.channels, b.height, b.width) for b in store.blocks(teacher)] == [
        (b.name, b.channels, b.height, b.width) for b in real.blocks(teacher)
    ]
    for block in real.blocks(teacher):  # every block array of the real network's shape
        for kind in ("blocks", "maps"):
            assert store.feature(teacher, kind, block.key, 1).shape == real.feature(teacher, kind, block.key, 1).shape
    # The logits are the first pixels of the normalised view, not a network's output.
    dataset = load_dataset(spec, image_size=16)
    source = dataset.train.open(torch.device("cpu"), 0, decode="cpu")
    ((_, pixels),) = source.pixels([(torch.arange(store.n), store.view_params(1), None)])
    source.close()
    normalised = augment.normalise(pixels, dataset.mean, dataset.std, channels_last=False)
    expected = normalised.flatten(1)[:, : dataset.num_classes].numpy().astype(np.float16)
    np.testing.assert_array_equal(store.logits(teacher, 1), expected)
