from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from console import one_error_line, run_console

from meal_cache.engine.evaluate import expected_calibration_error, fidelity, kl_to_ensemble
from meal_cache.errors import UserError
from meal_cache.pipeline.report import paired_difference
from meal_cache.pipeline.run import check_device, load_pipeline, run_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"

TINY = """
name = "tiny"
seeds = [7, 8]
[data]
spec = "digits"
[[teachers]]
name = "resnet"
arch = "resnet8_w4"
epochs = 2
[[teachers]]
name = "dense"
arch = "densenet_k12"
epochs = 1
[store]
views = 2
rows_per_chunk = 512
[student]
arch = "resnet8_w4"
epochs = 1
[methods]
alone = {}
meal = { method = "meal" }
meal-online = { method = "meal", online = true, seeds = [7] }
"""


def test_every_shipped_pipeline_parses_and_resolves_its_names():
    files = sorted(PIPELINES.glob("*.toml"))
    assert any(f.name == "digits.toml" for f in files)
    for file in files:
        pipeline = load_pipeline(file)
        assert pipeline.seeds and pipeline.teachers and pipeline.methods


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The TINY pipeline run once for this module: (its file, the runs root, the run directory)."""
    folder = tmp_path_factory.mktemp("tiny")
    file = folder / "tiny.toml"
    file.write_text(TINY)
    runs = folder / "runs"
    return file, runs, run_pipeline(load_pipeline(file), runs, device="cpu", progress=False)


def test_results_json_equals_an_independent_evaluate_of_each_checkpoint(tiny_run):
    from meal_cache.engine.evaluate import evaluate_checkpoint

    _, _, run_dir = tiny_run
    results = json.loads((run_dir / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    pipeline = load_pipeline(run_dir / "pipeline.toml")
    teachers = [str(run_dir / "teachers" / f"{t['name']}.pt") for t in pipeline.teachers]
    for name, path in zip([t["name"] for t in pipeline.teachers], teachers, strict=True):
        metrics = evaluate_checkpoint(path, device="cpu")["metrics"]
        for metric in ("top1", "nll", "ece"):
            assert rows[f"teacher {name}"][metric]["values"] == pytest.approx([metrics[metric]], rel=1e-6, abs=1e-9)
    for method in pipeline.methods:
        seeds = pipeline.method_seeds(method)
        evaluated = [
            evaluate_checkpoint(str(run_dir / "students" / method / f"seed-{seed}" / "student.pt"), device="cpu",
                                teachers=teachers)["metrics"]
            for seed in seeds
        ]  # fmt: skip
        for metric, key in (("top1", "top1"), ("nll", "nll"), ("fidelity", "fidelity"), ("kl", "kl_to_ensemble"),
                            ("ece", "ece")):  # fmt: skip
            expected = pytest.approx([m[key] for m in evaluated], rel=1e-6, abs=1e-9)
            assert rows[method][metric]["values"] == expected, (method, metric, seeds)


def test_tiny_pipeline_runs_skips_and_reruns_only_what_changed(tiny_run):
    # Changes the run's student epochs at its end: the module's other tests on this run come before it.
    file, runs, run_dir = tiny_run
    assert run_dir == runs / "tiny"
    for name in ("report.md", "results.json", "accuracy.png", "meal_losses.png", "store_bytes.png"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher resnet", "teacher dense", "teacher ensemble", "alone", "meal", "meal-online"]
    assert results["rows"][3]["top1"]["values"] and len(results["rows"][3]["top1"]["values"]) == 2
    assert {(c["method"], c["metric"]) for c in results["comparisons"]} == {
        (m, metric) for m in ("meal", "meal-online") for metric in ("top1", "nll")
    }
    assert not (run_dir / "students" / "meal-online" / "seed-8").exists()
    assert results["rows"][-1]["top1"]["values"] and len(results["rows"][-1]["top1"]["values"]) == 1
    online_config = json.loads((run_dir / "students" / "meal-online" / "seed-7" / "config.json").read_text())
    assert online_config["online"] is True and online_config["teachers"] == ["resnet", "dense"]
    report = (run_dir / "report.md").read_text()
    assert "| meal | resnet8_w4 |" in report and "paired over seeds" in report

    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "steps").iterdir()}
    student = run_dir / "students" / "meal" / "seed-7" / "student.pt"
    before = student.stat().st_mtime_ns
    run_pipeline(load_pipeline(file), runs, device="cpu", progress=False)
    assert student.stat().st_mtime_ns == before
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "steps").iterdir()} == stamps

    # Changing the student's epochs reruns the students, not the teachers or the store.
    file.write_text(
        TINY.replace('arch = "resnet8_w4"\nepochs = 1\n[methods]', 'arch = "resnet8_w4"\nepochs = 2\n[methods]')
    )
    run_pipeline(load_pipeline(file), runs, device="cpu", progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "steps").iterdir()}
    assert after["extract.json"] == stamps["extract.json"]
    assert after["teacher__resnet.json"] == stamps["teacher__resnet.json"]
    assert after["meal__seed-7.json"] != stamps["meal__seed-7.json"]
    assert len(json.loads((run_dir / "results.json").read_text())["histories"]["meal"]["7"]) == 2


# A quarter of the digits training rows keeps the eight students and two stores to seconds.
VIEWS = """
name = "tiny-views"
seeds = [3, 4]
[data]
spec = "digits?train_fraction=0.25"
[[teachers]]
name = "resnet"
arch = "resnet8_w4"
epochs = 1
[store]
identity_view = false
rows_per_chunk = 512
[stores.v1]
views = 1
[stores.v2]
views = 2
[student]
arch = "resnet8_w4"
epochs = 2
[methods]
alone = {}
kd-v1 = { method = "kd", store = "v1" }
kd-v2 = { method = "kd", store = "v2" }
kd-online = { method = "kd", online = true, fresh_views = true, store = "v2" }
"""


def test_views_pipeline_extracts_named_stores_and_draws_the_curve(tmp_path):
    file = tmp_path / "views.toml"
    file.write_text(VIEWS)
    runs = tmp_path / "runs"
    run_dir = run_pipeline(load_pipeline(file), runs, device="cpu", progress=False)
    from meal_cache.store import open_store

    # No method uses the main store, so it is not extracted.
    assert not (run_dir / "feats.zarr").exists()
    for name, views in (("v1", 1), ("v2", 2)):
        attrs = open_store(run_dir / "stores" / f"{name}.zarr").attrs["views"]
        assert (attrs["augmented"], attrs["identity"]) == (views, False)
    for method, store in (("kd-v1", "v1"), ("kd-v2", "v2"), ("kd-online", "v2")):
        for seed in (3, 4):
            config = json.loads((run_dir / "students" / method / f"seed-{seed}" / "config.json").read_text())
            assert config["store"] == str(run_dir / "stores" / f"{store}.zarr")
    online = json.loads((run_dir / "students" / "kd-online" / "seed-3" / "config.json").read_text())
    assert online["online"] is True and online["fresh_views"] is True and online["teachers"] == ["resnet"]
    steps = {p.name for p in (run_dir / "steps").iterdir()}
    assert {"extract__v1.json", "extract__v2.json"} <= steps and "extract.json" not in steps

    results = json.loads((run_dir / "results.json").read_text())
    curve = results["views_curve"]
    assert curve["seeds"] == [3, 4] and list(curve["families"]) == ["kd"]
    kd = curve["families"]["kd"]
    assert [(p["method"], p["store"], p["views"]) for p in kd["points"]] == [("kd-v1", "v1", 1), ("kd-v2", "v2", 2)]
    assert kd["reference"]["method"] == "kd-online" and curve["alone"]["method"] == "alone"
    for point in kd["points"]:
        assert point["stored_bytes"] == results["stores"][point["store"]]["stored_bytes"] > 0
        assert len(point["top1"]["values"]) == 2
        assert set(point["vs_reference"]) == {"top1", "nll", "fidelity"}
        assert point["vs_reference"]["top1"]["n"] == 2
    # The v2 store holds twice the teacher outputs of v1.
    assert kd["points"][1]["stored_bytes"] > 1.5 * kd["points"][0]["stored_bytes"]
    assert results["store"]["name"] == "v2"  # the report describes the largest store when the main one is unused
    assert (run_dir / "views_curve.png").is_file()
    report = (run_dir / "report.md").read_text()
    assert "## Views curve" in report and "![views curve](views_curve.png)" in report
    assert "| kd-v1 | kd | 1 |" in report and "| kd-v2 | kd | 2 |" in report
    assert "| kd-online | kd | fresh | - |" in report

    # A second run changes nothing: every step is up to date.
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "steps").iterdir()}
    student = run_dir / "students" / "kd-v2" / "seed-4" / "student.pt"
    before = student.stat().st_mtime_ns
    run_pipeline(load_pipeline(file), runs, device="cpu", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "steps").iterdir()} == stamps
    assert student.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY.replace('arch = "densenet_k12"', 'arch = "densenet9"'), "unknown architecture 'densenet9'"),
        (TINY.replace('meal = { method = "meal" }', 'meal = { method = "meal3" }'), "unknown method of 'meal'"),
        # A method's settings are checked when the file loads, not after the teachers and the store.
        (
            TINY.replace('meal = { method = "meal" }', 'meal = { method = "meal", adv_game = "jiont" }'),
            "method meal: unknown adversarial game 'jiont'",
        ),
        (
            TINY.replace('meal = { method = "meal" }', 'meal = { method = "meal", temperature = -1.0 }'),
            "method meal: .*temperature",
        ),
        (TINY.replace("views = 2", "viewz = 2"), "unknown setting.*viewz"),
        (TINY.replace('spec = "digits"', 'spec = "mnist"'), "unknown dataset 'mnist'"),
        (TINY.replace("[methods]", "[methods\n"), "not valid TOML"),
        (TINY.replace("seeds = [7] }", "seeds = [9] }"), "seeds .9. are not among"),
        (VIEWS.replace('store = "v2" }\nkd-online', 'store = "v3" }\nkd-online'), "unknown store 'v3'.*v1, v2"),
        (VIEWS.replace('store = "v1" }', "store = 1 }"), "store takes the name of a .stores. table, got 1"),
        (
            TINY.replace('meal = { method = "meal" }', 'meal = { method = "meal", store = "v1" }'),
            "unknown store 'v1'; defined stores: none",
        ),
        (VIEWS.replace("[stores.v2]\nviews = 2", "[stores.v2]\nviewz = 2"), "stores.v2.*unknown setting.*viewz"),
        (VIEWS.replace("alone = {}", 'alone = { store = "v1" }'), "method alone: unknown setting.*store"),
        ('pairs = [["meal", "kd-x"]]\n' + TINY, "pairs names kd-x, not among the methods"),
        ('pairs = [["meal"]]\n' + TINY, "pairs is a list of .method, baseline. name pairs"),
        ('pairs = [["meal", "meal"]]\n' + TINY, "pairs compares meal with itself"),
    ],
)
def test_pipeline_mistakes_are_named(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(UserError, match=message):
        load_pipeline(file)


def test_statistics_on_hand_made_numbers():
    import torch

    # Differences 2, 3, 4: mean 3, sd 1, sem 1/sqrt(3), t(0.975, 2) = 4.3027, half-width 2.484.
    result = paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / 3**0.5
    assert result["mean"] == pytest.approx(3.0)
    assert result["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert result["within_noise"] is False
    # Differences 1, 2, 3: the interval [-0.48, 4.48] holds zero.
    assert paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])["within_noise"] is True
    assert paired_difference([1.0, 2.0], [1.5, 1.5])["within_noise"] is True
    # Two samples, both confidence 0.9 (one bin); one right, one wrong: |0.5 - 0.9| = 40%.
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    assert expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(40.0, abs=1e-4)
    assert fidelity(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]])) == 50.0
    # KL(ensemble || student): student uniform over 2 classes, ensemble [0.75, 0.25]:
    # 0.75 log(0.75 / 0.5) + 0.25 log(0.25 / 0.5).
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_to_ensemble(torch.zeros(1, 2), torch.tensor([[0.75, 0.25]])) == pytest.approx(expected)


def test_a_gpu_pipeline_is_refused_off_cuda_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    file = tmp_path / "big.toml"
    # Its data folder is missing, which only loading the data finds: a run that gets past the device check stops
    # there, cheaply (a setting out of range would be refused when the file is read).
    file.write_text("gpu = true\n" + TINY.replace('spec = "digits"', f'spec = "imagefolder:{tmp_path / "none"}"'))
    pipeline = load_pipeline(file)
    runs = tmp_path / "runs"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, why in (("cpu", "--device cpu"), ("auto", "no CUDA GPU was found")):
        with pytest.raises(UserError, match=f"'tiny' is sized for a GPU.*{why}.*--allow-cpu") as caught:
            run_pipeline(pipeline, runs, device=device, progress=False)
        # 2 teachers (2 and 1 epochs), students of 1 epoch: alone and meal on 2 seeds, meal-online on 1.
        assert "trains 7 networks for 8 epochs in all" in str(caught.value)
        assert not runs.exists()
    check_device(pipeline, "cpu", allow_cpu=True)
    check_device(dataclasses.replace(pipeline, gpu=False), "cpu")
    with pytest.raises(UserError, match="folder does not exist") as caught:
        run_pipeline(pipeline, runs, device="cpu", progress=False, allow_cpu=True)
    assert "GPU" not in str(caught.value)


def test_the_run_command_passes_allow_cpu_through(tmp_path):
    file = tmp_path / "big.toml"
    file.write_text("gpu = true\n" + TINY.replace('spec = "digits"', f'spec = "imagefolder:{tmp_path / "none"}"'))
    command = [sys.executable, "-m", "meal_cache", "run", str(file), "--runs", str(tmp_path / "runs"), "--device",
               "cpu", "--quiet"]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "is sized for a GPU" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "runs").exists()
    allowed = subprocess.run([*command, "--allow-cpu"], capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 2 and "GPU" not in allowed.stderr, allowed.stderr
    assert "folder does not exist" in allowed.stderr, allowed.stderr


def test_the_cifar100_ablation_runs_the_digits_grid_unchanged():
    digits, cifar = (
        load_pipeline(PIPELINES / "digits-ablation.toml"),
        load_pipeline(PIPELINES / "cifar100-ablation.toml"),
    )
    assert cifar.methods == digits.methods and len(digits.methods) >= 15
    assert cifar.gpu and cifar.seeds == digits.seeds and cifar.data["spec"] == "cifar100"


def test_a_method_entrys_settings_count_as_given_and_enter_the_stamp(tmp_path):
    from meal_cache.pipeline.run import _student_step

    file = tmp_path / "p.toml"
    file.write_text(TINY.replace('meal = { method = "meal" }', 'acn = { method = "acn", soft_weight = 1.0 }\n'
                                 'ref = { method = "meal", preset = "reference", adv_weight = 0.1 }'))  # fmt: skip
    pipeline = load_pipeline(file)
    stamps = {}

    class Recorder:
        def run(self, name, settings, _inputs, _outputs, _action):
            stamps[name] = settings

    for name in ("acn", "ref", "meal-online"):
        _student_step(Recorder(), pipeline, tmp_path, name, 7, {}, "cpu", False)
    assert stamps["acn/seed-7"]["given"] == ("soft_weight",)
    # A knob is a method option: the step's own beats the preset's option by option, with no "given" needed.
    ref = stamps["ref/seed-7"]
    assert "given" not in ref and ref["method_options"] == {"adv_weight": 0.1}
    from meal_cache.distill import DistillConfig

    resolved = DistillConfig(**{k: ref[k] for k in ("store", "student", "method", "preset", "method_options")})
    assert resolved.resolved().options.adv_weight == 0.1 and resolved.resolved().options.adv_game == "joint"
    assert "given" not in stamps["meal-online/seed-7"]  # nothing a preset fills in: the stamp of earlier versions


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("epochs = 2\n", 'epochs = "two"\n', "teacher resnet: epochs takes int, got 'two'"),
        ("views = 2\n", 'views = "2"\n', "[store]: views takes int, got '2'"),
        ("[student]\n", '[student]\nlr = "fast"\n', "[student]: lr takes float, got 'fast'"),
        ("[student]\n", "[student]\nhard_weight = [1]\n", "[student]: hard_weight takes float, got [1]"),
        ('meal = { method = "meal" }', 'meal = { method = "meal", teachers = "resnet" }',
         "method meal: teachers takes list[str], got 'resnet'"),
        ('meal = { method = "meal" }', 'meal = { method = "meal", disc_lr = "fast" }',
         "method meal: disc_lr takes float, got 'fast'"),
        ('meal = { method = "meal" }', 'meal = { method = "meal", nesterov = "yes" }',
         "method meal: nesterov takes true or false, got 'yes'"),
    ],
)  # fmt: skip
def test_a_pipeline_value_of_the_wrong_type_is_refused_naming_its_table(old, new, message, tmp_path):
    """Every table's settings are typed as a --config file's are (a string where a number or a list goes), before
    any step; the first case through the console script."""
    file = tmp_path / "p.toml"
    file.write_text(TINY.replace(old, new, 1))
    if old == "epochs = 2\n":
        line = one_error_line(run_console(["run", str(file), "--runs", str(tmp_path / "runs")], tmp_path))
        assert line == f"Error: {file} {message}", line
        assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError) as refused:
        load_pipeline(file)
    assert str(refused.value) == f"{file} {message}"
