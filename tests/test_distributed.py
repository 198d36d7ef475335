"""Two ranks on the CPU (gloo) under torchrun: extraction gives the one-rank store, DDP distillation trains, and a
mistake is one line."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_faults import TEACHERS, assert_same_store

from meal_cache import distributed
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


def test_a_mistake_under_torchrun_is_one_error_line_and_exit_2_on_every_rank(small_store, tmp_path):
    path, _ = small_store
    bad = _torchrun("distill", "--store", str(path), "--student", "resnet8_w4", "--epochs", "1", "--batch-size", "63",
                    "--device", "cpu", "--out", str(tmp_path / "odd"), "--quiet")  # fmt: skip
    output = bad.stdout + bad.stderr
    message = "--batch-size 63 must be a multiple of the 2 ranks"
    # One line from rank 0, not one per rank (torchrun's "ChildFailedError:" below does not start a line so).
    assert [line for line in output.splitlines() if line.startswith("Error:")] == [f"Error: {message}"], output
    # Every rank exits 2, as one process would, and torchrun's closing summary names the mistake (from the
    # ranks' error files) instead of pointing at how to enable tracebacks.
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", output))
    assert exits == {"0": "2", "1": "2"}, output
    assert f"traceback : {message}" in output and "To enable traceback" not in output
    # No traceback from a rank: the one traceback is torchrun's own ChildFailedError, raised whenever a rank
    # fails, which is also why torchrun exits 1 (docs/errors.md shows the whole output).
    assert output.count("Traceback") == 1 and "ChildFailedError" in output, output
    assert not re.search(r'File ".*meal_cache', output) and "UserError" not in output, output
    assert bad.returncode == 1


def test_rank_0_prints_the_mistake_and_another_rank_only_what_rank_0_did_not(monkeypatch, capsys, tmp_path):
    """The rule behind the test above, without starting ranks: a store in this process plays torchrun's agent."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(server.port), "TORCHELASTIC_RESTART_COUNT": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "REPORT_WAIT_S", 0.2)
    previous = signal.getsignal(signal.SIGTERM)

    def fail(rank: int, message: str) -> str:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"{rank}.json"))
        with pytest.raises(SystemExit) as exited:
            distributed.exit_with_user_error(message, 2)
        assert exited.value.code == 2
        assert json.loads((tmp_path / f"{rank}.json").read_text())["message"]["extraInfo"]["py_callstack"] == message
        return capsys.readouterr().err

    try:
        # Rank 1 alone met it (rank 0 never reports): after the wait it prints its own.
        assert fail(1, "only rank 1's") == "Error: only rank 1's\n"
        # Every rank met it: rank 0 prints and says so through the store, rank 1 then leaves silently.
        assert fail(0, "everyone's") == "Error: everyone's\n"
        assert fail(1, "everyone's") == ""
        # And a rank that torchrun stops (SIGTERM) on its way out exits with the same status.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
