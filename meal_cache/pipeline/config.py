"""A pipeline file's data model: :class:`Pipeline` and :func:`load_pipeline`, which parses a TOML file and checks
every section, setting, dataset, architecture and method name before anything runs. Running a pipeline is
:mod:`meal_cache.pipeline.run`'s; reporting on a run is :mod:`meal_cache.pipeline.report`'s; both read this module.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from meal_cache.data.datasets import parse_spec
from meal_cache.distill import DistillConfig, available_methods
from meal_cache.distill.config import setting_types as distill_setting_types
from meal_cache.engine.train import TrainConfig
from meal_cache.errors import UserError, closest_choice, unknown_choice
from meal_cache.extract.config import ExtractConfig
from meal_cache.nets.models import MODELS, check_model_name, family_of, split_weights
from meal_cache.nets.torchvision_weights import is_weights_file
from meal_cache.views.augment import augment_options

ALONE = "alone"
SECTIONS = {"name", "description", "seeds", "data", "teachers", "store", "stores", "student", "methods", "gpu",
            "pairs"}  # fmt: skip
# Store names become file and step names (stores/NAME.zarr, extract/NAME).
STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Pipeline:
    """A parsed pipeline file."""

    name: str
    path: Path
    data: dict
    teachers: list[dict]
    store: dict
    student: dict
    methods: dict[str, dict]
    seeds: list[int]
    description: str = ""
    gpu: bool = False
    raw: dict = field(default_factory=dict)
    stores: dict[str, dict] = field(default_factory=dict)  # named stores: overrides of ``store``
    # (method, baseline) pairs the report compares over seeds, beyond every method against alone and kd.
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def method_store(self, name: str) -> str | None:
        """The named store a method distils from; None for the main store (and for ``alone``)."""
        return self.methods[name].get("store")

    def uses_main_store(self) -> bool:
        """Whether the main store is extracted: always without named stores (as before they existed), else only
        when a method distils from it, since extracting an unused store costs time."""
        if not self.stores:
            return True
        return any(name != ALONE and self.method_store(name) is None for name in self.methods)

    def store_path(self, run_dir: Path, store: str | None = None) -> Path:
        """Where the main store (``store=None``) or a named store lives in a run directory."""
        return run_dir / "feats.zarr" if store is None else run_dir / "stores" / f"{store}.zarr"

    def store_settings(self, store: str | None = None) -> dict:
        """ExtractConfig overrides of the main or a named store."""
        return dict(self.store) if store is None else {**self.store, **self.stores[store]}

    def method_seeds(self, name: str) -> list[int]:
        """A method's seeds: its own ``seeds`` (a subset of the pipeline's) or the pipeline's."""
        return [int(x) for x in self.methods[name].get("seeds", self.seeds)]

    def run_dir(self, root: str | Path = "runs") -> Path:
        return Path(root) / self.name

    def trained_teachers(self) -> list[dict]:
        """The teachers the pipeline trains: all but those that name pretrained weights (see
        :func:`is_pretrained`)."""
        return [t for t in self.teachers if not is_pretrained(t)]

    def teacher_sources(self) -> list[str]:
        """The teacher names extract and the online reference resolve: a trained teacher's name (its checkpoint
        ``teachers/NAME.pt``), a pretrained one's ``ARCH:WEIGHTS``."""
        return [t["arch"] if is_pretrained(t) else t["name"] for t in self.teachers]

    def training_epochs(self) -> tuple[int, int]:
        """How many networks the pipeline trains (teachers, and students over their seeds) and their epochs in
        all: a rough measure of its cost."""
        epochs = [int(t.get("epochs", TrainConfig.epochs)) for t in self.trained_teachers()]
        for name, overrides in self.methods.items():
            default = TrainConfig.epochs if name == ALONE else DistillConfig.epochs
            epochs += [int(overrides.get("epochs", self.student.get("epochs", default)))] * len(self.method_seeds(name))
        return len(epochs), sum(epochs)


def is_pretrained(teacher: dict) -> bool:
    """Whether a [[teachers]] entry names torchvision's pretrained weights (``arch = "resnet50:IMAGENET1K_V2"``):
    such a teacher is used as it is, and the pipeline trains nothing for it."""
    return split_weights(teacher["arch"])[1] is not None


def _check_pretrained(where: str, teacher: dict) -> None:
    """A pretrained teacher: no training settings, and weights torchvision has (checked without loading them)."""
    import torchvision

    settings = sorted(set(teacher) - {"name", "arch"})
    if settings:
        raise UserError(
            f"{where}: '{teacher['arch']}' names pretrained weights, so the pipeline uses it as it is and trains "
            f"nothing; remove {', '.join(settings)} (a fine-tuned teacher is `meal-cache train --arch "
            f"{teacher['arch']} ...`, outside the pipeline)"
        )
    arch, weights = split_weights(teacher["arch"])
    if family_of(arch) is not None:
        return  # timm's weights are found (or not) by timm itself when the teacher is built
    if arch in MODELS:
        raise UserError(f"{where}: '{arch}' is a meal-cache network and has no pretrained weights ('{weights}')")
    if is_weights_file(weights):
        return  # a local state dict is read (and checked) when the teacher is built
    choices = [w.name for w in torchvision.models.get_model_weights(arch)]
    if weights not in choices:
        raise unknown_choice(f"weights for {arch}", weights, choices)


def _check_keys(where: str, given: dict, allowed: set[str], listing: str = "") -> None:
    """Every key of ``given`` among ``allowed``; an unknown one is named, with the one likely meant, then the
    allowed keys (or ``listing``: where they are listed)."""
    unknown = sorted(set(given) - allowed)
    if not unknown:
        return
    close = closest_choice(unknown[0], sorted(allowed)) if len(unknown) == 1 else None
    hint = f"; did you mean {close}?" if close else ""
    choices = listing or f"allowed: {', '.join(sorted(allowed))}"
    raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}; {choices}{hint}")


def _check_augmentation(where: str, settings: dict) -> None:
    """``scale``, ``ratio``, ``hflip`` and ``vflip`` of a teacher or store section, checked before anything runs."""
    try:
        augment_options(SimpleNamespace(**settings))
    except UserError as err:
        raise UserError(f"{where}: {err}") from err


def fields_of(cls) -> set[str]:
    """The field names of a config dataclass."""
    return {f.name for f in dataclasses.fields(cls)}


def distill_settings() -> set[str]:
    """The names a distill step's settings take: :class:`DistillConfig`'s fields and the MEAL family's knobs
    (``disc_lr``, which fill the method's options of their names)."""
    return set(distill_setting_types())


# The pipelines that ship with the package (in the wheel too): the repository's pipelines/ is this folder.
SHIPPED_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def shipped_pipelines() -> dict[str, Path]:
    """The shipped pipelines by name (a file's stem: ``digits`` for ``digits.toml``), sorted."""
    return {path.stem: path for path in sorted(SHIPPED_PIPELINES.glob("*.toml"), key=lambda path: path.stem)}


def resolve_pipeline(name_or_path: str | Path) -> Path:
    """A pipeline file: ``name_or_path`` where that file exists, else the shipped pipeline of that name
    (``digits``, or ``digits.toml``); neither is refused, listing the shipped ones."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_pipelines()
    name = path.stem if path.suffix == ".toml" and path.parent == Path(".") else str(name_or_path)
    if name in shipped:
        return shipped[name]
    close = closest_choice(name, list(shipped))
    hint = f"; did you mean {close}?" if close is not None else ""
    raise UserError(f"pipeline file not found: '{path}', and no shipped pipeline is named '{name}'; shipped: "
                    f"{', '.join(shipped)}{hint}")  # fmt: skip


def _read_toml(path: Path) -> dict:
    """A TOML file's tables; a syntax error is refused naming the file, and tomllib's line and column."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"'{path}' is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"'{path}' is not valid TOML: it is not UTF-8 text ({err.reason})") from err


# What a one-step file holds (``distill --config FILE``, ``extract --config``, ``train --config``): the fields of the
# step's config, named and typed as a pipeline's step tables take them; ``given`` is the CLI's own record.
STEP_CONFIGS = {"distill": DistillConfig, "extract": ExtractConfig, "train": TrainConfig}
NOT_SETTINGS = {"given"}


def step_setting_types(command: str) -> dict[str, object]:
    """The settings a ``command --config FILE`` takes, each with its type (the config field's annotation; distill's
    MEAL knobs, ``disc_lr``, as the options they fill are typed)."""
    if command == "distill":
        return distill_setting_types()
    hints = typing.get_type_hints(STEP_CONFIGS[command])
    return {name: hints[name] for name in fields_of(STEP_CONFIGS[command]) - NOT_SETTINGS}


def load_step_file(path: str | Path, command: str) -> dict:
    """A one-step settings file: a bare TOML table of ``command``'s settings (``epochs = 30``), no ``[command]``
    header; an unknown key (with the one likely meant) or a value of the wrong type is refused naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config file not found: '{path}'")
    raw = _read_toml(path)
    types = step_setting_types(command)
    if isinstance(raw.get(command), dict) and command not in types:
        raise UserError(f"{path}: write the settings at the top level of the file, without the [{command}] header")
    _check_keys(str(path), raw, set(types), listing=f"`meal-cache {command} --help` lists them")
    _check_types(str(path), raw, types)
    return raw


def _check_types(where: str, table: dict, types: dict[str, object], skip: frozenset[str] = frozenset()) -> None:
    """Each of ``table``'s settings named in ``types`` (``skip`` aside) of its type there: a string where a number
    or a list goes is refused naming the table, not met later as a traceback."""
    for name, value in table.items():
        if name in types and name not in skip and not _has_type(value, types[name]):
            raise UserError(f"{where}: {name} takes {_type_name(types[name])}, got {value!r}")


# A TOML value's check per scalar type: TOML's integers are numbers too, its booleans are not.
_SCALARS = {
    bool: lambda value: isinstance(value, bool),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    str: lambda value: isinstance(value, str),
    type(None): lambda value: value is None,
}


def _has_type(value: object, hint: object) -> bool:
    """Whether a TOML value has a config field's type (a TOML array stands for a list or a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and Ellipsis not in args:
            return len(value) == len(args) and all(_has_type(v, arg) for v, arg in zip(value, args, strict=True))
        return all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(v, args[1]) for v in value.values())
    return True  # Any, or a type a TOML value is never checked against


def _type_name(hint: object) -> str:
    """A field's type as a file's reader writes it: ``int`` for ``int | None`` (TOML has no None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        return "true or false"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def load_pipeline(path: str | Path) -> Pipeline:
    """Parse and check a pipeline file: every section, setting, dataset, architecture and method name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file not found: '{path}'")
    raw = _read_toml(path)
    _check_keys(str(path), raw, SECTIONS)
    for section in ("data", "teachers", "student", "methods"):
        if section not in raw:
            raise UserError(f"'{path}' lacks the [{section}] section")
    data = dict(raw["data"])
    _check_keys(f"{path} [data]", data, {"spec", "root", "download", "image_size"})
    parse_spec(data.get("spec", ""))
    teachers = [dict(t) for t in raw["teachers"]]
    train_fields = fields_of(TrainConfig) - {"data", "data_root", "download", "image_size", "device"}
    for teacher in teachers:
        if "name" not in teacher or "arch" not in teacher:
            raise UserError(f"{path}: every [[teachers]] entry needs a name and an arch")
        _check_keys(f"{path} teacher {teacher['name']}", teacher, train_fields | {"name"})
        _check_types(f"{path} teacher {teacher['name']}", teacher, step_setting_types("train"))
        _check_augmentation(f"{path} teacher {teacher['name']}", teacher)
        check_model_name(split_weights(teacher["arch"])[0])
        if is_pretrained(teacher):
            _check_pretrained(f"{path} teacher {teacher['name']}", teacher)
        else:
            _check_training(f"{path} teacher {teacher['name']}", {k: v for k, v in teacher.items() if k != "name"})
    names = [t["name"] for t in teachers]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: teacher names must be unique, got {', '.join(names)}")
    store = dict(raw.get("store", {}))
    store_fields = fields_of(ExtractConfig) - {"teachers", "data", "data_root", "download", "image_size", "teacher_dir",
                                             "device"}  # fmt: skip
    _check_keys(f"{path} [store]", store, store_fields)
    _check_types(f"{path} [store]", store, step_setting_types("extract"))
    _check_augmentation(f"{path} [store]", store)
    stores_raw = raw.get("stores", {})
    if not isinstance(stores_raw, dict) or not all(isinstance(v, dict) for v in stores_raw.values()):
        raise UserError(f"{path}: [stores] holds named tables such as [stores.v1] (views = 1)")
    stores = {name: dict(overrides) for name, overrides in stores_raw.items()}
    for name, overrides in stores.items():
        if not STORE_NAME.fullmatch(name):
            raise UserError(f"{path}: store name '{name}' may hold only letters, digits, '_', '.' and '-'")
        _check_keys(f"{path} [stores.{name}]", overrides, store_fields)
        _check_types(f"{path} [stores.{name}]", overrides, step_setting_types("extract"))
        _check_augmentation(f"{path} [stores.{name}]", overrides)
    student = dict(raw["student"])
    _check_keys(f"{path} [student]", student, (fields_of(TrainConfig) | distill_settings()) - {"student", "store"})
    _check_types(f"{path} [student]", student, step_setting_types("distill"), skip=frozenset(fields_of(TrainConfig)))
    _check_types(f"{path} [student]", student, step_setting_types("train"))
    check_model_name(split_weights(student.get("arch", ""))[0])
    methods = {name: dict(overrides) for name, overrides in raw["methods"].items()}
    seeds = [int(s) for s in raw.get("seeds", [0])]
    _check_methods(path, methods, seeds, stores, student)
    pairs = _check_pairs(path, raw.get("pairs", []), methods)
    return Pipeline(
        name=str(raw.get("name", path.stem)),
        path=path,
        data=data,
        teachers=teachers,
        store=store,
        student=student,
        methods=methods,
        seeds=seeds,
        description=str(raw.get("description", "")),
        gpu=bool(raw.get("gpu", False)),
        raw=raw,
        stores=stores,
        pairs=pairs,
    )


def _check_pairs(path: Path, pairs: object, methods: dict[str, dict]) -> list[tuple[str, str]]:
    """``pairs = [["METHOD", "BASELINE"], ...]``: two methods of [methods] each, which the report pairs."""
    shape = f'{path}: pairs is a list of [method, baseline] name pairs, e.g. pairs = [["kd-cutmix", "kd"]]'
    if not isinstance(pairs, list):
        raise UserError(shape)
    checked = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(name, str) for name in pair)):
            raise UserError(shape)
        unknown = [name for name in pair if name not in methods]
        if unknown:
            raise UserError(f"{path}: pairs names {', '.join(unknown)}, not among the methods "
                            f"({', '.join(methods)})")  # fmt: skip
        if pair[0] == pair[1]:
            raise UserError(f"{path}: pairs compares {pair[0]} with itself")
        checked.append((pair[0], pair[1]))
    return checked


def _check_training(where: str, settings: dict) -> None:
    """A trained network's settings (a teacher's, or the student's trained alone): every number and choice of
    :class:`TrainConfig`, when the file is read rather than when its step starts."""
    try:
        TrainConfig(**settings).validate()
    except (UserError, TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from err


def _check_methods(path: Path, methods: dict[str, dict], seeds: list[int], stores: dict[str, dict],
                   student: dict) -> None:  # fmt: skip
    """Each method's settings (over the [student] section's, as its step takes them), seeds (a subset of the
    pipeline's), store name and method name."""
    distill_types = step_setting_types("distill")
    settings_names = set(distill_types)
    for name, overrides in methods.items():
        extra = set(overrides.get("seeds", seeds)) - set(seeds)
        if extra:
            raise UserError(f"{path} method {name}: seeds {sorted(extra)} are not among the pipeline's {seeds}")
        if name == ALONE:
            _check_keys(f"{path} method {name}", overrides, fields_of(TrainConfig) - {"arch", "data"} | {"seeds"})
            trained = {k: v for k, v in student.items() if k in fields_of(TrainConfig)}
            _check_training(f"{path} method {name}", {**trained, **{k: v for k, v in overrides.items()
                                                                    if k != "seeds"}})  # fmt: skip
            continue
        # ``store`` names a [stores] table here (the DistillConfig field of that name is the store's path).
        _check_keys(f"{path} method {name}", overrides, settings_names - {"student"} | {"seeds"})
        _check_types(f"{path} method {name}", overrides, distill_types, skip=frozenset({"store"}))
        if "store" in overrides:
            chosen = overrides["store"]
            if not isinstance(chosen, str):
                raise UserError(f"{path} method {name}: store takes the name of a [stores] table, got {chosen!r}")
            if chosen not in stores:
                defined = ", ".join(sorted(stores)) or "none: add [stores.NAME] tables"
                raise UserError(f"{path} method {name}: unknown store '{chosen}'; defined stores: {defined}")
        method = overrides.get("method", name)
        if method not in available_methods():
            raise unknown_choice(f"method of '{name}'", method, list(available_methods()))
        # Every choice and number of the method's settings, now rather than after the teachers and the store.
        shared = {k: v for k, v in student.items() if k in settings_names and k != "arch"}
        settings = {**shared, **{k: v for k, v in overrides.items() if k not in ("seeds", "store")}}
        try:
            DistillConfig(store="", student="", **{"method": method, "teachers": ["t"], **settings}).resolved()
        except (UserError, TypeError, ValueError) as err:
            raise UserError(f"{path} method {name}: {err}") from err
