"""The wheel ships the pipelines and examples (issue 42): built from this tree, installed into a bare folder and
used from a folder outside the repository, `meal-cache run` finds a shipped pipeline by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from console import ROOT, one_error_line


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built from this tree and installed (no dependencies: the test's own environment has them) into a
    target folder; a working folder outside the repository; the environment that imports the installed copy."""
    base = tmp_path_factory.mktemp("wheel")
    wheels, target, elsewhere = base / "wheels", base / "target", base / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: setuptools builds in the source folder, whose build/ of an earlier build would reach the
    # wheel (and the tree stays as it was).
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "data", "bench", "mutants", "__pycache__", "*.egg-info"))  # fmt: skip
    pip = [sys.executable, "-m", "pip"]
    _succeeds([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], base)
    (wheel,) = wheels.glob("meal_cache-*.whl")
    _succeeds([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)], base)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return {"target": target, "cwd": elsewhere, "env": env}


def _succeeds(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def _python(installed: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=installed["cwd"], env=installed["env"])  # fmt: skip


def test_the_installed_package_is_the_wheels_and_holds_the_pipelines_and_examples(installed):
    where = _python(installed, "-c", "import meal_cache; print(meal_cache.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed["target"]), where.stdout + where.stderr
    package = installed["target"] / "meal_cache"
    shipped = sorted(p.name for p in (package / "pipelines").glob("*.toml"))
    assert shipped == sorted(p.name for p in (ROOT / "pipelines").glob("*.toml")) and "digits.toml" in shipped
    assert (package / "examples" / "kd_loop.py").read_text() == (ROOT / "examples" / "kd_loop.py").read_text()


def test_run_finds_a_shipped_pipeline_by_name_outside_the_repository(installed):
    helped = _python(installed, "-m", "meal_cache", "run", "--help")
    assert helped.returncode == 0 and "ships with meal-cache" in helped.stdout, helped.stderr[-3000:]
    resolved = _python(
        installed,
        "-c",
        "from meal_cache.pipeline.config import load_pipeline, resolve_pipeline; "
        "p = load_pipeline(resolve_pipeline('digits')); print(p.name, p.path, len(p.methods))",
    )
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    name, path, methods = resolved.stdout.split()
    assert name == "digits" and Path(path).is_relative_to(installed["target"]) and int(methods) >= 4
    line = one_error_line(_python(installed, "-m", "meal_cache", "run", "digtis"))
    assert "no shipped pipeline is named 'digtis'; shipped: " in line and line.endswith("did you mean digits?")
    assert list(installed["cwd"].iterdir()) == []  # nothing written where it was refused
