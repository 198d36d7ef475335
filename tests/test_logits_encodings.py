"""A compact logits encoding is one module of meal_cache/store/encodings: the store creates, writes, reads,
checks and describes its arrays from the :class:`LogitsEncoding` fields alone. Here one made in the test (the top
k renormalised, without the log-sum-exp) is extracted to, read back, described and distilled from."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import meal_cache.store.logits as store_logits
from meal_cache.distill import DistillConfig
from meal_cache.distill.run import distill
from meal_cache.errors import UserError
from meal_cache.extract.run import extract
from meal_cache.store import describe_store, open_store
from meal_cache.store.encodings import LogitsEncoding

GAP = 30.0  # how far below the row's smallest kept logit every other class is put back


def _encode(logits, k, dtype, temperature, rng):
    order = np.argsort(-logits.astype(np.float32), axis=1, kind="stable")[:, :k]
    return {"index": order.astype(np.int16), "value": np.take_along_axis(logits, order, axis=1).astype(dtype)}


def _decode(parts, classes, dtype, temperature):
    value = parts["value"].astype(np.float64)
    dense = np.repeat(value.min(1, keepdims=True) - GAP, classes, axis=1)
    np.put_along_axis(dense, parts["index"].astype(np.int64), value, axis=1)
    return dense.astype(dtype)


RENORM = LogitsEncoding(
    name="renorm", parts=(("index", "int16", True), ("value", None, True)), encode=_encode, decode=_decode,
    description="the top {k} logits, renormalised", kept="top {k} renormalised", top1="top-1",
    help="the K largest logits", max_k=12, max_k_reason="a test's bound",
)  # fmt: skip


@pytest.fixture
def with_renorm(monkeypatch):
    found = {**store_logits.logits_encodings(), "renorm": RENORM}
    monkeypatch.setattr(store_logits, "logits_encodings", lambda: found)


def test_an_encoding_of_ones_own_is_stored_read_described_and_distilled(with_renorm, small_store, digits, tmp_path):
    path, config = small_store
    out = tmp_path / "renorm.zarr"
    extract(dataclasses.replace(config, teachers=["resnet8_w4"], logits="renorm:3"), out, progress=False,
            dataset=digits)  # fmt: skip
    store, full = open_store(out), open_store(path)
    assert sorted(store.group["teachers/resnet8_w4"].keys())[:2] == ["blocks", "logits_renorm"]
    assert store.group["teachers/resnet8_w4/logits_renorm/index"].shape == (store.num_views, store.n, 3)
    # Read back: the three largest of the teacher's own logits where they were, every other class 30 below them.
    for view in range(store.num_views):
        teacher = full.logits("resnet8_w4", view).astype(np.float64)
        top = np.sort(teacher, axis=1)[:, -3:]
        read = store.logits("resnet8_w4", view).astype(np.float64)
        np.testing.assert_array_equal(np.sort(read, axis=1)[:, -3:], top)
        np.testing.assert_array_equal(read.argmax(1), teacher.argmax(1))
        assert np.allclose(np.sort(read, axis=1)[:, :-3], top[:, :1] - GAP, atol=0.05)
    described = describe_store(store)
    assert "top 3 renormalised at T=4" in described and "the top 3 logits, renormalised" in described
    summary = distill(DistillConfig(store=str(out), student="resnet8_w4", method="kd", epochs=1, device="cpu"),
                      tmp_path / "run", progress=False, dataset=digits)  # fmt: skip
    assert (tmp_path / "run" / "student.pt").exists() and len(summary["history"]) == 1


def test_an_encodings_own_bound_on_k_is_refused_by_name(with_renorm, small_store, digits, tmp_path):
    path, config = small_store
    with pytest.raises(UserError, match=r"--logits renorm:K keeps at most 12 a row \(a test's bound\), got 13"):
        extract(dataclasses.replace(config, logits="renorm:13"), tmp_path / "x.zarr", progress=False, dataset=digits)
    with pytest.raises(UserError, match="--logits renorm:11 keeps more than teacher resnet8_w4's 10 classes"):
        extract(dataclasses.replace(config, logits="renorm:11", teachers=["resnet8_w4"]), tmp_path / "y.zarr",
                progress=False, dataset=digits)  # fmt: skip
