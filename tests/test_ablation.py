"""MEAL's ingredients as switches (issue 20): which discriminators train, the reference code's joint game, the
reference preset, and the diagnostics a run logs (gradient norm per loss family, teacher agreement)."""

from __future__ import annotations

import json

import pytest
import torch
from by_hand import first_rows
from test_distill import _config, _one_step
from torch import nn

from meal_cache import losses
from meal_cache.distill import DistillConfig, distill, gradient_norms
from meal_cache.errors import UserError
from meal_cache.store.keys import logits_key


def test_the_discriminators_switch_chooses_which_are_built(small_store, digits):
    path, _ = small_store
    both, _, _ = _one_step(path, digits, method="meal")
    assert "logits" in both.discriminators and len(both.discriminators) == 1 + len(both.pairs)
    blocks, _, _ = _one_step(path, digits, method="meal", discriminators=["blocks"])
    assert "logits" not in blocks.discriminators and len(blocks.discriminators) == len(blocks.pairs) > 0
    output, _, out = _one_step(path, digits, method="meal", discriminators=["output"])
    assert list(output.discriminators) == ["logits"] and output.pairs  # the block similarity stays
    assert {item.key for item in out.adversarial} == {"logits"}  # one a teacher: _one_step selects both
    none, _, out = _one_step(path, digits, method="meal", discriminators=[])
    assert not none.discriminators and not out.adversarial
    assert _config(path, method="kd").resolved().options.discriminators == []
    assert _config(path, method="meal-v2").resolved().options.discriminators == ["output"]
    with pytest.raises(UserError, match="--discriminators takes blocks, output or none, got maps"):
        _config(path, discriminators=["maps"]).resolved()
    # What a pipeline file or a Python caller may write: a comma string, "none", or a list.
    assert _config(path, discriminators="output, blocks").resolved().options.discriminators == ["blocks", "output"]
    assert _config(path, discriminators="none").resolved().options.discriminators == []
    assert _config(path, discriminators=["none"]).resolved().options.discriminators == []
    with pytest.raises(UserError, match="--discriminators takes blocks, output or none, got 5"):
        _config(path, discriminators=5).resolved()
    with pytest.raises(UserError, match="--discriminators blocks needs block terms, which --method meal-v2 has not"):
        _config(path, method="meal-v2", discriminators=["blocks", "output"]).resolved()
    # No loss left: kd's soft labels off and nothing adversarial.
    with pytest.raises(UserError, match="trains on nothing"):
        _config(path, method="meal", soft_weight=0.0, block_weights=[0.0], discriminators=[]).resolved()


def test_the_joint_game_adds_the_discriminator_loss_and_lets_it_reach_the_student(small_store, digits):
    path, _ = small_store
    distiller, config, out = _one_step(path, digits, method="meal-v2", adv_game="joint", adv_weight=0.5)
    joint, stats = distiller.joint_losses(out.adversarial)
    (item,) = out.adversarial
    discriminator = distiller.discriminators["logits"]
    expected = 0.5 * losses.discriminator_loss("bce", discriminator(item.real), discriminator(item.fake))
    assert float(joint["joint/logits"].detach()) == pytest.approx(float(expected.detach()))
    assert 0.0 <= float(stats["disc_acc/logits"]) <= 1.0
    # Unlike the adversarial game's discriminator step, the student's features are not detached here: the one
    # backward pass moves the student and the discriminator alike.
    student = [p for p in distiller.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(joint["joint/logits"], student + list(discriminator.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads[: len(student)] if g is not None) > 0
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads[len(student) :])


def test_a_joint_run_steps_the_discriminators_on_the_students_optimiser(small_store, digits, tmp_path):
    path, _ = small_store
    config = _config(path, method="meal", adv_game="joint", epochs=1, batch_size=256, disc_lr=5e-4, lr=0.05)
    summary = distill(config, tmp_path / "joint", progress=False, dataset=digits)
    (record,) = summary["history"]
    assert any(k.startswith("joint/") for k in record) and not any(k.startswith("adv/") for k in record)
    state = torch.load(tmp_path / "joint" / "last.pt", weights_only=True)
    groups = state["student_optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr_scale"] == pytest.approx(0.01)
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.01)
    assert state["disc_optimizer"] == {}


def test_the_reference_preset_fills_in_only_what_the_user_left_at_its_default(small_store):
    path, _ = small_store
    reference = _config(path, preset="reference").resolved()
    assert (reference.method, reference.soft_loss, reference.temperature, reference.teacher_selection) == (
        "meal", "soft-ce", 1.0, "random")  # fmt: skip
    assert (reference.options.adv_game, reference.options.adv_weight) == ("joint", 1.0)
    assert reference.options.discriminators == ["blocks", "output"]
    # the reference's own maps
    assert (reference.options.representation, reference.options.block_loss) == ("maps", "soft-ce")
    assert reference.options.disc_form == "reference"
    assert reference.divergent_ratio == 0.0  # no divergent batches from a store that has them, unless asked
    assert _config(path, preset="reference", divergent_ratio=0.5).resolved().divergent_ratio == 0.5
    mine = _config(path, preset="reference", temperature=4.0, adv_weight=0.3).resolved()
    assert (mine.temperature, mine.options.adv_weight, mine.soft_loss) == (4.0, 0.3, "soft-ce")
    # The reference's discriminators run at a hundredth of the student's rate, whatever --lr is.
    assert _config(path, preset="reference", lr=0.1).resolved().options.disc_lr == pytest.approx(1e-3)
    with pytest.raises(UserError, match="unknown preset 'refernce'"):
        _config(path, preset="refernce").resolved()


def test_the_reference_discriminator_is_a_relu_1x1_conv_stack_whose_scores_give_its_two_way_bce():
    disc = losses.ReferenceDiscriminator(8)  # 8 -> 4 -> 2 -> 2
    widths = [(m.in_channels, m.out_channels) for m in disc.net if isinstance(m, nn.Conv2d)]
    assert widths == [(8, 4), (4, 2), (2, 2)] and sum(isinstance(m, nn.ReLU) for m in disc.net) == 3
    with torch.no_grad():
        for conv, weight in zip([m for m in disc.net if isinstance(m, nn.Conv2d)], (0.25, 0.5, 1.0), strict=True):
            conv.weight.fill_(weight)
            conv.bias.fill_(0.0)
        disc.net[4].bias.copy_(torch.tensor([0.5, -3.0]))
    # ones(8): 8 * 0.25 = 2 per unit; 4 * 2 * 0.5 = 4 per unit; 2 * 4 + (0.5, -3) = (8.5, 5.0), after ReLU.
    with torch.no_grad():
        scores = disc(torch.ones(3, 8))
    assert scores.shape == (3, 2) and torch.allclose(scores[0], torch.tensor([-8.5, 5.0]))
    raw = torch.tensor([[8.5, 5.0]]).expand(3, 2)
    bce = nn.functional.binary_cross_entropy_with_logits
    # Teacher rows are [0, 1], student rows [1, 0] in the reference's loss.
    assert float(losses.bce_real(scores)) == pytest.approx(float(bce(raw, torch.tensor([[0.0, 1.0]]).expand(3, 2))))
    assert float(losses.bce_fake(scores)) == pytest.approx(float(bce(raw, torch.tensor([[1.0, 0.0]]).expand(3, 2))))
    assert losses.ReferenceDiscriminator(3)(torch.randn(4, 3)).shape == (4, 2)  # widths never reach 0


def test_the_reference_form_shares_one_discriminator_per_layer_and_feeds_raw_logits(small_store, digits):
    path, _ = small_store
    distiller, config, out = _one_step(path, digits, preset="reference", teacher_selection="all")
    assert config.options.disc_form == "reference" and len(distiller.teachers) == 2
    ranks = sorted({pair.rank for pair in distiller.pairs})
    assert set(distiller.discriminators) == {f"rank{r}" for r in ranks} | {"logits"}
    assert all(isinstance(d, losses.ReferenceDiscriminator) for d in distiller.discriminators.values())
    by_key: dict[str, list] = {}
    for item in out.adversarial:
        by_key.setdefault(item.key, []).append(item)
    for rank in ranks:  # both teachers' maps, pooled to one size, meet the same discriminator
        items = by_key[f"rank{rank}"]
        assert len(items) == 2 and items[0].real.shape == items[1].real.shape == items[0].fake.shape
    _, images, targets, _ = first_rows(config, digits)
    teacher_logits = [targets[logits_key(t)].float() for t in distiller.teachers]
    logits_items = by_key["logits"]
    assert len(logits_items) == 2
    assert all(torch.equal(i.real, t) for i, t in zip(logits_items, teacher_logits, strict=True))
    assert torch.equal(logits_items[0].fake, out.logits)  # raw, not softened
    with pytest.raises(UserError, match="shares one discriminator per layer among the teachers"):
        _one_step(path, digits, method="meal", disc_form="reference", representation="blocks")


def test_gradient_norms_are_those_of_each_loss_family_alone():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    x = torch.tensor([[1.0, 0.0, 2.0]])
    y = layer(x).sum()  # 7; d y / d w = x
    named = {"soft": 2 * y, "sim/a": y, "sim/b": 3 * y, "adv/logits": y * 0, "joint/b": 4 * y}
    norms = gradient_norms(named, list(layer.parameters()))
    length = float(x.norm())  # sqrt(5)
    assert float(norms["grad/soft"]) == pytest.approx(2 * length)
    assert float(norms["grad/sim"]) == pytest.approx(4 * length)  # the family's sum, not the sum of norms
    assert float(norms["grad/adv"]) == pytest.approx(4 * length)  # adversarial and joint are one family
    assert set(norms) == {"grad/soft", "grad/sim", "grad/adv"}


def test_a_meal_run_logs_what_each_part_does(small_store, digits, tmp_path):
    path, _ = small_store
    config = DistillConfig(store=str(path), student="resnet8_w4", epochs=1, batch_size=64, device="cpu",
                           grad_norm_every=20)  # fmt: skip
    distill(config, tmp_path / "meal", progress=False, dataset=digits)
    (record,) = [json.loads(line) for line in (tmp_path / "meal" / "metrics.jsonl").read_text().splitlines()]
    for family in ("soft", "sim", "adv"):
        assert record[f"grad/{family}"] > 0, family
    assert "grad/hard" not in record  # no hard-label term in meal's defaults
    assert 0.5 < record["teacher_agreement"] <= 1.0  # two trained teachers mostly agree with their mean
    assert any(k.startswith("disc_acc/") for k in record)


def test_the_representation_left_unset_follows_what_the_store_holds(small_store):
    path, _ = small_store
    assert _config(path).resolved(("blocks", "maps")).options.representation == "blocks"  # the ablation's default
    assert _config(path).resolved(("maps",)).options.representation == "maps"  # a maps-only store
    assert _config(path).resolved(()).options.representation == "blocks"
    assert _config(path, representation="maps").resolved(("blocks", "maps")).options.representation == "maps"
    maps = _config(path).resolved(("maps",))
    assert maps.options.block_loss == "soft-ce"  # the maps' own default loss follows


def test_the_gradient_norm_pass_changes_no_weight(small_store, digits, tmp_path):
    path, _ = small_store
    weights = []
    for every in (1, 0):  # a diagnostic pass on every step, and on none (the default)
        config = _config(path, epochs=1, batch_size=256, grad_norm_every=every)
        distill(config, tmp_path / f"every-{every}", progress=False, dataset=digits)
        weights.append(torch.load(tmp_path / f"every-{every}" / "last.pt", weights_only=True)["distiller"])
        (record,) = [json.loads(line) for line in (tmp_path / f"every-{every}" / "metrics.jsonl").open()]
        assert ("grad/soft" in record) == bool(every)
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_a_setting_the_user_gives_is_never_filled_in_even_at_its_default_value(small_store, monkeypatch):
    path, _ = small_store
    assert _config(path, preset="reference").resolved().options.adv_weight == 1.0  # left out: filled in
    # A knob is an option of the method: named at all (its unset value is None), it is given.
    assert _config(path, preset="reference", adv_weight=0.1).resolved().options.adv_weight == 0.1
    given = _config(path, preset="reference", adv_weight=0.1, given=("adv_weight",)).resolved()
    assert given.options.adv_weight == 0.1 and given.temperature == 1.0
    acn = DistillConfig(store="", student="resnet8_w4", method="acn", soft_weight=1.0, given=("soft_weight",))
    assert acn.resolved().soft_weight == 1.0
    assert DistillConfig(store="", student="resnet8_w4", method="acn").resolved().soft_weight == 0.0
    # The command line names what it was given (click's parameter source), defaults excluded.
    from click.testing import CliRunner

    import meal_cache.distill as distill_package
    from meal_cache.cli import main

    seen = []
    monkeypatch.setattr(distill_package, "distill", lambda config, *a, **k: seen.append(config) or {"test": {}})
    CliRunner().invoke(main, ["distill", "--store", str(path), "--student", "resnet8_w4", "--preset", "reference",
                              "--adv-weight", "0.1", "--out", "x", "--quiet"])  # fmt: skip
    (config,) = seen
    assert {"adv_weight", "preset", "student", "store"} <= set(config.given)
    assert "temperature" not in config.given and config.resolved().options.adv_weight == 0.1


def test_a_negative_gradient_norm_interval_is_one_error_line(small_store, tmp_path):
    from console import one_error_line, run_console

    path, _ = small_store
    result = run_console(["distill", "--store", str(path), "--student", "resnet8_w4", "--grad-norm-every", "-1",
                          "--out", str(tmp_path / "run")], tmp_path)  # fmt: skip
    assert "--grad-norm-every takes 0 (never) or a number of steps, got -1" in one_error_line(result)
    assert not (tmp_path / "run").exists()
