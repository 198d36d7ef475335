"""Fidelity and KL to the teachers' ensemble: from teacher checkpoints and from a store of the test split."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from meal_cache.cli import main
from meal_cache.engine.evaluate import ensemble_probabilities, evaluate_checkpoint, fidelity, kl_to_ensemble
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract

TEACHERS = ["resnet8_w4", "densenet_k12"]


def _extract_test_store(teacher_dir, digits, path, views: int = 0, identity_view: bool = True):
    config = ExtractConfig(teachers=TEACHERS, split="test", views=views, identity_view=identity_view,
                           teacher_dir=str(teacher_dir), device="cpu", rows_per_chunk=256)  # fmt: skip
    extract(config, path, progress=False, dataset=digits)
    return path


@pytest.fixture(scope="module")
def test_store(tmp_path_factory, teacher_dir, digits):
    """The digits test split, both teachers, the identity view only: what `evaluate --store` expects."""
    return _extract_test_store(teacher_dir, digits, tmp_path_factory.mktemp("eval") / "test_feats.zarr")


@pytest.fixture(scope="module")
def augmented_store(tmp_path_factory, teacher_dir, digits):
    """The same split with one augmented view and no identity view: refused by `evaluate --store`."""
    return _extract_test_store(teacher_dir, digits, tmp_path_factory.mktemp("eval") / "augmented.zarr", views=1,
                               identity_view=False)  # fmt: skip


def test_ensemble_is_the_mean_of_probabilities_not_of_logits():
    first, second = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    probs = ensemble_probabilities([first, second])
    expected = (torch.softmax(first, 1) + torch.softmax(second, 1)) / 2
    assert torch.allclose(probs, expected) and probs.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(probs, torch.softmax((first + second) / 2, 1))
    # float16 logits (as a store holds them) are computed in float32.
    assert ensemble_probabilities([first.half()]).dtype == torch.float32


def test_fidelity_and_kl_of_a_student_equal_to_its_ensemble():
    # tests/test_pipeline.py covers a hand-computed KL and a 50% fidelity; here the limits.
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 1.0], [1.0, 1.5, 4.0]])
    same = torch.softmax(logits, 1)
    assert fidelity(logits, same) == 100.0 and kl_to_ensemble(logits, same) == pytest.approx(0.0, abs=1e-6)
    reversed_ = torch.softmax(-logits, 1)
    assert fidelity(logits, reversed_) == 0.0 and kl_to_ensemble(logits, reversed_) > 0
    # Batch mean: one image far off and one identical give half that image's KL.
    off = torch.tensor([[0.98, 0.01, 0.01]])
    kl_one = kl_to_ensemble(torch.zeros(1, 3), off)
    expected = sum(p * math.log(p * 3) for p in (0.98, 0.01, 0.01))
    assert kl_one == pytest.approx(expected, rel=1e-5)
    pair = kl_to_ensemble(torch.zeros(2, 3), torch.cat([off, torch.full((1, 3), 1 / 3)]))
    assert pair == pytest.approx(kl_one / 2, rel=1e-5)


def test_store_gives_the_fidelity_and_kl_of_the_checkpoints(teacher_dir, test_store):
    # One teacher evaluated as the student: it agrees with an ensemble it is half of (the densenet, the stronger
    # of the two after the fixture's three epochs, about 83% against 40%, so the ensemble mostly follows it).
    student = str(teacher_dir / "densenet_k12.pt")
    from_checkpoints = evaluate_checkpoint(student, device="cpu",
                                           teachers=[str(teacher_dir / f"{t}.pt") for t in TEACHERS])  # fmt: skip
    from_store = evaluate_checkpoint(student, device="cpu", store=str(test_store))
    expected, got = from_checkpoints["metrics"], from_store["metrics"]
    assert got["fidelity"] == pytest.approx(expected["fidelity"], abs=1e-3)
    assert got["kl_to_ensemble"] == pytest.approx(expected["kl_to_ensemble"], abs=1e-3)
    assert got["fidelity"] >= 80.0 and got["kl_to_ensemble"] < 1.0
    assert {k: got[k] for k in ("top1", "nll", "ece", "n")} == {k: expected[k] for k in ("top1", "nll", "ece", "n")}
    assert from_store["teachers"] == TEACHERS and from_store["store"] == str(test_store)
    assert from_checkpoints["store"] is None


def test_store_of_other_data_or_without_identity_view_is_refused(teacher_dir, test_store, augmented_store,
                                                                 small_store, tmp_path):  # fmt: skip
    student = str(teacher_dir / "resnet8_w4.pt")
    train_store, _ = small_store
    with pytest.raises(UserError, match="it caches the train split, not test"):
        evaluate_checkpoint(student, device="cpu", store=str(train_store))
    # Evaluating on the train split against a test store: the split is named the other way round.
    with pytest.raises(UserError, match="it caches the test split, not train"):
        evaluate_checkpoint(student, device="cpu", split="train", store=str(test_store))
    with pytest.raises(UserError, match="fingerprint differs"):
        evaluate_checkpoint(student, data="digits?folds=5&fold=0", device="cpu", store=str(test_store))
    with pytest.raises(UserError, match="no identity view .* extract it with --identity-view"):
        evaluate_checkpoint(student, device="cpu", store=str(augmented_store))
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(test_store, incomplete)
    zarr.open_group(str(incomplete), mode="r+").attrs.update({"complete": False})
    with pytest.raises(UserError, match="store is incomplete"):
        evaluate_checkpoint(student, device="cpu", store=str(incomplete))
    with pytest.raises(UserError, match="pass only one of them"):
        evaluate_checkpoint(student, device="cpu", teachers=[student], store=str(test_store))


def test_cli_evaluate_with_a_store(teacher_dir, test_store, tmp_path):
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["evaluate", str(teacher_dir / "densenet_k12.pt"), "--store", str(test_store),
                                       "--device", "cpu", "--json", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fidelity" in result.output and "KL" in result.output
    recorded = json.loads(report.read_text())
    assert recorded["store"] == str(test_store) and recorded["metrics"]["fidelity"] >= 80.0


def test_cli_store_errors_are_one_line_and_change_nothing(teacher_dir, test_store, augmented_store, small_store,
                                                          tmp_path):  # fmt: skip
    """The rows docs/errors.md adds for --store, run as tests/test_errors.py runs its own."""
    student = str(teacher_dir / "resnet8_w4.pt")
    train_store, _ = small_store
    json_out = tmp_path / "never.json"
    # The first three are the rows docs/errors.md adds; a missing store was there already.
    cases = [
        (["--teachers", student, "--store", str(test_store)], "pass only one of them"),
        (["--store", str(train_store)], "it caches the train split, not test"),
        (["--store", str(augmented_store)], "extract it with --identity-view"),
        (["--store", str(tmp_path / "none.zarr")], "store not found"),
    ]

    def snapshot() -> dict[str, tuple[int, int]]:
        stores = (test_store, train_store, augmented_store)
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for s in stores for p in s.rglob("*") if p.is_file()}

    before = snapshot()
    for extra, message in cases:
        result = CliRunner().invoke(main, ["evaluate", student, "--device", "cpu", "--json", str(json_out), *extra])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, (result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exc_info  # not an uncaught exception
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
        assert not json_out.exists()
    assert snapshot() == before, "a refused evaluate changed a store"
    errors_doc = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for _, message in cases[:3]:
        assert f"| {message} |" in errors_doc, message
