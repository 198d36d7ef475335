"""ACN (Zhang, Hu, Qin, Xu and Wang, "Adversarial co-distillation learning for image recognition", Pattern
Recognition 111, 2021): ``distill --method acn --peers N`` co-distils N classifiers while a generator, trained in
alternation, makes images they disagree on ("divergent examples"), on which they then learn to agree.

Every step, before the classifiers' own step (:meth:`Acn.own_step`, called by the loop first):

1. the generator makes ``x_g = x + alpha * tanh(G(x, z))`` from the batch's normalised images ``x`` and per-pixel
   noise ``z ~ N(0, 1)`` (``noise`` channels, drawn from the run's ``Stream.ACN_NOISE``), so
   ``|x_g - x|_inf <= alpha`` in normalised pixel units, always: the restriction of the generator's search is a
   hard bound, not a penalty;
2. one Adam step of the generator alone maximises the peers' disagreement on ``x_g``, the generalised
   Jensen-Shannon divergence ``H(mean_i p_i) - mean_i H(p_i)`` of their softmax outputs at ``--temperature``.

Then the classifiers' step (:meth:`Acn.forward`, the loop's SGD over the peers): each peer learns from the labels
(``hard/peerI``), optionally from the cached teachers (``soft/peerI``, ``--soft-weight``), from its peers on the
natural images (``mutual/peerI``: DML's KL from each other peer, detached, averaged over them) and on fresh
generated images (``divergent/peerI``: the same KL on ``x_g`` from the just-updated generator, fresh noise).
Peer ``i``'s losses reach only peer ``i``, so the one step over every peer's parameters is N independent steps.

Defaults and why (the paper's own values were not read; docs/design.md, "ACN", says more):

- ``alpha = 0.1``: a tenth of a standard deviation of the data, 0.032 of the 0-255 range on digits (std 0.32) and
  0.023 on ImageNet's statistics, about ``extract --divergent-eps``' default (0.03), so the images stay near the
  data as the divergent views do;
- ``noise = 4`` channels: enough for different images from one batch each step, few next to the hidden width;
- ``width = 32``: a small generator next to the classifiers (a few thousand weights at 3 colour channels);
- ``gen_lr = 1e-3``, Adam betas (0.5, 0.999) (DCGAN's betas for an adversarial player): the generator takes one
  step per batch against classifiers that move every step, so it needs to move faster than DCGAN's 2e-4;
- ``mutual = 1`` and ``divergent_weight = 1``: DML's weight for the peers' KL, the same on generated images, so
  natural and generated images teach alike;
- ``--temperature 1``: DML compares the peers' plain softmax outputs, and the generator measures disagreement at
  the same temperature the peers agree at;
- ``--hard-weight 1 --soft-weight 0``: the paper's classifiers learn from the labels and each other; the cached
  teachers are an optional extra target for every peer.

The generator's step runs the peers as the classifiers' step does (train mode, batch statistics) but their
buffers (batch norm's running statistics) are put back afterwards: the generator's images are searched with, not
trained on, and the classifiers' step sees the generated images once, as it sees the natural ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.distill.methods.base import Batch, Method, MethodOutput
from meal_cache.distill.methods.peers import build_peers, mutual_kl, peer_architectures
from meal_cache.engine.loop import Stream, epoch_generator
from meal_cache.errors import UserError

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class AcnOptions:
    """``alpha``: the bound of the generator's change of a pixel (normalised units); ``noise``: channels of the
    generator's noise; ``width``: its hidden channels; ``gen_lr``: its Adam rate; ``mutual``: weight of the peers'
    KL on natural images; ``divergent_weight``: the same on generated images."""

    alpha: float = 0.1
    noise: int = field(default=4, metadata={"low": 1})
    width: int = field(default=32, metadata={"low": 1})
    gen_lr: float = 1e-3
    mutual: float = 1.0
    divergent_weight: float = 1.0


def disagreement(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """The peers' generalised Jensen-Shannon divergence at ``temperature``, ``H(mean_i p_i) - mean_i H(p_i)``,
    averaged over the batch: 0 exactly when they all agree, at most log(N) for N peers."""
    log_probs = torch.stack([F.log_softmax(value.float() / temperature, dim=1) for value in logits])
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
    entropy_of_mean = -(log_mean.exp() * log_mean).sum(-1)
    mean_entropy = -(log_probs.exp() * log_probs).sum(-1).mean(0)
    return (entropy_of_mean - mean_entropy).mean()


class AcnGenerator(nn.Module):
    """``G(x, z)``: three 3x3 convolutions on the image and its noise channels, and the weakly residual
    connection ``x + alpha * tanh(G(x, z))``, so no pixel moves by more than ``alpha``. No batch norm: a batch's
    images would otherwise change each other's perturbations."""

    def __init__(self, channels: int, noise: int, width: int, alpha: float) -> None:
        super().__init__()
        self.noise, self.alpha = noise, alpha
        self.net = nn.Sequential(
            nn.Conv2d(channels + noise, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # float32 always (autocast off): the bound is exact and the perturbation is not rounded to bf16's 8 bits.
        with torch.autocast(images.device.type, enabled=False):
            x = images.float()
            return x + self.alpha * torch.tanh(self.net(torch.cat([x, z.to(x)], dim=1)))


@contextlib.contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as it is (train mode: batch statistics) and put its buffers (running statistics, batch
    counts) back afterwards."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _image_channels(student: nn.Module) -> int:
    """The channels the student reads: its first convolution's input channels (3 where it has none)."""
    first = next((m for m in student.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


class Acn(Method):
    """ACN's co-distilling peers and its generator; the distillation loop, checkpoints and resume run unchanged
    (``student`` is peer 0; the generator and its Adam state are saved in ``last.pt``)."""

    name: ClassVar[str] = "acn"
    help: ClassVar[str] = ("ACN: --peers classifiers learn from labels and each other (mutual KL) on natural images "
                           "and on a generator's images, made within +-alpha to split them")  # fmt: skip
    trains_peers: ClassVar[bool] = True
    temperature: ClassVar[float] = 1.0
    settings: ClassVar[dict] = {"hard_weight": 1.0, "soft_weight": 0.0}
    Options: ClassVar[type] = AcnOptions

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        del self.student  # peer 0, below
        self.peers = build_peers(student, config, store.attrs["dataset"]["num_classes"], image_size)
        options = self.options
        self.generator = AcnGenerator(_image_channels(student), options.noise, options.width, options.alpha)
        self.noise_stream = epoch_generator(config.seed, 0, Stream.ACN_NOISE)

    @classmethod
    def check(cls, config: DistillConfig) -> DistillConfig:
        """Two peers where ``--peers`` is not given, fewer refused."""
        config = dataclasses.replace(config, peers=2 if config.peers is None else config.peers)
        if len(peer_architectures(config)) < 2:
            raise UserError(f"--method {config.method} co-distills at least two classifiers: --peers 2 or more")
        return config

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        options = cls.options_of(config)
        return super().has_a_loss(config) or options.mutual > 0 or options.divergent_weight > 0

    @property
    def student(self) -> nn.Module:
        return self.peers[0]

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws its noise from its own stream, so a resumed epoch draws what it drew the first time."""
        super().set_epoch(epoch)
        self.noise_stream = epoch_generator(self.config.seed, epoch, Stream.ACN_NOISE)

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.peers.parameters())

    def trained_networks(self) -> list[nn.Module]:
        return list(self.peers)

    def own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": torch.optim.Adam(self.generator.parameters(), self.options.gen_lr, betas=(0.5, 0.999))}

    def noise_like(self, images: torch.Tensor) -> torch.Tensor:
        """Fresh N(0, 1) noise, ``noise`` channels at every pixel of ``images``, from this epoch's stream."""
        batch, _, height, width = images.shape
        z = torch.randn((batch, self.generator.noise, height, width), generator=self.noise_stream)
        return z.to(images.device, non_blocking=True)

    def own_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        """One Adam step of the generator alone towards more disagreement of the peers on its images (the peers'
        weights, gradients and buffers are left as they were); logs the disagreement before the step and the
        largest change of a pixel."""
        optimizer, images = optimizers["generator"], batch.images
        with torch.autocast(images.device.type, enabled=False), kept_buffers(self.peers):
            generated = self.generator(images, self.noise_like(images))
            divergence = disagreement([peer(generated) for peer in self.peers], self.config.temperature)
            optimizer.zero_grad(set_to_none=True)
            (-divergence).backward(inputs=list(self.generator.parameters()))
            optimizer.step()
        return {"acn/disagreement": divergence.detach(),
                "acn/perturbation": (generated.detach() - images.float()).abs().max()}  # fmt: skip

    def forward(self, batch: Batch) -> MethodOutput:
        """Every peer's named losses (``hard/peerI``, ``soft/peerI``, ``mutual/peerI``, ``divergent/peerI``); the
        logits are peer 0's on the natural images (ACN refuses torchrun, so ``batch.student`` is peer 0 itself)."""
        config, options, images = self.config, self.options, batch.images
        logits = [peer(images).float() for peer in self.peers]
        out = MethodOutput(logits[0])
        soft_sets = []
        if config.soft_weight:
            soft_sets = self.teacher_soft_targets(batch)
        generated_logits = []
        if options.divergent_weight:
            with torch.no_grad():
                generated = self.generator(images, self.noise_like(images)).to(memory_format=_format_of(images))
            generated_logits = [peer(generated).float() for peer in self.peers]
        for index, own_logits in enumerate(logits):
            name = f"peer{index}"
            out.losses.update(self.label_losses(own_logits, soft_sets, batch.labels, suffix=f"/{name}"))
            if options.mutual:
                out.losses[f"mutual/{name}"] = options.mutual * mutual_kl(logits, index, config.temperature)
            if generated_logits:
                kl = mutual_kl(generated_logits, index, config.temperature)
                out.losses[f"divergent/{name}"] = options.divergent_weight * kl
        if generated_logits:
            out.stats["acn/generated_disagreement"] = disagreement(generated_logits, config.temperature).detach()
        return out


def _format_of(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format
