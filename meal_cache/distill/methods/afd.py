"""AFD (Chung et al., ICML 2020, feature-map-level online adversarial distillation) on the teacher cache:
``distill --method afd --peers N`` trains N students of one architecture together.

Each peer has a conv discriminator on its last block's full feature map that takes the maps of its cyclic peer
(peer ``i - 1 mod N``) as real and its own as fake, and one per cached teacher that takes the teacher's stored
channel-mean map of its last block as real and the peer's channel-mean map (pooled to the same size) as fake.
Each peer learns to fool its own discriminators, and from the teachers' soft labels and its peers' logits
(mutual KL, as in DML). With one peer only the cached teachers teach.

The step is :class:`meal_cache.distill.step.DistillEpochs`' own: :class:`PeerDistiller` is a
:class:`~meal_cache.distill.methods.base.Method` (logits, named losses, discriminator inputs), and the loop
backpropagates the sum of every peer's losses; peer ``i``'s losses reach only peer ``i`` (its peers' maps and
logits enter detached), so one SGD step over all peers' parameters is N independent steps.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache import losses
from meal_cache.distill.methods.base import (
    AdversarialInput,
    DistillerOutput,
    Method,
    StoreNeeds,
    soft_target_sets,
)
from meal_cache.errors import UserError
from meal_cache.models import create_model
from meal_cache.store_keys import feature_key, logits_key
from meal_cache.taps import BlockTap, block_shapes

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store import TeacherStore

# Peer i > 0 is initialised from seed + i * this (peer 0 from the run's seed, so a one-peer run starts where any
# other method's student does); far apart so the peers of nearby seeds never share an initialisation.
PEER_SEED_STRIDE = 1_000_003


def peer_seed(seed: int, index: int) -> int:
    """The seed peer ``index`` of a run with ``seed`` is initialised from."""
    return seed + PEER_SEED_STRIDE * index


def cyclic_sources(peers: int) -> list[int]:
    """AFD's cyclic order: for each peer ``i``, the peer whose maps its discriminator takes as real, ``i - 1 mod
    N``. One peer has no peer to learn from (empty)."""
    if peers < 1:
        raise ValueError(f"peers must be at least 1, got {peers}")
    return [(i - 1) % peers for i in range(peers)] if peers > 1 else []


def teacher_key(peer: int, teacher: str) -> str:
    """The discriminator of peer ``peer`` against ``teacher``'s maps (ModuleDict keys may not hold dots)."""
    return f"peer{peer}__{teacher}".replace(".", "_")


class PeerDistiller(Method):
    """AFD's peers and their discriminators; the distillation loop, its checkpoints and resume run unchanged
    (``student`` is peer 0)."""

    name: ClassVar[str] = "afd"
    help: ClassVar[str] = ("AFD: --peers students, each with conv discriminators on its last feature map against its "
                           "cyclic peer's and the teachers' maps, plus mutual KL")  # fmt: skip
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(("maps",), "all", "logits and every block's channel-mean map")
    trains_peers: ClassVar[bool] = True

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        del self.student  # peer 0, below
        self.require_stored(store, "maps")
        num_classes = store.attrs["dataset"]["num_classes"]
        networks = [student]
        for index in range(1, config.peers):
            with torch.random.fork_rng(devices=[]):  # the run's own random stream is left where it was
                torch.manual_seed(peer_seed(config.seed, index))
                networks.append(create_model(config.student, num_classes, image_size))
        self.peers = nn.ModuleList(networks)
        # AFD's discriminators look at the last feature map, where the networks' knowledge is most specific.
        self.block = student.block_names[-1]
        channels, height, width = block_shapes(student, image_size)[self.block]
        self.sources = cyclic_sources(config.peers)
        for index in range(len(self.sources)):
            self.discriminators[f"peer{index}"] = losses.ConvMapDiscriminator(channels)
        # The store keeps one channel-mean map per teacher block, so against a teacher the peer's map is reduced
        # the same way (no learned transfer layer: teachers and students differ in channels).
        self.teacher_blocks = {t: store.blocks(t)[-1] for t in self.teachers}
        self.teacher_shapes = {t: (min(height, b.height), min(width, b.width)) for t, b in self.teacher_blocks.items()}
        for index in range(config.peers):
            for teacher in self.teachers:
                self.discriminators[teacher_key(index, teacher)] = losses.ConvMapDiscriminator(1)

    @classmethod
    def check(cls, config: DistillConfig) -> DistillConfig:
        """One peer where ``--peers`` is not given; the map discriminators are its own."""
        if config.discriminators:
            instead = "--adv-weight 0 turns the adversarial terms off"
            raise UserError(f"--method {config.method} trains its own discriminators on the peers' maps; "
                            f"--discriminators is not read ({instead})")  # fmt: skip
        return dataclasses.replace(config, peers=1 if config.peers is None else config.peers)

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        return super().has_a_loss(config) or config.adv_weight > 0  # the map discriminators

    @property
    def student(self) -> nn.Module:
        return self.peers[0]

    def needed_keys(self) -> list[str]:
        """The store arrays training reads: every teacher's logits and its last block's map."""
        return super().needed_keys() + [feature_key(t, "maps", b.key) for t, b in self.teacher_blocks.items()]

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.peers.parameters())

    def trained_networks(self) -> list[nn.Module]:
        return list(self.peers)

    def teacher_maps(self, teacher: str, stored: torch.Tensor, peer_map: torch.Tensor):
        """Real and fake inputs of a teacher discriminator: ``teacher``'s stored ``(B, H, W)`` map and a peer's
        ``(B, C, H, W)`` map averaged over channels, both pooled to a common size, as ``(B, 1, h, w)`` float32."""
        shape = self.teacher_shapes[teacher]
        real = F.adaptive_avg_pool2d(stored.float().unsqueeze(1), shape)
        fake = F.adaptive_avg_pool2d(peer_map.float().mean(1, keepdim=True), shape)
        return real, fake

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        labels: torch.Tensor,
        selected: list[str],
        run_student: nn.Module | None = None,
    ) -> DistillerOutput:
        """Every peer's named losses (``soft/peerI``, ``hard/peerI``, ``mutual/peerI``) and discriminator inputs;
        the logits are peer 0's. ``run_student`` is unused (AFD refuses torchrun)."""
        config, temperature = self.config, self.config.temperature
        logits, maps = [], []
        for peer in self.peers:
            with BlockTap(peer, [self.block]) as tap:
                logits.append(peer(images).float())
            maps.append(tap.outputs[self.block].float())
        out = DistillerOutput(logits[0], {}, [], {})
        teacher_logits = [targets[logits_key(t)].float() for t in selected]
        soft_sets = soft_target_sets(config, teacher_logits)
        teacher_weight = 1.0 / len(selected) if config.teacher_selection == "mean" else 1.0
        for index, (own_logits, own_map) in enumerate(zip(logits, maps, strict=True)):
            name = f"peer{index}"
            out.losses.update(self.label_losses(own_logits, soft_sets, labels, suffix=f"/{name}"))
            others = [other for j, other in enumerate(logits) if j != index]
            if others and config.soft_weight:  # DML: the mean KL to each peer's (detached) softened prediction
                mutual = sum(losses.kd_kl(own_logits, F.softmax(o.detach() / temperature, dim=1), temperature)
                             for o in others) / len(others)  # fmt: skip
                out.losses[f"mutual/{name}"] = config.soft_weight * mutual
            if self.sources:
                out.adversarial.append(AdversarialInput(name, maps[self.sources[index]].detach(), own_map, 1.0))
            for teacher in selected:
                stored = targets[feature_key(teacher, "maps", self.teacher_blocks[teacher].key)]
                real, fake = self.teacher_maps(teacher, stored, own_map)
                out.adversarial.append(AdversarialInput(teacher_key(index, teacher), real, fake, teacher_weight))
        return out
