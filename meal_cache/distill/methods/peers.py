"""Students trained together (AFD's peers, ACN's co-distilling classifiers): their architectures and their seeds.

``--peers N`` trains N students of ``--student``; ``--peers ARCH,ARCH,...`` trains one of each architecture
named, peer 0 first (peer 0 is ``--student``, written as ``student.pt``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.losses import kd_kl
from meal_cache.nets.models import create_model

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig

# Peer i > 0 is initialised from seed + i * this (peer 0 from the run's seed, so a one-peer run starts where any
# other method's student does); far apart so the peers of nearby seeds never share an initialisation.
PEER_SEED_STRIDE = 1_000_003


def peer_seed(seed: int, index: int) -> int:
    """The seed peer ``index`` of a run with ``seed`` is initialised from."""
    return seed + PEER_SEED_STRIDE * index


def peer_architectures(config: DistillConfig) -> list[str]:
    """Every peer's architecture, peer 0 first: ``--peers``' list, or ``--student`` ``--peers`` times (once where
    ``--peers`` is not given)."""
    if isinstance(config.peers, list | tuple):
        return list(config.peers)
    return [config.student] * (config.peers or 1)


def build_peers(student: nn.Module, config: DistillConfig, num_classes: int, image_size: int) -> nn.ModuleList:
    """Peer 0 is ``student`` (built from the run's seed); peer ``i`` is built from :func:`peer_seed` inside a
    forked RNG, so the run's own random streams are left where they were."""
    networks = [student]
    for index, arch in enumerate(peer_architectures(config)[1:], start=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(peer_seed(config.seed, index))
            networks.append(create_model(arch, num_classes, image_size))
    return nn.ModuleList(networks)


def mutual_kl(logits: list[torch.Tensor], index: int, temperature: float,
              sources: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """DML's term of peer ``index``: the mean over its sources (``sources``, or every other peer) of
    T^2 KL(source || own) at ``temperature``, the sources detached so it reaches peer ``index`` only."""
    own = logits[index]
    others = [logits[j] for j in sources] if sources is not None else [o for j, o in enumerate(logits) if j != index]
    total = sum(kd_kl(own, F.softmax(o.detach() / temperature, dim=1), temperature) for o in others)
    return total / len(others)
