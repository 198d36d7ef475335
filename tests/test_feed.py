from __future__ import annotations

import numpy as np
import torch

from meal_cache.distill import DistillConfig, InMemoryBatches, StreamingBatches, ViewFeed, make_batch_source, view_bytes
from meal_cache.store import open_store


def _collect(source, epoch=0, view=1):
    rows, targets = [], []
    for batch_rows, batch_targets in source.epoch(epoch, view, None):
        rows.append(batch_rows)
        targets.append(batch_targets)
    source.close()
    return rows, targets


def test_streaming_serves_every_row_with_its_own_targets(small_store):
    path, _ = small_store
    store = open_store(path)
    keys = ["teachers/resnet8_w4/logits", "teachers/densenet_k12/maps/features.denseblock3"]
    stream = StreamingBatches(store, keys, torch.device("cpu"), batch_size=100, seed=0, buffer_chunks=2)
    rows, targets = _collect(stream)
    assert len(rows) == 1437 // 100 and all(len(r) == 100 for r in rows)
    served = torch.cat(rows)
    assert len(set(served.tolist())) == len(served)  # no row twice
    for key in keys:
        stored = store.array(key)[1]
        got = torch.cat([t[key] for t in targets]).numpy()
        assert np.array_equal(got, stored[served.numpy()])
    # Shuffled across chunk boundaries, not served in chunk order.
    assert not torch.equal(served, torch.sort(served).values)


def test_in_memory_and_streaming_give_the_same_number_of_steps(small_store):
    path, _ = small_store
    store = open_store(path)
    keys = ["teachers/resnet8_w4/logits"]
    memory = InMemoryBatches(ViewFeed(store, keys, torch.device("cpu")), store.n, 64, seed=3)
    in_memory_rows, _ = _collect(memory)
    stream_rows, _ = _collect(StreamingBatches(store, keys, torch.device("cpu"), 64, 3, buffer_chunks=1))
    assert len(in_memory_rows) == len(stream_rows) == 1437 // 64


def test_max_memory_chooses_the_source(small_store):
    path, _ = small_store
    store = open_store(path)
    keys = ["teachers/resnet8_w4/logits", "teachers/resnet8_w4/maps/layer1"]
    assert view_bytes(store, keys) == 1437 * (10 + 256) * 2
    roomy = make_batch_source(DistillConfig(store=str(path), student="resnet8", max_memory="1GB"), store, keys,
                              torch.device("cpu"))  # fmt: skip
    tight = make_batch_source(DistillConfig(store=str(path), student="resnet8", max_memory="400kB"), store, keys,
                              torch.device("cpu"))  # fmt: skip
    assert isinstance(roomy, InMemoryBatches) and isinstance(tight, StreamingBatches)
    assert tight.buffer_chunks == 400_000 // (2 * (view_bytes(store, keys) // store.n_chunks))
    roomy.close()
    tight.close()
