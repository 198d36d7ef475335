"""Every logit and feature method over the settings it exposes (issues 43, 44): each --teacher-selection with two
teachers of different architectures that disagree, every weight at a value other than 1, mixed (Mixup/CutMix)
hard labels given as class probabilities, and the feature terms' gradient reaching the student's own layers.
References are the papers' formulas in float64 (tests/method_hand.py); AT and DKD, whose numerics are being
changed, are pinned through their own losses with one teacher against two (sums, means, which teacher)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from console import one_error_line_of
from method_hand import (
    SELECTION_IDS,
    SELECTIONS,
    TEACHERS,
    conv1x1,
    cross_entropy,
    first_batch,
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

from meal_cache.distill import DistillConfig, method_class
from meal_cache.errors import UserError
from meal_cache.store import open_store
from meal_cache.store.keys import feature_key, logits_key


@pytest.fixture(scope="module")
def batch(small_store, digits, tmp_path_factory):
    """The conftest store's rows with every feature kind, AT's attention maps included."""
    from meal_cache.extract.run import extract

    _, config = small_store
    path = tmp_path_factory.mktemp("settings") / "every-kind.zarr"
    extract(dataclasses.replace(config, features=["blocks", "maps", "attention"]), path, progress=False,
            dataset=digits)  # fmt: skip
    return first_batch(path, digits)


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
def test_meal_terms_by_hand(batch, selection, selected, representation):
    distiller, config = batch.method("meal", teacher_selection=selection, block_weights=BLOCK_WEIGHTS,
                                     representation=representation, soft_loss="kl", **WEIGHTS)  # fmt: skip
    images, targets, labels = batch.images, batch.targets, batch.labels
    blocks = recording_blocks(distiller.student, distiller.student.block_names)
    out = distiller(distiller.batch(images, targets, labels, selected))
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
        expected_adv[name] = expected_adv.get(name, 0.0) + config.options.adv_weight * item.weight * fooling_bce(scores)
    _assert_losses(adversarial, expected_adv)


@pytest.mark.parametrize("method", ["kd", "meal-v2"])
@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_kd_and_meal_v2_terms_by_hand(batch, method, selection, selected):
    distiller, config = batch.method(method, teacher_selection=selection, **WEIGHTS)
    images, targets, labels = batch.images, batch.targets, batch.labels
    out = distiller(distiller.batch(images, targets, labels, selected))
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
    expected = config.options.adv_weight * len(sets) * fooling_bce(scores)
    assert float(adversarial["adv/logits"].detach()) == pytest.approx(expected, rel=1e-4)
    for item, probs in zip(out.adversarial, sets, strict=True):
        assert torch.allclose(item.real.double(), probs, atol=1e-6) and item.weight == 1.0


def test_the_output_discriminator_sees_the_student_at_the_runs_temperature(batch):
    distiller, _ = batch.method("meal", temperature=3.0)
    targets = batch.targets
    out = distiller(distiller.batch(batch.images, targets, batch.labels, [TEACHERS[0]]))
    (item,) = [item for item in out.adversarial if item.key == "logits"]
    assert torch.allclose(item.fake.detach().double(), softmax(out.logits.detach(), 3.0), atol=1e-6)
    assert torch.allclose(item.real.double(), softmax(targets[logits_key(TEACHERS[0])], 3.0), atol=1e-6)
    # At T = 3 the softened student is far from its T = 1 probabilities, so reading either is told apart.
    assert not torch.allclose(item.fake.detach().double(), softmax(out.logits.detach(), 1.0), atol=1e-2)


@pytest.mark.parametrize("representation", ["blocks", "maps"])
def test_meal_block_terms_reach_the_students_own_layers(batch, representation):
    distiller, _ = batch.method("meal", representation=representation)
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, list(TEACHERS)))
    similarity = sum(value for name, value in out.losses.items() if name.startswith("sim/"))
    assert student_grad_norm(similarity, distiller.student) > 0
    block_inputs = [item for item in out.adversarial if item.key != "logits"]
    adversarial = sum(distiller.adversarial_losses(block_inputs).values())
    assert student_grad_norm(adversarial, distiller.student) > 0


# ------------------------------------------------------------------------------------------ FitNet


@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_fitnet_terms_by_hand(batch, selection, selected):
    # The hint at the last block (block 0), weight 3, beside soft labels at 0.5 and mixed hard labels at 0.4.
    distiller, config = batch.method("fitnet", teacher_selection=selection, soft_weight=0.5, hard_weight=0.4,
                                     temperature=2.5, method_options={"weight": 3.0, "block": 0})  # fmt: skip
    name = distiller.student.block_names[-1]
    blocks = recording_blocks(distiller.student, [name])
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, selected))
    hint = 0.0
    for teacher in selected:
        spec = open_store(config.store).blocks(teacher)[-1]
        stored = batch.targets[feature_key(teacher, "blocks", spec.key)].double()
        adapted = conv1x1(distiller.adapters[teacher].proj, pooled(blocks[name].detach(), stored.shape[-1]))
        hint += float(((adapted - stored) ** 2).mean())
    expected = _label_terms(out.logits.detach(), batch.targets, batch.labels, selection, selected, config)
    expected["hint"] = 3.0 * teacher_share(selection, selected) * hint
    _assert_losses(_losses(out), expected)


def test_fitnets_hint_reaches_the_students_own_layers(batch):
    distiller, _ = batch.method("fitnet")
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, list(TEACHERS)))
    assert student_grad_norm(out.losses["hint"], distiller.student) > 0


# ------------------------------------------------------------------------------------------ DKD and AT
# Pinned through their own losses (their numerics are being changed): one teacher's terms depend on that
# teacher's targets alone, `all` sums the teachers' terms, `mean` is one teacher whose softened probabilities
# are the ensemble's (DKD) or the average of the teachers' terms (AT, whose teachers meet only in the loss).


def _only(targets: dict[str, torch.Tensor], teacher: str, values_of: str | None = None) -> dict[str, torch.Tensor]:
    """The targets of ``teacher`` alone, holding ``values_of``'s arrays (block by block from the end) where
    given: a method that reads any other teacher's key fails, and one teacher's terms must follow its values."""
    source = values_of or teacher
    out = {logits_key(teacher): targets[logits_key(source)]}
    kinds = sorted({key.split("/")[2] for key in targets if key.count("/") == 3})  # blocks, maps, attention
    for kind in kinds:
        own = [k for k in targets if k.startswith(f"teachers/{teacher}/{kind}/")]
        theirs = [k for k in targets if k.startswith(f"teachers/{source}/{kind}/")]
        if source != teacher and kind == "blocks":
            continue  # pooled channels differ in count between the architectures
        for mine, other in zip(sorted(own, key=_block_order), sorted(theirs, key=_block_order), strict=True):
            out[mine] = targets[other]
    return out


def _block_order(key: str) -> int:
    """A teacher's blocks by depth: the digit in its stored name (layer1..3, denseblock1..3)."""
    return int("".join(ch for ch in key.rsplit("/", 1)[1] if ch.isdigit()) or 0)


def _terms(distiller, batch, selected, targets=None, labels=None) -> dict[str, float]:
    torch.manual_seed(0)
    out = distiller(distiller.batch(batch.images, batch.targets if targets is None else targets,
                                    batch.labels if labels is None else labels, selected))  # fmt: skip
    return _losses(out)


# The terms each method draws from the teachers (the rest, cross-entropy, is the labels').
TEACHER_TERMS = {"dkd": ("soft/tckd", "soft/nckd"), "at": ("attention",)}


@pytest.mark.parametrize("method", ["dkd", "at"])
def test_one_teachers_terms_follow_that_teacher_alone(batch, method):
    distiller, _ = batch.method(method, teacher_selection="random", method_options={"warmup": 0} if method == "dkd"
                                else {})  # fmt: skip
    first, second = TEACHERS
    alone = {t: _terms(distiller, batch, [t], _only(batch.targets, t)) for t in TEACHERS}
    # The first teacher's key holding the second's values gives the second's terms: nothing else is read.
    swapped = _terms(distiller, batch, [first], _only(batch.targets, first, values_of=second))
    for name in TEACHER_TERMS[method]:
        assert swapped[name] == pytest.approx(alone[second][name], rel=1e-5)
        assert abs(alone[first][name] - alone[second][name]) > 0.05 * abs(alone[second][name]), name
        # Drawn from the whole targets, the drawn teacher's terms are those it has alone.
        for teacher in TEACHERS:
            assert _terms(distiller, batch, [teacher])[name] == pytest.approx(alone[teacher][name], rel=1e-5)


@pytest.mark.parametrize("method", ["dkd", "at"])
def test_all_sums_the_teachers_terms_and_mean_averages_them(batch, method):
    options = {"warmup": 0} if method == "dkd" else {}
    singles = {t: _terms(batch.method(method, teacher_selection="random", method_options=options)[0], batch, [t])
               for t in TEACHERS}  # fmt: skip
    every = _terms(batch.method(method, teacher_selection="all", method_options=options)[0], batch, list(TEACHERS))
    mean_method, config = batch.method(method, teacher_selection="mean", method_options=options)
    mean = _terms(mean_method, batch, list(TEACHERS))
    for name in TEACHER_TERMS[method]:
        assert every[name] == pytest.approx(sum(s[name] for s in singles.values()), rel=1e-5), name
        if method == "at":
            assert mean[name] == pytest.approx(sum(s[name] for s in singles.values()) / 2, rel=1e-5), name
    if method == "dkd":
        # The ensemble enters as one teacher whose softened probabilities are the mean of the teachers'.
        probs = sum(softmax(batch.targets[logits_key(t)], config.temperature) for t in TEACHERS) / 2
        ensemble = {logits_key(TEACHERS[0]): (config.temperature * torch.log(probs)).float()}
        one_teacher, _ = batch.method(method, teacher_selection="random", method_options=options)
        as_one = _terms(one_teacher, batch, [TEACHERS[0]], ensemble)
        for name in TEACHER_TERMS[method]:
            assert mean[name] == pytest.approx(as_one[name], rel=1e-4), name
    # Cross-entropy is the labels' alone, whichever teachers a step has.
    assert every["hard"] == pytest.approx(mean["hard"]) and mean["hard"] == pytest.approx(singles[TEACHERS[0]]["hard"])


def test_dkd_weights_scale_their_parts_and_mixed_rows_take_their_larger_share(batch):
    base_method, _ = batch.method("dkd", method_options={"alpha": 1.0, "beta": 1.0, "warmup": 0})
    base = _terms(base_method, batch, list(TEACHERS))
    # soft 0.6, alpha 0.5, beta 3, warm-up over 4 epochs in its second epoch (ramp 2/4), hard 0.3.
    weighted_method, config = batch.method("dkd", soft_weight=0.6, hard_weight=0.3,
                                           method_options={"alpha": 0.5, "beta": 3.0, "warmup": 4})  # fmt: skip
    weighted_method.set_epoch(1)
    weighted = _terms(weighted_method, batch, list(TEACHERS))
    assert weighted["soft/tckd"] == pytest.approx(0.6 * 0.5 * 0.5 * base["soft/tckd"], rel=1e-5)
    assert weighted["soft/nckd"] == pytest.approx(0.6 * 0.5 * 3.0 * base["soft/nckd"], rel=1e-5)
    # Cross-entropy of the mixed labels' probabilities, by hand; the decoupled parts' target is the larger share.
    logits = weighted_method.student(batch.images).detach()
    assert weighted["hard"] == pytest.approx(0.3 * cross_entropy(logits, batch.labels), rel=1e-4)
    by_index = _terms(base_method, batch, list(TEACHERS), labels=batch.labels.argmax(1))
    assert by_index["soft/tckd"] == pytest.approx(base["soft/tckd"], rel=1e-6)
    assert by_index["soft/nckd"] == pytest.approx(base["soft/nckd"], rel=1e-6)


def test_at_weight_scales_its_term_and_the_hard_labels_are_mixed(batch):
    one, _ = batch.method("at", method_options={"weight": 1.0})
    seven, config = batch.method("at", hard_weight=0.3, method_options={"weight": 7.0})
    at_one, at_seven = _terms(one, batch, list(TEACHERS)), _terms(seven, batch, list(TEACHERS))
    assert at_seven["attention"] == pytest.approx(7.0 * at_one["attention"], rel=1e-5)
    logits = seven.student(batch.images).detach()
    assert at_seven["hard"] == pytest.approx(0.3 * cross_entropy(logits, batch.labels), rel=1e-4)


def test_ats_term_reaches_the_students_own_layers(batch):
    distiller, _ = batch.method("at")
    torch.manual_seed(0)
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, list(TEACHERS)))
    assert student_grad_norm(out.losses["attention"], distiller.student) > 0


def test_fitnet_hints_any_block_both_networks_have_and_refuses_one_beyond(batch):
    """``block`` counts from the last block (0): resnet8_w4's 3 blocks take 0-2, the first of them included."""
    distiller, _ = batch.method("fitnet", method_options={"block": 2})
    assert distiller.student_block == distiller.student.block_names[0]
    with pytest.raises(UserError, match=r"--method-option block 3: the student has 3 blocks"):
        batch.method("fitnet", method_options={"block": 3})


def test_fitnet_trains_on_its_hint_alone_at_any_weight_above_0():
    """With cross-entropy off the hint is the whole loss: any weight above 0 is a run, 0 is refused in one line."""
    base = dict(store="", student="s", method="fitnet", hard_weight=0.0, given=("hard_weight",))
    for weight in (0.5, 1.0, 100.0):
        assert method_class("fitnet").has_a_loss(DistillConfig(**base, method_options={"weight": weight}).resolved())
    with pytest.raises(UserError, match="--method fitnet with these weights trains on nothing"):
        DistillConfig(**base, method_options={"weight": 0.0}).resolved()


def test_fitnet_trains_from_a_teacher_whose_name_has_a_dot(teacher_dir, digits, tmp_path):
    """A teacher named with a dot (a file res.net8.pt; timm:resnet18.a1_in1k would be one) keys its adapter
    without it, since a module's name cannot hold one; the hint reaches that adapter."""
    import shutil

    from meal_cache.distill import distill
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    folder = tmp_path / "teachers"
    folder.mkdir()
    shutil.copy(teacher_dir / "resnet8_w4.pt", folder / "res.net8.pt")
    store = tmp_path / "dot.zarr"
    extract(ExtractConfig(teachers=["res.net8"], views=1, teacher_dir=str(folder), preset="fitnet", device="cpu"),
            store, progress=False, dataset=digits)  # fmt: skip
    config = DistillConfig(store=str(store), student="resnet8_w4", method="fitnet", epochs=1, batch_size=128,
                           device="cpu")  # fmt: skip
    distill(config, tmp_path / "run", progress=False, dataset=digits)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["distiller"]
    assert any(key.startswith("adapters.res_net8.") for key in state), sorted(state)[:5]


# ---------------------------------------------------------------------------------- MEAL's knobs as options

MEAL_KNOBS = ("representation", "block_loss", "block_weights", "match_blocks", "adv_weight", "adv_loss", "adv_game",
              "disc_lr", "discriminators", "disc_form")  # fmt: skip


def _recorded(**settings) -> dict:
    from meal_cache.distill.built_run import config_json

    return config_json(DistillConfig(store="s.zarr", student="resnet8_w4", **settings).resolved(("blocks",)))


def test_a_kd_record_holds_none_of_meals_knobs_and_a_meal_record_holds_them_in_its_options():
    kd = _recorded(method="kd")
    assert not set(MEAL_KNOBS) & set(kd) and "method_options" not in kd
    meal = _recorded(method="meal")
    assert not set(MEAL_KNOBS) & set(meal)
    assert meal["method_options"] == {
        "representation": "blocks", "block_loss": "l2", "block_weights": [0.1, 0.05, 0.01], "match_blocks": None,
        "adv_weight": 0.1, "adv_loss": "bce", "adv_game": "adversarial", "disc_lr": 2e-4,
        "discriminators": ["blocks", "output"], "disc_form": "meal-cache",
    }  # fmt: skip


def test_a_knobs_flag_and_the_option_of_its_name_make_the_same_run():
    by_flag = DistillConfig(store="s.zarr", student="resnet8_w4", disc_lr=1e-3, block_weights=[0.2])
    by_option = DistillConfig(store="s.zarr", student="resnet8_w4",
                              method_options={"disc_lr": 1e-3, "block_weights": [0.2]})  # fmt: skip
    assert by_flag.resolved().options == by_option.resolved().options
    assert _recorded(disc_lr=1e-3)["method_options"]["disc_lr"] == 1e-3
    with pytest.raises(UserError, match="--disc-lr 0.001 and --method-option disc_lr=0.002 set one option twice"):
        DistillConfig(store="s.zarr", student="resnet8_w4", disc_lr=1e-3, method_options={"disc_lr": 2e-3})


def test_a_preset_files_share_of_a_knob_still_follows_the_rate(tmp_path, monkeypatch):
    from meal_cache.distill import config as config_module

    flat = tmp_path / "flat.toml"
    flat.write_text('method = "meal"\ndisc_lr = { of = "lr", divided_by = 100 }\n')
    table = tmp_path / "table.toml"
    table.write_text('method = "meal"\n[method_options]\ndisc_lr = { of = "lr", divided_by = 50 }\n')
    monkeypatch.setitem(config_module.PRESETS, "flat", config_module.read_preset(flat))
    monkeypatch.setitem(config_module.PRESETS, "table", config_module.read_preset(table))
    resolved = DistillConfig(store="s.zarr", student="resnet8_w4", preset="flat", lr=0.1).resolved()
    assert resolved.options.disc_lr == pytest.approx(1e-3)
    assert DistillConfig(store="s.zarr", student="resnet8_w4", preset="table", lr=0.1).resolved().options.disc_lr == (
        pytest.approx(2e-3)
    )
    given = DistillConfig(store="s.zarr", student="resnet8_w4", preset="flat", lr=0.1, disc_lr=5e-4).resolved()
    assert given.options.disc_lr == 5e-4  # the command's own value wins


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "dkd", "method_options": {"disc_lr": 1e-3}}, "--method dkd trains no discriminators: --disc-lr"),
        ({"method": "kd", "block_weights": [0.1]}, "--method kd does not read --block-weights: leave it out, or use "
                                                   "--method meal, which reads it"),
        ({"method": "afd", "disc_form": "reference"}, "--method afd does not read --disc-form"),
    ],
)  # fmt: skip
def test_a_knob_given_to_a_method_that_does_not_read_it_is_one_error_naming_the_method(settings, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DistillConfig(store="s.zarr", student="resnet8_w4", **settings).resolved()


@pytest.mark.parametrize(
    ("args", "message", "start_the_script"),
    [
        (["--method", "kd", "--representation", "maps"],
         "Error: --method kd does not read --representation: leave it out, or use --method meal, which reads it", True),
        (["--method", "afd", "--discriminators", "output"],
         "Error: --method afd trains its own discriminators; --discriminators is not read", False),
        (["--disc-lr", "1e-3", "--method-option", "disc_lr=2e-3"],
         "Error: --disc-lr 0.001 and --method-option disc_lr=0.002 set one option twice: give one of them", False),
        (["--adv-weight", "-1"], "Error: --adv-weight must be >= 0, got -1.0", False),
    ],
)  # fmt: skip
def test_a_knobs_refusal_on_the_command_line_is_one_line_and_writes_nothing(args, message, start_the_script,
                                                                          small_store, tmp_path):  # fmt: skip
    """docs/errors.md's rows for the knobs: the flag named as given, before anything is written."""
    out = tmp_path / "run"
    line = one_error_line_of(["distill", "--store", str(small_store[0]), "--student", "resnet8_w4", *args, "--out",
                              str(out)], tmp_path, start_the_script=start_the_script)  # fmt: skip
    assert line.startswith(message), line
    assert not out.exists()
