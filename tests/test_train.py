from __future__ import annotations

import math

import pytest
import torch

from meal_cache.engine.evaluate import classification_metrics, evaluate
from meal_cache.engine.loop import epoch_batches, learning_rate, steps_per_epoch
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.errors import UserError
from meal_cache.nets.checkpoint import load_checkpoint, load_model


def test_short_training_on_digits_learns_far_above_chance(tmp_path, digits):
    out = tmp_path / "teacher.pt"
    config = TrainConfig(arch="resnet8", data="digits", epochs=3, seed=0, device="cpu")
    payload = train_supervised(config, out, progress=False, dataset=digits)
    assert payload["metrics"]["test"]["top1"] > 80.0  # chance is 10%
    assert [h["epoch"] for h in payload["history"]] == [1, 2, 3]
    assert payload["history"][-1]["loss"] < payload["history"][0]["loss"]

    # The checkpoint loads with weights_only=True and reproduces the recorded accuracy.
    raw = torch.load(out, weights_only=True)
    assert raw["arch"] == "resnet8" and raw["classes"] == list(digits.classes)
    assert raw["input"]["image_size"] == 16 and raw["data"]["fingerprint"]["train"] == digits.fingerprint("train")
    model, _ = load_model(out)
    assert evaluate(model, digits)["top1"] == pytest.approx(payload["metrics"]["test"]["top1"])


def test_same_seed_gives_the_same_weights(tmp_path, digits):
    config = TrainConfig(arch="resnet8_w4", data="digits", epochs=2, seed=3, device="cpu")
    full = train_supervised(config, tmp_path / "a.pt", progress=False, dataset=digits)
    twin = train_supervised(config, tmp_path / "b.pt", progress=False, dataset=digits)
    for key, value in full["model"].items():
        assert torch.equal(value, twin["model"][key]), key


def test_resume_continues_an_interrupted_run(tmp_path, digits, interrupt_on_call):
    import meal_cache.engine.loop as loop_module

    config = TrainConfig(arch="resnet8_w4", data="digits", epochs=2, seed=1, device="cpu")
    reference = train_supervised(config, tmp_path / "ref.pt", progress=False, dataset=digits)

    undo = interrupt_on_call(loop_module, "run_epoch", 2)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(config, tmp_path / "run.pt", progress=False, dataset=digits)
    assert load_checkpoint(tmp_path / "run.pt")["epoch"] == 1
    undo()

    with pytest.raises(UserError, match="--resume"):
        train_supervised(config, tmp_path / "run.pt", progress=False, dataset=digits)
    resumed = train_supervised(config, tmp_path / "run.pt", resume=True, progress=False, dataset=digits)
    assert resumed["epoch"] == 2
    for key, value in reference["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float(), atol=1e-5), key

    other = TrainConfig(**{**config.__dict__, "lr": 0.01})
    with pytest.raises(UserError, match="other settings"):
        train_supervised(other, tmp_path / "run.pt", resume=True, progress=False, dataset=digits)


def test_learning_rate_schedules():
    assert learning_rate(0, 100, 0.1, "cosine", 10) == pytest.approx(0.01)
    assert learning_rate(10, 100, 0.1, "cosine", 10) == pytest.approx(0.1)
    assert learning_rate(55, 100, 0.1, "cosine", 10) == pytest.approx(0.05)
    assert learning_rate(99, 100, 0.1, "cosine", 0) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)))
    assert learning_rate(60, 100, 0.1, "step", 0) == pytest.approx(0.01)
    assert learning_rate(80, 100, 0.1, "step", 0) == pytest.approx(0.001)
    assert learning_rate(80, 100, 0.1, "constant", 0) == 0.1


def test_classification_metrics_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(50.0)  # rows 0 and 2 (row 3 is a tie broken to class 0)
    assert metrics["top5"] == pytest.approx(100.0)
    expected_nll = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["nll"] == pytest.approx(expected_nll) and metrics["n"] == 4


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a meal-cache checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_steps_per_epoch_counts_what_epoch_batches_cuts():
    for n, batch_size in [(1437, 64), (128, 64), (10, 64), (64, 64), (65, 64), (1, 1)]:
        batches = epoch_batches(n, batch_size, torch.Generator().manual_seed(0))
        assert steps_per_epoch(n, batch_size) == len(batches), (n, batch_size)


def test_checkpoints_carry_the_loss_scaler_state(tmp_path, digits):
    from meal_cache.engine.loop import Optimisation

    config = TrainConfig(arch="resnet8_w4", data="digits", epochs=1, seed=0, device="cpu")
    payload = train_supervised(config, tmp_path / "a.pt", progress=False, dataset=digits)
    assert "scaler" in load_checkpoint(tmp_path / "a.pt") and "optimizer" in payload

    # An fp16 GPU's scaler, on the CPU: its scale and growth tracker survive the round trip the loop makes.
    weight = torch.nn.Parameter(torch.ones(3))

    def optimisation() -> Optimisation:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        return Optimisation(torch.optim.SGD([weight], lr=0.1), scaler)

    trained = optimisation()
    for _ in range(5):
        trained.step((weight**2).sum())
    assert trained.scaler.get_scale() != 2.0**10
    restored = optimisation()
    restored.load_state_dict(trained.state_dict())
    assert restored.scaler.get_scale() == trained.scaler.get_scale()
    assert restored.scaler.state_dict() == trained.scaler.state_dict()


def test_train_settings_outside_their_range_are_refused(tmp_path, digits):
    cases = [({"schedule": "linear"}, "schedule"), ({"label_smoothing": 1.0}, "--label-smoothing"),
             ({"weight_decay": -1.0}, "--weight-decay"), ({"batch_size": 0}, "--batch-size")]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train_supervised(TrainConfig(arch="resnet8_w4", **overrides), tmp_path / "x.pt", progress=False,
                             dataset=digits)  # fmt: skip
    assert not (tmp_path / "x.pt").exists()
