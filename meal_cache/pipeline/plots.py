"""The PNG plots of a pipeline run's report: accuracy per epoch, MEAL's losses, paired differences, store bytes
and the views curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from meal_cache.pipeline.stats import CURVE_METRICS  # noqa: E402
from meal_cache.store.keys import LOGITS, split_teacher_key, teacher_key  # noqa: E402

# tab20's ten dark hues, then their ten light ones: neighbouring bars of a store of up to ten arrays differ in
# hue, and a light shade comes only after every dark one (tab20 sampled evenly mixed pairs of one hue).
_DISTINCT_COLOURS = [plt.cm.tab20(index) for index in (*range(0, 20, 2), *range(1, 20, 2))]


def distinct_colours(count: int) -> list[tuple[float, float, float, float]]:
    """``count`` colours, all different up to 20 (then repeating)."""
    return [_DISTINCT_COLOURS[index % len(_DISTINCT_COLOURS)] for index in range(count)]


def discriminator_labels(keys: list[str], blocks: dict[str, list[str]]) -> dict[str, str]:
    """Legend labels for MEAL's discriminator keys: ``TEACHER__R``, the discriminator of the teacher's block R from
    the end (meal's :class:`BlockPair`), as ``TEACHER BLOCK`` from ``blocks`` (each teacher's stored block names,
    in order); ``logits`` and a key of a teacher or rank not in ``blocks`` stay as they are."""
    by_key = {teacher.replace(".", "_"): names for teacher, names in blocks.items()}
    labels = {}
    for key in keys:
        teacher, sep, rank = key.rpartition("__")
        names = by_key.get(teacher, [])
        known = sep and rank.isdigit() and int(rank) < len(names)
        labels[key] = f"{teacher} {names[-1 - int(rank)]}" if known else key
    return labels


def _stored_blocks(run_config: Path) -> dict[str, list[str]]:
    """Each teacher's block names in the store a run was distilled from (none where it cannot be read)."""
    from meal_cache.errors import UserError
    from meal_cache.store.teacher_store import open_store

    try:
        store = open_store(json.loads(run_config.read_text())["store"])
    except (OSError, KeyError, ValueError, UserError):  # UserError is a ValueError; named for the reader
        return {}
    return {teacher: [block.key for block in store.blocks(teacher)] for teacher in store.teacher_names}


def _tested(history: list[dict]) -> list[dict]:
    """The epochs of a history that were evaluated on the test split (a run evaluating every few epochs logs the
    others without test metrics)."""
    return [record for record in history if "test_top1" in record]


def plot_accuracy(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, by_seed in results["histories"].items():
        tested = [_tested(history) for history in by_seed.values() if _tested(history)]
        if not tested:
            continue
        length = min(len(records) for records in tested)
        data = np.array([[r["test_top1"] for r in records[:length]] for records in tested])
        # Epochs as recorded (from 1), or counted where a record lacks its number.
        epochs = np.array([r.get("epoch", i + 1) for i, r in enumerate(tested[0][:length])])
        ax.plot(epochs, data.mean(0), label=f"{method} (n={len(tested)})")
        if len(tested) > 1:
            ax.fill_between(epochs, data.min(0), data.max(0), alpha=0.15)
    for row in results["rows"]:
        if row["kind"] == "ensemble":
            ax.axhline(row["top1"]["mean"], color="black", linestyle="--", linewidth=1, label="teacher ensemble")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Test accuracy per epoch (mean over seeds, band: min-max)")
    low = min(90.0, *(min(h["test_top1"] for h in _tested(hs)[-3:]) for by in results["histories"].values()
                       for hs in by.values() if _tested(hs)))  # fmt: skip
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
        # kl and soft-ce log as soft, a sampled store's kl as soft_ce, DKD's parts as soft/tckd and soft/nckd.
        "soft labels": sorted({k for r in records for k in r if k in ("soft", "soft_ce") or k.startswith("soft/")}),
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
    keys = sorted({k for r in records for k in r if k.startswith("disc/")})
    labels = discriminator_labels([k.removeprefix("disc/") for k in keys], _stored_blocks(metrics_path.parent /
                                                                                          "config.json"))  # fmt: skip
    for key in keys:
        right.plot(epochs, [r.get(key, math.nan) for r in records], label=labels[key.removeprefix("disc/")])
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
        # Grey: within noise, or one seed (no interval, no verdict).
        color = "grey" if row["within_noise"] is not False else ("tab:green" if row["mean"] > 0 else "tab:red")
        if row["ci95"] is not None:
            ax.plot(row["ci95"], [index, index], color=color, linewidth=2)
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
    teachers = sorted({split_teacher_key(key)[0] for key in by_array})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bottoms = np.zeros(len(teachers))
    parts = sorted({split_teacher_key(key)[1] for key in by_array}, key=lambda k: (k != LOGITS, k))
    for colour, part in zip(distinct_colours(len(parts)), parts, strict=True):
        heights = np.array([by_array.get(teacher_key(t, part), {}).get("stored", 0) / 2**20 for t in teachers])
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
        # A dense store has no V: its students are a horizontal line, as the references are.
        cached = [p for p in data["points"] if not p.get("dense")]
        for point in cached:
            ticks.setdefault(point["views"], point["stored_bytes"] / 2**20)
        # Families side by side around each V, so their error bars do not hide each other.
        shift = 2 ** (0.06 * (index - (families - 1) / 2))
        for ax, metric in zip(axes, CURVE_METRICS, strict=True):
            if cached:
                ax.errorbar([p["views"] * shift for p in cached], [p[metric]["mean"] for p in cached],
                            yerr=[p[metric]["std"] for p in cached], color=colour, marker="o", capsize=3,
                            label=f"{family}, cached views")  # fmt: skip
            for point in data["points"]:
                if point.get("dense"):
                    ax.axhline(
                        point[metric]["mean"],
                        color=colour,
                        linestyle="-.",
                        linewidth=1.2,
                        label=f"{point['method']} (dense store, {point['stored_bytes'] / 2**20:.1f} MiB)",
                    )
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
