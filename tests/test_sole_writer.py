"""One extract a local store at a time (issue 41): a second one started while the first holds the store gives one
`Error:` line through the console script, leaves nothing behind, and once the first is done (or killed: the
operating system drops its hold) the same command runs."""

from __future__ import annotations

import os

from console import run_console

from meal_cache.store import open_store
from meal_cache.store.create import sole_writer


def test_a_second_extract_on_a_store_being_written_is_one_line(tmp_path, teacher_dir):
    out = tmp_path / "feats.zarr"
    command = ["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(teacher_dir), "--data",
               "digits?train_fraction=0.1", "--views", "1", "--out", str(out), "--device", "cpu", "--workers", "0",
               "--quiet"]  # fmt: skip
    with sole_writer(out):  # this process plays the first extract
        refused = run_console(command, tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"Error: another extract is writing '{out}' (process {os.getpid()})")
    assert list(tmp_path.iterdir()) == []  # no store, no half-made one, and the lock went with its holder
    ran = run_console(command, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert open_store(out).complete and sorted(p.name for p in tmp_path.iterdir()) == ["feats.zarr"]
