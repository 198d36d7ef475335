"""``--nesterov/--no-nesterov`` (issue 44): the optimiser train and distill build has the flag asked for, MEAL's
reference preset turns it off, and a record holds it only when off, so older records stay equal."""

from __future__ import annotations

import pytest
import torch

from meal_cache.distill import DistillConfig
from meal_cache.distill.built_run import config_json
from meal_cache.engine.loop import make_optimizer
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.errors import UserError


def _nesterov(optimizer: torch.optim.Optimizer) -> bool:
    return optimizer.param_groups[0]["nesterov"]


def test_make_optimizer_uses_nesterov_unless_told_not_to():
    weight = [torch.nn.Parameter(torch.zeros(2))]
    assert _nesterov(make_optimizer(weight, 0.1, 0.9, 0.0))
    assert not _nesterov(make_optimizer(weight, 0.1, 0.9, 0.0, nesterov=False))
    assert not _nesterov(make_optimizer(weight, 0.1, 0.0, 0.0))  # torch refuses Nesterov without momentum


def test_the_reference_preset_turns_nesterov_off_unless_given():
    assert DistillConfig(store="", student="s").resolved().nesterov is True
    assert DistillConfig(store="", student="s", preset="reference").resolved().nesterov is False
    given = DistillConfig(store="", student="s", preset="reference", nesterov=True, given=("nesterov",))
    assert given.resolved().nesterov is True


def test_records_hold_nesterov_only_when_off():
    assert "nesterov" not in config_json(DistillConfig(store="", student="s").resolved())
    assert config_json(DistillConfig(store="", student="s", nesterov=False).resolved())["nesterov"] is False
    assert "nesterov" not in TrainConfig(arch="resnet8_w4").recorded()
    assert TrainConfig(arch="resnet8_w4", nesterov=False).recorded()["nesterov"] is False


def test_train_and_distill_step_with_the_flag_given(small_store, digits, tmp_path, monkeypatch):
    """The optimisers train and distill step with (seen in ``torch.optim.SGD.step``) carry the flag."""
    from meal_cache.distill import distill

    seen = []
    real_step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["nesterov"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    config = TrainConfig(arch="resnet8_w4", epochs=1, device="cpu", nesterov=False)
    payload = train_supervised(config, tmp_path / "alone.pt", progress=False, dataset=digits)
    assert seen and not any(seen) and payload["config"]["nesterov"] is False
    seen.clear()
    path, _ = small_store
    distill(DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=1, device="cpu",
                          preset=None, nesterov=False), tmp_path / "run", progress=False, dataset=digits)  # fmt: skip
    assert seen and not any(seen)
    seen.clear()
    distill(DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=1, device="cpu"),
            tmp_path / "default", progress=False, dataset=digits)  # fmt: skip
    assert seen and all(seen)


def test_a_nesterov_that_is_not_a_boolean_is_refused():
    """A pipeline file's ``nesterov = "yes"`` is one clear error, not a truthy string."""
    with pytest.raises(UserError, match="nesterov takes true or false, got 'yes'"):
        DistillConfig(store="", student="s", nesterov="yes").resolved()
    with pytest.raises(UserError, match="nesterov takes true or false, got 'no'"):
        TrainConfig(arch="resnet8_w4", nesterov="no").validate()
