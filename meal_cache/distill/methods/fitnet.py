"""FitNet (Romero et al., ICLR 2015), from the cache: a hint loss, the mean squared difference between a learned
1x1 adapter of the student's block and the teacher's stored block (pooled channels at the store's grid), beside
cross-entropy on the hard labels; trained jointly, as mdistiller does, not in the paper's two stages. The hint is
the blocks ``block`` places from the end of each network (0: the last), the middle of a three-stage CIFAR net by
default; mdistiller's CIFAR weights are the defaults (hint 100, CE 1, no soft labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import nn

from meal_cache import losses
from meal_cache.distill.methods.base import PRESET_LOGITS, Batch, Method, MethodOutput, StoreNeeds
from meal_cache.errors import UserError
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.store.keys import feature_key

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class FitNetOptions:
    block: int = 1  # the hint block, counted from the end of each network (0: the last)
    weight: float = 100.0  # the hint loss's weight


class FitNet(Method):
    name: ClassVar[str] = "fitnet"
    help: ClassVar[str] = ("FitNet: a hint loss between a learned adapter of a student block and the teacher's "
                           "stored pooled block (options block, weight), beside cross-entropy")  # fmt: skip
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(("blocks",), "2", "logits (16 sampled classes above 24 classes) "
                                                   "and the pooled channels of the last 2 blocks, 8-bit", quantize=8,
                                                   logits=PRESET_LOGITS)  # fmt: skip
    settings: ClassVar[dict] = {"hard_weight": 1.0, "soft_weight": 0.0}
    Options: ClassVar[type] = FitNetOptions

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        return super().has_a_loss(config) or cls.options_of(config).weight > 0

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        self.require_stored(store, "blocks")
        depth = self.options.block + 1
        if len(student.block_names) < depth:
            raise UserError(f"--method-option block {self.options.block}: the student has "
                            f"{len(student.block_names)} blocks")  # fmt: skip
        self.student_block = student.block_names[-depth]
        channels = block_shapes(student, image_size)[self.student_block][0]
        self.hints = {}
        for teacher in self.teachers:
            blocks = store.blocks(teacher)
            if len(blocks) < depth:
                raise UserError(f"--method-option block {self.options.block}: the store holds {len(blocks)} blocks "
                                f"of teacher '{teacher}' (extract with --blocks {depth} or more)")  # fmt: skip
            self.hints[teacher] = blocks[-depth]
            self.adapters[teacher.replace(".", "_")] = losses.Adapter(channels, blocks[-depth].channels)

    def needed_keys(self) -> list[str]:
        return super().needed_keys() + [feature_key(t, "blocks", b.key) for t, b in self.hints.items()]

    def forward(self, batch: Batch) -> MethodOutput:
        config = self.config
        with BlockTap(self.student, [self.student_block]) as tap:
            logits = batch.student(batch.images).float()
        out = MethodOutput(logits)
        # One hint per selected teacher: averaged over them under `mean`, summed under `all` (every teacher's
        # terms at weight 1, as every method's), the drawn one's under `random`.
        share = self.teacher_share(batch.selected)
        hint = 0.0
        for teacher in batch.selected:
            stored = batch.targets[feature_key(teacher, "blocks", self.hints[teacher].key)].float()
            pooled = F.adaptive_avg_pool2d(tap.outputs[self.student_block].float(), stored.shape[-1])
            hint = hint + F.mse_loss(self.adapters[teacher.replace(".", "_")](pooled).float(), stored)
        if self.options.weight:
            out.losses["hint"] = self.options.weight * share * hint
        soft_sets = self.teacher_soft_targets(batch) if config.soft_weight else []
        out.losses.update(self.label_losses(logits, soft_sets, batch.labels))
        return out
