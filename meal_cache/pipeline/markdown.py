"""``report.md``: the results table, the paired comparisons, the diagnostics and the views curve of a pipeline
run's results, one helper per section."""

from __future__ import annotations

import math

from meal_cache.pipeline.stats import DIAGNOSTICS, KD_BASELINE, LOWER_IS_BETTER, MEAL_BASELINE

# Its plot is shown beside its table rather than with the other plots.
VIEWS_CURVE_PLOT = "Views curve"
# A paired difference over one seed has no interval, so no verdict either (report_stats.paired_difference).
NO_INTERVAL = "1 seed: no interval"
NO_VERDICT = "-"


def _fmt(summary: dict, digits: int = 2) -> str:
    if len(summary["values"]) > 1:
        return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}"


def _verdict(metric: str, difference: dict) -> str:
    if difference["within_noise"] is None:
        return NO_VERDICT
    if difference["within_noise"]:
        return "within noise"
    better = difference["mean"] < 0 if metric in LOWER_IS_BETTER else difference["mean"] > 0
    return "better" if better else "worse"


def _interval(difference: dict, digits: int) -> str:
    if difference["ci95"] is None:
        return NO_INTERVAL
    low, high = difference["ci95"]
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _difference_text(metric: str, difference: dict, digits: int) -> str:
    if difference["ci95"] is None:
        return f"{difference['mean']:+.{digits}f} ({NO_INTERVAL})"
    return f"{difference['mean']:+.{digits}f} {_interval(difference, digits)} {_verdict(metric, difference)}"


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
            views = "dense" if point.get("dense") else point["views"]
            lines.append(f"| {point['method']} | {family} | {views} | {point['stored_bytes'] / 2**20:.2f} | "
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


def _results_table(results: dict) -> list[str]:
    """The title, the dataset, and a row per teacher, the ensemble and each student method."""
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
        seconds = row.get("epoch_seconds", {}).get("mean", math.nan)  # NaN: no epoch recorded its seconds
        epoch_text = f"{seconds:.2f}" if math.isfinite(seconds) else "-"
        lines.append(
            f"| {row['name']} | {row['arch']} | {_fmt(row['top1'])} | {_fmt(row['nll'], 4)} | {fidelity_text} | "
            f"{kl_text} | {_fmt(row['ece'])} | {row['params']:,} | {row['ms_per_image']:.3f} | {epoch_text} |"
        )
    return lines


def _store_lines(store: dict) -> list[str]:
    """The store's size, against float32 and per sample."""
    store_label = "Store" if store.get("name") is None else f"Store `{store['name']}`"
    return [
        "",
        f"{store_label}: {store['stored_bytes'] / 2**20:.1f} MiB "
        f"({store['float32_bytes'] / max(1, store['stored_bytes']):.1f}x "
        f"smaller than float32), {store['views']} views x {store['rows']} rows, "
        f"{store['stored_bytes'] / max(1, store['views'] * store['rows']):.0f} bytes per sample per view.",
        "",
    ]


def _inspection_lines(inspection: dict | None) -> list[str]:
    """How well `inspect`'s suspects find the corrupted labels, where the data records them."""
    if not inspection:
        return []
    return [
        f"Label inspection (`meal-cache inspect`, ensemble confidence >= {inspection['confidence']}): "
        f"{inspection['flagged']} rows flagged of {inspection['noisy']} with changed labels; precision "
        f"{inspection['precision']:.1f} %, recall {inspection['recall']:.1f} %.",
        "",
    ]


def _alone_section(comparisons: list[dict]) -> list[str]:
    """Each method against the student trained alone, a row per metric."""
    if not comparisons:
        return []
    lines = [
        "## Against the student trained alone (paired over seeds, 95% t interval)",
        "",
        "| method | metric | mean difference | 95% interval | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in comparisons:
        lines.append(f"| {row['method']} | {row['metric']} | {row['mean']:+.3f} | {_interval(row, 3)} | "
                     f"{_verdict(row['metric'], row)} |")  # fmt: skip
    lines.append("")
    return lines


def _baseline_section(baseline: str, comparisons: list[dict] | None) -> list[str]:
    """Each method against ``baseline`` (kd, meal), a row per method with its top-1 wins and its NLL."""
    if not comparisons:
        return []
    lines = [
        f"## Against `{baseline}` (paired over seeds, 95% t interval)",
        "",
        "| method | top-1 difference | 95% interval | wins | verdict | NLL difference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    by_metric = {(r["method"], r["metric"]): r for r in comparisons}
    for method in dict.fromkeys(r["method"] for r in comparisons):
        top1, nll = by_metric[method, "top1"], by_metric[method, "nll"]
        lines.append(f"| {method} | {top1['mean']:+.2f} | {_interval(top1, 2)} | {top1['wins']}/{top1['n']} | "
                     f"{_verdict('top1', top1)} | {nll['mean']:+.4f} | {_verdict('nll', nll)} |")  # fmt: skip
    lines.append("")
    return lines


def _pairs_section(rows: list[dict] | None) -> list[str]:
    """The pairs the pipeline names, each against its own baseline."""
    if not rows:
        return []
    lines = [
        "## Pairs the pipeline names (paired over seeds, 95% t interval)",
        "",
        "| method | against | top-1 difference | 95% interval | wins | verdict | NLL difference | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for top1, nll in zip(rows[::2], rows[1::2], strict=True):
        lines.append(f"| {top1['method']} | {top1['baseline']} | {top1['mean']:+.2f} | {_interval(top1, 2)} "
                     f"| {top1['wins']}/{top1['n']} | {_verdict('top1', top1)} | {nll['mean']:+.4f} | "
                     f"{_verdict('nll', nll)} |")  # fmt: skip
    lines.append("")
    return lines


def _diagnostics_section(diagnostics: dict[str, dict] | None) -> list[str]:
    """The diagnostics some run logged, a row per method; columns no run logged are left out."""
    if not diagnostics:
        return []
    shown = [n for n in DIAGNOSTICS if any(n in row for row in diagnostics.values())]
    lines = [
        "## What each part does (mean over seeds; gradient norms into the student, over the run)",
        "",
        "| method | " + " | ".join(DIAGNOSTICS[n][0] for n in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for method, row in diagnostics.items():
        cells = [f"{row[n]:.3g}" if n in row else "-" for n in shown]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _plot_sections(plots: dict[str, str]) -> list[str]:
    """A section per plot, but the views curve's, which its own section shows."""
    lines = []
    for title, file in plots.items():
        if title == VIEWS_CURVE_PLOT:
            continue
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return lines


def render_markdown(results: dict, plots: dict[str, str]) -> str:
    """``report.md`` of a results dict (:func:`~meal_cache.pipeline.report.collect_results`); ``plots``: title ->
    file."""
    lines = _results_table(results)
    lines += _store_lines(results["store"])
    lines += _inspection_lines(results.get("label_inspection"))
    lines += _alone_section(results["comparisons"])
    for baseline, key in ((KD_BASELINE, "comparisons_kd"), (MEAL_BASELINE, "comparisons_meal")):
        lines += _baseline_section(baseline, results.get(key))
    lines += _pairs_section(results.get("comparisons_pairs"))
    lines += _diagnostics_section(results.get("diagnostics"))
    if results.get("views_curve") is not None:
        lines += render_views_curve(results["views_curve"], plots.get(VIEWS_CURVE_PLOT))
    lines += _plot_sections(plots)
    return "\n".join(lines)
