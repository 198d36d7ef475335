"""Label and teacher analysis over a store, computed with dask so the store is never loaded whole.

:func:`inspect_store` gives each teacher's and the ensemble's accuracy per view and per class, the pairwise
agreement of teachers, and the *suspect labels*: rows where the teachers' ensemble, averaged over every cached
view, confidently predicts another class than the given label. It runs on dask's threaded scheduler, or on a
``dask.distributed`` cluster when given its address.
"""

from __future__ import annotations

import csv
import itertools
import os
from contextlib import nullcontext
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from meal_cache.errors import UserError
from meal_cache.store.keys import LABELS, logits_key
from meal_cache.store.teacher_store import TeacherStore, open_store

DEFAULT_CONFIDENCE = 0.5
SHOWN_SUSPECTS = 10  # listed by describe_inspection; --csv writes them all
SHOWN_CLASSES = 12  # rows of describe_inspection's per-class table; --json holds every class
CLASS_NAME_WIDTH = 24  # a longer class name is cut there in the tables


def row_files(store: TeacherStore) -> list[str] | None:
    """Each row's image file (root joined), where the store was extracted from files that are still there and
    unchanged (the dataset's fingerprint matches); None for data in memory, or files moved or changed."""
    from meal_cache.data.datasets import load_recorded

    recorded = store.dataset
    if recorded.get("kind") != "imagefolder":
        return None
    try:
        dataset = load_recorded(recorded)
        store.check_matches(dataset.describe(), recorded["split"])
    except UserError:
        return None
    split = dataset.split(recorded["split"])
    files = getattr(split, "files", None)
    if files is None:  # ?in_memory=1: decoded up front, no file per row kept
        return None
    return [str(Path(split.root) / os.fsdecode(name)) for name in files]


def _softmax(block: np.ndarray) -> np.ndarray:
    values = block.astype(np.float32)
    values = values - values.max(axis=-1, keepdims=True)
    np.exp(values, out=values)
    return values / values.sum(axis=-1, keepdims=True)


def _scheduler(scheduler: str, address: str | None):
    if scheduler == "threads":
        return nullcontext(), "threads"
    if scheduler == "distributed":
        try:
            from dask.distributed import Client
        except ImportError as err:
            raise UserError("--scheduler distributed needs dask.distributed: pip install 'dask[distributed]'") from err
        client = Client(address) if address else Client(processes=False)
        return client, None
    raise UserError(f"unknown scheduler '{scheduler}'; choose threads or distributed")


def inspect_store(
    path: str | Path,
    confidence: float = DEFAULT_CONFIDENCE,
    scheduler: str = "threads",
    address: str | None = None,
) -> dict:
    """Teacher and ensemble accuracy per view and class, teacher agreement, and suspect labels."""
    if not 0.0 < confidence <= 1.0:
        raise UserError(f"--confidence must be in (0, 1], got {confidence}")
    store = open_store(path)
    if not store.complete:
        raise UserError("store is incomplete (an extract was interrupted); run the same extract again to finish it")
    num_classes = int(store.dataset["num_classes"])
    labels = da.from_zarr(store.array(LABELS))
    onehot = labels[:, None] == da.arange(num_classes)[None, :]
    class_counts = onehot.sum(axis=0)
    teachers = store.teacher_names
    probs = {t: store.dask_array(logits_key(t)).map_blocks(_softmax, dtype=np.float32)
             for t in teachers}  # fmt: skip
    predictions = {t: p.argmax(axis=2) for t, p in probs.items()}
    ensemble = da.stack([probs[t] for t in teachers]).mean(axis=0)  # (V, N, C)
    predictions["ensemble"] = ensemble.argmax(axis=2)
    lazy = {"labels": labels, "class_counts": class_counts}
    for name, predicted in predictions.items():
        correct = predicted == labels[None, :]
        lazy[f"acc_view/{name}"] = correct.mean(axis=1) * 100
        lazy[f"acc_class/{name}"] = (correct.astype(np.float32) @ onehot.astype(np.float32)) / class_counts * 100
    for a, b in itertools.combinations(teachers, 2):
        lazy[f"agree/{a}/{b}"] = (predictions[a] == predictions[b]).mean() * 100
    natural = [v for v in range(store.num_views) if v not in store.divergent_views]
    # The teachers' disagreement per view: Jensen-Shannon at T = 1 (what --divergent-views ascends) and the
    # share of rows on which some two teachers' top-1 differ.
    stacked = da.stack([probs[t] for t in teachers])  # (T, V, N, C)
    log_stacked, log_mean = da.log(da.maximum(stacked, 1e-12)), da.log(da.maximum(ensemble, 1e-12))
    lazy["js_view"] = (stacked * (log_stacked - log_mean[None])).sum(axis=3).mean(axis=0).mean(axis=1)
    firsts = predictions[teachers[0]]
    lazy["split_view"] = da.stack([predictions[t] != firsts for t in teachers]).any(axis=0).mean(axis=1) * 100
    # The ensemble over every natural view (divergent views are made to split the teachers, not to label rows).
    mean_probs = ensemble[natural].mean(axis=0)  # (N, C)
    lazy["ensemble_prediction"] = mean_probs.argmax(axis=1)
    lazy["ensemble_confidence"] = mean_probs.max(axis=1)
    client, name = _scheduler(scheduler, address)
    with client:
        (computed,) = dask.compute(lazy, scheduler=name) if name else dask.compute(lazy)
    labels_np = computed["labels"]
    predicted_np = computed["ensemble_prediction"]
    confidence_np = computed["ensemble_confidence"]
    suspect = (predicted_np != labels_np) & (confidence_np >= confidence)
    classes = [str(c) for c in store.dataset.get("classes") or range(num_classes)]
    agreement = np.eye(len(teachers)) * 100
    for (i, a), (j, b) in itertools.combinations(enumerate(teachers), 2):
        agreement[i, j] = agreement[j, i] = float(computed[f"agree/{a}/{b}"])
    kinds = {"natural": natural, "divergent": store.divergent_views}
    disagreement = {
        kind: {"views": len(views), "js": round(float(computed["js_view"][views].mean()), 6),
               "top1_split_percent": round(float(computed["split_view"][views].mean()), 4)}
        for kind, views in kinds.items() if views
    } if len(teachers) > 1 else {}  # fmt: skip
    return {
        "store": str(path),
        "views": store.num_views,
        "identity_view": store.identity_view,
        "divergent_views": store.divergent_views,
        "disagreement": disagreement,
        "rows": store.n,
        "teachers": teachers,
        "accuracy_per_view": {n: computed[f"acc_view/{n}"].round(4).tolist() for n in predictions},
        "accuracy_per_class": {
            n: np.nan_to_num(computed[f"acc_class/{n}"]).mean(axis=0).round(4).tolist() for n in predictions
        },  # fmt: skip
        "agreement": agreement.round(4).tolist(),
        "confidence": confidence,
        "classes": classes,
        "suspects": _suspects(store, np.flatnonzero(suspect), labels_np, predicted_np, confidence_np, classes),
    }


def _suspects(store: TeacherStore, rows: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
              confidence: np.ndarray, classes: list[str]) -> list[dict]:  # fmt: skip
    """The suspect ``rows``, each with its label and the ensemble's class (and their names), the ensemble's
    confidence, and its image file where the data has files."""
    files = row_files(store) if len(rows) else None
    return [
        {
            "row": int(r),
            **({"file": files[r]} if files is not None else {}),
            "label": int(labels[r]),
            "label_name": classes[int(labels[r])],
            "ensemble": int(predicted[r]),
            "ensemble_name": classes[int(predicted[r])],
            "confidence": round(float(confidence[r]), 4),
        }
        for r in rows
    ]


def suspect_rows(path: str | Path, confidence: float = DEFAULT_CONFIDENCE) -> dict[int, int]:
    """Row -> the ensemble's label, for every suspect row of a store."""
    return {s["row"]: s["ensemble"] for s in inspect_store(path, confidence)["suspects"]}


SUSPECT_FIELDS = ("row", "file", "label", "label_name", "ensemble", "ensemble_name", "confidence")


def write_suspects_csv(result: dict, path: str | Path) -> None:
    """Every suspect label as a CSV row (with its file where the data has files)."""
    present = {key for suspect in result["suspects"] for key in suspect}
    fields = [key for key in SUSPECT_FIELDS if key in present or key != "file"]
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["suspects"])


def label_noise_scores(suspects: list[int], noisy_rows: np.ndarray) -> dict[str, float]:
    """Precision and recall (percent) of the suspect rows against the rows whose labels were changed."""
    flagged = set(suspects)
    truth = set(int(r) for r in noisy_rows)
    hits = len(flagged & truth)
    return {
        "flagged": len(flagged),
        "noisy": len(truth),
        "precision": 100.0 * hits / len(flagged) if flagged else 0.0,
        "recall": 100.0 * hits / len(truth) if truth else 0.0,
    }


def _view_header(result: dict, view: int) -> str:
    """``v3``, ``v3 id`` for the identity view (no augmentation), ``v3 dv`` for a divergent one."""
    if view == result.get("identity_view"):
        return f"v{view} id"
    return f"v{view} dv" if view in result.get("divergent_views", ()) else f"v{view}"


def _view_legend(result: dict) -> str:
    kinds = []
    if result.get("identity_view") is not None:
        kinds.append("id: the identity view, no augmentation")
    if result.get("divergent_views"):
        kinds.append("dv: a divergent view")
    return f" ({'; '.join(kinds)})" if kinds else ""


def _class_lines(per_class: dict[str, list[float]], classes: list[str]) -> list[str]:
    """The per-class table: a row per class and a column per teacher and the ensemble, so it is as wide at a
    thousand classes as at ten; above SHOWN_CLASSES classes, only the ones the ensemble (else the last teacher) gets
    least right, hardest first."""
    names = list(per_class)
    order = list(range(len(classes)))
    title = "top-1 % per class"
    if len(classes) > SHOWN_CLASSES:
        judged_by = "ensemble" if "ensemble" in per_class else names[-1]
        order = sorted(order, key=lambda c: (per_class[judged_by][c], c))[:SHOWN_CLASSES]
        title += (f": the {SHOWN_CLASSES} of {len(classes)} classes the {judged_by} gets least right "
                  "(every class: --json PATH)")  # fmt: skip
    label = min(CLASS_NAME_WIDTH, max(len(classes[c]) for c in order))
    column = max(7, *(len(name) for name in names))
    lines = [title, " " * (label + 3) + " ".join(f"{name:>{column}s}" for name in names)]
    for c in order:
        name = classes[c] if len(classes[c]) <= label else classes[c][: label - 1] + "~"
        lines.append(f"  {name:{label}s} " + " ".join(f"{per_class[n][c]:{column}.2f}" for n in names))
    return lines


def describe_inspection(result: dict) -> str:
    teachers = result["teachers"]
    lines = [f"store {result['store']}: {result['rows']} rows, {result['views']} views", ""]
    width = max(len(n) for n in result["accuracy_per_view"])
    num_classes = len(next(iter(result["accuracy_per_class"].values())))
    classes = result.get("classes") or [f"c{i}" for i in range(num_classes)]
    view_headers = [_view_header(result, view) for view in range(result["views"])]
    lines += ["top-1 % per view" + _view_legend(result), " " * (width + 3) + " ".join(f"{h:>7s}" for h in view_headers)]
    for name, values in result["accuracy_per_view"].items():
        lines.append(f"  {name:{width}s} " + " ".join(f"{v:7.2f}" for v in values))
    lines += ["", *_class_lines(result["accuracy_per_class"], [str(name) for name in classes]), ""]
    # Rows and columns in the same teacher order, each column as wide as the longest name.
    column = max(7, *(len(name) for name in teachers))
    lines += ["teacher agreement % (top-1, over every view and row)",
              " " * (width + 3) + " ".join(f"{name:>{column}s}" for name in teachers)]  # fmt: skip
    for name, row in zip(teachers, result["agreement"], strict=True):
        lines.append(f"  {name:{width}s} " + " ".join(f"{v:{column}.2f}" for v in row))
    if result.get("disagreement"):
        lines += ["", "teacher disagreement (Jensen-Shannon at T=1, nats; % of rows where top-1 differs)"]
        for kind, row in result["disagreement"].items():
            lines.append(f"  {kind:9s} {row['views']:3d} view(s)  JS {row['js']:.4f}  top-1 split "
                         f"{row['top1_split_percent']:.2f} %")  # fmt: skip
    lines += ["", "suspect labels (ensemble over the natural views disagrees with confidence >= "
              f"{result['confidence']}): "
              f"{len(result['suspects'])}"]  # fmt: skip
    for suspect in result["suspects"][:SHOWN_SUSPECTS]:
        where = suspect.get("file", f"row {suspect['row']}")
        lines.append(f"  {where}: labelled {suspect['label_name']}, the teachers say {suspect['ensemble_name']} "
                     f"({100 * suspect['confidence']:.0f} %)")  # fmt: skip
    if len(result["suspects"]) > SHOWN_SUSPECTS:
        lines.append(f"  ... and {len(result['suspects']) - SHOWN_SUSPECTS} more (all of them: --csv PATH)")
    return "\n".join(lines)
