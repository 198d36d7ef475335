"""Sampled logits (count / K) serve only losses linear in the soft target (issue 44): distill refuses DKD's parts
and the output discriminator from a sampled store, extract refuses a dense sampled store, and the soft term a
sampled store trains with is logged as its cross-entropy, whose value the draws estimate without bias."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from console import one_error_line, one_error_line_in_process, run_console

from meal_cache.distill import DistillConfig, distill, method_class, soft_target_sets
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.losses import kd_kl
from meal_cache.nets.models import create_model
from meal_cache.store import open_store
from meal_cache.store.encodings.sample import decode_sample, encode_sample, softmax_rows

LOGITS = np.array([[5.0, 3.0, 2.5, 0.0, -1.0, -3.0, 1.0, 0.5, 0.2, -0.4],
                   [0.0, 0.2, -0.3, 4.0, 3.8, 0.0, -2.0, 1.0, 0.6, -1.2]])  # fmt: skip


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory, teacher_dir, digits):
    """One teacher's logits as 8 classes drawn at T = 4, one view of digits."""
    out = tmp_path_factory.mktemp("sampled-refusals") / "sampled.zarr"
    config = ExtractConfig(teachers=["resnet8_w4"], views=1, preset="kd", logits="sample:8",
                           teacher_dir=str(teacher_dir), batch_size=512, device="cpu")  # fmt: skip
    extract(config, out, progress=False, dataset=digits)
    return out


@pytest.mark.parametrize(("options", "reason"), [
    (["--method", "dkd"], "--soft-loss dkd renormalises the teacher's non-target probabilities"),
    (["--method", "kd", "--soft-loss", "dkd"], "--soft-loss dkd renormalises the teacher's non-target probabilities"),
    (["--method", "meal-v2"], "the output discriminator would learn count histograms"),
    (["--method", "kd", "--discriminators", "output"], "the output discriminator would learn count histograms"),
])  # fmt: skip
def test_distill_refuses_what_counts_cannot_estimate_in_one_line(sampled_store, tmp_path, options, reason):
    out = tmp_path / "refused"
    # In this process: the extract refusal below starts the console script.
    line = one_error_line_in_process(["distill", "--store", str(sampled_store), "--student", "resnet8_w4", "--epochs",
                                      "1", "--device", "cpu", "--quiet", "--out", str(out), *options])  # fmt: skip
    assert "holds 8 classes drawn a row, read back as count / 8" in line and reason in line, line
    assert "extract with --logits topk:K (or all)" in line, line
    assert not out.exists()


def test_the_refusal_is_each_configs_own(sampled_store):
    """Linear soft labels (kd, its cross-entropy, the block terms) pass; DKD's parts and an output discriminator
    with a weight do not, and leaving out the term that reads the logits otherwise lets the config pass."""

    def refusal(method: str, **settings) -> str | None:
        config = DistillConfig(store=str(sampled_store), student="resnet8_w4", method=method, **settings).resolved()
        return method_class(method).sampled_logits_refusal(config)

    assert refusal("kd") is None and refusal("kd", hard_weight=1.0, soft_loss="soft-ce") is None
    assert refusal("meal-v2", adv_weight=0.0) is None
    assert refusal("meal", discriminators="blocks", soft_loss="kl") is None
    assert "renormalises" in refusal("meal", discriminators="blocks")  # meal's default soft loss is DKD's
    assert refusal("dkd", soft_weight=0.0) is None  # cross-entropy alone reads no soft labels
    assert "renormalises" in refusal("dkd") and "renormalises" in refusal("meal", soft_loss="dkd", adv_weight=0.0)
    assert "output discriminator" in refusal("meal", soft_loss="kl") and "output discriminator" in refusal("meal-v2")


def test_extract_refuses_a_dense_store_of_sampled_logits_before_creating_it(tmp_path):
    out = tmp_path / "dense.zarr"
    # Refused with the other settings' checks, before a teacher is looked for.
    line = one_error_line(run_console(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(tmp_path),
                                       "--dense", "--logits", "sample:8", "--device", "cpu", "--out", str(out)],
                                      tmp_path))  # fmt: skip
    assert "--dense derives a crop's logits by averaging" in line and "--logits sample:8 stores an estimate" in line
    assert "pass --logits topk:K or all" in line, line
    assert not out.exists()


def test_the_logged_soft_term_of_a_sampled_store_estimates_the_dense_cross_entropy(sampled_store):
    """kd's soft term from a sampled store is logged as ``soft_ce``: over 4,000 draws of K = 8 at T = 4 its mean is
    the student's T^2 cross-entropy against the teacher's dense softmax within four standard errors of that mean.
    KL against the same draws is not an estimate of the dense KL: its mean misses by more than ten."""
    temperature, k, draws = 4.0, 8, 4000
    config = DistillConfig(store=str(sampled_store), student="resnet8_w4", method="kd").resolved()
    torch.manual_seed(0)
    distiller = method_class("kd")(create_model("resnet8_w4", 10, 16), config, open_store(sampled_store), 16)
    student = torch.tensor([[1.0, 0.5, 0.0, 0.2, -0.5, 0.1, 0.3, -1.0, 0.4, 0.0],
                            [0.3, 0.0, 0.1, 1.0, 0.5, 0.2, 0.0, 0.4, -0.2, 0.1]])  # fmt: skip
    labels = torch.tensor([0, 3])
    encoded = encode_sample(np.tile(LOGITS, (draws, 1)), k, temperature, np.random.default_rng(3))
    read_back = torch.from_numpy(decode_sample(encoded["index"], encoded["count"], 10, "float32", temperature))
    logged, kl = [], []
    for draw in read_back.view(draws, 2, 10):
        soft_sets = soft_target_sets(config, [draw])
        named = distiller.label_losses(student, soft_sets, labels)
        assert set(named) == {"soft_ce"}
        logged.append(float(named["soft_ce"]))
        kl.append(float(kd_kl(student, soft_sets[0], temperature)))
    dense = softmax_rows(LOGITS, temperature)
    log_student = F.log_softmax(student.double() / temperature, dim=1).numpy()
    dense_ce = temperature**2 * -(dense * log_student).sum(1).mean()
    dense_kl = temperature**2 * (dense * (np.log(dense) - log_student)).sum(1).mean()
    logged, kl = np.array(logged), np.array(kl)
    stderr = logged.std() / np.sqrt(draws)
    assert abs(logged.mean() - dense_ce) <= 4 * stderr + 1e-4, (logged.mean(), dense_ce, stderr)
    assert abs(kl.mean() - dense_kl) > 10 * kl.std() / np.sqrt(draws), (kl.mean(), dense_kl)


def test_a_run_from_a_sampled_store_records_soft_ce(sampled_store, digits, tmp_path):
    config = DistillConfig(store=str(sampled_store), student="resnet8_w4", method="kd", epochs=1, device="cpu")
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "soft_ce" in record and "soft" not in record and np.isfinite(record["soft_ce"])
    assert summary["history"][0]["soft_ce"] == record["soft_ce"]
