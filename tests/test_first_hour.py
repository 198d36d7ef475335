"""A user's first hour (issue 29), the progress and inspect half: bars on evaluate and on extract's batches, Ctrl-C
that says how to resume, an error after a bar on a line of its own, and inspect's class names, files and --csv.
Each behaviour is checked on the real console script where a user would see it."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from imagefolder import make_image_folder

from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meal_cache", *args]


def _stderr_on_a_terminal(command: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``command`` run with its stderr on a pseudo-terminal, as a user's shell has it
    (a bar is drawn on a terminal; in a pipe or log only after half a minute: meal_cache/engine/progress.py)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_evaluate_draws_a_bar_unless_quiet(teacher_dir, tmp_path):
    checkpoint = str(teacher_dir / "resnet8_w4.pt")
    status, stderr = _stderr_on_a_terminal(_cli("evaluate", checkpoint, "--device", "cpu", "--json",
                                                str(tmp_path / "a.json")))  # fmt: skip
    assert status == 0, stderr
    assert "evaluate resnet8_w4" in stderr and "img" in stderr  # the bar, counting images
    quiet = subprocess.run(_cli("evaluate", checkpoint, "--device", "cpu", "--quiet", "--json",
                                str(tmp_path / "b.json")), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr
    assert "top-1" in quiet.stdout


def test_the_evaluation_bar_counts_every_test_image_once_a_batch(teacher_dir, digits, monkeypatch):
    from meal_cache.engine import evaluate as evaluate_module
    from meal_cache.nets.checkpoint import load_checkpoint, model_from_checkpoint

    steps: list[int] = []

    from meal_cache.engine import progress as progress_module

    class Recording(progress_module.tqdm):
        def update(self, n=1):
            steps.append(n)
            return super().update(n)

    monkeypatch.setattr(progress_module, "tqdm", Recording)
    model = model_from_checkpoint(load_checkpoint(teacher_dir / "resnet8_w4.pt"), "cpu")
    evaluate_module.evaluate(model, digits, "test", batch_size=100, progress=True)
    assert steps == [100, 100, 100, 60]


def test_extracts_bar_moves_once_a_batch_not_once_a_chunk(teacher_dir, digits, tmp_path, monkeypatch):
    from meal_cache.engine import progress as progress_module

    steps: list[int] = []
    real = progress_module.tqdm

    class Recording(real):
        def update(self, n=1):
            steps.append(n)
            return super().update(n)

    monkeypatch.setattr(progress_module, "tqdm", Recording)
    config = ExtractConfig(teachers=["resnet8_w4"], views=1, teacher_dir=str(teacher_dir), device="cpu",
                           preset="kd", rows_per_chunk=512, batch_size=100)  # fmt: skip
    extract(config, tmp_path / "s.zarr", progress=True, dataset=digits)
    # 1,437 rows: chunks of 512, 512 and 413, each read in batches of at most 100.
    assert sum(steps) == 1437 and max(steps) == 100 and len(steps) == 6 + 6 + 5


def test_ctrl_c_says_how_to_resume_and_the_same_command_does(teacher_dir, tmp_path):
    out = tmp_path / "feats.zarr"
    command = _cli("extract", "--teachers", "resnet8_w4,densenet_k12", "--views", "8", "--teacher-dir",
                   str(teacher_dir), "--device", "cpu", "--out", str(out))  # fmt: skip
    # A user's shell starts the command with Ctrl-C at its default; a test process may have inherited SIGINT ignored
    # (an ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    from meal_cache.store import open_store

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:  # until the first chunk is written
        if (out / "zarr.json").exists() and open_store(out).progress("resnet8_w4").any():
            break
        time.sleep(0.2)
    assert process.poll() is None, "the extract ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.rstrip("\n").split("\n")[-1]
    assert last == ("Interrupted. Run the same command again to resume: the chunks already written are kept."), last
    store = open_store(out)
    done = store.progress("resnet8_w4")
    assert not store.complete and 0 < done.sum() < done.size  # some chunks kept, others still to do


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, teacher_dir):
    """A store of a JPEG folder of 10 classes named c00-c09, read at 16 px by the digits teachers (which do not
    know these colours, so their ensemble disagrees with many labels)."""
    root = make_image_folder(tmp_path_factory.mktemp("jpegs") / "folder", train=3, val=1, sizes=(20, 40))
    out = root.parent / "folder.zarr"
    extract(ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=f"imagefolder:{root}", image_size=16,
                          views=1, teacher_dir=str(teacher_dir), device="cpu", workers=0), out,
            progress=False)  # fmt: skip
    return root, out


def test_inspect_names_classes_and_files_and_writes_a_csv_only_when_asked(folder_store, tmp_path):
    root, store = folder_store
    before = sorted(p.name for p in store.parent.iterdir())
    shown = subprocess.run(_cli("inspect", str(store), "--confidence", "0.05"), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert sorted(p.name for p in store.parent.iterdir()) == before  # nothing written beside the store
    lines = shown.stdout.splitlines()
    first = lines.index("top-1 % per class") + 2  # the title, the teachers' header, then a row a class
    assert [line.split()[0] for line in lines[first : first + 10]] == [f"c{i:02d}" for i in range(10)]
    listed = [line for line in shown.stdout.splitlines() if "labelled" in line]
    assert listed and all(line.strip().startswith(str(root / "train")) for line in listed)
    out = tmp_path / "suspects.csv"
    written = subprocess.run(_cli("inspect", str(store), "--confidence", "0.05", "--csv", str(out)),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert written.returncode == 0 and f"suspects -> {out}" in written.stdout
    rows = list(csv.DictReader(out.open()))
    assert rows and list(rows[0]) == ["row", "file", "label", "label_name", "ensemble", "ensemble_name", "confidence"]
    for row in rows:
        path = Path(row["file"])
        assert path.is_file() and path.parent.name == row["label_name"] == f"c{int(row['label']):02d}"
        assert row["ensemble_name"] == f"c{int(row['ensemble']):02d}" and row["label"] != row["ensemble"]


def test_an_error_after_a_progress_bar_starts_a_line_of_its_own(teacher_dir, tmp_path):
    root = make_image_folder(tmp_path / "jpegs", train=3, val=1, sizes=(60, 90))  # the header stays whole
    victim = root / "train" / "c05" / "1.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 3 // 4])
    status, stderr = _stderr_on_a_terminal(_cli("extract", "--teachers", "resnet8_w4", "--data",
                                                f"imagefolder:{root}", "--image-size", "16", "--views", "1",
                                                "--batch-size", "8", "--workers", "1", "--teacher-dir",
                                                str(teacher_dir), "--device", "cpu", "--out",
                                                str(tmp_path / "s.zarr")))  # fmt: skip
    assert status == 2, stderr[-2000:]
    assert "\rview 1/1:" in stderr  # a bar was drawn, and redrawn in place, before the failure
    # What the terminal shows last: the text after the last carriage return or newline (the bar, left off, is
    # cleared with spaces and a carriage return, so the error starts at the line's first column).
    line = stderr.replace("\r\n", "\n").rstrip("\n").replace("\r", "\n").split("\n")[-1]
    assert line.startswith("Error: ") and "c05/1.jpg" in line, repr(stderr[-500:])


@pytest.mark.parametrize(
    ("module", "function", "args", "hint"),
    [
        ("meal_cache.engine.train", "train_supervised", ["train", "--arch", "resnet8", "--out", "{tmp}/t.pt"],
         "Interrupted. Run the same command with --resume to continue from the last finished epoch."),
        ("meal_cache.distill", "distill", ["distill", "--store", "{store}", "--student", "resnet8_w4", "--out",
                                           "{tmp}/d"],
         "Interrupted. Run the same command with --resume to continue from the last finished epoch."),
        ("meal_cache.pipeline.run", "run_pipeline", ["run", "pipelines/digits.toml", "--runs", "{tmp}/runs"],
         "Interrupted. Run the same command again: the steps already done are skipped."),
        ("meal_cache.store.describe", "describe_store", ["info", "{store}"], "Interrupted."),
    ],
)  # fmt: skip
def test_each_long_command_names_its_own_way_to_resume(small_store, tmp_path, monkeypatch, module, function, args,
                                                       hint):  # fmt: skip
    """Ctrl-C (a KeyboardInterrupt from deep inside the command) ends train, distill and run with their own resume
    line and status 130; a command with nothing to resume says only that it was interrupted."""
    import importlib

    from click.testing import CliRunner

    from meal_cache.cli import main

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, interrupted)
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    filled = [a.format(tmp=tmp_path, store=small_store[0]) for a in args]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code == 130, (result.output, result.exception)
    assert result.stderr.strip().split("\n")[-1] == hint


def test_a_torchvision_dataset_that_cannot_be_downloaded_is_one_line(tmp_path):
    """README's `train --data cifar10 --download` on a machine without network: one Error line saying where the
    files go, instead of urllib's traceback."""
    from console import one_error_line, run_console

    result = run_console(["train", "--arch", "resnet8", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
                          "--download", "--out", str(tmp_path / "t.pt")], tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert f"could not download cifar10 into '{tmp_path / 'data'}'" in line
    assert "copy torchvision's cifar10 files" in line and "leave --download out" in line
