"""DKD's parts for a confident teacher (issue 44): exact in float32 at any logit gap, for one teacher and for the
ensemble mean, against the paper's formula computed from the logits in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meal_cache import losses

GAPS = (15.0, 18.0, 20.0, 25.0, 40.0)


def _teacher_logits(rng: np.random.Generator, target: np.ndarray, classes: int, gap: float) -> np.ndarray:
    """Logits whose target class leads the largest other one by ``gap``."""
    logits = rng.normal(0.0, 1.5, size=(len(target), classes))
    others = logits.copy()
    others[np.arange(len(target)), target] = -np.inf
    logits[np.arange(len(target)), target] = others.max(1) + gap
    return logits


def _probs64(logits: np.ndarray, temperature: float) -> np.ndarray:
    wide = logits / temperature
    wide = wide - wide.max(1, keepdims=True)
    exps = np.exp(wide)
    return exps / exps.sum(1, keepdims=True)


def reference_parts(student: np.ndarray, teachers: list[np.ndarray], target: np.ndarray, temperature: float):
    """(TCKD, NCKD, d NCKD / d student) by the paper's formula in float64: the teachers' mean probability, the
    binary [p_t, sum of the others] and the others renormalised by their own sum (never 1 - p_t), each times T^2
    and averaged over rows; the gradient is T (r - q) / B on the other classes, r and q the student's and the
    teacher's non-target distributions."""
    rows = np.arange(len(target))
    teacher = np.mean([_probs64(t, temperature) for t in teachers], axis=0)
    mine = _probs64(student, temperature)
    off = np.ones_like(teacher, dtype=bool)
    off[rows, target] = False
    teacher_rest = np.where(off, teacher, 0.0).sum(1)
    mine_rest = np.where(off, mine, 0.0).sum(1)
    binary_t = np.stack([teacher[rows, target], teacher_rest], 1)
    binary_s = np.stack([mine[rows, target], mine_rest], 1)
    tckd = (binary_t * np.log(binary_t / binary_s)).sum(1)
    q = np.where(off, teacher / teacher_rest[:, None], 0.0)
    r = np.where(off, mine / mine_rest[:, None], 0.0)
    nckd = np.where(off, q * np.log(np.where(off, q, 1.0) / np.where(off, r, 1.0)), 0.0).sum(1)
    grad = temperature * (r - q) / len(target)
    return temperature**2 * tckd.mean(), temperature**2 * nckd.mean(), grad


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_decoupled_parts_match_the_float64_formula_at_every_gap(teachers, classes, temperature):
    rng = np.random.default_rng(classes + 10 * teachers + int(temperature))
    target = rng.integers(0, classes, size=16)
    for gap in GAPS:
        # The second teacher is a little less sure, so the mean is not one teacher's distribution.
        logits = [_teacher_logits(rng, target, classes, gap - 3.0 * i) for i in range(teachers)]
        student = rng.normal(0.0, 2.0, size=(16, classes))
        expected_tckd, expected_nckd, expected_grad = reference_parts(student, logits, target, temperature)
        student_t = torch.tensor(student, dtype=torch.float32, requires_grad=True)
        log_probs = losses.log_soft_targets([torch.tensor(t, dtype=torch.float32) for t in logits], temperature)
        tckd, nckd = losses.decoupled_kl(student_t, log_probs, torch.from_numpy(target), temperature)
        context = f"gap {gap}, {classes} classes, T {temperature}, {teachers} teacher(s)"
        assert float(tckd.detach()) == pytest.approx(expected_tckd, rel=1e-4, abs=1e-5 * temperature**2), context
        assert float(nckd.detach()) == pytest.approx(expected_nckd, rel=1e-4, abs=1e-5 * temperature**2), context
        (nckd_grad,) = torch.autograd.grad(nckd, student_t, retain_graph=True)
        np.testing.assert_allclose(nckd_grad.numpy(), expected_grad, rtol=1e-3, atol=1e-6, err_msg=context)
        (total_grad,) = torch.autograd.grad(tckd + nckd, student_t)
        assert torch.isfinite(total_grad).all(), context


def test_extract_for_dkd_keeps_every_logit_where_kd_draws_16_classes():
    """NCKD is the tail's shape, which a top-k rebuild flattens (docs/design.md, "`--for dkd` keeps every logit":
    on 100 classes at T = 4 top-20 still moves its gradient by 16-26 %), so --for dkd stores every logit at any
    class count."""
    from meal_cache.extract.config import ExtractConfig

    assert ExtractConfig(teachers=["t"], preset="dkd").resolved().logits is None
    assert ExtractConfig(teachers=["t"], preset="kd").resolved().logits == "sample:16"
