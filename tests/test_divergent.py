"""Divergent views (issue 19, ACN offline): a bounded, seeded search for images the teachers disagree on, stored as
uint8 beside the teachers' outputs on exactly those pixels, reported by inspect and mixed into distill."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from by_hand import record_distill_steps

from meal_cache.data.datasets import load_dataset
from meal_cache.errors import UserError
from meal_cache.extract.divergent import DivergentSearch, disagreement, divergent_pixels
from meal_cache.nets.teachers import resolve_teacher, teacher_outputs

SPEC = "digits?train_fraction=0.1"  # 143 rows
TEACHERS = ["resnet8_w4", "densenet_k12"]


def test_disagreement_is_the_teachers_jensen_shannon_divergence():
    same = torch.randn(4, 10)
    assert torch.allclose(disagreement([same, same.clone()]), torch.zeros(4), atol=1e-6)
    # Two teachers sure of two different classes: JS = log 2, the most two can disagree.
    confident = torch.full((1, 3), -1e4)
    a, b = confident.clone(), confident.clone()
    a[0, 0] = b[0, 1] = 0.0
    assert disagreement([a, b]).item() == pytest.approx(math.log(2), abs=1e-5)
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.3, 0.6]])
    m = (p + q) / 2
    expected = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert disagreement([p.log(), q.log()]).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def teachers(teacher_dir):
    dataset = load_dataset(SPEC)
    return dataset, [resolve_teacher(name, str(teacher_dir), dataset, "all", 1) for name in TEACHERS]


def _mean_disagreement(teachers, pixels):
    outputs = [teacher_outputs(t, pixels, (), _cpu_precision())["logits"] for t in teachers]
    return disagreement(outputs).mean().item()


def _cpu_precision():
    from meal_cache.runtime import Precision

    return Precision(torch.device("cpu"))


def test_the_search_stays_in_its_bound_is_seeded_per_row_and_raises_the_disagreement(teachers):
    dataset, models = teachers
    start = dataset.split("train").images[:40].float()
    rows = torch.arange(40)
    search = DivergentSearch(views=1, eps=0.03, steps=5, seed=3)
    found = divergent_pixels(models, start, rows, search, view=0)
    assert found.dtype == torch.uint8 and found.shape == start.shape
    # Within eps of the start after rounding to uint8 (7.65 levels, so at most 8), and never the start itself.
    assert (found.float() - start).abs().max() <= 255 * 0.03 + 0.5 and not torch.equal(found.float(), start)
    again = divergent_pixels(models, start, rows, search, view=0)
    assert torch.equal(again, found)
    assert not torch.equal(divergent_pixels(models, start, rows, DivergentSearch(1, 0.03, 5, seed=4), 0), found)
    assert not torch.equal(divergent_pixels(models, start, rows, search, view=1), found)
    # The teachers disagree far more on the found images than on the start or on the start's random noise alone.
    noise_only = divergent_pixels(models, start, rows, DivergentSearch(1, 0.03, 1, 3), 0)  # one step: mostly noise
    assert _mean_disagreement(models, found.float()) > 1.5 * _mean_disagreement(models, start)
    assert _mean_disagreement(models, found.float()) > _mean_disagreement(models, noise_only.float())
    assert torch.equal(divergent_pixels(models, start, rows, DivergentSearch(1, 0.0, 3, 3), 0).float(), start)


def test_a_teacher_without_a_gradient_to_its_input_is_named(teachers):
    dataset, models = teachers

    class NoGradient(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            with torch.no_grad():
                return self.model(x)

    frozen = type(models[1])(NoGradient(models[1].model), models[1].mean, models[1].std, models[1].spec)
    with pytest.raises(UserError, match="teacher densenet_k12 gives no gradient with respect to its input"):
        divergent_pixels([models[0], frozen], dataset.split("train").images[:4].float(), torch.arange(4),
                         DivergentSearch(1, 0.03, 2, 0), 0)  # fmt: skip


def _extract(teacher_dir, out, monkeypatch=None, **options):
    from meal_cache.extract import run as extract_module
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    fed = []
    if monkeypatch is not None:
        real = extract_module.teacher_outputs

        def recording(teacher, pixels, *args):
            fed.append((teacher.spec.key, pixels.clone()))
            return real(teacher, pixels, *args)

        monkeypatch.setattr(extract_module, "teacher_outputs", recording)
    settings = dict(
        teachers=TEACHERS,
        data=SPEC,
        views=1,
        identity_view=True,
        divergent_views=2,
        divergent_steps=3,
        preset="kd",
        teacher_dir=str(teacher_dir),
        device="cpu",
        rows_per_chunk=64,
        batch_size=64,
    )
    config = ExtractConfig(**{**settings, **options})
    store = extract(config, out, progress=False)
    if monkeypatch is not None:
        monkeypatch.undo()
    return store, fed


def test_extract_stores_the_divergent_pixels_and_the_teachers_outputs_on_exactly_them(teacher_dir, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    from meal_cache.analysis import describe_inspection, inspect_store
    from meal_cache.store import FORMAT, describe_store

    store, fed = _extract(teacher_dir, tmp_path / "s.zarr", monkeypatch)
    assert store.attrs["format"] == FORMAT and store.divergent_views == [2, 3]
    info = store.attrs["views"]["divergent"]
    assert info["eps"] == 0.03 and info["steps"] == 3 and info["step_size"] == pytest.approx(0.025)
    assert store.attrs["settings"]["divergent_views"] == 2
    assert "2 divergent (eps 0.03, 3 steps)" in describe_store(store)
    assert "divergent pixels" in describe_store(store) and "(2x143x3x16x16 uint8" in describe_store(store)
    images = load_dataset(SPEC).split("train").images
    for k, view in enumerate(store.divergent_views):
        pixels = store.divergent_pixels(k)
        assert pixels.dtype == torch.uint8 and (pixels.float() - images.float()).abs().max() <= 8
        # What each teacher was fed for this view is the stored uint8, and its stored logits are its outputs on it.
        for teacher in TEACHERS:
            seen = torch.cat([p for key, p in fed if key == teacher][view * 3 : view * 3 + 3])
            assert torch.equal(seen, pixels.float()), (teacher, view)
        assert torch.equal(store.divergent_pixels(k, torch.tensor([5, 70])), pixels[[5, 70]])
    assert not torch.equal(store.divergent_pixels(0), store.divergent_pixels(1))
    models = [resolve_teacher(name, str(teacher_dir), load_dataset(SPEC), "all", 1) for name in TEACHERS]
    for teacher in models:
        logits = teacher_outputs(teacher, store.divergent_pixels(1).float(), (), _cpu_precision())["logits"]
        np.testing.assert_array_equal(store.logits(teacher.spec.key, 3), logits.numpy().astype(np.float16))
    # Another batch split (chunks of 64 rows in batches of 16, not 64): the same pixels for every row.
    other, _ = _extract(teacher_dir, tmp_path / "other.zarr", batch_size=16)
    assert torch.equal(other.divergent_pixels(0), store.divergent_pixels(0))
    # A lost pixel chunk: verify finds it, repair has every teacher redo that (view, chunk), extract restores it.
    from meal_cache.store import open_store, repair_store, verify_store

    before = other.divergent_pixels(1)
    lost = tmp_path / "other.zarr" / "divergent" / "pixels" / "c" / "1" / "1" / "0" / "0" / "0"
    lost.unlink()
    report = verify_store(open_store(tmp_path / "other.zarr"))
    assert [(p.array, p.chunk, p.kind) for p in report.problems] == [("divergent/pixels", (1, 1, 0, 0, 0), "missing")]
    assert repair_store(open_store(tmp_path / "other.zarr", mode="r+"), report) == 2
    repaired, _ = _extract(teacher_dir, tmp_path / "other.zarr", batch_size=16)
    assert verify_store(repaired).ok and torch.equal(repaired.divergent_pixels(1), before)
    # inspect: the teachers disagree on the divergent views, hardly on the natural ones.
    result = inspect_store(tmp_path / "s.zarr")
    natural, divergent = result["disagreement"]["natural"], result["disagreement"]["divergent"]
    assert natural["views"] == 2 and divergent["views"] == 2 and divergent["js"] > 1.5 * natural["js"]
    assert divergent["top1_split_percent"] > natural["top1_split_percent"]
    assert f"  divergent   2 view(s)  JS {divergent['js']:.4f}" in describe_inspection(result)


def test_divergent_settings_are_checked_and_kept_out_of_other_stores(small_store):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.store import open_store

    for bad, message in (({"divergent_eps": 1.5}, r"--divergent-eps is a fraction of the pixel range in \[0, 1\]"),
                         ({"divergent_eps": -0.1}, "--divergent-eps is a fraction"),
                         ({"divergent_views": -1}, "--divergent-views takes 0"),
                         ({"divergent_views": 1, "divergent_steps": 0}, "--divergent-steps must be at least 1"),
                         ({"divergent_views": 1, "teachers": ["resnet8_w4"]}, "at least two teachers")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            ExtractConfig(**{"teachers": TEACHERS, **bad}).resolved()
    plain = open_store(small_store[0])
    assert plain.divergent_views == [] and "divergent_views" not in plain.attrs["settings"]


def test_distill_interleaves_batches_of_the_stored_divergent_pixels(teacher_dir, tmp_path, monkeypatch, small_store):
    import json

    from meal_cache.distill import DistillConfig, distill

    store, _ = _extract(teacher_dir, tmp_path / "s.zarr", views=2, divergent_views=2)

    def run(out, **options):
        seen = record_distill_steps(monkeypatch, "teachers/resnet8_w4/logits")
        config = DistillConfig(store=str(tmp_path / "s.zarr"), student="resnet8_w4", method="kd", epochs=2,
                               batch_size=16, device="cpu", workers=0, **options)  # fmt: skip
        distill(config, tmp_path / out, progress=False)
        monkeypatch.undo()
        return list(seen)

    natural = store.n // 16  # 8 natural batches an epoch
    steps = run("default")  # the default ratio, 0.25: 2 divergent batches an epoch
    assert len(steps) == 2 * (natural + 2)
    images = load_dataset(SPEC).split("train").images.float()
    divergent_steps = []
    for index, (rows, logits, pixels) in enumerate(steps):
        epoch = index // (natural + 2)
        if not _is_divergent(store, epoch % 2, rows, pixels):
            assert not torch.equal(pixels, images[rows])  # a natural batch: an augmented view
            continue
        divergent_steps.append(index % (natural + 2))
        view = store.divergent_views[epoch % 2]
        assert torch.equal(logits.float(), torch.from_numpy(store.logits("resnet8_w4", view)[rows.numpy()]).float())
    assert divergent_steps == [4, 9, 4, 9]  # spread evenly: after the 4th and the 8th natural batch
    history = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [h["divergent_view"] for h in history if "divergent_view" in h] == [3, 4]
    assert len(run("more", divergent_ratio=1.0)) == 2 * 2 * natural
    assert len(run("none", divergent_ratio=0.0)) == 2 * natural
    with pytest.raises(UserError, match="has no divergent views"):
        distill(DistillConfig(store=str(small_store[0]), student="resnet8_w4", method="kd", epochs=1, device="cpu",
                              divergent_ratio=0.5), tmp_path / "plain", progress=False)  # fmt: skip


def _is_divergent(store, k, rows, pixels) -> bool:
    return torch.equal(pixels, store.divergent_pixels(k, rows).float())
