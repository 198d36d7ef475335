"""Declarative, reproducible runs: a TOML file names the data, teachers, store, student, methods and seeds;
:func:`run_pipeline` runs every step into ``runs/<name>/`` and skips a step whose outputs exist and whose
settings and inputs are unchanged (each step leaves a stamp: the hash of its settings and of its inputs' stamps).

A pipeline file::

    name = "digits"
    seeds = [100, 101, 102]
    [data]
    spec = "digits"
    [[teachers]]
    name = "resnet20"
    arch = "resnet20"
    epochs = 15
    [store]
    views = 8
    identity_view = true
    [stores.v1]                   # optional named stores: [store] with these overrides, in stores/v1.zarr
    views = 1
    [student]
    arch = "resnet8_w4"
    epochs = 15
    [methods]
    alone = {}                    # the student trained alone, with labels
    kd = { method = "kd" }
    meal = { method = "meal" }    # any DistillConfig field may be set per method
    meal-v1 = { method = "meal", store = "v1" }   # distilled from a named store

The main store (``feats.zarr``) is extracted when no ``[stores]`` are named or some method uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from meal_cache.data import parse_spec
from meal_cache.distill import METHODS, DistillConfig, distill
from meal_cache.errors import SettingsMismatch, UserError, unknown_choice
from meal_cache.extract import ExtractConfig, extract
from meal_cache.models import model_names, split_weights
from meal_cache.train import TrainConfig, train_supervised

ALONE = "alone"
SECTIONS = {"name", "description", "seeds", "data", "teachers", "store", "stores", "student", "methods", "gpu"}
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


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    unknown = set(given) - allowed
    if unknown:
        raise UserError(
            f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_pipeline(path: str | Path) -> Pipeline:
    """Parse and check a pipeline file: every section, setting, dataset, architecture and method name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file not found: '{path}'")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"'{path}' is not valid TOML: {err}") from err
    _check_keys(str(path), raw, SECTIONS)
    for section in ("data", "teachers", "student", "methods"):
        if section not in raw:
            raise UserError(f"'{path}' lacks the [{section}] section")
    data = dict(raw["data"])
    _check_keys(f"{path} [data]", data, {"spec", "root", "download", "image_size"})
    parse_spec(data.get("spec", ""))
    known_models = set(model_names())
    teachers = [dict(t) for t in raw["teachers"]]
    train_fields = _fields(TrainConfig) - {"data", "data_root", "download", "image_size", "device"}
    for teacher in teachers:
        if "name" not in teacher or "arch" not in teacher:
            raise UserError(f"{path}: every [[teachers]] entry needs a name and an arch")
        _check_keys(f"{path} teacher {teacher['name']}", teacher, train_fields | {"name"})
        if split_weights(teacher["arch"])[0] not in known_models:
            raise unknown_choice("architecture", teacher["arch"], sorted(known_models), listing="meal-cache models")
    names = [t["name"] for t in teachers]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: teacher names must be unique, got {', '.join(names)}")
    store = dict(raw.get("store", {}))
    store_fields = _fields(ExtractConfig) - {"teachers", "data", "data_root", "download", "image_size", "teacher_dir",
                                             "device"}  # fmt: skip
    _check_keys(f"{path} [store]", store, store_fields)
    stores_raw = raw.get("stores", {})
    if not isinstance(stores_raw, dict) or not all(isinstance(v, dict) for v in stores_raw.values()):
        raise UserError(f"{path}: [stores] holds named tables such as [stores.v1] (views = 1)")
    stores = {name: dict(overrides) for name, overrides in stores_raw.items()}
    for name, overrides in stores.items():
        if not STORE_NAME.fullmatch(name):
            raise UserError(f"{path}: store name '{name}' may hold only letters, digits, '_', '.' and '-'")
        _check_keys(f"{path} [stores.{name}]", overrides, store_fields)
    student = dict(raw["student"])
    _check_keys(f"{path} [student]", student, (_fields(TrainConfig) | _fields(DistillConfig)) - {"student", "store"})
    if split_weights(student.get("arch", ""))[0] not in known_models:
        raise unknown_choice("architecture", student.get("arch", ""), sorted(known_models),
                             listing="meal-cache models")  # fmt: skip
    methods = {name: dict(overrides) for name, overrides in raw["methods"].items()}
    seeds = [int(s) for s in raw.get("seeds", [0])]
    for name, overrides in methods.items():
        extra = set(overrides.get("seeds", seeds)) - set(seeds)
        if extra:
            raise UserError(f"{path} method {name}: seeds {sorted(extra)} are not among the pipeline's {seeds}")
        if name == ALONE:
            _check_keys(f"{path} method {name}", overrides, _fields(TrainConfig) - {"arch", "data"} | {"seeds"})
            continue
        # ``store`` names a [stores] table here (the DistillConfig field of that name is the store's path).
        _check_keys(f"{path} method {name}", overrides, _fields(DistillConfig) - {"student"} | {"seeds"})
        if "store" in overrides:
            chosen = overrides["store"]
            if not isinstance(chosen, str):
                raise UserError(f"{path} method {name}: store takes the name of a [stores] table, got {chosen!r}")
            if chosen not in stores:
                defined = ", ".join(sorted(stores)) or "none: add [stores.NAME] tables"
                raise UserError(f"{path} method {name}: unknown store '{chosen}'; defined stores: {defined}")
        method = overrides.get("method", name)
        if method not in METHODS:
            raise unknown_choice(f"method of '{name}'", method, list(METHODS))
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
    )


# ---------------------------------------------------------------------------------------------------- steps


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepRunner:
    """Runs named steps, skipping those whose outputs exist under an unchanged stamp."""

    def __init__(self, run_dir: Path, progress: bool) -> None:
        self.run_dir = run_dir
        self.stamps = run_dir / "steps"
        self.progress = progress
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def stamp(self, name: str) -> str | None:
        path = self.stamps / f"{name.replace('/', '__')}.json"
        return json.loads(path.read_text())["digest"] if path.is_file() else None

    def run(self, name: str, settings: dict, inputs: list[str], outputs: list[Path],
            action: Callable[[], None]) -> None:  # fmt: skip
        digest = _digest({"settings": settings, "inputs": [self.stamp(i) for i in inputs]})
        if self.stamp(name) == digest and all(p.exists() for p in outputs):
            self.skipped.append(name)
            return
        started = time.perf_counter()
        if self.progress:
            tqdm.write(f"[{self.run_dir.name}] {name} ...")
        action()
        self.stamps.mkdir(parents=True, exist_ok=True)
        record = {"digest": digest, "settings": settings, "seconds": round(time.perf_counter() - started, 2)}
        (self.stamps / f"{name.replace('/', '__')}.json").write_text(json.dumps(record, indent=2, default=str))
        self.ran.append(name)


def _retrying(run: Callable[[bool], object]) -> None:
    """Resume where settings match; start again where they do not (the pipeline owns its run directory)."""
    try:
        run(False)
    except SettingsMismatch:
        run(True)


def run_pipeline(pipeline: Pipeline, runs_root: str | Path = "runs", device: str = "auto",
                 progress: bool = True) -> Path:  # fmt: skip
    """Run (or bring up to date) every step of ``pipeline``; returns its run directory."""
    run_dir = pipeline.run_dir(runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.toml").write_text(pipeline.path.read_text())
    steps = StepRunner(run_dir, progress)
    data = {
        "data": pipeline.data.get("spec", "digits"),
        "data_root": pipeline.data.get("root", "data"),
        "download": bool(pipeline.data.get("download", False)),
        "image_size": pipeline.data.get("image_size"),
    }
    teacher_dir = run_dir / "teachers"

    for teacher in pipeline.teachers:
        settings = {k: v for k, v in teacher.items() if k != "name"}
        config = TrainConfig(**{**data, **settings, "device": device})
        out = teacher_dir / f"{teacher['name']}.pt"

        def train_teacher(config=config, out=out) -> None:
            _retrying(lambda fresh: train_supervised(config, out, resume=not fresh, overwrite=fresh, progress=progress))

        steps.run(f"teacher/{teacher['name']}", dataclasses.asdict(config) | {"device": None}, [], [out], train_teacher)

    teacher_names = [t["name"] for t in pipeline.teachers]
    teacher_steps = [f"teacher/{n}" for n in teacher_names]
    # The main store keeps its step name and settings, so runs made before named stores existed stay up to date.
    stores: list[tuple[str | None, str]] = [(None, "extract")] if pipeline.uses_main_store() else []
    stores += [(name, f"extract/{name}") for name in pipeline.stores]
    for store_name, step in stores:
        store_path = pipeline.store_path(run_dir, store_name)
        extract_config = ExtractConfig(teachers=teacher_names, teacher_dir=str(teacher_dir), device=device,
                                       **data, **pipeline.store_settings(store_name))  # fmt: skip

        def run_extract(config=extract_config, out=store_path) -> None:
            _retrying(lambda fresh: extract(config, out, overwrite=fresh, progress=progress))

        steps.run(step, dataclasses.asdict(extract_config) | {"device": None, "teacher_dir": None}, teacher_steps,
                  [store_path], run_extract)  # fmt: skip

    train_fields, distill_fields = _fields(TrainConfig), _fields(DistillConfig)
    for seed in pipeline.seeds:
        for name, overrides in pipeline.methods.items():
            if seed not in pipeline.method_seeds(name):
                continue
            overrides = {k: v for k, v in overrides.items() if k not in ("seeds", "store")}
            out = run_dir / "students" / name / f"seed-{seed}"
            if name == ALONE:
                student = {k: v for k, v in pipeline.student.items() if k in train_fields}
                config = TrainConfig(**{**data, **student, **overrides, "seed": seed, "device": device})
                target = out / "student.pt"

                def train_alone(config=config, target=target) -> None:
                    _retrying(lambda fresh: train_supervised(config, target, resume=not fresh, overwrite=fresh,
                                                             progress=progress))  # fmt: skip

                steps.run(f"{name}/seed-{seed}", dataclasses.asdict(config) | {"device": None}, [], [target],
                          train_alone)  # fmt: skip
                continue
            student = {k: v for k, v in pipeline.student.items() if k in distill_fields and k != "arch"}
            if overrides.get("online"):
                # The online reference runs the pipeline's own teachers in the loop.
                overrides = {"teachers": teacher_names, **overrides, "teacher_dir": str(teacher_dir)}
            store_name = pipeline.method_store(name)
            store_step = "extract" if store_name is None else f"extract/{store_name}"
            store_path = pipeline.store_path(run_dir, store_name)
            config = DistillConfig(store=str(store_path), student=pipeline.student["arch"], seed=seed, device=device,
                                   **{"method": name, **student, **overrides})  # fmt: skip

            def run_distill(config=config, out=out) -> None:
                _retrying(lambda fresh: distill(config, out, resume=not fresh, overwrite=fresh, progress=progress))

            steps.run(f"{name}/seed-{seed}", dataclasses.asdict(config) | {"device": None}, [store_step],
                      [out / "student.pt"], run_distill)  # fmt: skip

    from meal_cache.report import write_report

    write_report(run_dir, pipeline, progress=progress)
    if progress:
        tqdm.write(f"[{pipeline.name}] ran {len(steps.ran)} step(s), {len(steps.skipped)} up to date; "
                   f"report: {run_dir / 'report.md'}")  # fmt: skip
    return run_dir
