"""``hf:LOCATION``: a Hugging Face dataset kept offline (save_to_disk or hub-style parquet), its image bytes decoded
as image files are, replayed through extract and distill, and refused in one line when it is not usable (issue 40)."""

from __future__ import annotations

from pathlib import Path

import pytest
from console import one_error_line, one_error_line_in_process, run_console
from test_wds import (
    CLASSES,
    assert_an_interrupted_extract_resumes_to_the_whole_store,
    assert_same_pixels_as_folder,
    digit_samples,
    extract_and_distill_replay,
    write_folder,
)

from meal_cache.data.datasets import load_dataset

HELD_OUT = 15


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' Arrow cache of parquet files in the test's own folder, never the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))


def hf_dataset(samples, image_feature: bool = True):
    import datasets

    image = datasets.Image() if image_feature else datasets.Value("binary")
    features = datasets.Features({"image": image, "label": datasets.ClassLabel(names=list(CLASSES))})

    def part(rows):
        images = [{"bytes": data, "path": f"{key}.{suffix}"} for key, _, suffix, data in rows]
        if not image_feature:
            images = [data for _, _, _, data in rows]
        return datasets.Dataset.from_dict({"image": images, "label": [label for _, label, _, _ in rows]}, features)

    return datasets.DatasetDict({"train": part(samples[:-HELD_OUT]), "validation": part(samples[-HELD_OUT:])})


def write_parquet(root: Path, samples, image_feature: bool = True) -> Path:
    """``root/data/{train,validation}-0000N-of-00002.parquet``, as the hub lays them out."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, dataset in hf_dataset(samples, image_feature).items():
        half = len(dataset) // 2
        for number, rows in enumerate((range(half), range(half, len(dataset)))):
            dataset.select(rows).to_parquet(str(root / "data" / f"{split}-{number:05d}-of-00002.parquet"))
    return root


@pytest.fixture(scope="module")
def samples():
    return digit_samples()


@pytest.fixture(scope="module")
def parquet(samples, tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("parquet"), samples)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_datasets_serve_the_image_folders_pixels_bit_for_bit(samples, parquet, layout, tmp_path):
    if layout == "parquet":
        location = parquet
    else:
        location = tmp_path / "disk"
        hf_dataset(samples).save_to_disk(str(location))
    dataset = load_dataset(f"hf:{location}")
    folder = load_dataset(f"imagefolder:{write_folder(tmp_path / 'folder', samples)}")
    assert dataset.classes == CLASSES
    assert (len(dataset.train), len(dataset.test)) == (45, 15)
    keys = {"train": [key for key, *_ in samples[:-HELD_OUT]], "test": [key for key, *_ in samples[-HELD_OUT:]]}
    assert_same_pixels_as_folder(dataset, folder, keys=keys)
    if layout == "parquet":  # rows named by their file and row there
        assert dataset.train.files[23].decode() == "data/train-00001-of-00002.parquet/1.jpg"


@pytest.fixture(scope="module")
def teachers(parquet, tmp_path_factory):
    from meal_cache.engine.train import TrainConfig, train_supervised

    out = tmp_path_factory.mktemp("hf-teachers")
    for arch in ("resnet8_w4", "densenet_k12"):
        config = TrainConfig(arch=arch, data=f"hf:{parquet}", image_size=16, epochs=1, batch_size=16, device="cpu",
                             workers=0)  # fmt: skip
        train_supervised(config, out / f"{arch}.pt", progress=False)
    return out


def test_extract_and_distill_replay_the_pixels_the_teachers_saw(parquet, teachers, tmp_path, monkeypatch):
    extract_and_distill_replay(f"hf:{parquet}", teachers, tmp_path, monkeypatch)


def test_an_interrupted_extract_of_parquet_resumes_to_the_whole_store(parquet, teachers, tmp_path, interrupt_on_call):
    assert_an_interrupted_extract_resumes_to_the_whole_store(f"hf:{parquet}", teachers, tmp_path, interrupt_on_call)


def test_a_changed_parquet_file_is_refused_by_its_fingerprint(samples, teachers, tmp_path):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    location = write_parquet(tmp_path / "d", samples)
    config = ExtractConfig(teachers=["resnet8_w4"], data=f"hf:{location}", image_size=16, views=1,
                           teacher_dir=str(teachers), device="cpu", workers=0)  # fmt: skip
    extract(config, tmp_path / "s.zarr", progress=False)
    changed = list(samples)
    key, label, suffix, _ = changed[3]
    changed[3] = (key, label, suffix, changed[4][3])
    write_parquet(location, changed)
    result = run_console(["distill", "--store", str(tmp_path / "s.zarr"), "--student", "resnet8_w4", "--epochs", "1",
                          "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"], tmp_path)  # fmt: skip
    assert "fingerprint differs" in one_error_line(result)


def test_unusable_hf_datasets_give_one_line_and_exit_2(samples, tmp_path, monkeypatch):
    no_image = write_parquet(tmp_path / "noimage", samples, image_feature=False)
    empty = write_parquet(tmp_path / "empty", samples)
    for path in (empty / "data").glob("validation-*.parquet"):
        path.unlink()
    hf_dataset(samples)["validation"].select([]).to_parquet(str(empty / "data" / "validation-00000-of-00001.parquet"))
    cases = [
        ("a parquet without an image column", no_image, "the train split has no image column (a Image feature)"),
        ("an empty split", empty, "the validation split has no rows"),
        ("a missing location", tmp_path / "nowhere", "folder does not exist"),
        ("a folder that is no dataset", tmp_path, "is neither a save_to_disk folder"),
    ]
    for number, (case, location, said) in enumerate(cases):  # the first through the console script
        args = ["train", "--arch", "resnet8_w4", "--data", f"hf:{location}", "--image-size", "16", "--epochs", "1",
                "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "t.pt")]  # fmt: skip
        if number == 0:
            line = one_error_line(run_console(args, tmp_path, HF_DATASETS_CACHE=str(tmp_path / "cache")))
        else:
            monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
            line = one_error_line_in_process(args)
        assert said in line, case
