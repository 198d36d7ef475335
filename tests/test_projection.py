"""``extract --project D`` (issue 28): pooled blocks stored through a seeded orthogonal projection, the matrix in
the store, distill's adapters to D, what `info --fidelity` says the projection keeps, and the bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from meal_cache.distill import DistillConfig
from meal_cache.extract import ExtractConfig, extract
from meal_cache.fidelity import store_fidelity
from meal_cache.projection import orthogonal_projection, projection_quality, stored_projections
from meal_cache.store import feature_key, open_store


@pytest.fixture(scope="module")
def projected(tmp_path_factory, teacher_dir, digits):
    """A lossless store of both teachers' pooled blocks projected to 8 channels, and one without projection."""
    folder = tmp_path_factory.mktemp("projected")
    base = dict(teachers=["resnet8_w4", "densenet_k12"], views=1, identity_view=True, teacher_dir=str(teacher_dir),
                features=["blocks"], device="cpu", rows_per_chunk=512)  # fmt: skip
    extract(ExtractConfig(**base, project=8), folder / "p8.zarr", progress=False, dataset=digits)
    extract(ExtractConfig(**base), folder / "full.zarr", progress=False, dataset=digits)
    return folder / "p8.zarr", folder / "full.zarr"


def test_an_orthogonal_projection_is_seeded_and_keeps_distances_in_expectation():
    matrix = orthogonal_projection(64, 16, seed=3, name="t/layer3")
    assert matrix.shape == (64, 16) and matrix.dtype == torch.float32
    assert torch.allclose(matrix.T @ matrix, torch.eye(16) * 4.0, atol=1e-5)  # columns of norm sqrt(64 / 16)
    assert torch.equal(matrix, orthogonal_projection(64, 16, seed=3, name="t/layer3"))
    assert not torch.equal(matrix, orthogonal_projection(64, 16, seed=4, name="t/layer3"))
    assert not torch.equal(matrix, orthogonal_projection(64, 16, seed=3, name="t/layer2"))
    # Squared norms are kept in expectation: over many random rows, their mean ratio is about 1.
    rows = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    ratio = ((rows @ matrix) ** 2).sum(1) / (rows**2).sum(1)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.03)


def test_what_a_projection_keeps_by_hand():
    # Rows along the first two axes; the projection onto the first axis (C = 2, D = 1, scale sqrt(2)).
    features = np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 2.0], [1.0, 2.0]])
    matrix = np.array([[math.sqrt(2.0)], [0.0]])
    quality = projection_quality(features, matrix)
    # About the mean (2, 1) every row deviates by 1 along x and by 1 along y: the first axis holds 4 of 8.
    assert quality["variance_kept"] == pytest.approx(4.0 / 8.0)
    # Consecutive distances 2, 2, 2 become |sqrt(2) * dx|: 2 sqrt(2), 0, 2 sqrt(2).
    expected = (abs(2 * math.sqrt(2) - 2) / 2 + 1.0 + abs(2 * math.sqrt(2) - 2) / 2) / 3
    assert quality["distance_error"] == pytest.approx(expected)


def test_the_store_holds_its_projection_and_its_blocks_are_the_teachers_times_it(projected):
    store, full = (open_store(path) for path in projected)
    for teacher in store.teacher_names:
        whole = {b.key: b for b in full.blocks(teacher)}
        matrices = stored_projections(store, teacher)
        for block in store.blocks(teacher):
            own = whole[block.key].channels
            if own > 8:  # wider blocks are projected, the rest kept as they are
                assert (block.channels, block.projected_from) == (8, own) and matrices[block.name].shape == (own, 8)
            else:
                assert (block.channels, block.projected_from) == (own, None) and block.name not in matrices
    # Every stored row is the teacher's own pooled block (the unprojected store's) times the stored matrix.
    last = store.blocks("densenet_k12")[-1]
    matrix = stored_projections(store, "densenet_k12")[last.name].double()
    for view in range(store.num_views):
        stored = store.read(feature_key("densenet_k12", "blocks", last.key), view)
        unprojected = torch.from_numpy(full.read(feature_key("densenet_k12", "blocks", last.key), view)).double()
        assert stored.shape == (store.n, 8, 1, 1)
        expected = torch.einsum("ncij,cd->ndij", unprojected, matrix).numpy()
        error = np.linalg.norm(stored.astype(np.float64) - expected) / np.linalg.norm(expected)
        assert error < 2e-3  # float16 storage on both sides; another matrix would be off by about 1


def test_distills_adapters_map_the_student_to_the_projected_width(projected, digits):
    from by_hand import first_rows

    config = DistillConfig(store=str(projected[0]), student="resnet8_w4", method="meal", device="cpu",
                           workers=0).resolved(("blocks",))  # fmt: skip
    distiller, images, targets, labels = first_rows(config, digits)
    assert any(pair.teacher_block.projected_from for pair in distiller.pairs)
    for pair in distiller.pairs:
        assert distiller.adapters[pair.key].proj.out_channels == pair.teacher_block.channels
    out = distiller(images, targets, labels, distiller.teachers)
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_fidelity_reports_what_the_projection_keeps(projected):
    result = store_fidelity(str(projected[0]), str(projected[1]))
    store, full = (open_store(path) for path in projected)
    last = store.blocks("densenet_k12")[-1]
    values = result["teachers"]["densenet_k12"]["blocks"][f"blocks/{last.key}"]
    # Against a hand computation from the raw arrays of the unprojected store, over every view and row.
    matrix = stored_projections(store, "densenet_k12")[last.name].double().numpy()
    key = feature_key("densenet_k12", "blocks", last.key)
    rows = np.concatenate([full.read(key, view) for view in range(full.num_views)])
    hand = projection_quality(rows.astype(np.float64), matrix)
    assert values["projection"]["variance_kept"] == pytest.approx(hand["variance_kept"], rel=1e-3)
    assert 0.0 < values["projection"]["variance_kept"] < 1.0
    assert values["relative_l2"] < 1e-2  # lossless apart from float16: the stored rows are the projection's
    narrow = [b for b in store.blocks("resnet8_w4") if b.projected_from is None]
    assert narrow and "projection" not in result["teachers"]["resnet8_w4"]["blocks"][f"blocks/{narrow[0].key}"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "0"], "--project must be a whole number of channels, at least 1, got 0"),
        (["--project", "1000"], "--project 1000 is not below any block's channels (the widest has 90)"),
        (["--project", "8", "--features", "maps"], "this store keeps no blocks (--features maps)"),
    ],
)
def test_bad_projections_through_the_console_script(tmp_path, teacher_dir, args, message):
    process = _run_cli("extract", "--teachers", "resnet8_w4,densenet_k12", "--data", "digits", "--views", "1",
                       "--teacher-dir", str(teacher_dir), "--out", str(tmp_path / "x.zarr"), "--device", "cpu",
                       *args)  # fmt: skip
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], process.stderr


def test_online_teachers_project_their_blocks_with_the_stores_matrices(projected, teacher_dir, digits):
    from meal_cache.distill import DistillEpochs, build_run
    from meal_cache.distributed import World

    config = DistillConfig(store=str(projected[0]), student="resnet8_w4", method="meal", device="cpu", workers=0,
                           online=True, teachers=["densenet_k12"], teacher_dir=str(teacher_dir),
                           batch_size=64).resolved(("blocks",))  # fmt: skip
    run = build_run(config, World(), torch.device("cpu"), digits, progress=False)
    try:
        epochs = DistillEpochs(run)
        (rows, _, _), pixels = next(iter(epochs.batches(0)))
        online = run.online.targets(pixels, ["densenet_k12"])
        store = open_store(projected[0])
        key = feature_key("densenet_k12", "blocks", store.blocks("densenet_k12")[-1].key)
        stored = torch.from_numpy(store.read(key, epochs.view(0))[rows.numpy()]).double()
        assert online[key].shape == stored.shape == (64, 8, 1, 1)
        error = (online[key].double() - stored).norm() / stored.norm()
        assert float(error) < 5e-3
    finally:
        run.source.close()
        run.images.close()
