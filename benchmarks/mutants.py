"""Mutation testing of one module (issue 43): `make mutants MODULE=meal_cache/dense.py`.

mutmut 3 (the ``dev`` extra) changes one small thing at a time in the module (an operator, a constant, an argument
dropped) and runs the tests that cover it against each change; a change no test notices "survives" and points at
a line whose behaviour nothing pins. This script

- copies the package, the tests and what they read into ``mutants/<module>/`` (git-ignored; the working tree is
  never written), with a ``[tool.mutmut]`` section that mutates only MODULE and selects only its covering tests
  (``COVERING_TESTS`` below, else ``tests/test_<name>.py``, else ``--tests``);
- runs ``mutmut run`` there, one mutant at a time by default (``--jobs``): mutmut runs each mutant against only
  the selected tests that call the mutated function, fastest first, stopping at the first failure;
- prints every survivor as ``file:line`` with the line before and after, then the mutants no selected test
  reached and the ones that timed out.

The expensive session fixtures (``digits``, ``teacher_dir``: two teachers trained for three epochs) would be
rebuilt for every mutant, since each mutant runs its tests in a fresh pytest session. Loaded into those sessions
as a pytest plugin (``-p benchmarks.mutants``), this module "freezes" them: the value computed in mutmut's first,
unmutated session is handed to every later one (they are forked from it). A frozen fixture is computed by the
unmutated code, so a module that such a fixture runs (data.py, train.py, models.py for ``teacher_dir``) needs its
own row with ``frozen=()`` or ``--fresh``.

Tests that start the console script or ``python -m`` run the mutant too (``PYTHONPATH`` names the mutated copy and
mutmut's ``MUTANT_UNDER_TEST`` is inherited), but mutmut cannot see which functions a child process calls, so a
function reached only from a subprocess is listed as "no tests" rather than tried.

After a run, ``cd mutants/<module> && ../../.venv/bin/mutmut show NAME`` prints one mutant's diff and
``mutmut browse`` lists them all.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "mutants"

# The environment variable that names the fixtures to freeze; the plugin hooks do nothing without it.
FROZEN_ENV = "MEAL_MUTANTS_FROZEN_FIXTURES"
DEFAULT_FROZEN = ("digits", "teacher_dir")
# Copied beside the package and tests because tests read them (examples/ is run by tests/test_cached_views.py).
ALSO_COPY = ("examples", "pipelines", "docs", "benchmarks", "README.md", "Makefile")
# Each pytest session of the run keeps its temporary folder (the frozen fixtures' files live in the first one's);
# a later session removes its own when it ends (``pytest_sessionfinish`` below).
KEEP_SESSIONS = 1_000_000
# What survives on a line: mutmut's status names for mutants no test failed on.
REPORTED_STATUSES = {"survived": "survived", "no tests": "no test reached it", "timeout": "timed out"}


@dataclass(frozen=True)
class Cover:
    """The tests that pin a module, and the fixtures safe to freeze for it (computed without the module)."""

    tests: tuple[str, ...]
    frozen: tuple[str, ...] = DEFAULT_FROZEN


# One line a module. A fixture is frozen only where the module's functions do not build it: `made` (test_dense.py:
# a ViT and two CNNs trained at 32 px, a dense store) feeds refusal tests, which run the dense code themselves;
# the stores of small_store, `small` and `method_stores` are extracted without the module's functions (the methods'
# store needs are class attributes, which mutmut leaves alone).
STORE_FROZEN = DEFAULT_FROZEN + ("small_store",)
COVERING_TESTS: dict[str, Cover] = {
    "meal_cache/dense.py": Cover(("tests/test_dense.py",), DEFAULT_FROZEN + ("made",)),
    "meal_cache/store/logits.py": Cover(
        ("tests/test_sampled.py", "tests/test_topk.py", "tests/test_preset_logits.py"), STORE_FROZEN
    ),
    "meal_cache/cached_views.py": Cover(("tests/test_cached_views.py",), DEFAULT_FROZEN + ("small",)),
    "meal_cache/distill/methods/dkd.py": Cover(
        ("tests/test_methods.py", "tests/test_method_settings.py", "tests/test_dkd_numerics.py"),
        DEFAULT_FROZEN + ("method_stores", "batch"),
    ),
    "meal_cache/distill/methods/fitnet.py": Cover(
        ("tests/test_methods.py", "tests/test_method_settings.py"), DEFAULT_FROZEN + ("method_stores", "batch")
    ),
}


def covering_tests(module: str, tests: list[str] | None, fresh: bool) -> Cover:
    """The row for MODULE: ``--tests`` first, then the table, then ``tests/test_<name>.py``."""
    from meal_cache.errors import UserError

    row = COVERING_TESTS.get(module)
    if tests:
        row = Cover(tuple(tests), row.frozen if row else DEFAULT_FROZEN)
    elif row is None:
        guess = f"tests/test_{Path(module).stem}.py"
        if not (ROOT / guess).is_file():
            raise UserError(f"no tests known to cover {module}: add a row to COVERING_TESTS in "
                            f"benchmarks/mutants.py or pass --tests")  # fmt: skip
        row = Cover((guess,))
    for test in row.tests:
        if not (ROOT / test.split("::")[0]).is_file():
            raise UserError(f"test file {test.split('::')[0]} does not exist")
    return Cover(row.tests, () if fresh else row.frozen)


def toml_value(value: object) -> str:
    # JSON's strings, numbers, booleans and arrays of them are TOML's too.
    return json.dumps(value)


def mutmut_section(module: str, cover: Cover) -> str:
    settings = {
        "source_paths": ["meal_cache"],
        "only_mutate": [module],
        "also_copy": list(ALSO_COPY),
        "pytest_add_cli_args": ["-p", "benchmarks.mutants", "-o", f"tmp_path_retention_count={KEEP_SESSIONS}"],
        "pytest_add_cli_args_test_selection": list(cover.tests),
        # Forked from the session that computed the frozen fixtures, so they are inherited.
        "process_isolation": "fork",
        # The copy sits inside the repository's work tree; its git state says nothing about the copy.
        "use_git_change_detection": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def scratch_folder(module: str) -> Path:
    return SCRATCH / module.removesuffix(".py").replace("/", ".")


def prepare(work: Path, module: str, cover: Cover) -> None:
    """A fresh copy of the package, its tests and what they read in WORK, with the mutmut settings for MODULE."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("meal_cache", "tests") + ALSO_COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=ignore)
        elif source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if re.search(r"^\[tool\.mutmut\]", pyproject, flags=re.MULTILINE):
        from meal_cache.errors import UserError

        raise UserError("pyproject.toml has a [tool.mutmut] section; benchmarks/mutants.py writes its own")
    (work / "pyproject.toml").write_text(pyproject + mutmut_section(module, cover))
    # Made before Python starts: a sys.path entry missing at start-up is never looked in again.
    (work / "mutants").mkdir()


def mutant_patterns(module: str, functions: list[str] | None) -> list[str]:
    """mutmut's names for the mutants of the given functions of MODULE (a method as ``Class.method``); all: []."""
    dotted = module.removesuffix(".py").replace("/", ".")
    names = []
    for function in functions or []:
        owner, _, method = function.rpartition(".")
        mangled = f"x\u01c1{owner}\u01c1{method}" if owner else f"x_{function}"
        names.append(f"{dotted}.{mangled}__mutmut_*")
    return names


def run_mutmut(work: Path, cover: Cover, jobs: int, log: Path, only: list[str] | None = None) -> int:
    environment = {
        **os.environ,
        "PYTHONPATH": str(work / "mutants"),
        "PYTEST_DEBUG_TEMPROOT": str(work / "tmp"),
        "OMP_NUM_THREADS": "1",
        # tests/conftest.py then gives torch one thread, as in `make test`'s workers: a child forked from a process
        # whose two-thread OpenMP pool has run hangs at its first parallel op.
        "PYTEST_XDIST_WORKER": "gw0",
        FROZEN_ENV: ",".join(cover.frozen),
    }
    (work / "tmp").mkdir()
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(only or [])]
    with log.open("w") as out:
        return subprocess.run(command, cwd=work, env=environment, stdout=out, stderr=subprocess.STDOUT).returncode


def mutmut_output(work: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, capture_output=True, text=True)
    return result.stdout


def statuses(work: Path) -> dict[str, str]:
    """Every mutant's status, from ``mutmut results --all``."""
    found = {}
    for line in mutmut_output(work, "results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            found[name] = status
    return found


def function_first_lines(source: str) -> dict[str, int]:
    """Each top-level function's and method's first line (its first decorator), by mutmut's mangled name."""
    first = {}

    def start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        return min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])

    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first[f"x_{node.name}"] = start(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    first[f"x\u01c1{node.name}\u01c1{item.name}"] = start(item)
    return first


def located_change(diff: str, first_line: int) -> tuple[int, list[str]]:
    """The source line of a mutant's first changed line, and its changed lines, from mutmut's function diff."""
    line, changed, at = first_line, [], None
    for text in diff.splitlines():
        hunk = re.match(r"@@ -(\d+)", text)
        if hunk:
            line = first_line + int(hunk.group(1)) - 1
        elif text.startswith(("---", "+++")):
            continue
        elif text.startswith("-"):
            at = at or line
            changed.append(f"- {text[1:].strip()}")
            line += 1
        elif text.startswith("+"):
            at = at or line
            changed.append(f"+ {text[1:].strip()}")
        elif text.startswith(" "):
            line += 1
    return at or first_line, changed


def report(work: Path, module: str, found: dict[str, str]) -> dict[str, list[str]]:
    """The mutants no test failed on, grouped by status: each survivor and timeout as ``file:line`` and its
    change, and the untried ones as one line a function (no selected test calls it)."""
    first_lines = function_first_lines((work / module).read_text())
    grouped: dict[str, list[str]] = {status: [] for status in REPORTED_STATUSES}
    untried: dict[str, int] = {}
    for name, status in sorted(found.items(), key=lambda item: mutant_order(item[0])):
        function = name.rpartition(".")[2].rpartition("__mutmut_")[0]
        if status == "no tests":
            untried[function] = untried.get(function, 0) + 1
        elif status in REPORTED_STATUSES:
            diff = mutmut_output(work, "show", name)
            line, changed = located_change(diff, first_lines.get(function, 1))
            grouped[status].append(f"{module}:{line}  {name.rpartition('.')[2]}\n      " + "\n      ".join(changed))
    for function, count in untried.items():
        grouped["no tests"].append(f"{module}:{first_lines.get(function, 1)}  {function} ({count} mutants)")
    return grouped


def mutant_order(name: str) -> tuple[str, int]:
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module", help="the module to mutate, e.g. meal_cache/dense.py")
    parser.add_argument("--tests", nargs="+", help="the test files (or node ids) that cover it, instead of the table")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1: a shared 2-core box)")
    parser.add_argument("--fresh", action="store_true", help="freeze no fixture: every mutant builds its own")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="FUNCTION",
        help="mutate only these functions of the module (a method as Class.method)",
    )
    parser.add_argument("--report", action="store_true", help="print the last run's survivors again; run nothing")
    arguments = parser.parse_args(argv)

    from meal_cache.errors import UserError

    try:
        module = Path(arguments.module).as_posix()
        if not module.startswith("meal_cache/") or not (ROOT / module).is_file():
            raise UserError(f"{arguments.module} is not a module under meal_cache/ (e.g. meal_cache/dense.py)")
        if arguments.jobs < 1:
            raise UserError(f"--jobs must be at least 1, not {arguments.jobs}")
        cover = covering_tests(module, arguments.tests, arguments.fresh)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2

    work = scratch_folder(module)
    if arguments.report:
        if not (work / "mutants").is_dir():
            print(f"Error: no run of {module} in {work.relative_to(ROOT)}; run it without --report first")
            return 2
        seconds = None
    else:
        prepare(work, module, cover)
        log = work / "mutmut.log"
        frozen = ", ".join(cover.frozen) or "none"
        print(f"mutating {module} against {' '.join(cover.tests)}; frozen fixtures: {frozen}")
        print(f"log: {log.relative_to(ROOT)}", flush=True)
        started = time.monotonic()
        code = run_mutmut(work, cover, arguments.jobs, log, mutant_patterns(module, arguments.only))
        seconds = time.monotonic() - started
        if code != 0:
            print(log.read_text()[-3000:])
            print(f"Error: mutmut stopped with status {code} after {seconds:.0f} s (the log's end is above)")
            return 1

    found = statuses(work)
    counts: dict[str, int] = {}
    for status in found.values():
        counts[status] = counts.get(status, 0) + 1
    grouped = report(work, module, found)
    for status, heading in REPORTED_STATUSES.items():
        if grouped[status]:
            print(f"\n{heading} ({len(grouped[status])}):")
            print("\n".join(f"  {entry}" for entry in grouped[status]))
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    took = f"; {seconds:.0f} s" if seconds is not None else ""
    print(f"\n{module}: {sum(counts.values())} mutants: {summary}{took}")
    return 0


# The pytest plugin half, loaded into every session of the run with `-p benchmarks.mutants`. Its one piece of
# module state is the point of it: values that outlive the pytest session that computed them.
@dataclass
class FrozenFixtures:
    names: frozenset[str]
    values: dict[str, object]
    # Per session: whether it computed a frozen value (its temporary folder holds them), and its folders.
    produced: bool = False
    temporary: pytest.TempPathFactory | None = None


_frozen = FrozenFixtures(frozenset(name for name in os.environ.get(FROZEN_ENV, "").split(",") if name), {})


def pytest_sessionstart(session: pytest.Session) -> None:
    _frozen.produced, _frozen.temporary = False, None
    forget_inherited_thread_pools()


def forget_inherited_thread_pools() -> None:
    """A forked session inherits dask's default thread pool without its threads (fork copies only the calling
    thread), so its first dask compute (inspect, --refine-labels) would wait forever for workers that no longer
    exist. dask makes a new pool where it finds none. The pool's lock is left alone: taking a lock copied in
    whatever state the parent held it could itself wait forever."""
    threaded = sys.modules.get("dask.threaded")
    if threaded is not None:
        threaded.default_pool = None
        threaded.pools.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> object | None:
    if fixturedef.argname not in _frozen.values:
        return None
    value = _frozen.values[fixturedef.argname]
    fixturedef.cached_result = (value, fixturedef.cache_key(request), None)
    return value


@pytest.hookimpl(wrapper=True, specname="pytest_fixture_setup")
def pytest_fixture_setup_remember(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> object:
    value = yield
    name = fixturedef.argname
    if name == "tmp_path_factory":
        _frozen.temporary = value
    elif name in _frozen.names and name not in _frozen.values and fixturedef.scope in ("session", "module"):
        _frozen.values[name] = value
        _frozen.produced = True
    return value


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # A mutant's session leaves nothing worth keeping; hundreds of them would fill the disk with stores.
    if _frozen.temporary is not None and not _frozen.produced:
        shutil.rmtree(_frozen.temporary.getbasetemp(), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
