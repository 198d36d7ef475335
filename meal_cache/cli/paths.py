"""Paths a command names, checked as click reads them, before the command imports torch (seconds on a busy
machine): a store, a checkpoint, a dataset's folder or file that is not there is refused at once, in the words
the library uses when it finds the same (``open_store``, ``load_checkpoint``, the imagefolder and npz sources).

Only paths on this machine are checked here; a URL (``s3://...``) is left to the library, whose filesystem
packages know it. The options and arguments these callbacks check are eager: click processes them before every
other one, wherever they stand on the command line; ``--help`` (eager too) given before them is still shown.
distill checks its ``--store`` in the command itself, after click's checks of its options (a missing
``--student``, a mistyped ``--method``: those say what to pass, and come first) and before its imports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from meal_cache.errors import UserError


def _is_url(path: str) -> bool:
    return "://" in path


def check_store_exists(path: str) -> None:
    """A store path on this machine that is not there: ``open_store``'s refusal, before torch is imported."""
    if not _is_url(path) and not Path(path).exists():
        raise UserError(f"store not found: '{path}'")


def check_config_file_exists(path: str) -> None:
    """A ``--config`` file that is not a file: ``load_step_file``'s refusal, before torch is imported."""
    if not Path(path).is_file():
        raise UserError(f"--config file not found: '{path}'")


def check_checkpoint_exists(path: str) -> None:
    """A checkpoint that is not a file: ``load_checkpoint``'s refusal, before torch is imported."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: '{path}'")


def _imagefolder_problem(root: Path) -> str | None:
    if root.is_dir():
        return None
    return f"imagefolder '{root}': " + ("is a file, not a folder" if root.exists() else "folder does not exist")


def _npz_problem(path: Path) -> str | None:
    return None if path.is_file() else f"npz file not found: '{path}'"


# Data kinds whose ARG is a path on this machine: what is wrong with it, in the words its source uses.
LOCAL_DATA_PATHS: dict[str, Callable[[Path], str | None]] = {"imagefolder": _imagefolder_problem, "npz": _npz_problem}


def data_path_of(spec: str) -> tuple[str, str]:
    """``(kind, arg)`` of ``NAME[:ARG][?OPTION=VALUE&...]``, split as the data registry's ``parse_spec`` splits it."""
    head, sep, tail = spec.rpartition("?")
    base = head if sep and "=" in tail else spec
    kind, _, arg = base.partition(":")
    return kind, arg


def check_data_path(spec: str) -> None:
    """A dataset whose folder or file (``imagefolder:PATH``, ``npz:PATH``) is not there: its source's refusal."""
    kind, arg = data_path_of(spec)
    problem_of = LOCAL_DATA_PATHS.get(kind)
    if problem_of is None or not arg or _is_url(arg):
        return
    problem = problem_of(Path(arg))
    if problem is not None:
        raise UserError(problem)


def _callback(check: Callable[[str], None]) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def checked(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            check(value)
        return value

    return checked


existing_store = _callback(check_store_exists)
existing_checkpoint = _callback(check_checkpoint_exists)
existing_data = _callback(check_data_path)
