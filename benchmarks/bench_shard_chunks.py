"""`make bench`'s sharding section (issue 41, ``extract --shard-chunks K``): objects a view with and without Zarr
sharding, and how fast distill's read of whole views goes from the sharded store against the plain one.

- ``store_objects_per_view``, ``store_objects_per_view_sharded``: data objects (chunk or shard files; the
  ``zarr.json`` metadata and the one ``labels`` chunk left out) of a local store, divided by its views, for the
  same extract (digits' resnet8_w4 teacher, logits and both feature kinds of its 3 blocks, ``ROWS`` rows in
  ``CHUNK_ROWS``-row chunks, ``VIEWS`` views) without and with ``--shard-chunks SHARD_CHUNKS``.
- ``distill_read_sharded_vs_plain``: rows a second reading every view's logits of every teacher (what distill
  loads per epoch, view by view) from the sharded store, over the same from the plain one; best of ``READS``
  passes each, in turn.
"""

from __future__ import annotations

import time
from pathlib import Path

from meal_cache.data.datasets import ImageDataset, Split, load_dataset
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store.teacher_store import open_store

# The cheapest fixture teacher (densenet_k12's many small layers would triple the run on a 2-core CPU): the objects
# a view scale with the teachers' arrays, the read rate not at all.
TEACHERS = ("resnet8_w4",)
ROWS, CHUNK_ROWS, VIEWS, SHARD_CHUNKS, READS = 512, 16, 4, 8, 20


def _objects_per_view(store: Path, views: int) -> float:
    data = [p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json" and "labels" not in p.parts]
    return len(data) / views


def _read_pass(store) -> float:
    """Seconds to read every view's logits of every teacher of ``store`` once, as distill loads them."""
    start = time.perf_counter()
    for teacher in store.teacher_names:
        for view in range(store.num_views):
            store.logits(teacher, view)
    return time.perf_counter() - start


def _read_ratio(sharded: Path, plain: Path) -> float:
    """Rows a second from ``sharded`` over rows a second from ``plain`` (the same rows), best of ``READS`` passes
    each, taken in turn so that whatever else the machine runs slows both alike."""
    stores = open_store(sharded), open_store(plain)
    best = [float("inf"), float("inf")]
    for _ in range(READS):
        for which, store in enumerate(stores):
            best[which] = min(best[which], _read_pass(store))
    return best[1] / best[0]


def bench_shard_chunks(workdir: str | Path) -> dict:
    """Extract the same small store without and with sharding under ``workdir``; its objects a view and the
    read rate's ratio (see the module's docstring)."""
    work = Path(workdir)
    teachers = work / "shard_teachers"
    teachers.mkdir(parents=True, exist_ok=True)
    digits = load_dataset("digits")
    few = ImageDataset(**{**digits.__dict__, "train": Split(digits.train.images[:ROWS], digits.train.labels[:ROWS])})
    for arch in TEACHERS:  # one epoch on those rows: the logits' values do not matter here, only their bytes
        if not (teachers / f"{arch}.pt").exists():
            train_supervised(TrainConfig(arch=arch, epochs=1, device="cpu"), teachers / f"{arch}.pt",
                             progress=False, dataset=few)  # fmt: skip
    config = dict(teachers=list(TEACHERS), views=VIEWS, teacher_dir=str(teachers), rows_per_chunk=CHUNK_ROWS,
                  batch_size=128, device="cpu")  # fmt: skip
    plain, sharded = work / "shard_plain.zarr", work / "shard_sharded.zarr"
    extract(ExtractConfig(**config), plain, overwrite=True, progress=False, dataset=few)
    extract(ExtractConfig(**config, shard_chunks=SHARD_CHUNKS), sharded, overwrite=True, progress=False, dataset=few)
    return {
        "store_objects_per_view": _objects_per_view(plain, VIEWS),
        "store_objects_per_view_sharded": _objects_per_view(sharded, VIEWS),
        "distill_read_sharded_vs_plain": _read_ratio(sharded, plain),
    }


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = bench_shard_chunks(sys.argv[1] if len(sys.argv) > 1 else scratch)
        print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}, indent=1))
