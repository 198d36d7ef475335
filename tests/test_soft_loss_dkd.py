"""``--soft-loss dkd`` (issue 44): the MEAL family (kd, meal, meal-v2) learns from DKD's decoupled parts, weighted by
its options alpha, beta and warmup, against the paper's formula in float64 numpy (tests/test_dkd_numerics.py);
meal by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from by_hand import first_rows
from console import one_error_line, run_console
from test_dkd_numerics import reference_parts

from meal_cache.distill import DistillConfig, distill
from meal_cache.distill.methods import meal as meal_module
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store import open_store

OPTIONS = {"alpha": 2.0, "beta": 3.0, "warmup": 4.0}


@pytest.fixture(scope="module")
def kd_store(tmp_path_factory, teacher_dir, digits):
    """Both teachers' logits (every one: 10 classes), one view of digits."""
    out = tmp_path_factory.mktemp("soft-loss-dkd") / "kd.zarr"
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], views=1, preset="kd",
                           teacher_dir=str(teacher_dir), batch_size=512, device="cpu")  # fmt: skip
    extract(config, out, progress=False, dataset=digits)
    return out


def _expected(out_logits: torch.Tensor, teacher_logits: list[np.ndarray], labels: np.ndarray, selection: str,
              ramp: float) -> tuple[float, float]:  # fmt: skip
    """alpha TCKD and beta NCKD at T = 4 as the selection weighs teachers: the mean's parts, or the sum of each
    selected teacher's, times the warm-up's ramp."""
    student = out_logits.detach().double().numpy()
    sets = [teacher_logits] if selection == "mean" else [[t] for t in teacher_logits]
    parts = [reference_parts(student, teachers, labels, 4.0)[:2] for teachers in sets]
    return (ramp * OPTIONS["alpha"] * sum(t for t, _ in parts), ramp * OPTIONS["beta"] * sum(n for _, n in parts))


@pytest.mark.parametrize("selection", ["random", "mean", "all"])
def test_kd_with_dkd_parts_by_the_float64_formula(kd_store, digits, selection):
    config = DistillConfig(store=str(kd_store), student="resnet8_w4", method="kd", device="cpu", soft_loss="dkd",
                           teacher_selection=selection, method_options=OPTIONS).resolved(
                               open_store(kd_store).layout.features)  # fmt: skip
    distiller, images, targets, labels = first_rows(config, digits)
    assert distiller.options.beta == 3.0 and config.hard_weight == 0.0
    selected = distiller.teachers[1:] if selection == "random" else distiller.teachers
    distiller.set_epoch(1)  # (1 + 1) / 4 of the parts' weight
    out = distiller(distiller.batch(images, targets, labels, selected))
    assert set(out.losses) == {"soft/tckd", "soft/nckd"}
    teacher_logits = [targets[f"teachers/{t}/logits"].double().numpy() for t in selected]
    tckd, nckd = _expected(out.logits, teacher_logits, labels.numpy(), selection, ramp=0.5)
    assert float(out.losses["soft/tckd"].detach()) == pytest.approx(tckd, rel=1e-4)
    assert float(out.losses["soft/nckd"].detach()) == pytest.approx(nckd, rel=1e-4)


def test_a_distill_run_with_dkd_parts_learns_the_float64_formulas_values(kd_store, digits, tmp_path, monkeypatch):
    """Every step of a one-epoch kd run with --soft-loss dkd (the ensemble mean, epoch 0 of a 4-epoch warm-up)
    trains on the parts the float64 formula gives for that step's student logits, teachers' logits and labels."""
    steps = []
    real_forward = meal_module.MealFamily.forward

    def recording(self, batch):
        out = real_forward(self, batch)
        teacher_logits = [batch.targets[f"teachers/{t}/logits"].double().numpy() for t in batch.selected]
        steps.append((out.logits.detach().clone(), teacher_logits, batch.labels.numpy().copy(),
                      {k: float(v) for k, v in out.losses.items()}))  # fmt: skip
        return out

    monkeypatch.setattr(meal_module.MealFamily, "forward", recording)
    config = DistillConfig(store=str(kd_store), student="resnet8_w4", method="kd", epochs=1, device="cpu",
                           soft_loss="dkd", hard_weight=1.0, method_options=OPTIONS)  # fmt: skip
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    monkeypatch.undo()
    assert len(steps) > 10 and np.isfinite(summary["history"][0]["soft/nckd"])
    for logits, teacher_logits, labels, named in steps:
        tckd, nckd = _expected(logits, teacher_logits, labels, "mean", ramp=0.25)
        assert named["soft/tckd"] == pytest.approx(tckd, rel=1e-4)
        assert named["soft/nckd"] == pytest.approx(nckd, rel=1e-4)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["soft_loss"] == "dkd" and recorded["method_options"] == OPTIONS


def test_meal_learns_from_dkd_parts_by_default_at_full_weight_from_its_first_epoch(small_store, digits):
    """meal's soft loss is DKD's decoupled KL unless --soft-loss says otherwise (it beat KL on 5 of 5 seeds at 100
    classes), with DKD's alpha 1 and beta 8 and a warm-up of 1 epoch: the parts weigh fully at epoch 0."""
    path, _ = small_store
    config = DistillConfig(store=str(path), student="resnet8_w4", method="meal", device="cpu").resolved(
        open_store(path).layout.features)  # fmt: skip
    assert config.soft_loss == "dkd" and config.soft_weight == 1.0 and config.temperature == 4.0
    distiller, images, targets, labels = first_rows(config, digits)
    assert (distiller.options.alpha, distiller.options.beta, distiller.options.warmup) == (1.0, 8.0, 1.0)
    selected = distiller.teachers[1:]
    out = distiller(distiller.batch(images, targets, labels, selected))
    assert "soft" not in out.losses
    student = out.logits.detach().double().numpy()
    teacher_logits = [targets[f"teachers/{t}/logits"].double().numpy() for t in selected]
    tckd, nckd = reference_parts(student, teacher_logits, labels.numpy(), 4.0)[:2]
    assert float(out.losses["soft/tckd"].detach()) == pytest.approx(tckd, rel=1e-4)
    assert float(out.losses["soft/nckd"].detach()) == pytest.approx(8.0 * nckd, rel=1e-4)
    kl = DistillConfig(store=str(path), student="resnet8_w4", method="meal", device="cpu", soft_loss="kl")
    kl_distiller = first_rows(kl.resolved(open_store(path).layout.features), digits)[0]
    assert "soft" in kl_distiller(kl_distiller.batch(images, targets, labels, selected)).losses


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "afd", "--soft-loss", "dkd"], "--soft-loss dkd is taken by --method"),
    (["--method", "kd", "--method-option", "beta=2"],
     "--method kd has no option beta with --soft-loss kl: alpha, beta and warmup weigh --soft-loss dkd's parts"),
    (["--method", "dkd", "--soft-loss", "kl"], "--soft-loss kl is taken by --method acn, afd, at, fitnet, kd"),
])  # fmt: skip
def test_dkd_parts_where_they_do_not_apply_are_refused_in_one_line(tmp_path, options, message):
    line = one_error_line(run_console(["distill", "--store", str(tmp_path), "--student", "resnet8_w4",
                                       "--out", str(tmp_path / "out"), *options], tmp_path))  # fmt: skip
    assert message in line, line
    assert not (tmp_path / "out").exists()
