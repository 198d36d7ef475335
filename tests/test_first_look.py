"""Issue 42, "the first look": the design card's commands as a new user types them, in a scratch folder, through the
real console script; and the refusals such a user met, each one `Error:` line, exit status 2 and nothing left
behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from console import (
    ROOT,
    console_environment,
    console_script,
    one_error_line,
    one_error_line_in_process,
    ran,
    run_console,
    run_in_process,
)

# A fifth of the digits' training rows: the whole card (train, extract, distill, report) in seconds.
DATA = "digits?train_fraction=0.2"


def meal_cache(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """``meal-cache ARGS`` run in ``folder``, as a user at a shell there would."""
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, timeout=300, cwd=folder,
                          env=console_environment(folder / ".home"))  # fmt: skip


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def in_folder(folder: Path, monkeypatch) -> Path:
    """Run the next commands in this process from ``folder`` (a refusal's contract is not about the process: the
    card's commands above start it)."""
    monkeypatch.chdir(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> dict:
    """A scratch folder where the card's commands ran: a teacher trained into teachers/, then extract and distill
    with no --out. Holds the outputs of each command."""
    folder = tmp_path_factory.mktemp("first-look")
    succeeded(meal_cache(["train", "--arch", "resnet8_w4", "--data", DATA, "--epochs", "1", "--quiet",
                          "--out", "teachers/resnet8_w4.pt"], folder))  # fmt: skip
    extract = ["extract", "--teachers", "resnet8_w4", "--teacher-dir", "teachers", "--data", DATA, "--views", "1"]
    first = succeeded(meal_cache([*extract, "--quiet"], folder))
    again = succeeded(meal_cache(extract, folder))
    distill = succeeded(meal_cache(["distill", "--store", "feats.zarr", "--student", "resnet8_w4", "--method", "kd",
                                    "--epochs", "1", "--quiet"], folder))  # fmt: skip
    return {"folder": folder, "extract": extract, "first": first, "again": again, "distill": distill}


def test_the_cards_extract_writes_feats_zarr_here_and_says_complete_when_run_again(card):
    folder = card["folder"]
    assert (folder / "feats.zarr" / "zarr.json").is_file()
    assert "store     feats.zarr  (complete)" in card["first"].stdout
    assert "feats.zarr is complete; nothing to do" in card["again"].stdout


def test_the_cards_distill_writes_a_run_folder_named_from_store_and_method_and_says_where(card):
    folder, run = card["folder"], card["folder"] / "runs" / "feats-kd"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "student.pt"}
    assert json.loads((run / "config.json").read_text())["store"] == "feats.zarr"
    lines = card["distill"].stdout.splitlines()
    assert lines[0] == f"run folder: {Path('runs', 'feats-kd')} (no --out given)"
    assert lines[-1].endswith(f"-> {Path('runs', 'feats-kd', 'student.pt')}")
    # The card's last command evaluates what distill wrote.
    evaluated = succeeded(meal_cache(["evaluate", "runs/feats-kd/student.pt", "--quiet"], folder))
    assert "resnet8_w4 on digits?train_fraction=0.2 (test, 360 images)" in evaluated.stdout


def test_distill_into_its_default_run_folder_again_is_refused_and_keeps_the_run(card, monkeypatch):
    folder = in_folder(card["folder"], monkeypatch)
    before = _snapshot(folder / "runs")
    line = one_error_line_in_process(["distill", "--store", "feats.zarr", "--student", "resnet8_w4", "--method", "kd",
                                      "--epochs", "1", "--quiet"])  # fmt: skip
    assert f"'{Path('runs', 'feats-kd')}' is not empty; pass --resume" in line
    assert _snapshot(folder / "runs") == before


def test_extract_without_out_refuses_a_feats_zarr_of_other_settings(card, monkeypatch):
    folder = in_folder(card["folder"], monkeypatch)
    before = _snapshot(folder / "feats.zarr")
    # Another grid (more views alone would grow the store: tests/test_grow.py).
    line = one_error_line_in_process([*card["extract"], "--grid", "2", "--quiet"])
    assert "'feats.zarr'" in line and "pass --overwrite" in line
    assert _snapshot(folder / "feats.zarr") == before


def test_online_teachers_other_than_the_stores_are_refused_before_anything_is_written(card, monkeypatch):
    folder = in_folder(card["folder"], monkeypatch)
    # A second teacher by another name (its weights the first's: the refusal is about names).
    shutil.copy(folder / "teachers" / "resnet8_w4.pt", folder / "teachers" / "other.pt")
    ran(run_in_process(["extract", "--teachers", "resnet8_w4,other", "--data", DATA, "--views", "1", "--out",
                        "two.zarr", "--quiet"]))  # fmt: skip
    line = one_error_line_in_process(["distill", "--store", "two.zarr", "--student", "resnet8_w4", "--online",
                                      "--teachers", "other", "--epochs", "1", "--out", "runs/online",
                                      "--quiet"])  # fmt: skip
    assert line == ("Error: --online runs the store's own teachers in the loop: 'two.zarr' holds resnet8_w4, other, "
                    "--teachers gave other; pass --teachers resnet8_w4,other")  # fmt: skip
    assert not (folder / "runs" / "online").exists()


def test_a_one_seed_report_says_it_has_no_interval_and_gives_no_verdict(card):
    """A pipeline run of one seed laid out from the card's outputs, then `meal-cache report`: the teacher, its
    store, the kd student, and as the student trained alone the teacher itself (a resnet8_w4 trained with
    cross-entropy, which is what a pipeline's `alone` is)."""
    folder, run = card["folder"], card["folder"] / "one-seed"
    for source, target in [("teachers/resnet8_w4.pt", "teachers/resnet8_w4.pt"),
                           ("teachers/resnet8_w4.pt", "students/alone/seed-0/student.pt"),
                           ("runs/feats-kd/student.pt", "students/kd/seed-0/student.pt")]:  # fmt: skip
        (run / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / source, run / target)
    # A student of the user's own loop, written by save_student with a history of its own (no seconds).
    from meal_cache import save_student
    from meal_cache.data.datasets import load_dataset
    from meal_cache.nets.checkpoint import load_model

    own, _ = load_model(folder / "runs/feats-kd/student.pt")
    save_student(own, run / "students/mine/seed-0/student.pt", arch="resnet8_w4", dataset=load_dataset(DATA),
                 history=[{"epoch": 1, "loss": 0.5}])  # fmt: skip
    shutil.copytree(folder / "feats.zarr", run / "feats.zarr")
    (run / "pipeline.toml").write_text(f"""name = "one-seed"
seeds = [0]
[data]
spec = "{DATA}"
[[teachers]]
name = "resnet8_w4"
arch = "resnet8_w4"
epochs = 1
[store]
views = 1
[student]
arch = "resnet8_w4"
epochs = 1
[methods]
alone = {{}}
kd = {{ method = "kd" }}
mine = {{ method = "kd" }}
""")
    ran(run_in_process(["report", str(run)]))
    report = (run / "report.md").read_text()
    alone = [line for line in report.splitlines() if line.startswith("| kd | top1 |")]
    assert len(alone) == 1 and alone[0].endswith("| 1 seed: no interval | - |"), report
    assert not re.search(r"\bnan\b", report) and "within noise" not in report
    # save_student's checkpoint is read as distill's: the same weights give the same top-1.
    results = json.loads((run / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["mine"]["top1"] == rows["kd"]["top1"], rows
    comparison = results["comparisons"][0]
    assert comparison["ci95"] is None and comparison["within_noise"] is None and comparison["n"] == 1


def test_the_top_level_help_shows_a_typical_run_in_order(tmp_path):
    help_text = succeeded(meal_cache(["--help"], tmp_path)).stdout
    commands = [line.split()[1] for line in help_text.splitlines() if line.strip().startswith("meal-cache ")]
    assert list(dict.fromkeys(commands)) == ["train", "extract", "distill", "evaluate"], help_text


# (case as docs/errors.md names it, the command, what its one Error: line contains)
SLIPS = [
    ("a short list's name mistyped", ["extract", "--teachers", "resnet8_w4", "--for", "mael"],
     "Error: unknown --for method 'mael'; choose one of: acn, afd, all, at, dkd, fitnet, kd, meal, meal-v2; did you "
     "mean meal?"),
    ("distill without a student", ["distill", "--store", "feats.zarr"],
     "Error: Missing option '--student': the student's architecture, e.g. --student resnet8_w4 (`meal-cache models` "
     "lists them)"),
    ("a method's name mistyped", ["distill", "--store", "feats.zarr", "--student", "resnet8_w4", "--method", "mael"],
     "did you mean 'meal'?"),
    ("--scale of one number", ["train", "--arch", "resnet8_w4", "--scale", "0.5", "--out", "t.pt"],
     "Error: --scale takes two numbers, MIN MAX, got '0.5 --out'"),
    ("--ratio cut short", ["extract", "--teachers", "resnet8_w4", "--ratio", "0.75"],
     "Error: --ratio takes two numbers, MIN MAX"),
    ("a flag option not 0 or 1", ["train", "--arch", "resnet8_w4", "--data", "digits?glyphs=yes", "--out", "t.pt"],
     "Error: dataset option glyphs takes 0 or 1, got 'yes'"),
]  # fmt: skip
# The refusals the tests above run on the card's folder, by the same names.
CARD_REFUSALS = [
    ("online teachers other than the store's", "--online runs the store's own teachers in the loop"),
    ("the default run folder taken", "is not empty; pass --resume"),
]


@pytest.mark.parametrize(("case", "args", "expected"), SLIPS, ids=[case for case, _, _ in SLIPS])
def test_a_first_users_slips_give_one_line_that_says_what_to_pass(tmp_path, case, args, expected):
    line = one_error_line(meal_cache(args, tmp_path))
    assert expected in line
    assert [p.name for p in tmp_path.iterdir() if p.name != ".home"] == []


def test_errors_doc_lists_the_first_looks_refusals():
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for case, _, expected in SLIPS:
        assert f"| {case} |" in text and expected.removeprefix("Error: ").split(", got")[0] in text, case
    for case, expected in CARD_REFUSALS:
        assert f"| {case} |" in text and expected in text, case


def test_the_accuracy_plot_draws_the_epochs_a_run_evaluated_and_skips_the_others(tmp_path, monkeypatch):
    """A run evaluated every few epochs (--eval-every, to come) logs the other epochs without test metrics."""
    from meal_cache.pipeline import plots as report_plots

    monkeypatch.setattr(report_plots.plt, "close", lambda fig: None)  # keep the figure to read its lines

    def history(top1: float) -> list[dict]:
        return [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0, "test_top1": top1}, {"epoch": 3, "loss": 0.5},
                {"epoch": 4, "loss": 0.4, "test_top1": top1 + 1}]  # fmt: skip

    results = {"histories": {"kd": {"0": history(90.0), "1": history(92.0)}, "alone": {"0": []}},
               "rows": [{"kind": "ensemble", "top1": {"mean": 95.0}}]}  # fmt: skip
    report_plots.plot_accuracy(results, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    kd = next(line for line in report_plots.plt.gcf().axes[0].lines if line.get_label() == "kd (n=2)")
    assert list(kd.get_xdata()) == [2, 4] and list(kd.get_ydata()) == [91.0, 92.0]
    report_plots.plt.close("all")


@pytest.mark.parametrize("command", [[], ["train"], ["extract"], ["distill"], ["evaluate"], ["run"]])
def test_help_imports_no_torch(command):
    """`--help` of every stage prints without importing torch (seconds on a busy machine): the method and preset
    names, which only the methods' modules know, are shown as NAME (`meal-cache methods` lists them)."""
    code = ("import sys\nfrom meal_cache.cli import main\ntry:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")  # fmt: skip
    ran = subprocess.run([sys.executable, "-c", code, *command, "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "Usage:" in ran.stdout and ran.stderr.strip().splitlines()[-1] == "False"


def test_starting_a_command_imports_no_numpy_and_extract_help_names_every_logits_encoding(tmp_path):
    """The help that names the logits encodings is written when --help is shown: importing the command line, what
    every command does to start, loads neither numpy nor the encodings."""
    code = (
        "import sys, meal_cache.cli; print(sorted(m for m in ('numpy', 'meal_cache.store.logits') if m in sys.modules))"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip() == "[]", ran.stdout + ran.stderr[-2000:]
    shown = " ".join(run_console(["extract", "--help"], tmp_path).stdout.split())
    assert "--logits all|NAME:K" in shown and "sample:K K classes drawn" in shown and "topk:K each row's K" in shown
