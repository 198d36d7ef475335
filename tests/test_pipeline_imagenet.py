"""pipelines/imagenet.toml end to end, offline, on a generated 1000-class image folder.

The recipe's own teachers (torchvision's resnet50 and densenet121 with ImageNet weights) predict 1000 classes and
resolve_teacher refuses any other count, so the folder has 1000 class folders of one small JPEG each in train/
(``?train_fraction`` keeps 20 of those rows, so the teachers run over 20 images per view) and 10 in val/. The
"pretrained" weights are random, BN-calibrated state dicts saved in a temporary torch hub cache under the
weights' file names, where torchvision loads them without a download (and without checking their hash); any
download attempt fails the test. The recipe runs with its own settings except those that make it fit a 2-core CPU:
1 epoch, 72 px images (above the 64 px small-input stem, which would multiply the teachers' cost by 16), one view.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
from imagefolder import make_image_folder

from meal_cache.errors import UserError
from meal_cache.pipeline.run import load_pipeline, run_pipeline

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "imagenet.toml"
IMAGE_SIZE = 72
TRAIN_ROWS = 20
VAL_IMAGES = 10


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def to_toml(raw: dict) -> str:
    """TOML text of a parsed pipeline file (top-level values, tables, arrays of tables, inline tables)."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in raw.items() if not isinstance(v, dict | list)
             or (isinstance(v, list) and not all(isinstance(x, dict) for x in v))]  # fmt: skip
    for key, value in raw.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for entry in value:
                lines += [f"[[{key}]]", *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entry.items())]
    return "\n".join(lines) + "\n"


def _fake_pretrained_weights(torch_home: Path, names: list[str]) -> None:
    """A random state dict of each ARCH:WEIGHTS under the file name torchvision loads it from. Its BN statistics
    come from a few noise batches, so the logits stay moderate (far within float16) in eval mode."""
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in names:
        arch, weights = name.split(":")
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # a plain mean over the calibration batches
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE))
        url = torchvision.models.get_model_weights(arch)[weights].url
        torch.save(model.state_dict(), checkpoints / url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    """The recipe run once on the generated folder: (the pipeline, its run directory, seconds the run took)."""
    folder = tmp_path_factory.mktemp("imagenet")
    data = make_image_folder(folder / "data", classes=1000, train=1, val=1, sizes=(64, 96))
    for extra in sorted((data / "val").iterdir())[VAL_IMAGES:]:
        shutil.rmtree(extra)  # val/ may hold fewer classes than train/
    raw = tomllib.loads(RECIPE.read_text())
    teachers = [t["arch"] for t in raw["teachers"]]
    _fake_pretrained_weights(folder / "torch", teachers)
    raw["data"].update(spec=f"imagefolder:{data}?train_fraction={TRAIN_ROWS / 1000}", image_size=IMAGE_SIZE)
    raw["store"].update(views=1)
    raw["student"].update(epochs=1, batch_size=10)
    file = folder / "imagenet.toml"
    file.write_text(to_toml(raw))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(folder / "torch"))

        def no_download(url, *args, **kwargs):
            raise AssertionError(f"the test tried to download {url}")

        patch.setattr(torch.hub, "download_url_to_file", no_download)
        pipeline = load_pipeline(file)
        started = time.perf_counter()
        run_dir = run_pipeline(pipeline, folder / "runs", device="cpu", progress=False, allow_cpu=True)
        seconds = time.perf_counter() - started
        yield pipeline, run_dir, seconds


def test_the_recipe_is_pretrained_teachers_into_a_resnet18_at_224_px():
    pipeline = load_pipeline(RECIPE)
    assert pipeline.gpu and pipeline.data == {"spec": "imagefolder:/data/imagenet", "image_size": 224}
    assert pipeline.teacher_sources() == ["resnet50:IMAGENET1K_V2", "densenet121:IMAGENET1K_V1"]
    assert pipeline.trained_teachers() == [] and pipeline.student["arch"] == "resnet18"
    # meal's current default store: `extract --for meal` (pooled blocks, no channel-mean maps).
    assert pipeline.store["preset"] == "meal" and "features" not in pipeline.store and "blocks" not in pipeline.store
    # Only the students train: 3 methods on one seed.
    assert pipeline.training_epochs() == (3, 3 * pipeline.student["epochs"])


def test_pretrained_teachers_are_not_trained_and_the_report_evaluates_them(imagenet_run):
    from meal_cache.data.datasets import load_dataset
    from meal_cache.engine.evaluate import classification_metrics, predict_logits
    from meal_cache.nets.models import create_model
    from meal_cache.store import open_store

    pipeline, run_dir, seconds = imagenet_run
    # Nothing was trained or written for the teachers: no checkpoint, no teacher step.
    assert not (run_dir / "teachers").exists()
    steps = sorted(p.stem for p in (run_dir / "steps").iterdir())
    assert steps == ["alone__seed-100", "extract", "kd__seed-100", "meal__seed-100"]

    store = open_store(run_dir / "feats.zarr")
    assert store.teacher_names == ["resnet50-IMAGENET1K_V2", "densenet121-IMAGENET1K_V1"]
    assert store.n == TRAIN_ROWS and store.num_views == 2  # one augmented view and the identity view
    assert store.layout.features == ("blocks",)  # --for meal: no maps stored
    # Extracted from the streamed folder (an in-memory one has the "natural" recipe).
    assert store.dataset["spec"] == pipeline.data["spec"] and store.dataset["recipe"] == "full"

    results = json.loads((run_dir / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["teacher resnet50", "teacher densenet121", "teacher ensemble", "alone", "kd", "meal"]
    assert rows["teacher resnet50"]["arch"] == "resnet50:IMAGENET1K_V2"
    assert rows["teacher ensemble"]["arch"] == "resnet50:IMAGENET1K_V2+densenet121:IMAGENET1K_V1"
    assert results["dataset"]["num_classes"] == 1000 and results["dataset"]["image_size"] == IMAGE_SIZE
    assert results["dataset"]["sizes"] == {"train": TRAIN_ROWS, "test": VAL_IMAGES}
    for method in ("alone", "kd", "meal"):
        assert rows[method]["arch"] == "resnet18" and len(rows[method]["top1"]["values"]) == 1

    # The teacher rows are the pretrained models (create_model with the weights) on the streamed val/ images.
    dataset = load_dataset(pipeline.data["spec"], image_size=IMAGE_SIZE)
    assert dataset.streamed and len(dataset.test) == VAL_IMAGES
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(run_dir.parent.parent / "torch"))
        for teacher in pipeline.teachers:
            model = create_model(teacher["arch"], dataset.num_classes, IMAGE_SIZE)
            logits = predict_logits(model, dataset.test, dataset.mean, dataset.std, torch.device("cpu"))
            metrics = classification_metrics(logits, dataset.test.labels)
            row = rows[f"teacher {teacher['name']}"]
            assert row["top1"]["values"] == pytest.approx([metrics["top1"]], abs=1e-9)
            assert row["nll"]["values"] == pytest.approx([metrics["nll"]], rel=1e-5)
    report = (run_dir / "report.md").read_text()
    assert "| teacher resnet50 | resnet50:IMAGENET1K_V2 |" in report
    print(f"imagenet pipeline on the generated folder: {seconds:.1f} s")


@pytest.mark.parametrize(
    "teacher, message",
    [
        ('arch = "resnet50:IMAGENET1K_V2"\nepochs = 3', "names pretrained weights.*remove epochs"),
        ('arch = "resnet50:IMAGENET1K_V9"', "unknown weights for resnet50 'IMAGENET1K_V9'"),
        ('arch = "resnet20:IMAGENET1K_V1"', "'resnet20' is a meal-cache network and has no pretrained weights"),
    ],
)
def test_pretrained_teacher_mistakes_are_named(tmp_path, teacher, message):
    text = RECIPE.read_text().replace('arch = "resnet50:IMAGENET1K_V2"', teacher)
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(UserError, match=message):
        load_pipeline(file)
