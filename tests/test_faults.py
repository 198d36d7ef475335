"""Faults: SIGKILL at random moments, corrupt and lost chunks, failed writes, stores behind fsspec URLs."""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage._local as zarr_local
from by_hand import store_arrays

from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig, distill
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_checkpoint
from meal_cache.store import open_store, repair_store, verify_store

TEACHERS = ["resnet8_w4", "densenet_k12"]
HALF_THE_DIGITS = "digits?train_fraction=0.5"  # 12 chunks of 64 rows a view: room for kills at random moments


def assert_same_store(a: str | Path, b: str | Path) -> None:
    first, second = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(first.attrs) == dict(second.attrs)
    arrays_a, arrays_b = store_arrays(first), store_arrays(second)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meal_cache", *args]


def _done_marks(store: Path) -> int:
    """Progress marks on disk: a mark's chunk is written only once it is set."""
    return sum(1 for p in store.glob("teachers/*/progress/c/*/*") if p.is_file() and p.name.isdigit())


def test_extract_killed_at_random_moments_resumes_to_the_same_store(teacher_dir, tmp_path):
    half = load_dataset(HALF_THE_DIGITS)
    settings = dict(teachers=TEACHERS, views=2, identity_view=True, rows_per_chunk=64, batch_size=64, grid=2)
    args = ["extract", "--teachers", ",".join(TEACHERS), "--teacher-dir", str(teacher_dir), "--views", "2",
            "--identity-view", "--rows-per-chunk", "64", "--batch-size", "64", "--grid", "2", "--device", "cpu",
            "--data", HALF_THE_DIGITS, "--quiet"]  # fmt: skip
    out = tmp_path / "killed.zarr"
    total = len(TEACHERS) * 3 * -(-len(half.train) // 64)
    rng = random.Random(2026)
    kills = []
    while len(kills) < 2:
        done = _done_marks(out) if out.exists() else 0
        # A random point ahead: before the store exists (while it is created) in the first trial, then
        # somewhere in the next third of the remaining chunks.
        target = None if not kills else done + rng.randint(1, max(1, (total - done) // 3))
        process = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        creating = tmp_path / ".killed.zarr.creating"
        while process.poll() is None:
            if (target is None and creating.exists()) or (target is not None and _done_marks(out) >= target):
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills.append((target, _done_marks(out) if out.exists() else 0))
                break
            time.sleep(0.002)
        assert process.returncode == -signal.SIGKILL, f"the extract finished before trial {len(kills) + 1} killed it"
        assert not (out.exists() and open_store(out).complete)
    finished = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    reference = tmp_path / "reference.zarr"
    extract(ExtractConfig(teacher_dir=str(teacher_dir), device="cpu", data=HALF_THE_DIGITS, **settings), reference,
            progress=False, dataset=half)  # fmt: skip
    assert_same_store(out, reference)
    assert verify_store(open_store(out)).ok
    print(f"{len(kills)} kills (target, chunks done when killed) of {total}: {kills}")  # shown with pytest -s
    # The kills landed at different moments: during creation, then at growing numbers of chunks done.
    assert kills[0][0] is None and all(after >= target for target, after in kills[1:])
    assert len({after for _, after in kills}) == len(kills)


def test_distill_killed_and_resumed_ends_with_the_same_weights(small_store, tmp_path):
    path, _ = small_store
    args = ["distill", "--store", str(path), "--student", "resnet8_w4", "--method", "meal", "--epochs", "2",
            "--device", "cpu", "--quiet"]  # fmt: skip
    uninterrupted = subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (out / "last.pt").exists():
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    epochs_before = len((out / "metrics.jsonl").read_text().splitlines())
    assert epochs_before == 1 and not (out / "student.pt").exists()
    resumed = subprocess.run(_cli(*args, "--out", str(out), "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # The student and everything trained beside it (adapters, discriminators) end bit-identical.
    for name, part in (("student.pt", "model"), ("last.pt", "distiller")):
        whole, again = load_checkpoint(tmp_path / "whole" / name)[part], load_checkpoint(out / name)[part]
        assert whole.keys() == again.keys() and len(whole) > 10
        for key, value in whole.items():
            assert torch.equal(value, again[key]), f"{name}: {key}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _chunk_file(store: Path, array: str, chunk: tuple[int, ...]) -> Path:
    return store / array / "c" / Path(*map(str, chunk))


def test_verify_finds_corrupt_and_lost_chunks_distill_refuses_and_repair_reextracts(
    small_store, teacher_dir, digits, tmp_path
):
    path, config = small_store
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(path, damaged)
    corrupt = _chunk_file(damaged, "teachers/resnet8_w4/logits", (1, 2, 0))
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    lost = _chunk_file(damaged, "teachers/densenet_k12/maps/features.denseblock2", (0, 1, 0, 0))
    lost.unlink()
    report = verify_store(open_store(damaged))
    found = sorted(str(p) for p in report.problems)
    assert found == [
        "teachers/densenet_k12/maps/features.denseblock2 chunk (0, 1, 0, 0): missing",
        "teachers/resnet8_w4/logits chunk (1, 2, 0): corrupt (Stored and computed checksum do not match)",
    ]
    assert report.chunks_pending == 0 and report.chunks_checked > 50
    with pytest.raises(UserError, match=r"damaged: teachers/.* chunk \(.*\): (missing|corrupt).*and 1 more"):
        distill(DistillConfig(store=str(damaged), student="resnet8_w4", epochs=1, device="cpu",
                              representation="maps"), tmp_path / "d", progress=False, dataset=digits)  # fmt: skip
    assert not (tmp_path / "d").exists() or not (tmp_path / "d" / "student.pt").exists()

    store = open_store(damaged, mode="r+")
    assert repair_store(store, report) == 2
    assert not open_store(damaged).complete
    assert (
        not open_store(damaged).progress("resnet8_w4")[1, 2] and not open_store(damaged).progress("densenet_k12")[0, 1]
    )
    extract(config, damaged, progress=False, dataset=digits)
    assert verify_store(open_store(damaged)).ok
    assert_same_store(damaged, path)


def test_verify_and_repair_refuse_what_cannot_be_reextracted(small_store, tmp_path):
    path, _ = small_store
    damaged = tmp_path / "labels.zarr"
    shutil.copytree(path, damaged)
    _chunk_file(damaged, "views/crop", (0, 0, 0)).write_bytes(b"not a chunk")
    report = verify_store(open_store(damaged))
    assert [str(p).split(":")[0] for p in report.problems] == ["views/crop chunk (0, 0, 0)"]
    with pytest.raises(UserError, match="extract it again with --overwrite"):
        repair_store(open_store(damaged, mode="r+"), report)


def test_a_failed_write_leaves_a_resumable_store_never_marked_complete(
    small_store, teacher_dir, digits, tmp_path, monkeypatch
):
    path, config = small_store
    real_put = zarr_local._put
    calls = {"n": 0}

    def disk_fills_up(path, *args, **kwargs):
        # The disk fills up after the store was created and 40 chunk files of teacher outputs were written: at
        # least three whole (teacher, view, chunk) units of 8 files, whatever order the two writer threads take.
        if "teachers" in Path(path).parts and "c" in Path(path).parts:
            calls["n"] += 1
            if calls["n"] > 40:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(path, *args, **kwargs)

    monkeypatch.setattr(zarr_local, "_put", disk_fills_up)
    out = tmp_path / "full.zarr"
    with pytest.raises(UserError, match="No space left on device.*not marked complete.*resume"):
        extract(config, out, progress=False, dataset=digits)
    monkeypatch.setattr(zarr_local, "_put", real_put)
    partial = open_store(out)
    assert not partial.complete and 0 < sum(int(partial.progress(t).sum()) for t in partial.teacher_names)
    extract(config, out, progress=False, dataset=digits)
    assert_same_store(out, path)


def test_a_store_behind_an_fsspec_url_is_extracted_verified_and_distilled(teacher_dir, digits, tmp_path, monkeypatch):
    url = f"memory://meal-cache-test-{os.getpid()}/feats.zarr"
    config = ExtractConfig(teachers=TEACHERS, views=1, teacher_dir=str(teacher_dir), rows_per_chunk=512,
                           device="cpu")  # fmt: skip
    extract(config, url, progress=False, dataset=digits)
    store = open_store(url)
    assert store.complete and verify_store(store).ok and store.num_views == 1
    again = extract(config, url, progress=False, dataset=digits)  # complete: nothing to do, nothing replaced
    assert again.complete
    summary = distill(DistillConfig(store=url, student="resnet8_w4", epochs=1, method="kd", device="cpu"),
                      tmp_path / "from-url", progress=False, dataset=digits)  # fmt: skip
    assert summary["history"][0]["steps"] == 1437 // 64
    assert json.loads((tmp_path / "from-url" / "config.json").read_text())["store"] == url
    with pytest.raises(UserError, match="store not found"):
        open_store(f"memory://meal-cache-test-{os.getpid()}/absent.zarr")
    # As where the s3 extra is not installed (the dev extra installs s3fs for tests/test_s3.py): fsspec finds no
    # s3fs, also when an earlier test registered its class.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    with pytest.raises(UserError, match=r"not installed.*meal-cache\[s3\]"):
        open_store("s3://bucket/feats.zarr")
    with pytest.raises(UserError, match="Protocol not known"):
        open_store("nosuchfs://bucket/feats.zarr")


def test_verify_and_distill_on_the_command_line(small_store, tmp_path):
    from click.testing import CliRunner

    from meal_cache.cli import main

    path, _ = small_store
    damaged = tmp_path / "cli.zarr"
    shutil.copytree(path, damaged)
    runner = CliRunner()
    sound = runner.invoke(main, ["verify", str(damaged), "--quiet"])
    assert sound.exit_code == 0 and "0 damaged" in sound.output
    _chunk_file(damaged, "teachers/resnet8_w4/logits", (0, 0, 0)).unlink()
    before = sorted(p.name for p in damaged.rglob("*"))
    refused = runner.invoke(main, ["distill", "--store", str(damaged), "--student", "resnet8_w4", "--epochs", "1",
                                   "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), refused.exc_info
    assert refused.stderr.strip().splitlines() == [
        f"Error: store '{damaged}' is damaged: teachers/resnet8_w4/logits chunk (0, 0, 0): missing; `meal-cache "
        f"verify --repair {damaged}` marks those chunks, then the same extract command re-extracts them"
    ]
    assert sorted(p.name for p in damaged.rglob("*")) == before
    found = runner.invoke(main, ["verify", str(damaged), "--quiet"])
    assert found.exit_code == 1
    assert found.output.splitlines()[0] == "teachers/resnet8_w4/logits chunk (0, 0, 0): missing"
    repaired = runner.invoke(main, ["verify", str(damaged), "--repair", "--quiet"])
    assert repaired.exit_code == 1 and "marked 1 chunk(s) for re-extraction" in repaired.output
    assert not open_store(damaged).progress("resnet8_w4")[0, 0]
