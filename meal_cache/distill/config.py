"""A distillation run's settings (written to ``config.json``), the presets, and their checks."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from dask.utils import parse_bytes

from meal_cache.data.source import check_decode
from meal_cache.distill.methods.adversarial import GAME_SETTINGS, plays_the_game
from meal_cache.distill.methods.base import OPTION_FLAGS, SELECTIONS, SOFT_TERMS, Method
from meal_cache.distill.registry import available_methods, method_class
from meal_cache.engine.loop import check_nesterov, check_number, check_optimisation, check_workers
from meal_cache.errors import UserError, unknown_choice
from meal_cache.nets.models import check_model_name

# One divergent batch for every four natural ones: natural and divergent examples train together; a quarter keeps
# natural images the bulk of each epoch (docs/design.md, "Divergent views").
DIVERGENT_RATIO = 0.25


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; written to ``config.json``."""

    store: str
    student: str
    method: str = "meal"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True  # Nesterov momentum (MEAL's reference: plain); recorded only when off
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    # The test split is evaluated after every eval_every-th epoch and the last; recorded only when not 1.
    eval_every: int = 1
    teacher_selection: str | None = None  # None: the method's own
    soft_loss: str | None = None
    temperature: float | None = None
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    preset: str | None = None  # see PRESETS: settings a preset fills in where they are left at their defaults
    data: str | None = None
    data_root: str | None = None
    download: bool = False
    online: bool = False
    # Online only: a fresh augmentation of every image each epoch (drawn from the seed and the epoch, with the
    # store's recipe) instead of replaying the store's views: function matching's ideal the views curve is
    # measured against.
    fresh_views: bool = False
    teachers: list[str] = field(default_factory=list)
    teacher_dir: str = "teachers"
    seed: int = 0
    refine_labels: bool = False  # hard labels of suspect rows (see `meal-cache inspect`) become the ensemble's
    refine_confidence: float = 0.5
    max_memory: str | None = None  # e.g. "2GB": stream chunks when two views of the targets do not fit
    device: str = "auto"
    workers: int | None = None  # decoding processes for image files (None: from the core count); not recorded
    decode: str = "auto"  # where image files' JPEGs are decoded: cpu, cuda or auto; not recorded
    # FKD's multi-crop: each batch holds K cached views of batch_size / K images, decoded once for the K crops.
    crops_per_image: int = 1
    # Every this many steps, the gradient norm each loss family sends into the student (grad/FAMILY in
    # metrics.jsonl): one extra backward pass per family on that step, so 0 (never) unless asked; not recorded.
    grad_norm_every: int = 0
    # Divergent views (extract --divergent-views): this many of their batches per natural batch, interleaved
    # through each epoch; None: DIVERGENT_RATIO where the store has them, else 0.
    divergent_ratio: float | None = None
    # Students trained together (AFD, ACN): how many of --student, or each one's architecture, peer 0 (--student)
    # first. None: one, and the only value a method without peers takes.
    peers: int | list[str] | None = None
    # The method's own options (its ``Options`` dataclass), ``--method-option NAME=VALUE``, as given (the MEAL
    # family's knobs below fold in here); a record holds those the method records (Method.recorded_options).
    method_options: dict[str, Any] = field(default_factory=dict)
    # Settings the user gave (on the command line or in a pipeline file), which a preset or a method's defaults
    # never replace, even where their value is the default one; not recorded (the values are).
    given: tuple[str, ...] = ()
    # The method's options resolved (every default filled in, checked): set by resolved(); not recorded as such.
    options: Any = None
    # The MEAL family's and the adversarial game's knobs, options of the methods that read them (Meal.Options,
    # GameOptions); given here (as their flags, --disc-lr, and as a pipeline's or preset's keys) they fill the
    # option of the same name in method_options. Constructor arguments only: config.disc_lr is always None (what
    # dataclasses.replace passes on); a resolved config's value is config.options.disc_lr.
    representation: InitVar[str | None] = None
    block_loss: InitVar[str | None] = None
    block_weights: InitVar[list[float] | None] = None
    match_blocks: InitVar[int | None] = None
    adv_weight: InitVar[float | None] = None
    adv_loss: InitVar[str | None] = None
    disc_lr: InitVar[float | None] = None
    discriminators: InitVar[list[str] | None] = None
    adv_game: InitVar[str | None] = None
    disc_form: InitVar[str | None] = None

    def __post_init__(self, representation, block_loss, block_weights, match_blocks, adv_weight, adv_loss, disc_lr,
                      discriminators, adv_game, disc_form) -> None:  # fmt: skip
        knobs = {"representation": representation, "block_loss": block_loss, "block_weights": block_weights,
                 "match_blocks": match_blocks, "adv_weight": adv_weight, "adv_loss": adv_loss, "disc_lr": disc_lr,
                 "discriminators": discriminators, "adv_game": adv_game, "disc_form": disc_form}  # fmt: skip
        if isinstance(self.method_options, dict):  # anything else is refused by resolved(), with its own line
            self.method_options = with_knobs(self.method_options, {k: v for k, v in knobs.items() if v is not None})

    def resolved(self, stored: tuple[str, ...] | None = None) -> DistillConfig:
        """The config with a preset's and the method's defaults filled in and every choice and number checked;
        ``stored``: the store's feature kinds, which choose the representation left unset."""
        self = self._with_preset()
        method = method_class(self.method)
        self = self._with_defaults(method.settings)
        if not isinstance(self.method_options, dict):
            raise UserError(f"method options are NAME=VALUE pairs, got {self.method_options!r}")
        _refuse_unread_knobs(self, method)
        config = dataclasses.replace(
            self,
            teacher_selection=self.teacher_selection or method.selection,
            soft_loss=self.soft_loss or method.soft_loss,
            temperature=method.temperature if self.temperature is None else self.temperature,
            options=None,
        )
        _check_choices_and_numbers(config)
        if config.soft_loss not in method.soft_losses:
            takers = ", ".join(name for name, m in available_methods().items() if config.soft_loss in m.soft_losses)
            raise UserError(f"--soft-loss {config.soft_loss} is taken by --method {takers}, not --method "
                            f"{config.method}")  # fmt: skip
        config = method.check(_check_peers(config, method))
        config = dataclasses.replace(config, options=method.resolve_options(config, stored))
        if not method.has_a_loss(config):
            raise UserError(f"--method {config.method} with these weights trains on nothing: set --soft-weight or "
                            "--hard-weight above 0 (or, for meal, block or adversarial weights)")  # fmt: skip
        return config

    def _with_preset(self) -> DistillConfig:
        """The config with its preset's settings wherever this config leaves them at the dataclass defaults."""
        if self.preset is None:
            return self
        if self.preset not in PRESETS:
            raise unknown_choice("preset", self.preset, list(PRESETS))
        settings = PRESETS[self.preset].settings
        own = settings.get("method", self.method)
        if self.method not in (own, DistillConfig.method):
            raise UserError(f"--preset {self.preset} is --method {own}'s settings; got --method {self.method}")
        return self._with_defaults(settings)

    def _with_defaults(self, settings: dict[str, Any]) -> DistillConfig:
        """The config with ``settings`` wherever this config leaves them at the dataclass defaults; a setting may
        be a function of the config (the reference's discriminator rate is a hundredth of --lr)."""
        unset = dataclasses.MISSING
        defaults = {f.name: f.default if f.default is not unset else f.default_factory()
                    for f in dataclasses.fields(self) if (f.default, f.default_factory) != (unset, unset)}  # fmt: skip
        chosen = {k: v(self) if callable(v) else v for k, v in settings.items()
                  if k != "method_options" and getattr(self, k) == defaults[k] and k not in self.given}  # fmt: skip
        if "method_options" in settings:  # option by option: the ones the command names win
            filled = {k: v(self) if callable(v) else v for k, v in settings["method_options"].items()}
            chosen["method_options"] = {**filled, **self.method_options}
        return dataclasses.replace(self, **chosen)


@dataclass(frozen=True)
class Preset:
    """Settings ``distill --preset NAME`` fills in (each one only where the command leaves it at its default
    value), read from ``presets/NAME.toml``; a value may be a function of the config."""

    settings: dict
    path: Path


# The presets that ship with the package (in the wheel too), one file each: presets/NAME.toml holds one distill
# step's settings, as `distill --config` and a pipeline's [methods] table take them.
PRESET_FOLDER = Path(__file__).resolve().parent.parent / "presets"
# A preset's value that is a share of another setting, ``{ of = "lr", divided_by = 100 }``: it follows the value
# the run takes (MEAL's reference sets its discriminators' rate as a hundredth of the student's).
SHARE_KEYS = {"of", "divided_by"}


def _preset_value(path: Path, name: str, value: object) -> object:
    """A preset file's value as :meth:`DistillConfig._with_defaults` takes it: a share of another setting becomes
    a function of the config (in the method's options too)."""
    if name == "method_options" and isinstance(value, dict):
        return {key: _preset_value(path, key, item) for key, item in value.items()}
    if not isinstance(value, dict):
        return value
    if set(value) != SHARE_KEYS:
        raise UserError(f"{path}: {name} takes a value or a share of another setting, "
                        f"{{ of = \"lr\", divided_by = 100 }}; got {value!r}")  # fmt: skip
    of, divisor = value["of"], value["divided_by"]
    return lambda config: getattr(config, of) / divisor


def read_preset(path: Path) -> Preset:
    """One preset file: its settings, shares of other settings as functions of the config; the MEAL family's knobs
    (``disc_lr = ...`` at the top level, as their flags) are options of the method, as in a ``[method_options]``
    table."""
    settings = {name: _preset_value(path, name, value) for name, value in tomllib.loads(path.read_text()).items()}
    knobs = {name: settings.pop(name) for name in list(settings) if name in OPTION_FLAGS}
    try:
        options = with_knobs(settings.get("method_options", {}), knobs)
    except UserError as err:
        raise UserError(f"{path}: {err}") from err
    return Preset({**settings, "method_options": options} if options else settings, path)


def with_knobs(options: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the knobs given by their own names (``disc_lr``, the flag ``--disc-lr``) as options of the
    same name; one given both ways with two values is refused."""
    for name, value in knobs.items():
        if name in options and options[name] != value and not callable(value):
            raise UserError(f"{OPTION_FLAGS[name]} {value} and --method-option {name}={options[name]} set one "
                            "option twice: give one of them")  # fmt: skip
    return {**options, **knobs} if knobs else options


PRESETS: dict[str, Preset] = {path.stem: read_preset(path) for path in sorted(PRESET_FOLDER.glob("*.toml"))}


# Settings a record (config.json, a pipeline step's stamp) holds only when they are set, so the records of runs
# made before they existed stay the same.
RECORDED_WHEN_SET = {"peers": None, "given": (), "nesterov": True, "eval_every": 1, "options": None}


def knob_types() -> dict[str, object]:
    """The knobs' types, as the options of the methods that read them are typed."""
    types: dict[str, object] = {}
    for method in available_methods().values():
        hints = typing.get_type_hints(method.Options)
        types |= {name: hints[name] for name in OPTION_FLAGS if name in hints and name not in types}
    return types


def setting_types() -> dict[str, object]:
    """Every setting a distill step takes by name (not ``given``, the CLI's own record, nor the resolved
    ``options``), with its type; the knobs as their options are typed."""
    hints = typing.get_type_hints(DistillConfig)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(DistillConfig) if f.name not in ("given", "options")}
    return {**fields, **knob_types()}


def fillable_settings() -> set[str]:
    """The settings a preset or a method's defaults may fill in (``method`` aside): the ones whose being given
    matters (see :attr:`DistillConfig.given`)."""
    names = {key for preset in PRESETS.values() for key in preset.settings}
    names |= {key for method in available_methods().values() for key in method.settings}
    return names - {"method"}


def drop_unset(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the :data:`RECORDED_WHEN_SET` ones left at their unset values."""
    return {k: v for k, v in settings.items() if k not in RECORDED_WHEN_SET or v != RECORDED_WHEN_SET[k]}


def _refuse_unread_knobs(config: DistillConfig, method: type[Method]) -> None:
    """A knob given (as its flag or as an option) to a method whose options do not hold it is one line naming the
    flags: for a method without discriminators the game's, else the methods that do read it."""
    known = {f.name for f in dataclasses.fields(method.Options)}
    unread = [name for name in OPTION_FLAGS if name in config.method_options and name not in known]
    if not unread:
        return
    game = [name for name in GAME_SETTINGS if name in unread]
    if game and not plays_the_game(method):
        flags = ", ".join(OPTION_FLAGS[name] for name in game)
        raise UserError(f"--method {config.method} trains no discriminators: {flags} is not read (leave it out, "
                        "or use a method with discriminators: meal, meal-v2, kd, afd)")  # fmt: skip
    if "discriminators" in unread and plays_the_game(method):
        raise UserError(f"--method {config.method} trains its own discriminators; --discriminators is not read "
                        "(--adv-weight 0 turns the adversarial terms off)")  # fmt: skip
    readers = [name for name, other in available_methods().items()
               if set(unread) <= {f.name for f in dataclasses.fields(other.Options)}]  # fmt: skip
    flags = ", ".join(OPTION_FLAGS[name] for name in unread)
    raise UserError(f"--method {config.method} does not read {flags}: leave it out, or use --method "
                    f"{' or '.join(readers) or 'of another plug-in'}, which reads it")  # fmt: skip


def _check_choices_and_numbers(config: DistillConfig) -> None:
    """Every shared choice and number in its range (a method's own options are its own to check)."""
    if config.teacher_selection not in SELECTIONS:
        raise unknown_choice("teacher selection", config.teacher_selection, SELECTIONS)
    if config.soft_loss not in SOFT_TERMS:
        raise unknown_choice("soft-label loss", config.soft_loss, list(SOFT_TERMS))
    check_optimisation(config)
    check_nesterov(config.nesterov)
    check_number("temperature", config.temperature, low=0.0, low_open=True)
    for name in ("soft_weight", "hard_weight"):
        check_number(name, getattr(config, name), low=0.0)
    check_workers(config.workers)
    check_decode(config.decode)
    _check_crops(config)
    every = config.grad_norm_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UserError(f"--grad-norm-every takes 0 (never) or a number of steps, got {every!r}")
    if config.divergent_ratio is not None:
        check_number("divergent_ratio", config.divergent_ratio, low=0.0)
        if config.divergent_ratio > 0 and config.crops_per_image > 1:
            raise UserError("--divergent-ratio mixes whole batches of divergent views; it does not combine with "
                            "--crops-per-image")  # fmt: skip
    check_number("refine_confidence", config.refine_confidence, low=0.0, high=1.0)
    _check_memory_and_modes(config)


def _check_memory_and_modes(config: DistillConfig) -> None:
    if config.max_memory is not None:
        try:
            parse_bytes(config.max_memory)
        except (ValueError, TypeError) as err:
            raise UserError(f"--max-memory takes a size such as 512MB or 4GB, got '{config.max_memory}'") from err
    if config.online and not config.teachers:
        raise UserError("--online runs the teachers in the loop: name them with --teachers")
    if config.fresh_views and not config.online:
        raise UserError("--fresh-views draws new augmentations the store has no targets for: it needs --online")
    if config.refine_labels and not config.hard_weight:
        raise UserError("--refine-labels replaces hard labels, which only train with --hard-weight > 0 "
                        "(MEAL's refinement uses --hard-weight 1)")  # fmt: skip


def _check_crops(config: DistillConfig) -> None:
    crops = config.crops_per_image
    if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
        raise UserError(f"--crops-per-image must be at least 1, got {crops!r}")
    if config.batch_size % crops:
        raise UserError(f"--batch-size {config.batch_size} must be a multiple of --crops-per-image {crops} (a batch "
                        f"holds {crops} crops of each of its images)")  # fmt: skip
    if crops > 1 and config.online:
        raise UserError("--crops-per-image replays cached views; the online reference (--online) takes one view")


def _check_peers(config: DistillConfig, method: type[Method]) -> DistillConfig:
    """``--peers``: a whole number >= 1, or every peer's architecture (peer 0, ``--student``, first); taken only by
    a method that trains peers."""
    peers = config.peers
    if isinstance(peers, str):
        peers = [name.strip() for name in peers.split(",") if name.strip()]
    if isinstance(peers, list | tuple):
        if not peers or not all(isinstance(name, str) and name for name in peers):
            raise UserError(f"--peers takes a number of students or their architectures (ARCH,ARCH,...), got {peers!r}")
        peers = list(peers)
        for name in peers:
            check_model_name(name)
        if peers[0] != config.student:
            raise UserError(f"--peers lists every peer's architecture, peer 0 (the student) first: it starts with "
                            f"{peers[0]}, but --student is {config.student}")  # fmt: skip
    elif peers is not None and (isinstance(peers, bool) or not isinstance(peers, int) or peers < 1):
        raise UserError(f"--peers must be a whole number of students, at least 1, got {peers!r}")
    if peers is not None and not method.trains_peers:
        takers = ", ".join(name for name, m in available_methods().items() if m.trains_peers)
        raise UserError(f"--peers trains several students together, which only --method {takers} does "
                        f"(got --method {config.method})")  # fmt: skip
    return dataclasses.replace(config, peers=peers)
