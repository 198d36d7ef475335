from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import meal_cache.distill as distill_module
from meal_cache.checkpoint import load_model
from meal_cache.cli import main
from meal_cache.data import load_dataset
from meal_cache.distill import DistillConfig, Distiller, OnlineTeachers, ViewFeed, distill, match_blocks
from meal_cache.errors import UserError
from meal_cache.evaluate import evaluate
from meal_cache.extract import ExtractConfig, extract
from meal_cache.models import create_model
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
    assert "soft" in records[0] and "test_top1" in records[0] and "seconds" in records[0]
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
    student = create_model("resnet8_w4", 10, 16)
    distiller = Distiller(student, config, open_store(path), 16)
    assert config.block_loss == "l2" and len(distiller.adapters) == 6
    assert any(type(d).__name__ == "ConvDiscriminator" for d in distiller.discriminators.values())
    distill(config, tmp_path / "b", progress=False, dataset=digits)


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
    from meal_cache import augment

    batch = augment.apply(images, params, digits.mean, digits.std)
    results = []
    for source in ("cache", "online"):
        torch.manual_seed(0)
        distiller = Distiller(create_model("resnet8_w4", 10, 16), config, store, 16)
        if source == "cache":
            feed = ViewFeed(store, distiller.needed_keys(), torch.device("cpu"))
            targets = {k: v[rows] for k, v in feed.get(0).items()}
            feed.close()
        else:
            targets = OnlineTeachers(config, store, digits, precision).targets(images, params)
        _, named, adversarial = distiller(batch, targets, digits.train.labels[rows], distiller.teachers)
        named.update(distiller.adversarial_losses(adversarial, distiller.teachers))
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

    undo = interrupt_on_call(distill_module, "evaluate", 2)  # in the second epoch
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


def test_streaming_run_trains(small_store, digits, tmp_path):
    path, _ = small_store
    summary = distill(_config(path, epochs=1, max_memory="300kB"), tmp_path / "s", progress=False, dataset=digits)
    assert summary["history"][0]["steps"] == 1437 // 64
    with pytest.raises(UserError, match="--max-memory takes a size"):
        distill(_config(path, max_memory="lots"), tmp_path / "t", progress=False, dataset=digits)


def test_fresh_views_draw_new_augmentations_each_epoch(small_store, teacher_dir, digits, tmp_path, monkeypatch):
    path, _ = small_store
    drawn = []
    real_draw = distill_module.augment.draw

    def recording_draw(*args, **kwargs):
        params = real_draw(*args, **kwargs)
        drawn.append(params)
        return params

    monkeypatch.setattr(distill_module.augment, "draw", recording_draw)
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
