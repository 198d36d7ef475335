"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), from the cached logits.

Hinton's KL splits into a target part (TCKD: the binary "target class or not" distributions) and a non-target part
(NCKD: the distributions over the other classes, each renormalised), weighted apart, ``alpha * TCKD + beta * NCKD``,
both at temperature T and times T^2, ramped in linearly over the first ``warmup`` epochs, beside cross-entropy on
the hard labels. The paper's CIFAR setting is the default: alpha 1, beta 8, T 4, 20 warm-up epochs, CE weight 1.

The parts are ``--soft-loss dkd`` (:func:`meal_cache.losses.decoupled_kl`), which the MEAL family takes too: both
are formed from the teachers' logits in log space (the ensemble mean at ``--teacher-selection mean`` as a
log-sum-exp over the teachers), so the non-target distribution is the paper's masked softmax, exact in float32 for
any confidence. Mixed rows (Mixup/CutMix views) take their larger share's class as the target.
"""

from __future__ import annotations

from typing import ClassVar

from meal_cache.distill.methods.base import Batch, DecoupledOptions, Method, MethodOutput, StoreNeeds
from meal_cache.losses import decoupled_kl

__all__ = ["DKD", "DKDOptions", "decoupled_kl"]

DKDOptions = DecoupledOptions


class DKD(Method):
    name: ClassVar[str] = "dkd"
    help: ClassVar[str] = ("DKD (Zhao et al., CVPR 2022): target and non-target KL weighted apart (options alpha, "
                           "beta, warmup) beside cross-entropy, from the cached logits")  # fmt: skip
    # Every logit: NCKD is the tail's shape, which top-k flattens. On digit-pairs' 100 classes at T = 4 the top-20
    # rebuild still moves NCKD's gradient by 16-26 % and top-50 by 4-6 %, where top-50 already costs as many bytes as
    # every float16 logit (docs/design.md, "`--for dkd` keeps every logit").
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(help="every logit (NCKD reads the tail top-k flattens)")
    settings: ClassVar[dict] = {"hard_weight": 1.0}
    soft_loss: ClassVar[str] = "dkd"
    soft_losses: ClassVar[tuple[str, ...]] = ("dkd",)
    Options: ClassVar[type] = DecoupledOptions

    @classmethod
    def has_a_loss(cls, config) -> bool:
        options = cls.options_of(config)
        return config.hard_weight > 0 or (config.soft_weight > 0 and options.alpha + options.beta > 0)

    def forward(self, batch: Batch) -> MethodOutput:
        logits = batch.student(batch.images).float()
        # DKD's parts read the logits themselves (in log space), not the softened probabilities.
        losses = self.label_losses(logits, [], batch.labels, teacher_logits=self.teacher_logits(batch))
        return MethodOutput(logits, losses)
