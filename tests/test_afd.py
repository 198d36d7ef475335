"""AFD (``distill --method afd --peers N``): the cyclic pairing, the map discriminators, peer checkpoints,
bf16 autocast, and refusals through the console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from console import one_error_line_of
from torch import nn

from meal_cache.distill import DistillConfig, DistillEpochs, build_run, distill
from meal_cache.distill.methods.afd import Afd, cyclic_sources, teacher_key
from meal_cache.distill.methods.peers import peer_seed
from meal_cache.engine.distributed import World
from meal_cache.engine.evaluate import evaluate_payload
from meal_cache.errors import UserError
from meal_cache.losses import ConvMapDiscriminator
from meal_cache.nets.checkpoint import load_checkpoint
from meal_cache.pipeline.run import load_pipeline, run_pipeline
from meal_cache.store.keys import logits_key

CPU = torch.device("cpu")


def _config(store, **overrides) -> DistillConfig:
    settings = {"store": str(store), "student": "resnet8_w4", "method": "afd", "epochs": 1, "batch_size": 64,
                "device": "cpu", "workers": 0, **overrides}  # fmt: skip
    return DistillConfig(**settings).resolved(("blocks", "maps"))


@pytest.fixture
def peer_run(small_store, digits):
    """A built three-peer run and its first batch; closed afterwards."""
    run = build_run(_config(small_store[0], peers=3), World(), CPU, digits, progress=False)
    epochs = DistillEpochs(run)
    batch = next(iter(epochs.batches(0)))
    yield run, epochs, batch
    run.source.close()
    run.images.close()


def test_cyclic_pairing_learns_from_the_previous_peer():
    assert cyclic_sources(1) == []
    assert cyclic_sources(2) == [1, 0]
    assert cyclic_sources(4) == [3, 0, 1, 2]
    with pytest.raises(ValueError):
        cyclic_sources(0)
    assert peer_seed(5, 0) == 5 and peer_seed(5, 1) != peer_seed(6, 0)


def test_conv_map_discriminator_golden_value_and_shapes():
    disc = ConvMapDiscriminator(2)  # hidden = 8
    first, second, head = disc.net[0], disc.net[2], disc.net[4]
    with torch.no_grad():
        for conv, weight, bias in ((first, 0.5, 0.0), (second, -0.25, 0.0), (head, 1.0, 0.1)):
            conv.weight.fill_(weight)
            conv.bias.fill_(bias)
    # A 1x1 map sees only each kernel's centre tap: 2 * 0.5 = 1 per hidden channel; 8 * -0.25 = -2, leaky to
    # -0.4; the head sums 8 of those plus its bias: -3.1.
    score = disc(torch.ones(1, 2, 1, 1))
    assert score.shape == (1,) and score.item() == pytest.approx(-3.1)
    assert disc(torch.randn(5, 2, 9, 7)).shape == (5,)
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        disc(torch.randn(5, 3, 4, 4))


def test_each_discriminator_sees_its_cyclic_peers_maps(peer_run):
    run, epochs, batch = peer_run
    distiller = run.distiller
    assert isinstance(distiller, Afd) and len(distiller.peers) == 3
    teachers = distiller.teachers
    assert set(distiller.discriminators) == {f"peer{i}" for i in range(3)} | {
        teacher_key(i, t) for i in range(3) for t in teachers}  # fmt: skip
    maps: dict[int, torch.Tensor] = {}
    for index, peer in enumerate(distiller.peers):
        peer.get_submodule(distiller.blocks[index]).register_forward_hook(
            lambda _m, _i, output, index=index: maps.__setitem__(index, output.detach().float()))  # fmt: skip
    seen: dict[str, list[torch.Tensor]] = {}
    for key, disc in distiller.discriminators.items():
        disc.register_forward_hook(lambda _m, inputs, _o, key=key: seen.setdefault(key, []).append(inputs[0]))
    epochs.step(batch)
    channels = distiller.discriminators["peer0"].channels
    for index, source in enumerate([2, 0, 1]):
        # Discriminator step (real, fake), then the generator loss (fake): real is the previous peer's map.
        real, fake, generator = seen[f"peer{index}"]
        assert real.shape == maps[source].shape and real.shape[1] == channels and real.dim() == 4
        assert torch.equal(real, maps[source]) and not torch.equal(real, maps[index])
        assert torch.equal(fake, maps[index]) and torch.equal(generator.detach(), maps[index])
        for teacher in teachers:
            real_t, fake_t, _ = seen[teacher_key(index, teacher)]
            assert real_t.shape[1] == fake_t.shape[1] == 1 and real_t.shape == fake_t.shape
            expected = nn.functional.adaptive_avg_pool2d(maps[index].mean(1, keepdim=True), fake_t.shape[-2:])
            assert torch.allclose(fake_t, expected)


def test_mutual_kl_is_each_peers_kl_from_its_peers_by_hand(peer_run):
    run, _, batch = peer_run
    (rows, targets, _), pixels = batch
    from meal_cache.views import augment

    inputs = augment.normalise(pixels, run.dataset.mean, run.dataset.std, False)
    distiller, temperature, weight = run.distiller, run.config.temperature, run.distiller.options.mutual
    out = distiller(distiller.batch(inputs, targets, run.labels[rows], distiller.teachers))
    with torch.no_grad():
        logits = [peer(inputs).double() for peer in distiller.peers]
    for i, own in enumerate(logits):
        # DML's direction: KL(peer || own) = sum_c p_peer (log p_peer - log p_own), times T^2, over the batch.
        log_own = own / temperature - torch.logsumexp(own / temperature, 1, keepdim=True)
        kls = []
        for j, other in enumerate(logits):
            if j != i:
                log_other = other / temperature - torch.logsumexp(other / temperature, 1, keepdim=True)
                kls.append((log_other.exp() * (log_other - log_own)).sum(1).mean() * temperature**2)
        expected = weight * sum(kls) / len(kls)
        assert float(out.losses[f"mutual/peer{i}"]) == pytest.approx(float(expected), rel=1e-4), i


def test_peers_have_their_own_weights_and_stay_apart(peer_run):
    run, epochs, batch = peer_run
    peers = run.distiller.peers
    pointers = [{p.data_ptr() for p in peer.parameters()} for peer in peers]
    assert all(not (a & b) for i, a in enumerate(pointers) for b in pointers[i + 1 :])
    first = [next(peer.parameters()).detach().clone() for peer in peers]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    trained = {id(p) for p in run.optimisation.optimizer.param_groups[0]["params"]}
    assert all(id(p) in trained for peer in peers for p in peer.parameters())
    before = [torch.cat([p.detach().flatten() for p in peer.parameters()]) for peer in peers]
    out = epochs.step(batch)
    run.optimisation.step(sum(out.losses.values()))
    after = [torch.cat([p.detach().flatten() for p in peer.parameters()]) for peer in peers]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert not torch.equal(after[0], after[1])
    assert {f"{kind}/peer{i}" for kind in ("soft", "mutual") for i in range(3)} <= set(out.losses)


def test_a_step_under_cpu_bf16_autocast_is_finite(peer_run):
    run, epochs, batch = peer_run
    (rows, targets, _), pixels = batch
    from meal_cache.views import augment

    inputs = augment.normalise(pixels, run.dataset.mean, run.dataset.std, False)
    labels = run.labels[rows]
    distiller = run.distiller
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(distiller.batch(inputs, targets, labels, distiller.teachers))
        stats = distiller.discriminator_step(out.adversarial, run.disc_optimizer)
        out.losses.update(distiller.adversarial_losses(out.adversarial))
    assert any(name.startswith("adv/peer") for name in out.losses)
    total = sum(out.losses.values())
    assert all(torch.isfinite(v).all() for v in [*out.losses.values(), *stats.values()])
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in distiller.student_parameters() if p.grad is not None)


def test_peer_checkpoints_are_written_loadable_and_evaluated(small_store, digits, tmp_path):
    out = tmp_path / "afd"
    summary = distill(_config(small_store[0], peers=2), out, progress=False, dataset=digits)
    assert {"config.json", "metrics.jsonl", "last.pt", "student.pt", "peer0.pt", "peer1.pt"} <= {
        p.name for p in out.iterdir()}  # fmt: skip
    assert json.loads((out / "config.json").read_text())["peers"] == 2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"mutual/peer0", "mutual/peer1", "adv/peer0", "adv/peer1", "disc_acc/peer1"} <= set(record)
    payloads = [torch.load(out / f"peer{i}.pt", weights_only=True) for i in range(2)]
    student = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(student["model"][k], v) for k, v in payloads[0]["model"].items())
    assert any(not torch.equal(payloads[1]["model"][k], v) for k, v in payloads[0]["model"].items())
    for payload, test in zip(payloads, summary["peers"], strict=True):
        assert payload["distillation"]["method"] == "afd" and payload["metrics"]["test"] == test
    again = evaluate_payload(load_checkpoint(out / "peer1.pt"), digits.test, CPU).metrics
    assert again["top1"] == pytest.approx(summary["peers"][1]["top1"])
    assert summary["peers"][0]["top1"] == pytest.approx(summary["test"]["top1"])
    # A finished run resumed is finished: the same peers come back.
    resumed = distill(_config(small_store[0], peers=2), out, resume=True, progress=False, dataset=digits)
    assert resumed["peers"][1]["top1"] == pytest.approx(summary["peers"][1]["top1"])


def test_a_store_without_maps_is_refused_naming_the_flag(tmp_path, teacher_dir, digits):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    store = tmp_path / "blocks.zarr"
    extract(ExtractConfig(teachers=["resnet8_w4"], views=1, teacher_dir=str(teacher_dir), features=["blocks"],
                          device="cpu"), store, progress=False, dataset=digits)  # fmt: skip
    with pytest.raises(UserError, match="--features maps"):
        distill(DistillConfig(store=str(store), student="resnet8_w4", method="afd", epochs=1, device="cpu"),
                tmp_path / "out", progress=False, dataset=digits)  # fmt: skip


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "afd", "--peers", "0"], "--peers must be a whole number of students, at least 1, got 0"),
        (["--method", "afd", "--peers", "-3"], "at least 1, got -3"),
        (["--method", "kd", "--peers", "2"], "only --method acn, afd does (got --method kd)"),
    ],
)
def test_bad_peers_through_the_console_script(tmp_path, args, message):
    line = one_error_line_of(["distill", "--store", str(tmp_path), "--student", "resnet8_w4", "--out",
                              str(tmp_path / "out"), *args], tmp_path,
                             start_the_script=args[-1] == "0")  # fmt: skip
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_afd_refuses_the_discriminators_it_does_not_read():
    with pytest.raises(UserError, match="--discriminators is not read"):
        DistillConfig(store="", student="resnet8_w4", method="afd", discriminators=["output"]).resolved()
    assert DistillConfig(store="", student="resnet8_w4", method="afd").resolved().peers == 1
    assert DistillConfig(store="", student="resnet8_w4", method="kd").resolved().peers is None


def test_peers_is_checked_in_a_pipeline_file(tmp_path):
    file = tmp_path / "p.toml"
    base = PIPELINE.replace('afd = { method = "afd", peers = 2 }', "{}")
    file.write_text(base.format(methods='kd = { method = "kd", peers = 2 }'))
    with pytest.raises(UserError, match="method kd: --peers"):
        load_pipeline(file)
    file.write_text(base.format(methods='afd = { method = "afd", peers = 0 }'))
    with pytest.raises(UserError, match="method afd: --peers must be"):
        load_pipeline(file)


PIPELINE = """
name = "afd-tiny"
seeds = [3]
[data]
spec = "digits"
[[teachers]]
name = "resnet"
arch = "resnet8_w4"
epochs = 1
[store]
views = 1
[student]
arch = "resnet8_w4"
epochs = 1
[methods]
alone = {{}}
meal = {{ method = "meal" }}
{methods}
"""


def test_an_afd_pipeline_reports_each_peer_against_alone_and_meal(tmp_path):
    file = tmp_path / "afd.toml"
    file.write_text(PIPELINE.format(methods='afd = { method = "afd", peers = 2 }'))
    run_dir = run_pipeline(load_pipeline(file), tmp_path / "runs", device="cpu", progress=False)
    assert (run_dir / "students" / "afd" / "seed-3" / "peer1.pt").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert {"alone", "meal", "afd", "afd/peer1"} <= set(names)
    against_alone = {r["method"] for r in results["comparisons"]}
    against_meal = {r["method"] for r in results["comparisons_meal"]}
    assert {"afd", "afd/peer1"} <= against_alone and {"afd", "afd/peer1"} <= against_meal
    assert "meal" not in against_meal
    report = (run_dir / "report.md").read_text()
    assert "| afd/peer1 |" in report and "## Against `meal`" in report


def test_the_afd_paper_preset_has_no_teacher_terms_and_the_papers_losses(small_store):
    config = DistillConfig(store=str(small_store[0]), student="resnet8_w4", preset="afd-paper", peers=2,
                           method_options={"mutual": 0.5}).resolved(("blocks", "maps"))  # fmt: skip
    assert (config.method, config.soft_weight, config.hard_weight, config.options.adv_loss) == ("afd", 0.0, 1.0, "ls")
    # The preset's options fill in around the ones the command names.
    # The preset's options (its game knobs, adv_loss and adv_weight, among them) fill in around the command's.
    assert config.method_options == {"mutual": 0.5, "mutual_from": "predecessor", "teacher_adv": 0.0,
                                     "adv_update": "separate", "adv_loss": "ls", "adv_weight": 1.0}  # fmt: skip
    with pytest.raises(UserError, match="--preset afd-paper is --method afd's settings; got --method kd"):
        DistillConfig(store="", student="resnet8_w4", preset="afd-paper", method="kd").resolved()
    with pytest.raises(UserError, match="adv_update of --method afd takes summed or separate"):
        DistillConfig(store="", student="resnet8_w4", method="afd", method_options={"adv_update": "x"}).resolved()


@pytest.fixture
def paper_run(small_store, digits):
    """A built three-peer run with the paper's settings (--preset afd-paper) and its first batch."""
    config = DistillConfig(store=str(small_store[0]), student="resnet8_w4", preset="afd-paper", peers=3, epochs=1,
                           batch_size=64, device="cpu", workers=0).resolved(("blocks", "maps"))  # fmt: skip
    run = build_run(config, World(), CPU, digits, progress=False)
    epochs = DistillEpochs(run)
    yield run, epochs, next(iter(epochs.batches(0)))
    run.source.close()
    run.images.close()


def test_the_papers_setting_learns_from_the_predecessor_only_and_never_from_the_teachers(paper_run):
    run, _, batch = paper_run
    (rows, targets, _), pixels = batch
    from meal_cache.views import augment

    distiller = run.distiller
    assert set(distiller.discriminators) == {"peer0", "peer1", "peer2"}  # no teacher discriminators
    assert distiller.needed_keys() == [logits_key(t) for t in distiller.teachers]  # no teacher maps are read
    inputs = augment.normalise(pixels, run.dataset.mean, run.dataset.std, False)
    labels = run.labels[rows]
    out = distiller(distiller.batch(inputs, targets, labels, distiller.teachers))
    assert out.adversarial == []  # the adversarial update is the method's own step
    assert not any(name.startswith("soft") for name in out.losses)
    temperature = run.config.temperature
    with torch.no_grad():
        logits = [peer(inputs).double() for peer in distiller.peers]
    for i, own in enumerate(logits):
        previous = logits[(i - 1) % 3]
        log_own = torch.log_softmax(own / temperature, 1)
        log_prev = torch.log_softmax(previous / temperature, 1)
        kl = (log_prev.exp() * (log_prev - log_own)).sum(1).mean() * temperature**2
        assert float(out.losses[f"mutual/peer{i}"].detach()) == pytest.approx(float(kl), rel=1e-4), i
        ce = torch.nn.functional.cross_entropy(own, labels)
        assert float(out.losses[f"hard/peer{i}"].detach()) == pytest.approx(float(ce), rel=1e-4), i


def test_the_separate_adversarial_step_moves_discriminators_and_peers_before_the_logit_step(paper_run):
    run, epochs, batch = paper_run
    distiller = run.distiller
    assert set(run.own_optimizers) == {"discriminators", "adversarial"}
    flat = lambda module: torch.cat([p.detach().flatten().clone() for p in module.parameters()])  # noqa: E731
    peers_before, discs_before = flat(distiller.peers), flat(distiller.discriminators)
    seen = []
    distiller.discriminators["peer1"].register_forward_hook(lambda _m, inputs, out: seen.append((inputs[0], out)))
    out = epochs.step(batch)
    # Before the loop's step: the discriminators and the peers have already moved, on the adversarial losses alone.
    assert not torch.equal(flat(distiller.discriminators), discs_before)
    assert not torch.equal(flat(distiller.peers), peers_before)
    assert {"adv/peer0", "disc/peer2"} <= set(out.stats) and not any(k.startswith("adv/") for k in out.losses)
    # Least squares: the discriminator's loss is 0.5 ((D(real) - 1)^2 + D(fake)^2), logged before its step.
    (real, real_scores), (fake, fake_scores) = seen[0], seen[1]
    assert real.shape == fake.shape and not real.requires_grad
    least_squares = 0.5 * (((real_scores - 1) ** 2).mean() + (fake_scores**2).mean())
    assert float(out.stats["disc/peer1"]) == pytest.approx(float(least_squares), rel=1e-5)
    state = run.own_optimizers["adversarial"].state_dict()["state"]
    assert state and run.own_optimizers["adversarial"].param_groups[0]["lr"] == run.config.options.disc_lr


def test_peers_of_different_architectures_meet_through_a_transfer_layer(small_store, digits, tmp_path):
    config = _config(small_store[0], peers=["resnet8_w4", "resnet20"], student="resnet8_w4")
    out = tmp_path / "mixed"
    summary = distill(config, out, progress=False, dataset=digits)
    payloads = [torch.load(out / f"peer{i}.pt", weights_only=True) for i in range(2)]
    assert [p["arch"] for p in payloads] == ["resnet8_w4", "resnet20"]
    again = evaluate_payload(load_checkpoint(out / "peer1.pt"), digits.test, CPU).metrics
    assert again["top1"] == pytest.approx(summary["peers"][1]["top1"])
    run = build_run(config, World(), CPU, digits, progress=False)
    distiller = run.distiller
    # resnet20's last map (64, 4, 4) meets resnet8_w4's (16, 4, 4) through resnet20's own transfer layer.
    assert set(distiller.transfers) == {"peer1"} and distiller.discriminators["peer0"].channels == 16
    trained = {id(p) for group in run.optimisation.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in distiller.transfers.parameters())
    run.source.close()
    run.images.close()


def test_a_transfer_layer_brings_a_map_to_the_smaller_shape():
    from meal_cache.losses import TransferLayer

    assert TransferLayer((8, 8, 8), (4, 4, 4))(torch.randn(2, 8, 8, 8)).shape == (2, 4, 4, 4)
    odd = TransferLayer((6, 7, 7), (3, 3, 3))
    assert odd.conv.stride == (2, 2) and odd(torch.randn(2, 6, 7, 7)).shape == (2, 3, 3, 3)
    assert (odd(torch.randn(2, 6, 7, 7)) >= 0).all()


def test_peer_architectures_through_the_console_script(tmp_path):
    process = _run_cli("distill", "--store", str(tmp_path), "--method", "afd", "--peers",
                       "resnet8_w4,resnet20", "--student", "resnet20", "--out", str(tmp_path / "out"))  # fmt: skip
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2 and len(lines) == 1, process.stderr
    assert "peer 0 (the student) first: it starts with resnet8_w4, but --student is resnet20" in lines[0]
    process = _run_cli("distill", "--store", str(tmp_path), "--method", "afd", "--peers",
                       "resnet8_w4,resnet2O", "--out", str(tmp_path / "out"))  # fmt: skip
    assert process.returncode == 2 and "resnet2O" in process.stderr and "Traceback" not in process.stderr
