"""Dense stores (issue 30): each teacher once per whole image, and the targets of any crop derived from its maps
by RoIAlign. Pinned here: RoIAlign against hand computations, the whole-image crop's exact targets, targets of
random crops closer to the teachers run on those crops than the whole image's are, the student's pixels being the
crop the targets were derived for, the format, top-k maps, a second scale, and every refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from console import one_error_line, one_error_line_in_process, run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.dense import DenseTargets, crop_rois, pool_boxes, whole_image
from meal_cache.distill import DistillConfig, distill
from meal_cache.distill.run import build_run
from meal_cache.distill.step import DistillEpochs
from meal_cache.engine.distributed import init_world
from meal_cache.engine.loop import Stream, epoch_generator
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.nets.teachers import resolve_teacher, teacher_outputs
from meal_cache.runtime import Precision
from meal_cache.store import FORMAT, feature_key, logits_key, open_store
from meal_cache.views import augment

SPEC = "digits?train_fraction=0.1"  # 143 training rows at 16 px
# Random-resized crops and mirrors, so boxes, scales and flips all matter (digits' own recipe only shifts).
CROPS = {"scale": (0.3, 1.0), "hflip": 0.5}
TEACHERS = ["resnet8_w4", "densenet_k12"]


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset(SPEC)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher_dir, small_digits):
    """A lossless dense store and a lossless store of 3 views of the same teachers (their last 2 blocks pooled
    to 2 x 2, so a mirrored crop's blocks differ from the unmirrored one's)."""
    root = tmp_path_factory.mktemp("dense")
    common = dict(teachers=TEACHERS, teacher_dir=str(teacher_dir), device="cpu", features=["blocks"], blocks="2",
                  grid=2, rows_per_chunk=64, **CROPS)  # fmt: skip
    extract(ExtractConfig(dense=True, **common), root / "dense.zarr", progress=False, dataset=small_digits)
    extract(ExtractConfig(views=3, seed=7, **common), root / "views.zarr", progress=False, dataset=small_digits)
    return root / "dense.zarr", root / "views.zarr"


def test_roi_align_over_a_tiny_map_is_the_hand_computed_average():
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # a 2 x 2 map over an 8 x 8 image
    sizes = torch.tensor([[8, 8]])

    def pooled(crop: list[int], out: int = 1) -> torch.Tensor:
        rois = crop_rois(torch.tensor([crop], dtype=torch.int16), sizes, (2, 2))
        return pool_boxes(grid, rois, out)[0, 0]

    assert float(pooled([0, 0, 8, 8])) == pytest.approx(2.5)  # every cell's centre once
    assert float(pooled([0, 0, 8, 4])) == pytest.approx(2.0)  # the left column
    assert float(pooled([0, 0, 4, 4])) == pytest.approx(1.0)  # one cell
    assert float(pooled([2, 2, 4, 4])) == pytest.approx(2.5)  # the centre: one sample between all four
    assert torch.allclose(pooled([0, 0, 8, 8], out=2), grid[0, 0])
    # A padded crop is cut to the image: (0, 0)-(6, 6) is map box 0-1.5, shifted half a cell (aligned) to -0.5-1.0,
    # sampled at -0.125 (clamped to row 0) and 0.625 (0.375 of row 0, 0.625 of row 1) on each axis.
    weights = (torch.tensor([1.0, 0.0]) + torch.tensor([0.375, 0.625])) / 2
    expected = float(weights @ grid[0, 0] @ weights)
    assert expected == pytest.approx(1.9375)
    assert float(pooled([-2, -2, 8, 8])) == pytest.approx(expected)
    # Boxes are in each image's own pixels: the same box on a wider image covers less of the map.
    wide = crop_rois(torch.tensor([[0, 0, 8, 8]], dtype=torch.int16), torch.tensor([[8, 16]]), (2, 2))
    assert wide[0, 1:].tolist() == pytest.approx([0.0, 0.0, 1.0, 2.0])


def test_the_whole_image_crop_gets_the_whole_image_targets_exactly(stores, teacher_dir, small_digits):
    dense = open_store(stores[0])
    keys = [logits_key("resnet8_w4")] + [feature_key("resnet8_w4", "blocks", b.key) for b in dense.blocks("resnet8_w4")]
    stored = {key: torch.from_numpy(dense.read(key, 0).astype(np.float32)) for key in keys}
    sizes = small_digits.split("train").source_sizes()
    derived = DenseTargets(dense, keys)(stored, whole_image(sizes), sizes)
    logits = derived[keys[0]]
    assert logits.shape == (dense.n, 10)
    assert torch.allclose(logits, stored[keys[0]].mean(1), atol=1e-5)  # the map's plain mean
    for key in keys[1:]:  # the stored 4 x 4 grid pooled to the 2 x 2 the method reads
        assert stored[key].shape[-2:] == (4, 4) and derived[key].shape[-2:] == (2, 2)
        assert torch.allclose(derived[key], F.adaptive_avg_pool2d(stored[key], 2), atol=1e-5)
    # ... and that mean is the teacher's own logits of the whole image (float16 storage aside).
    teacher = resolve_teacher("resnet8_w4", teacher_dir, small_digits, "2", 2)
    images = small_digits.split("train").images
    own = teacher_outputs(teacher, images.float(), ("blocks",), Precision(torch.device("cpu")))
    assert torch.allclose(logits, own["logits"], atol=2e-2, rtol=1e-2)
    assert torch.equal(logits.argmax(1), own["logits"].argmax(1))


class PatchLinear(torch.nn.Module):
    """A teacher whose every position sees only its own 4 x 4 patch, classified linearly after global average
    pooling: its logits of a crop are the average of its per-position logits over that crop, up to resampling, so
    a dense store's derived targets must track it wherever the crop is, however zoomed or mirrored."""

    def __init__(self, num_classes: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 24, patch, stride=patch)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.patch(x)).flatten(1))


@pytest.fixture(scope="module")
def patch_stores(tmp_path_factory, small_digits):
    """A PatchLinear teacher trained 2 epochs (registered as an architecture while the module runs), a lossless
    dense store of it and a store of 3 views of random-resized, mirrored crops."""
    from meal_cache.nets import models

    entry = models.ModelEntry(PatchLinear, ("patch",), "a linear classifier of 4 x 4 patches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "patch_linear", entry)
        root = tmp_path_factory.mktemp("patch")
        train_supervised(TrainConfig(arch="patch_linear", data=SPEC, epochs=2, device="cpu"),
                         root / "teachers" / "patch_linear.pt", progress=False, dataset=small_digits)  # fmt: skip
        common = dict(teachers=["patch_linear"], teacher_dir=str(root / "teachers"), device="cpu",
                      features=["blocks"], grid=2, **CROPS)  # fmt: skip
        extract(ExtractConfig(dense=True, **common), root / "dense.zarr", progress=False, dataset=small_digits)
        extract(ExtractConfig(views=3, seed=7, **common), root / "views.zarr", progress=False, dataset=small_digits)
        yield root / "dense.zarr", root / "views.zarr"


def test_random_crops_targets_track_a_local_teacher_on_those_crops_far_better_than_the_whole_images(patch_stores):
    dense_path, views_path = patch_stores
    result = store_fidelity(str(dense_path), str(views_path))["teachers"]["patch_linear"]
    dense, views = open_store(dense_path), open_store(views_path)
    assert result["rows"] == 3 * dense.n
    # The baseline: every crop given its whole image's targets (what a box mapped wrongly would give at best).
    whole = torch.from_numpy(dense.logits("patch_linear", 0).astype(np.float64))
    whole_kl = 0.0
    for view in range(3):
        p = F.log_softmax(torch.from_numpy(views.logits("patch_linear", view).astype(np.float64)) / 4, 1)
        whole_kl += float((p.exp() * (p - F.log_softmax(whole / 4, 1))).sum(1).mean()) / 3
    assert result["kl"]["T=4"] < 0.25 * whole_kl, (result["kl"], whole_kl)
    # Blocks pooled 2 x 2: the crop's box of the stored grid, mirrored with the crop. A mirrored crop's patches
    # are other patches to a convolution, so mirroring the unmirrored image's grid only approximates them.
    key = feature_key("patch_linear", "blocks", "patch")
    stored = {key: torch.from_numpy(dense.read(key, 0).astype(np.float32))}
    sizes = small_sizes(dense.n)

    def error(values: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor) -> float:
        return float(((values[rows] - truth[rows]) ** 2).sum() / (truth[rows] ** 2).sum()) ** 0.5

    for view in range(3):
        params = views.view_params(view)
        truth = torch.from_numpy(views.read(key, view).astype(np.float32))
        derived = DenseTargets(dense, [key])(stored, params, sizes)[key]
        unmirrored = DenseTargets(dense, [key])(stored, dataclasses.replace(params, flip=params.flip & False), sizes)
        baseline = F.adaptive_avg_pool2d(stored[key], 2)
        kept, flipped = ~params.flip, params.flip
        assert error(derived, truth, kept) < 0.5 * error(baseline, truth, kept)
        assert error(derived, truth, flipped) < 0.8 * error(unmirrored[key], truth, flipped)


def small_sizes(n: int) -> torch.Tensor:
    return augment.square_sizes(n, 16)


def test_the_student_sees_exactly_the_crop_whose_targets_were_derived(stores, small_digits):
    config = DistillConfig(store=str(stores[0]), student="resnet8_w4", method="meal", epochs=2, batch_size=32,
                           device="cpu", workers=0).resolved(("blocks",))  # fmt: skip
    world, device = init_world("cpu")
    run = build_run(config, world, device, small_digits, progress=False)
    epochs = DistillEpochs(run)
    dense = open_store(stores[0])
    keys = run.distiller.needed_keys()
    stored = {key: torch.from_numpy(dense.read(key, 0).astype(np.float32)) for key in keys}
    split = small_digits.split("train")
    firsts = []
    for epoch in range(2):
        params = augment.draw(run.recipe, run.sizes, epoch_generator(config.seed, epoch, Stream.FRESH_VIEWS))
        (rows, targets, _), pixels = next(iter(epochs.batches(epoch)))
        assert set(targets) == set(keys)
        crops = params[rows]
        assert torch.equal(pixels, augment.render(split.images[rows], crops))
        expected = DenseTargets(dense, keys)({k: v[rows] for k, v in stored.items()}, crops, run.sizes[rows])
        for key in keys:
            assert torch.allclose(targets[key], expected[key], atol=1e-3), key
        firsts.append(crops.crop)
    assert not torch.equal(firsts[0], firsts[1])  # each epoch draws its own crops


def test_dense_stores_are_format_8_hold_maps_and_views_stores_keep_their_format(stores):
    dense, views = open_store(stores[0]), open_store(stores[1])
    assert dense.attrs["format"] == views.attrs["format"] == FORMAT == "meal-cache/11"
    assert dense.num_views == 1 and dense.dense and not views.dense
    spec = dense.teacher("resnet8_w4")
    assert spec["dense_map"] == [4, 4]  # resnet8's last block at 16 px
    assert dense.array(logits_key("resnet8_w4")).shape == (1, dense.n, 16, 10)
    assert [b.stored_grid for b in dense.blocks("resnet8_w4")] == [4, 4]
    assert [b.grid for b in dense.blocks("resnet8_w4")] == [2, 2]
    assert dense.layout.dense == {"sizes": [16], "grid": 4}


def test_top_k_maps_keep_each_positions_classes_and_a_second_scale_widens_the_map(stores, teacher_dir, small_digits,
                                                                                  tmp_path):  # fmt: skip
    common = dict(teachers=["resnet8_w4"], teacher_dir=str(teacher_dir), device="cpu", features=["blocks"],
                  blocks="1", dense=True, **CROPS)  # fmt: skip
    extract(ExtractConfig(logits="topk:3", **common), tmp_path / "top3.zarr", progress=False, dataset=small_digits)
    top3, lossless = open_store(tmp_path / "top3.zarr"), open_store(stores[0])
    key = logits_key("resnet8_w4")
    assert top3.array(f"{key}_topk/index").shape == (1, top3.n, 16, 3)
    rebuilt, exact = top3.read(key, 0).astype(np.float64), lossless.read(key, 0).astype(np.float64)
    assert rebuilt.shape == exact.shape == (top3.n, 16, 10)
    assert (rebuilt.argmax(-1) == exact.argmax(-1)).mean() > 0.99
    # Each position's top 3 classes keep their probability at the store's temperature (4).
    p_rebuilt = torch.softmax(torch.from_numpy(rebuilt) / 4, -1)
    p_exact = torch.softmax(torch.from_numpy(exact) / 4, -1)
    top = torch.from_numpy(exact).topk(3, -1).indices
    close = (p_rebuilt.gather(-1, top) - p_exact.gather(-1, top)).abs() < 2e-3
    assert close.float().mean() > 0.99  # all but float16 ties at the third class
    extract(ExtractConfig(dense_sizes=[16, 24], **common), tmp_path / "two.zarr", progress=False, dataset=small_digits)
    two = open_store(tmp_path / "two.zarr")
    assert two.layout.dense["sizes"] == [16, 24] and two.teacher("resnet8_w4")["dense_map"] == [6, 6]
    assert two.array(key).shape == (1, two.n, 36, 10)
    assert [b.stored_grid for b in two.blocks("resnet8_w4")] == [4]  # the blocks at the first size's grid


def test_distill_from_a_dense_store_with_two_crops_an_image_and_with_teachers_online(stores, teacher_dir, small_digits,
                                                                                      tmp_path):  # fmt: skip
    kd = DistillConfig(store=str(stores[0]), student="resnet8_w4", method="kd", epochs=2, batch_size=32,
                       crops_per_image=2, device="cpu", workers=0)  # fmt: skip
    summary = distill(kd, tmp_path / "kd", progress=False, dataset=small_digits)
    assert [row["view"] for row in summary["history"]] == ["dense", "dense"]
    assert all(np.isfinite(row["loss"]) for row in summary["history"])
    # The upper reference: the teachers run on each crop (the store gives only their blocks' specs).
    online = DistillConfig(store=str(stores[0]), student="resnet8_w4", method="meal", epochs=1, batch_size=32,
                           online=True, teachers=TEACHERS, teacher_dir=str(teacher_dir), device="cpu",
                           workers=0)  # fmt: skip
    summary = distill(online, tmp_path / "online", progress=False, dataset=small_digits)
    assert np.isfinite(summary["history"][0]["loss"])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A one-epoch teacher, a one-epoch ViT at 32 px (its head reads the class token, not every position), and a
    dense store of the first, all on 85 rows."""
    root = tmp_path_factory.mktemp("refusals")
    spec = "digits?folds=20&fold=0&train_fraction=0.05"
    train_supervised(TrainConfig(arch="resnet8_w4", data=spec, epochs=1, device="cpu"),
                     root / "teachers" / "resnet8_w4.pt", progress=False)  # fmt: skip
    for name, arch in (("vit", "timm:vit_tiny_patch16_224"), ("timm_resnet", "timm:resnet10t")):
        train_supervised(TrainConfig(arch=arch, data=spec, image_size=32, epochs=1, device="cpu"),
                         root / "teachers" / f"{name}.pt", progress=False)  # fmt: skip
    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, dense=True, teacher_dir=str(root / "teachers"),
                           features=["blocks"], blocks="1", device="cpu")  # fmt: skip
    extract(config, root / "dense.zarr", progress=False)
    return root, spec


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--mixup", "0.8"], "--mixup/--cutmix"),
        (["--policy", "randaugment"], "--policy randaugment"),
        (["--features", "maps"], "--features maps"),
        (["--for", "at"], "--for at"),
        (["--dense-sizes", "16,x"], "--dense-sizes takes pixels"),
        (["--dense-grid", "0"], "--dense-grid must be"),
    ],
)
def test_dense_refuses_what_it_cannot_derive_in_one_line(made, tmp_path, extra, named):
    root, spec = made
    line = one_error_line_in_process(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(root / "teachers"),
                                      "--data", spec, "--dense", *extra, "--out",
                                      str(tmp_path / "s.zarr")])  # fmt: skip
    assert named in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_a_teacher_whose_head_is_not_per_position_and_a_method_reading_maps_are_refused(made, tmp_path):
    root, spec = made
    line = one_error_line(run_console(["extract", "--teachers", "vit", "--teacher-dir", str(root / "teachers"),
                                       "--data", spec, "--image-size", "32", "--dense", "--out",
                                       str(tmp_path / "m.zarr")], tmp_path))  # fmt: skip
    # Its final features are tokens, not a (B, C, H, W) map: no position has a classifier of its own.
    assert "teacher 'vit'" in line and "per position failed" in line and "store of views" in line, line
    assert not (tmp_path / "m.zarr").exists()
    line = one_error_line_in_process(["distill", "--store", str(root / "dense.zarr"), "--method", "at", "--student",
                                      "resnet8_w4", "--epochs", "1", "--out", str(tmp_path / "at")])  # fmt: skip
    assert "channel-mean maps" in line and "dense store" in line, line


def test_a_dense_store_is_refused_as_the_fidelity_reference_in_one_line(stores, tmp_path):
    dense, views = stores
    line = one_error_line_in_process(["info", str(views), "--fidelity", str(dense)])
    assert "the reference is a dense store" in line, line


def test_a_timm_convnet_teacher_gets_its_logit_map_from_the_map_its_head_reads(made, tmp_path):
    root, spec = made
    config = ExtractConfig(teachers=["timm_resnet"], data=spec, image_size=32, dense=True, dense_sizes=[64],
                           teacher_dir=str(root / "teachers"), features=["blocks"], blocks="1",
                           device="cpu")  # fmt: skip
    extract(config, tmp_path / "timm.zarr", progress=False)
    store = open_store(tmp_path / "timm.zarr")
    assert store.teacher("timm_resnet")["dense_map"] == [2, 2]  # stride 32 at 64 px
    logits = store.read(logits_key("timm_resnet"), 0)
    assert logits.shape == (store.n, 4, 10) and np.isfinite(logits).all()


def test_a_dense_store_of_a_streamed_jpeg_folder_sees_each_whole_image_and_distills_from_its_crops(tmp_path):
    from imagefolder import make_image_folder

    root = make_image_folder(tmp_path / "jpegs", classes=3, train=4, val=1, sizes=(40, 90))
    spec = f"imagefolder:{root}"
    train_supervised(TrainConfig(arch="resnet8_w4", data=spec, image_size=32, epochs=1, device="cpu", workers=0),
                     tmp_path / "t" / "resnet8_w4.pt", progress=False)  # fmt: skip
    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, image_size=32, dense=True, features=["blocks"],
                           blocks="1", teacher_dir=str(tmp_path / "t"), device="cpu", workers=0)  # fmt: skip
    store = extract(config, tmp_path / "dense.zarr", progress=False)
    # The whole image, squashed to a square of 37 px (256/224 of 32): boxes of each file's own size map onto it.
    assert store.layout.dense == {"sizes": [37], "grid": 4}
    sizes = store.source_sizes()
    assert not torch.equal(sizes[:, 0], sizes[:, 1])  # images of other shapes than squares
    assert torch.equal(store.view_params(0).crop, whole_image(sizes).crop)
    kd = DistillConfig(store=str(tmp_path / "dense.zarr"), student="resnet8_w4", method="kd", epochs=2, batch_size=4,
                       device="cpu", workers=0)  # fmt: skip
    distilled = distill(kd, tmp_path / "run", progress=False)
    assert [row["view"] for row in distilled["history"]] == ["dense", "dense"]
    assert all(np.isfinite(row["loss"]) for row in distilled["history"])


def test_a_dense_store_projects_its_grids_through_pca_fitted_on_whole_images(stores, teacher_dir, small_digits,
                                                                             tmp_path):  # fmt: skip
    config = ExtractConfig(teachers=TEACHERS, teacher_dir=str(teacher_dir), device="cpu", features=["blocks"],
                           blocks="2", grid=2, dense=True, project=8, quantize=8, **CROPS)  # fmt: skip
    extract(config, tmp_path / "pca.zarr", progress=False, dataset=small_digits)
    projected = open_store(tmp_path / "pca.zarr")
    layer2, layer3 = projected.blocks("resnet8_w4")  # 8 and 16 channels: only layer3 is wider than 8
    assert (layer2.projected_from, layer3.projected_from) == (None, 16)
    for block in (layer2, layer3):
        assert block.channels == 8 and block.stored_grid == 4
        assert projected.array(feature_key("resnet8_w4", "blocks", block.key)).shape == (1, projected.n, 8, 4, 4)
    # Against the views store's crops (unprojected): its rows projected by the stored matrix keep most variance.
    result = store_fidelity(str(tmp_path / "pca.zarr"), str(stores[1]))["teachers"]["resnet8_w4"]
    assert result["blocks"]["blocks/layer3"]["projection"]["variance_kept"] > 0.7
    assert "projection" not in result["blocks"]["blocks/layer2"]


def test_evaluate_refuses_a_dense_store_as_the_teachers_evaluation_view_in_one_line(made, tmp_path):
    root, spec = made
    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, split="test", dense=True, features=["blocks"],
                           blocks="1", teacher_dir=str(root / "teachers"), device="cpu")  # fmt: skip
    extract(config, tmp_path / "test-dense.zarr", progress=False)
    line = one_error_line_in_process(["evaluate", str(root / "teachers" / "resnet8_w4.pt"), "--store",
                                      str(tmp_path / "test-dense.zarr")])  # fmt: skip
    assert "is a dense store" in line and "--identity-view" in line, line


@pytest.fixture(scope="module")
def patch_views(patch_stores, small_digits):
    """One more lossless store of 3 views of the local teacher (while its architecture is registered): random-resized
    crops mirrored top to bottom only."""
    root = patch_stores[0].parent
    config = ExtractConfig(teachers=["patch_linear"], teacher_dir=str(root / "teachers"), device="cpu",
                           features=["blocks"], grid=2, views=3, seed=11, scale=(0.3, 1.0), hflip=0.0,
                           vflip=0.5)  # fmt: skip
    extract(config, root / "vflip.zarr", progress=False, dataset=small_digits)
    return root / "vflip.zarr"


def _relative_error(values: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((values - truth) ** 2).sum() / (truth**2).sum()) ** 0.5


def test_vertically_mirrored_crops_get_vertically_mirrored_block_targets(patch_stores, patch_views):
    """Against the local teacher run on each true (resized, mirrored top to bottom) crop: the derived 2 x 2 blocks
    of the mirrored rows are far closer than the same box left unmirrored (0.45 against 0.84 relative L2 here; the
    unmirrored rows' own error is 0.34). A mirrored crop's patches are other patches to a convolution, so the
    mirrored grid only approximates them: the bound is against the unmirrored box, as for left-right flips."""
    dense, views = open_store(patch_stores[0]), open_store(patch_views)
    key = feature_key("patch_linear", "blocks", "patch")
    stored = {key: torch.from_numpy(dense.read(key, 0).astype(np.float32))}
    derive, sizes = DenseTargets(dense, [key]), small_sizes(dense.n)
    for view in range(3):
        params = views.view_params(view)
        assert params.vflip is not None and not params.flip.any()
        mirrored = params.vflip
        assert 40 < int(mirrored.sum()) < 100  # about half of the 143 rows
        truth = torch.from_numpy(views.read(key, view).astype(np.float32))
        derived = derive(stored, params, sizes)[key]
        unmirrored = derive(stored, dataclasses.replace(params, vflip=mirrored & False), sizes)[key]
        assert _relative_error(derived[mirrored], truth[mirrored]) < 0.7 * _relative_error(
            unmirrored[mirrored], truth[mirrored])  # fmt: skip
        assert torch.equal(derived[~mirrored], unmirrored[~mirrored])


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory, small_digits):
    """A teacher that classifies each pixel alone, linearly, then averages (a 1 x 1 convolution before the global
    pooling): its logits of any region of an image are exactly the mean of its per-pixel logits there. One epoch,
    and a lossless float32 dense store of it, whose logit map has a position per pixel."""
    from meal_cache.nets import models

    entry = models.ModelEntry(lambda classes: PatchLinear(classes, patch=1), ("patch",), "a per-pixel classifier")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "pixel_linear", entry)
        root = tmp_path_factory.mktemp("pixel")
        train_supervised(TrainConfig(arch="pixel_linear", data=SPEC, epochs=1, device="cpu"),
                         root / "teachers" / "pixel_linear.pt", progress=False, dataset=small_digits)  # fmt: skip
        config = ExtractConfig(teachers=["pixel_linear"], teacher_dir=str(root / "teachers"), device="cpu",
                               features=["blocks"], dense=True, dtype="float32")  # fmt: skip
        extract(config, root / "dense.zarr", progress=False, dataset=small_digits)
        teacher = resolve_teacher("pixel_linear", root / "teachers", small_digits, "1", 1)
        yield root / "dense.zarr", teacher


def test_crops_reaching_past_any_edge_get_the_teachers_logits_of_the_part_inside_the_image(pixel_store, small_digits):
    """digits' padded crops (shifts of up to 2 px each way: two thirds of them reach past the bottom or right edge)
    against the per-pixel teacher run on exactly the part of each crop inside the image: the dense rule cuts the
    box to the image (the teacher never saw a padded border), and for this teacher the cut box's average is that
    region's logits, up to float32 rounding. A box left reaching past the map samples cells that do not exist."""
    path, teacher = pixel_store
    dense = open_store(path)
    assert dense.teacher("pixel_linear")["dense_map"] == [16, 16]
    key = logits_key("pixel_linear")
    stored = {key: torch.from_numpy(dense.read(key, 0))}
    images = small_digits.split("train").images
    recipe = augment.recipe_for("digits", 16)
    params = augment.draw(recipe, small_sizes(dense.n), torch.Generator().manual_seed(3))
    derived = DenseTargets(dense, [key])(stored, params, small_sizes(dense.n))[key].double()
    y0, x0, h, w = params.crop.long().unbind(1)
    past = (y0 + h > 16) | (x0 + w > 16)
    before = (y0 < 0) | (x0 < 0)
    assert int(past.sum()) > 30 and int(before.sum()) > 30
    mean = torch.tensor(teacher.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std).view(1, -1, 1, 1)
    with torch.no_grad():
        for row in range(dense.n):
            top, left = max(int(y0[row]), 0), max(int(x0[row]), 0)
            bottom, right = min(int(y0[row] + h[row]), 16), min(int(x0[row] + w[row]), 16)
            region = images[row : row + 1, :, top:bottom, left:right].float()
            truth = teacher.model((region / 255 - mean) / std).double()[0]
            assert torch.allclose(derived[row], truth, atol=1e-4, rtol=1e-4), (row, params.crop[row].tolist())


def test_a_second_scale_averages_both_scales_blocks_and_logit_maps_as_computed_by_hand(teacher_dir, small_digits,
                                                                                        tmp_path):  # fmt: skip
    """``--dense-sizes 16,24``: the stored block grid is the mean of the last block at 16 px (4 x 4) and at 24 px
    (6 x 6, average-pooled to 4 x 4); the logit map is the classifier at each position of the 24-px map, averaged
    with the 16-px one resampled bilinearly to 6 x 6. Written out here with the teacher's own modules: the image
    resampled (bilinear, antialiased), normalised, the block's output taken by a hook, the classifier applied to
    each position's channels."""
    config = ExtractConfig(teachers=["resnet8_w4"], teacher_dir=str(teacher_dir), device="cpu", features=["blocks"],
                           blocks="1", dense=True, dense_sizes=[16, 24], dtype="float32")  # fmt: skip
    extract(config, tmp_path / "two.zarr", progress=False, dataset=small_digits)
    store = open_store(tmp_path / "two.zarr")
    teacher = resolve_teacher("resnet8_w4", teacher_dir, small_digits, "1", 1)
    model = teacher.model.eval()
    mean = torch.tensor(teacher.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std).view(1, -1, 1, 1)
    images = small_digits.split("train").images.float()
    outputs: list[torch.Tensor] = []
    hook = model.layer3.register_forward_hook(lambda _m, _i, output: outputs.append(output.double()))
    try:
        with torch.no_grad():
            for size in (16, 24):
                pixels = images if size == 16 else F.interpolate(images, size=(size, size), mode="bilinear",
                                                                 antialias=True, align_corners=False)  # fmt: skip
                model((pixels / 255 - mean) / std)
    finally:
        hook.remove()
    small, large = outputs
    assert small.shape[-2:] == (4, 4) and large.shape[-2:] == (6, 6)
    blocks = (F.adaptive_avg_pool2d(small, 4) + F.adaptive_avg_pool2d(large, 4)) / 2
    stored = torch.from_numpy(store.read(feature_key("resnet8_w4", "blocks", "layer3"), 0)).double()
    assert stored.shape == blocks.shape == (store.n, 16, 4, 4)
    assert torch.allclose(stored, blocks, atol=1e-4, rtol=1e-4)
    fc = model.fc.double()
    with torch.no_grad():
        per_position = [fc(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for grid in (small, large)]
    resampled = F.interpolate(per_position[0], size=(6, 6), mode="bilinear", align_corners=False)
    logit_map = ((resampled + per_position[1]) / 2).flatten(2).transpose(1, 2)
    stored_map = torch.from_numpy(store.read(logits_key("resnet8_w4"), 0)).double()
    assert stored_map.shape == logit_map.shape == (store.n, 36, 10)
    assert torch.allclose(stored_map, logit_map, atol=1e-4, rtol=1e-4)
    # Neither scale alone is the average: each is far from it next to the tolerance.
    for one in (F.adaptive_avg_pool2d(small, 4), F.adaptive_avg_pool2d(large, 4)):
        assert (one - blocks).abs().max() > 1e-2


def test_dense_settings_take_sizes_of_at_least_8_pixels_and_a_grid_of_at_least_1():
    """The bounds themselves, in process (the console rows above check one bad value each through the CLI)."""
    from meal_cache.dense import check_settings
    from meal_cache.errors import UserError

    check_settings([8], 1)
    check_settings(None, 4)
    check_settings([16, 24], 2)
    for sizes in ([7], [], [16, 7], [True], [8.0]):
        with pytest.raises(UserError, match=r"--dense-sizes takes whole numbers of pixels, at least 8, got "):
            check_settings(sizes, 1)
    for grid in (0, -1, True, 1.0):
        with pytest.raises(UserError, match=r"--dense-grid must be a whole number, at least 1, got "):
            check_settings([16], grid)
