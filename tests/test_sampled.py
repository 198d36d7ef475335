"""Sampled logits (issue 28): K classes drawn from the teacher's softmax at the store's temperature, kept as
distinct classes with their counts and read back as count / K, an unbiased estimate of the soft labels."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.store import open_store
from meal_cache.store.encodings.sample import SAMPLE_FLOOR, decode_sample, encode_sample, softmax_rows
from meal_cache.store.logits import LogitsChoice, check_logits_choice, parse_logits

LOGITS = np.array([[5.0, 3.0, 2.5, 0.0, -1.0, -3.0, 1.0, 0.5], [0.0, 0.2, -0.3, 4.0, 3.8, 0.0, -2.0, 1.0]])


def test_drawn_classes_are_distinct_with_counts_summing_to_k_most_drawn_first():
    rng = np.random.default_rng(0)
    for k in (1, 5, 8, 20):
        encoded = encode_sample(np.repeat(LOGITS, 50, 0), k, 4.0, rng)
        index, count = encoded["index"], encoded["count"]
        assert index.dtype == np.int16 and count.dtype == np.uint8
        assert index.shape == (100, min(k, 8))  # never more slots than classes
        assert (count.astype(int).sum(1) == k).all()
        assert all(len(set(row)) == len(row) for row in index.tolist())
        assert (np.diff(count.astype(int), axis=1) <= 0).all()


def test_the_mean_of_many_draws_is_the_dense_soft_label_loss_and_its_gradient():
    """The soft-label cross-entropy at T = 4 of a fixed student against the read-back targets, averaged over 4,000
    draws of K = 8, equals the loss against the teacher's dense softmax within four standard errors of that mean
    (plus the floor's millionth); so does its gradient with respect to the student's logits. Draws made at T = 1
    instead, read at 4, miss by far more: the check sees the temperature."""
    temperature, k, draws = 4.0, 8, 4000
    student = torch.tensor([[1.0, 0.5, 0.0, 0.2, -0.5, 0.1, 0.3, -1.0], [0.3, 0.0, 0.1, 1.0, 0.5, 0.2, 0.0, 0.4]],
                           dtype=torch.float64, requires_grad=True)  # fmt: skip
    log_student = F.log_softmax(student / temperature, dim=1)
    dense_target = torch.from_numpy(softmax_rows(LOGITS, temperature))
    dense_loss = -(dense_target * log_student).sum(1)
    dense_grad = torch.autograd.grad(dense_loss.sum(), student, retain_graph=True)[0]

    def draw_losses(drawn_at: float) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(1)
        rows = np.tile(LOGITS, (draws, 1))
        encoded = encode_sample(rows, k, drawn_at, rng)
        read_back = decode_sample(encoded["index"], encoded["count"], LOGITS.shape[1], "float64", temperature)
        target = F.softmax(torch.from_numpy(read_back) / temperature, dim=1).view(draws, 2, -1)
        losses = -(target * log_student).sum(2)  # (draws, 2)
        # The gradient of each draw's loss: (softmax(student / T) - target) / T, row by row.
        grads = (F.softmax(student / temperature, dim=1).detach() - target) / temperature
        return losses.detach(), grads

    losses, grads = draw_losses(temperature)
    stderr = losses.std(0) / draws**0.5
    assert (stderr > 0).all()
    assert ((losses.mean(0) - dense_loss.detach()).abs() <= 4 * stderr + SAMPLE_FLOOR).all()
    grad_stderr = grads.std(0) / draws**0.5
    assert ((grads.mean(0) - dense_grad).abs() <= 4 * grad_stderr + SAMPLE_FLOOR).all()
    wrong, _ = draw_losses(1.0)
    assert ((wrong.mean(0) - dense_loss.detach()).abs() > 10 * stderr).any()


@pytest.fixture(scope="module")
def sampled_store(small_store, digits, tmp_path_factory):
    """The small store's rows and views for one teacher, logits only, as 8 classes drawn at T = 4."""
    path, config = small_store
    out = tmp_path_factory.mktemp("sampled") / "sampled.zarr"
    sampled = dataclasses.replace(config, teachers=["resnet8_w4"], preset="kd", logits="sample:8")
    extract(sampled, out, progress=False, dataset=digits)
    return out, sampled


def test_a_sampled_store_holds_counts_reads_back_their_shares_and_draws_the_same_at_any_batch_size(
    small_store, sampled_store, digits, tmp_path
):
    dense_path, _ = small_store
    path, config = sampled_store
    store, dense = open_store(path), open_store(dense_path)
    assert store.attrs["format"] == "meal-cache/11" and str(store.layout.logits) == "sample:8"
    assert store.layout.temperature == 4.0 and store.complete
    group = zarr.open_group(str(path), mode="r")
    index = np.asarray(group["teachers/resnet8_w4/logits_sample/index"][:])
    count = np.asarray(group["teachers/resnet8_w4/logits_sample/count"][:])
    assert index.shape == count.shape == (3, store.n, 8) and (count.astype(int).sum(2) == 8).all()
    for view in range(3):
        shares = np.zeros((store.n, 10))
        np.put_along_axis(shares, index[view].astype(np.int64), count[view] / 8.0, axis=1)
        read_back = F.softmax(torch.from_numpy(store.logits("resnet8_w4", view).astype(np.float64)) / 4.0, dim=1)
        np.testing.assert_allclose(read_back.numpy(), shares, atol=2e-3)  # float16 logits
        # Each class is drawn as often as the teacher's softmax at 4 says: the teacher's top class, over all rows,
        # within four standard errors (a sampler at another temperature is off by tens of them).
        teacher = softmax_rows(dense.logits("resnet8_w4", view).astype(np.float64), 4.0)
        top = teacher.argmax(1)[:, None]
        drawn, expected = np.take_along_axis(shares, top, 1)[:, 0], np.take_along_axis(teacher, top, 1)[:, 0]
        stderr = np.sqrt((expected * (1 - expected) / 8).sum()) / store.n
        assert abs(drawn.mean() - expected.mean()) <= 4 * stderr, (drawn.mean(), expected.mean(), stderr)
    assert not np.array_equal(count[0], count[1])  # each view its own draws
    # Draws are seeded per chunk: another batch size writes the very same ones.
    again = tmp_path / "again.zarr"
    extract(dataclasses.replace(config, batch_size=100), again, progress=False, dataset=digits)
    other = zarr.open_group(str(again), mode="r")
    assert np.array_equal(np.asarray(other["teachers/resnet8_w4/logits_sample/count"][:]), count)
    assert np.array_equal(np.asarray(other["teachers/resnet8_w4/logits_sample/index"][:]), index)


def test_fidelity_of_sampled_logits_is_noise_around_an_unbiased_mean(small_store, sampled_store):
    """info --fidelity's gradient figures for the sampled store, against a computation from the raw arrays: the
    per-row L1 error of the read-back targets at T = 4 and the L1 norm of its mean over rows in rank order; the
    draws are unbiased, so the mean error is a small part of the per-row one."""
    dense_path, _ = small_store
    path, _ = sampled_store
    summary = store_fidelity(str(path), str(dense_path))["teachers"]["resnet8_w4"]
    dense = zarr.open_group(str(dense_path), mode="r")
    full = np.asarray(dense["teachers/resnet8_w4/logits"][:]).reshape(-1, 10).astype(np.float64)
    store = open_store(path)
    read_back = np.concatenate([store.logits("resnet8_w4", v) for v in range(3)]).astype(np.float64)
    error = softmax_rows(read_back, 4.0) - softmax_rows(full, 4.0)
    ranked = np.take_along_axis(error, np.argsort(-full, axis=1, kind="stable"), axis=1)
    gradient = summary["gradient"]["T=4"]
    assert gradient["error"] == pytest.approx(np.abs(error).sum(1).mean(), rel=1e-6)
    assert gradient["bias"] == pytest.approx(np.abs(ranked.mean(0)).sum(), rel=1e-3)
    assert gradient["bias"] < 0.1 * gradient["error"]


def test_distill_reads_a_sampled_store_at_its_temperature_and_refuses_another(sampled_store, digits, tmp_path):
    from meal_cache.distill import DistillConfig, distill

    path, _ = sampled_store
    config = DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=1, device="cpu")
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    assert summary["test"]["n"] == 360 and np.isfinite(summary["history"][0]["loss"])
    command = [sys.executable, "-m", "meal_cache", "distill", "--store", str(path), "--student", "resnet8_w4",
               "--method", "kd", "--temperature", "2", "--epochs", "1", "--device", "cpu", "--quiet",
               "--out", str(tmp_path / "refused")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("Error: ") and "holds classes drawn at temperature 4" in lines[0]
    assert "distill with --temperature 4" in lines[0]
    assert not (tmp_path / "refused").exists()


# The false-alarm rate of each independence check below: the chance that draws which are independent fail it.
ALPHA = 1e-6


def _dense_counts(index: np.ndarray, count: np.ndarray, classes: int) -> np.ndarray:
    """(..., slots) distinct classes and their counts as (..., classes) counts, zero where never drawn."""
    dense = np.zeros((*index.shape[:-1], classes))
    np.put_along_axis(dense, index.astype(np.int64), count.astype(np.float64), axis=-1)
    return dense


def independence_check(counts_a: np.ndarray, counts_b: np.ndarray, p_a: np.ndarray, p_b: np.ndarray,
                       k: int) -> tuple[float, float]:  # fmt: skip
    """``(S, bound)`` for two sets of K draws a row, ``counts_a`` of the softmax ``p_a`` and ``counts_b`` of
    ``p_b`` (each (N, C)): S is the sum over rows of Z = (n_a - K p_a) . (n_b - K p_b), the cross-covariance of
    the two rows' counts. Independent draws have E[Z] = 0, Var[Z] = K^2 <A, B> with A = diag(p_a) - p_a p_a^T
    (B likewise), and |Z| <= 2 K^2 (each ||n - K p||^2 <= 2 K^2); rows are independent, so Bernstein's
    inequality P(S >= t) <= exp(-t^2 / (2 (sum Var + M t / 3))) gives the ``bound`` t that independent draws
    exceed with probability at most ALPHA. Draws from one random stream (the same counts wherever p_a = p_b) have
    E[Z] = K (1 - ||p||^2) a row, far above it."""
    z = ((counts_a - k * p_a) * (counts_b - k * p_b)).sum(1)
    ab = (p_a * p_b).sum(1)
    inner = ab - (p_a * p_b**2).sum(1) - (p_a**2 * p_b).sum(1) + ab**2
    variance, largest, log_alarm = float(k**2 * inner.sum()), 2.0 * k**2, np.log(1 / ALPHA)
    bound = largest * log_alarm / 3 + np.sqrt((largest * log_alarm / 3) ** 2 + 2 * variance * log_alarm)
    return float(z.sum()), float(bound)


@pytest.fixture(scope="module", params=["digits", "digit-pairs:1000"])
def twin_stores(request, teacher_dir, tmp_path_factory):
    """A teacher and its twin (the same checkpoint under a second name, so the same logits), 2 views that are
    both the whole image (so the same logits again), 8 classes drawn a row at T = 4, and the same teachers' float32
    logits as the reference. On digits (10 classes, the 3-epoch teacher, 1,437 rows) and on digit pairs (100
    classes, a one-epoch teacher, 1,000 rows)."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    data = request.param
    root = tmp_path_factory.mktemp("twins")
    teachers = root / "teachers"
    teachers.mkdir()
    if data == "digits":
        checkpoint = teacher_dir / "resnet8_w4.pt"
    else:
        checkpoint = teachers / "trained.pt"
        train_supervised(TrainConfig(arch="resnet8_w4", data=data, epochs=1, device="cpu"), checkpoint,
                         progress=False)  # fmt: skip
    for name in ("teacher", "twin"):
        shutil.copyfile(checkpoint, teachers / f"{name}.pt")
    common = dict(teachers=["teacher", "twin"], data=data, views=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                  teacher_dir=str(teachers), preset="kd", device="cpu")  # fmt: skip
    extract(ExtractConfig(logits="sample:8", **common), root / "sampled.zarr", progress=False)
    extract(ExtractConfig(logits="all", dtype="float32", **common), root / "exact.zarr", progress=False)
    return root / "sampled.zarr", root / "exact.zarr"


def test_draws_of_two_views_and_of_two_teachers_with_the_same_logits_are_independent(twin_stores):
    """Each pair of (teacher, view) draw sets whose softmax is the same (two views of the same pixels; two teachers
    with the same weights) passes :func:`independence_check` at ALPHA = 1e-6; a set against itself, what one
    stream reused gives, fails it by far (the check has the power to see it on these rows)."""
    sampled_path, exact_path = twin_stores
    group, exact = zarr.open_group(str(sampled_path), mode="r"), open_store(exact_path)
    classes, k = exact.num_classes(), 8
    temperature = open_store(sampled_path).layout.temperature
    assert temperature == 4.0
    counts, probabilities = {}, {}
    for teacher in ("teacher", "twin"):
        index = np.asarray(group[f"teachers/{teacher}/logits_sample/index"][:])
        count = np.asarray(group[f"teachers/{teacher}/logits_sample/count"][:])
        for view in (0, 1):
            counts[teacher, view] = _dense_counts(index[view], count[view], classes)
            probabilities[teacher, view] = softmax_rows(exact.logits(teacher, view).astype(np.float64), temperature)
    # The four sets share one softmax: whatever their draws differ by is the random stream alone.
    reference = exact.logits("teacher", 0)
    assert reference.shape == (exact.n, classes) and exact.n >= 1000
    for key in probabilities:
        assert np.array_equal(exact.logits(*key), reference), key
    pairs = [(("teacher", 0), ("teacher", 1)), (("twin", 0), ("twin", 1)), (("teacher", 0), ("twin", 0)),
             (("teacher", 1), ("twin", 1)), (("teacher", 0), ("twin", 1))]  # fmt: skip
    for a, b in pairs:
        statistic, bound = independence_check(counts[a], counts[b], probabilities[a], probabilities[b], k)
        assert statistic < bound, (a, b, statistic, bound)
    statistic, bound = independence_check(counts[pairs[0][0]], counts[pairs[0][0]], probabilities[pairs[0][0]],
                                          probabilities[pairs[0][0]], k)  # fmt: skip
    assert statistic > 3 * bound, (statistic, bound)


def test_classes_never_drawn_share_at_most_the_floor_between_them():
    """Read back, the undrawn classes keep SAMPLE_FLOOR of the mass in all (finite float16 logits), at 10 and
    1,000 classes; the drawn ones keep count / K of the rest."""
    for classes in (10, 1000):
        index = np.array([[3, 7, 0, 0]], dtype=np.int16)
        count = np.array([[5, 3, 0, 0]], dtype=np.uint8)
        logits = decode_sample(index, count, classes, "float16", 4.0).astype(np.float64)
        assert np.isfinite(logits).all()
        p = softmax_rows(logits, 4.0)[0]
        undrawn = np.delete(p, [3, 7]).sum()
        assert 0 < undrawn <= SAMPLE_FLOOR * 1.01, classes  # float16 logits round the floor by under 1 %
        np.testing.assert_allclose(p[[3, 7]], np.array([5, 3]) / 8 * (1 - undrawn), rtol=2e-3)


@pytest.mark.parametrize(("logits", "temperature", "message"), [
    ("topk:-1", None, "--logits topk:K needs K, a whole number of classes a row, got 'topk:-1'"),
    ("topk:0", None, "--logits topk:K needs K of at least 1 (all: every logit), got 0"),
    ("topk:2.5", None, "--logits topk:K needs K, a whole number of classes a row, got 'topk:2.5'"),
    ("topk", None, "--logits topk:K needs K, a whole number of classes a row, got 'topk'"),
    ("sample:0", None, "--logits sample:K needs K of at least 1 (all: every logit), got 0"),
    ("sample:256", None, "--logits sample:K keeps at most 255 a row (counts are one byte), got 256"),
    ("smaple:8", None, "unknown --logits encoding 'smaple'; choose one of: sample, topk; did you mean sample?"),
    ("16", None, "--logits takes all (every logit) or NAME:K (sample:K, topk:K), got '16'"),
    ("sample:8", 0, "--logits-temperature must be a positive number, got 0"),
    ("sample:8", -1.0, "--logits-temperature must be a positive number"),
    ("topk:5", True, "--logits-temperature must be a positive number"),
])  # fmt: skip
def test_lossy_logits_options_are_refused_at_their_bounds_by_name(logits, temperature, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_logits_choice(parse_logits(logits), temperature)


def test_lossy_logits_options_accept_their_bounds():
    for logits, temperature in (("all", None), (None, None), ("topk:1", 0.5), ("sample:1", 1), ("sample:255", 4.0)):
        check_logits_choice(parse_logits(logits), temperature)
    assert parse_logits("topk:10") == LogitsChoice("topk", 10) and parse_logits("all") is None
