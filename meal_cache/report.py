"""Reports: the results table of a pipeline run (mean and spread over seeds, paired differences against the
student trained alone), ``results.json``, ``report.md`` and PNG plots; for pipelines with named stores, the views
curve (students from stores of V cached views against the online reference with fresh views every epoch)."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from meal_cache.checkpoint import load_checkpoint  # noqa: E402
from meal_cache.data import Split, load_dataset  # noqa: E402
from meal_cache.errors import UserError  # noqa: E402
from meal_cache.evaluate import (  # noqa: E402
    CheckpointResult,
    classification_metrics,
    ensemble_probabilities,
    evaluate_payload,
    expected_calibration_error,
    predict_logits,
)
from meal_cache.models import count_parameters  # noqa: E402
from meal_cache.pipeline_config import ALONE, is_pretrained, load_pipeline  # noqa: E402
from meal_cache.store import open_store  # noqa: E402

STUDENT_METRICS = ("top1", "nll", "fidelity", "kl", "ece", "epoch_seconds")
CURVE_METRICS = ("top1", "nll", "fidelity")
VIEWS_CURVE_PLOT = "Views curve"
# The method every other distilled student is also paired against, where a pipeline has it.
KD_BASELINE = "kd"
# And against MEAL, where a pipeline has it (AFD's peers are compared with both).
MEAL_BASELINE = "meal"
# For these metrics a lower value is the better one.
LOWER_IS_BETTER = {"nll", "kl", "ece"}


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """Mean paired difference over seeds with a 95% t interval; 'within noise' when it contains zero."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "within_noise": True, "n": len(diffs)}
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if sem == 0:
        low = high = mean
    else:
        low, high = stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=sem)
    return {"mean": mean, "ci95": [float(low), float(high)], "within_noise": bool(low <= 0 <= high), "n": len(diffs)}


def _summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


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
                   "stored_bytes": stores[store]["stored_bytes"], **summaries(method),
                   "vs_reference": None}  # fmt: skip
            if reference is not None:
                row["vs_reference"] = {
                    m: paired_difference(
                        [per_method[method][s][m] for s in seeds], [per_method[reference][s][m] for s in seeds]
                    )  # fmt: skip
                    for m in CURVE_METRICS
                }
            rows.append(row)
        rows.sort(key=lambda r: (r["views"], r["method"]))
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
    :func:`~meal_cache.teachers.resolve_teacher` (``create_model`` with the weights; a class count other than the
    data's is refused), with its weights' own normalisation."""
    from meal_cache.teachers import resolve_teacher

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
        "epoch_seconds": statistics.median(h["seconds"] for h in payload["history"])
        if payload.get("history") else math.nan,
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


def _comparisons_with(per_method: dict[str, dict], baseline: str) -> list[dict]:
    """Each other method's paired top-1 and NLL difference to ``baseline``, over the seeds both have, with the
    number of seeds on which it is the better one."""
    if baseline not in per_method:
        return []
    comparisons = []
    base = per_method[baseline]
    for method, by_seed in per_method.items():
        if method in (baseline, ALONE):
            continue
        seeds = sorted(set(by_seed) & set(base))
        if not seeds:  # nothing to pair: the method and the baseline ran on different seeds
            continue
        for metric in ("top1", "nll"):
            values, reference = [by_seed[s][metric] for s in seeds], [base[s][metric] for s in seeds]
            result = paired_difference(values, reference)
            sign = -1 if metric in LOWER_IS_BETTER else 1
            wins = sum(sign * (a - b) > 0 for a, b in zip(values, reference, strict=True))
            comparisons.append({"method": method, "baseline": baseline, "metric": metric, "wins": wins, **result})
    return comparisons


# What each part of a MEAL run does, from its metrics (issue 20): the block KL to the teachers' maps (soft-ce
# less the maps' own entropy), how often the discriminators tell teacher from student, the gradient norm each
# loss family sends into the student, and how often the teachers learnt from agree with the whole ensemble.
DIAGNOSTICS = {
    "block_kl": ("block KL (sum, last epoch)", lambda r: _sum_of(r, "sim_kl/"), "last"),
    "disc_acc_blocks": ("block disc. accuracy (last epoch)", lambda r: _mean_of(r, "disc_acc/", blocks=True), "last"),
    "disc_acc_output": ("output disc. accuracy (last epoch)", lambda r: r.get("disc_acc/logits"), "last"),
    "grad_soft": ("grad soft", lambda r: r.get("grad/soft"), "run"),
    "grad_hard": ("grad hard", lambda r: r.get("grad/hard"), "run"),
    "grad_sim": ("grad similarity", lambda r: r.get("grad/sim"), "run"),
    "grad_adv": ("grad adversarial", lambda r: r.get("grad/adv"), "run"),
    "teacher_agreement": ("teacher agreement with ensemble %", lambda r: _percent(r.get("teacher_agreement")), "run"),
}


def _sum_of(record: dict, prefix: str) -> float | None:
    values = [v for k, v in record.items() if k.startswith(prefix)]
    return sum(values) if values else None


def _mean_of(record: dict, prefix: str, blocks: bool) -> float | None:
    values = [v for k, v in record.items() if k.startswith(prefix) and (k != prefix + "logits") == blocks]
    return statistics.fmean(values) if values else None


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def run_diagnostics(per_method: dict[str, dict]) -> dict[str, dict]:
    """Per method, each diagnostic's mean over seeds: of the last epoch's value, or of the run's mean over the
    epochs that logged it (the gradient norms are logged every few steps). Absent where no run logged it."""
    table: dict[str, dict] = {}
    for method, by_seed in per_method.items():
        row = {}
        for name, (_, read, when) in DIAGNOSTICS.items():
            per_seed = []
            for data in by_seed.values():
                values = [v for v in map(read, data["history"]) if v is not None]
                if values:
                    per_seed.append(values[-1] if when == "last" else statistics.fmean(values))
            if per_seed:
                row[name] = statistics.fmean(per_seed)
        if row:
            table[method] = row
    return table


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
        dataset = load_dataset(recorded["spec"], recorded["options"].get("root", "data"), False,
                               recorded["options"].get("image_size"))  # fmt: skip
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
        "comparisons_pairs": [row for method, baseline in pipeline.pairs
                              for row in _comparisons_with({k: per_method[k] for k in (method, baseline)
                                                            if k in per_method}, baseline)],  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------- plots


def plot_accuracy(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, by_seed in results["histories"].items():
        curves = [[h["test_top1"] for h in history] for history in by_seed.values() if history]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        data = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean = data.mean(0)
        ax.plot(epochs, mean, label=f"{method} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, data.min(0), data.max(0), alpha=0.15)
    for row in results["rows"]:
        if row["kind"] == "ensemble":
            ax.axhline(row["top1"]["mean"], color="black", linestyle="--", linewidth=1, label="teacher ensemble")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Test accuracy per epoch (mean over seeds, band: min-max)")
    low = min(90.0, *(min(h["test_top1"] for h in hs[-3:]) for by in results["histories"].values()
                       for hs in by.values() if hs))  # fmt: skip
    ax.set_ylim(max(0.0, low - 2), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_meal_losses(run_dir: Path, method: str, seed: int, path: Path) -> bool:
    metrics_path = run_dir / "students" / method / f"seed-{seed}" / "metrics.jsonl"
    if not metrics_path.is_file():
        return False
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return False
    epochs = [r["epoch"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = {
        "soft labels": ["soft"],
        "block similarity (sum)": sorted({k for r in records for k in r if k.startswith("sim/")}),
        # soft-ce carries the teacher maps' entropy, which no student lowers: the KL part shows the maps moving.
        "block KL to the teacher (sum, unweighted)": sorted({k for r in records for k in r if k.startswith("sim_kl/")}),
        "student adversarial (sum)": sorted({k for r in records for k in r if k.startswith("adv/")}),
    }
    for label, keys in groups.items():
        if keys:
            left.plot(epochs, [sum(r.get(k, 0.0) for k in keys) for r in records], label=label)
    left.set_title(f"{method} student losses (seed {seed})")
    left.set_xlabel("epoch")
    left.set_yscale("log")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for key in sorted({k for r in records for k in r if k.startswith("disc/")}):
        right.plot(epochs, [r.get(key, math.nan) for r in records], label=key.removeprefix("disc/"))
    right.axhline(math.log(2), color="black", linestyle=":", linewidth=1, label="chance (log 2)")
    right.set_title("discriminator losses (teacher real vs student fake)")
    right.set_xlabel("epoch")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_paired_differences(comparisons: list[dict], baseline: str, path: Path) -> None:
    """Each method's paired top-1 difference to ``baseline`` with its 95% interval, one row a method."""
    rows = [r for r in comparisons if r["metric"] == "top1"]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(rows)))
    for index, row in enumerate(rows):
        low, high = row["ci95"]
        color = "grey" if row["within_noise"] else ("tab:green" if row["mean"] > 0 else "tab:red")
        if math.isfinite(low):
            ax.plot([low, high], [index, index], color=color, linewidth=2)
        ax.plot([row["mean"]], [index], "o", color=color)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), [r["method"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"top-1 difference to {baseline} (points; 95% t interval over seeds)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_store_bytes(results: dict, path: Path) -> None:
    by_array = results["store"]["by_array"]
    teachers = sorted({key.split("/")[1] for key in by_array})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bottoms = np.zeros(len(teachers))
    parts = sorted({key.split("/", 2)[2] for key in by_array}, key=lambda k: (k != "logits", k))
    colours = plt.cm.tab20(np.linspace(0, 1, max(2, len(parts))))
    for colour, part in zip(colours, parts, strict=False):
        heights = np.array([by_array.get(f"teachers/{t}/{part}", {}).get("stored", 0) / 2**20 for t in teachers])
        if heights.any():
            ax.bar(teachers, heights, bottom=bottoms, label=part, color=colour)
            bottoms += heights
    ax.set_ylabel("stored MiB")
    store = results["store"]
    ax.set_title(f"Store: {store['stored_bytes'] / 2**20:.1f} MiB for {store['views']} views x {store['rows']} rows")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_views_curve(curve: dict, path: Path) -> None:
    """Top-1, NLL and fidelity against V (log2 axis); references as horizontal lines with a mean ± sd band."""
    titles = {"top1": "test top-1 (%)", "nll": "test NLL (nats)", "fidelity": "fidelity to the ensemble (%)"}
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(15, 4.4))
    colours = plt.cm.tab10(np.arange(10))
    ticks: dict[int, float] = {}
    families = len(curve["families"])
    for index, (family, data) in enumerate(curve["families"].items()):
        colour = colours[index % 10]
        for point in data["points"]:
            ticks.setdefault(point["views"], point["stored_bytes"] / 2**20)
        # Families side by side around each V, so their error bars do not hide each other.
        shift = 2 ** (0.06 * (index - (families - 1) / 2))
        for ax, metric in zip(axes, CURVE_METRICS, strict=True):
            if data["points"]:
                ax.errorbar([p["views"] * shift for p in data["points"]], [p[metric]["mean"] for p in data["points"]],
                            yerr=[p[metric]["std"] for p in data["points"]], color=colour, marker="o", capsize=3,
                            label=f"{family}, cached views")  # fmt: skip
            reference = data["reference"]
            if reference is not None:
                mean, std = reference[metric]["mean"], reference[metric]["std"]
                ax.axhline(mean, color=colour, linestyle="--", linewidth=1,
                           label=f"{reference['method']} (fresh views)")  # fmt: skip
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
    alone = curve.get("alone")
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        if alone is not None:
            mean, std = alone[metric]["mean"], alone[metric]["std"]
            ax.axhline(mean, color="grey", linestyle=":", linewidth=1.2, label="alone (labels only)")
            ax.axhspan(mean - std, mean + std, color="grey", alpha=0.08, linewidth=0)
        ax.set_xscale("log", base=2)
        views = sorted(ticks)
        ax.set_xticks(views, [f"{v}\n{ticks[v]:.1f} MiB" for v in views])
        ax.minorticks_off()
        if len(views) == 1:
            ax.set_xlim(views[0] / 2, views[0] * 2)
        ax.set_xlabel("cached augmented views V (store size)")
        ax.set_title(titles[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Cached views against fresh augmentation every epoch (mean ± sd over seeds {curve['seeds']})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- report


def _fmt(summary: dict, digits: int = 2) -> str:
    if len(summary["values"]) > 1:
        return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}"


def _verdict(metric: str, difference: dict) -> str:
    if difference["within_noise"]:
        return "within noise"
    better = difference["mean"] < 0 if metric in LOWER_IS_BETTER else difference["mean"] > 0
    return "better" if better else "worse"


def _difference_text(metric: str, difference: dict, digits: int) -> str:
    low, high = difference["ci95"]
    if difference["n"] < 2:
        return f"{difference['mean']:+.{digits}f} (one seed: no interval)"
    return (f"{difference['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] "
            f"{_verdict(metric, difference)}")  # fmt: skip


def render_views_curve(curve: dict, plot: str | None) -> list[str]:
    """The views-curve section of report.md: one row per family and V, then the references."""
    lines = ["## Views curve: cached views against fresh augmentation every epoch", ""]
    if not curve["seeds"]:
        return lines + [f"Not drawn: {curve['note']}.", ""]
    lines += [
        f"Students distilled from stores of V cached augmented views (epoch e replays view e mod V) against the "
        f"online reference of the same method, which runs the teachers on a fresh augmentation of every image "
        f"every epoch. Mean ± sd over seeds {curve['seeds']}, the same seeds for every row; differences to the "
        f"online reference are paired over those seeds (95% t interval).",
        "",
        "| method | family | V | store MiB | top-1 % | NLL | fidelity % | top-1 - online [95% CI] "
        "| NLL - online [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(row: dict) -> str:
        return f"{_fmt(row['top1'])} | {_fmt(row['nll'], 4)} | {_fmt(row['fidelity'])}"

    for family, data in curve["families"].items():
        for point in data["points"]:
            diff = point["vs_reference"]
            top1 = _difference_text("top1", diff["top1"], 2) if diff else "no reference"
            nll = _difference_text("nll", diff["nll"], 4) if diff else "no reference"
            lines.append(f"| {point['method']} | {family} | {point['views']} | {point['stored_bytes'] / 2**20:.2f} | "
                         f"{cells(point)} | {top1} | {nll} |")  # fmt: skip
        if data["reference"] is not None:
            lines.append(f"| {data['reference']['method']} | {family} | fresh | - | {cells(data['reference'])} | "
                         f"reference | reference |")  # fmt: skip
    if curve["alone"] is not None:
        lines.append(f"| alone | - | - | - | {cells(curve['alone'])} | - | - |")
    lines.append("")
    if plot:
        lines += [f"![views curve]({plot})", ""]
    return lines


def render_markdown(results: dict, plots: dict[str, str]) -> str:
    store = results["store"]
    lines = [
        f"# meal-cache report: {results['pipeline']}",
        "",
        f"Dataset `{results['dataset']['spec']}` ({results['dataset']['sizes']['train']} train, "
        f"{results['dataset']['sizes']['test']} test images, {results['dataset']['image_size']} px). Students: mean ± "
        f"standard deviation over seeds {results['seeds']}. One test image is "
        f"{100 / results['dataset']['sizes']['test']:.2f} points of top-1.",
        "",
        "| model | arch | top-1 % | NLL | fidelity % | KL to ensemble | ECE % | params | ms / image (CPU) "
        "| s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        fidelity_text = _fmt(row["fidelity"]) if "fidelity" in row else "-"
        kl_text = _fmt(row["kl"], 4) if "kl" in row else "-"
        epoch_text = f"{row['epoch_seconds']['mean']:.2f}" if "epoch_seconds" in row else "-"
        lines.append(
            f"| {row['name']} | {row['arch']} | {_fmt(row['top1'])} | {_fmt(row['nll'], 4)} | {fidelity_text} | "
            f"{kl_text} | {_fmt(row['ece'])} | {row['params']:,} | {row['ms_per_image']:.3f} | {epoch_text} |"
        )
    store_label = "Store" if store.get("name") is None else f"Store `{store['name']}`"
    lines += [
        "",
        f"{store_label}: {store['stored_bytes'] / 2**20:.1f} MiB "
        f"({store['float32_bytes'] / max(1, store['stored_bytes']):.1f}x "
        f"smaller than float32), {store['views']} views x {store['rows']} rows, "
        f"{store['stored_bytes'] / max(1, store['views'] * store['rows']):.0f} bytes per sample per view.",
        "",
    ]
    inspection = results.get("label_inspection")
    if inspection:
        lines += [
            f"Label inspection (`meal-cache inspect`, ensemble confidence >= {inspection['confidence']}): "
            f"{inspection['flagged']} rows flagged of {inspection['noisy']} with changed labels; precision "
            f"{inspection['precision']:.1f} %, recall {inspection['recall']:.1f} %.",
            "",
        ]
    if results["comparisons"]:
        lines += [
            "## Against the student trained alone (paired over seeds, 95% t interval)",
            "",
            "| method | metric | mean difference | 95% interval | verdict |",
            "|---|---|---|---|---|",
        ]
        for row in results["comparisons"]:
            verdict = _verdict(row["metric"], row)
            low, high = row["ci95"]
            lines.append(f"| {row['method']} | {row['metric']} | {row['mean']:+.3f} | [{low:+.3f}, {high:+.3f}] | "
                         f"{verdict} |")  # fmt: skip
        lines.append("")
    for baseline, key in ((KD_BASELINE, "comparisons_kd"), (MEAL_BASELINE, "comparisons_meal")):
        if not results.get(key):
            continue
        lines += [
            f"## Against `{baseline}` (paired over seeds, 95% t interval)",
            "",
            "| method | top-1 difference | 95% interval | wins | verdict | NLL difference | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        by_metric = {(r["method"], r["metric"]): r for r in results[key]}
        for method in dict.fromkeys(r["method"] for r in results[key]):
            top1, nll = by_metric[method, "top1"], by_metric[method, "nll"]
            low, high = top1["ci95"]
            lines.append(f"| {method} | {top1['mean']:+.2f} | [{low:+.2f}, {high:+.2f}] | {top1['wins']}/{top1['n']} | "
                         f"{_verdict('top1', top1)} | {nll['mean']:+.4f} | {_verdict('nll', nll)} |")  # fmt: skip
        lines.append("")
    if results.get("comparisons_pairs"):
        lines += [
            "## Pairs the pipeline names (paired over seeds, 95% t interval)",
            "",
            "| method | against | top-1 difference | 95% interval | wins | verdict | NLL difference | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = results["comparisons_pairs"]
        for top1, nll in zip(rows[::2], rows[1::2], strict=True):
            low, high = top1["ci95"]
            lines.append(f"| {top1['method']} | {top1['baseline']} | {top1['mean']:+.2f} | [{low:+.2f}, {high:+.2f}] "
                         f"| {top1['wins']}/{top1['n']} | {_verdict('top1', top1)} | {nll['mean']:+.4f} | "
                         f"{_verdict('nll', nll)} |")  # fmt: skip
        lines.append("")
    if results.get("diagnostics"):
        shown = [n for n in DIAGNOSTICS if any(n in row for row in results["diagnostics"].values())]
        lines += [
            "## What each part does (mean over seeds; gradient norms into the student, over the run)",
            "",
            "| method | " + " | ".join(DIAGNOSTICS[n][0] for n in shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for method, row in results["diagnostics"].items():
            cells = [f"{row[n]:.3g}" if n in row else "-" for n in shown]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("views_curve") is not None:
        lines += render_views_curve(results["views_curve"], plots.get(VIEWS_CURVE_PLOT))
    for title, file in plots.items():
        if title == VIEWS_CURVE_PLOT:
            continue
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)


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
