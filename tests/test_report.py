from __future__ import annotations

from types import SimpleNamespace

import pytest

from meal_cache.pipeline.report import paired_difference, plot_views_curve, render_views_curve, views_curve


def _runs(top1: dict[int, float]) -> dict[int, dict]:
    return {seed: {"top1": value, "nll": 1.0 - value / 100, "fidelity": value + 1} for seed, value in top1.items()}


def test_views_curve_pairs_every_point_with_its_reference_on_common_seeds(tmp_path):
    pipeline = SimpleNamespace(methods={
        "alone": {},
        "meal-a": {"method": "meal", "store": "a"},
        "meal-b": {"method": "meal", "store": "b"},
        "kd-b": {"method": "kd", "store": "b"},
        "meal-online": {"method": "meal", "online": True, "fresh_views": True, "store": "a"},
        # Online on replayed views is not the fresh-view reference, and a main-store method is not on the curve.
        "meal-replayed": {"method": "meal", "online": True, "store": "a"},
        "meal": {},
    })  # fmt: skip
    per_method = {
        "alone": _runs({1: 90.0, 2: 91.0, 3: 92.0}),
        "meal-a": _runs({1: 93.0, 2: 95.0, 3: 97.0}),
        "meal-b": _runs({1: 94.0, 2: 94.0, 3: 94.0}),
        "kd-b": _runs({1: 95.0, 2: 96.0, 3: 97.0}),
        # Seed 3 missing here: the whole curve is paired on seeds 1 and 2.
        "meal-online": _runs({1: 90.0, 2: 92.0}),
        "meal-replayed": _runs({1: 1.0, 2: 1.0, 3: 1.0}),
        "meal": _runs({1: 1.0, 2: 1.0, 3: 1.0}),
    }
    stores = {
        "b": {"augmented_views": 8, "stored_bytes": 8 << 20},
        "a": {"augmented_views": 2, "stored_bytes": 2 << 20},
    }
    curve = views_curve(pipeline, per_method, stores)
    assert curve["seeds"] == [1, 2] and list(curve["families"]) == ["meal", "kd"]
    meal = curve["families"]["meal"]
    assert [(p["method"], p["views"], p["stored_bytes"]) for p in meal["points"]] == [
        ("meal-a", 2, 2 << 20),
        ("meal-b", 8, 8 << 20),
    ]
    assert meal["reference"]["method"] == "meal-online"
    assert meal["reference"]["top1"]["values"] == [90.0, 92.0]
    assert meal["points"][0]["top1"]["mean"] == pytest.approx(94.0)
    assert meal["points"][0]["vs_reference"]["top1"] == paired_difference([93.0, 95.0], [90.0, 92.0])
    assert meal["points"][1]["vs_reference"]["fidelity"]["mean"] == pytest.approx(3.0)
    kd = curve["families"]["kd"]
    assert kd["reference"] is None and kd["points"][0]["vs_reference"] is None
    assert curve["alone"]["top1"]["values"] == [90.0, 91.0]

    lines = "\n".join(render_views_curve(curve, "views_curve.png"))
    assert "| meal-a | meal | 2 | 2.00 | 94.00 ± 1.41 |" in lines
    assert "| meal-online | meal | fresh | - | 91.00 ± 1.41 |" in lines
    assert "| kd-b | kd | 8 | 8.00 |" in lines and "no reference" in lines
    plot_views_curve(curve, tmp_path / "views_curve.png")
    assert (tmp_path / "views_curve.png").stat().st_size > 0


def test_views_curve_needs_named_store_points():
    pipeline = SimpleNamespace(methods={"alone": {}, "meal": {"method": "meal"}})
    assert views_curve(pipeline, {"alone": _runs({1: 90.0}), "meal": _runs({1: 91.0})}, {}) is None
    disjoint = SimpleNamespace(methods={"meal-a": {"method": "meal", "store": "a"}, "alone": {}})
    curve = views_curve(disjoint, {"meal-a": _runs({1: 90.0}), "alone": _runs({2: 91.0})},
                        {"a": {"augmented_views": 1, "stored_bytes": 1}})  # fmt: skip
    assert curve["seeds"] == [] and "cannot be paired" in "\n".join(render_views_curve(curve, None))


def test_methods_are_paired_against_kd_with_wins_and_their_diagnostics_are_tabled(tmp_path):
    from meal_cache.pipeline.report import _comparisons_with, plot_paired_differences, render_markdown, run_diagnostics

    def run(top1: float, nll: float, history: list[dict]) -> dict:
        return {"top1": top1, "nll": nll, "history": history}

    meal_history = [
        {"sim_kl/a": 0.5, "sim_kl/b": 0.25, "disc_acc/a": 0.9, "disc_acc/b": 0.7, "disc_acc/logits": 0.6,
         "grad/soft": 1.0, "teacher_agreement": 0.8},
        {"sim_kl/a": 0.3, "sim_kl/b": 0.1, "disc_acc/a": 1.0, "disc_acc/b": 0.8, "disc_acc/logits": 0.5,
         "teacher_agreement": 0.9, "grad/soft": 3.0, "grad/adv": 0.5},
    ]  # fmt: skip
    per_method = {
        "alone": {1: run(70.0, 1.0, []), 2: run(72.0, 1.1, [])},
        "kd": {1: run(90.0, 0.40, [{"grad/soft": 2.0}]), 2: run(91.0, 0.50, [{"grad/soft": 4.0}])},
        "meal": {1: run(88.0, 0.45, meal_history), 2: run(92.0, 0.40, meal_history)},
    }
    against_kd = {(c["method"], c["metric"]): c for c in _comparisons_with(per_method, "kd")}
    assert set(against_kd) == {("meal", "top1"), ("meal", "nll")}  # neither kd itself nor alone
    top1, nll = against_kd["meal", "top1"], against_kd["meal", "nll"]
    assert top1["mean"] == pytest.approx(-0.5) and top1["wins"] == 1 and top1["n"] == 2
    assert nll["mean"] == pytest.approx(-0.025) and nll["wins"] == 1  # lower NLL wins: seed 2 only
    diagnostics = run_diagnostics(per_method)
    assert "alone" not in diagnostics and diagnostics["kd"] == {"grad_soft": pytest.approx(3.0)}
    meal = diagnostics["meal"]
    assert meal["block_kl"] == pytest.approx(0.4)  # the last epoch's sum over blocks
    assert meal["disc_acc_blocks"] == pytest.approx(0.9) and meal["disc_acc_output"] == pytest.approx(0.5)
    assert meal["grad_soft"] == pytest.approx(2.0) and meal["grad_adv"] == pytest.approx(0.5)  # over the run
    assert meal["teacher_agreement"] == pytest.approx(85.0)
    results = {"pipeline": "t", "dataset": {"spec": "digits", "sizes": {"train": 10, "test": 360}, "image_size": 16},
               "seeds": [1, 2], "rows": [], "comparisons": [], "comparisons_kd": list(against_kd.values()),
               "diagnostics": diagnostics,
               "store": {"stored_bytes": 1, "float32_bytes": 2, "views": 1, "rows": 1}}  # fmt: skip
    report = render_markdown(results, {})
    assert "| meal | -0.50 |" in report and "| 1/2 | within noise |" in report
    # Columns no run logged (hard labels, block similarity here) are left out.
    assert "| kd | - | - | - | 3 | - | - |" in report and "| meal | 0.4 | 0.9 | 0.5 | 2 | 0.5 | 85 |" in report
    plot_paired_differences(results["comparisons_kd"], "kd", tmp_path / "kd.png")
    assert (tmp_path / "kd.png").stat().st_size > 1000
    # A pair the pipeline names: meal against alone, its own table, the baseline named in each row.
    results["comparisons_pairs"] = _comparisons_with({k: per_method[k] for k in ("meal", "alone")}, "alone")
    report = render_markdown(results, {})
    assert "## Pairs the pipeline names" in report
    assert "| meal | alone | +19.00 | [" in report and "| 2/2 | better |" in report


def test_a_dense_stores_students_are_a_row_named_dense_after_the_views_and_a_line_in_the_plot(tmp_path):
    pipeline = SimpleNamespace(methods={
        "kd-dense": {"method": "kd", "store": "d"},
        "kd-v4": {"method": "kd", "store": "v4"},
        "kd-online": {"method": "kd", "online": True, "fresh_views": True, "store": "v4"},
    })  # fmt: skip
    per_method = {name: _runs({1: 95.0, 2: 96.0}) for name in pipeline.methods}
    stores = {"d": {"augmented_views": 0, "dense": True, "stored_bytes": 3 << 20},
              "v4": {"augmented_views": 4, "stored_bytes": 1 << 20}}  # fmt: skip
    curve = views_curve(pipeline, per_method, stores)
    assert [(p["method"], p["dense"]) for p in curve["families"]["kd"]["points"]] == [
        ("kd-v4", False),
        ("kd-dense", True),
    ]
    lines = "\n".join(render_views_curve(curve, "views_curve.png"))
    assert "| kd-dense | kd | dense | 3.00 |" in lines and "| kd-v4 | kd | 4 | 1.00 |" in lines
    plot_views_curve(curve, tmp_path / "views_curve.png")  # no V of 0 on the log axis
    assert (tmp_path / "views_curve.png").stat().st_size > 0
