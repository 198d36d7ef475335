"""`meal-cache info STORE --fidelity REFERENCE`: a lossy store's targets against a lossless store's, no training."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import zarr
from by_hand import topk_rebuilt

from meal_cache.errors import UserError
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.store import open_store


@pytest.fixture(scope="module")
def lossy_stores(small_store, digits, tmp_path_factory):
    """The small store's settings with 8-bit blocks and maps, and with another view seed."""
    path, config = small_store
    folder = tmp_path_factory.mktemp("lossy")
    for name, overrides in (("q8", {"quantize": 8}), ("seed", {"seed": 7, "views": 1, "identity_view": False})):
        extract(dataclasses.replace(config, **overrides), folder / f"{name}.zarr", progress=False, dataset=digits)
    return folder


def _kl(reference: np.ndarray, lossy: np.ndarray, temperature: float) -> float:
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(lossy)
    return float((np.exp(p) * (p - q)).sum(1).mean())


def test_a_store_against_itself_is_exact(small_store):
    path, _ = small_store
    result = store_fidelity(str(path), str(path))
    for summary in result["teachers"].values():
        assert summary["kl"] == {"T=1": 0.0, "T=4": 0.0} and summary["top1_agreement"] == 100.0
        assert summary["blocks"] and all(b["relative_l2"] == 0.0 for b in summary["blocks"].values())
        assert all(b["soft_ce_change"] == 0.0 for k, b in summary["blocks"].items() if k.startswith("maps/"))


def test_8bit_blocks_against_float16_match_a_hand_computation(small_store, lossy_stores):
    path, _ = small_store
    reference, lossy = open_store(path), open_store(lossy_stores / "q8.zarr")
    result = store_fidelity(str(lossy_stores / "q8.zarr"), str(path))
    assert set(result["teachers"]) == {"resnet8_w4", "densenet_k12"} and result["views"] == 3
    for teacher, summary in result["teachers"].items():
        # Logits stay float16 in an 8-bit store: the soft targets are the reference's.
        assert summary["kl"]["T=4"] == pytest.approx(0.0, abs=1e-12) and summary["top1_agreement"] == 100.0
        for key, values in summary["blocks"].items():
            kind_block = f"teachers/{teacher}/{key}"
            ref = np.concatenate([reference.read(kind_block, v) for v in range(3)]).astype(np.float64)
            low = np.concatenate([lossy.read(kind_block, v) for v in range(3)]).astype(np.float64)
            expected = np.linalg.norm(low - ref) / np.linalg.norm(ref)
            assert values["relative_l2"] == pytest.approx(expected, rel=1e-6), key
            assert 0 < values["relative_l2"] < 0.02, key  # half a step of 255 per row's range
        assert summary["rows"] == 3 * reference.n
    # The KL of logits that do differ, against the same formula written out: KL(reference || lossy), not reversed.
    ref_logits = reference.logits("resnet8_w4", 0).astype(np.float64)
    noisy = ref_logits + np.random.default_rng(0).normal(0, 0.5, ref_logits.shape)
    from meal_cache.fidelity import _Sums

    sums = _Sums()
    sums.add_logits(noisy, ref_logits)
    assert sums.kl[4.0] / sums.rows == pytest.approx(_kl(ref_logits, noisy, 4.0), rel=1e-9)
    assert sums.kl[1.0] / sums.rows != pytest.approx(_kl(noisy, ref_logits, 1.0), rel=1e-3)


@pytest.fixture(scope="module")
def top3_store(small_store, digits, tmp_path_factory):
    """The small store's rows and views for one of its teachers, logits only, with only each row's 3 largest logits
    kept (of 10 classes): what the fidelity of top-k logits is measured on, at the least extraction cost."""
    path, config = small_store
    out = tmp_path_factory.mktemp("top3") / "top3.zarr"
    top3 = dataclasses.replace(config, teachers=["resnet8_w4"], preset="kd", logits="topk:3")
    extract(top3, out, progress=False, dataset=digits)
    return out


def test_top_k_logits_kl_at_1_and_4_match_a_hand_computation(small_store, top3_store):
    """The KL at T = 1 and at T = 4 of a top-3 store against the full logits, each against the formula written out
    here from the two stores' raw arrays (zarr alone): KL(softmax(full / T) || softmax(rebuilt / T)), averaged over
    every row of every view."""
    path, _ = small_store
    result = store_fidelity(str(top3_store), str(path))
    full_group, top_group = zarr.open_group(str(path), mode="r"), zarr.open_group(str(top3_store), mode="r")
    assert result["views"] == 3 and list(result["teachers"]) == ["resnet8_w4"]
    for teacher, summary in result["teachers"].items():
        full = np.asarray(full_group[f"teachers/{teacher}/logits"][:])  # (V, N, C)
        parts = [np.asarray(top_group[f"teachers/{teacher}/logits_topk/{p}"][:]) for p in ("index", "value", "lse")]
        made_at = top_group.attrs["layout"]["logits_temperature"]
        rebuilt = topk_rebuilt(*parts, classes=full.shape[-1], temperature=made_at)
        flat_full, flat_rebuilt = full.reshape(-1, full.shape[-1]), rebuilt.reshape(-1, full.shape[-1])
        expected = {t: _kl(flat_full, flat_rebuilt, t) for t in (1.0, 4.0)}
        # The two temperatures give clearly different values, so one computed at the other's temperature shows.
        assert max(expected.values()) > 2 * min(expected.values()) > 0, expected
        assert summary["kl"]["T=1"] == pytest.approx(expected[1.0], rel=1e-6), teacher
        assert summary["kl"]["T=4"] == pytest.approx(expected[4.0], rel=1e-6), teacher
        # The largest logit is stored as it is, so the top-1 never moves.
        assert summary["rows"] == len(flat_full) and summary["top1_agreement"] == 100.0
        assert (flat_rebuilt.argmax(1) == flat_full.argmax(1)).all()


def test_stores_of_other_views_are_refused(small_store, lossy_stores):
    path, _ = small_store
    with pytest.raises(UserError, match="other views"):
        store_fidelity(str(lossy_stores / "seed.zarr"), str(path))
    result = subprocess.run([sys.executable, "-m", "meal_cache", "info", str(lossy_stores / "seed.zarr"),
                             "--fidelity", str(path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2 and len(errors) == 1 and "other views" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    shown = subprocess.run([sys.executable, "-m", "meal_cache", "info", str(lossy_stores / "q8.zarr"), "--fidelity",
                            str(path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0 and "top-1 agreement 100.00%" in shown.stdout and "relative L2" in shown.stdout


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_the_soft_ce_change_of_8bit_maps_is_the_mean_absolute_change_of_both_signs(small_store, lossy_stores):
    """Per maps array, the soft-ce change is the mean over rows of |CE(lossy map, reference) - CE(reference,
    reference)|, the reference map standing in for the student, written out here in float64 from both stores' maps.
    8-bit rounding moves some rows' loss up and others' down, so a signed sum would cancel to a fraction of it."""
    path, _ = small_store
    reference, lossy = open_store(path), open_store(lossy_stores / "q8.zarr")
    result = store_fidelity(str(lossy_stores / "q8.zarr"), str(path))
    for teacher, summary in result["teachers"].items():
        maps = [key for key in summary["blocks"] if key.startswith("maps/")]
        assert maps, teacher
        for key in maps:
            array = f"teachers/{teacher}/{key}"
            ref = np.concatenate([reference.read(array, v) for v in range(3)]).astype(np.float64)
            low = np.concatenate([lossy.read(array, v) for v in range(3)]).astype(np.float64)
            ref, low = ref.reshape(len(ref), -1), low.reshape(len(low), -1)
            student = _log_softmax(ref)
            change = -(np.exp(_log_softmax(low)) * student).sum(1) + (np.exp(student) * student).sum(1)
            assert (change > 0).mean() > 0.1 and (change < 0).mean() > 0.1, key  # both signs, often
            assert abs(change.mean()) < 0.5 * np.abs(change).mean(), key
            assert summary["blocks"][key]["soft_ce_change"] == pytest.approx(np.abs(change).mean(), rel=1e-6), key
