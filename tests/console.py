"""Running the real `meal-cache` command in a test: this tree's code, no network, and its one `Error:` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parent.parent
# A closed local port: every download goes through it and is refused at once, with or without a network.
NO_NETWORK = "http://127.0.0.1:9"


def console_script() -> list[str]:
    """The installed `meal-cache` command (what a user runs), or the module where the project is not installed."""
    script = Path(sys.executable).with_name("meal-cache")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "meal_cache"]


def run_console(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """``meal-cache ARGS`` with torch's and Hugging Face's caches under ``home`` (empty unless a test fills them),
    HF_HUB_OFFLINE=1, every proxy a closed port, and PYTHONPATH at this tree (the installed command may be an
    editable install of another checkout)."""
    environment = console_environment(home, **env)
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, timeout=300, env=environment)


def console_environment(home: Path, **env: str) -> dict[str, str]:
    """:func:`run_console`'s environment, for a test that starts the command itself (to interrupt it)."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **_offline_settings(home),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **env,
    }


def _offline_settings(home: Path) -> dict[str, str]:
    """torch's and Hugging Face's caches under ``home``, HF_HUB_OFFLINE=1 and every proxy a closed port."""
    return {
        "TORCH_HOME": str(home / "torch"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        **{name: NO_NETWORK for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
        "no_proxy": "",
        "NO_PROXY": "",
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The refusal's single line, after checking exit status 2, one `Error: ` line on stderr and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    return lines[0]


def one_error_line_in_process(args: list[str]) -> str:
    """:func:`one_error_line` of ``meal-cache ARGS`` run in this process through click (no interpreter start, so a
    test of many refusals pays for one launch, not one each: run one case through :func:`run_console`)."""
    return refusal_line(run_in_process(args))


def run_in_process(args: list[str], home: Path | None = None, monkeypatch=None) -> Result:
    """``meal-cache ARGS`` through click in this process; given ``home`` (and ``monkeypatch``, which undoes it after
    the test), with :func:`run_console`'s caches and closed proxies: torch reads TORCH_HOME and urllib the proxies
    when a download is tried, so only settings read at import (Hugging Face's) need :func:`run_console`."""
    from meal_cache.cli import main

    if home is not None:
        for name, value in _offline_settings(home).items():
            monkeypatch.setenv(name, value)
    return CliRunner().invoke(main, args)


def refusal_line(result: Result) -> str:
    """:func:`one_error_line` of a command run in this process: exit 2, no exception but click's exit, one line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exc_info)
    assert isinstance(result.exception, SystemExit), result.exc_info  # anything else would print a traceback
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    return lines[0]


def ran(result: Result) -> Result:
    """A command run in this process that succeeded (else its output and exception)."""
    assert result.exit_code == 0, (result.output[-3000:], result.exc_info)
    return result


def one_error_line_of(args: list[str], home: Path, *, start_the_script: bool) -> str:
    """The refusal's one line: through the console script for the one case of a table that checks the process's
    contract (``start_the_script``), in this process for the rest."""
    return one_error_line(run_console(args, home)) if start_the_script else one_error_line_in_process(args)
