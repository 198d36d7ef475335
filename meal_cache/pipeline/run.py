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

A teacher whose ``arch`` names torchvision's pretrained weights (``arch = "resnet50:IMAGENET1K_V2"``) has no
training step and takes no training settings: extract, the online reference and the report use those weights as
they are (``pipelines/imagenet.toml``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from meal_cache.distill import DistillConfig, distill
from meal_cache.distill.config import drop_unset, fillable_settings
from meal_cache.engine.train import RECORDED_WHEN_SET as TRAIN_RECORDED_WHEN_SET
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.errors import SettingsMismatch, UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.pipeline.config import ALONE, Pipeline, distill_settings, fields_of, load_pipeline
from meal_cache.pipeline.report import write_report
from meal_cache.runtime import resolve_device
from meal_cache.views import augment

__all__ = ["Pipeline", "check_device", "load_pipeline", "run_pipeline"]

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


def _stamped(config: TrainConfig | ExtractConfig) -> dict:
    """A train or extract step's settings as its stamp records them: no device, and the augmentation options,
    Nesterov and the evaluation interval left at their unset values left out (as checkpoints leave them out), so
    runs stamped before those options existed stay up to date."""
    settings = augment.recorded_options(dataclasses.asdict(config)) | {"device": None}
    for name, unset in TRAIN_RECORDED_WHEN_SET.items():
        if name in settings and settings[name] == unset:
            settings.pop(name)
    return _transient_out(settings)


def _transient_out(settings: dict) -> dict:
    """Stamps leave out where JPEGs are decoded (--decode changes no result), so steps stay up to date."""
    settings.pop("decode", None)
    return settings


def _retrying(run: Callable[[bool], object]) -> None:
    """Resume where settings match; start again where they do not (the pipeline owns its run directory)."""
    try:
        run(False)
    except SettingsMismatch:
        run(True)


def check_device(pipeline: Pipeline, device: str = "auto", allow_cpu: bool = False) -> None:
    """Refuse to run a pipeline marked ``gpu = true`` on anything but a CUDA device, unless ``allow_cpu``."""
    if not pipeline.gpu or allow_cpu:
        return
    target = resolve_device(device)  # --device cuda without a GPU is refused here, with its own message
    if target.type == "cuda":
        return
    why = "no CUDA GPU was found (--device auto)" if device == "auto" else f"--device {device}"
    networks, epochs = pipeline.training_epochs()
    raise UserError(
        f"pipeline '{pipeline.name}' is sized for a GPU (gpu = true in {pipeline.path}), but it would run on the "
        f"{target.type.upper()}: {why}; it trains {networks} networks for {epochs:,} epochs in all, which on a CPU "
        "takes far longer (docs/benchmarks.md gives CPU rates per architecture); pass --allow-cpu to run it anyway"
    )


def run_pipeline(pipeline: Pipeline, runs_root: str | Path = "runs", device: str = "auto",
                 progress: bool = True, allow_cpu: bool = False) -> Path:  # fmt: skip
    """Run (or bring up to date) every step of ``pipeline``; returns its run directory. A ``gpu = true`` pipeline
    is refused, before anything is written, when it would not run on CUDA, unless ``allow_cpu``."""
    check_device(pipeline, device, allow_cpu)
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

    for teacher in pipeline.trained_teachers():
        settings = {k: v for k, v in teacher.items() if k != "name"}
        config = TrainConfig(**{**data, **settings, "device": device})
        out = teacher_dir / f"{teacher['name']}.pt"

        def train_teacher(config=config, out=out) -> None:
            _retrying(lambda fresh: train_supervised(config, out, resume=not fresh, overwrite=fresh, progress=progress))

        steps.run(f"teacher/{teacher['name']}", _stamped(config), [], [out], train_teacher)

    # Pretrained teachers have no step: extract resolves them by ARCH:WEIGHTS.
    teacher_names = pipeline.teacher_sources()
    teacher_steps = [f"teacher/{t['name']}" for t in pipeline.trained_teachers()]
    # The main store keeps its step name and settings, so runs made before named stores existed stay up to date.
    stores: list[tuple[str | None, str]] = [(None, "extract")] if pipeline.uses_main_store() else []
    stores += [(name, f"extract/{name}") for name in pipeline.stores]
    for store_name, step in stores:
        store_path = pipeline.store_path(run_dir, store_name)
        extract_config = ExtractConfig(teachers=teacher_names, teacher_dir=str(teacher_dir), device=device,
                                       **data, **pipeline.store_settings(store_name))  # fmt: skip

        def run_extract(config=extract_config, out=store_path) -> None:
            _retrying(lambda fresh: extract(config, out, overwrite=fresh, progress=progress))

        steps.run(step, _stamped(extract_config) | {"teacher_dir": None}, teacher_steps, [store_path],
                  run_extract)  # fmt: skip

    for seed in pipeline.seeds:
        for name in pipeline.methods:
            if seed in pipeline.method_seeds(name):
                _student_step(steps, pipeline, run_dir, name, seed, data, device, progress)

    write_report(run_dir, pipeline, progress=progress)
    if progress:
        tqdm.write(f"[{pipeline.name}] ran {len(steps.ran)} step(s), {len(steps.skipped)} up to date; "
                   f"report: {run_dir / 'report.md'}")  # fmt: skip
    return run_dir


def _student_step(steps: StepRunner, pipeline: Pipeline, run_dir: Path, name: str, seed: int, data: dict,
                  device: str, progress: bool) -> None:  # fmt: skip
    """The step of method ``name`` at ``seed``: the student trained alone, or distilled from its store."""
    overrides = {k: v for k, v in pipeline.methods[name].items() if k not in ("seeds", "store")}
    out = run_dir / "students" / name / f"seed-{seed}"
    if name == ALONE:
        student = {k: v for k, v in pipeline.student.items() if k in fields_of(TrainConfig)}
        config = TrainConfig(**{**data, **student, **overrides, "seed": seed, "device": device})
        target = out / "student.pt"

        def train_alone(config=config, target=target) -> None:
            _retrying(lambda fresh: train_supervised(config, target, resume=not fresh, overwrite=fresh,
                                                     progress=progress))  # fmt: skip

        steps.run(f"{name}/seed-{seed}", _stamped(config), [], [target], train_alone)
        return
    settings_names = distill_settings()
    student = {k: v for k, v in pipeline.student.items() if k in settings_names and k != "arch"}
    if overrides.get("online"):
        # The online reference runs the pipeline's own teachers in the loop.
        teacher_names = pipeline.teacher_sources()
        overrides = {"teachers": teacher_names, **overrides, "teacher_dir": str(run_dir / "teachers")}
    store_name = pipeline.method_store(name)
    store_step = "extract" if store_name is None else f"extract/{store_name}"
    store_path = pipeline.store_path(run_dir, store_name)
    named = {"method": name, **student, **overrides}
    given = tuple(sorted(key for key in named if key in fillable_settings()))  # never replaced by a preset
    config = DistillConfig(store=str(store_path), student=pipeline.student["arch"], seed=seed, device=device,
                           given=given, **named)  # fmt: skip

    def run_distill(config=config, out=out) -> None:
        _retrying(lambda fresh: distill(config, out, resume=not fresh, overwrite=fresh, progress=progress))

    settings = _transient_out(drop_unset(dataclasses.asdict(config) | {"device": None}))  # as earlier versions
    steps.run(f"{name}/seed-{seed}", settings, [store_step], [out / "student.pt"], run_distill)
