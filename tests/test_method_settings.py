"""Every logit and feature method over the settings it exposes (issues 43, 44): each --teacher-selection with two
teachers of different architectures that disagree, every weight at a value other than 1, mixed (Mixup/CutMix)
hard labels given as class probabilities, and the feature terms' gradient reaching the student's own layers.
References are the papers' formulas in float64 (tests/method_hand.py); AT and DKD, whose numerics are being
changed, are pinned through their own losses with one teacher against two (sums, means, which teacher)."""

from __future__ import annotations

import pytest
import torch
from method_hand import (
    SELECTION_IDS,
    SELECTIONS,
    TEACHERS,
    built,
    conv1x1,
    cross_entropy,
    fooling_bce,
    hinton_kl,
    pooled,
    recording_blocks,
    soft_cross_entropy,
    soft_sets,
    softmax,
    student_grad_norm,
    teacher_share,
)

from meal_cache.store import open_store
from meal_cache.store_keys import feature_key, logits_key

# Weights no default has, so a weight that is never applied (or applied twice) changes a loss.
WEIGHTS = {"soft_weight": 0.7, "hard_weight": 0.4, "adv_weight": 0.3, "temperature": 2.5}
BLOCK_WEIGHTS = [0.3, 0.2, 0.6]


def _teacher_logits(targets):
    return {t: targets[logits_key(t)] for t in TEACHERS}


def _label_terms(logits, targets, labels, selection, selected, config) -> dict[str, float]:
    sets = soft_sets(_teacher_logits(targets), selected, selection, config.temperature)
    return {"soft": config.soft_weight * sum(hinton_kl(logits, p, config.temperature) for p in sets),
            "hard": config.hard_weight * cross_entropy(logits, labels)}  # fmt: skip


def _losses(out) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in out.losses.items()}


def _assert_losses(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name


# ------------------------------------------------------------------------------------------ the MEAL family


def _meal_block_reps(distiller, blocks, targets, selected, representation):
    """Each matched (teacher, rank) of the selected teachers: its key, rank, teacher and student
    representations, computed by hand from the student's block outputs."""
    store_blocks = {t: open_store(distiller.config.store).blocks(t) for t in TEACHERS}
    names = distiller.student.block_names
    reps = []
    for teacher in selected:
        for rank in range(min(3, len(names), len(store_blocks[teacher]))):
            spec = store_blocks[teacher][-1 - rank]
            student = blocks[names[-1 - rank]].detach()
            key = f"{teacher}__{rank}".replace(".", "_")
            stored = targets[feature_key(teacher, representation, spec.key)].double()
            if representation == "blocks":
                student_rep = conv1x1(distiller.adapters[key].proj, pooled(student, stored.shape[-1]))
            else:  # the student's and teacher's maps are of one size here (16 px: 16, 8 and 4 for both)
                assert student.shape[-2:] == stored.shape[-2:]
                student_rep, stored = student.double().mean(1).flatten(1), stored.flatten(1)
            reps.append((key, rank, stored, student_rep))
    return reps


@pytest.mark.parametrize("representation", ["blocks", "maps"])
@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_meal_terms_by_hand(small_store, digits, selection, selected, representation):
    distiller, config, images, targets, labels = built(
        small_store[0], digits, "meal", teacher_selection=selection, block_weights=BLOCK_WEIGHTS,
        representation=representation, **WEIGHTS)  # fmt: skip
    blocks = recording_blocks(distiller.student, distiller.student.block_names)
    out = distiller(images, targets, labels, selected)
    logits = out.logits.detach()
    expected = _label_terms(logits, targets, labels, selection, selected, config)
    share = teacher_share(selection, selected)
    reps = _meal_block_reps(distiller, blocks, targets, selected, representation)
    similarity = (lambda s, t: float(((s - t) ** 2).mean())) if representation == "blocks" else soft_cross_entropy
    for key, rank, teacher_rep, student_rep in reps:
        expected[f"sim/{key}"] = BLOCK_WEIGHTS[rank] * share * similarity(student_rep, teacher_rep)
    _assert_losses(_losses(out), expected)
    # The discriminators' inputs: each block's teacher (real) and student (fake) representations, and the
    # output's softened probabilities at the run's temperature, the student's beside each soft target set.
    inputs = {(item.key, i): item for i, item in enumerate(out.adversarial)}
    by_key = {}
    for (key, _), item in inputs.items():
        by_key.setdefault(key, []).append(item)
    for key, _, teacher_rep, student_rep in reps:
        (item,) = by_key[key]
        assert torch.allclose(item.real.double().reshape(teacher_rep.shape), teacher_rep, atol=1e-6)
        assert torch.allclose(item.fake.detach().double().reshape(student_rep.shape), student_rep, atol=1e-5)
        assert item.weight == pytest.approx(share)
    sets = soft_sets(_teacher_logits(targets), selected, selection, config.temperature)
    assert len(by_key["logits"]) == len(sets)
    for item, probs in zip(by_key["logits"], sets, strict=True):
        assert torch.allclose(item.real.double(), probs, atol=1e-6)
        assert torch.allclose(item.fake.detach().double(), softmax(logits, config.temperature), atol=1e-6)
    # The student's adversarial losses: --adv-weight times each input's weight times its fooling loss.
    adversarial = {name: float(value.detach()) for name, value in distiller.adversarial_losses(out.adversarial).items()}
    expected_adv: dict[str, float] = {}
    for item in out.adversarial:
        scores = distiller.discriminators[item.key](item.fake.detach().float()).detach()
        name = f"adv/{item.key}"
        expected_adv[name] = expected_adv.get(name, 0.0) + config.adv_weight * item.weight * fooling_bce(scores)
    _assert_losses(adversarial, expected_adv)


@pytest.mark.parametrize("method", ["kd", "meal-v2"])
@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_kd_and_meal_v2_terms_by_hand(small_store, digits, method, selection, selected):
    distiller, config, images, targets, labels = built(small_store[0], digits, method, teacher_selection=selection,
                                                       **WEIGHTS)  # fmt: skip
    out = distiller(images, targets, labels, selected)
    logits = out.logits.detach()
    _assert_losses(_losses(out), _label_terms(logits, targets, labels, selection, selected, config))
    sets = soft_sets(_teacher_logits(targets), selected, selection, config.temperature)
    if method == "kd":
        assert out.adversarial == []
        return
    assert [item.key for item in out.adversarial] == ["logits"] * len(sets)
    adversarial = distiller.adversarial_losses(out.adversarial)
    student_probs = softmax(logits, config.temperature)
    scores = distiller.discriminators["logits"](student_probs.float()).detach()
    expected = config.adv_weight * len(sets) * fooling_bce(scores)
    assert float(adversarial["adv/logits"].detach()) == pytest.approx(expected, rel=1e-4)
    for item, probs in zip(out.adversarial, sets, strict=True):
        assert torch.allclose(item.real.double(), probs, atol=1e-6) and item.weight == 1.0


def test_the_output_discriminator_sees_the_student_at_the_runs_temperature(small_store, digits):
    distiller, config, images, targets, labels = built(small_store[0], digits, "meal", temperature=3.0)
    out = distiller(images, targets, labels, [TEACHERS[0]])
    (item,) = [item for item in out.adversarial if item.key == "logits"]
    assert torch.allclose(item.fake.detach().double(), softmax(out.logits.detach(), 3.0), atol=1e-6)
    assert torch.allclose(item.real.double(), softmax(targets[logits_key(TEACHERS[0])], 3.0), atol=1e-6)
    # At T = 3 the softened student is far from its T = 1 probabilities, so reading either is told apart.
    assert not torch.allclose(item.fake.detach().double(), softmax(out.logits.detach(), 1.0), atol=1e-2)


@pytest.mark.parametrize("representation", ["blocks", "maps"])
def test_meal_block_terms_reach_the_students_own_layers(small_store, digits, representation):
    distiller, _, images, targets, labels = built(small_store[0], digits, "meal", representation=representation)
    out = distiller(images, targets, labels, list(TEACHERS))
    similarity = sum(value for name, value in out.losses.items() if name.startswith("sim/"))
    assert student_grad_norm(similarity, distiller.student) > 0
    block_inputs = [item for item in out.adversarial if item.key != "logits"]
    adversarial = sum(distiller.adversarial_losses(block_inputs).values())
    assert student_grad_norm(adversarial, distiller.student) > 0
