"""Issue 42, the first look, the items left: bad paths refused before torch is imported, ..."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from console import ROOT

# ------------------------------------------------------------------------------- bad paths, before torch

# Every command that names a store, checkpoint or dataset path, with one that is not there. --method is given
# first in distill's: its names need torch, and the store must still be refused before it is looked at.
BAD_PATHS = {
    "extract --data imagefolder:": (
        ["extract", "--teachers", "t", "--data", "imagefolder:{missing}"],
        "imagefolder '{missing}': folder does not exist",
    ),
    "extract --data npz:": (
        ["extract", "--teachers", "t", "--data", "npz:{missing}.npz"],
        "npz file not found: '{missing}.npz'",
    ),
    "train --data imagefolder:FILE": (
        ["train", "--arch", "resnet8_w4", "--data", "imagefolder:{file}", "--out", "{tmp}/t.pt"],
        "imagefolder '{file}': is a file, not a folder",
    ),
    "distill --store": (
        ["distill", "--method", "meal", "--student", "resnet8_w4", "--store", "{missing}"],
        "store not found: '{missing}'",
    ),
    "evaluate CHECKPOINT": (["evaluate", "{missing}.pt"], "checkpoint not found: '{missing}.pt'"),
    "evaluate --store": (["evaluate", "{file}", "--store", "{missing}"], "store not found: '{missing}'"),
    "info STORE": (["info", "{missing}"], "store not found: '{missing}'"),
    "info --fidelity": (["info", "{tmp}", "--fidelity", "{missing}"], "store not found: '{missing}'"),
    "verify STORE": (["verify", "{missing}"], "store not found: '{missing}'"),
    "inspect STORE": (["inspect", "{missing}"], "store not found: '{missing}'"),
}

# Runs the command line in this interpreter, as the console script does, and says afterwards whether torch was
# imported by the time the error was printed.
_FRESH_INTERPRETER = """import sys
from meal_cache.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print(f"exit {exit.code} torch {'torch' in sys.modules}")
"""


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_a_bad_path_is_one_error_line_before_torch_is_imported(case, tmp_path):
    args, message = BAD_PATHS[case]
    names = {"missing": tmp_path / "no" / "such", "file": tmp_path / "file.pt", "tmp": tmp_path}
    (tmp_path / "file.pt").write_bytes(b"")
    ran = subprocess.run([sys.executable, "-c", _FRESH_INTERPRETER, *(a.format(**names) for a in args)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: {message.format(**names)}"], ran.stderr[-2000:]
    assert ran.stdout.strip() == "exit 2 torch False"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]  # nothing left behind


def test_the_early_refusals_are_the_librarys_words(tmp_path):
    """What the command line says before importing torch is what the library says when it meets the same path."""
    from meal_cache.cli import paths
    from meal_cache.data.datasets import load_dataset
    from meal_cache.errors import UserError
    from meal_cache.nets.checkpoint import load_checkpoint
    from meal_cache.store.teacher_store import open_store

    missing, file = str(tmp_path / "no" / "such"), tmp_path / "file"
    file.write_bytes(b"")
    pairs = [(paths.check_store_exists, open_store, missing), (paths.check_checkpoint_exists, load_checkpoint, missing),
             (paths.check_data_path, load_dataset, f"imagefolder:{missing}"),
             (paths.check_data_path, load_dataset, f"imagefolder:{file}?in_memory=1"),
             (paths.check_data_path, load_dataset, f"npz:{missing}")]  # fmt: skip
    for early, library, value in pairs:
        with pytest.raises(UserError) as said_early:
            early(value)
        with pytest.raises(UserError) as said_later:
            library(value)
        assert str(said_early.value) == str(said_later.value), value
    # A URL and a path that is there are the library's to judge.
    for value in ("imagefolder:s3://bucket/images", f"imagefolder:{tmp_path}", "digits", "npz:?in_memory=1"):
        paths.check_data_path(value)
    paths.check_store_exists("s3://bucket/feats.zarr")


def test_help_before_a_bad_path_is_shown_and_a_path_that_is_there_is_let_through(tmp_path):
    from click.testing import CliRunner

    from meal_cache.cli import main

    shown = CliRunner().invoke(main, ["distill", "--help", "--store", str(tmp_path / "no")])
    assert shown.exit_code == 0 and "Usage:" in shown.output
    Path(tmp_path / "empty").mkdir()
    refused = CliRunner().invoke(main, ["info", str(tmp_path / "empty")])
    assert refused.exit_code == 2 and "store not found" not in refused.stderr  # there, so the library judges it
