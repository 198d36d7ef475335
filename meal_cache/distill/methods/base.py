"""The method interface: what every distillation method declares and returns.

A method is one class in one file (mdistiller's distillers, timm's registered models). It declares:

- what it reads from a store (:attr:`Method.store_needs`), which ``extract --for NAME`` follows;
- its defaults for the shared settings (:attr:`Method.soft_loss`, :attr:`Method.settings`, ...) and its own
  options (:attr:`Method.Options`, a dataclass given as ``distill --method-option KEY=VALUE``) with their checks;
- the networks it trains beside the student (``adapters``, or more, as AFD's peers and ACN's generator);
- :meth:`Method.forward`, which turns a :class:`Batch` into a :class:`MethodOutput`: the student's logits and
  its named losses.

Methods with discriminators (MEAL's family, AFD) build on :mod:`meal_cache.distill.methods.adversarial`.

The feed (which rows, views and pixels a step gets), the loop (optimiser, AMP, DDP, resume) and the run directory
are not a method's business. Methods are found by :mod:`meal_cache.distill.registry`: every module of this package
and every entry point of the group ``meal_cache.methods``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meal_cache import losses
from meal_cache.errors import UserError
from meal_cache.store.encodings import DEFAULT_LOGITS_TEMPERATURE
from meal_cache.store.keys import logits_key
from meal_cache.store.logits import LogitsChoice
from meal_cache.store.schema import StoreNeeds

if TYPE_CHECKING:
    from meal_cache.store.teacher_store import TeacherStore


class MethodSettings(Protocol):
    """The settings of a run that this base reads, resolved (every default filled in): a
    :class:`~meal_cache.distill.config.DistillConfig` is one. A method's own file reads the rest of its config."""

    temperature: float
    soft_loss: str
    soft_weight: float
    hard_weight: float
    teacher_selection: str
    method_options: dict[str, Any]


Settings = TypeVar("Settings", bound=MethodSettings)

SELECTIONS = ("random", "mean", "all")
REPRESENTATIONS = ("maps", "blocks")


# The compact logits of the presets whose every logits consumer is linear in the soft target (KL and cross-entropy),
# for which count / K is unbiased: 16 draws a row are 48 bytes against 2,000 for every float16 logit of 1,000
# classes. At 100 classes and T = 4 they matched every logit where top-10 lost 18 points of top-1 (docs/results.md,
# "At the class counts users have").
PRESET_LOGITS = LogitsChoice("sample", 16)


@dataclass(frozen=True)
class Batch:
    """One step's input to a method (:meth:`Method.batch` builds one)."""

    images: torch.Tensor  # the normalised pixels, (B, C, H, W)
    targets: dict[str, torch.Tensor]  # the store's arrays of these rows, by key (``logits_key``, ``feature_key``)
    labels: torch.Tensor  # class indices, or class shares (mixed rows' labels)
    selected: list[str]  # the teachers of this step
    student: nn.Module  # what runs the student: itself, or its DistributedDataParallel wrapper under torchrun


@dataclass
class MethodOutput:
    """What a method makes of a batch: the student's logits, its named losses (summed and backpropagated), and
    values that are only logged."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


@dataclass(frozen=True)
class DecoupledOptions:
    """The weights of DKD's decoupled KL (``--soft-loss dkd``; the paper's CIFAR setting by default)."""

    alpha: float = 1.0  # weight of the target-class part (TCKD)
    beta: float = 8.0  # weight of the non-target part (NCKD)
    warmup: float = 20.0  # epochs over which both parts ramp in linearly (0: at full weight from the start)


def decoupled_ramp(warmup: float, epoch: int) -> float:
    """DKD's weight of both parts in 0-based ``epoch``: (epoch + 1) / warmup, at most 1."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


def soft_target_sets(config: MethodSettings, teacher_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """The soft targets a step learns from: the ensemble mean of the selected teachers' (``--teacher-selection
    mean``), or each selected teacher's own."""
    if config.teacher_selection == "mean":
        return [losses.soft_targets(teacher_logits, config.temperature)]
    return [losses.soft_targets([t], config.temperature) for t in teacher_logits]


def soft_target_log_sets(config: MethodSettings, teacher_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`soft_target_sets` as log-probabilities, formed in log space (what DKD's parts read)."""
    if config.teacher_selection == "mean":
        return [losses.log_soft_targets(teacher_logits, config.temperature)]
    return [losses.log_soft_targets([t], config.temperature) for t in teacher_logits]


def _probability_terms(loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Callable[..., dict]:
    """A soft-label term of the softened teacher probabilities (``losses.SOFT_LABEL``), summed over the sets."""

    def terms(method: Method, logits: torch.Tensor, soft_sets: list[torch.Tensor],
              teacher_logits: list[torch.Tensor] | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        config = method.config
        return {"": config.soft_weight * sum(loss(logits, p, config.temperature) for p in soft_sets)}

    return terms


def _decoupled_terms(method: Method, logits: torch.Tensor, soft_sets: list[torch.Tensor],
                     teacher_logits: list[torch.Tensor] | None, labels: torch.Tensor) -> dict[str, Tensor]:  # fmt: skip
    """``--soft-loss dkd``: alpha TCKD and beta NCKD from the teachers' logits in log space, ramped in over the
    warm-up; a mixed row's target is its larger share's class."""
    if teacher_logits is None:
        raise TypeError("--soft-loss dkd reads the teachers' logits: pass teacher_logits to label_losses")
    config, options = method.config, method.options
    target = labels if labels.dim() == 1 else labels.argmax(1)
    weight = config.soft_weight * decoupled_ramp(options.warmup, method.epoch)
    parts = [losses.decoupled_kl(logits, log_probs, target, config.temperature)
             for log_probs in soft_target_log_sets(config, teacher_logits)]  # fmt: skip
    return {"/tckd": weight * options.alpha * sum(tckd for tckd, _ in parts),
            "/nckd": weight * options.beta * sum(nckd for _, nckd in parts)}  # fmt: skip


# --soft-loss: each choice's named terms (suffixes of ``soft``). kl and soft-ce are functions of the softened teacher
# probabilities whose gradient is linear in them, so a sampled store's count / K estimates it without bias; dkd's
# parts renormalise the teacher's distribution (a ratio of estimates) and need the target class.
SOFT_TERMS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    **{name: _probability_terms(loss) for name, loss in losses.SOFT_LABEL.items()},
    "dkd": _decoupled_terms,
}
LINEAR_SOFT_LOSSES = frozenset(losses.SOFT_LABEL)


class Method(nn.Module):
    """The base of every method: the student and the adapters trained with it.

    Subclasses set :attr:`name` and :attr:`help` and implement :meth:`forward` (and :meth:`needed_keys` where they
    read more than the logits)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    store_needs: ClassVar[StoreNeeds] = StoreNeeds()
    # Defaults of the shared settings that are None until the method fills them in.
    soft_loss: ClassVar[str] = "kl"
    # The --soft-loss choices the method takes; dkd needs DecoupledOptions and the teachers' logits in label_losses.
    soft_losses: ClassVar[tuple[str, ...]] = tuple(losses.SOFT_LABEL)
    temperature: ClassVar[float] = DEFAULT_LOGITS_TEMPERATURE
    selection: ClassVar[str] = "mean"
    block_terms: ClassVar[bool] = False  # whether --block-weights, --match-blocks and --representation apply
    trains_peers: ClassVar[bool] = False  # whether --peers applies (students trained together)
    # Shared settings the method fills in where the command leaves them at their defaults (as a preset does).
    settings: ClassVar[dict[str, Any]] = {}
    Options: ClassVar[type] = NoOptions

    def __init__(self, student: nn.Module, config: MethodSettings, store: TeacherStore, image_size: int) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self.options = self.options_of(config)
        self.teachers = list(store.teacher_names)
        # A sampled store's soft targets are count / K: the cross-entropy against them is an unbiased estimate of
        # the dense one, their entropy is not (a few draws look far more certain), so KL's logged value would be
        # biased where its gradient is not.
        self.sampled_logits = store.layout.logits_estimated
        self.adapters = nn.ModuleDict()  # trained with the student (averaged over ranks under torchrun)
        self.epoch = 0

    # ------------------------------------------------------------------------------------------ declarations

    @classmethod
    def options_of(cls, config: MethodSettings) -> Any:
        """The method's own options: a resolved config's (``config.options``, every default filled in), else from
        ``config.method_options``, checked; unknown names are one clear error naming the method (a knob given
        to a method that does not read it is refused earlier, by the config, naming the methods that do)."""
        resolved = getattr(config, "options", None)
        if isinstance(resolved, cls.Options):
            return resolved
        given = dict(config.method_options or {})
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = ", ".join(known) or "none"
            raise UserError(f"--method {cls.name} has no option {', '.join(unknown)} (its options: {takes})")
        options = cls.Options(**{key: _option_value(cls.name, known[key], value) for key, value in given.items()})
        cls.check_options(options)
        return options

    @classmethod
    def resolve_options(cls, config: MethodSettings, stored: tuple[str, ...] | None) -> Any:
        """The options a run takes, every default filled in, including those that follow the config or the store
        (``stored``: its feature kinds, None where unknown); a resolved config holds them as ``config.options``."""
        return cls.options_of(config)

    @classmethod
    def recorded_options(cls, config: MethodSettings) -> dict[str, Any]:
        """The options a run's record (``config.json``, ``last.pt``) holds: those given (a method records what
        the command named, so a record stays the same as the defaults move)."""
        return dict(config.method_options or {})

    @classmethod
    def check_options(cls, options: Any) -> None:
        """Further checks of the options together (each number is already checked against its field's ``low``)."""

    @classmethod
    def check(cls, config: Settings) -> Settings:
        """The method's own checks of the shared settings; may fill in values (AFD's peer count)."""
        return config

    @classmethod
    def sampled_logits_refusal(cls, config: MethodSettings) -> str | None:
        """Why a store of sampled logits (``extract --logits sample:K``, read back as count / K) cannot serve this
        config, or None where it can: count / K is unbiased only for a loss linear in the soft target. A method
        that reads the logits otherwise adds its own reason."""
        if config.soft_weight > 0 and config.soft_loss not in LINEAR_SOFT_LOSSES:
            return (f"--soft-loss {config.soft_loss} renormalises the teacher's non-target probabilities, which a "
                    "few draws make a histogram (most rows' non-target part uniform), not an estimate")  # fmt: skip
        return None

    @classmethod
    def has_a_loss(cls, config: MethodSettings) -> bool:
        """Whether some term of the student's loss has a weight above 0."""
        return config.soft_weight > 0 or config.hard_weight > 0

    def require_stored(self, store: TeacherStore, *kinds: str) -> None:
        """Refuse a store without the feature kinds this method reads, naming the extract flags that store them."""
        missing = [kind for kind in kinds if kind not in store.layout.features]
        if missing and store.dense:
            raise UserError(f"--method {self.name} reads the teachers' channel-mean {' and '.join(missing)} of each "
                            "view, which a dense store cannot derive (it keeps logits and pooled blocks for any "
                            "crop): distill with a method that reads those (kd, meal, meal-v2, fitnet, ...), or "
                            f"extract a store of views with --for {self.name}")  # fmt: skip
        if missing:
            named = " and ".join(STORED_KIND_NAMES.get(kind, kind) for kind in missing)
            raise UserError(f"--method {self.name} reads the teachers' {named}, which this store "
                            f"lacks (it holds {', '.join(store.layout.features) or 'logits only'}): extract with "
                            f"--for {self.name} (or --features {','.join(missing)})")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's steps (0-based), for losses with a schedule of their own."""
        self.epoch = epoch

    def teacher_share(self, selected: list[str]) -> float:
        """The weight of each selected teacher's own terms: 1/n under ``--teacher-selection mean`` (the ensemble
        counts once), 1 under ``random`` and ``all`` (every teacher's terms summed)."""
        return 1.0 / len(selected) if self.config.teacher_selection == "mean" else 1.0

    def needed_keys(self) -> list[str]:
        """The store arrays training reads: every teacher's logits."""
        return [logits_key(t) for t in self.teachers]

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student's optimiser trains."""
        return list(self.student.parameters()) + list(self.adapters.parameters())

    def trained_networks(self) -> list[nn.Module]:
        """The networks a run writes as students (``student.pt``, then ``peerI.pt`` for the others)."""
        return [self.student]

    def own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers of the updates the method takes itself (ACN's generator, AFD's separate adversarial update),
        built once the method is on its device; their states go into ``last.pt``. None by default."""
        return {}

    def own_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        """The method's own updates on a batch, taken before the student's step, in float32 (outside autocast:
        the loop's gradient scaler serves the student's optimiser only); returns values that are only logged."""
        return {}

    def batch(self, images: torch.Tensor, targets: dict[str, torch.Tensor], labels: torch.Tensor,
              selected: list[str] | None = None, student: nn.Module | None = None) -> Batch:  # fmt: skip
        """A :class:`Batch` for :meth:`forward`: ``selected`` defaults to every teacher, ``student`` to the
        student itself."""
        return Batch(images, targets, labels, list(self.teachers) if selected is None else selected,
                     self.student if student is None else student)  # fmt: skip

    def teacher_logits(self, batch: Batch) -> list[torch.Tensor]:
        """The selected teachers' stored logits of ``batch``, in float32."""
        return [batch.targets[logits_key(t)].float() for t in batch.selected]

    def teacher_soft_targets(self, batch: Batch) -> list[torch.Tensor]:
        """The selected teachers' soft targets at ``--temperature`` (see :func:`soft_target_sets`)."""
        return soft_target_sets(self.config, self.teacher_logits(batch))

    def label_losses(self, logits: torch.Tensor, soft_sets: list[torch.Tensor], labels: torch.Tensor,
                     suffix: str = "", teacher_logits: list[Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
        """The shared terms: ``soft`` (``--soft-loss`` against each soft target set, at ``--soft-weight``; DKD's
        ``soft/tckd`` and ``soft/nckd``, which read ``teacher_logits``, the selected teachers' logits) and ``hard``
        (cross-entropy at ``--hard-weight``), each left out at weight 0. From a sampled store, kl is logged as
        ``soft_ce``, its cross-entropy part: the same gradient, and a value that estimates the dense one."""
        config, named = self.config, {}
        if config.soft_weight:
            soft_loss = "soft-ce" if self.sampled_logits and config.soft_loss == "kl" else config.soft_loss
            name = "soft_ce" if self.sampled_logits and soft_loss == "soft-ce" else "soft"
            for part, value in SOFT_TERMS[soft_loss](self, logits, soft_sets, teacher_logits, labels).items():
                named[f"{name}{part}{suffix}"] = value
        if config.hard_weight:
            named[f"hard{suffix}"] = config.hard_weight * F.cross_entropy(logits, labels)
        return named

    def forward(self, batch: Batch) -> MethodOutput:
        """The student's logits, its named losses and logged-only values on ``batch``."""
        raise NotImplementedError


def _option_named(method: str, name: str) -> str:
    """An option as a refusal names it: by its flag where it has one (``--adv-weight``), as the user most likely
    gave it."""
    return OPTION_FLAGS.get(name) or f"--method-option {name} of --method {method}"


def _option_value(method: str, option: dataclasses.Field, value: Any) -> Any:
    """An option's value as its field's type: a number option takes a finite number (a whole one where the
    default is whole) at least the field's ``metadata["low"]`` (0 unless said)."""
    default = option.default
    if isinstance(default, bool) or not isinstance(default, int | float):
        return value
    whole = isinstance(default, int)
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{_option_named(method, option.name)} takes {kind}, got {value!r}")
    low = option.metadata.get("low", 0)
    if value < low:
        raise UserError(f"{_option_named(method, option.name)} must be >= {low}, got {value}")
    return int(value) if whole else float(value)


# A stored feature kind as a refusal names it.
STORED_KIND_NAMES = {"blocks": "pooled blocks", "maps": "channel-mean maps", "attention": "attention maps"}


# The options that are also flags of their own (``distill --disc-lr``, MEAL's and the adversarial game's knobs): a
# flag fills the option of its name, as ``--method-option disc_lr=...`` does.
OPTION_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "representation", "block_loss", "block_weights", "match_blocks",
    "adv_weight", "adv_loss", "adv_game", "disc_lr", "discriminators", "disc_form",
)}  # fmt: skip
