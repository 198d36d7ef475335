"""AFD (Chung et al., ICML 2020, feature-map-level online adversarial distillation) on the teacher cache:
``distill --method afd --peers N`` (or ``--peers ARCH,ARCH,...``) trains students together.

Each peer has a conv discriminator on its last block's full feature map that takes the maps of its cyclic peer
(peer ``i - 1 mod N``) as real and its own as fake; where peers' maps differ in shape, each larger map passes
through its peer's own transfer layer to the smallest peer map's shape. Optionally (``teacher_adv``), one
discriminator per cached teacher takes the teacher's stored channel-mean map of its last block as real and the
peer's channel-mean map (pooled to the same size) as fake. Each peer learns to fool its own discriminators, and
from the teachers' soft labels (``--soft-weight``), cross-entropy (``--hard-weight``) and its peers' logits (the
option ``mutual``: KL from every other peer, as DML, or from the predecessor only, the paper's).

The adversarial update is either summed into the student's step (``adv_update=summed``, the base class's game) or
the paper's: a separate Adam step of the peers on their adversarial losses, after the discriminators' step and
before the logit step (``adv_update=separate``). ``--preset afd-paper`` is the paper's setting (no teacher terms).

Peer ``i``'s losses reach only peer ``i`` (its peers' maps and logits enter detached), so one step over all peers'
parameters is N independent steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache import losses
from meal_cache.distill.methods.adversarial import (
    AdversarialInput,
    AdversarialMethod,
    AdversarialOutput,
    GameOptions,
)
from meal_cache.distill.methods.base import PRESET_LOGITS, Batch, StoreNeeds
from meal_cache.distill.methods.peers import build_peers, mutual_kl, peer_architectures
from meal_cache.errors import UserError
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.store.keys import feature_key

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store.teacher_store import TeacherStore

KL_SOURCES = ("all", "predecessor")
ADV_UPDATES = ("summed", "separate")


def cyclic_sources(peers: int) -> list[int]:
    """AFD's cyclic order: for each peer ``i``, the peer whose maps its discriminator takes as real, ``i - 1 mod
    N``. One peer has no peer to learn from (empty)."""
    if peers < 1:
        raise ValueError(f"peers must be at least 1, got {peers}")
    return [(i - 1) % peers for i in range(peers)] if peers > 1 else []


def teacher_key(peer: int, teacher: str) -> str:
    """The discriminator of peer ``peer`` against ``teacher``'s maps (ModuleDict keys may not hold dots)."""
    return f"peer{peer}__{teacher}".replace(".", "_")


def smallest_map(shapes: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The shape every peer's map is compared in: the fewest channels and the smallest grid among the peers'."""
    return (min(s[0] for s in shapes), min(s[1] for s in shapes), min(s[2] for s in shapes))


@dataclass(frozen=True)
class AfdOptions(GameOptions):
    """The adversarial game's options (:class:`GameOptions`, each also a flag: ``--adv-weight``, ...) and AFD's own:
    ``mutual``: weight of the peers' logit KL; ``mutual_from``: all (each other peer, averaged; DML) or
    predecessor (peer i - 1 only; the paper's); ``teacher_adv``: the teacher discriminators' weight as a share of
    --adv-weight (0: none are built); ``adv_update``: summed (one step) or separate (the paper's own Adam step of
    the peers on their adversarial losses, at --disc-lr)."""

    mutual: float = 1.0
    mutual_from: str = "all"
    teacher_adv: float = 1.0
    adv_update: str = "summed"


class Afd(AdversarialMethod):
    """AFD's peers, their transfer layers and discriminators; the distillation loop, its checkpoints and resume
    run unchanged (``student`` is peer 0)."""

    name: ClassVar[str] = "afd"
    help: ClassVar[str] = ("AFD: --peers students, each with a conv discriminator on its last feature map against its "
                           "cyclic peer's (and the teachers' maps), plus mutual KL")  # fmt: skip
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(("maps",), "all", "logits (16 sampled classes above 24 classes) "
                                                   "and every block's channel-mean map",
                                                   logits=PRESET_LOGITS)  # fmt: skip
    trains_peers: ClassVar[bool] = True
    Options: ClassVar[type] = AfdOptions

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        del self.student  # peer 0, below
        self.peers = build_peers(student, config, store.attrs["dataset"]["num_classes"], image_size)
        # AFD's discriminators look at the last feature map, where the networks' knowledge is most specific.
        self.blocks = [peer.block_names[-1] for peer in self.peers]
        shapes = [block_shapes(peer, image_size)[block] for peer, block in zip(self.peers, self.blocks, strict=True)]
        self.sources = cyclic_sources(len(self.peers))
        common = smallest_map(shapes)
        larger = [(i, shape) for i, shape in enumerate(shapes) if self.sources and shape != common]
        self.transfers = nn.ModuleDict({f"peer{i}": losses.TransferLayer(shape, common) for i, shape in larger})
        for index in range(len(self.sources)):
            self.discriminators[f"peer{index}"] = losses.ConvMapDiscriminator(common[0])
        # The store keeps one channel-mean map per teacher block, so against a teacher the peer's map is reduced
        # the same way (no learned transfer layer: teachers and students differ in channels).
        self.teacher_blocks = {t: store.blocks(t)[-1] for t in self.teachers} if self.options.teacher_adv else {}
        if self.teacher_blocks:
            self.require_stored(store, "maps")
        self.teacher_shapes = {(i, t): (min(h, b.height), min(w, b.width))
                               for i, (_, h, w) in enumerate(shapes)
                               for t, b in self.teacher_blocks.items()}  # fmt: skip
        for index, teacher in self.teacher_shapes:
            self.discriminators[teacher_key(index, teacher)] = losses.ConvMapDiscriminator(1)

    @classmethod
    def check_options(cls, options: AfdOptions) -> None:
        super().check_options(options)  # the game's knobs
        for name, value, choices in (("mutual_from", options.mutual_from, KL_SOURCES),
                                     ("adv_update", options.adv_update, ADV_UPDATES)):  # fmt: skip
            if value not in choices:
                raise UserError(f"--method-option {name} of --method {cls.name} takes {' or '.join(choices)}, "
                                f"got {value!r}")  # fmt: skip

    @classmethod
    def check(cls, config: DistillConfig) -> DistillConfig:
        """One peer where ``--peers`` is not given; the map discriminators are its own."""
        options = cls.options_of(config)
        if options.adv_update == "separate" and options.adv_game == "joint":
            raise UserError("--method-option adv_update=separate is its own adversarial step; it does not combine "
                            "with --adv-game joint")  # fmt: skip
        return dataclasses.replace(config, peers=1 if config.peers is None else config.peers)

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        mutual = len(peer_architectures(config)) > 1 and cls.options_of(config).mutual > 0
        return super().has_a_loss(config) or cls.options_of(config).adv_weight > 0 or mutual

    @property
    def student(self) -> nn.Module:
        return self.peers[0]

    def needed_keys(self) -> list[str]:
        """The store arrays training reads: every teacher's logits and (with teacher discriminators) its last
        block's map."""
        return super().needed_keys() + [feature_key(t, "maps", b.key) for t, b in self.teacher_blocks.items()]

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.peers.parameters()) + list(self.transfers.parameters())

    def trained_networks(self) -> list[nn.Module]:
        return list(self.peers)

    def own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``adv_update=separate``: the discriminators' Adam and the peers' own Adam for their adversarial losses,
        both at ``--disc-lr`` (the loop's optimiser then takes the logit losses only)."""
        if self.options.adv_update != "separate" or not len(self.discriminators):
            return {}
        rate, betas = self.options.disc_lr, (0.5, 0.999)
        return {"discriminators": torch.optim.Adam(self.discriminators.parameters(), rate, betas=betas),
                "adversarial": torch.optim.Adam(self.student_parameters(), rate, betas=betas)}  # fmt: skip

    def own_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        """The paper's order: the discriminators' step, then the peers' step on their adversarial losses against
        the updated discriminators (the logit step follows, in the loop)."""
        if "adversarial" not in optimizers:
            return {}
        _, maps = self._run_peers(batch.images)
        inputs = self._adversarial_inputs(maps, batch.targets, batch.selected)
        stats = self.discriminator_step(inputs, optimizers["discriminators"])
        named = self.adversarial_losses(inputs)
        optimizers["adversarial"].zero_grad(set_to_none=True)
        sum(named.values()).backward()
        optimizers["adversarial"].step()
        return {**stats, **{name: value.detach() for name, value in named.items()}}

    def teacher_maps(self, peer: int, teacher: str, stored: torch.Tensor, peer_map: torch.Tensor):
        """Real and fake inputs of a teacher discriminator: ``teacher``'s stored ``(B, H, W)`` map and peer
        ``peer``'s ``(B, C, H, W)`` map averaged over channels, both pooled to a common size, as ``(B, 1, h, w)``
        float32."""
        shape = self.teacher_shapes[(peer, teacher)]
        real = F.adaptive_avg_pool2d(stored.float().unsqueeze(1), shape)
        fake = F.adaptive_avg_pool2d(peer_map.float().mean(1, keepdim=True), shape)
        return real, fake

    def compared_map(self, peer: int, peer_map: torch.Tensor) -> torch.Tensor:
        """Peer ``peer``'s map as the peer discriminators see it: through its transfer layer where it is larger
        than the smallest peer map."""
        key = f"peer{peer}"
        return self.transfers[key](peer_map).float() if key in self.transfers else peer_map

    def _run_peers(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, maps = [], []
        for peer, block in zip(self.peers, self.blocks, strict=True):
            with BlockTap(peer, [block]) as tap:
                logits.append(peer(images).float())
            maps.append(tap.outputs[block].float())
        return logits, maps

    def _adversarial_inputs(self, maps: list[torch.Tensor], targets: dict[str, torch.Tensor],
                            selected: list[str]) -> list[AdversarialInput]:  # fmt: skip
        """Each peer's discriminators' inputs: its cyclic peer's map (real, detached) against its own (fake), and
        each selected teacher's stored map against its channel mean."""
        inputs = []
        compared = [self.compared_map(i, m) for i, m in enumerate(maps)] if self.sources else []
        teacher_weight = self.options.teacher_adv * self.teacher_share(selected)
        for index, own_map in enumerate(maps):
            if self.sources:
                inputs.append(AdversarialInput(f"peer{index}", compared[self.sources[index]].detach(),
                                               compared[index], 1.0))  # fmt: skip
            for teacher in selected if self.teacher_blocks else []:
                stored = targets[feature_key(teacher, "maps", self.teacher_blocks[teacher].key)]
                real, fake = self.teacher_maps(index, teacher, stored, own_map)
                inputs.append(AdversarialInput(teacher_key(index, teacher), real, fake, teacher_weight))
        return inputs

    def forward(self, batch: Batch) -> AdversarialOutput:
        """Every peer's named losses (``soft/peerI``, ``hard/peerI``, ``mutual/peerI``) and, unless the
        adversarial update is separate, the discriminators' inputs; the logits are peer 0's (AFD refuses
        torchrun, so ``batch.student`` is peer 0 itself)."""
        config, options = self.config, self.options
        logits, maps = self._run_peers(batch.images)
        out = AdversarialOutput(logits[0])
        soft_sets = self.teacher_soft_targets(batch)
        for index, own_logits in enumerate(logits):
            name = f"peer{index}"
            out.losses.update(self.label_losses(own_logits, soft_sets, batch.labels, suffix=f"/{name}"))
            if self.sources and options.mutual:  # KL(peer || own) at T, to each (detached) peer's prediction
                sources = [self.sources[index]] if options.mutual_from == "predecessor" else None
                out.losses[f"mutual/{name}"] = options.mutual * mutual_kl(logits, index, config.temperature, sources)
        if options.adv_update == "summed":
            out.adversarial = self._adversarial_inputs(maps, batch.targets, batch.selected)
        return out
