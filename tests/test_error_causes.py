"""Refusals that name the real cause, through the real `meal-cache` command (tests/console.py): a missing image
folder, a dataset in object storage, the settings a changed run differs in (by name, digests shortened), a store
of a newer version."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import zarr
from console import one_error_line, run_console

from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.errors import settings_difference
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_checkpoint, save_checkpoint

SPEC = "digits?folds=20&fold=0&train_fraction=0.05"  # 85 training rows at 16 px


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A one-epoch teacher, a copy with other weights (another file digest), and a one-view store of the first."""
    root = tmp_path_factory.mktemp("causes")
    teachers = root / "teachers"
    train_supervised(TrainConfig(arch="resnet8_w4", data=SPEC, epochs=1, device="cpu"), teachers / "resnet8_w4.pt",
                     progress=False)  # fmt: skip
    payload = load_checkpoint(teachers / "resnet8_w4.pt")
    payload["model"] = {k: v * 2 if v.is_floating_point() else v for k, v in payload["model"].items()}
    save_checkpoint(root / "other" / "resnet8_w4.pt", payload)
    config = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, views=1, teacher_dir=str(teachers), device="cpu")
    extract(config, root / "feats.zarr", progress=False)
    return root


def test_a_missing_image_folder_says_it_does_not_exist(tmp_path):
    folder = tmp_path / "no" / "such" / "folder"
    line = one_error_line(run_console(["train", "--arch", "resnet8", "--data", f"imagefolder:{folder}", "--out",
                                       str(tmp_path / "t.pt")], tmp_path))  # fmt: skip
    assert f"imagefolder '{folder}': folder does not exist" in line, line


@pytest.mark.parametrize("spec", ["imagefolder:s3://bucket/x", "npz:gs://bucket/x.npz"])
def test_a_dataset_in_object_storage_is_refused_as_such(tmp_path, spec):
    line = one_error_line(run_console(["train", "--arch", "resnet8", "--data", spec, "--out", str(tmp_path / "t.pt")],
                                      tmp_path))  # fmt: skip
    url = spec.partition(":")[2]
    assert f"'{url}': data from object storage is not supported; copy it locally or mount it" in line, line


def test_a_store_of_other_teacher_weights_names_the_teacher_and_both_digests(made, tmp_path):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    store = tmp_path / "feats.zarr"
    shutil.copytree(made / "feats.zarr", store)
    result = run_console(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(made / "other"), "--data", SPEC,
                          "--views", "1", "--device", "cpu", "--quiet", "--out", str(store)], tmp_path)  # fmt: skip
    line = one_error_line(result)
    old, new = digest(made / "teachers" / "resnet8_w4.pt"), digest(made / "other" / "resnet8_w4.pt")
    assert f"(teacher_checkpoints.resnet8_w4: {old[:8]}… there, {new[:8]}… now); pass --overwrite" in line, line
    assert old not in line and new not in line and "{" not in line, line


def test_a_resume_with_other_settings_names_them_with_both_values(made, tmp_path):
    out = tmp_path / "t.pt"
    shutil.copy(made / "teachers" / "resnet8_w4.pt", out)
    result = run_console(["train", "--arch", "resnet8_w4", "--data", SPEC, "--epochs", "1", "--lr", "0.1",
                          "--label-smoothing", "0.1", "--resume", "--device", "cpu", "--out", str(out)],
                         tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert "was written with other settings (label_smoothing: 0.0 there, 0.1 now; lr: 0.05 there, 0.1 now)" in line


def test_the_difference_of_nested_settings_is_their_leaves_and_counts_the_rest():
    old = {"a": {"b": {"c": 1, "d": 2}}, "digest": "0123456789abcdef" * 4, "e": 1, "f": 1, "g": [1]}
    new = {"a": {"b": {"c": 1, "d": 3}}, "digest": "fedcba9876543210" * 4, "g": [2], "h": "x"}
    assert settings_difference(old, new) == (
        "a.b.d: 2 there, 3 now; digest: 01234567… there, fedcba98… now; e: 1 there, absent now; and 3 more"
    )
    assert settings_difference(None, new) == "no settings recorded"


def test_a_store_of_a_newer_format_is_refused(made, tmp_path):
    store = tmp_path / "newer.zarr"
    shutil.copytree(made / "feats.zarr", store)
    zarr.open_group(str(store), mode="r+").attrs["format"] = "meal-cache/12"
    line = one_error_line(run_console(["info", str(store)], tmp_path))
    assert (f"'{store}' is a store of format 'meal-cache/12', which this meal-cache (meal-cache/11) cannot read; "
            "upgrade meal-cache or extract it again") in line  # fmt: skip
