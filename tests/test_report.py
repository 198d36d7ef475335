from __future__ import annotations

from types import SimpleNamespace

import pytest

from meal_cache.report import paired_difference, plot_views_curve, render_views_curve, views_curve


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
