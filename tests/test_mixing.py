"""Mixup and CutMix in cached views (issue 18): each (view, row)'s partner, lambda and box drawn from the recorded
seed and stored, the teachers fed the mixed image, distill rebuilding exactly those pixels and mixing the hard
labels with the same lambda."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from imagefolder import make_image_folder
from test_augment_replay import _extract_recording

from meal_cache.data.datasets import load_dataset
from meal_cache.data.source import MemorySource
from meal_cache.errors import SettingsMismatch, UserError
from meal_cache.views import augment
from meal_cache.views.mixing import Mixing, mix, mixed_labels, mixed_rows

SPEC = "digits?train_fraction=0.1"  # 143 rows


def test_draws_follow_timms_per_row_rules_and_keep_the_crops():
    sizes = augment.square_sizes(4000, 16)
    recipe, policy = augment.RECIPES["digits"], augment.policy_for("randaugment", "digits")
    both = Mixing(mixup=0.8, cutmix=1.0)
    view = augment.draw(recipe, sizes, augment.view_generator(2, 3), policy, both, 16)
    plain = augment.draw(recipe, sizes, augment.view_generator(2, 3), policy)
    # Mixing is drawn after the crop and the ops, so it changes neither.
    assert torch.equal(view.crop, plain.crop) and torch.equal(view.ops, plain.ops)
    assert torch.equal(view.mix_partner.sort().values, torch.arange(4000, dtype=torch.int32))  # a permutation
    box, lam = view.mix_box.long(), view.mix_lambda
    cut = box[:, 2] * box[:, 3] > 0
    assert ((box[:, :2] >= 0) & (box[:, :2] + box[:, 2:] <= 16)).all()
    # CutMix's lambda is the share of the image kept (timm's correct_lam), exactly.
    assert torch.equal(lam[cut], 1 - (box[cut, 2] * box[cut, 3]).float() / 256)
    assert 0.35 < cut.float().mean() < 0.5  # switch 0.5; a box of no pixels (lambda near 1) reads as a blend
    blended = ~cut & (lam < 1)  # a CutMix row whose box has no pixel is not mixed (lambda 1)
    assert 0.45 < lam[blended].mean() < 0.55 and (lam <= 1).all() and lam.dtype == torch.float32
    again = augment.draw(recipe, sizes, augment.view_generator(2, 3), policy, both, 16)
    assert all(torch.equal(getattr(again, k), getattr(view, k)) for k in ("mix_partner", "mix_lambda", "mix_box"))
    sometimes = augment.draw(recipe, sizes, augment.view_generator(2, 3), None, Mixing(mixup=1.0, prob=0.3), 16)
    assert 0.27 < (sometimes.mix_lambda < 1).float().mean() < 0.33 and not sometimes.mix_box.any()
    only_cutmix = augment.draw(recipe, sizes, augment.view_generator(2, 3), None, Mixing(cutmix=1.0), 16)
    assert (only_cutmix.mix_box[:, 2] > 0).float().mean() > 0.9
    assert augment.draw(recipe, sizes, augment.view_generator(2, 3), None, Mixing(), 16).mix_partner is None


def test_mix_pastes_the_partners_box_or_blends_by_lambda():
    own = torch.rand(3, 3, 8, 8) * 255
    partner = torch.rand(3, 3, 8, 8) * 255
    params = augment.ViewParams(
        torch.zeros(3, 4, dtype=torch.int16),
        torch.zeros(3, dtype=torch.bool),
        mix_partner=torch.tensor([2, 0, 1], dtype=torch.int32),
        mix_lambda=torch.tensor([1 - 20 / 64, 0.25, 1.0]),
        mix_box=torch.tensor([[2, 3, 4, 5], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int16),
    )
    rows = mixed_rows(params)
    assert rows.tolist() == [0, 1]
    out = mix(own, partner[rows], params, rows)
    expected = own.clone()
    expected[0, :, 2:6, 3:8] = partner[0, :, 2:6, 3:8]
    expected[1] = own[1] * 0.25 + partner[1] * 0.75
    assert torch.equal(out, expected)
    labels = torch.tensor([1, 2, 3])
    mixed = mixed_labels(labels, params, 5, labels[params.mix_partner.long()])
    assert torch.allclose(mixed[0], (1 - 20 / 64) * F.one_hot(torch.tensor(1), 5) + 20 / 64 * F.one_hot(
        torch.tensor(3), 5).float())  # fmt: skip
    assert torch.equal(mixed[2], F.one_hot(torch.tensor(3), 5).float())
    assert torch.allclose(mixed.sum(1), torch.ones(3))


def test_a_mixed_rows_pixels_depend_on_its_own_and_its_partners_parameters_alone():
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=generator)
    sizes, recipe = augment.square_sizes(60, 16), augment.RECIPES["natural"]
    policy, mixing = augment.policy_for("trivialaugment", "natural"), Mixing(mixup=0.8, cutmix=1.0)
    views = [augment.draw(recipe, sizes, augment.view_generator(0, v), policy, mixing, 16) for v in range(2)]
    source = MemorySource(images, torch.device("cpu"), 16)
    every = torch.arange(60)
    whole = [next(source.pixels([(every, v[every], None)]))[1] for v in views]
    unmixed = augment.render(images, views[0].unmixed())
    assert not torch.equal(whole[0], unmixed)
    mixed = mixed_rows(views[0][every])
    assert torch.equal(whole[0][~torch.isin(every, mixed)], unmixed[~torch.isin(every, mixed)])
    for size in (1, 5, 23):
        rows = torch.randperm(60, generator=generator)[:size]
        assert torch.equal(next(source.pixels([(rows, views[0][rows], None)]))[1], whole[0][rows]), size
        # Rows of two views in one batch (multi-crop): each row's partner comes from the row's own view.
        which = torch.randint(2, (size,), generator=generator)
        stacked = augment.stack_views(views, which, rows)
        expected = torch.stack([whole[int(v)][int(r)] for v, r in zip(which, rows, strict=True)])
        assert torch.equal(next(source.pixels([(rows, stacked, None)]))[1], expected), size
    plain = augment.identity(sizes, recipe, policy, mixing)
    assert torch.equal(next(source.pixels([(every, plain[every], None)]))[1], images.float())


def _distill_recording(path, monkeypatch, **options):
    """Distil from ``path``; per step, the rows, the pixels and the hard labels the student was trained on."""
    from meal_cache import distill as distill_module
    from meal_cache.distill import DistillConfig, distill

    seen = []
    real_step, real_forward = distill_module.DistillEpochs.step, distill_module.MealFamily.forward

    def record(self, batch):
        (rows, *_), pixels = batch
        seen.append({"rows": rows.clone(), "pixels": pixels.clone()})
        return real_step(self, batch)

    def forward(self, batch):
        seen[-1]["labels"] = batch.labels.clone()
        return real_forward(self, batch)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    monkeypatch.setattr(distill_module.MealFamily, "forward", forward)
    config = DistillConfig(store=str(path), student="resnet8_w4", method="kd", device="cpu", workers=0,
                           **options)  # fmt: skip
    distill(config, path.parent / "run", progress=False)
    monkeypatch.undo()
    return seen


def test_distill_replays_the_mixed_pixels_the_teacher_saw_and_mixes_the_hard_labels(teacher_dir, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.store import FORMAT, describe_store

    config = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, views=2, identity_view=True, policy="randaugment",
                           mixup=0.8, cutmix=1.0, preset="kd", teacher_dir=str(teacher_dir), rows_per_chunk=64,
                           batch_size=50, device="cpu")  # fmt: skip
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(config, path, monkeypatch)
    assert store.attrs["format"] == FORMAT and store.mixing == Mixing(0.8, 1.0, 1.0, 0.5)
    assert store.attrs["settings"]["cutmix"] == 1.0
    assert "mixup 0.8 / cutmix 1 (p 1, switch 0.5)" in describe_store(store)
    # The stored arrays, read with zarr alone, rebuild what the teacher saw: the row's own view, then its
    # partner's pixels of the same view pasted into the box or blended in by lambda.
    images = load_dataset(SPEC).split("train").images
    group = zarr.open_group(str(path), mode="r")
    space = group.attrs["views"]["policy"]["space"]
    for view in range(2):
        arrays = {name: torch.from_numpy(np.asarray(group[f"views/{name}"][view]))
                  for name in ("crop", "flip", "ops", "magnitude", "mix_partner", "mix_lambda", "mix_box")}  # fmt: skip
        own = augment.render(images, augment.ViewParams(arrays["crop"], arrays["flip"], arrays["ops"],
                                                        arrays["magnitude"], space))  # fmt: skip
        partner = own[arrays["mix_partner"].long()]
        lam = arrays["mix_lambda"].view(-1, 1, 1, 1)
        rebuilt = own * lam + partner * (1 - lam)
        for row, (y0, x0, h, w) in enumerate(arrays["mix_box"].tolist()):
            if h * w:
                rebuilt[row] = own[row]
                rebuilt[row, :, y0 : y0 + h, x0 : x0 + w] = partner[row, :, y0 : y0 + h, x0 : x0 + w]
        unmixed = arrays["mix_lambda"] == 1
        rebuilt[unmixed] = own[unmixed]
        assert torch.equal(rebuilt, fed[view]), view
        assert (arrays["mix_box"][:, 2] > 0).any() and ((arrays["mix_box"][:, 2] == 0) & ~unmixed).any()
    assert torch.equal(fed[2], images.float())  # the identity view is neither augmented nor mixed
    # Other batches than extract's: the same pixels row by row, and hard labels mixed by the same lambda.
    labels = torch.from_numpy(store.labels())
    seen = _distill_recording(path, monkeypatch, epochs=2, batch_size=24, hard_weight=1.0)
    steps = store.n // 24
    assert len(seen) == 2 * steps
    for index, step in enumerate(seen):
        view, rows = index // steps, step["rows"]
        assert torch.equal(step["pixels"], fed[view][rows]), index
        params = store.view_params(view)[rows]
        expected = mixed_labels(labels[rows], params, 10, labels[params.mix_partner.long()])
        assert torch.equal(step["labels"], expected), index
    assert any((step["labels"].max(1).values < 1).any() for step in seen)  # some labels really are mixed


def test_distill_replays_cutmix_from_image_files(teacher_dir, tmp_path, monkeypatch):
    from meal_cache.extract.config import ExtractConfig

    folder = make_image_folder(tmp_path / "jpegs", classes=10, train=2, val=1, sizes=(40, 90))
    config = ExtractConfig(teachers=["resnet8_w4"], data=f"imagefolder:{folder}", image_size=16, views=2,
                           cutmix=1.0, preset="kd", teacher_dir=str(teacher_dir), rows_per_chunk=8, batch_size=8,
                           device="cpu", workers=0)  # fmt: skip
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(config, path, monkeypatch)
    assert store.source_sizes() is not None and (store.view_params(0).mix_box[:, 2] > 0).any()
    seen = _distill_recording(path, monkeypatch, epochs=2, batch_size=6)
    steps = store.n // 6
    assert len(seen) == 2 * steps
    for index, step in enumerate(seen):
        assert torch.equal(step["pixels"], fed[index // steps][step["rows"]]), index


def test_mixing_settings_are_checked_recorded_and_kept_out_of_unmixed_stores(teacher_dir, small_store, tmp_path):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract
    from meal_cache.store import FORMAT, open_store

    for bad, message in (({"mixup": -0.5}, "--mixup takes a Beta alpha >= 0"),
                         ({"cutmix": 1.0, "mix_prob": 1.5}, "--mix-prob is a probability in"),
                         ({"mixup": 1.0, "mix_switch_prob": -0.1}, "--mix-switch-prob is a probability")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            ExtractConfig(teachers=["resnet8_w4"], **bad).resolved()
    path, _ = small_store
    plain = open_store(path)
    assert plain.attrs["format"] == FORMAT and plain.mixing is None and "mixup" not in plain.attrs["settings"]
    assert "views/mix_partner" not in plain.group and plain.view_params(0).mix_partner is None
    options = dict(teachers=["resnet8_w4"], data=SPEC, views=1, preset="kd", teacher_dir=str(teacher_dir),
                   device="cpu")  # fmt: skip
    out = tmp_path / "mixed.zarr"
    extract(ExtractConfig(mixup=0.4, **options), out, progress=False)
    with pytest.raises(SettingsMismatch, match="mixup"):  # resuming asks for the same mixing
        extract(ExtractConfig(mixup=0.2, **options), out, progress=False)
    assert open_store(out).view_keys[-3:] == ["views/mix_partner", "views/mix_lambda", "views/mix_box"]
