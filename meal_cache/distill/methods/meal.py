"""MEAL (Shen et al., AAAI 2019) and its family on the cache: block similarity through adapters (or channel-mean
maps), one discriminator per block and one on the output, soft labels from one teacher drawn each step; and the two
members that keep only part of it, Hinton's KD (ensemble soft labels) and MEAL V2 (soft labels and the output
discriminator)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache import losses
from meal_cache.distill.methods.adversarial import (
    DISC_FORMS,
    DISCRIMINATORS,
    AdversarialInput,
    AdversarialMethod,
    AdversarialOutput,
    GameOptions,
)
from meal_cache.distill.methods.base import (
    PRESET_LOGITS,
    REPRESENTATIONS,
    SOFT_TERMS,
    Batch,
    DecoupledOptions,
    StoreNeeds,
    soft_target_sets,
)
from meal_cache.errors import UserError, unknown_choice
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.store.keys import feature_key, logits_key
from meal_cache.store.schema import BlockSpec

if TYPE_CHECKING:
    from meal_cache.distill.config import DistillConfig
    from meal_cache.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class BlockPair:
    """A student block matched to a teacher block, counted from the end (rank 0 = the last blocks)."""

    teacher: str
    rank: int
    student_block: str
    teacher_block: BlockSpec
    weight: float

    @property
    def key(self) -> str:
        # ModuleDict keys may not contain dots.
        return f"{self.teacher}__{self.rank}".replace(".", "_")


def match_blocks(
    student_blocks: tuple[str, ...],
    teacher_blocks: dict[str, list[BlockSpec]],
    weights: list[float],
    limit: int | None,
) -> list[BlockPair]:
    """Pair blocks from the end, so any two architectures match: the last with the last, and so on,
    for as many blocks as both have and ``weights`` (and ``limit``) allow."""
    pairs = []
    for teacher, blocks in teacher_blocks.items():
        count = min(len(student_blocks), len(blocks), len(weights), limit if limit is not None else len(weights))
        for rank in range(count):
            pairs.append(BlockPair(teacher, rank, student_blocks[-1 - rank], blocks[-1 - rank], float(weights[rank])))
    return pairs


def refuse_missing_representation(config: DistillConfig, representation: str, store: TeacherStore) -> None:
    """One error line naming the extract flag when the store lacks the block ``representation`` the run reads."""
    stored = store.layout.features
    if representation in stored:
        return
    if store.dense:
        raise UserError(f"--representation {representation} reads channel-mean maps of each view, which a "
                        "dense store cannot derive (it keeps logits and pooled blocks for any crop): distill with "
                        "--representation blocks, or extract a store of views")  # fmt: skip
    other = next((kind for kind in REPRESENTATIONS if kind in stored), None)
    instead = f", or distill with --representation {other}" if other else ""
    if config.preset is not None:
        instead += f" (--preset {config.preset} reads {representation})"
    preset = (store.attrs.get("settings") or {}).get("preset")
    if preset is not None:
        wanted = "meal" if representation == "blocks" else "all"
        raise UserError(f"the store holds no block {representation}: it was extracted with --for "
                        f"{preset}, which stores {', '.join(stored) or 'logits only'}; extract with --for "
                        f"{wanted} for --method {config.method}{instead}")  # fmt: skip
    raise UserError(f"the store holds no block {representation} (it was extracted with --features "
                    f"{','.join(stored)}): extract with --features {representation} "
                    f"(or blocks,maps){instead}")  # fmt: skip


def parse_discriminators(value: object) -> list[str]:
    """``--discriminators``' value as names: a list of them, a comma-separated string, or ``none`` (no
    discriminators); anything else is one clear error."""
    if isinstance(value, str):
        value = [] if value.strip() == "none" else [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UserError(f"--discriminators takes {', '.join(DISCRIMINATORS)} or none, got {value!r}")
    names = [] if list(value) == ["none"] else list(value)
    unknown = [v for v in names if v not in DISCRIMINATORS]
    if unknown:
        raise UserError(f"--discriminators takes {', '.join(DISCRIMINATORS)} or none, got {','.join(unknown)}")
    return names


# DKD's decoupled KL's options (the family's soft labels may be --soft-loss dkd's).
DECOUPLED_OPTIONS = tuple(f.name for f in dataclasses.fields(DecoupledOptions))


@dataclass(frozen=True)
class FamilyOptions(GameOptions, DecoupledOptions):
    """The MEAL family's options: DKD's weights (alpha, beta, warmup; read with ``--soft-loss dkd`` only), the
    adversarial game's (:class:`GameOptions`), and ``discriminators``, which train (of ``blocks`` and ``output``;
    None: the member's own), and ``disc_form``, one of :data:`DISC_FORMS`. Each of the game's and these two is also
    a flag of its own (``--disc-lr``)."""

    discriminators: list[str] | None = None
    disc_form: str = "meal-cache"


@dataclass(frozen=True)
class BlockOptions(FamilyOptions):
    """:class:`FamilyOptions` and the block terms' knobs (meal's): ``representation``, blocks (pooled channels
    through learned adapters) or maps (channel-mean maps; None: blocks, or maps where the store holds only maps);
    ``block_loss``, the similarity per block (None: soft-ce for maps, l2 for blocks); ``block_weights``, the matched
    blocks' weights from the last backwards (their count caps the blocks matched); ``match_blocks``, at most this
    many blocks (None: as many as the weights)."""

    representation: str | None = None
    block_loss: str | None = None
    block_weights: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.01])
    match_blocks: int | None = None


def block_options(options: Any) -> dict[str, Any]:
    """The block terms' knobs of ``options``, by name (what a meal run records)."""
    inherited = {f.name for f in dataclasses.fields(FamilyOptions)}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(BlockOptions) if f.name not in inherited}


def _check_family(options: FamilyOptions) -> None:
    if options.disc_form not in DISC_FORMS:
        raise unknown_choice("discriminator form", options.disc_form, DISC_FORMS)
    if options.discriminators is not None:
        parse_discriminators(options.discriminators)


def _check_blocks(options: BlockOptions) -> None:
    if options.representation is not None and options.representation not in REPRESENTATIONS:
        raise unknown_choice("representation", options.representation, REPRESENTATIONS)
    if options.block_loss is not None:
        losses.similarity(options.block_loss)
    weights = options.block_weights
    if not isinstance(weights, list | tuple) or not all(
        isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
    ):
        raise UserError(f"--block-weights must be numbers >= 0, got {weights}")
    blocks = options.match_blocks
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
        raise UserError(f"--match-blocks must be at least 0, got {blocks}")


class MealFamily(AdversarialMethod):
    """The MEAL family's student plus the adapters and discriminators it trains beside it; which terms a member
    has is its :attr:`block_terms` and :attr:`own_discriminators`. Its soft labels may be DKD's decoupled KL
    (``--soft-loss dkd``), whose weights are the family's options (alpha, beta, warmup, as DKD's)."""

    soft_losses: ClassVar[tuple[str, ...]] = tuple(SOFT_TERMS)
    Options: ClassVar[type] = FamilyOptions

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        if not self.name:  # the family's terms are its members' (meal, kd, meal-v2), so build one of them
            raise TypeError(f"build the method of a config with method_class(config.method), here "
                            f"method_class('{config.method}'), not the MEAL family's base class")  # fmt: skip
        super().__init__(student, config, store, image_size)
        if getattr(config, "options", None) is None:  # a config not resolved: the store's kinds choose the maps
            self.options = self.resolve_options(config, store.layout.features)
        options = self.options
        self.representation = options.representation if self.block_terms else None
        teacher_blocks = {t: store.blocks(t) for t in self.teachers} if self.block_terms else {}
        self.pairs = (match_blocks(tuple(student.block_names), teacher_blocks, options.block_weights,
                                   options.match_blocks) if self.block_terms else [])  # fmt: skip
        if self.pairs:
            refuse_missing_representation(config, self.representation, store)
        self.similarity = losses.similarity(options.block_loss) if self.block_terms else None
        self.reference_form = options.disc_form == "reference"
        student_shapes = block_shapes(student, image_size) if self.pairs else {}
        self.target_shapes: dict[str, tuple[int, ...]] = {}
        for pair in self.pairs:
            channels, height, width = student_shapes[pair.student_block]
            tb = pair.teacher_block
            if self.representation == "maps" and self.reference_form:
                # One discriminator per layer reads every teacher's map: all are pooled to one size per rank.
                shape = self._shared_map_shape(pair.rank, height, width)
            elif self.representation == "maps":
                shape = (min(height, tb.height), min(width, tb.width))
            else:
                self.adapters[pair.key] = losses.Adapter(channels, tb.channels)
                shape = (tb.channels, tb.grid, tb.grid)
            self.target_shapes[pair.key] = shape
            if "blocks" in options.discriminators:
                self._add_block_discriminator(pair, shape)
        if "output" in options.discriminators:
            classes = store.attrs["dataset"]["num_classes"]
            layout = store.layout
            compact = layout.logits is not None and not layout.logits_encoding.keeps_every_logit(layout.logits_k,
                                                                                                 classes)  # fmt: skip
            if self.reference_form and options.adv_weight > 0 and compact:
                # Raw logits of a compact store share one value in the tail: a teacher is told from any student by it.
                raise UserError(f"--disc-form reference's output discriminator reads raw logits, and '{config.store}' "
                                f"keeps {layout.logits} of {classes} classes (the rest share one value, which tells a "
                                "teacher from any student): extract with --logits all, or pass --discriminators "
                                "blocks")  # fmt: skip
            form = losses.ReferenceDiscriminator if self.reference_form else losses.MLPDiscriminator
            self.discriminators["logits"] = form(classes)

    def disc_key(self, pair: BlockPair) -> str:
        """The discriminator of ``pair``'s block: its own, or with the reference's form the one of its layer."""
        return f"rank{pair.rank}" if self.reference_form else pair.key

    def _shared_map_shape(self, rank: int, height: int, width: int) -> tuple[int, int]:
        blocks = [p.teacher_block for p in self.pairs if p.rank == rank]
        return (min([height, *(b.height for b in blocks)]), min([width, *(b.width for b in blocks)]))

    def _add_block_discriminator(self, pair: BlockPair, shape: tuple[int, ...]) -> None:
        key = self.disc_key(pair)
        if not self.reference_form:
            self.discriminators[key] = losses.make_discriminator(shape)
            return
        size = int(torch.tensor(shape).prod())
        if key in self.discriminators and self.discriminators[key].net[0].in_channels != size:
            raise UserError(f"--disc-form reference shares one discriminator per layer among the teachers, but "
                            f"their blocks {pair.rank} from the end differ in size (pooled channels: {shape} for "
                            f"'{pair.teacher}'); use --representation maps, whose maps are pooled to one "
                            "size")  # fmt: skip
        if key not in self.discriminators:
            self.discriminators[key] = losses.ReferenceDiscriminator(size)

    @classmethod
    def check_options(cls, options: FamilyOptions) -> None:
        super().check_options(options)  # the game's knobs
        _check_family(options)
        if isinstance(options, BlockOptions):
            _check_blocks(options)

    @classmethod
    def check(cls, config: DistillConfig) -> DistillConfig:
        """The decoupled KL's options weigh only ``--soft-loss dkd``: given with another soft loss they would be
        recorded and do nothing."""
        cls.options_of(config)  # an unknown option's name first
        decoupled = sorted(set(config.method_options or {}) & set(DECOUPLED_OPTIONS))
        if decoupled and config.soft_loss != "dkd":
            raise UserError(f"--method {config.method} has no option {', '.join(decoupled)} with --soft-loss "
                            f"{config.soft_loss}: alpha, beta and warmup weigh --soft-loss dkd's parts (add "
                            "--soft-loss dkd, or leave the option out)")  # fmt: skip
        return config

    @classmethod
    def resolve_options(cls, config: DistillConfig, stored: tuple[str, ...] | None) -> FamilyOptions:
        """The member's options with the discriminators (``--discriminators``, else the member's own) and, for
        meal, the representation (blocks, or maps where ``stored`` holds maps and no blocks) and its block loss
        filled in."""
        options = cls.options_of(config)
        if options.discriminators is None:
            chosen = [d for d in DISCRIMINATORS if d in cls.own_discriminators]
        else:
            chosen = parse_discriminators(options.discriminators)
            if "blocks" in chosen and not cls.block_terms:
                raise UserError(f"--discriminators blocks needs block terms, which --method {config.method} has not "
                                "(use --method meal, or --discriminators output)")  # fmt: skip
        options = dataclasses.replace(options, discriminators=[d for d in DISCRIMINATORS if d in chosen])
        if not isinstance(options, BlockOptions):
            return options
        representation = options.representation
        if representation is None:
            only_maps = stored is not None and "maps" in stored and "blocks" not in stored
            representation = "maps" if only_maps else "blocks"
        block_loss = options.block_loss or ("soft-ce" if representation == "maps" else "l2")
        return dataclasses.replace(options, representation=representation, block_loss=block_loss,
                                   block_weights=[float(w) for w in options.block_weights])  # fmt: skip

    @classmethod
    def trains_discriminators(cls, options: FamilyOptions) -> bool:
        return bool(options.discriminators)

    @classmethod
    def recorded_options(cls, config: DistillConfig) -> dict[str, Any]:
        """The options given, the game's knobs where discriminators train, and meal's block knobs, all resolved;
        ``disc_form`` and ``discriminators`` with the game's."""
        options = cls.options_of(config)
        recorded = super().recorded_options(config)
        if cls.trains_discriminators(options):
            recorded |= {"discriminators": list(options.discriminators), "disc_form": options.disc_form}
        if isinstance(options, BlockOptions):
            recorded |= block_options(options)
        return recorded

    @classmethod
    def has_a_loss(cls, config: DistillConfig) -> bool:
        options = cls.options_of(config)
        if not isinstance(options, BlockOptions):
            return super().has_a_loss(config)
        blocks = options.match_blocks != 0 and any(w > 0 for w in options.block_weights)
        block_adversarial = "blocks" in (options.discriminators or ()) and blocks and options.adv_weight > 0
        return super().has_a_loss(config) or blocks or block_adversarial

    def needed_keys(self) -> list[str]:
        """The store arrays training reads: the logits and the matched blocks' representation."""
        kind = self.representation
        return super().needed_keys() + [feature_key(p.teacher, kind, p.teacher_block.key) for p in self.pairs]

    def _represent(self, pair: BlockPair, student_out: torch.Tensor, teacher_value: torch.Tensor):
        """Student and teacher block representations of equal shape, in float32 (under autocast the adapter
        computes in bf16/fp16; the discriminators' step, outside autocast, takes float32)."""
        shape = self.target_shapes[pair.key]
        if self.representation == "maps":
            student_rep = F.adaptive_avg_pool2d(student_out.float().mean(1, keepdim=True), shape).flatten(1)
            teacher_rep = F.adaptive_avg_pool2d(teacher_value.float().unsqueeze(1), shape).flatten(1)
            return student_rep, teacher_rep
        pooled = F.adaptive_avg_pool2d(student_out.float(), shape[-1])
        return self.adapters[pair.key](pooled).float(), teacher_value.float()

    def forward(self, batch: Batch) -> AdversarialOutput:
        """Weighting over teachers: ``mean`` has one soft-label term and one output-adversarial term (on the
        ensemble) and averages the block terms over the teachers; ``all`` sums every teacher's terms; ``random``
        has the one selected teacher's."""
        config = self.config
        with BlockTap(self.student, sorted({p.student_block for p in self.pairs})) as tap:
            logits = batch.student(batch.images)
        logits = logits.float()
        out = AdversarialOutput(logits)
        teacher_logits = self.teacher_logits(batch)
        soft_sets = soft_target_sets(config, teacher_logits)
        out.losses.update(self.label_losses(logits, soft_sets, batch.labels, teacher_logits=teacher_logits))
        self._block_terms(out, tap.outputs, batch.targets, batch.selected)
        self._teacher_agreement(out, batch.targets, teacher_logits)
        if "logits" in self.discriminators and self.reference_form:  # raw logits, each selected teacher's
            weight = self.teacher_share(batch.selected)
            out.adversarial.extend(AdversarialInput("logits", t, logits, weight) for t in teacher_logits)
        elif "logits" in self.discriminators:
            student_probs = F.softmax(logits / config.temperature, dim=1)
            for probs in soft_sets:
                out.adversarial.append(AdversarialInput("logits", probs, student_probs, 1.0))
        return out

    def _block_terms(self, out: AdversarialOutput, student_blocks: dict[str, torch.Tensor],
                     targets: dict[str, torch.Tensor], selected: list[str]) -> None:  # fmt: skip
        """Each matched block's similarity loss and discriminator input, for the selected teachers."""
        block_weight = self.teacher_share(selected)
        for pair in self.pairs:
            if pair.teacher not in selected:
                continue
            stored = targets[feature_key(pair.teacher, self.representation, pair.teacher_block.key)]
            student_rep, teacher_rep = self._represent(pair, student_blocks[pair.student_block], stored)
            similarity = self.similarity(student_rep, teacher_rep)
            out.losses[f"sim/{pair.key}"] = pair.weight * block_weight * similarity
            if self.options.block_loss == "soft-ce":
                # soft-ce includes the teacher map's entropy, which no student can lower: KL shows the movement.
                out.stats[f"sim_kl/{pair.key}"] = similarity.detach() - losses.soft_entropy(teacher_rep)
            if self.disc_key(pair) in self.discriminators:
                out.adversarial.append(AdversarialInput(self.disc_key(pair), teacher_rep, student_rep, block_weight))

    def _teacher_agreement(self, out: AdversarialOutput, targets: dict[str, torch.Tensor],
                           teacher_logits: list[torch.Tensor]) -> None:  # fmt: skip
        """How often the teacher drawn this step agrees with the whole ensemble (mean and all learn from the
        ensemble itself; the online reference runs only the drawn teacher, so it cannot say)."""
        everyone = [logits_key(t) for t in self.teachers]
        if self.config.teacher_selection == "random" and len(everyone) > 1 and all(k in targets for k in everyone):
            ensemble = losses.soft_targets([targets[key] for key in everyone], 1.0)
            chosen = losses.soft_targets(teacher_logits, 1.0)
            out.stats["teacher_agreement"] = (chosen.argmax(1) == ensemble.argmax(1)).float().mean()


# MEAL's default --block-weights match the last three blocks of each teacher, and its default representation is
# their pooled channels (docs/decisions.md, "MEAL's ablation"); its blocks are 8-bit: `info --fidelity` measures 8-bit
# blocks and maps within the bar where --keep-bits 4 is not (docs/design.md, "Lossy stores"). Soft labels: T=4 KL
# for the three; the references' T=1 soft cross-entropy (MEAL, MEAL V2) was measured worse on digits
# (docs/results.md, "Does MEAL beat plain KD?"); --soft-loss soft-ce --temperature 1 restores it.


@dataclass(frozen=True)
class MealOptions(BlockOptions):
    """meal's options (:class:`BlockOptions`), with its weights of DKD's parts: DKD's alpha and beta, and a warm-up
    of 1 epoch, as measured (DKD's 20 are for 240-epoch CIFAR runs; at meal's 30 epochs they would ramp through two
    thirds of the run)."""

    warmup: float = 1.0


class Meal(MealFamily):
    name: ClassVar[str] = "meal"
    help: ClassVar[str] = "MEAL: block similarity + per-block and output discriminators, one random teacher a step"
    # 128 PCA dimensions: 3 blocks x (128 + 8 range bytes) = 408 bytes a row at 224 px (docs/design.md, "Projected
    # blocks"), where every channel of resnet50's was 3,608. Every logit: the output discriminator refuses sampled
    # ones, and top-10 lost 18 points of top-1 at 100 classes (docs/results.md, "At the class counts users have").
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(
        ("blocks",), "3", "every logit and the pooled channels of the last 3 blocks (PCA to 128 where wider), 8-bit",
        quantize=8, project=128,
    )  # fmt: skip
    selection: ClassVar[str] = "random"
    own_discriminators: ClassVar[tuple[str, ...]] = ("blocks", "output")
    block_terms: ClassVar[bool] = True
    # DKD's decoupled KL: +6.3 points of top-1 [+2.6, +10.1] over KL on every one of 5 seeds at 100 classes, within
    # noise of dkd itself (docs/results.md, "At the class counts users have"); --soft-loss kl restores Hinton's KL.
    soft_loss: ClassVar[str] = "dkd"
    Options: ClassVar[type] = MealOptions


class KD(MealFamily):
    name: ClassVar[str] = "kd"
    help: ClassVar[str] = "Hinton KD from the ensemble mean of the cached logits"
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(help="the logits (16 sampled classes above 24 classes)",
                                                   logits=PRESET_LOGITS)  # fmt: skip


class MealV2(MealFamily):
    name: ClassVar[str] = "meal-v2"
    help: ClassVar[str] = "MEAL V2: ensemble soft labels + one discriminator on the output"
    own_discriminators: ClassVar[tuple[str, ...]] = ("output",)
    # Every logit: the output discriminator refuses sampled ones, and top-10 lost 26 points of top-1 at 100 classes.
    store_needs: ClassVar[StoreNeeds] = StoreNeeds(help="every logit (the output discriminator refuses sampled ones)")
