"""The public loader for your own training loop (issue 31): it serves distill's pixels and targets in distill's
order, the plain-PyTorch example reproduces `meal-cache distill --method kd`, the timm example trains, and bad
requests are refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from console import ROOT, run_console

from meal_cache import CachedViews, kd_loss
from meal_cache.cli import main
from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig, DistillEpochs, build_run
from meal_cache.engine.distributed import init_world
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.losses import kd_kl
from meal_cache.store import logits_key, open_store

SPEC = "digits?train_fraction=0.1"  # 143 training rows


@pytest.fixture(scope="module")
def small(tmp_path_factory, teacher_dir):
    """3 views of 143 rows, both teachers' logits and last block's pooled channels."""
    path = tmp_path_factory.mktemp("loader") / "feats.zarr"
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=SPEC, views=3, teacher_dir=str(teacher_dir),
                           features=["blocks"], blocks="1", device="cpu")  # fmt: skip
    extract(config, path, progress=False)
    return path


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                            timeout=600, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("crops", [1, 2])
def test_the_loader_serves_distills_pixels_and_targets_in_distills_order(small, crops):
    digits = load_dataset(SPEC)
    config = DistillConfig(store=str(small), student="resnet8_w4", method="kd", epochs=3, batch_size=32, seed=5,
                           crops_per_image=crops, device="cpu", workers=0).resolved(("blocks",))  # fmt: skip
    world, device = init_world("cpu")
    run = build_run(config, world, device, digits, progress=False)
    epochs, store = DistillEpochs(run), open_store(small)
    views = CachedViews(small, batch_size=32, seed=5, epochs=3, crops_per_image=crops, features=("blocks",),
                        device="cpu", workers=0, dataset=digits)  # fmt: skip
    try:
        assert len(views) == run.schedule.steps
        for epoch in (0, 2):
            served = list(views.epoch(epoch))
            distilled = list(epochs.batches(epoch))
            assert len(served) == len(distilled) == len(views)
            for batch, ((rows, targets, _), pixels) in zip(served, distilled, strict=True):
                assert torch.equal(batch["rows"], rows)
                inputs = (pixels / 255 - torch.tensor(digits.mean).view(1, -1, 1, 1)) / torch.tensor(
                    digits.std).view(1, -1, 1, 1)  # fmt: skip
                assert torch.allclose(batch["pixels"], inputs, atol=1e-6)
                assert torch.equal(batch["labels"], run.labels[rows])
                for teacher in ("resnet8_w4", "densenet_k12"):
                    assert torch.equal(batch["logits"][teacher], targets[logits_key(teacher)].float())
                expected_views = torch.tensor(epochs.epoch_views(epoch)).repeat_interleave(len(rows) // crops)
                assert torch.equal(batch["view"], expected_views)
                # The blocks asked for (kd itself reads none): each sample's own view's stored row.
                served_blocks = batch["features"]["resnet8_w4"]["blocks/layer3"]
                for view in expected_views.unique().tolist():
                    chosen = batch["view"] == view
                    stored = torch.from_numpy(store.read("teachers/resnet8_w4/blocks/layer3", view))
                    assert torch.equal(served_blocks[chosen], stored[rows[chosen]])
                mean = (torch.softmax(batch["logits"]["resnet8_w4"] / 4, 1) +
                        torch.softmax(batch["logits"]["densenet_k12"] / 4, 1)) / 2  # fmt: skip
                assert torch.allclose(batch["soft_targets"]["mean"], mean, atol=1e-6)
    finally:
        views.close()
        run.source.close()
        run.images.close()


def test_the_plain_loop_example_reproduces_distill_kd(small, tmp_path):
    distilled = run_console(["distill", "--store", str(small), "--student", "resnet8_w4", "--method", "kd",
                             "--epochs", "2", "--batch-size", "32", "--seed", "3", "--device", "cpu", "--quiet",
                             "--out", str(tmp_path / "kd")], tmp_path)  # fmt: skip
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    run_example("kd_loop.py", str(small), "resnet8_w4", str(tmp_path / "mine.pt"), "2", "32", "3")
    theirs = torch.load(tmp_path / "kd" / "student.pt", weights_only=True)["model"]
    mine = torch.load(tmp_path / "mine.pt", weights_only=True)["model"]
    assert set(mine) == set(theirs)
    # The same pixels, targets, order, initialisation and updates: equal to float32 rounding.
    for name, value in mine.items():
        assert torch.allclose(value.float(), theirs[name].float(), atol=1e-5, rtol=1e-5), name
    # The example writes its student with save_student: `meal-cache evaluate` reads it as it reads distill's.
    for checkpoint in (tmp_path / "mine.pt", tmp_path / "kd" / "student.pt"):  # in process: the command's code
        evaluated = CliRunner().invoke(main, ["evaluate", str(checkpoint), "--device", "cpu", "--quiet"])
        assert evaluated.exit_code == 0, evaluated.output
        assert f"resnet8_w4 on {SPEC} (test, 360 images)" in evaluated.stdout
    mine_top1, theirs_top1 = (json.loads(path.with_suffix(".eval.json").read_text())["metrics"]["top1"]
                              for path in (tmp_path / "mine.pt", tmp_path / "kd" / "student.pt"))  # fmt: skip
    assert mine_top1 == theirs_top1


def _readme_block(heading: str) -> str:
    """The first python code block after ``heading`` in README.md, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


def test_the_readmes_own_loop_snippet_runs_as_written_and_its_student_evaluates(small, tmp_path):
    """README's snippet, unchanged, beside a feats.zarr (here a 143-row store: its 30 epochs take seconds)."""
    (tmp_path / "feats.zarr").symlink_to(small)
    snippet = _readme_block("### Your own training loop")
    assert 'save_student(student, "student.pt"' in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    evaluated = run_console(["evaluate", str(tmp_path / "student.pt"), "--device", "cpu", "--quiet"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"resnet8_w4 on {SPEC} (test, 360 images)" in evaluated.stdout
    payload = torch.load(tmp_path / "student.pt", weights_only=True)
    assert payload["data"]["fingerprint"] == load_dataset(SPEC).describe()["fingerprint"]


def test_save_student_refuses_a_model_of_another_architecture_and_writes_nothing(tmp_path):
    from meal_cache import save_student
    from meal_cache.nets.models import create_model

    dataset = load_dataset(SPEC)
    model = create_model("resnet8_w4", dataset.num_classes, dataset.image_size)
    with pytest.raises(UserError, match="not meal-cache's resnet20 for 10 classes at 16 px"):
        save_student(model, tmp_path / "s.pt", arch="resnet20", dataset=dataset)
    assert not (tmp_path / "s.pt").exists()
    save_student(model, tmp_path / "s.pt", arch="resnet8_w4", dataset=dataset, history=[{"epoch": 1}])
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    assert payload["arch"] == "resnet8_w4" and payload["epoch"] == 1 and payload["classes"] == list(dataset.classes)
    for name, value in model.state_dict().items():
        assert torch.equal(payload["model"][name], value), name


def test_the_timm_example_trains_a_timm_student_with_timms_factories(small, tmp_path):
    result = run_example("timm_student.py", str(small), "resnet10t", str(tmp_path / "timm.pt"), "3")
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 3
    first, last = (float(line.split("top-1 ")[1].rstrip("%")) for line in (epochs[0], epochs[-1]))
    assert last > max(first, 20.0), result.stdout  # it learns (chance is 10 %)
    assert (tmp_path / "timm.pt").is_file()


def test_kd_loss_is_distills_soft_label_loss():
    student, teacher = torch.randn(8, 10), torch.softmax(torch.randn(8, 10), 1)
    assert torch.equal(kd_loss(student, teacher, 4.0), kd_kl(student, teacher, 4.0))


def test_a_request_the_store_cannot_serve_is_refused_by_name(small, tmp_path):
    with pytest.raises(UserError, match="holds no block maps .*--features maps"):
        CachedViews(small, features=("maps",), device="cpu", workers=0)
    with pytest.raises(UserError, match="features takes blocks, maps"):
        CachedViews(small, features=("pixels",), device="cpu", workers=0)
    with pytest.raises(UserError, match="does not match this data: its dataset fingerprint differs"):
        CachedViews(small, data="digits?train_fraction=0.1&fraction_seed=9", device="cpu", workers=0)
    with pytest.raises(UserError, match="crops_per_image 4 needs as many cached views"):
        CachedViews(small, crops_per_image=4, device="cpu", workers=0)


def _softmax64(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64 numpy, written out."""
    wide = logits.double().numpy() / temperature
    wide = np.exp(wide - wide.max(1, keepdims=True))
    return wide / wide.sum(1, keepdims=True)


def test_each_teachers_soft_targets_are_softened_at_the_loaders_temperature(small):
    """At T = 3 (neither 1 nor the default 4): every teacher's soft targets and their mean are softmax(logits / 3)
    of distill's own targets for the same rows, computed here in float64."""
    digits = load_dataset(SPEC)
    config = DistillConfig(store=str(small), student="resnet8_w4", method="kd", epochs=2, batch_size=32, seed=5,
                           temperature=3.0, device="cpu", workers=0).resolved(("blocks",))  # fmt: skip
    world, device = init_world("cpu")
    run = build_run(config, world, device, digits, progress=False)
    views = CachedViews(small, batch_size=32, seed=5, epochs=2, temperature=3.0, device="cpu", workers=0,
                        dataset=digits)  # fmt: skip
    try:
        served, distilled = list(views.epoch(1)), list(DistillEpochs(run).batches(1))
        assert len(served) == len(distilled) > 1
        for batch, ((rows, targets, _), _pixels) in zip(served, distilled, strict=True):
            assert torch.equal(batch["rows"], rows)
            expected = {t: _softmax64(targets[logits_key(t)], 3.0) for t in ("resnet8_w4", "densenet_k12")}
            for teacher, probabilities in expected.items():
                np.testing.assert_allclose(batch["soft_targets"][teacher].numpy(), probabilities, atol=1e-6)
            mean = (expected["resnet8_w4"] + expected["densenet_k12"]) / 2
            np.testing.assert_allclose(batch["soft_targets"]["mean"].numpy(), mean, atol=1e-6)
            # The temperature shows: at T = 1 the targets would be far sharper.
            sharper = _softmax64(targets[logits_key("resnet8_w4")], 1.0)
            assert np.abs(sharper - expected["resnet8_w4"]).max() > 0.05
    finally:
        views.close()
        run.source.close()
        run.images.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, teacher_dir):
    """2 views of 143 rows mixed by Mixup and CutMix (every row, timm's switch), one teacher's logits."""
    path = tmp_path_factory.mktemp("mixed") / "mixed.zarr"
    config = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, views=2, mixup=0.8, cutmix=1.0, preset="kd",
                           teacher_dir=str(teacher_dir), device="cpu")  # fmt: skip
    extract(config, path, progress=False)
    return path


def test_mixed_rows_labels_are_their_own_and_their_partners_shares(mixed):
    """On a mixed store, each row's label is lambda * one-hot(own label) + (1 - lambda) * one-hot(partner's label),
    from the store's raw arrays (zarr alone); the pixels are distill's, the rows in distill's order."""
    digits = load_dataset(SPEC)
    config = DistillConfig(store=str(mixed), student="resnet8_w4", method="kd", epochs=2, batch_size=32, seed=2,
                           device="cpu", workers=0).resolved(())  # fmt: skip
    world, device = init_world("cpu")
    run = build_run(config, world, device, digits, progress=False)
    views = CachedViews(mixed, batch_size=32, seed=2, epochs=2, device="cpu", workers=0, dataset=digits)
    group = zarr.open_group(str(mixed), mode="r")
    labels = np.asarray(group["labels"][:])
    partners, lambdas = np.asarray(group["views/mix_partner"][:]), np.asarray(group["views/mix_lambda"][:])
    try:
        for epoch in (0, 1):
            served, distilled = list(views.epoch(epoch)), list(DistillEpochs(run).batches(epoch))
            assert len(served) == len(distilled) > 1
            for batch, ((rows, _, _), pixels) in zip(served, distilled, strict=True):
                assert torch.equal(batch["rows"], rows)
                inputs = (pixels / 255 - torch.tensor(digits.mean).view(1, -1, 1, 1)) / torch.tensor(
                    digits.std).view(1, -1, 1, 1)  # fmt: skip
                assert torch.allclose(batch["pixels"], inputs, atol=1e-6)
                view, index = epoch % 2, rows.numpy()
                lam = lambdas[view, index].astype(np.float64)[:, None]
                shares = lam * np.eye(10)[labels[index]] + (1 - lam) * np.eye(10)[labels[partners[view, index]]]
                assert batch["labels"].shape == (len(rows), 10)
                np.testing.assert_allclose(batch["labels"].numpy(), shares, atol=1e-6)
        # Mixed for real: most rows keep well under all of their own label, and some partners are of another class.
        assert (lambdas < 0.9).mean() > 0.5 and (labels[partners[0]] != labels).mean() > 0.5
    finally:
        views.close()
        run.source.close()
        run.images.close()


@pytest.fixture(scope="module")
def dense_and_sampled(tmp_path_factory, teacher_dir):
    """A dense store (whole-image maps, any crop's targets derived) and a sampled one (8 draws at T = 4), both of
    one teacher on the 143 rows."""
    root = tmp_path_factory.mktemp("loader-kinds")
    base = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, teacher_dir=str(teacher_dir), features=["blocks"],
                         blocks="1", device="cpu")  # fmt: skip
    extract(dataclasses.replace(base, dense=True), root / "dense.zarr", progress=False)
    extract(dataclasses.replace(base, views=2, logits="sample:8"), root / "sampled.zarr", progress=False)
    return root / "dense.zarr", root / "sampled.zarr"


def test_the_loader_serves_a_dense_stores_crops_as_distill_derives_them(dense_and_sampled):
    """From a dense store every epoch draws fresh crops and derives their targets from the whole image's maps:
    the loader's pixels and logits are distill's, and no sample names a stored view (-1)."""
    dense, _ = dense_and_sampled
    digits = load_dataset(SPEC)
    config = DistillConfig(store=str(dense), student="resnet8_w4", method="kd", epochs=2, batch_size=32, seed=7,
                           device="cpu", workers=0).resolved(("blocks",))  # fmt: skip
    world, device = init_world("cpu")
    run = build_run(config, world, device, digits, progress=False)
    epochs = DistillEpochs(run)
    views = CachedViews(dense, batch_size=32, seed=7, epochs=2, features=("blocks",), device="cpu", workers=0,
                        dataset=digits)  # fmt: skip
    try:
        for epoch in (0, 1):
            served, distilled = list(views.epoch(epoch)), list(epochs.batches(epoch))
            assert len(served) == len(distilled) > 1
            for batch, ((rows, targets, _), pixels) in zip(served, distilled, strict=True):
                assert torch.equal(batch["rows"], rows)
                inputs = (pixels / 255 - torch.tensor(digits.mean).view(1, -1, 1, 1)) / torch.tensor(
                    digits.std).view(1, -1, 1, 1)  # fmt: skip
                assert torch.allclose(batch["pixels"], inputs, atol=1e-6)
                assert torch.equal(batch["logits"]["resnet8_w4"], targets[logits_key("resnet8_w4")].float())
                assert torch.equal(batch["view"], torch.full((len(rows),), -1))
        first, again = next(iter(views.epoch(0)))["pixels"], next(iter(views.epoch(1)))["pixels"]
        assert not torch.allclose(first, again)  # a fresh crop each epoch, not one stored view
    finally:
        views.close()
        run.source.close()
        run.images.close()


def test_a_sampled_store_at_another_temperature_is_refused_by_the_loader(dense_and_sampled):
    _, sampled = dense_and_sampled
    with pytest.raises(UserError, match="holds classes drawn at temperature 4, an estimate of the soft labels at "
                                        "that temperature only; distill with --temperature 4"):  # fmt: skip
        CachedViews(sampled, temperature=2.0, device="cpu", workers=0)
    CachedViews(sampled, temperature=4.0, device="cpu", workers=0).close()
