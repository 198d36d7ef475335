"""Two ranks on the CPU (gloo) under torchrun: extraction gives the one-rank store, DDP distillation trains."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from test_faults import TEACHERS, assert_same_store

from meal_cache.checkpoint import load_model
from meal_cache.extract import ExtractConfig, extract
from meal_cache.store import open_store, verify_store


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "meal_cache", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_two_rank_extraction_writes_the_one_rank_store(teacher_dir, digits, tmp_path):
    settings = dict(teachers=TEACHERS, views=2, identity_view=True, rows_per_chunk=128, grid=2)
    out = tmp_path / "two.zarr"
    result = _torchrun("extract", "--teachers", ",".join(TEACHERS), "--teacher-dir", str(teacher_dir), "--views",
                       "2", "--identity-view", "--rows-per-chunk", "128", "--grid", "2", "--device", "cpu",
                       "--out", str(out), "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # One report, from rank 0.
    assert result.stdout.count("bytes per sample per view") == 1
    # torchrun gives each rank one thread; the reference runs with one too, so every float is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tmp_path / "one.zarr"
        extract(ExtractConfig(teacher_dir=str(teacher_dir), device="cpu", **settings), reference, progress=False,
                dataset=digits)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert_same_store(out, reference)
    assert verify_store(open_store(out)).ok


def test_two_rank_distillation_trains_one_student(small_store, digits, tmp_path):
    path, _ = small_store
    out = tmp_path / "ddp"
    result = _torchrun("distill", "--store", str(path), "--student", "resnet8_w4", "--method", "meal", "--epochs",
                       "2", "--device", "cpu", "--out", str(out), "--quiet")  # fmt: skip
    # A rank whose student, adapters or discriminators drifted from rank 0's fails the run (check_identical).
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test top-1") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The global batch stays 64 (32 per rank), so an epoch has the steps of a one-process run.
    assert [r["steps"] for r in records] == [1437 // 64] * 2
    assert any(key.startswith("disc/") for key in records[0])
    model, payload = load_model(out / "student.pt")
    assert payload["arch"] == "resnet8_w4"
    bad = _torchrun("distill", "--store", str(path), "--student", "resnet8_w4", "--epochs", "1", "--batch-size", "63",
                    "--device", "cpu", "--out", str(tmp_path / "odd"), "--quiet")  # fmt: skip
    assert bad.returncode != 0 and "multiple of the 2 ranks" in bad.stderr
