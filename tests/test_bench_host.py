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


def test_free_dense_teachers_write_a_dense_store_whose_logits_are_each_positions_colours(tmp_path):
    """The host section's dense row: extract --dense takes the free teacher (its head passes the per-position
    check), and each position's logit of class c is the colour c mod 3 there at scale 0.5 + c / (C - 1), so the
    classes differ within a row and the rows differ from each other (a store that compresses as data)."""
    root = host_folder(tmp_path / "folder", 20, 24)
    spec = f"imagefolder:{root}"
    teacher = host_teacher(tmp_path / "teachers", spec, 16)
    config = ExtractConfig(teachers=[teacher], data=spec, image_size=16, dense=True, teacher_dir=str(tmp_path /
                           "teachers"), device="cpu", workers=0, batch_size=8, rows_per_chunk=8)  # fmt: skip
    with free_teachers(dense=True):
        store = extract(config, tmp_path / "d.zarr", progress=False)
    logits = np.asarray(store.array(f"teachers/{teacher}/logits")[0], dtype=np.float64)  # (N, positions, C)
    channels = store.blocks(teacher)[-1].channels
    scales = np.linspace(0.5, 1.5, channels)[: logits.shape[-1]]
    colours = logits / scales  # each class's colour, as the free head took it
    for c in range(3, logits.shape[-1]):
        np.testing.assert_allclose(colours[..., c], colours[..., c % 3], rtol=2e-3, atol=2e-3)
    assert np.ptp(logits, axis=-1).min() > 0 and np.ptp(logits.mean(1), axis=0).min() > 0
