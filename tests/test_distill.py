from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch
from by_hand import first_rows
from click.testing import CliRunner
from console import one_error_line_of

import meal_cache.distill as distill_module
import meal_cache.engine.loop as loop_module
import meal_cache.views.augment as augment_module
from meal_cache.cli import main
from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig, OnlineTeachers, ViewFeed, distill, match_blocks, method_class
from meal_cache.engine.evaluate import evaluate
from meal_cache.errors import SettingsMismatch, UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_model
from meal_cache.nets.models import create_model
from meal_cache.nets.taps import block_shapes
from meal_cache.runtime import Precision
from meal_cache.store import BlockSpec, open_store


def _config(store, **overrides) -> DistillConfig:
    base = dict(store=str(store), student="resnet8_w4", epochs=2, device="cpu")
    return DistillConfig(**{**base, **overrides})


def test_blocks_are_matched_from_the_end():
    teacher = [BlockSpec(f"t{i}", 8, 1, 4, 4) for i in range(4)]
    pairs = match_blocks(("s1", "s2", "s3"), {"a": teacher}, [0.1, 0.05, 0.01], None)
    assert [(p.student_block, p.teacher_block.name, p.weight) for p in pairs] == [
        ("s3", "t3", 0.1),
        ("s2", "t2", 0.05),
        ("s1", "t1", 0.01),
    ]
    assert len(match_blocks(("s1", "s2", "s3"), {"a": teacher}, [1, 1, 1], 1)) == 1


@pytest.mark.parametrize("method", ["meal", "kd", "meal-v2"])
def test_each_method_trains_and_writes_its_run(small_store, digits, tmp_path, method):
    path, _ = small_store
    out = tmp_path / method
    summary = distill(_config(path, method=method), out, progress=False, dataset=digits)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["view"] for r in records] == [0, 1]
    soft = "soft/nckd" if method == "meal" else "soft"  # meal's soft loss is DKD's decoupled KL by default
    assert soft in records[0] and "test_top1" in records[0] and "seconds" in records[0]
    if method == "meal":
        assert any(k.startswith("sim/") for k in records[0]) and "adv/logits" in records[0]
        assert any(k.startswith("disc_acc/") for k in records[0])
    if method == "kd":
        assert not any(k.startswith(("sim/", "adv/", "disc")) for k in records[0])
    if method == "meal-v2":
        assert "adv/logits" in records[0] and not any(k.startswith("sim/") for k in records[0])
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["teacher_selection"] in ("random", "mean")
    model, payload = load_model(out / "student.pt")
    assert payload["arch"] == "resnet8_w4"
    assert evaluate(model, digits)["top1"] == pytest.approx(summary["test"]["top1"])


def test_blocks_representation_with_adapters_and_conv_discriminators(small_store, digits, tmp_path):
    path, _ = small_store
    config = _config(path, representation="blocks", teacher_selection="all", epochs=1).resolved()
    torch.manual_seed(config.seed)  # as distill() seeds before it builds the student and the adapters
    student = create_model("resnet8_w4", 10, 16)
    distiller = method_class(config.method)(student, config, open_store(path), 16)
    assert config.options.block_loss == "l2" and len(distiller.adapters) == 6
    assert any(type(d).__name__ == "ConvDiscriminator" for d in distiller.discriminators.values())
    for pair in distiller.pairs:  # each adapter maps the student's pooled block onto the teacher's block
        channels, _, _ = block_shapes(student, 16)[pair.student_block]
        grid = pair.teacher_block.grid
        mapped = distiller.adapters[pair.key](torch.zeros(3, channels, grid, grid))
        assert mapped.shape == (3, pair.teacher_block.channels, grid, grid), pair.key
    initial = {k: v.clone() for k, v in distiller.adapters.state_dict().items()}
    config = dataclasses.replace(config, epochs=2)
    distill(config, tmp_path / "b", progress=False, dataset=digits)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    sims = sorted(k for k in records[0] if k.startswith("sim/"))
    assert len(sims) == 6 and all(k.replace("sim/", "adv/") in records[0] for k in sims)
    assert sum(records[1][k] for k in sims) < sum(records[0][k] for k in sims)  # the adapters learn the mapping
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert "scaler" in state and "store_settings" in state
    trained = state["distiller"]
    moved = [k for k, v in initial.items() if not torch.equal(v, trained[f"adapters.{k}"])]
    assert len(moved) == len(initial)


def test_distill_never_opens_a_teacher(teacher_dir, digits, tmp_path, monkeypatch):
    teachers = tmp_path / "teachers"
    shutil.copytree(teacher_dir, teachers)
    config = ExtractConfig(teachers=["resnet8_w4"], views=1, teacher_dir=str(teachers), device="cpu")
    extract(config, tmp_path / "s.zarr", progress=False, dataset=digits)
    shutil.rmtree(teachers)
    real_load = torch.load

    def guarded_load(path, *args, **kwargs):
        assert "teachers" not in str(path), f"distill opened a teacher: {path}"
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    summary = distill(_config(tmp_path / "s.zarr", epochs=1), tmp_path / "run", progress=False, dataset=digits)
    assert summary["test"]["n"] == 360


def test_online_and_cached_first_step_agree(small_store, teacher_dir, digits):
    path, _ = small_store
    store = open_store(path)
    config = _config(path, teacher_selection="mean", online=True, teachers=["resnet8_w4", "densenet_k12"],
                     teacher_dir=str(teacher_dir)).resolved()  # fmt: skip
    precision = Precision(torch.device("cpu"))
    rows = torch.arange(64)
    params = store.view_params(0)[rows]
    images = digits.train.images[rows]
    from meal_cache.views import augment

    batch = augment.apply(images, params, digits.mean, digits.std)
    results = []
    for source in ("cache", "online"):
        torch.manual_seed(0)
        distiller = method_class(config.method)(create_model("resnet8_w4", 10, 16), config, store, 16)
        if source == "cache":
            feed = ViewFeed(store, distiller.needed_keys(), torch.device("cpu"))
            targets = feed.get(0).decoded(rows)
            feed.close()
        else:
            targets = OnlineTeachers(config, store, digits, precision).targets(augment.render(images, params))
        out = distiller(distiller.batch(batch, targets, digits.train.labels[rows], distiller.teachers))
        named = {**out.losses, **distiller.adversarial_losses(out.adversarial)}
        results.append({k: float(v.detach()) for k, v in named.items()})
    cached, online = results
    assert cached.keys() == online.keys() and len(cached) > 5
    for key in cached:
        assert cached[key] == pytest.approx(online[key], rel=5e-3, abs=5e-4), key


def test_resume_gives_the_same_weights(small_store, digits, tmp_path, interrupt_on_call):
    path, _ = small_store
    config = _config(path, epochs=2)
    reference = tmp_path / "ref"
    distill(config, reference, progress=False, dataset=digits)

    undo = interrupt_on_call(loop_module, "evaluate", 2)  # in the second epoch
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(config, run, progress=False, dataset=digits)
    undo()
    assert not (run / "student.pt").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(UserError, match="--resume"):
        distill(config, run, progress=False, dataset=digits)
    distill(config, run, resume=True, progress=False, dataset=digits)
    expected = torch.load(reference / "student.pt", weights_only=True)["model"]
    resumed = torch.load(run / "student.pt", weights_only=True)["model"]
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_mismatched_or_incomplete_stores_are_refused(small_store, digits, tmp_path):
    path, _ = small_store
    with pytest.raises(UserError, match="16 px, the data's 12"):
        distill(_config(path), tmp_path / "a", progress=False, dataset=load_dataset("digits", image_size=12))
    with pytest.raises(UserError, match="fingerprint differs"):
        distill(_config(path), tmp_path / "b", progress=False, dataset=load_dataset("fake:1437"))
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(path, incomplete)
    store = open_store(incomplete, mode="r+")
    store.set_attrs(complete=False)
    with pytest.raises(UserError, match="incomplete"):
        distill(_config(incomplete), tmp_path / "c", progress=False, dataset=digits)
    with pytest.raises(UserError, match="store not found"):
        distill(_config(tmp_path / "none.zarr"), tmp_path / "d", progress=False, dataset=digits)


def test_cli_distill_then_evaluate(small_store, teacher_dir, tmp_path):
    path, _ = small_store
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(main, ["distill", "--store", str(path), "--student", "resnet8_w4", "--epochs", "1",
                                  "--out", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output
    evaluated = runner.invoke(main, ["evaluate", str(out / "student.pt"), "--device", "cpu"])
    assert evaluated.exit_code == 0 and "top-1" in evaluated.output and "ECE" in evaluated.output
    teachers = f"{teacher_dir}/resnet8_w4.pt,{teacher_dir}/densenet_k12.pt"
    report = tmp_path / "e.json"
    with_teachers = runner.invoke(main, ["evaluate", str(out / "student.pt"), "--device", "cpu", "--teachers", teachers,
                                         "--json", str(report)])  # fmt: skip
    assert with_teachers.exit_code == 0, with_teachers.output
    metrics = json.loads(report.read_text())["metrics"]
    assert 0 <= metrics["fidelity"] <= 100 and metrics["kl_to_ensemble"] >= 0 and "fidelity" in with_teachers.output
    bad = runner.invoke(main, ["distill", "--store", str(path), "--student", "resnet8_w4", "--out", str(out),
                               "--method", "meal", "--online", "--device", "cpu"])  # fmt: skip
    assert bad.exit_code == 2 and "--teachers" in bad.stderr


def test_streaming_run_trains(small_store, digits, tmp_path, monkeypatch):
    path, _ = small_store
    seen = []
    real_step = distill_module.DistillEpochs.step

    def record(self, batch):
        (rows, targets, _), _ = batch
        seen.append((rows.clone(), {k: v.clone() for k, v in targets.items()}))
        return real_step(self, batch)

    streamed = []
    real_epoch = distill_module.StreamingBatches.epoch

    def streaming_epoch(self, epoch, view, next_view):
        streamed.append(view)
        return real_epoch(self, epoch, view, next_view)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    monkeypatch.setattr(distill_module.StreamingBatches, "epoch", streaming_epoch)
    # kd reads two teachers' logits, 57 kB a view: two views do not fit 60 kB, so chunks stream, a few at a time.
    config = _config(path, method="kd", epochs=2, max_memory="60kB")
    summary = distill(config, tmp_path / "s", progress=False, dataset=digits)
    assert streamed == [0, 1]
    steps = 1437 // 64
    assert [r["steps"] for r in summary["history"]] == [steps, steps]
    store = open_store(path)
    for epoch in range(2):
        batches = seen[epoch * steps : (epoch + 1) * steps]
        rows = torch.cat([r for r, _ in batches])
        # Every batch full, no row twice in an epoch; the rows held back differ between epochs (chunks shuffled).
        assert len(rows) == steps * 64 and len(rows.unique()) == len(rows)
        for teacher in ("resnet8_w4", "densenet_k12"):
            key = f"teachers/{teacher}/logits"
            stored = torch.from_numpy(store.logits(teacher, epoch))  # epoch e streams view e
            assert all(torch.equal(t[key], stored[r].to(t[key].dtype)) for r, t in batches), (epoch, teacher)
    first, second = (torch.cat([r for r, _ in seen[e * steps : (e + 1) * steps]]) for e in range(2))
    assert not torch.equal(first, second)
    with pytest.raises(UserError, match="--max-memory takes a size"):
        distill(_config(path, max_memory="lots"), tmp_path / "t", progress=False, dataset=digits)


def test_fresh_views_draw_new_augmentations_each_epoch(small_store, teacher_dir, digits, tmp_path, monkeypatch):
    path, _ = small_store
    drawn = []
    real_draw = augment_module.draw

    def recording_draw(*args, **kwargs):
        params = real_draw(*args, **kwargs)
        drawn.append(params)
        return params

    monkeypatch.setattr(augment_module, "draw", recording_draw)
    config = _config(path, method="kd", online=True, fresh_views=True, teachers=["resnet8_w4", "densenet_k12"],
                     teacher_dir=str(teacher_dir))  # fmt: skip
    distill(config, tmp_path / "fresh", progress=False, dataset=digits)
    records = [json.loads(line) for line in (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()]
    assert [r["view"] for r in records] == ["fresh", "fresh"]
    assert len(drawn) == 2 and not torch.equal(drawn[0].crop, drawn[1].crop)
    stored = open_store(path).view_params(0)
    assert not any(torch.equal(d.crop, stored.crop) for d in drawn)
    with pytest.raises(UserError, match="needs --online"):
        distill(_config(path, fresh_views=True), tmp_path / "bad", progress=False, dataset=digits)


# ------------------------------------------------------------------------------------------ hardening (#14)


@pytest.fixture
def cpu_bf16_autocast(monkeypatch):
    """Mixed precision as on a GPU, on the CPU: every autocast region of the code runs under CPU bf16 autocast,
    so dtype mismatches between autocast and fp32 code show here as they would on CUDA."""
    monkeypatch.setattr(Precision, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))


@pytest.mark.parametrize(("method", "representation"), [("meal", "maps"), ("meal", "blocks"), ("meal-v2", None),
                                                        ("kd", None)])  # fmt: skip
def test_distill_runs_under_bf16_autocast(small_store, digits, tmp_path, cpu_bf16_autocast, method, representation):
    """meal with either block representation, and the members without block terms (which read none)."""
    path, _ = small_store
    config = _config(path, method=method, representation=representation, epochs=1, batch_size=256)
    summary = distill(config, tmp_path / "amp", progress=False, dataset=digits)
    record = summary["history"][0]
    assert record["steps"] == 1437 // 256
    assert all(math.isfinite(v) for k, v in record.items() if isinstance(v, float)), record


@pytest.mark.parametrize("representation", ["maps", "blocks"])
def test_online_reference_runs_with_every_representation(small_store, teacher_dir, digits, tmp_path, representation):
    path, _ = small_store
    config = _config(path, representation=representation, online=True, epochs=1, batch_size=256,
                     teachers=["resnet8_w4", "densenet_k12"], teacher_dir=str(teacher_dir))  # fmt: skip
    summary = distill(config, tmp_path / representation, progress=False, dataset=digits)
    assert summary["history"][0]["steps"] == 1437 // 256
    assert any(k.startswith("sim/") for k in summary["history"][0])


@pytest.fixture(scope="module")
def one_kind_stores(tmp_path_factory, teacher_dir, digits):
    """Two one-view stores of one teacher: one with only pooled blocks, one with only channel-mean maps."""
    folder = tmp_path_factory.mktemp("kinds")
    for kind in ("blocks", "maps"):
        config = ExtractConfig(teachers=["resnet8_w4"], views=1, features=[kind], teacher_dir=str(teacher_dir),
                               device="cpu")  # fmt: skip
        extract(config, folder / f"{kind}.zarr", progress=False, dataset=digits)
    return folder


@pytest.mark.parametrize(("stored", "representation"), [("blocks", "maps"), ("maps", "blocks")])
def test_a_store_without_the_needed_arrays_is_one_error_line(one_kind_stores, tmp_path, stored, representation):
    store = one_kind_stores / f"{stored}.zarr"
    line = one_error_line_of(["distill", "--store", str(store), "--student", "resnet8_w4", "--representation",
                              representation, "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu"],
                             tmp_path, start_the_script=stored == "blocks")  # fmt: skip
    assert f"--features {representation}" in line and f"--representation {stored}" in line, line


def _one_step(store_path, digits, **overrides):
    """A distiller's forward and adversarial losses on the first 64 rows of view 0 (discriminators untouched)."""
    config = _config(store_path, **overrides).resolved()
    distiller, images, targets, labels = first_rows(config, digits)
    return distiller, config, distiller(distiller.batch(images, targets, labels, distiller.teachers))


def test_the_output_adversarial_weight_does_not_depend_on_the_teacher_count(small_store, digits):
    path, _ = small_store
    distiller, config, out = _one_step(path, digits, method="meal-v2")
    assert config.teacher_selection == "mean" and len(distiller.teachers) == 2
    (item,) = out.adversarial  # one term: the ensemble
    from meal_cache import losses

    scores = distiller.discriminators["logits"](item.fake)
    expected = config.options.adv_weight * losses.generator_loss(config.options.adv_loss, scores)
    actual = distiller.adversarial_losses(out.adversarial)["adv/logits"]
    assert float(actual.detach()) == pytest.approx(float(expected.detach()))


@pytest.mark.parametrize("representation", ["maps", "blocks"])
def test_each_block_loss_sends_gradient_into_the_students_own_layers(small_store, digits, representation):
    path, _ = small_store
    distiller, _, out = _one_step(path, digits, method="meal", teacher_selection="all", representation=representation)
    sims = [v for k, v in out.losses.items() if k.startswith("sim/")]
    assert len(sims) == len(distiller.pairs) > 0
    for pair, loss in zip(distiller.pairs, sims, strict=True):
        # The matched block's own convolutions, not the adapters (which a detached student block still trains).
        block = distiller.student.get_submodule(pair.student_block)
        params = [p for p in block.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, pair.key


def test_block_kl_is_logged_and_the_block_loss_moves_the_student(small_store, digits):
    from meal_cache import losses

    path, _ = small_store
    distiller, config, out = _one_step(path, digits, method="meal", teacher_selection="all", representation="maps")
    sims = {k.removeprefix("sim/"): v for k, v in out.losses.items() if k.startswith("sim/")}
    kls = {k.removeprefix("sim_kl/"): v for k, v in out.stats.items() if k.startswith("sim_kl/")}
    assert sims and kls.keys() == sims.keys()
    for key, kl in kls.items():
        pair = next(p for p in distiller.pairs if p.key == key)
        entropy = float(sims[key].detach()) / pair.weight - float(kl)
        assert float(kl) >= -1e-5 and 0 < entropy < math.log(16 * 16) + 1e-4, key  # a distribution over <= 256 cells
    assert losses.soft_entropy(torch.zeros(2, 16)) == pytest.approx(math.log(16))
    total = sum(sims.values())
    grads = torch.autograd.grad(
        total, [p for p in distiller.student.parameters() if p.requires_grad], allow_unused=True
    )
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_settings_outside_their_range_are_refused(small_store):
    path, _ = small_store
    for overrides, message in [
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"temperature": -1.0}, "--temperature must be > 0"),
        ({"schedule": "linear"}, "schedule"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"momentum": 1.0}, "--momentum must be < 1"),
        ({"adv_weight": -0.1}, "--adv-weight must be >= 0"),
        ({"disc_lr": 0.0}, "--disc-lr must be > 0"),
        ({"block_weights": [0.1, -1.0]}, "--block-weights"),
        ({"refine_confidence": 1.5}, "--refine-confidence must be <= 1"),
        ({"refine_labels": True}, "--hard-weight"),
        ({"method": "kd", "soft_weight": 0.0}, "trains on nothing"),
        ({"method": "meal-v2", "soft_weight": 0.0, "adv_weight": 0.0}, "trains on nothing"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            _config(path, **overrides).resolved()
    assert _config(path, temperature=2.0).resolved().temperature == 2.0
    assert _config(path, method="kd").resolved().temperature == 4.0
    assert _config(path, refine_labels=True, hard_weight=1.0).resolved().refine_labels
    assert _config(path, method="kd", soft_weight=0.0, hard_weight=1.0).resolved().hard_weight == 1.0
    assert _config(path, method="meal", soft_weight=0.0, adv_weight=0.0).resolved().method == "meal"  # blocks remain


def test_a_run_is_not_resumed_on_a_store_extracted_again_with_other_settings(teacher_dir, digits, tmp_path):
    store = tmp_path / "s.zarr"

    def extract_views(seed: int) -> None:
        config = ExtractConfig(teachers=["resnet8_w4"], views=1, seed=seed, teacher_dir=str(teacher_dir),
                               device="cpu")  # fmt: skip
        extract(config, store, overwrite=True, progress=False, dataset=digits)

    extract_views(0)
    config = _config(store, method="kd", epochs=1, batch_size=256)
    distill(config, tmp_path / "run", progress=False, dataset=digits)
    distill(config, tmp_path / "run", resume=True, progress=False, dataset=digits)  # the same store: resumes
    extract_views(1)  # other views (a store grown by views or teachers resumes: tests/test_grow.py)
    with pytest.raises(SettingsMismatch, match="other settings or teachers.*seed: 0 there, 1 now"):
        distill(config, tmp_path / "run", resume=True, progress=False, dataset=digits)
