"""A method with discriminators is one class on :class:`AdversarialMethod`: a game written in the test (one
output discriminator on softened probabilities, not one of MEAL's family) is played by the distillation step in
both games, and a method without discriminators refuses the game's settings."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from meal_cache import losses
from meal_cache.distill import DistillConfig, distill, registry
from meal_cache.distill.methods.adversarial import (
    GAME_SETTINGS,
    AdversarialInput,
    AdversarialMethod,
    AdversarialOutput,
)
from meal_cache.errors import UserError


class OutputGame(AdversarialMethod):
    """Soft labels plus one discriminator that tells the ensemble's softened probabilities from the student's."""

    name: ClassVar[str] = "output-game"
    help: ClassVar[str] = "soft labels and an output discriminator (a test's method)"
    own_discriminators: ClassVar[tuple[str, ...]] = ("output",)

    def __init__(self, student, config, store, image_size):
        super().__init__(student, config, store, image_size)
        self.discriminators["probs"] = losses.MLPDiscriminator(store.attrs["dataset"]["num_classes"])

    def forward(self, batch):
        logits = batch.student(batch.images).float()
        soft_sets = self.teacher_soft_targets(batch)
        out = AdversarialOutput(logits, self.label_losses(logits, soft_sets, batch.labels))
        student_probs = F.softmax(logits / self.config.temperature, dim=1)
        out.adversarial = [AdversarialInput("probs", p, student_probs, 1.0) for p in soft_sets]
        return out


@pytest.fixture
def with_output_game(monkeypatch):
    methods = {**registry.available_methods(), OutputGame.name: OutputGame}
    monkeypatch.setattr(registry, "available_methods", lambda: methods)


def _first_epoch(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("game", ["adversarial", "joint"])
def test_a_game_of_the_tests_own_is_played_by_the_step(with_output_game, small_store, digits, tmp_path, game):
    store, _ = small_store
    config = DistillConfig(store=str(store), student="resnet8_w4", method="output-game", epochs=1, batch_size=128,
                           adv_weight=0.3, adv_game=game, device="cpu", workers=0)  # fmt: skip
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    record = _first_epoch(tmp_path / "run")
    # The discriminator's own loss and accuracy are logged in both games; the student's loss for fooling it is
    # adv/ in the adversarial game, and in the joint game the discriminator's loss joins the student's (joint/).
    assert "disc/probs" in record and "disc_acc/probs" in record
    student_term = "adv/probs" if game == "adversarial" else "joint/probs"
    assert student_term in record and ({"adv/probs", "joint/probs"} - {student_term}).isdisjoint(record)
    assert record[student_term] > 0 and summary["test"]["top1"] > 0.2
    # The discriminator is saved with the method, and trained: by its own Adam in the adversarial game, by the
    # student's optimiser (a second parameter group) in the joint one.
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert any(key.startswith("discriminators.probs.") for key in checkpoint["distiller"])
    trained_by = checkpoint["disc_optimizer"] if game == "adversarial" else checkpoint["student_optimizer"]
    assert trained_by["state"] and len(checkpoint["student_optimizer"]["param_groups"]) == (
        1 if game == "adversarial" else 2
    )


@pytest.mark.parametrize("method", ["dkd", "fitnet", "at", "acn"])
def test_a_method_without_discriminators_refuses_the_games_settings(method):
    for given in ({"adv_weight": 0.5}, {"adv_loss": "ls"}, {"disc_lr": 1e-3}, {"adv_game": "joint"}):
        config = DistillConfig(store="", student="resnet8_w4", method=method, given=tuple(given), **given)
        with pytest.raises(UserError, match=f"--method {method} trains no discriminators: --"):
            config.resolved()
    with pytest.raises(UserError, match="--discriminators is not read"):
        DistillConfig(store="", student="resnet8_w4", method=method, discriminators=["output"]).resolved()
    # Left at their defaults (not given), the game's settings are no concern of the method: not among its options.
    options = DistillConfig(store="", student="resnet8_w4", method=method).resolved().options
    assert not {f.name for f in dataclasses.fields(options)} & {"discriminators", *GAME_SETTINGS}
