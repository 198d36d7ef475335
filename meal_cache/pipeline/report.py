"""Reports: the results table of a pipeline run (mean and spread over seeds, paired differences against the
student trained alone), ``results.json``, ``report.md`` and PNG plots; for pipelines with named stores, the views
curve (students from stores of V cached views against the online reference with fresh views every epoch)."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from meal_cache.data.datasets import Split, load_dataset, load_recorded
from meal_cache.engine.evaluate import (
    CheckpointResult,
    classification_metrics,
    ensemble_probabilities,
    evaluate_payload,
    expected_calibration_error,
    predict_logits,
)
from meal_cache.errors import UserError
from meal_cache.nets.checkpoint import load_checkpoint
from meal_cache.nets.models import count_parameters
from meal_cache.pipeline.config import ALONE, is_pretrained, load_pipeline
from meal_cache.pipeline.markdown import VIEWS_CURVE_PLOT, render_markdown, render_views_curve
from meal_cache.pipeline.plots import (
    plot_accuracy,
    plot_meal_losses,
    plot_paired_differences,
    plot_store_bytes,
    plot_views_curve,
)
from meal_cache.pipeline.stats import (
    CURVE_METRICS,
    DIAGNOSTICS,
    KD_BASELINE,
    LOWER_IS_BETTER,
    MEAL_BASELINE,
    _comparisons_with,
    _summary,
    paired_difference,
    run_diagnostics,
)
from meal_cache.store.teacher_store import open_store

# The statistics, the plots and report.md live in report_stats, report_plots and report_markdown; their names are
# importable from here too, as before the split.
__all__ = [
    "CURVE_METRICS",
    "DIAGNOSTICS",
    "KD_BASELINE",
    "LOWER_IS_BETTER",
    "MEAL_BASELINE",
    "STUDENT_METRICS",
    "VIEWS_CURVE_PLOT",
    "collect_results",
    "paired_difference",
    "plot_accuracy",
    "plot_meal_losses",
    "plot_paired_differences",
    "plot_store_bytes",
    "plot_views_curve",
    "render_markdown",
    "render_views_curve",
    "run_diagnostics",
    "views_curve",
    "write_report",
]

STUDENT_METRICS = ("top1", "nll", "fidelity", "kl", "ece", "epoch_seconds")


def _ms_per_image(model: torch.nn.Module, images: torch.Tensor, mean, std) -> float:
    """Inference time on this machine's CPU, best of three passes over the images, batches of 256."""
    best = math.inf
    held = Split(images, torch.zeros(len(images), dtype=torch.int64))
    for _ in range(3):
        started = time.perf_counter()
        predict_logits(model, held, mean, std, torch.device("cpu"), batch_size=256)
        best = min(best, time.perf_counter() - started)
    return 1000.0 * best / len(images)


def _store_summary(path: Path) -> dict:
    store = open_store(path)
    sizes = store.sizes()
    return {
        "path": str(path),
        "stored_bytes": sum(v["stored"] for v in sizes.values()),
        "float32_bytes": sum(v["raw_float32"] for v in sizes.values()),
        "views": store.num_views,
        "augmented_views": int(store.attrs["views"]["augmented"]),
        "dense": store.dense,
        "rows": store.n,
        "by_array": sizes,
    }


def views_curve(pipeline, per_method: dict[str, dict[int, dict]], stores: dict[str, dict]) -> dict | None:
    """Per method family: top-1, NLL and fidelity of the students from each named store against its number of
    augmented views V, the family's online fresh-view reference and the student alone, all on the same seeds."""
    points: dict[str, list[tuple[str, str]]] = {}
    references: dict[str, str] = {}
    for name, overrides in pipeline.methods.items():
        if name == ALONE or name not in per_method:
            continue
        family = overrides.get("method", name)
        if overrides.get("online"):
            # Only fresh views are the reference: online on replayed views matches the cache by construction.
            if overrides.get("fresh_views"):
                references.setdefault(family, name)
        elif overrides.get("store") in stores:
            points.setdefault(family, []).append((name, overrides["store"]))
    if not points:
        return None
    members = [m for family in points.values() for m, _ in family]
    members += [references[f] for f in points if f in references]
    members += [ALONE] if ALONE in per_method else []
    # Paired over seeds: every point, reference and baseline on the seeds all of them have.
    seeds = sorted(set.intersection(*(set(per_method[m]) for m in members)))
    curve: dict = {"seeds": seeds, "metrics": list(CURVE_METRICS), "alone": None, "families": {}}
    if not seeds:
        curve["note"] = "no seed is common to every method of the curve, so it cannot be paired"
        return curve

    def summaries(method: str) -> dict:
        return {m: _summary([per_method[method][s][m] for s in seeds]) for m in CURVE_METRICS}

    if ALONE in per_method:
        curve["alone"] = {"method": ALONE, **summaries(ALONE)}
    for family, entries in points.items():
        reference = references.get(family)
        rows = []
        for method, store in entries:
            row = {"method": method, "store": store, "views": stores[store]["augmented_views"],
                   "dense": bool(stores[store].get("dense")), "stored_bytes": stores[store]["stored_bytes"],
                   **summaries(method), "vs_reference": None}  # fmt: skip
            if reference is not None:
                row["vs_reference"] = {
                    m: paired_difference(
                        [per_method[method][s][m] for s in seeds], [per_method[reference][s][m] for s in seeds]
                    )  # fmt: skip
                    for m in CURVE_METRICS
                }
            rows.append(row)
        rows.sort(key=lambda r: (r["dense"], r["views"], r["method"]))  # a dense store's after the views
        curve["families"][family] = {
            "points": rows,
            "reference": None if reference is None else {"method": reference, **summaries(reference)},
        }
    return curve


class _Timer:
    """CPU inference time per architecture, measured once: three timed passes per checkpoint were most of a
    report's time."""

    def __init__(self, images: torch.Tensor, mean, std) -> None:
        self.images, self.mean, self.std = images, mean, std
        self.ms: dict[str, float] = {}

    def __call__(self, arch: str, model: torch.nn.Module) -> float:
        if arch not in self.ms:
            self.ms[arch] = _ms_per_image(model, self.images, self.mean, self.std)
        return self.ms[arch]


def _evaluate_pretrained(source: str, teacher_dir: Path, dataset, device: torch.device) -> CheckpointResult:
    """A pretrained teacher (``ARCH:WEIGHTS``) on the test split, as extract ran it: built by
    :func:`~meal_cache.nets.teachers.resolve_teacher` (``create_model`` with the weights; a class count other than the
    data's is refused), with its weights' own normalisation."""
    from meal_cache.nets.teachers import resolve_teacher

    teacher = resolve_teacher(source, teacher_dir, dataset)
    model = teacher.model.to(device)
    logits = predict_logits(model, dataset.test, teacher.mean, teacher.std, device)
    metrics = classification_metrics(logits, dataset.test.labels)
    metrics["ece"] = expected_calibration_error(logits, dataset.test.labels)
    return CheckpointResult(model, logits, metrics)


def _teacher_rows(teachers: dict[str, tuple[str, CheckpointResult]], test,
                  timer: _Timer) -> tuple[list[dict], torch.Tensor]:  # fmt: skip
    """A row per teacher (``teachers``: name -> (arch, its result on the test split)) and one for their ensemble,
    and the ensemble's probabilities on the test images."""
    rows, teacher_logits = [], []
    for name, (arch, result) in teachers.items():
        teacher_logits.append(result.logits)
        metrics = result.metrics
        rows.append({
            "name": f"teacher {name}", "kind": "teacher", "arch": arch,
            "top1": _summary([metrics["top1"]]), "nll": _summary([metrics["nll"]]), "ece": _summary([metrics["ece"]]),
            "params": count_parameters(result.model), "ms_per_image": timer(arch, result.model),
        })  # fmt: skip
    ensemble = ensemble_probabilities(teacher_logits)
    log_ensemble = ensemble.clamp_min(1e-12).log()
    ensemble_metrics = classification_metrics(log_ensemble, test.labels)
    rows.append({
        "name": "teacher ensemble", "kind": "ensemble", "arch": "+".join(arch for arch, _ in teachers.values()),
        "top1": _summary([ensemble_metrics["top1"]]), "nll": _summary([ensemble_metrics["nll"]]),
        "ece": _summary([expected_calibration_error(log_ensemble, test.labels)]),
        "params": sum(r["params"] for r in rows), "ms_per_image": sum(r["ms_per_image"] for r in rows),
    })  # fmt: skip
    return rows, ensemble


def _student_results(run_dir: Path, pipeline, test, ensemble: torch.Tensor, timer: _Timer) -> dict[str, dict]:
    """Per method and seed: the student checkpoint's metrics on the test split."""
    per_method: dict[str, dict[int, dict]] = {}
    for method in pipeline.methods:
        for seed in pipeline.method_seeds(method):
            path = run_dir / "students" / method / f"seed-{seed}" / "student.pt"
            if not path.is_file():
                raise UserError(f"missing {path}: run the pipeline first (meal-cache run {pipeline.path})")
            per_method.setdefault(method, {})[seed] = _checkpoint_result(path, test, ensemble, timer)
            # AFD's other peers (peer0 is student.pt) as rows of their own, paired over seeds like any method.
            peers = sorted((int(p.stem[4:]), p) for p in path.parent.glob("peer*.pt") if p.stem[4:].isdigit())
            for index, peer in peers:
                if index > 0:
                    row = _checkpoint_result(peer, test, ensemble, timer)
                    row["history"] = []  # the run's history, whose test accuracy is peer 0's
                    per_method.setdefault(f"{method}/{peer.stem}", {})[seed] = row
    return per_method


def _median_epoch_seconds(history: list[dict]) -> float:
    """The median of the epochs' recorded seconds; NaN where none recorded any (a student of your own loop,
    written by save_student, has whatever history you gave it)."""
    seconds = [record["seconds"] for record in history if "seconds" in record]
    return statistics.median(seconds) if seconds else math.nan


def _checkpoint_result(path: Path, test, ensemble: torch.Tensor, timer: _Timer) -> dict:
    """A student checkpoint's metrics on the test split."""
    payload = load_checkpoint(path)
    result = evaluate_payload(payload, test, torch.device("cpu"), ensemble)
    metrics = result.metrics
    return {
        "top1": metrics["top1"], "nll": metrics["nll"], "fidelity": metrics["fidelity"],
        "kl": metrics["kl_to_ensemble"], "ece": metrics["ece"],
        "params": count_parameters(result.model), "arch": payload["arch"],
        "history": payload.get("history", []), "ms_per_image": timer(payload["arch"], result.model),
        "epoch_seconds": _median_epoch_seconds(payload.get("history", [])),
    }  # fmt: skip


def _student_rows(per_method: dict[str, dict]) -> list[dict]:
    rows = []
    for method, by_seed in per_method.items():
        seeds = sorted(by_seed)
        sample = by_seed[seeds[0]]
        rows.append({
            "name": method, "kind": "student", "arch": sample["arch"],
            **{m: _summary([by_seed[s][m] for s in seeds]) for m in STUDENT_METRICS},
            "params": sample["params"], "ms_per_image": sample["ms_per_image"],
        })  # fmt: skip
    return rows


def _label_inspection(dataset, store_path: Path) -> dict | None:
    """Where the data records which train labels were corrupted: how well `inspect`'s suspects find them."""
    if dataset.clean_train_labels is None or open_store(store_path).dataset["split"] != "train":
        return None
    from meal_cache.analysis import DEFAULT_CONFIDENCE, inspect_store, label_noise_scores

    noisy_rows = np.flatnonzero((dataset.train.labels != dataset.clean_train_labels).numpy())
    suspects = [s["row"] for s in inspect_store(store_path, DEFAULT_CONFIDENCE)["suspects"]]
    return {"confidence": DEFAULT_CONFIDENCE, **label_noise_scores(suspects, noisy_rows)}


def collect_results(run_dir: Path, pipeline) -> dict:
    """Evaluate every teacher, the ensemble and every student checkpoint of a pipeline run on the test split."""
    payloads = {t["name"]: load_checkpoint(run_dir / "teachers" / f"{t['name']}.pt")
                for t in pipeline.trained_teachers()}  # fmt: skip
    if payloads:
        # The data as the trained teachers recorded it.
        recorded = next(iter(payloads.values()))["data"]
        dataset = load_recorded(recorded)
    else:
        # Only pretrained teachers: the data as the pipeline gave it to every step.
        dataset = load_dataset(pipeline.data.get("spec", "digits"), pipeline.data.get("root", "data"), False,
                               pipeline.data.get("image_size"))  # fmt: skip
        recorded = {"spec": dataset.spec, "num_classes": dataset.num_classes, "image_size": dataset.image_size,
                    "sizes": {"train": len(dataset.train), "test": len(dataset.test)}}  # fmt: skip
    test = dataset.test
    cpu = torch.device("cpu")
    teachers = {}
    for teacher in pipeline.teachers:
        if is_pretrained(teacher):
            result = _evaluate_pretrained(teacher["arch"], run_dir / "teachers", dataset, cpu)
            teachers[teacher["name"]] = (teacher["arch"], result)
        else:
            payload = payloads[teacher["name"]]
            teachers[teacher["name"]] = (payload["arch"], evaluate_payload(payload, test, cpu))
    # Timed on (at most) 512 test images, decoded once: the networks' time, not the decoder's.
    timer = _Timer(test.sample_pixels(512), dataset.mean, dataset.std)
    rows, ensemble = _teacher_rows(teachers, test, timer)
    per_method = _student_results(run_dir, pipeline, test, ensemble, timer)
    rows += _student_rows(per_method)
    named = {name: _store_summary(pipeline.store_path(run_dir, name)) for name in pipeline.stores}
    # The store the report describes: the main one, or (when no method uses it, so it was never extracted) the
    # named store with the most views.
    if pipeline.uses_main_store():
        main_name, main = None, _store_summary(pipeline.store_path(run_dir))
    else:
        main_name = max(named, key=lambda n: (named[n]["views"], n))
        main = named[main_name]
    return {
        "label_inspection": _label_inspection(dataset, Path(main["path"])),
        "pipeline": pipeline.name,
        "dataset": {k: recorded[k] for k in ("spec", "num_classes", "image_size", "sizes")},
        "seeds": pipeline.seeds,
        "rows": rows,
        "comparisons": _comparisons_with(per_method, ALONE),
        "comparisons_kd": _comparisons_with(per_method, KD_BASELINE),
        "comparisons_pairs": [
            row
            for method, baseline in pipeline.pairs
            for row in _comparisons_with({k: per_method[k] for k in (method, baseline) if k in per_method}, baseline)
        ],
        "comparisons_meal": _comparisons_with(per_method, MEAL_BASELINE),
        "diagnostics": run_diagnostics(per_method),
        "store": {
            "name": main_name,
            "stored_bytes": main["stored_bytes"],
            "float32_bytes": main["float32_bytes"],
            "views": main["views"],
            "rows": main["rows"],
            "by_array": main["by_array"],
        },
        "stores": {name: {k: v for k, v in info.items() if k != "by_array"} for name, info in named.items()},
        "views_curve": views_curve(pipeline, per_method, named),
        "histories": {m: {str(s): d["history"] for s, d in by_seed.items()} for m, by_seed in per_method.items()},
    }


def write_report(run_dir: str | Path, pipeline=None, progress: bool = True) -> Path:
    """Evaluate a pipeline run and write ``results.json``, ``report.md`` and the plots into ``run_dir``."""
    run_dir = Path(run_dir)
    if pipeline is None:
        recorded = run_dir / "pipeline.toml"
        if not recorded.is_file():
            raise UserError(f"'{run_dir}' is not a pipeline run (no pipeline.toml); run `meal-cache run FILE` first")
        pipeline = load_pipeline(recorded)
    results = collect_results(run_dir, pipeline)
    plots = {"Test accuracy per epoch": "accuracy.png"}
    plot_accuracy(results, run_dir / "accuracy.png")
    meal_methods = [m for m, o in pipeline.methods.items() if o.get("method", m) == "meal"]
    if meal_methods and plot_meal_losses(run_dir, meal_methods[0], pipeline.seeds[0], run_dir / "meal_losses.png"):
        plots["MEAL losses, discriminators included"] = "meal_losses.png"
    if len({r["method"] for r in results["comparisons_kd"]}) > 1:
        plot_paired_differences(results["comparisons_kd"], KD_BASELINE, run_dir / "against_kd.png")
        plots[f"Paired top-1 difference to {KD_BASELINE}"] = "against_kd.png"
    plot_store_bytes(results, run_dir / "store_bytes.png")
    plots["Store bytes by teacher and block"] = "store_bytes.png"
    curve = results["views_curve"]
    if curve is not None and curve["seeds"]:
        plot_views_curve(curve, run_dir / "views_curve.png")
        # Shown beside its table rather than with the other plots.
        plots[VIEWS_CURVE_PLOT] = "views_curve.png"
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "report.md").write_text(render_markdown(results, plots) + "\n")
    return run_dir / "report.md"
