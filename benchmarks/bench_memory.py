"""Distill's memory against the store's bytes (issue 39): a view held in memory should cost what it costs on disk,
its stored encoding (top-k logits as classes and values, 8-bit blocks as codes and ranges), not its decoded floats.

One store of 1,000 classes, top-10 logits and 8-bit pooled blocks of a wide network (:class:`FreeNet` teachers,
``WIDEN`` times resnet8_w4's channels, so the blocks weigh what a real network's do). Distill's batch source for
meal (which reads logits and blocks) runs two epochs, in a fresh process each, once with ``--crops-per-image 1``
(the current view and the prefetched one in memory) and once with ``CROPS`` (``CROPS`` views and ``CROPS``
prefetched), every batch decoded as the step would. The figure is the peak RSS the second adds over the first, per
added view, against one view's stored bytes: about 1 when views are held as stored; a whole-view decode would give
the decoded bytes over the stored (``memory_view_decoded_mib`` over ``memory_view_stored_mib``, about 4 here: 45
for the top-10 logits, 2 for the 8-bit blocks as float16). The student's own memory does not change with the
views, so it is left out.

    python benchmarks/bench_memory.py [--out bench/memory.json] [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLASSES = 1000
CROPS = 4
WIDEN = 32
MEMORY_TARGETS = {"distill_rss_per_view_bytes_ratio": ("<=", 3.0)}
MEMORY_REPORTED = ("memory_view_stored_mib", "memory_view_decoded_mib", "distill_feed_peak_growth_mib_crops1",
                   f"distill_feed_peak_growth_mib_crops{CROPS}")  # fmt: skip


def memory_store(work: Path, rows: int) -> Path:
    """``rows`` 8-px images over 1,000 classes (the digits, tiled), a free teacher's 8-view store of them."""
    from bench_host import free_teachers, host_teacher
    from sklearn.datasets import load_digits

    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    digits = load_digits()
    picked = np.arange(rows) % len(digits.images)
    images = (digits.images[picked] * 15).astype(np.uint8)
    labels = np.arange(rows) % CLASSES
    split = (np.arange(rows) % 10 == 0).astype(np.int64)  # every tenth row a test row
    np.savez(work / "memory.npz", images=images, labels=labels, split=split)
    data = f"npz:{work / 'memory.npz'}"
    teacher = host_teacher(work / "memory-teachers", data, 8)
    store = work / "memory.zarr"
    config = ExtractConfig(teachers=[teacher], data=data, views=2 * CROPS, teacher_dir=str(work / "memory-teachers"),
                           device="cpu", features=["blocks"], quantize=8, logits="topk:10", workers=0,
                           batch_size=512, rows_per_chunk=4096)  # fmt: skip
    with free_teachers(widen=WIDEN):
        extract(config, store, progress=False)
    return store


def feed_peak_growth(store: Path, keys: list[str], crops: int) -> int:
    """Bytes of peak RSS that distill's batch source adds over two epochs of ``crops`` views each (the next
    epoch's views prefetched, every batch's rows decoded), in a fresh process: its peak is reset (Linux's
    ``clear_refs``) once the store is open, so opening and checking the store, which any run does whatever it
    holds, is left out."""
    script = f"""
import torch
from meal_cache.distill import DistillConfig, make_batch_source
from meal_cache.store import open_store

def status(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) * 1024

store = open_store({str(store)!r})
config = DistillConfig(store={str(store)!r}, student="resnet8_w4", batch_size={64 * crops},
                       crops_per_image={crops})
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before = status("VmRSS:")
source = make_batch_source(config, store, {keys!r}, torch.device("cpu"))
for epoch in range(2):
    views = [(epoch * {crops} + crop) % store.num_views for crop in range({crops})]
    following = [((epoch + 1) * {crops} + crop) % store.num_views for crop in range({crops})]
    batches = source.epoch(epoch, views, following) if {crops} > 1 else source.epoch(epoch, views[0], following[0])
    for batch in batches:
        pass
source.close()
print(status("VmHWM:") - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"the batch source of {crops} crops failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def bench_memory(work: Path, rows: int = 20000) -> dict:
    """Peak RSS per added view of distill's multi-crop against the view's stored bytes (see the module's text)."""
    from meal_cache.distill.feed import view_bytes
    from meal_cache.store import open_store
    from meal_cache.store.keys import feature_key, logits_key

    store_path = memory_store(work, rows)
    store = open_store(store_path)
    teacher = store.teacher_names[0]
    keys = [logits_key(teacher)] + [feature_key(teacher, "blocks", b.key) for b in store.blocks(teacher)]
    per_view = view_bytes(store, keys)
    # What a whole-view decode would hold: every class's logit and every block channel as float16.
    decoded_row_bytes = 2 * (CLASSES + sum(block.channels for block in store.blocks(teacher)))
    one = feed_peak_growth(store_path, keys, 1)
    many = feed_peak_growth(store_path, keys, CROPS)
    added_views = 2 * CROPS - 2
    return {
        "memory_rows": rows, "memory_classes": CLASSES, "memory_view_stored_mib": per_view / 2**20,
        "memory_view_decoded_mib": store.n * decoded_row_bytes / 2**20,
        "distill_feed_peak_growth_mib_crops1": one / 2**20,
        f"distill_feed_peak_growth_mib_crops{CROPS}": many / 2**20,
        "distill_rss_per_view_bytes_ratio": (many - one) / (added_views * per_view),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/memory.json")
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = bench_memory(Path(work), args.rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
