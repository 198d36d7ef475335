"""``extract --project D`` (issue 28): pooled blocks stored through a projection (PCA fitted on the first rows, or a
seeded random orthogonal matrix), the matrix in the store, distill's adapters to D, what `info --fidelity` says
the projection keeps, ``--for meal``'s default, and the bad inputs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from console import one_error_line_of

from meal_cache.distill import DistillConfig
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.projection import orthogonal_projection, pca_projection, projection_quality, stored_projections
from meal_cache.store import feature_key, open_store


@pytest.fixture(scope="module")
def projected(tmp_path_factory, teacher_dir, digits):
    """Lossless stores of both teachers' pooled blocks projected to 8 channels (PCA, the default, and random), and
    one without projection."""
    folder = tmp_path_factory.mktemp("projected")
    base = dict(teachers=["resnet8_w4", "densenet_k12"], views=1, identity_view=True, teacher_dir=str(teacher_dir),
                features=["blocks"], device="cpu", rows_per_chunk=512)  # fmt: skip
    extract(ExtractConfig(**base, project=8), folder / "p8.zarr", progress=False, dataset=digits)
    extract(ExtractConfig(**base), folder / "full.zarr", progress=False, dataset=digits)
    extract(ExtractConfig(**base, project=8, projection="random"), folder / "r8.zarr", progress=False, dataset=digits)
    return folder / "p8.zarr", folder / "full.zarr", folder / "r8.zarr"


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


def test_pca_finds_the_principal_directions_largest_first_with_fixed_signs():
    # Rows spread 3 along e0 + e1, 1 along e2 and nothing along e3, e4 (about a mean far from zero).
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 1, generator=generator), torch.randn(500, 1, generator=generator)
    axis = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]) / math.sqrt(2.0)
    rows = 3 * a * axis + b * torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]) + 5.0
    matrix = pca_projection(rows, 2)
    assert matrix.shape == (5, 2) and matrix.dtype == torch.float32
    assert torch.allclose(matrix.T @ matrix, torch.eye(2), atol=1e-5)  # orthonormal: distances only shrink
    assert torch.allclose(matrix[:, 0], axis[0], atol=5e-2)  # the widest direction first, its largest entry > 0
    assert torch.allclose(matrix[:, 1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), atol=5e-2)
    assert torch.equal(pca_projection(-rows, 2), matrix)  # signs fixed by the data's axes, not the solver
    assert projection_quality(rows.numpy(), matrix.numpy())["variance_kept"] == pytest.approx(1.0, abs=1e-6)


def test_a_pca_store_fits_its_matrix_on_the_first_chunk_of_view_0_and_keeps_more_than_random(projected):
    """The stored matrix is the PCA of the unprojected store's first 512 rows of view 0 (at least 8 rows per
    dimension, whole chunks), as the same subspace; and it keeps more of every projected block's variance than a
    random projection of the same width does."""
    store, full, _ = (open_store(path) for path in projected)
    last = store.blocks("densenet_k12")[-1]
    key = feature_key("densenet_k12", "blocks", last.key)
    first_chunk = torch.from_numpy(full.read(key, 0)[:512].astype(np.float64)).flatten(1)
    hand = pca_projection(first_chunk, 8).double()
    stored = stored_projections(store, "densenet_k12")[last.name].double()
    # The same 8-dimensional subspace (float16 inputs against float32 ones move it a little, not across).
    assert float(torch.linalg.norm(hand @ hand.T - stored @ stored.T)) < 0.1
    pca = store_fidelity(str(projected[0]), str(projected[1]))["teachers"]
    random = store_fidelity(str(projected[2]), str(projected[1]))["teachers"]
    for teacher, summary in pca.items():
        for name, values in summary["blocks"].items():
            if "projection" in values:
                kept, chance = values["projection"], random[teacher]["blocks"][name]["projection"]
                assert kept["variance_kept"] > chance["variance_kept"] + 0.1, (teacher, name)
                assert kept["distance_error"] < chance["distance_error"], (teacher, name)


def test_meal_preset_projects_only_blocks_wider_than_its_d_and_keeps_few_classes_whole(tmp_path, teacher_dir,
                                                                                       digits):  # fmt: skip
    """``--for meal`` means PCA to 128 and every logit: on digits' teachers (no block wider than 90 channels)
    nothing is projected, where an explicit --project 128 is refused; --project 0 or a logits encoding the user
    chooses overrides the preset."""
    from meal_cache.extract.config import fitted_to_data

    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], views=1, teacher_dir=str(teacher_dir),
                           device="cpu", preset="meal")  # fmt: skip
    store = extract(config, tmp_path / "meal.zarr", progress=False, dataset=digits)
    assert store.layout.logits is None and store.layout.logits_temperature is None
    assert store.attrs["format"] == "meal-cache/11" and "teachers/resnet8_w4/logits" in store.group
    assert all(b.projected_from is None for t in store.teacher_names for b in store.blocks(t))
    resolved = config.resolved()
    assert (resolved.project, resolved.projection) == (128, "pca")
    assert resolved.logits is None
    assert fitted_to_data(resolved, config, 1000).logits is None
    chosen = dataclasses.replace(config, logits="sample:8")
    assert fitted_to_data(chosen.resolved(), chosen, 10).logits == "sample:8"
    assert dataclasses.replace(config, project=0).resolved().project is None
    assert dataclasses.replace(config, logits="all").resolved().logits is None  # every logit
    with pytest.raises(UserError, match="--project 128 is not below any block's channels"):
        extract(dataclasses.replace(config, project=128), tmp_path / "p.zarr", progress=False, dataset=digits)


def test_the_store_holds_its_projection_and_its_blocks_are_the_teachers_times_it(projected):
    store, full, _ = (open_store(path) for path in projected)
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
    out = distiller(distiller.batch(images, targets, labels, distiller.teachers))
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_fidelity_reports_what_the_projection_keeps(projected):
    result = store_fidelity(str(projected[0]), str(projected[1]))
    store, full, _ = (open_store(path) for path in projected)
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "-1"], "--project must be a whole number of channels, at least 1 (0: every channel), got -1"),
        (["--project", "1000"], "--project 1000 is not below any block's channels (the widest has 90)"),
        (["--project", "8", "--features", "maps"], "this store keeps no blocks (--features maps)"),
    ],
)
def test_bad_projections_through_the_console_script(tmp_path, teacher_dir, args, message):
    line = one_error_line_of(["extract", "--teachers", "resnet8_w4,densenet_k12", "--data", "digits", "--views", "1",
                              "--teacher-dir", str(teacher_dir), "--out", str(tmp_path / "x.zarr"), "--device", "cpu",
                              *args], tmp_path, start_the_script=args == ["--project", "-1"])  # fmt: skip
    assert message in line, line
    assert not (tmp_path / "x.zarr").exists()


def test_online_teachers_project_their_blocks_with_the_stores_matrices(projected, teacher_dir, digits):
    from meal_cache.distill import DistillEpochs, build_run
    from meal_cache.engine.distributed import World

    config = DistillConfig(store=str(projected[0]), student="resnet8_w4", method="meal", device="cpu", workers=0,
                           online=True, teachers=["resnet8_w4", "densenet_k12"], teacher_dir=str(teacher_dir),
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
