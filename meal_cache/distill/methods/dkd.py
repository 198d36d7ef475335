"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), from the cached logits.

Hinton's KL splits into a target part (TCKD: the binary "target class or not" distributions) and a non-target part
(NCKD: the distributions over the other classes, each renormalised), weighted apart, ``alpha * TCKD + beta * NCKD``,
both at temperature T and times T^2, ramped in linearly over the first ``warmup`` epochs, beside cross-entropy on
the hard labels. The paper's CIFAR setting is the default: alpha 1, beta 8, T 4, 20 warm-up epochs, CE weight 1.

Teachers enter as probabilities (the ensemble mean at ``--teacher-selection mean``), so the teacher's non-target
distribution is its probabilities off the target renormalised, which is the paper's masked softmax.
Mixed rows (Mixup/CutMix views) take their larger share's class as the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.distill.methods.base import DistillerOutput, Method


@dataclass(frozen=True)
class DKDOptions:
    alpha: float = 1.0  # weight of the target-class part (TCKD)
    beta: float = 8.0  # weight of the non-target part (NCKD)
    warmup: float = 20.0  # epochs over which both parts ramp in linearly (0: at full weight from the start)


def decoupled_kl(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each T^2 times a KL from the teacher's distribution, averaged over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    is_target = F.one_hot(target, log_student.shape[1]).bool()
    teacher = teacher_probs.float()
    # Binary distributions [p(target), 1 - p(target)]; the student's second part as a log-sum-exp, stably.
    log_student_target = log_student[is_target]
    log_student_rest = torch.logsumexp(log_student.masked_fill(is_target, float("-inf")), dim=1)
    teacher_target = teacher[is_target]
    teacher_rest = (1.0 - teacher_target).clamp_min(0.0)
    binary_teacher = torch.stack([teacher_target, teacher_rest], dim=1)
    binary_log_student = torch.stack([log_student_target, log_student_rest], dim=1)
    tckd = _kl(binary_teacher, binary_log_student)
    # The other classes, each side renormalised over them.
    off_teacher = teacher.masked_fill(is_target, 0.0) / teacher_rest.clamp_min(1e-12).unsqueeze(1)
    off_log_student = (log_student - log_student_rest.unsqueeze(1)).masked_fill(is_target, 0.0)
    nckd = _kl(off_teacher, off_log_student)
    return tckd * temperature**2, nckd * temperature**2


def _kl(target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """KL(target || input) per row, averaged; zero-probability targets contribute nothing."""
    return (torch.special.xlogy(target, target) - target * log_input).sum(1).mean()


class DKD(Method):
    name: ClassVar[str] = "dkd"
    help: ClassVar[str] = ("DKD (Zhao et al., CVPR 2022): target and non-target KL weighted apart (options alpha, "
                           "beta, warmup) beside cross-entropy, from the cached logits")  # fmt: skip
    settings: ClassVar[dict] = {"hard_weight": 1.0}
    Options: ClassVar[type] = DKDOptions

    @classmethod
    def has_a_loss(cls, config) -> bool:
        options = cls.options_of(config)
        return config.hard_weight > 0 or (config.soft_weight > 0 and options.alpha + options.beta > 0)

    def ramp(self) -> float:
        """The parts' weight this epoch: (epoch + 1) / warmup, at most 1."""
        warmup = self.options.warmup
        return 1.0 if warmup <= 0 else min((self.epoch + 1) / warmup, 1.0)

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        labels: torch.Tensor,
        selected: list[str],
        run_student: nn.Module | None = None,
    ) -> DistillerOutput:
        config, options = self.config, self.options
        logits = (run_student or self.student)(images).float()
        out = DistillerOutput(logits, {}, [], {})
        target = labels if labels.dim() == 1 else labels.argmax(1)
        if config.soft_weight:
            weight = config.soft_weight * self.ramp()
            parts = [decoupled_kl(logits, probs, target, config.temperature)
                     for probs in self.teacher_soft_targets(targets, selected)]  # fmt: skip
            out.losses["soft/tckd"] = weight * options.alpha * sum(tckd for tckd, _ in parts)
            out.losses["soft/nckd"] = weight * options.beta * sum(nckd for _, nckd in parts)
        if config.hard_weight:
            out.losses["hard"] = config.hard_weight * F.cross_entropy(logits, labels)
        return out
