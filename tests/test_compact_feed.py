"""Distill holds a view as stored and decodes each batch (issue 39): at 1,000 classes a top-10 or 16-draw view costs
its stored bytes in memory, not 1,000 float16 logits a row, and every batch's targets equal what the store reads
back (the numpy decoders, pinned against the papers' formulas in tests/test_topk.py and tests/test_sampled.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from meal_cache.distill import DistillConfig, InMemoryBatches, StreamingBatches, ViewFeed, distill, make_batch_source
from meal_cache.distill.feed import StoredRows, view_bytes
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store import open_store
from meal_cache.store.keys import feature_key, logits_key

CLASSES = 1000
# By hand (docs/store-format.md): a top-k slot is an int16 class and a float16 value, plus one float32 log-sum-exp
# a row; a draw slot an int16 class and a uint8 count.
TOP_10_ROW_BYTES = 10 * (2 + 2) + 4
SAMPLE_16_ROW_BYTES = 16 * (2 + 1)
DENSE_ROW_BYTES = CLASSES * 2


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """2,000 digits relabelled over 1,000 classes (two rows a class, one of them held out), a teacher trained on
    them, and stores of its top-10 and of 16 draws with 8-bit blocks."""
    root = tmp_path_factory.mktemp("thousand")
    digits = load_digits()
    rows = 2 * CLASSES
    images = (digits.images[np.arange(rows) % len(digits.images)] * 15).astype(np.uint8)
    labels = np.arange(rows) % CLASSES
    split = (np.arange(rows) >= CLASSES).astype(np.int64)  # the second row of each class is its test row
    np.savez(root / "thousand.npz", images=images, labels=labels, split=split)
    data = f"npz:{root / 'thousand.npz'}"
    teachers = root / "teachers"
    train_supervised(TrainConfig(arch="resnet8_w4", data=data, epochs=1, device="cpu"), teachers / "resnet8_w4.pt",
                     progress=False)  # fmt: skip
    base = ExtractConfig(teachers=["resnet8_w4"], data=data, views=2, teacher_dir=str(teachers), device="cpu",
                         features=["blocks"], quantize=8, rows_per_chunk=256, workers=0)  # fmt: skip
    stores = {}
    for logits in ("topk:10", "sample:16"):
        stores[logits] = root / f"{logits.replace(':', '')}.zarr"
        extract(dataclasses.replace(base, logits=logits), stores[logits], progress=False)
    return stores, data


def _keys(store) -> list[str]:
    teacher = store.teacher_names[0]
    return [logits_key(teacher)] + [feature_key(teacher, "blocks", b.key) for b in store.blocks(teacher)]


@pytest.mark.parametrize("logits", ["topk:10", "sample:16"])
def test_each_batch_decodes_to_what_the_store_reads(thousand, logits):
    stores, _ = thousand
    store = open_store(stores[logits])
    keys = _keys(store)
    assert store.layout.quantize == 8 and str(store.layout.logits) == logits
    held = StoredRows.read(store, keys, 1)
    rows = torch.randperm(store.n, generator=torch.Generator().manual_seed(0))[:300]
    for key, value in held.decoded(rows).items():
        expected = store.read(key, 1)[rows.numpy()]
        assert value.dtype == torch.float16 and value.shape == expected.shape
        np.testing.assert_array_equal(value.numpy(), expected, err_msg=key)


@pytest.mark.parametrize(("logits", "row_bytes"), [("topk:10", TOP_10_ROW_BYTES), ("sample:16", SAMPLE_16_ROW_BYTES)])
def test_a_view_in_memory_costs_its_stored_bytes(thousand, logits, row_bytes):
    stores, _ = thousand
    store = open_store(stores[logits])
    key = logits_key(store.teacher_names[0])
    feed = ViewFeed(store, [key], torch.device("cpu"))
    assert feed.get(0).nbytes() == view_bytes(store, [key]) == store.n * row_bytes
    feed.close()
    assert row_bytes * 40 < DENSE_ROW_BYTES
    # Two stored views fit 40 times less memory than two dense ones: --max-memory then keeps them in memory.
    config = DistillConfig(store=str(stores[logits]), student="resnet8_w4", max_memory=str(2 * store.n * row_bytes))
    roomy = make_batch_source(config, store, [key], torch.device("cpu"))
    tight = make_batch_source(dataclasses.replace(config, max_memory=str(store.n * row_bytes)), store, [key],
                              torch.device("cpu"))  # fmt: skip
    assert isinstance(roomy, InMemoryBatches) and isinstance(tight, StreamingBatches)
    streamed = [targets[key] for _, targets in tight.epoch(0, 1, None)]
    assert all(t.shape[1:] == (CLASSES,) and t.dtype == torch.float16 for t in streamed)
    roomy.close()
    tight.close()


def test_a_thousand_class_top_10_store_distills(thousand, tmp_path):
    stores, _ = thousand
    config = DistillConfig(store=str(stores["topk:10"]), student="resnet8_w4", method="kd", epochs=1, device="cpu",
                           workers=0, crops_per_image=2)  # fmt: skip
    summary = distill(config, tmp_path / "run", progress=False)
    record = summary["history"][0]
    assert record["steps"] == 1000 // 32 and np.isfinite(record["soft"])


@pytest.mark.parametrize("classes", [100, CLASSES])
def test_the_tensor_decoders_equal_the_numpy_ones_on_confident_and_flat_rows(classes):
    """Rows from a teacher so confident that the top 10 hold all but a rounded-off remainder (the floor of a
    millionth engages), flat rows, and drawn rows: decoded on tensors exactly as the store's numpy decoders do."""
    from meal_cache.store.encodings import sample, topk

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, classes)) * np.linspace(0.1, 3, 64)[:, None]
    logits[:16, 0] += 60.0  # every other class below exp(-60 / 4) of it at T = 4
    logits = logits.astype(np.float16)
    parts = topk.encode_topk(logits, 10, "float16", 4.0)
    expected = topk.decode_topk(parts["index"], parts["value"], parts["lse"], classes, "float16", 4.0)
    tensors = {name: torch.from_numpy(value) for name, value in parts.items()}
    got = topk.decode_topk_tensors(tensors["index"], tensors["value"], tensors["lse"], classes, torch.float16, 4.0)
    np.testing.assert_array_equal(got.numpy(), expected)
    drawn = sample.encode_sample(logits, 16, 4.0, rng)
    expected = sample.decode_sample(drawn["index"], drawn["count"], classes, "float16", 4.0)
    got = sample.decode_sample_tensors(torch.from_numpy(drawn["index"]), torch.from_numpy(drawn["count"]), classes,
                                       torch.float16, 4.0)  # fmt: skip
    np.testing.assert_array_equal(got.numpy(), expected)
