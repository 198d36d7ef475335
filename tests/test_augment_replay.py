"""RandAugment and TrivialAugmentWide in cached views (issue 18): torchvision's ops and magnitudes, drawn per
(view, row) from the recorded seed, stored as int8 arrays, and replayed bit for bit by distill."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr
from imagefolder import make_image_folder
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from meal_cache.data.datasets import load_dataset
from meal_cache.errors import UserError
from meal_cache.views import augment

FAMILIES = {
    "geometric": ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"),
    "colour": ("Brightness", "Color", "Contrast", "Sharpness"),
    "levels": ("Posterize", "Solarize", "AutoContrast", "Equalize"),
}
TORCHVISION = {"randaugment": v2.RandAugment, "trivialaugment-wide": v2.TrivialAugmentWide}


@pytest.mark.parametrize("space", list(TORCHVISION))
def test_the_ops_and_their_magnitudes_are_torchvisions(space):
    reference = TORCHVISION[space]()
    assert tuple(reference._AUGMENTATION_SPACE) == augment.OP_NAMES
    images = torch.randint(0, 256, (6, 3, 16, 20), dtype=torch.uint8)
    for name, (magnitudes, signed) in reference._AUGMENTATION_SPACE.items():
        mine, mine_signed = augment.SPACES[space][name]
        assert mine_signed == signed, name
        theirs = magnitudes(augment.NUM_BINS, 16, 20)
        assert (mine is None) if theirs is None else torch.equal(mine(augment.NUM_BINS, 16, 20), theirs), name
        for signed_bin in (0, 9, 30, -9) if signed else (0, 9, 30):
            magnitude = augment.op_magnitude(space, augment.OP_INDEX[name], signed_bin, 16, 20)
            expected = reference._apply_image_or_video_transform(images, name, magnitude,
                                                                 interpolation=InterpolationMode.NEAREST,
                                                                 fill=reference._fill)  # fmt: skip
            assert torch.equal(augment._apply_op(images, name, magnitude), expected), (name, signed_bin)


def _torchvision_magnitude(space: str, name: str, signed_bin: int, height: int, width: int) -> float:
    """What torchvision passes for op ``name`` when it draws bin ``|signed_bin|`` (and, for a negative bin, the
    sign): entry ``|signed_bin|`` of its own table evaluated for its ``num_magnitude_bins`` and the image's size, 0
    for the ops that take none. The test above hands op_magnitude's value to both sides, so it cannot see which
    entry a stored bin reads; this reads the entry from torchvision alone."""
    reference = TORCHVISION[space]()
    magnitudes_fn, signed = reference._AUGMENTATION_SPACE[name]
    magnitudes = magnitudes_fn(reference.num_magnitude_bins, height, width)
    if magnitudes is None:
        return 0.0
    value = float(magnitudes[abs(signed_bin)])
    return -value if signed and signed_bin < 0 else value


@pytest.mark.parametrize("space", list(TORCHVISION))
def test_a_stored_bin_is_torchvisions_table_entry_of_that_index(space):
    height, width = 16, 20  # not square: TranslateX reads the width, TranslateY the height
    bins = TORCHVISION[space]().num_magnitude_bins
    assert bins == augment.NUM_BINS == 31
    for name in augment.OP_NAMES:
        op = augment.OP_INDEX[name]
        for signed_bin in range(-(bins - 1), bins):
            if signed_bin < 0 and not augment.SPACES[space][name][1]:
                continue  # never stored: unsigned ops draw no sign
            expected = _torchvision_magnitude(space, name, signed_bin, height, width)
            assert augment.op_magnitude(space, op, signed_bin, height, width) == pytest.approx(expected, abs=1e-6), (
                name,
                signed_bin,
            )


@pytest.mark.parametrize("policy_name", ["randaugment", "trivialaugment"])
def test_rendered_ops_are_torchvisions_ops_at_the_drawn_bins_magnitude(policy_name):
    """Each row's pixels are torchvision's op at the magnitude torchvision's table gives for the bin drawn for that
    row, applied to the row's crop; and the bins drawn are torchvision's: RandAugment's fixed magnitude 9, or
    TrivialAugment's uniform draw over all 31 bins."""
    policy = augment.policy_for(policy_name, "natural")
    n = 600
    sizes = augment.square_sizes(n, 16)
    generator = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    params = augment.draw(augment.RECIPES["natural"], sizes, augment.view_generator(2, 0), policy)
    takes = torch.tensor([augment.SPACES[policy.space][name][0] is not None for name in augment.OP_NAMES])
    drawn = params.magnitude.long().abs()[takes[params.ops.long()]]
    if policy_name == "randaugment":
        assert policy.magnitude == v2.RandAugment().magnitude and set(drawn.tolist()) == {policy.magnitude}
    else:
        assert set(drawn.tolist()) == set(range(v2.TrivialAugmentWide().num_magnitude_bins))
    rendered = augment.render(images, params)
    crops = augment.render(images, dataclasses.replace(params, ops=None)).to(torch.uint8)
    reference = TORCHVISION[policy.space]()
    # Rows grouped by their (op, bin) pairs, so each torchvision call covers many rows (a row's pixels depend on its
    # own parameters alone, tested above).
    pairs = torch.cat([params.ops.long(), params.magnitude.long()], 1)
    for pair in torch.unique(pairs, dim=0):
        rows = (pairs == pair).all(1).nonzero()[:, 0]
        expected = crops[rows]
        for k in range(policy.num_ops):
            name = augment.OP_NAMES[int(pair[k])]
            magnitude = _torchvision_magnitude(policy.space, name, int(pair[policy.num_ops + k]), 16, 16)
            expected = reference._apply_image_or_video_transform(expected, name, magnitude,
                                                                 interpolation=InterpolationMode.NEAREST,
                                                                 fill=reference._fill)  # fmt: skip
        assert torch.equal(rendered[rows], expected.float()), pair.tolist()


def test_policies_draw_torchvisions_counts_and_bins_and_keep_the_crops():
    sizes = augment.square_sizes(400, 16)
    natural, digits = augment.RECIPES["natural"], augment.RECIPES["digits"]
    plain = augment.draw(natural, sizes, augment.view_generator(5, 1))
    rand = augment.draw(natural, sizes, augment.view_generator(5, 1), augment.policy_for("randaugment", "natural"))
    assert torch.equal(rand.crop, plain.crop) and torch.equal(rand.flip, plain.flip)  # ops are drawn after them
    assert rand.ops.shape == (400, 2) and rand.ops.dtype == torch.int8 and rand.magnitude.dtype == torch.int8
    assert set(rand.magnitude.abs().unique().tolist()) == {0, 9} and (rand.magnitude < 0).any()
    assert set(rand.ops.unique().tolist()) == set(range(len(augment.OP_NAMES)))
    trivial = augment.policy_for("trivialaugment", "natural")
    wide = augment.draw(natural, sizes, augment.view_generator(5, 1), trivial)
    assert wide.ops.shape == (400, 1) and wide.space == "trivialaugment-wide" and wide.magnitude.abs().max() > 20
    again = augment.draw(natural, sizes, augment.view_generator(5, 1), trivial)
    assert torch.equal(again.ops, wide.ops) and torch.equal(again.magnitude, wide.magnitude)
    # Glyphs: no flips, none of the ops that swap ink and background, RandAugment's narrower ranges.
    for name in ("randaugment", "trivialaugment"):
        glyphs = augment.draw(digits, sizes, augment.view_generator(5, 1), augment.policy_for(name, "digits"))
        drawn = {augment.OP_NAMES[i] for i in glyphs.ops.unique().tolist()}
        assert drawn == set(augment.GLYPH_OPS) and not glyphs.flip.any() and glyphs.space == "randaugment"
    with pytest.raises(UserError, match="unknown --policy 'autoaugment'; choose one of: crop, randaugment"):
        augment.policy_for("autoaugment", "natural")
    assert augment.policy_for("crop", "natural") is None


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("space", list(TORCHVISION))
def test_a_rows_augmented_pixels_do_not_depend_on_the_other_rows_of_its_batch(family, space):
    policy = augment.Policy("test", space, ("Identity", *FAMILIES[family]), 2, None)
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8, generator=generator)
    for recipe, out_size in (("natural", None), ("natural-large", 16)):  # exact gathers; resampled floats
        params = augment.draw(augment.RECIPES[recipe], augment.square_sizes(40, 24), generator, policy)
        whole = augment.render(images, params, out_size)
        assert not torch.equal(whole, augment.render(images, dataclasses.replace(params, ops=None), out_size))
        assert torch.equal(whole, whole.round())  # an augmented row is uint8, as torchvision's ops take it
        for size in (1, 3, 17):
            rows = torch.randperm(40, generator=generator)[:size]
            assert torch.equal(augment.render(images[rows], params[rows], out_size), whole[rows]), (recipe, size)


def test_the_stored_arrays_alone_determine_the_pixels():
    """Rebuilt from plain int8/int16/bool arrays and the policy's space, a view gives the same pixels; an identity
    row (-1 ops) is the crop alone."""
    policy = augment.policy_for("trivialaugment", "natural")
    sizes = augment.square_sizes(30, 16)
    drawn = augment.draw(augment.RECIPES["natural"], sizes, augment.view_generator(1, 0), policy)
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    arrays = {name: getattr(drawn, name).numpy().copy() for name in ("crop", "flip", "ops", "magnitude")}
    rebuilt = augment.ViewParams(*(torch.from_numpy(arrays[name]) for name in arrays), space=policy.space)
    assert torch.equal(augment.render(images, rebuilt), augment.render(images, drawn))
    plain = augment.identity(sizes, augment.RECIPES["natural"], policy)
    assert (plain.ops == augment.NO_OP).all()
    assert torch.equal(augment.render(images, plain), images.float())


# ------------------------------------------------------------------------------------ replay through the stages


def _extract_recording(config, out, monkeypatch, dataset=None):
    """Extract with ``config``; returns the store and, per view, the pixels its one teacher was fed per row."""
    from meal_cache.extract import run as extract_module
    from meal_cache.extract.run import extract

    fed: list[torch.Tensor] = []
    real = extract_module.teacher_outputs

    def recording(teacher, pixels, *args):
        fed.append(pixels.clone())
        return real(teacher, pixels, *args)

    monkeypatch.setattr(extract_module, "teacher_outputs", recording)
    store = extract(config, out, progress=False, dataset=dataset)
    monkeypatch.undo()
    from extract_order import fed_per_view

    return store, fed_per_view(fed, store.n, store.num_views, config.rows_per_chunk, config.batch_size)


def _distill_recording(path, monkeypatch, dataset=None, **options):
    from meal_cache import distill as distill_module
    from meal_cache.distill import DistillConfig, distill

    seen = []
    real_step = distill_module.DistillEpochs.step

    def record(self, batch):
        (rows, *_), pixels = batch
        seen.append((rows.clone(), pixels.clone()))
        return real_step(self, batch)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    config = DistillConfig(store=str(path), student="resnet8_w4", method="kd", device="cpu", workers=0, **options)
    distill(config, path.parent / "run", progress=False, dataset=dataset)
    monkeypatch.undo()
    return seen


def _replayed_from_the_arrays(path, view: int, images: torch.Tensor) -> torch.Tensor:
    """A view's pixels rebuilt from the store's arrays read with zarr alone (no meal-cache reader)."""
    group = zarr.open_group(str(path), mode="r")
    arrays = [torch.from_numpy(np.asarray(group[f"views/{name}"][view])) for name in ("crop", "flip", "ops",
                                                                                     "magnitude")]  # fmt: skip
    return augment.render(images, augment.ViewParams(*arrays, space=group.attrs["views"]["policy"]["space"]))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_distill_replays_the_augmented_pixels_the_teacher_saw_in_memory(teacher_dir, tmp_path, monkeypatch, policy):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.store import FORMAT

    spec = "digits?train_fraction=0.1"  # 143 rows
    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, views=2, identity_view=True, policy=policy,
                           preset="kd", teacher_dir=str(teacher_dir), rows_per_chunk=64, batch_size=50,
                           device="cpu")  # fmt: skip
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(config, path, monkeypatch)
    attrs = store.attrs
    assert attrs["format"] == FORMAT and attrs["views"]["policy"]["name"] == policy
    assert attrs["settings"]["policy"] == policy and store.policy == augment.policy_for(policy, "digits")
    k = 2 if policy == "randaugment" else 1
    assert store.array("views/ops").shape == (3, store.n, k) and store.array("views/magnitude").dtype == np.int8
    images = load_dataset(spec).split("train").images
    for view in range(2):
        assert torch.equal(_replayed_from_the_arrays(path, view, images), fed[view])
    assert torch.equal(fed[2], images.float())  # the identity view has no ops
    assert not torch.equal(fed[0], augment.render(images, dataclasses.replace(store.view_params(0), ops=None)))
    # Other batches than extract's (24 shuffled rows, not 50 in order): the same pixels, row by row.
    seen = _distill_recording(path, monkeypatch, epochs=2, batch_size=24)
    steps = store.n // 24
    assert len(seen) == 2 * steps
    for index, (rows, pixels) in enumerate(seen):
        assert torch.equal(pixels, fed[index // steps][rows]), index


def test_distill_replays_the_augmented_pixels_the_teacher_saw_from_files(teacher_dir, tmp_path, monkeypatch):
    from meal_cache.extract.config import ExtractConfig

    folder = make_image_folder(tmp_path / "jpegs", classes=10, train=2, val=1, sizes=(40, 90))
    config = ExtractConfig(teachers=["resnet8_w4"], data=f"imagefolder:{folder}", image_size=16, views=2,
                           policy="trivialaugment", preset="kd", teacher_dir=str(teacher_dir), rows_per_chunk=8,
                           batch_size=8, device="cpu", workers=0)  # fmt: skip
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(config, path, monkeypatch)
    assert store.policy.space == "trivialaugment-wide" and store.source_sizes() is not None
    crops_only = dataclasses.replace(store.view_params(0), ops=None)
    split = load_dataset(f"imagefolder:{folder}", image_size=16).split("train").open(torch.device("cpu"), 0)
    plain = next(split.pixels([(torch.arange(store.n), crops_only, None)]))[1]
    assert not torch.equal(plain, fed[0])  # the ops changed what the teacher saw
    seen = _distill_recording(path, monkeypatch, epochs=2, batch_size=6)
    assert len(seen) == 2 * (store.n // 6)
    for index, (rows, pixels) in enumerate(seen):
        assert torch.equal(pixels, fed[index // (store.n // 6)][rows]), index


def test_crop_stores_keep_their_format_settings_and_views(small_store):
    from meal_cache.store import FORMAT, open_store

    path, _ = small_store
    store = open_store(path)
    assert store.attrs["format"] == FORMAT and store.attrs["settings"]["policy"] == "crop"
    assert store.policy is None and store.view_params(0).ops is None and "views/ops" not in store.group
    assert store.view_keys == ["views/crop", "views/flip"]
