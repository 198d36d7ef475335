"""AT: attention transfer (Zagoruyko and Komodakis, ICLR 2017) on the teachers' stored attention maps.

A block's attention map is the mean over channels of ``|A|^p`` (the paper's F_sum^p over C; p = 2 by default, the
paper's and mdistiller's), flattened and L2-normalised; the loss is the squared difference of the student's and the
teacher's normalised maps, averaged over the rows and positions and summed over the matched blocks (mdistiller's
reduction), at ``weight`` (the paper's beta, 1000, as mdistiller's CIFAR setting), beside cross-entropy (no soft
labels). The store holds the teachers' maps (``extract --for at``: the ``attention`` kind, at the p it records);
the student's are computed from its block outputs the same way, at the same p. Maps of different sizes are
average-pooled to the smaller one's grid before normalising (mdistiller pools the features before taking their
attention; the teachers' features are not stored)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.distill.methods.base import PRESET_LOGITS, Batch, Method, MethodOutput, StoreNeeds
from meal_cache.errors import UserError
from meal_cache.nets.taps import BlockTap
from meal_cache.nets.teachers import channel_attention
from meal_cache.store.keys import feature_key
from meal_cache.store.schema import DEFAULT_ATTENTION_P

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class ATOptions:
    blocks: int = field(default=3, metadata={"low": 1})  # the last this many blocks of each network, from the end
    weight: float = 1000.0  # the paper's beta
    p: float | None = None  # the power of |A| in the attention maps; None: the store's (it must equal the store's)


def attention(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` attention maps average-pooled to ``size``, flattened and L2-normalised per row."""
    pooled = F.adaptive_avg_pool2d(maps.float().unsqueeze(1), size).flatten(1)
    return F.normalize(pooled, dim=1)


def attention_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """The mean over rows and positions of the squared difference of the two normalised attention maps, at the
    smaller map's grid."""
    size = (min(student_maps.shape[-2], teacher_maps.shape[-2]), min(student_maps.shape[-1], teacher_maps.shape[-1]))
    return (attention(student_maps, size) - attention(teacher_maps, size)).pow(2).mean()


class AT(Method):
    name: ClassVar[str] = "at"
    help: ClassVar[str] = ("AT: attention transfer on the teachers' stored attention maps (the channel mean of "
                           "|A|^p) of the last blocks (options blocks, weight, p), beside cross-entropy")  # fmt: skip
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(
        ("attention",),
        "3",
        "logits (16 sampled classes above 24 classes) and the attention maps (channel mean of |A|^p) of the last 3 "
        "blocks, 8-bit",
        quantize=8,
        logits=PRESET_LOGITS,
    )
    settings: ClassVar[dict] = {"hard_weight": 1.0, "soft_weight": 0.0}
    Options: ClassVar[type] = ATOptions

    @classmethod
    def check_options(cls, options: ATOptions) -> None:
        p = options.p
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0):
            raise UserError(f"--method-option p of --method at is the power of |A| in the attention maps, a number "
                            f"above 0 (leave it out for the store's), got {p!r}")  # fmt: skip

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        return super().has_a_loss(config) or cls.options_of(config).weight > 0

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        self.p = _stored_p(store, self.options.p)
        count = min(self.options.blocks, len(student.block_names))
        self.pairs = {t: [(student.block_names[-1 - r], store.blocks(t)[-1 - r])
                          for r in range(min(count, len(store.blocks(t))))] for t in self.teachers}  # fmt: skip

    def needed_keys(self) -> list[str]:
        keys = {feature_key(t, "attention", b.key) for t, pairs in self.pairs.items() for _, b in pairs}
        return super().needed_keys() + sorted(keys)

    def forward(self, batch: Batch) -> MethodOutput:
        config = self.config
        blocks = sorted({s for pairs in self.pairs.values() for s, _ in pairs})
        with BlockTap(self.student, blocks) as tap:
            logits = batch.student(batch.images).float()
        out = MethodOutput(logits)
        if self.options.weight:
            # The student's attention maps once, whatever the teachers; summed over the blocks, and over the selected
            # teachers as every method's per-teacher terms are (averaged under mean).
            maps = {block: channel_attention(tap.outputs[block], self.p) for block in blocks}
            total = sum(attention_loss(maps[s], batch.targets[feature_key(t, "attention", b.key)])
                        for t in batch.selected for s, b in self.pairs[t])  # fmt: skip
            share = self.teacher_share(batch.selected)
            out.losses["attention"] = self.options.weight * share * total
        soft_sets = self.teacher_soft_targets(batch) if config.soft_weight else []
        out.losses.update(self.label_losses(logits, soft_sets, batch.labels))
        return out


def _stored_p(store: TeacherStore, asked: float | None) -> float:
    """The p of the store's attention maps, which the student's must share; a store without them, a dense store
    and another p are refused."""
    features = store.layout.features
    if "attention" not in features and store.dense:
        raise UserError("--method at reads the teachers' attention maps (channel-mean maps of |A|^p) of each view, "
                        "which a dense store cannot derive (it keeps logits and pooled blocks for any crop): distill "
                        "with a method that reads those (kd, meal, meal-v2, fitnet, ...), or extract a store of views "
                        "with --for at")  # fmt: skip
    if "attention" not in features and "maps" in features:
        raise UserError("--method at compares attention maps, the channel mean of |A|^p; this store holds the signed "
                        "channel-mean maps (maps) and no attention maps, and the two differ wherever a block's output "
                        "is signed: extract with --for at again (or --features attention)")  # fmt: skip
    if "attention" not in features:
        raise UserError(f"--method at reads the teachers' attention maps, which this store lacks (it holds "
                        f"{', '.join(features) or 'logits only'}): extract with --for at (or --features "
                        "attention)")  # fmt: skip
    recorded = store.layout.attention_p
    stored = DEFAULT_ATTENTION_P if recorded is None else float(recorded)
    if asked is not None and float(asked) != stored:
        raise UserError(f"--method-option p={asked:g} of --method at differs from the p of the store's attention "
                        f"maps (mean |A|^{stored:g}, extract --attention-p {stored:g}): leave p out to use the "
                        f"store's, or extract with --for at --attention-p {asked:g}")  # fmt: skip
    return stored
