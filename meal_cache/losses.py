"""Distillation losses, discriminators and adapters.

Every loss is a plain function of tensors with a value a test can compute by hand. Conventions:
- similarity losses compare a student representation with a teacher's of the same shape ``(B, ...)`` and
  return the mean over the batch;
- adversarial losses treat the teacher as *real* (target 1) and the student as *fake* (target 0); the student's
  (generator's) loss asks the discriminator to call its features real.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.errors import unknown_choice


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def l1_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over all elements."""
    return F.l1_loss(student, teacher)


def l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all elements."""
    return F.mse_loss(student, teacher)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each sample's flattened vectors, averaged over the batch."""
    return (1.0 - F.cosine_similarity(_flat(student), _flat(teacher), dim=1)).mean()


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of softmax(student/T) against softmax(teacher/T) over each sample's flattened vector,
    averaged over the batch (MEAL's default similarity)."""
    target = F.softmax(_flat(teacher) / temperature, dim=1)
    return -(target * F.log_softmax(_flat(student) / temperature, dim=1)).sum(1).mean()


def soft_entropy(teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(teacher/T) over each sample's flattened vector, averaged over the batch: the part of
    :func:`soft_cross_entropy` no student can lower (the rest is the KL from the teacher's distribution)."""
    log_target = F.log_softmax(_flat(teacher) / temperature, dim=1)
    return -(log_target.exp() * log_target).sum(1).mean()


SIMILARITY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": l1_loss,
    "l2": l2_loss,
    "cosine": cosine_loss,
    "soft-ce": soft_cross_entropy,
}


def similarity(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind not in SIMILARITY:
        raise unknown_choice("block loss", kind, list(SIMILARITY))
    return SIMILARITY[kind]


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's loss: T^2 * KL(teacher || student) with both softened by T; ``teacher_probs`` are already
    softened (so an ensemble can average probabilities first)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def soft_label_ce(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * cross-entropy of the softened student against softened teacher probabilities (MEAL V2's form)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return -(teacher_probs * log_student).sum(1).mean() * temperature**2


SOFT_LABEL: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": kd_kl,
    "soft-ce": soft_label_ce,
}


def soft_targets(teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """The mean of the teachers' softened probabilities (one teacher: its own)."""
    return torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teacher_logits]).mean(0)


def log_soft_targets(teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """The log of :func:`soft_targets`, formed in log space (log-sum-exp over the teachers less log n), so a
    confident teacher's small probabilities keep their digits where ``1 - p`` of a float32 probability has none."""
    stacked = torch.stack([F.log_softmax(t.float() / temperature, dim=1) for t in teacher_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(teacher_logits))


def decoupled_kl(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's parts (Zhao et al., CVPR 2022), ``(TCKD, NCKD)``, each T^2 times a KL from the teacher's distribution,
    averaged over the batch. TCKD compares the binary [p(target), 1 - p(target)] distributions, NCKD the
    distributions over the other classes, each renormalised over them (the paper's masked softmax).

    ``teacher_log_probs`` are the teacher's log-probabilities at T (:func:`log_soft_targets`). Every quantity is
    taken in log space: ``1 - p(target)`` is the log-sum-exp of the other classes, and the other classes'
    distribution a log-softmax with the target masked out, so both stay exact in float32 however confident the
    teacher (its target probability rounds to 1 at a logit gap of about 17 T)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = teacher_log_probs.float()
    is_target = F.one_hot(target, log_student.shape[1]).bool()
    student_rest = torch.logsumexp(log_student.masked_fill(is_target, float("-inf")), dim=1)
    teacher_rest = torch.logsumexp(teacher.masked_fill(is_target, float("-inf")), dim=1)
    binary_teacher = torch.stack([teacher[is_target], teacher_rest], dim=1)
    binary_student = torch.stack([log_student[is_target], student_rest], dim=1)
    tckd = _kl_from_logs(binary_teacher, binary_student)
    # The other classes' log-distributions; the target's entry is set to 0 (a log-probability whose weight is 0),
    # never left at -inf, whose products would turn the gradient into NaN.
    off_teacher = (teacher - teacher_rest[:, None]).masked_fill(is_target, 0.0)
    off_student = (log_student - student_rest[:, None]).masked_fill(is_target, 0.0)
    nckd = _kl_from_logs(off_teacher, off_student, ignore=is_target)
    return tckd * temperature**2, nckd * temperature**2


def _kl_from_logs(
    log_target: torch.Tensor, log_input: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(target || input) per row from both sides' log-probabilities, averaged; entries in ``ignore`` count 0."""
    weight = log_target.exp()
    if ignore is not None:
        weight = weight.masked_fill(ignore, 0.0)
    return (weight * (log_target - log_input)).sum(1).mean()


# ----------------------------------------------------------------------------------------------- adversarial


def bce_real(scores: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))


def bce_fake(scores: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores))


def ls_real(scores: torch.Tensor) -> torch.Tensor:
    return ((scores - 1.0) ** 2).mean()


def ls_fake(scores: torch.Tensor) -> torch.Tensor:
    return (scores**2).mean()


ADVERSARIAL = {"bce": (bce_real, bce_fake), "ls": (ls_real, ls_fake)}


def discriminator_loss(kind: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Teacher features are real, student features fake: the mean of the two halves' losses."""
    real, fake = ADVERSARIAL[kind]
    return 0.5 * (real(real_scores) + fake(fake_scores))


def generator_loss(kind: str, fake_scores: torch.Tensor) -> torch.Tensor:
    """The student's adversarial loss: make the discriminator call its features real."""
    real, _ = ADVERSARIAL[kind]
    return real(fake_scores)


def discriminator_accuracy(real_scores: torch.Tensor, fake_scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The share of teacher features scored real and student features scored fake (a 0-d tensor on the scores'
    device: reading it is left to the caller, once per logging interval)."""
    threshold = 0.0 if kind == "bce" else 0.5
    hits = (real_scores > threshold).float().sum() + (fake_scores <= threshold).float().sum()
    return hits.detach() / (real_scores.numel() + fake_scores.numel())


class MLPDiscriminator(nn.Module):
    """Three linear layers halving the width (as MEAL's 1x1 discriminators) and one real/fake score."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        hidden = max(8, in_features // 2)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, max(4, hidden // 2)),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(max(4, hidden // 2), 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_flat(x)).squeeze(1)


class ReferenceDiscriminator(nn.Module):
    """MEAL's reference discriminator on a flat vector (a block's pooled map, or logits): three 1x1 convs halving
    the width, each followed by ReLU (the last too), to two outputs trained with BCE-with-logits against
    ``[1, 0]`` for the student and ``[0, 1]`` for the teacher. It returns ``(N, 2)`` scores
    ``(-out[:, 0], out[:, 1])``, so this module's ``bce_real``/``bce_fake`` on them are exactly those targets'
    BCE (``bce_real`` on ``-out[:, 0]`` is BCE(out[:, 0], 0))."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        half, quarter = max(1, in_features // 2), max(1, in_features // 4)
        self.net = nn.Sequential(
            nn.Conv2d(in_features, half, 1),
            nn.ReLU(),
            nn.Conv2d(half, quarter, 1),
            nn.ReLU(),
            nn.Conv2d(quarter, 2, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(_flat(x)[:, :, None, None]).flatten(1)
        return torch.stack([-out[:, 0], out[:, 1]], dim=1)


class ConvDiscriminator(nn.Module):
    """A small conv net on a ``(C, g, g)`` grid, as in feature-map-level adversarial distillation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(8, channels // 2)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class ConvMapDiscriminator(nn.Module):
    """AFD's discriminator on a full ``(C, H, W)`` feature map: a 3x3 conv, a strided 3x3 conv that halves the
    grid (so a 32 px map and an 8 px one cost alike per position), and a 1x1 conv to one score per position, whose
    mean is the map's real/fake score. No batch norm: real and fake maps arrive as separate batches, whose
    statistics would differ and let the discriminator tell them apart by the batch, not the map."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        hidden = hidden or max(8, channels // 2)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected maps of shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return self.net(x).mean((1, 2, 3))


# An MLP on a map grows with the square of its area; larger maps are average-pooled to this side first (28: a
# torchvision ResNet's layer2 at 224 px; every map at 16-32 px is smaller and unchanged).
MAP_DISCRIMINATOR_SIDE = 28


class PooledMapDiscriminator(nn.Module):
    """An :class:`MLPDiscriminator` on a ``(H, W)`` map (given flat, ``(N, H * W)``, or as ``(N, H, W)``)
    average-pooled to at most ``side`` x ``side``."""

    def __init__(self, height: int, width: int, side: int = MAP_DISCRIMINATOR_SIDE) -> None:
        super().__init__()
        self.shape = (height, width)
        self.size = (min(height, side), min(width, side))
        self.mlp = MLPDiscriminator(self.size[0] * self.size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x.reshape(x.shape[0], 1, *self.shape)
        return self.mlp(F.adaptive_avg_pool2d(maps, self.size))


def make_discriminator(shape: tuple[int, ...]) -> nn.Module:
    """A conv discriminator for grids larger than 1x1, an MLP otherwise (on a pooled copy of a map larger than
    :data:`MAP_DISCRIMINATOR_SIDE` on a side)."""
    if len(shape) == 3 and shape[1] > 1:
        return ConvDiscriminator(shape[0])
    if len(shape) == 2 and max(shape) > MAP_DISCRIMINATOR_SIDE:
        return PooledMapDiscriminator(*shape)
    return MLPDiscriminator(int(torch.tensor(shape).prod()))


class TransferLayer(nn.Module):
    """AFD's transfer layer: a peer's ``(C, H, W)`` feature map brought to a smaller peer's ``(c, h, w)``, so one
    discriminator can compare them: a 3x3 conv at the stride that divides the grid (average-pooled the rest of the
    way where it does not divide), batch norm and ReLU."""

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]) -> None:
        super().__init__()
        (channels, height, width), (out_channels, *size) = in_shape, out_shape
        stride = max(1, min(height // size[0], width // size[1]))
        self.size = tuple(size)
        self.conv = nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if tuple(y.shape[-2:]) != self.size:
            y = F.adaptive_avg_pool2d(y, self.size)
        return F.relu(self.norm(y))


class Adapter(nn.Module):
    """A learned 1x1 map from the student's pooled block channels to a teacher's (works for any grid)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
