"""Zarr sharding (issue 41, ``extract --shard-chunks K``): a sharded store holds an unsharded one's values, array for
array, in about K times fewer objects; its unit of work is a whole shard, so a writer killed inside one leaves it
unmarked and the resumed extract writes it again whole; a damaged shard is found by verify, named, and re-extracted
alone by repair; it grows by views and by teachers and distills as the unsharded store does; a bad K is one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from by_hand import store_arrays
from console import one_error_line, run_console
from extract_order import extract_recording_units

import meal_cache.extract.run as extract_module
import meal_cache.store.teacher_store as teacher_store_module
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store import open_store, repair_store, verify_store
from meal_cache.store.describe import describe_store

TEACHERS = ["resnet8_w4", "densenet_k12"]
ROWS, CHUNK_ROWS, K = 320, 32, 4  # 10 chunks of rows a view: shards of 4, 4 and 2 chunks
SHARDS = math.ceil(ROWS / (CHUNK_ROWS * K))


def _first_rows(dataset, rows: int):
    from meal_cache.data.datasets import ImageDataset, Split

    train = Split(dataset.train.images[:rows], dataset.train.labels[:rows])
    return ImageDataset(**{**dataset.__dict__, "train": train})


@pytest.fixture(scope="module")
def few(digits):
    return _first_rows(digits, ROWS)


def _config(teacher_dir, **changes) -> ExtractConfig:
    # Sampled logits (drawn chunk by chunk), 8-bit blocks and maps (with their ranges): every kind of array a unit
    # writes; a batch that does not divide the chunk.
    settings = dict(teachers=TEACHERS, views=2, teacher_dir=str(teacher_dir), rows_per_chunk=CHUNK_ROWS,
                    batch_size=24, device="cpu", logits="sample:4", quantize=8)  # fmt: skip
    return ExtractConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def plain_and_sharded(tmp_path_factory, teacher_dir, few):
    """The same extract into a store of one object a chunk and one of K chunks a shard."""
    folder = tmp_path_factory.mktemp("shards")
    plain, sharded = folder / "plain.zarr", folder / "sharded.zarr"
    extract(_config(teacher_dir), plain, progress=False, dataset=few)
    extract(_config(teacher_dir, shard_chunks=K), sharded, progress=False, dataset=few)
    return plain, sharded


def _objects(store: Path, array: str) -> int:
    """Objects of one array on disk (a local store: one file per chunk or shard), its metadata left out."""
    return sum(1 for p in (store / array / "c").rglob("*") if p.is_file())


def _assert_same_values(plain: Path, sharded: Path) -> None:
    """Every array of ``sharded`` holds ``plain``'s values (the progress marks: one a shard, all set, as all of
    plain's), and the attributes differ only by the sharding setting."""
    first, second = zarr.open_group(str(plain), mode="r"), zarr.open_group(str(sharded), mode="r")
    arrays_a, arrays_b = store_arrays(first), store_arrays(second)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        if key.endswith("/progress"):
            assert arrays_a[key].all() and arrays_b[key].all() and arrays_b[key].shape[1] == SHARDS, key
            continue
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    attrs_a, attrs_b = dict(first.attrs), dict(second.attrs)
    assert attrs_b["layout"].pop("shard_chunks") == K and attrs_b["settings"].pop("shard_chunks") == K
    assert attrs_a == attrs_b


def test_a_sharded_store_holds_the_same_arrays_in_k_times_fewer_objects(plain_and_sharded):
    plain, sharded = plain_and_sharded
    _assert_same_values(plain, sharded)
    assert verify_store(open_store(sharded)).ok
    store = open_store(sharded)
    big = [key for teacher in TEACHERS for key in store.with_companions(store.feature_keys(teacher))]
    assert len(big) > 10  # sampled logits' two parts, blocks, maps and their ranges, per teacher
    for key in big:
        assert (_objects(plain, key), _objects(sharded, key)) == (2 * ROWS // CHUNK_ROWS, 2 * SHARDS), key
    assert zarr.open_array(str(sharded / big[0]), mode="r").shards == (1, CHUNK_ROWS * K, 4)
    assert "sharded: 4 chunks (128 rows) an object" in describe_store(store)
    assert f"[{2 * SHARDS}/{2 * SHARDS} shards]" in describe_store(store)


def test_a_writer_killed_inside_a_shard_leaves_it_unmarked_and_the_resume_writes_it_whole(
    plain_and_sharded, teacher_dir, few, tmp_path, interrupt_on_call
):
    """Killed after a unit's logits shards are written and before its blocks are: that shard is not marked done, and
    the resumed extract writes exactly the units left (this one among them) and ends with the plain store's
    values."""
    plain, _ = plain_and_sharded
    out = tmp_path / "killed.zarr"
    undo = interrupt_on_call(teacher_store_module, "quantize_rows", 5)  # inside the 3rd unit written
    with pytest.raises(KeyboardInterrupt):
        extract(_config(teacher_dir, shard_chunks=K), out, progress=False, dataset=few)
    undo()
    marks = {t: open_store(out).progress(t) for t in TEACHERS}
    done = sum(int(m.sum()) for m in marks.values())
    assert 0 < done < 2 * 2 * SHARDS
    # The unit killed in its write: its logits shards on disk, its mark unset.
    unmarked_written = [(t, v, u) for t, m in marks.items() for v, u in zip(*np.nonzero(~m), strict=True)
                        if (out / f"teachers/{t}/logits_sample/index/c/{v}/{u}/0").is_file()]  # fmt: skip
    assert len(unmarked_written) >= 1
    written = extract_recording_units(_config(teacher_dir, shard_chunks=K), out, dataset=few)
    assert len(written) == 2 * 2 * SHARDS - done
    _assert_same_values(plain, out)


def test_verify_names_damaged_shards_and_repair_reextracts_exactly_them(plain_and_sharded, teacher_dir, few,
                                                                        tmp_path):  # fmt: skip
    """One shard's bytes flipped; another written in part (one chunk of rows rewritten with fill values by a
    writer that skips empty chunks, which drops that chunk from the shard: it reads back as zeros)."""
    import shutil

    plain, sharded = plain_and_sharded
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(sharded, damaged)
    shard = damaged / "teachers/densenet_k12/logits_sample/index/c/1/2/0"  # view 1's last shard, 2 chunks
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    counts = zarr.open_array(str(damaged / "teachers/resnet8_w4/logits_sample/count"), mode="r+")
    counts[0, 192:224] = 0  # view 0's shard 1, its chunk 2 of 4
    report = verify_store(open_store(damaged))
    assert sorted(str(p) for p in report.problems) == [
        "teachers/densenet_k12/logits_sample/index shard (1, 2, 0): corrupt (Stored and computed checksum do not "
        "match)",
        "teachers/resnet8_w4/logits_sample/count shard (0, 1, 0): missing (its chunk(s) 2 absent from its index)",
    ]
    assert repair_store(open_store(damaged, mode="r+"), report) == 2
    assert (
        not open_store(damaged).progress("densenet_k12")[1, 2] and not open_store(damaged).progress("resnet8_w4")[0, 1]
    )
    written = extract_recording_units(_config(teacher_dir, shard_chunks=K), damaged, dataset=few)
    assert len(written) == 2 and all("logits" in parts for parts, *_ in written)  # those two units only
    assert verify_store(open_store(damaged)).ok
    _assert_same_values(plain, damaged)


def test_a_sharded_store_grows_by_views_and_teachers_and_distills_as_the_plain_one(
    plain_and_sharded, teacher_dir, few, tmp_path
):
    """One teacher and one view, grown to two views, then by the second teacher: the plain store's values; a
    distill epoch from it ends with the weights of one from the plain store; another K is refused by name."""
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.nets.checkpoint import load_checkpoint

    plain, _ = plain_and_sharded
    grown = tmp_path / "grown.zarr"
    extract(_config(teacher_dir, shard_chunks=K, teachers=TEACHERS[:1], views=1), grown, progress=False, dataset=few)
    extract(_config(teacher_dir, shard_chunks=K, teachers=TEACHERS[:1]), grown, progress=False, dataset=few)
    extract(_config(teacher_dir, shard_chunks=K), grown, progress=False, dataset=few)
    _assert_same_values(plain, grown)
    assert verify_store(open_store(grown)).ok
    with pytest.raises(UserError, match=r"other settings \(shard_chunks: 4 there, 2 now"):
        extract(_config(teacher_dir, shard_chunks=2), grown, progress=False, dataset=few)

    def distilled(store: Path, out: str):
        config = DistillConfig(store=str(store), student="resnet8_w4", method="kd", epochs=1, batch_size=64,
                               device="cpu", workers=0)  # fmt: skip
        distill(config, tmp_path / out, progress=False, dataset=few)
        return load_checkpoint(tmp_path / out / "student.pt")["model"]

    from_plain, from_sharded = distilled(plain, "plain"), distilled(grown, "sharded")
    assert from_plain.keys() == from_sharded.keys()
    for key, value in from_plain.items():
        assert torch.equal(value, from_sharded[key]), key


def test_a_sharded_extract_runs_the_teachers_on_the_unsharded_mini_batches(teacher_dir, few, tmp_path, monkeypatch):
    """Mini-batches are split within each chunk of rows, never across a shard's chunks, so kernels whose floats
    depend on the batch size (cuDNN's, chosen per shape) give a sharded store an unsharded one's values."""
    batches: list[int] = []
    real = extract_module.teacher_outputs
    monkeypatch.setattr(extract_module, "teacher_outputs",
                        lambda teacher, pixels, *args, **kwargs: batches.append(len(pixels)) or real(
                            teacher, pixels, *args, **kwargs))  # fmt: skip
    seen = {}
    for shard_chunks in (1, K):
        batches.clear()
        config = _config(teacher_dir, teachers=TEACHERS[:1], views=1, shard_chunks=shard_chunks)
        extract(config, tmp_path / f"{shard_chunks}.zarr", progress=False, dataset=few)
        seen[shard_chunks] = list(batches)
    assert seen[1] == [24, 8] * (ROWS // CHUNK_ROWS)  # batch 24 in each 32-row chunk
    assert seen[K] == seen[1]


def test_a_dead_block_of_zeros_is_written_into_its_shards_and_verifies(teacher_dir, few, tmp_path, monkeypatch):
    """Zeros are the fill value: a shard whose chunks are all zeros (a dead block's maps, their 8-bit codes and
    ranges) is still written whole, so verify finds every chunk and no hole."""
    real = extract_module.teacher_outputs

    def dead_maps(teacher, pixels, *args, **kwargs):
        outputs = real(teacher, pixels, *args, **kwargs)
        return {name: value * 0 if name.startswith("maps/") else value for name, value in outputs.items()}

    monkeypatch.setattr(extract_module, "teacher_outputs", dead_maps)
    out = tmp_path / "dead.zarr"
    extract(_config(teacher_dir, teachers=TEACHERS[:1], views=1, shard_chunks=K), out, progress=False, dataset=few)
    store = open_store(out)
    maps = [key for key in store.feature_keys(TEACHERS[0]) if "/maps/" in key]
    assert maps and all(not store.read(key, 0).any() for key in maps)
    assert all(_objects(out, key) == SHARDS for key in store.with_companions(maps))
    assert verify_store(store).ok


@pytest.mark.parametrize(("value", "says"), [
    ("0", "--shard-chunks K puts K chunks of rows of a view in one Zarr shard object, a whole number of at least 1 "
          "(1: no sharding), got 0"),
    ("-2", "got -2"),
    ("two", "Invalid value for '--shard-chunks'"),
])  # fmt: skip
def test_a_bad_shard_chunks_is_one_line(value, says, teacher_dir, tmp_path):
    out = tmp_path / "bad.zarr"
    result = run_console(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(teacher_dir), "--shard-chunks",
                          value, "--device", "cpu", "--quiet", "--out", str(out)], tmp_path)  # fmt: skip
    assert says in one_error_line(result)
    assert not out.exists()


def test_two_ranks_under_torchrun_write_the_one_rank_sharded_store(teacher_dir, digits, tmp_path):
    """Each rank takes whole shards (units u with u % 2 == rank), so no shard has two writers: the store is the one
    an unsharded one-rank extract writes."""
    import subprocess
    import sys

    out, reference = tmp_path / "two.zarr", tmp_path / "one.zarr"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "meal_cache", "extract", "--teachers", "resnet8_w4", "--teacher-dir", str(teacher_dir), "--views", "1",
               "--rows-per-chunk", "128", "--batch-size", "128", "--shard-chunks", "3", "--device", "cpu", "--out",
               str(out), "--quiet"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs, so the floats compare
    try:
        extract(ExtractConfig(teachers=["resnet8_w4"], views=1, teacher_dir=str(teacher_dir), rows_per_chunk=128,
                              batch_size=128, device="cpu"), reference, progress=False, dataset=digits)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    store = open_store(out)
    assert store.n_units == 4 and store.progress("resnet8_w4").all()  # 12 chunks of rows, 3 a shard
    first, second = store_arrays(zarr.open_group(str(reference), mode="r")), store_arrays(store.group)
    for key in first:
        if not key.endswith("/progress"):
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert verify_store(store).ok
