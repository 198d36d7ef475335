"""AFD and ACN over the settings they expose (issues 43, 44), with peers of different architectures: every
--teacher-selection, every weight at a value other than 1, mixed hard labels, AFD's adversarial inputs' weights
and both adversarial update modes (transfer layers included), its feature terms' gradient reaching each peer's
own layers, and ACN's generator maximising the peers' disagreement at their temperature. References are written
out in float64 (tests/method_hand.py)."""

from __future__ import annotations

import pytest
import torch
from method_hand import (
    SELECTION_IDS,
    SELECTIONS,
    TEACHERS,
    cross_entropy,
    first_batch,
    fooling_bce,
    hinton_kl,
    log_softmax,
    recording_blocks,
    soft_sets,
    softmax,
    student_grad_norm,
    teacher_share,
)

from meal_cache.distill import DistillConfig, DistillEpochs, build_run
from meal_cache.distill.methods.afd import teacher_key
from meal_cache.engine.distributed import World
from meal_cache.engine.loop import Stream, epoch_generator
from meal_cache.store import open_store
from meal_cache.store.keys import feature_key, logits_key

PEERS = ["resnet8_w4", "densenet_k12"]


@pytest.fixture(scope="module")
def batch(small_store, digits):
    return first_batch(small_store[0], digits, rows=32)


def _recording_outputs(networks) -> list[dict]:
    seen = [{} for _ in networks]
    for record, network in zip(seen, networks, strict=True):
        network.register_forward_hook(lambda _m, _i, output, record=record: record.__setitem__("out", output))
    return seen


def _mutual(logits: list[torch.Tensor], index: int, temperature: float) -> float:
    """DML's term of peer ``index``: T^2 KL(other || own) at T, averaged over the other peers."""
    others = [o for j, o in enumerate(logits) if j != index]
    return sum(hinton_kl(logits[index], softmax(o, temperature), temperature) for o in others) / len(others)


def _close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name


# ------------------------------------------------------------------------------------------ AFD

AFD_SETTINGS = {"peers": PEERS, "soft_weight": 0.6, "hard_weight": 0.3, "adv_weight": 0.4, "temperature": 2.5,
                "method_options": {"mutual": 0.7, "teacher_adv": 0.5}}  # fmt: skip


@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_afd_terms_and_adversarial_inputs_by_hand(batch, selection, selected):
    distiller, config = batch.method("afd", teacher_selection=selection, **AFD_SETTINGS)
    outputs = _recording_outputs(distiller.peers)
    maps = [recording_blocks(peer, [block]) for peer, block in zip(distiller.peers, distiller.blocks, strict=True)]
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, selected))
    logits = [record["out"].detach() for record in outputs]
    sets = soft_sets({t: batch.targets[logits_key(t)] for t in TEACHERS}, selected, selection, config.temperature)
    expected = {}
    for i, own in enumerate(logits):
        expected[f"soft/peer{i}"] = 0.6 * sum(hinton_kl(own, p, config.temperature) for p in sets)
        expected[f"hard/peer{i}"] = 0.3 * cross_entropy(own, batch.labels)
        expected[f"mutual/peer{i}"] = 0.7 * _mutual(logits, i, config.temperature)
    _close({name: float(value.detach()) for name, value in out.losses.items()}, expected)
    # densenet_k12's last map (90, 4, 4) meets resnet8_w4's (16, 4, 4) through its transfer layer.
    own_maps = [record[block].detach() for record, block in zip(maps, distiller.blocks, strict=True)]
    compared = [own_maps[0], distiller.transfers["peer1"](own_maps[1]).detach()]
    share = 0.5 * teacher_share(selection, selected)
    wanted = {"peer0": (compared[1], compared[0], 1.0), "peer1": (compared[0], compared[1], 1.0)}
    for i, own_map in enumerate(own_maps):
        for teacher in selected:
            last = open_store(config.store).blocks(teacher)[-1]
            stored = batch.targets[feature_key(teacher, "maps", last.key)].double()
            wanted[teacher_key(i, teacher)] = (stored[:, None], own_map.double().mean(1, keepdim=True), share)
    assert sorted(item.key for item in out.adversarial) == sorted(wanted)
    expected_adv = {}
    for item in out.adversarial:
        real, fake, weight = wanted[item.key]
        assert not item.real.requires_grad
        assert torch.allclose(item.real.double(), real.double(), atol=1e-5), item.key
        assert torch.allclose(item.fake.detach().double(), fake.double(), atol=1e-5), item.key
        assert item.weight == pytest.approx(weight), item.key
        scores = distiller.discriminators[item.key](fake.float()).detach()
        expected_adv[f"adv/{item.key}"] = 0.4 * weight * fooling_bce(scores)
    got = {name: float(value.detach()) for name, value in distiller.adversarial_losses(out.adversarial).items()}
    _close(got, expected_adv)


def test_afds_map_terms_reach_each_peers_own_layers(batch):
    distiller, _ = batch.method("afd", **AFD_SETTINGS)
    out = distiller(distiller.batch(batch.images, batch.targets, batch.labels, list(TEACHERS)))
    adversarial = distiller.adversarial_losses(out.adversarial)
    first, second = distiller.peers
    # Each peer's map discriminator reaches that peer (through its transfer layer where it has one), not the
    # peer whose map is real; so does each teacher discriminator.
    assert student_grad_norm(adversarial["adv/peer0"], first) > 0
    assert student_grad_norm(adversarial["adv/peer0"], second) == 0
    assert student_grad_norm(adversarial["adv/peer1"], second) > 0
    assert student_grad_norm(adversarial["adv/peer1"], distiller.transfers) > 0
    assert student_grad_norm(adversarial["adv/peer1"], first) == 0
    for i, peer in enumerate(distiller.peers):
        assert student_grad_norm(adversarial[f"adv/{teacher_key(i, TEACHERS[1])}"], peer) > 0


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.parametrize("adv_update", ["summed", "separate"])
def test_each_adversarial_update_trains_peers_transfers_and_weighs_the_teachers(small_store, digits, adv_update):
    config = DistillConfig(store=str(small_store[0]), student="resnet8_w4", method="afd", peers=PEERS, epochs=1,
                           batch_size=32, device="cpu", workers=0, adv_weight=0.4, teacher_selection="mean",
                           method_options={"adv_update": adv_update, "teacher_adv": 0.5}).resolved()  # fmt: skip
    run = build_run(config, World(), torch.device("cpu"), digits, progress=False)
    try:
        epochs = DistillEpochs(run)
        batch = next(iter(epochs.batches(0)))
        distiller = run.distiller
        scores: dict[str, list[torch.Tensor]] = {}
        for key, disc in distiller.discriminators.items():
            disc.register_forward_hook(lambda _m, _i, out, key=key: scores.setdefault(key, []).append(out.detach()))
        before = {"peers": [_flat(p) for p in distiller.peers], "transfers": _flat(distiller.transfers),
                  "discriminators": _flat(distiller.discriminators)}  # fmt: skip
        out = epochs.step(batch)
        # The separate update has trained the peers and their transfer layers on the adversarial losses before
        # the loop's step; the summed one leaves them to it.
        moved_early = not torch.equal(_flat(distiller.transfers), before["transfers"])
        assert moved_early == (adv_update == "separate")
        named = out.stats if adv_update == "separate" else out.losses
        adversarial = {name: float(value.detach()) for name, value in named.items() if name.startswith("adv/")}
        # Each discriminator is called on real, fake (its step), then fake again (the student's loss).
        expected = {}
        for key, calls in scores.items():
            assert len(calls) == 3, key
            weight = 1.0 if key.startswith("peer") and "__" not in key else 0.5 / len(TEACHERS)
            expected[f"adv/{key}"] = 0.4 * weight * fooling_bce(calls[2])
        _close(adversarial, expected)
        assert set(scores) == {"peer0", "peer1"} | {teacher_key(i, t) for i in range(2) for t in TEACHERS}
        run.optimisation.step(sum(out.losses.values()))
        assert all(not torch.equal(_flat(p), b) for p, b in zip(distiller.peers, before["peers"], strict=True))
        assert not torch.equal(_flat(distiller.transfers), before["transfers"])
        assert not torch.equal(_flat(distiller.discriminators), before["discriminators"])
    finally:
        run.source.close()
        run.images.close()


# ------------------------------------------------------------------------------------------ ACN

ACN_SETTINGS = {"peers": PEERS, "soft_weight": 0.5, "hard_weight": 0.3, "temperature": 2.0,
                "method_options": {"alpha": 1.0, "mutual": 0.6, "divergent_weight": 0.8}}  # fmt: skip


def _generated(method, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x + alpha tanh(G(x, z))``, written out."""
    return images + method.options.alpha * torch.tanh(method.generator.net(torch.cat([images, z], 1)))


def _epoch_noise(method, images: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    shape = (len(images), method.options.noise, *images.shape[-2:])
    return torch.randn(shape, generator=epoch_generator(method.config.seed, epoch, Stream.ACN_NOISE))


@pytest.mark.parametrize(("selection", "selected"), SELECTIONS, ids=SELECTION_IDS)
def test_acn_terms_by_hand(batch, selection, selected):
    method, config = batch.method("acn", teacher_selection=selection, **ACN_SETTINGS)
    with torch.no_grad():  # generated images far enough from the natural ones that their terms differ
        method.generator.net[-1].weight.mul_(100)
    method.set_epoch(0)
    out = method(method.batch(batch.images, batch.targets, batch.labels, selected))
    with torch.no_grad():
        natural = [peer(batch.images) for peer in method.peers]
        generated_images = _generated(method, batch.images, _epoch_noise(method, batch.images))
        generated = [peer(generated_images) for peer in method.peers]
    sets = soft_sets({t: batch.targets[logits_key(t)] for t in TEACHERS}, selected, selection, config.temperature)
    expected = {}
    for i, own in enumerate(natural):
        expected[f"soft/peer{i}"] = 0.5 * sum(hinton_kl(own, p, config.temperature) for p in sets)
        expected[f"hard/peer{i}"] = 0.3 * cross_entropy(own, batch.labels)
        expected[f"mutual/peer{i}"] = 0.6 * _mutual(natural, i, config.temperature)
        expected[f"divergent/peer{i}"] = 0.8 * _mutual(generated, i, config.temperature)
    _close({name: float(value.detach()) for name, value in out.losses.items()}, expected)


def _disagreement(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """H(mean_i p_i) - mean_i H(p_i) of the peers' softmax at ``temperature``, batch mean, in float64."""
    log_probs = [log_softmax(value, temperature) for value in logits]
    mean = sum(lp.exp() for lp in log_probs) / len(log_probs)
    entropy_of_mean = -(mean * torch.log(mean)).sum(1)
    mean_entropy = sum(-(lp.exp() * lp).sum(1) for lp in log_probs) / len(log_probs)
    return (entropy_of_mean - mean_entropy).mean()


def test_the_generator_maximises_the_peers_disagreement_at_their_temperature(batch):
    method, config = batch.method("acn", peers=PEERS, temperature=3.0, method_options={"gen_lr": 2e-3})
    images, params = batch.images, list(method.generator.parameters())
    z = _epoch_noise(method, images)

    def adam_step(temperature: float):
        """The generator's weights after its first Adam step up the disagreement at ``temperature``: with m and v
        bias-corrected after one step, each weight moves by lr * g / (|g| + eps), g the disagreement's gradient."""
        value = _disagreement([peer(_generated(method, images, z)) for peer in method.peers], temperature)
        grads = torch.autograd.grad(value, params)
        stepped = [p.detach() + 2e-3 * g / (g.abs() + 1e-8) for p, g in zip(params, grads, strict=True)]
        return float(value.detach()), stepped

    at_three, after_three = adam_step(3.0)
    at_one, after_one = adam_step(1.0)
    method.set_epoch(0)
    stats = method.own_step(method.batch(images, batch.targets, batch.labels, list(TEACHERS)), method.own_optimizers())
    assert float(stats["acn/disagreement"]) == pytest.approx(at_three, rel=1e-4)
    assert abs(at_three - at_one) > 0.1 * at_three  # the two temperatures are told apart
    moved = [p.detach() for p in params]
    agree = lambda expected: sum(  # noqa: E731
        int(torch.isclose(m, e, atol=2e-4).sum()) for m, e in zip(moved, expected, strict=True))  # fmt: skip
    total = sum(p.numel() for p in params)
    assert agree(after_three) > 0.99 * total
    assert agree(after_one) < 0.95 * total
