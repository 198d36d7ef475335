"""`--tensorboard` (issue 31): each epoch's record of metrics.jsonl (or of a train checkpoint's history) as
TensorBoard scalars, read back with TensorBoard's own EventAccumulator; a resumed run logs each epoch once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from console import one_error_line, run_console

from meal_cache.distill import DistillConfig, distill
from meal_cache.distill import run as distill_run
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_checkpoint

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``log_dir``: (step, value) pairs by tag, purged events left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _assert_scalars_are_the_records(scalars: dict[str, list[tuple[int, float]]], records: list[dict]) -> None:
    """One scalar per number of each record, at step = its epoch, equal to it as float32 holds it."""
    numbers = {key for record in records for key, value in record.items()
               if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)}  # fmt: skip
    assert set(scalars) == numbers, (sorted(scalars), sorted(numbers))
    for tag, events in scalars.items():
        expected = [(r["epoch"], r[tag]) for r in records if tag in r]
        assert [step for step, _ in events] == [step for step, _ in expected], tag
        for (_, value), (_, want) in zip(events, expected, strict=True):
            assert math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-6), (tag, value, want)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, digits) -> Path:
    """A store of one resnet8_w4 teacher trained one epoch: 2 views, blocks and maps (what meal reads)."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    folder = tmp_path_factory.mktemp("tb-store")
    train_supervised(TrainConfig(arch="resnet8_w4", epochs=1, device="cpu"), folder / "resnet8_w4.pt",
                     progress=False, dataset=digits)  # fmt: skip
    config = ExtractConfig(teachers=["resnet8_w4"], views=2, teacher_dir=str(folder), rows_per_chunk=512,
                           device="cpu")  # fmt: skip
    extract(config, folder / "feats.zarr", progress=False, dataset=digits)
    return folder / "feats.zarr"


def test_distill_tensorboard_holds_what_metrics_jsonl_holds(tiny_store, tmp_path):
    out = tmp_path / "run"
    done = run_console(["distill", "--store", str(tiny_store), "--student", "resnet8_w4", "--epochs", "2",
                        "--device", "cpu", "--quiet", "--tensorboard", "--out", str(out)], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    scalars = _scalars(out / "tensorboard")
    # meal's named losses, its discriminators' accuracy, the learning rate and the test metrics among them.
    assert {"loss", "lr", "train_top1", "test_top1"} <= set(scalars) and any("acc" in tag for tag in scalars)
    _assert_scalars_are_the_records(scalars, records)
    # Not a setting of the run: its config.json is the one of a run without it.
    assert "tensorboard" not in json.loads((out / "config.json").read_text())


def test_train_tensorboard_holds_the_checkpoints_history(tmp_path):
    out = tmp_path / "teachers" / "small.pt"
    done = run_console(["train", "--arch", "resnet8_w4", "--epochs", "2", "--device", "cpu", "--quiet",
                        "--tensorboard", "--out", str(out)], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    history = load_checkpoint(out)["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    _assert_scalars_are_the_records(_scalars(tmp_path / "teachers" / "tensorboard" / "small"), history)


def test_a_run_resumed_after_logging_an_epoch_logs_it_once(tiny_store, tmp_path, digits, interrupt_on_call):
    torch.set_num_threads(1)  # as the console script runs; two threads on a busy 2-core machine are slower
    config = DistillConfig(store=str(tiny_store), student="resnet8_w4", method="kd", epochs=2, device="cpu")
    out = tmp_path / "run"
    # Killed after epoch 2's record was written (metrics.jsonl, TensorBoard) and before its last.pt.
    restore = interrupt_on_call(distill_run.DistillRun, "save_state", 2)
    with pytest.raises(KeyboardInterrupt):
        distill(config, out, progress=False, dataset=digits, tensorboard=True)
    restore()
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert [s for s, _ in _scalars(out / "tensorboard")["loss"]] == [1, 2]
    summary = distill(config, out, resume=True, progress=False, dataset=digits, tensorboard=True)
    # Epoch 2 ran twice; TensorBoard shows the resumed run's, once, as the history holds it.
    _assert_scalars_are_the_records(_scalars(out / "tensorboard"), summary["history"])


def test_tensorboard_without_its_package_is_one_line(tmp_path):
    hidden = tmp_path / "without-tensorboard"
    hidden.mkdir()
    (hidden / "tensorboard.py").write_text("raise ImportError('tensorboard is hidden by the test')\n")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    refused = run_console(["distill", "--store", str(tmp_path), "--student", "resnet8_w4", "--tensorboard", "--out",
                           str(out)], tmp_path, PYTHONPATH=f"{hidden}:{root}")  # fmt: skip
    line = one_error_line(refused)
    assert "--tensorboard needs the tensorboard package" in line and "pip install 'meal-cache[tensorboard]'" in line
    assert not out.exists()


def test_errors_doc_lists_the_tensorboard_row():
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    assert "| --tensorboard without its package |" in text and "pip install 'meal-cache[tensorboard]'" in text
