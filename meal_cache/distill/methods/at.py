"""AT: attention transfer (Zagoruyko and Komodakis, ICLR 2017) on the teachers' stored channel-mean maps.

A block's attention map is its activation summed over channels, flattened and L2-normalised; the loss is the mean
squared difference of the student's and the teacher's, summed over the matched blocks, at ``weight`` (the paper's
beta, 1000, as mdistiller's CIFAR setting), beside cross-entropy (no soft labels). The store keeps each block's
mean over channels of the activation, which is the paper's F_sum (p = 1) on non-negative (post-ReLU) block
outputs; the paper's default p = 2 (the mean of squares) is not what a store holds, so this is AT's p = 1 variant.
Maps of different sizes are average-pooled to the smaller one's grid before normalising."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.distill.methods.base import DistillerOutput, Method, StoreNeeds
from meal_cache.store_keys import feature_key
from meal_cache.taps import BlockTap

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store import TeacherStore


@dataclass(frozen=True)
class ATOptions:
    blocks: int = field(default=3, metadata={"low": 1})  # the last this many blocks of each network, from the end
    weight: float = 1000.0  # the paper's beta


def attention(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` channel-mean maps average-pooled to ``size``, flattened and L2-normalised per row."""
    pooled = F.adaptive_avg_pool2d(maps.float().unsqueeze(1), size).flatten(1)
    return F.normalize(pooled, dim=1)


def attention_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of the two attention maps at the smaller map's grid."""
    size = (min(student_maps.shape[-2], teacher_maps.shape[-2]), min(student_maps.shape[-1], teacher_maps.shape[-1]))
    return (attention(student_maps, size) - attention(teacher_maps, size)).pow(2).mean()


class AT(Method):
    name: ClassVar[str] = "at"
    help: ClassVar[str] = ("AT: attention transfer on the teachers' stored channel-mean maps of the last blocks "
                           "(options blocks, weight), beside cross-entropy")  # fmt: skip
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(("maps",), "3", "logits and the channel-mean maps of the last 3 "
                                                   "blocks, 8-bit", quantize=8)  # fmt: skip
    settings: ClassVar[dict] = {"hard_weight": 1.0, "soft_weight": 0.0}
    Options: ClassVar[type] = ATOptions

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        return super().has_a_loss(config) or cls.options_of(config).weight > 0

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        self.require_stored(store, "maps")
        count = min(self.options.blocks, len(student.block_names))
        self.pairs = {t: [(student.block_names[-1 - r], store.blocks(t)[-1 - r])
                          for r in range(min(count, len(store.blocks(t))))] for t in self.teachers}  # fmt: skip

    def needed_keys(self) -> list[str]:
        keys = {feature_key(t, "maps", b.key) for t, pairs in self.pairs.items() for _, b in pairs}
        return super().needed_keys() + sorted(keys)

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        labels: torch.Tensor,
        selected: list[str],
        run_student: nn.Module | None = None,
    ) -> DistillerOutput:
        config = self.config
        blocks = sorted({s for pairs in self.pairs.values() for s, _ in pairs})
        with BlockTap(self.student, blocks) as tap:
            logits = (run_student or self.student)(images).float()
        out = DistillerOutput(logits, {}, [], {})
        if self.options.weight:
            # The student's channel-mean maps once, whatever the teachers; summed over the blocks, averaged over the
            # selected teachers.
            maps = {block: tap.outputs[block].float().mean(1) for block in blocks}
            total = sum(attention_loss(maps[s], targets[feature_key(t, "maps", b.key)])
                        for t in selected for s, b in self.pairs[t])  # fmt: skip
            out.losses["attention"] = self.options.weight * total / len(selected)
        soft_sets = self.teacher_soft_targets(targets, selected) if config.soft_weight else []
        out.losses.update(self.label_losses(logits, soft_sets, labels))
        return out
