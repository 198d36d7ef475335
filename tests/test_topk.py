"""Top-k logits (issue 16): the rebuild rule on hand-made logits, a top-k store end to end, and format-1 stores."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from by_hand import topk_rebuilt

from meal_cache.errors import UserError
from meal_cache.extract.run import extract
from meal_cache.store import describe_store, open_store
from meal_cache.store.encodings.topk import decode_topk, encode_topk

FIXTURES = Path(__file__).parent / "fixtures"


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def test_rebuilt_top_k_keeps_each_stored_probability_and_spreads_the_rest_evenly():
    logits = np.array([[4.0, 1.0, 0.0, -1.0, 2.0, 0.5], [0.0, 0.0, 3.0, 0.0, 0.0, -2.0]], dtype=np.float32)
    encoded = encode_topk(logits, 2, "float32")
    assert encoded["index"].tolist() == [[0, 4], [2, 0]] and encoded["index"].dtype == np.int16
    assert encoded["value"].tolist() == [[4.0, 2.0], [3.0, 0.0]]
    rebuilt = _softmax(decode_topk(encoded["index"], encoded["value"], encoded["lse"], 6, "float64"))
    reference = _softmax(logits)
    np.testing.assert_allclose(rebuilt.sum(1), 1.0, atol=1e-12)  # mass is conserved
    np.testing.assert_allclose(rebuilt[0, [0, 4]], reference[0, [0, 4]], rtol=1e-5)
    rest = 1.0 - reference[0, [0, 4]].sum()
    np.testing.assert_allclose(rebuilt[0, [1, 2, 3, 5]], rest / 4, rtol=1e-5)
    np.testing.assert_allclose(rebuilt[1, [2, 0]], reference[1, [2, 0]], rtol=1e-5)
    # k = classes keeps everything: the same softmax at every temperature.
    every = encode_topk(logits, 6, "float32")
    dense = decode_topk(every["index"], every["value"], every["lse"], 6, "float32")
    for temperature in (1.0, 4.0):
        np.testing.assert_allclose(_softmax(dense, temperature), _softmax(logits, temperature), rtol=1e-5)


def test_top_k_made_at_a_temperature_keeps_the_stored_probabilities_and_the_rest_at_that_temperature():
    """At T = 4 (the store's logits temperature) the stored classes get their exact probabilities at T = 4 and the
    rest of the T = 4 mass is spread evenly; the T = 1 rule would give the tail too much mass at T = 4."""
    logits = np.array([[6.0, 3.0, 1.0, -2.0, -4.0, 0.0]], dtype=np.float32)
    reference = _softmax(logits, 4.0)
    encoded = encode_topk(logits, 2, "float32", temperature=4.0)
    rebuilt = _softmax(decode_topk(encoded["index"], encoded["value"], encoded["lse"], 6, "float64", 4.0), 4.0)
    np.testing.assert_allclose(rebuilt[0, [0, 1]], reference[0, [0, 1]], rtol=1e-6)
    np.testing.assert_allclose(rebuilt[0, 2:], reference[0, 2:].sum() / 4, rtol=1e-6)
    at_one = encode_topk(logits, 2, "float32")
    flat = _softmax(decode_topk(at_one["index"], at_one["value"], at_one["lse"], 6, "float64"), 4.0)
    assert flat[0, 2:].sum() > 1.05 * reference[0, 2:].sum()


def test_a_remainder_rounded_to_nothing_never_gives_minus_infinity():
    logits = np.array([[30.0, -30.0, -30.0]], dtype=np.float16)
    encoded = encode_topk(logits, 1, "float16")
    dense = decode_topk(encoded["index"], encoded["value"], encoded["lse"], 3, "float16")
    assert np.isfinite(dense.astype(np.float32)).all() and dense.argmax() == 0


@pytest.mark.parametrize("classes", [3, 100])
def test_a_remainder_rounded_to_nothing_leaves_each_other_class_a_millionth(classes):
    """When the stored top-k carry all the mass (their log-sum-exp is the row's), each other class keeps the floor,
    a millionth of the mass (in float64: each gets 1e-6 / (1 + 1e-6 * (C - k)) after the softmax)."""
    top = np.array([[2.0, 1.0]])
    lse = np.log(np.exp(top).sum(1)).astype(np.float32)
    index = np.array([[0, 1]], dtype=np.int16)
    dense = decode_topk(index, top.astype(np.float16), lse, classes, "float64")
    probs = np.exp(dense - dense.max()) / np.exp(dense - dense.max()).sum()
    others = probs[0, 2:]
    assert others == pytest.approx(np.full(classes - 2, 1e-6 / (1 + 1e-6 * (classes - 2))), rel=1e-3)


@pytest.fixture(scope="module")
def topk_stores(small_store, teacher_dir, digits, tmp_path_factory):
    path, config = small_store
    out = tmp_path_factory.mktemp("topk") / "top3.zarr"
    extract(dataclasses.replace(config, logits="topk:3", views=1), out, progress=False, dataset=digits)
    return path, out


def test_a_top_k_store_holds_k_logits_a_row_and_reads_back_dense(topk_stores):
    dense_path, topk_path = topk_stores
    dense, topk = open_store(dense_path), open_store(topk_path)
    # Made exact at distill's default temperature.
    assert topk.attrs["format"] == "meal-cache/11" and str(topk.layout.logits) == "topk:3" and topk.complete
    assert topk.layout.temperature == 4.0
    assert "teachers/resnet8_w4/logits" not in topk.group
    index = topk.group["teachers/resnet8_w4/logits_topk/index"]
    assert index.shape == (2, dense.n, 3)
    # Views are drawn one by one from the seed: view 0 is the same view in both; the identity view is the last.
    for view, dense_view in ((0, 0), (1, dense.identity_view)):
        reference = dense.logits("resnet8_w4", dense_view).astype(np.float32)
        rebuilt = topk.logits("resnet8_w4", view).astype(np.float32)
        assert rebuilt.shape == reference.shape
        stored = index[view].astype(np.int64)
        assert (stored[:, 0] == reference.argmax(1)).all() and (rebuilt.argmax(1) == stored[:, 0]).all()
        p, q = _softmax(reference, 4.0), _softmax(rebuilt, 4.0)
        np.testing.assert_allclose(np.take_along_axis(q, stored, 1), np.take_along_axis(p, stored, 1), atol=1e-3)
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-3)
    # The teachers' recorded accuracy comes from the rebuilt logits: the same top-1.
    accuracy, dense_accuracy = topk.teacher("resnet8_w4")["accuracy"], dense.teacher("resnet8_w4")["accuracy"]
    assert accuracy == [dense_accuracy[0], dense_accuracy[-1]]
    # What `extract` and `info` print: the logits' dense shape, marked as top-k.
    text = describe_store(topk)
    row = next(line for line in text.splitlines() if line.strip().startswith("logits (top 3 at T=4, read back"))
    assert row.split("dense)")[1].split()[0] == f"2x{dense.n}x10" and "lossy: the top 3 logits, exact at T=4" in text
    sizes = topk.sizes()["teachers/resnet8_w4/logits"]
    assert sizes["raw"] == 2 * dense.n * (3 * 2 + 3 * 2 + 4)  # index int16, value float16, lse float32


def test_distill_and_inspect_read_a_top_k_store(topk_stores, digits, tmp_path, monkeypatch):
    """Distill learns from the rebuilt logits' soft targets, and inspect's accuracies are those of the rebuilt logits:
    each teacher's equal to its full logits' (the largest logit is stored as it is), the ensemble's that of the mean
    of the rebuilt probabilities. Every expected value comes from the stores' raw arrays, read with zarr alone."""
    import zarr

    from meal_cache import distill as distill_module
    from meal_cache.analysis import inspect_store
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.distill.methods import meal as meal_module

    dense_path, topk_path = topk_stores
    dense_group, topk_group = zarr.open_group(str(dense_path), mode="r"), zarr.open_group(str(topk_path), mode="r")
    teachers = ["resnet8_w4", "densenet_k12"]
    labels = np.asarray(topk_group["labels"][:])
    full = {t: np.asarray(dense_group[f"teachers/{t}/logits"][:]) for t in teachers}  # (3, N, 10)
    rebuilt = {t: topk_rebuilt(*(np.asarray(topk_group[f"teachers/{t}/logits_topk/{p}"][:])
                                     for p in ("index", "value", "lse")), classes=10, temperature=4.0)
               for t in teachers}  # fmt: skip

    # Distill: every step's soft targets (kd, T = 4, the mean of both teachers) are the rebuilt logits' of its rows
    # in view 0, the one augmented view the top-k store holds (epoch 0 replays it).
    steps: list[torch.Tensor] = []
    soft: list[list[torch.Tensor]] = []
    real_step, real_soft = distill_module.DistillEpochs.step, meal_module.soft_target_sets

    def record_step(self, batch):
        steps.append(batch[0][0].clone())
        return real_step(self, batch)

    def record_soft(config, teacher_logits):
        out = real_soft(config, teacher_logits)
        soft.append([p.detach().clone() for p in out])
        return out

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record_step)
    monkeypatch.setattr(meal_module, "soft_target_sets", record_soft)  # kd is a member of the MEAL family
    config = DistillConfig(store=str(topk_path), student="resnet8_w4", method="kd", epochs=1, device="cpu",
                           temperature=4.0, teacher_selection="mean")  # fmt: skip
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    monkeypatch.undo()
    assert summary["test"]["n"] == 360 and len(steps) == len(soft) > 0
    for rows, (targets,) in zip(steps, soft, strict=True):
        index = rows.numpy()
        expected = np.mean([_softmax(rebuilt[t][0, index], 4.0) for t in teachers], axis=0)
        np.testing.assert_allclose(targets.numpy(), expected, rtol=0, atol=1e-6)
    # Not the full logits' targets: what distill learns from is the lossy rebuild.
    first = steps[0].numpy()
    assert not np.allclose(np.mean([_softmax(full[t][0, first], 4.0) for t in teachers], axis=0),
                           soft[0][0].numpy(), atol=1e-3)  # fmt: skip

    # Inspect: top-k view 0 is the dense store's view 0, its identity view (1) the dense store's (2).
    result = inspect_store(topk_path)
    assert result["teachers"] == teachers and result["views"] == 2
    for t in teachers:
        from_full = [100 * float((full[t][v].argmax(1) == labels).mean()) for v in (0, 2)]
        assert result["accuracy_per_view"][t] == pytest.approx(from_full, abs=1e-4), t
    ensemble = np.mean([_softmax(rebuilt[t].reshape(-1, 10)).reshape(2, -1, 10) for t in teachers], axis=0)
    from_rebuilt = [100 * float((ensemble[v].argmax(1) == labels).mean()) for v in (0, 1)]
    assert result["accuracy_per_view"]["ensemble"] == pytest.approx(from_rebuilt, abs=1e-4)


def test_bad_top_k_settings_are_refused(small_store, digits, tmp_path):
    _, config = small_store
    with pytest.raises(UserError, match=r"--logits topk:K needs K of at least 1 \(all: every logit\), got 0"):
        extract(dataclasses.replace(config, logits="topk:0"), tmp_path / "a.zarr", progress=False, dataset=digits)
    with pytest.raises(UserError, match="--logits topk:11 keeps more than teacher resnet8_w4's 10 classes"):
        extract(dataclasses.replace(config, logits="topk:11"), tmp_path / "b.zarr", progress=False, dataset=digits)


def test_a_store_of_a_development_format_is_refused_with_the_fix(tmp_path):
    """tests/fixtures/format1_store was written by meal-cache as of format meal-cache/1 (make_format1.py), one of
    the development formats before the 0.x line's: every command that opens it says to extract it again."""
    from console import one_error_line, one_error_line_in_process, run_console

    path = tmp_path / "format1.zarr"
    shutil.copytree(FIXTURES / "format1_store", path)
    expected = (f"'{path}' was written by a development version of meal-cache (format 'meal-cache/1'), which this one "
                "(meal-cache/11) does not read; extract it again (--overwrite replaces it)")  # fmt: skip
    assert expected in one_error_line(run_console(["info", str(path)], tmp_path))
    out = tmp_path / "r"
    assert expected in one_error_line_in_process(["distill", "--store", str(path), "--student", "resnet8_w4", "--out",
                                                  str(out)])  # fmt: skip
    assert not out.exists()


def test_extract_onto_a_store_of_a_development_format_says_to_replace_it(teacher_dir, tmp_path):
    from console import one_error_line_in_process

    path = tmp_path / "format1.zarr"
    shutil.copytree(FIXTURES / "format1_store", path)
    line = one_error_line_in_process(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(teacher_dir),
                                      "--views", "1", "--out", str(path)])  # fmt: skip
    assert f"'{path}' was written by a development version of meal-cache (format 'meal-cache/1')" in line
    assert "extract it again (--overwrite replaces it)" in line
    assert '"format": "meal-cache/1"' in (path / "zarr.json").read_text()  # left as it was


def test_presets_store_only_what_their_method_reads(small_store, digits, tmp_path):
    from meal_cache.distill import DistillConfig, distill

    _, config = small_store
    base = dataclasses.replace(config, views=1, identity_view=False, grid=1, features=["blocks", "maps"],
                               blocks="all")  # fmt: skip
    kd = extract(dataclasses.replace(base, preset="kd", logits="topk:5"), tmp_path / "kd.zarr", progress=False,
                 dataset=digits)  # fmt: skip
    assert sorted(kd.group["teachers/resnet8_w4"].keys()) == ["logits_topk", "progress"]
    meal = extract(dataclasses.replace(base, preset="meal"), tmp_path / "meal.zarr", progress=False, dataset=digits)
    blocks = [b.key for b in meal.blocks("resnet8_w4")]
    assert meal.layout.features == ("blocks",) and len(blocks) == 3
    assert sorted(meal.group["teachers/resnet8_w4/blocks"].keys()) == sorted(blocks)
    assert "maps" not in meal.group["teachers/resnet8_w4"]
    # meal's blocks are 8-bit unless the user chooses another encoding or none.
    assert meal.layout.quantize == 8
    assert sorted(meal.group["teachers/resnet8_w4/ranges/blocks"].keys()) == sorted(blocks)
    assert dataclasses.replace(base, preset="meal", quantize=0).resolved().quantize is None
    chosen = dataclasses.replace(base, preset="meal", keep_bits=6).resolved()
    assert (chosen.quantize, chosen.keep_bits) == (None, 6)
    assert dataclasses.replace(base, preset="kd").resolved().quantize is None
    # What distill reads is there: meal from the meal preset, kd from the kd one; meal from kd is one clear error.
    for store, method in ((tmp_path / "meal.zarr", "meal"), (tmp_path / "kd.zarr", "kd")):
        run = DistillConfig(store=str(store), student="resnet8_w4", method=method, epochs=1, device="cpu")
        assert distill(run, tmp_path / f"run-{method}", progress=False, dataset=digits)["test"]["n"] == 360
    wrong = DistillConfig(store=str(tmp_path / "kd.zarr"), student="resnet8_w4", method="meal", epochs=1, device="cpu")
    with pytest.raises(UserError, match="extracted with --for kd, which stores logits only; extract with --for meal"):
        distill(wrong, tmp_path / "run-wrong", progress=False, dataset=digits)
    with pytest.raises(UserError, match="unknown --for method 'mael'"):
        extract(dataclasses.replace(base, preset="mael"), tmp_path / "x.zarr", progress=False, dataset=digits)
    with pytest.raises(UserError, match="pass --for or --features/--blocks, not both"):
        extract(dataclasses.replace(base, preset="kd", blocks="2"), tmp_path / "y.zarr", progress=False,
                dataset=digits)  # fmt: skip


@pytest.fixture(scope="module")
def top5_store(tmp_path_factory, teacher_dir, digits):
    """One teacher's top-5 of 10 logits and its blocks' channel-mean maps (what the reference reads), one view."""
    from meal_cache.extract.config import ExtractConfig

    out = tmp_path_factory.mktemp("top5") / "top5.zarr"
    config = ExtractConfig(teachers=["resnet8_w4"], views=1, features=["maps"], logits="topk:5",
                           teacher_dir=str(teacher_dir), batch_size=512, device="cpu")  # fmt: skip
    extract(config, out, progress=False, dataset=digits)
    return out


def test_the_reference_output_discriminator_refuses_raw_top_k_logits(top5_store, tmp_path):
    """Raw logits rebuilt from a top-k store share one value in the tail, which tells a teacher from any student:
    `--preset reference` (raw logits to the output discriminator) is refused on one, in one line; the default form
    (softened probabilities) and the reference without its output discriminator take it."""
    from console import one_error_line, run_console

    from meal_cache.distill import DistillConfig, method_class
    from meal_cache.nets.models import create_model

    out = tmp_path / "refused"
    line = one_error_line(run_console(["distill", "--store", str(top5_store), "--student", "resnet8_w4", "--preset",
                                       "reference", "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(out)],
                                      tmp_path))  # fmt: skip
    assert "--disc-form reference's output discriminator reads raw logits" in line, line
    assert "keeps topk:5 of 10 classes" in line and "--logits all" in line, line
    assert not out.exists()
    store = open_store(top5_store)
    for settings in (
        {"preset": "reference", "discriminators": ["blocks"]},
        {"discriminators": ["output"], "representation": "maps"},
    ):
        config = DistillConfig(store=str(top5_store), student="resnet8_w4", method="meal", **settings).resolved()
        method = method_class("meal")(create_model("resnet8_w4", 10, 16), config, store, 16)
        assert ("logits" in method.discriminators) == ("output" in config.options.discriminators)
