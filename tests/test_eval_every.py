"""``--eval-every N`` on train and distill (issue 42): the test split is evaluated after every N-th epoch and the
last; the other epochs' records carry no test metrics; evaluating changes no weight, a resumed run evaluates the
epochs an uninterrupted one does, and a bad N is one ``Error:`` line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from console import one_error_line, one_error_line_of, run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig
from meal_cache.distill.built_run import config_json
from meal_cache.engine.loop import evaluated_epoch
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.errors import UserError
from meal_cache.nets.checkpoint import load_checkpoint

# A fifth of the digits' training rows (288): an epoch of resnet8_w4 in well under a second.
DATA = "digits?train_fraction=0.2"
TEST_FIELDS = {"test_top1", "test_top5", "test_nll"}


@pytest.fixture(scope="module")
def few_digits():
    return load_dataset(DATA)


def _tested_epochs(history: list[dict]) -> list[int]:
    return [record["epoch"] for record in history if TEST_FIELDS <= set(record)]


def test_the_evaluated_epochs_are_the_multiples_of_n_and_the_last():
    assert [e for e in range(1, 8) if evaluated_epoch(e, 3, 7)] == [3, 6, 7]
    assert [e for e in range(1, 7) if evaluated_epoch(e, 3, 6)] == [3, 6]
    assert [e for e in range(1, 5) if evaluated_epoch(e, 1, 4)] == [1, 2, 3, 4]
    assert [e for e in range(1, 5) if evaluated_epoch(e, 10, 4)] == [4]


def test_train_evaluates_every_nth_epoch_and_trains_the_same_weights(tmp_path, few_digits):
    def run(eval_every: int, name: str) -> dict:
        config = TrainConfig(arch="resnet8_w4", data=DATA, epochs=3, seed=2, device="cpu", eval_every=eval_every)
        return train_supervised(config, tmp_path / name, progress=False, dataset=few_digits)

    every, sparse = run(1, "every.pt"), run(2, "sparse.pt")
    assert _tested_epochs(every["history"]) == [1, 2, 3]
    assert _tested_epochs(sparse["history"]) == [2, 3]
    assert not TEST_FIELDS & set(sparse["history"][0])  # no fake number where nothing was measured
    # The test pass changes nothing the training reads: the same weights, the same last test metrics.
    for key, value in every["model"].items():
        assert torch.equal(value, sparse["model"][key]), key
    assert sparse["metrics"]["test"] == every["metrics"]["test"]
    assert sparse["history"][-1]["test_top1"] == every["history"][-1]["test_top1"]
    assert load_checkpoint(tmp_path / "sparse.pt")["config"]["eval_every"] == 2
    assert "eval_every" not in load_checkpoint(tmp_path / "every.pt")["config"]  # N = 1: the records of before


def test_a_resumed_train_evaluates_the_epochs_an_uninterrupted_one_does(tmp_path, few_digits, interrupt_on_call):
    import meal_cache.engine.loop as loop_module

    config = TrainConfig(arch="resnet8_w4", data=DATA, epochs=4, seed=1, device="cpu", eval_every=3)
    reference = train_supervised(config, tmp_path / "ref.pt", progress=False, dataset=few_digits)
    assert _tested_epochs(reference["history"]) == [3, 4]

    undo = interrupt_on_call(loop_module, "run_epoch", 3)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(config, tmp_path / "run.pt", progress=False, dataset=few_digits)
    stopped = load_checkpoint(tmp_path / "run.pt")
    assert stopped["epoch"] == 2 and stopped["metrics"]["test"] is None  # epoch 2 was not evaluated
    undo()
    resumed = train_supervised(config, tmp_path / "run.pt", resume=True, progress=False, dataset=few_digits)
    assert _tested_epochs(resumed["history"]) == [3, 4]
    assert [r["test_top1"] for r in resumed["history"][2:]] == [r["test_top1"] for r in reference["history"][2:]]

    other = TrainConfig(**{**config.__dict__, "eval_every": 1})
    with pytest.raises(UserError, match="other settings.*eval_every"):
        train_supervised(other, tmp_path / "run.pt", resume=True, progress=False, dataset=few_digits)


def test_distill_through_the_console_writes_test_metrics_only_for_the_evaluated_epochs(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "run"
    result = run_console(["distill", "--store", str(path), "--student", "resnet8_w4", "--method", "kd",
                          "--epochs", "3", "--eval-every", "2", "--device", "cpu", "--out", str(out)],
                         tmp_path / "home")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert _tested_epochs(records) == [2, 3] and not TEST_FIELDS & set(records[0])
    assert "loss" in records[0] and "seconds" in records[0]  # the epoch's own numbers are all there
    assert json.loads((out / "config.json").read_text())["eval_every"] == 2
    # The epoch lines name the test accuracy only where it was measured.
    lines = [line for line in result.stdout.splitlines() if re.match(r"kd epoch \d/3  loss ", line)]
    assert ["test " in line for line in lines] == [False, True, True], result.stdout + result.stderr[-3000:]
    student = load_checkpoint(out / "student.pt")
    assert student["metrics"]["test"]["top1"] == records[-1]["test_top1"]


def test_eval_every_one_leaves_the_records_of_before():
    """N = 1 is not recorded, so config.json and pipeline stamps of runs made before the option stay equal."""
    assert "eval_every" not in config_json(DistillConfig(store="", student="s").resolved())
    assert config_json(DistillConfig(store="", student="s", eval_every=5).resolved())["eval_every"] == 5
    assert "eval_every" not in TrainConfig(arch="resnet8_w4").recorded()


@pytest.mark.parametrize(
    "args",
    [["train", "--arch", "resnet8_w4", "--eval-every", "0", "--out", "t.pt"],
     ["distill", "--store", ".", "--student", "resnet8_w4", "--eval-every", "-1", "--out", "run"]],
    ids=["train 0", "distill -1"],
)  # fmt: skip
def test_an_eval_every_below_one_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run_console(args, tmp_path / "home"))
    assert line == f"Error: --eval-every must be at least 1, got {args[args.index('--eval-every') + 1]}"
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []


PIPELINE = """
name = "p"
[data]
spec = "digits"
[[teachers]]
name = "resnet"
arch = "resnet8_w4"
epochs = 1
[student]
arch = "resnet8_w4"
epochs = 2
{student}
[methods]
alone = {{}}
kd = {{ method = "kd" }}
"""


@pytest.mark.parametrize("where", ["[student]", "[[teachers]]"])
def test_a_pipelines_eval_every_below_one_is_refused_when_the_file_is_read(tmp_path, monkeypatch, where):
    text = PIPELINE.format(student="eval_every = 0" if where == "[student]" else "")
    if where == "[[teachers]]":
        text = text.replace("epochs = 1", "epochs = 1\neval_every = 0")
    (tmp_path / "p.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    line = one_error_line_of(["run", "p.toml"], tmp_path / "home", start_the_script=where == "[student]")
    assert line.endswith("--eval-every must be at least 1, got 0"), line
    assert ("teacher resnet" if where == "[[teachers]]" else "method alone") in line
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == ["p.toml"]


def test_a_pipelines_eval_every_reaches_its_steps_and_their_stamps(tmp_path):
    from meal_cache.pipeline.config import load_pipeline
    from meal_cache.pipeline.run import _student_step

    file = tmp_path / "p.toml"
    file.write_text(
        PIPELINE.format(student="eval_every = 4").replace(
            'kd = { method = "kd" }', 'kd = { method = "kd" }\nkd-every = { method = "kd", eval_every = 1 }'
        )
    )
    pipeline = load_pipeline(file)
    stamps = {}

    class Recorder:
        def run(self, name, settings, _inputs, _outputs, _action):
            stamps[name] = settings

    for name in ("alone", "kd", "kd-every"):
        _student_step(Recorder(), pipeline, tmp_path, name, 0, {}, "cpu", False)
    assert stamps["alone/seed-0"]["eval_every"] == 4 and stamps["kd/seed-0"]["eval_every"] == 4
    assert "eval_every" not in stamps["kd-every/seed-0"]  # a method's own setting wins; 1 leaves the stamp as before
