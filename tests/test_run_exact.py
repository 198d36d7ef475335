"""A run is what it promises: every epoch reaches the method through the real loop (``set_epoch``, which DKD's
warm-up and ACN's per-epoch noise read), and ``--resume`` is exact for methods with optimisers of their own (ACN's
generator Adam, AFD's separate adversarial Adam under ``--preset afd-paper``): a run interrupted in its second epoch
and resumed ends weight for weight, and optimiser state for optimiser state, where an uninterrupted run ends. The
ranks' averaging of the adapters' and discriminators' gradients is pinned in tests/test_distributed.py."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig, distill, registry
from meal_cache.distill.methods.meal import KD
from meal_cache.engine import loop as loop_module
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract

SPEC = "digits?train_fraction=0.1"  # 143 training rows: 4 steps an epoch at batch 32


def extract_low_data(path, teacher_dir) -> tuple:
    """A store at ``path`` of 2 views of 143 digits rows from both teachers of ``teacher_dir`` (logits, pooled
    blocks, maps), and its data."""
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=SPEC, views=2, teacher_dir=str(teacher_dir),
                           grid=2, device="cpu")  # fmt: skip
    extract(config, path, progress=False)
    return path, load_dataset(SPEC)


@pytest.fixture(scope="module")
def low_data(tmp_path_factory, teacher_dir):
    return extract_low_data(tmp_path_factory.mktemp("exact") / "feats.zarr", teacher_dir)


def _config(store, **settings) -> DistillConfig:
    return DistillConfig(store=str(store), student="resnet8_w4", batch_size=32, device="cpu", workers=0, **settings)


class EpochsSeen(KD):
    """kd that logs the epoch its forward pass sees (``seen_epoch``, averaged over the epoch's steps by the loop),
    so a test reads from metrics.jsonl what the loop told the method, and when."""

    name: ClassVar[str] = "epochs-seen"
    help: ClassVar[str] = "kd, logging the epoch set_epoch gave it"

    def forward(self, batch):
        out = super().forward(batch)
        out.stats["seen_epoch"] = torch.tensor(float(self.epoch))
        return out


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _interrupted_then_resumed(config: DistillConfig, out, digits, interrupt_on_call) -> dict:
    """Run ``config`` into ``out``, stopped (as by Ctrl-C) in its second epoch after training, before that epoch's
    checkpoint, then resumed with ``--resume``; returns the resumed run's summary."""
    undo = interrupt_on_call(loop_module, "evaluate", 2)
    with pytest.raises(KeyboardInterrupt):
        distill(config, out, progress=False, dataset=digits)
    undo()
    assert len(_records(out)) == 1 and not (out / "student.pt").exists()
    return distill(config, out, resume=True, progress=False, dataset=digits)


def test_every_epoch_reaches_the_method_through_the_loop_and_a_resumed_run(low_data, tmp_path, interrupt_on_call,
                                                                          monkeypatch):  # fmt: skip
    monkeypatch.setitem(registry.available_methods(), EpochsSeen.name, EpochsSeen)
    store, digits = low_data
    config = _config(store, method=EpochsSeen.name, epochs=3)
    out = tmp_path / "run"
    _interrupted_then_resumed(config, out, digits, interrupt_on_call)
    records = _records(out)
    # Epoch 1 before the interruption, epochs 2 and 3 by the resumed run: each step saw its own epoch (0-based).
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["seen_epoch"] for r in records] == [0.0, 1.0, 2.0]


def _assert_same_state(expected: dict, got: dict, where: str) -> None:
    """Two state dicts (nested: optimisers' states too) equal entry for entry, bit for bit."""
    assert expected.keys() == got.keys(), where
    for key, value in expected.items():
        name = f"{where}.{key}"
        if isinstance(value, dict):
            _assert_same_state(value, got[key], name)
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert got[key] == value, name


# ACN's generator and AFD's discriminators learn through the methods' own Adam optimisers (own_step), beside the
# loop's SGD of the peers.
OWN_OPTIMISERS = {
    "acn": (dict(method="acn"), {"generator"}),
    "afd-paper": (dict(preset="afd-paper", peers=2), {"discriminators", "adversarial"}),
}


@pytest.mark.parametrize("name", sorted(OWN_OPTIMISERS))
def test_a_resumed_run_with_optimisers_of_its_own_ends_where_an_uninterrupted_one_does(name, low_data, tmp_path,
                                                                                       interrupt_on_call):  # fmt: skip
    settings, optimisers = OWN_OPTIMISERS[name]
    store, digits = low_data
    config = _config(store, epochs=2, **settings)
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    distill(config, whole, progress=False, dataset=digits)
    summary = _interrupted_then_resumed(config, out, digits, interrupt_on_call)
    expected, got = (torch.load(run / "last.pt", weights_only=True) for run in (whole, out))
    assert set(expected["own_optimizers"]) == optimisers and all(
        s["state"] for s in expected["own_optimizers"].values()
    )
    # Every network trained (the peers, ACN's generator, AFD's discriminators and transfer layers), the loop's
    # optimiser and the method's own, as the uninterrupted run left them.
    for part in ("distiller", "student_optimizer", "own_optimizers"):
        _assert_same_state(expected[part], got[part], part)
    assert len(expected["distiller"]) > 20
    for peer in ("peer0.pt", "peer1.pt"):
        _assert_same_state(*(torch.load(run / peer, weights_only=True)["model"] for run in (whole, out)), peer)
    assert len(summary["peers"]) == 2
    # And the same records: the resumed epoch's losses, diagnostics and test metrics; only the wall time
    # differs.
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in _records(run)] for run in (whole, out)]
    assert timeless[1] == timeless[0] and [r["epoch"] for r in timeless[0]] == [1, 2]
