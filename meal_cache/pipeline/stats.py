"""The statistics of a report, free of models and data: summaries over seeds, paired differences against a
baseline method, and what each part of a run does (its diagnostics, from the logged metrics)."""

from __future__ import annotations

import math
import statistics

from scipy import stats

from meal_cache.pipeline.config import ALONE

CURVE_METRICS = ("top1", "nll", "fidelity")
# The method every other distilled student is also paired against, where a pipeline has it.
KD_BASELINE = "kd"
# And against MEAL, where a pipeline has it (AFD's peers are compared with both).
MEAL_BASELINE = "meal"
# For these metrics a lower value is the better one.
LOWER_IS_BETTER = {"nll", "kl", "ece"}


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """Mean paired difference over seeds with a 95% t interval; 'within noise' when it contains zero. One seed has
    no interval and so no verdict: ``ci95`` and ``within_noise`` are None."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "within_noise": None, "n": len(diffs)}
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
