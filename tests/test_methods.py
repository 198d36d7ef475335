"""Methods as classes (issue 27): the registry, plug-ins found by entry point, and the baselines from the cache
(DKD, FitNet, AT), each loss against a hand computation."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from by_hand import first_rows
from plugin_package import install_plugin

from meal_cache.distill import DistillConfig, available_methods, distill
from meal_cache.distill.methods.at import attention_loss
from meal_cache.distill.methods.dkd import decoupled_kl
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig, store_presets
from meal_cache.extract.run import extract
from meal_cache.store import open_store


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_dkd_parts_by_hand():
    student = [[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 2.0, 0.0]]
    teacher = [[3.0, 0.0, 1.0, 0.5], [0.0, 0.0, 4.0, 1.0]]
    targets, temperature = [0, 2], 2.0
    tckd_rows, nckd_rows, kl_rows = [], [], []
    for s, t, y in zip(student, teacher, targets, strict=True):
        ps, pt = _softmax(s, temperature), _softmax(t, temperature)
        tckd_rows.append(_kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]))
        rest_s = [p / (1 - ps[y]) for c, p in enumerate(ps) if c != y]
        rest_t = [p / (1 - pt[y]) for c, p in enumerate(pt) if c != y]
        nckd_rows.append(_kl(rest_t, rest_s))
        kl_rows.append(_kl(pt, ps))
        # The paper's identity: KD = TCKD + (1 - p_t(target)) NCKD.
        assert kl_rows[-1] == pytest.approx(tckd_rows[-1] + (1 - pt[y]) * nckd_rows[-1])
    teacher_probs = torch.tensor([_softmax(t, temperature) for t in teacher])
    tckd, nckd = decoupled_kl(torch.tensor(student), teacher_probs.log(), torch.tensor(targets), temperature)
    assert float(tckd) == pytest.approx(temperature**2 * sum(tckd_rows) / 2, rel=1e-5)
    assert float(nckd) == pytest.approx(temperature**2 * sum(nckd_rows) / 2, rel=1e-5)


def test_attention_loss_by_hand():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    s_norm, t_norm = math.sqrt(1 + 4 + 9 + 16), math.sqrt(2)
    expected = sum((a / s_norm - b / t_norm) ** 2 for a, b in zip([1, 2, 3, 4], [0, 1, 0, 1], strict=True)) / 4
    assert float(attention_loss(student, teacher)) == pytest.approx(expected)
    # A larger map is average-pooled to the smaller one's grid first: a 4x4 map of 2x2 constant quadrants.
    large = student.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert float(attention_loss(large, teacher)) == pytest.approx(expected)


@pytest.fixture(scope="module")
def method_stores(tmp_path_factory, teacher_dir, digits):
    """One store per new method, extracted with ``--for METHOD``: exactly what the method says it reads."""
    folder = tmp_path_factory.mktemp("method-stores")
    for name in ("dkd", "fitnet", "at"):
        config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], views=1, grid=2, preset=name,
                               teacher_dir=str(teacher_dir), batch_size=512, device="cpu")  # fmt: skip
        extract(config.resolved(), folder / f"{name}.zarr", progress=False, dataset=digits)
    return folder


def _first_batch(store_path, digits, method: str, **overrides):
    """A built method and the inputs of its forward pass on the first 64 rows of view 0."""
    config = DistillConfig(store=str(store_path), student="resnet8_w4", method=method, device="cpu",
                           **overrides).resolved(open_store(store_path).layout.features)  # fmt: skip
    distiller, images, targets, labels = first_rows(config, digits)
    return distiller, config, images, targets, labels


def test_dkd_ensemble_terms_and_warm_up(method_stores, digits):
    distiller, config, images, targets, labels = _first_batch(method_stores / "dkd.zarr", digits, "dkd")
    assert config.hard_weight == 1.0 and distiller.options.beta == 8.0  # the paper's, filled in
    out = distiller(distiller.batch(images, targets, labels, distiller.teachers))
    teacher = torch.stack([F.softmax(targets[f"teachers/{t}/logits"].float() / 4, 1) for t in distiller.teachers])
    tckd, nckd = decoupled_kl(out.logits, teacher.mean(0).log(), labels, 4.0)
    assert float(out.losses["soft/tckd"]) == pytest.approx(float(tckd) / 20)  # epoch 0 of a 20-epoch warm-up
    assert float(out.losses["soft/nckd"]) == pytest.approx(8 * float(nckd) / 20)
    assert float(out.losses["hard"]) == pytest.approx(float(F.cross_entropy(out.logits, labels)))
    distiller.set_epoch(30)
    late = distiller(distiller.batch(images, targets, labels, distiller.teachers))
    assert float(late.losses["soft/nckd"]) == pytest.approx(8 * float(nckd), rel=1e-5)


def test_fitnet_hint_by_hand(method_stores, digits):
    distiller, config, images, targets, labels = _first_batch(method_stores / "fitnet.zarr", digits, "fitnet",
                                                              method_options={"weight": 10.0})  # fmt: skip
    assert config.soft_weight == 0 and config.hard_weight == 1
    assert distiller.student_block == distiller.student.block_names[-2]  # block 1 from the end by default
    seen = {}
    block = distiller.student.get_submodule(distiller.student_block)
    block.register_forward_hook(lambda _m, _i, output: seen.__setitem__("out", output.detach()))
    out = distiller(distiller.batch(images, targets, labels, distiller.teachers))
    expected = 0.0
    for teacher in distiller.teachers:
        stored = targets[f"teachers/{teacher}/blocks/{distiller.hints[teacher].key}"].float()
        grid = stored.shape[-1]
        b, c, h, w = seen["out"].shape
        pooled = seen["out"].reshape(b, c, grid, h // grid, grid, w // grid).mean((3, 5))
        conv = distiller.adapters[teacher].proj
        adapted = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0].detach(), pooled) + conv.bias.detach()[
            None, :, None, None]  # fmt: skip
        expected += float(((adapted - stored) ** 2).mean())
    assert set(out.losses) == {"hint", "hard"}
    assert float(out.losses["hint"]) == pytest.approx(10.0 * expected / 2, rel=1e-4)


def test_at_on_stored_attention_by_hand(method_stores, digits):
    distiller, _, images, targets, labels = _first_batch(method_stores / "at.zarr", digits, "at")
    seen = {}
    for name in distiller.student.block_names:
        distiller.student.get_submodule(name).register_forward_hook(
            lambda _m, _i, output, name=name: seen.__setitem__(name, output.detach()))  # fmt: skip
    out = distiller(distiller.batch(images, targets, labels, distiller.teachers))
    total = 0.0
    for teacher in distiller.teachers:
        blocks = open_store(method_stores / "at.zarr").blocks(teacher)
        for rank in range(3):
            student = seen[distiller.student.block_names[-1 - rank]].abs().pow(2).mean(1)
            stored = targets[f"teachers/{teacher}/attention/{blocks[-1 - rank].key}"].float()
            total += float(attention_loss(student, stored))
    assert float(out.losses["attention"]) == pytest.approx(1000.0 * total / 2, rel=1e-4)


@pytest.mark.parametrize("method", ["dkd", "fitnet", "at"])
def test_each_baseline_trains_from_the_store_extract_for_writes(method_stores, digits, tmp_path, method):
    store = open_store(method_stores / f"{method}.zarr")
    needs = store_presets()[method]
    assert set(store.layout.features) == set(needs.features)
    config = DistillConfig(store=str(method_stores / f"{method}.zarr"), student="resnet8_w4", method=method, epochs=1,
                           device="cpu")  # fmt: skip
    summary = distill(config, tmp_path / method, progress=False, dataset=digits)
    record = summary["history"][0]
    own = {"dkd": "soft/nckd", "fitnet": "hint", "at": "attention"}[method]
    assert own in record and "hard" in record and math.isfinite(record[own])
    assert json.loads((tmp_path / method / "config.json").read_text())["method"] == method


def test_method_options_are_checked():
    with pytest.raises(UserError, match="has no option gamma"):
        DistillConfig(store="", student="s", method="dkd", method_options={"gamma": 1}).resolved()
    with pytest.raises(UserError, match="beta of --method dkd must be >= 0"):
        DistillConfig(store="", student="s", method="dkd", method_options={"beta": -1}).resolved()
    with pytest.raises(UserError, match="has no option"):
        DistillConfig(store="", student="s", method="kd", method_options={"alpha": 1}).resolved()
    with pytest.raises(UserError, match="block of --method fitnet takes a whole number, got 1.5"):
        DistillConfig(store="", student="s", method="fitnet", method_options={"block": 1.5}).resolved()
    with pytest.raises(UserError, match="weight of --method at takes a number, got 'lots'"):
        DistillConfig(store="", student="s", method="at", method_options={"weight": "lots"}).resolved()
    assert DistillConfig(store="", student="s", method="dkd", method_options={"beta": 2}).resolved() is not None
    assert DistillConfig(store="", student="s", method="dkd", hard_weight=0.5).resolved().hard_weight == 0.5
    assert {"meal", "kd", "meal-v2", "afd", "dkd", "fitnet", "at"} <= set(available_methods())


def _console(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "dkd", "--method-option", "gamma=2"], "--method dkd has no option gamma (its options: alpha, beta"),
    (["--method", "at", "--method-option", "blocks=0"], "blocks of --method at must be >= 1, got 0"),
    (["--method", "dkd", "--method-option", "beta"], "takes NAME=VALUE, got 'beta'"),
])  # fmt: skip
def test_bad_method_options_through_the_console_script(tmp_path, options, message):
    process = _console("distill", "--store", str(tmp_path), "--student", "resnet8_w4",
                       "--out", str(tmp_path / "out"), *options)  # fmt: skip
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
    assert message in process.stderr, process.stderr


DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def _plugin_of_the_design_doc() -> str:
    """The plug-in example of docs/design.md as written: the python block after "The shortest complete method"."""
    text = DESIGN.read_text()
    start = text.index("```python\n", text.index("The shortest complete method")) + len("```python\n")
    return text[start : text.index("```\n", start)]


PLUGIN = _plugin_of_the_design_doc()


def test_a_method_installed_by_entry_point_runs_end_to_end(tmp_path, teacher_dir):
    site = install_plugin(tmp_path, "cosine_method", PLUGIN, "meal_cache.methods", 'cosine = "cosine_method:Cosine"')
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = _console("methods", env=env)
    assert "cosine: cosine similarity on pooled last blocks" in listed.stdout and "(plug-in)" in listed.stdout
    store, out = tmp_path / "cos.zarr", tmp_path / "run"
    made = _console("extract", "--teachers", "resnet8_w4,densenet_k12", "--teacher-dir", str(teacher_dir), "--for",
                    "cosine", "--views", "1", "--data", "digits?train_fraction=0.25", "--device", "cpu", "--out",
                    str(store), "--quiet", env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert open_store(store).layout.features == ("blocks",)
    assert all(len(open_store(store).blocks(t)) == 1 for t in ("resnet8_w4", "densenet_k12"))
    run = _console("distill", "--store", str(store), "--student", "resnet8_w4", "--method", "cosine", "--epochs",
                   "1", "--method-option", "weight=0.5", "--device", "cpu", "--out", str(out), "--quiet",
                   env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "config.json").read_text())["method_options"] == {"weight": 0.5}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"cos/resnet8_w4", "cos/densenet_k12", "soft"} <= set(record)
    # Without the plug-in on the path, the name is unknown (and said so in one line).
    unknown = _console("distill", "--store", str(store), "--student", "resnet8_w4", "--method", "cosine",
                       "--out", str(tmp_path / "other"))  # fmt: skip
    assert unknown.returncode == 2 and "'cosine' is not one of" in unknown.stderr


REFUSALS = [
    ("at", "fitnet", "--method at reads the teachers' attention maps, which this store lacks (it holds blocks): "
                     "extract with --for at (or --features attention)"),
    ("fitnet", "at", "--method fitnet reads the teachers' pooled blocks, which this store lacks (it holds "
                     "attention): extract with --for fitnet (or --features blocks)"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "store", "flags"), REFUSALS)
def test_a_store_without_what_a_method_reads_is_refused_naming_the_flags(method_stores, digits, tmp_path, method,
                                                                          store, flags):  # fmt: skip
    config = DistillConfig(store=str(method_stores / f"{store}.zarr"), student="resnet8_w4", method=method, epochs=1,
                           device="cpu")  # fmt: skip
    with pytest.raises(UserError, match=re.escape(flags)):
        distill(config, tmp_path / "run", progress=False, dataset=digits)
