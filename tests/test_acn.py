"""ACN (``distill --method acn --peers N``): the disagreement and KL terms by hand, the generator's bound, its
rising disagreement, which step trains what, checkpoints and resume, bf16 autocast, and refusals through the
console script."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from by_hand import first_rows
from torch.nn import functional as F

from meal_cache.distill import DistillConfig, DistillEpochs, build_run, distill
from meal_cache.distill.methods.acn import Acn, disagreement
from meal_cache.distill.methods.peers import mutual_kl
from meal_cache.engine.distributed import World
from meal_cache.engine.loop import Stream, epoch_generator
from meal_cache.errors import UserError
from meal_cache.store.keys import logits_key

CPU = torch.device("cpu")


def _config(store, **overrides) -> DistillConfig:
    settings = {"store": str(store), "student": "resnet8_w4", "method": "acn", "epochs": 1, "batch_size": 64,
                "device": "cpu", "workers": 0, **overrides}  # fmt: skip
    return DistillConfig(**settings).resolved()


def _hand_kl(source: torch.Tensor, own: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(source || own) of softened logits, rows averaged, written out in float64."""
    p = torch.exp(source / temperature) / torch.exp(source / temperature).sum(1, keepdim=True)
    q = torch.exp(own / temperature) / torch.exp(own / temperature).sum(1, keepdim=True)
    return (p * (p.log() - q.log())).sum(1).mean() * temperature**2


def _hand_mutual(logits: list[torch.Tensor], index: int, temperature: float) -> torch.Tensor:
    others = [j for j in range(len(logits)) if j != index]
    return sum(_hand_kl(logits[j], logits[index], temperature) for j in others) / len(others)


def test_disagreement_and_mutual_kl_by_hand():
    logits = [torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64),
              torch.tensor([[0.0, 1.0, 0.0], [3.0, -2.0, 1.0]], dtype=torch.float64),
              torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)]  # fmt: skip
    for temperature in (1.0, 2.0):
        probs = [torch.softmax(value / temperature, 1) for value in logits]
        mean = sum(probs) / 3
        entropy = [-(p * p.log()).sum(1) for p in probs]
        expected = (-(mean * mean.log()).sum(1) - sum(entropy) / 3).mean()
        assert float(disagreement(logits, temperature)) == pytest.approx(float(expected), rel=1e-6)
        for index in range(3):
            got = mutual_kl([value.float() for value in logits], index, temperature)
            assert float(got) == pytest.approx(float(_hand_mutual(logits, index, temperature)), rel=1e-5)
    assert float(disagreement([logits[0], logits[0].clone()], 1.0)) == pytest.approx(0.0, abs=1e-6)
    # Two peers sure of different classes disagree by log 2, the most two can.
    sure = [torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]])]
    assert float(disagreement(sure, 1.0)) == pytest.approx(math.log(2), rel=1e-6)


@pytest.fixture
def acn_rows(small_store, digits):
    """An ACN method (two peers, teachers' soft labels at 0.5, a wide bound of 1) on the store's first 64 rows."""
    config = _config(small_store[0], soft_weight=0.5, method_options={"alpha": 1.0})
    method, images, targets, labels = first_rows(config, digits)
    return method, config, images, targets, labels


def _generated_by_hand(method: Acn, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    net, alpha = method.generator.net, method.options.alpha
    return images + alpha * torch.tanh(net(torch.cat([images, z], 1)))


def test_every_peers_terms_by_hand(acn_rows):
    method, config, images, targets, labels = acn_rows
    assert config.peers == 2 and config.temperature == 1.0 and config.hard_weight == 1.0
    with torch.no_grad():  # the generated images far enough from the natural ones that their terms differ
        method.generator.net[-1].weight.mul_(100)
    method.set_epoch(0)
    out = method(method.batch(images, targets, labels, method.teachers))
    temperature = config.temperature
    z = torch.randn((len(images), method.options.noise, *images.shape[-2:]),
                    generator=epoch_generator(config.seed, 0, Stream.ACN_NOISE))  # fmt: skip
    with torch.no_grad():
        natural = [peer(images).double() for peer in method.peers]
        generated = [peer(_generated_by_hand(method, images, z)).double() for peer in method.peers]
        teachers = [torch.softmax(targets[logits_key(t)].double() / temperature, 1) for t in method.teachers]
    ensemble = sum(teachers) / len(teachers)
    got = {name: float(value.detach()) for name, value in out.losses.items()}
    assert set(out.losses) == {f"{kind}/peer{i}" for kind in ("hard", "soft", "mutual", "divergent") for i in (0, 1)}
    for i in range(2):
        soft = 0.5 * (ensemble * (ensemble.log() - torch.log_softmax(natural[i] / temperature, 1))).sum(1).mean()
        assert got[f"soft/peer{i}"] == pytest.approx(float(soft), rel=1e-4)
        hard = F.cross_entropy(natural[i], labels)
        assert got[f"hard/peer{i}"] == pytest.approx(float(hard), rel=1e-5)
        mutual = _hand_mutual(natural, i, temperature)
        assert got[f"mutual/peer{i}"] == pytest.approx(float(mutual), rel=1e-4)
        divergent = _hand_mutual(generated, i, temperature)
        assert got[f"divergent/peer{i}"] == pytest.approx(float(divergent), rel=1e-4)
        assert abs(float(divergent) - float(mutual)) > 0.01 * float(mutual)  # the generated images are others
    assert torch.equal(out.logits, method.peers[0](images))
    # Peer i's terms reach peer i only.
    total = out.losses["mutual/peer1"] + out.losses["divergent/peer1"]
    grads = torch.autograd.grad(total, list(method.peers.parameters()), allow_unused=True)
    first = len(list(method.peers[0].parameters()))
    assert all(g is None or not g.any() for g in grads[:first]) and any(g is not None for g in grads[first:])


def test_each_epoch_draws_its_own_noise_again(acn_rows):
    method, _, images, _, _ = acn_rows
    method.set_epoch(3)
    first = method.noise_like(images)
    method.set_epoch(3)
    assert torch.equal(method.noise_like(images), first)
    method.set_epoch(4)
    assert not torch.equal(method.noise_like(images), first)
    assert first.shape == (len(images), method.options.noise, *images.shape[-2:])


@pytest.mark.parametrize("alpha", [0.1, 0.03])
def test_generated_images_stay_inside_the_bound(small_store, digits, alpha):
    config = _config(small_store[0], method_options={"alpha": alpha})
    method, images, targets, labels = first_rows(config, digits)
    with torch.no_grad():
        method.generator.net[-1].weight.mul_(100)  # a generator pushing far past the bound
    generated = method.generator(images, method.noise_like(images))
    change = (generated - images).abs().max().detach()
    assert 0.5 * alpha < float(change) <= alpha + 1e-6
    stats = method.own_step(method.batch(images, targets, labels, method.teachers), method.own_optimizers())
    assert 0 < float(stats["acn/perturbation"]) <= alpha + 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_the_generator_raises_the_peers_disagreement(small_store, digits, seed):
    # Peers fresh from their inits barely react to a bounded change of their input, so they first fit the batch a
    # little (15 SGD steps each on its labels) and are then held fixed; a wider bound and a faster rate than the
    # defaults make 30 generator steps enough to see (measured: x1.5 to x2.1 over seeds 0-4).
    config = _config(small_store[0], seed=seed, method_options={"alpha": 0.3, "gen_lr": 3e-3})
    method, images, targets, labels = first_rows(config, digits)
    fit = torch.optim.SGD(method.peers.parameters(), 0.1, momentum=0.9)
    for _ in range(15):
        fit.zero_grad()
        sum(F.cross_entropy(peer(images), labels) for peer in method.peers).backward()
        fit.step()
    optimizers = method.own_optimizers()
    batch = method.batch(images, targets, labels, method.teachers)
    seen = [float(method.own_step(batch, optimizers)["acn/disagreement"]) for _ in range(30)]
    assert seen[-1] > 1.4 * seen[0], seen


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [value.detach().clone() for value in module.state_dict().values()]


def test_a_generator_step_trains_the_generator_alone(acn_rows):
    method, _, images, targets, labels = acn_rows
    peers, generator = _snapshot(method.peers), _snapshot(method.generator)
    method.own_step(method.batch(images, targets, labels, method.teachers), method.own_optimizers())
    # The peers' weights, running statistics and gradients are as they were; the generator moved.
    assert all(torch.equal(a, b) for a, b in zip(peers, _snapshot(method.peers), strict=True))
    assert all(p.grad is None for p in method.peers.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(generator, _snapshot(method.generator), strict=True))


def test_a_full_step_trains_every_peer(small_store, digits):
    run = build_run(_config(small_store[0], peers=3), World(), CPU, digits, progress=False)
    try:
        epochs = DistillEpochs(run)
        batch = next(iter(epochs.batches(0)))
        method = run.distiller
        trained = {id(p) for group in run.optimisation.optimizer.param_groups for p in group["params"]}
        assert trained == {id(p) for p in method.peers.parameters()}
        assert set(run.own_optimizers) == {"generator"}
        before = [torch.cat([p.detach().flatten() for p in peer.parameters()]) for peer in method.peers]
        generator = _snapshot(method.generator)
        out = epochs.step(batch)
        run.optimisation.step(sum(out.losses.values()))
        after = [torch.cat([p.detach().flatten() for p in peer.parameters()]) for peer in method.peers]
        assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
        assert any(not torch.equal(a, b) for a, b in zip(generator, _snapshot(method.generator), strict=True))
        assert {"acn/disagreement", "acn/perturbation", "acn/generated_disagreement"} <= set(out.stats)
    finally:
        run.source.close()
        run.images.close()


def test_a_step_under_cpu_bf16_autocast_is_finite(acn_rows):
    method, _, images, targets, labels = acn_rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = method.own_step(method.batch(images, targets, labels, method.teachers), method.own_optimizers())
        out = method(method.batch(images, targets, labels, method.teachers))
    assert all(torch.isfinite(v).all() for v in [*out.losses.values(), *stats.values()])
    sum(out.losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in method.student_parameters() if p.grad is not None)


def test_peers_and_the_generators_state_are_written_and_resumed(small_store, digits, tmp_path):
    out = tmp_path / "acn"
    summary = distill(_config(small_store[0]), out, progress=False, dataset=digits)
    assert {"last.pt", "student.pt", "peer0.pt", "peer1.pt"} <= {p.name for p in out.iterdir()}
    assert not (out / "peer2.pt").exists()
    assert json.loads((out / "config.json").read_text())["peers"] == 2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"acn/disagreement", "acn/perturbation", "divergent/peer1", "mutual/peer0", "hard/peer1"} <= set(record)
    assert 0 < record["acn/perturbation"] <= 0.1 + 1e-6
    state = torch.load(out / "last.pt", weights_only=True)
    adam = state["own_optimizers"]["generator"]
    assert adam["state"] and adam["param_groups"][0]["betas"] == (0.5, 0.999)
    assert "generator.net.0.weight" in state["distiller"]
    resumed = distill(_config(small_store[0]), out, resume=True, progress=False, dataset=digits)
    assert resumed["peers"][1]["top1"] == pytest.approx(summary["peers"][1]["top1"])


def test_acn_settings_and_refusals():
    config = DistillConfig(store="", student="resnet8_w4", method="acn").resolved()
    assert (config.peers, config.hard_weight, config.soft_weight, config.temperature) == (2, 1.0, 0.0, 1.0)
    for peers in (1, ["resnet8_w4"]):
        with pytest.raises(UserError, match="at least two classifiers: --peers 2 or more"):
            DistillConfig(store="", student="resnet8_w4", method="acn", peers=peers).resolved()
    with pytest.raises(UserError, match="--discriminators is not read"):
        DistillConfig(store="", student="resnet8_w4", method="acn", discriminators=["output"]).resolved()
    with pytest.raises(UserError, match="noise of --method acn must be >= 1"):
        DistillConfig(store="", student="resnet8_w4", method="acn", method_options={"noise": 0}).resolved()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peers", "1"], "--method acn co-distills at least two classifiers: --peers 2 or more"),
        (["--method-option", "alpha=-1"], "alpha of --method acn must be >= 0, got -1"),
    ],
)
def test_refusals_through_the_console_script(tmp_path, args, message):
    process = _run_cli("distill", "--store", str(tmp_path), "--student", "resnet8_w4",
                       "--out", str(tmp_path / "out"), "--method", "acn", *args)  # fmt: skip
    assert process.returncode == 2, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert "Traceback" not in process.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], process.stderr
