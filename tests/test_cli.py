from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from meal_cache.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "evaluate", "models", "datasets"):
        assert command in result.output
    train_help = CliRunner().invoke(main, ["train", "--help"])
    assert "--arch" in train_help.output and "weights_only" in train_help.output


def test_train_then_evaluate_through_the_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.pt"
    result = runner.invoke(
        main, ["train", "--arch", "resnet8_w4", "--data", "fake:64", "--epochs", "1", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output and out.is_file()

    report = tmp_path / "eval.json"
    result = runner.invoke(main, ["evaluate", str(out), "--json", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    assert metrics["same_data_as_training"] is True and metrics["metrics"]["n"] == 16
    assert f"{metrics['metrics']['top1']:.2f}%" in result.output

    again = runner.invoke(
        main, ["train", "--arch", "resnet8_w4", "--data", "fake:64", "--epochs", "1", "--out", str(out), "--quiet"]
    )
    assert again.exit_code == 2 and "--resume" in again.output


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True, timeout=120)


def _assert_one_error_line(returncode: int, stderr: str, message: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], stderr


def test_user_mistakes_give_one_line_and_exit_2(tmp_path):
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, pixels=np.zeros((3, 4, 4), np.uint8))
    out = str(tmp_path / "x.pt")
    cases = [
        (["train", "--arch", "resnet9000", "--out", out], "unknown architecture 'resnet9000'"),
        (["train", "--arch", "resnet8", "--data", "mnist", "--out", out], "unknown dataset 'mnist'"),
        (["train", "--arch", "resnet8", "--data", f"npz:{bad_npz}", "--out", out], "lacks array"),
        (["train", "--arch", "resnet8", "--data", f"npz:{tmp_path}/none.npz", "--out", out], "npz file not found"),
        (["evaluate", str(tmp_path / "missing.pt")], "checkpoint not found"),
    ]
    runner = CliRunner()
    for args, message in cases:
        result = runner.invoke(main, args)
        # The runner keeps tracebacks out of result.stderr: an exception other than the exit would print one.
        assert isinstance(result.exception, SystemExit), result.exc_info
        _assert_one_error_line(result.exit_code, result.stderr, message)
    # And once as a real process, as a user runs it.
    process = _run_cli("train", "--arch", "resnet9000", "--out", out)
    _assert_one_error_line(process.returncode, process.stderr, "unknown architecture")
