from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from meal_cache.analysis import inspect_store, label_noise_scores, suspect_rows
from meal_cache.cli import main
from meal_cache.distill import DistillConfig, distill


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_inspect_matches_numpy_on_the_stored_logits(small_store):
    path, _ = small_store
    result = inspect_store(path, confidence=0.5)
    group = zarr.open_group(str(path), mode="r")
    labels = group["labels"][:]
    a = group["teachers/resnet8_w4/logits"][:].astype(np.float32)
    b = group["teachers/densenet_k12/logits"][:].astype(np.float32)
    acc_a = (a.argmax(2) == labels).mean(1) * 100
    assert result["accuracy_per_view"]["resnet8_w4"] == pytest.approx(acc_a.tolist(), abs=1e-3)
    ensemble = (_softmax(a) + _softmax(b)) / 2
    assert result["accuracy_per_view"]["ensemble"] == pytest.approx(
        ((ensemble.argmax(2) == labels).mean(1) * 100).tolist(), abs=1e-3
    )
    agree = (a.argmax(2) == b.argmax(2)).mean() * 100
    assert result["agreement"][0][1] == pytest.approx(agree, abs=1e-3) and result["agreement"][0][0] == 100
    per_class = [((a.argmax(2) == labels)[:, labels == c].mean() * 100) for c in range(10)]
    assert result["accuracy_per_class"]["resnet8_w4"] == pytest.approx(per_class, abs=1e-2)
    mean_probs = ensemble.mean(0)
    expected = np.flatnonzero((mean_probs.argmax(1) != labels) & (mean_probs.max(1) >= 0.5))
    assert [s["row"] for s in result["suspects"]] == expected.tolist()


def test_noisy_labels_are_found_and_refined(teacher_dir, tmp_path, monkeypatch):
    """Teachers trained on clean digits, a store of digits with 20% of its labels changed: the suspects are the
    changed rows, and distill --refine-labels trains its hard-label loss on the ensemble's labels there."""
    from meal_cache.data.datasets import load_dataset
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    noisy = load_dataset("digits?label_noise=0.2")
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], views=2, teacher_dir=str(teacher_dir), device="cpu")
    store = tmp_path / "noisy.zarr"
    extract(config, store, progress=False, dataset=noisy)
    changed = np.flatnonzero((noisy.train.labels != noisy.clean_train_labels).numpy())
    # The session's teachers had three epochs (about 80% right): only a lower confidence finds rows.
    found = suspect_rows(store, 0.5)
    scores = label_noise_scores(list(found), changed)
    assert scores["noisy"] == round(0.2 * 1437)
    assert scores["precision"] > 90 and scores["recall"] > 15
    truly_changed = [r for r in found if r in set(changed.tolist())]
    assert np.mean([found[r] == int(noisy.clean_train_labels[r]) for r in truly_changed]) > 0.9

    seen = []
    real_cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, target, *args, **kwargs):
        seen.append(target.clone())
        return real_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    run = DistillConfig(store=str(store), student="resnet8_w4", epochs=1, method="kd", hard_weight=0.5,
                        refine_labels=True, refine_confidence=0.5, batch_size=1437, device="cpu")  # fmt: skip
    distill(run, tmp_path / "r", progress=False, dataset=noisy)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_cross_entropy)
    used = seen[0]
    # One batch of every row, in the epoch's shuffled order: compare as multisets of (row label) via sorting rows.
    refined = noisy.train.labels.clone()
    for row, label in found.items():
        refined[row] = label
    assert torch.equal(torch.sort(used).values, torch.sort(refined).values)
    assert not torch.equal(torch.sort(used).values, torch.sort(noisy.train.labels).values)


def test_cli_inspect_writes_csv(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(main, ["inspect", str(path), "--csv", str(out), "--confidence", "0.3"])
    assert result.exit_code == 0, result.output
    assert "teacher agreement" in result.output and "ensemble" in result.output
    rows = list(csv.DictReader(out.open()))
    # digits is in memory: no file column; class names are the digits' own.
    assert all(set(r) == {"row", "label", "label_name", "ensemble", "ensemble_name", "confidence"} for r in rows)
    assert all(r["label_name"] == r["label"] and r["ensemble_name"] == r["ensemble"] for r in rows)
    bad = CliRunner().invoke(main, ["inspect", str(path), "--confidence", "2"])
    assert bad.exit_code == 2 and "--confidence" in bad.stderr


def test_inspect_on_a_local_dask_distributed_cluster(small_store):
    from dask import distributed

    path, _ = small_store
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        remote = inspect_store(path, 0.5, scheduler="distributed", address=c.scheduler_address)
    local = inspect_store(path, 0.5)
    assert remote["accuracy_per_view"] == local["accuracy_per_view"] and remote["suspects"] == local["suspects"]


def _inspection(num_classes: int, names: list[str]) -> dict:
    """describe_inspection's input for two teachers: class c's ensemble top-1 is (c * 37) % 100 (every value
    distinct below 100 classes), the teachers' 1 and 2 above it."""
    ensemble = [float((c * 37) % 100) for c in range(num_classes)]
    return {"store": "s.zarr", "rows": 10, "views": 1, "teachers": ["a-teacher-with-a-long-name", "b"],
            "accuracy_per_view": {"a-teacher-with-a-long-name": [50.0], "b": [40.0], "ensemble": [60.0]},
            "accuracy_per_class": {"a-teacher-with-a-long-name": [v + 1 for v in ensemble],
                                   "b": [v + 2 for v in ensemble], "ensemble": ensemble},
            "classes": names, "agreement": [[100.0, 80.0], [80.0, 100.0]], "confidence": 0.9,
            "suspects": []}  # fmt: skip


def _class_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("top-1 % per class")) + 2
    end = lines.index("", start)
    return [line.split() for line in lines[start:end]]


def test_the_per_class_table_is_a_row_a_class_and_the_hardest_at_many_classes():
    """At 100 classes (digit pairs'), the 12 classes the ensemble gets least right, hardest first, each name whole
    up to 24 characters (then cut with ~), a column a teacher headed by its whole name; at 5 classes every class in
    class order. The hardest are found here by sorting (c * 37) % 100, not by the code under test."""
    from meal_cache.analysis import describe_inspection

    names = [f"class number {c:03d} of the pairs" for c in range(100)]  # 29 characters
    text = describe_inspection(_inspection(100, names))
    assert "top-1 % per class: the 12 of 100 classes the ensemble gets least right (every class: --json PATH)" in text
    hardest = sorted(range(100), key=lambda c: (c * 37) % 100)[:12]
    rows = _class_rows(text)
    assert [" ".join(row[:-3]) for row in rows] == [names[c][:23] + "~" for c in hardest]
    assert [float(row[-1]) for row in rows] == [float((c * 37) % 100) for c in hardest]
    assert [float(row[-3]) - float(row[-1]) for row in rows] == [1.0] * 12  # the long-named teacher's column
    header = text.splitlines()[text.splitlines().index(next(line for line in text.splitlines()
                                                            if line.startswith("top-1 % per class"))) + 1]  # fmt: skip
    assert header.split() == ["a-teacher-with-a-long-name", "b", "ensemble"]
    table = text.splitlines()[text.splitlines().index(header) + 1 :][:12]
    assert all(len(line) == len(header) for line in table)  # each value right-aligned under its teacher's name
    few = _class_rows(describe_inspection(_inspection(5, ["cat", "dog", "emu", "fox", "gnu"])))
    assert [row[0] for row in few] == ["cat", "dog", "emu", "fox", "gnu"]
    assert [float(row[-1]) for row in few] == [0.0, 37.0, 74.0, 11.0, 48.0]
