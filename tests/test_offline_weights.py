"""Pretrained weights without a network, through the `meal-cache` command (tests/console.py: empty torch and
Hugging Face caches, HF_HUB_OFFLINE=1, every proxy a closed port): a torchvision ``ARCH:WEIGHTS`` that cannot be
fetched and a timm ``timm:NAME:pretrained`` missing from the cache are one `Error:` line saying where the file goes
and how to pass a local one; ``ARCH:/path/to/weights.pth`` and ``timm:NAME:file=PATH`` load exactly that file.
A download from the hub starts the console script (Hugging Face reads its settings at import); the other cases,
whose settings torch reads when it downloads, run the command in this process, and one of them starts it too."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import timm
import torch
import torchvision
from console import one_error_line, ran, refusal_line, run_console, run_in_process

from meal_cache.data.datasets import load_dataset
from meal_cache.nets.torchvision_weights import IMAGENET_MEAN, IMAGENET_STD
from meal_cache.store import open_store
from meal_cache.views import augment

SPEC = "digits?folds=20&fold=0&train_fraction=0.05"  # 85 training rows at 16 px
DATA = ["--data", SPEC, "--device", "cpu", "--quiet"]
# One epoch whose steps leave the weights as they were loaded (to 1e-8), so the checkpoint shows which they were.
STILL = ["--epochs", "1", "--lr", "1e-9", "--momentum", "0", "--weight-decay", "0"]
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1


def _saved(path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("command", ["train", "extract"])
def test_torchvision_weights_that_cannot_be_fetched_name_the_file_the_cache_and_the_local_form(
    tmp_path, command, monkeypatch
):
    args = {
        "train": ["train", "--arch", "resnet18:IMAGENET1K_V1", "--epochs", "1", "--out", str(tmp_path / "t.pt")],
        "extract": ["extract", "--teachers", "resnet18:IMAGENET1K_V1", "--views", "1", "--out", str(tmp_path / "s")],
    }[command]
    if command == "train":
        line = one_error_line(run_console([*args, *DATA], tmp_path))
    else:
        line = refusal_line(run_in_process([*args, *DATA], tmp_path, monkeypatch))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert "could not fetch torchvision's weights for 'resnet18:IMAGENET1K_V1'" in line, line
    assert f"torchvision looks for '{RESNET18_FILE}' in '{cache}'" in line, line
    assert f"download https://download.pytorch.org/models/{RESNET18_FILE} elsewhere and copy it there" in line, line
    assert line.endswith("or pass resnet18:/path/to/weights.pth"), line
    assert list(cache.iterdir()) == [], "a failed download left a file in the cache"
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "s").exists()


def test_torchvision_weights_copied_into_the_cache_are_read_without_a_network(tmp_path, monkeypatch):
    """The file the line names, put where it says, is what torchvision loads: no download is tried."""
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(7)
    # The enum's own file name; any 1000-class state dict stands in for it (a cached file's hash is not checked).
    state = _saved(cache / "shufflenetv2_x0.5-f707e7126e.pth", torchvision.models.shufflenet_v2_x0_5())
    out = tmp_path / "t.pt"
    ran(run_in_process(["train", "--arch", "shufflenet_v2_x0_5:IMAGENET1K_V1", *STILL, "--out", str(out), *DATA],
                        tmp_path, monkeypatch))  # fmt: skip
    trained = torch.load(out, weights_only=True)["model"]
    torch.testing.assert_close(trained["conv1.0.weight"], state["conv1.0.weight"], atol=1e-6, rtol=0)
    assert trained["fc.weight"].shape == (10, 1024)  # the 1000-class head replaced for digits


def test_a_local_torchvision_state_dict_is_what_train_and_extract_load(tmp_path, monkeypatch):
    torch.manual_seed(3)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    path = tmp_path / "mine.pth"
    state = _saved(path, model)
    name = f"shufflenet_v2_x0_5:{path}"
    out = tmp_path / "t.pt"
    ran(run_in_process(["train", "--arch", name, *STILL, "--out", str(out), *DATA], tmp_path, monkeypatch))
    trained = torch.load(out, weights_only=True)["model"]
    torch.testing.assert_close(trained["conv1.0.weight"], state["conv1.0.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["fc.weight"], state["fc.weight"], atol=1e-6, rtol=0)

    ran(run_in_process(["extract", "--teachers", name, "--views", "1", "--identity-view", "--out",
                         str(tmp_path / "s.zarr"), *DATA], tmp_path, monkeypatch))  # fmt: skip
    store = open_store(tmp_path / "s.zarr")
    (key,) = store.teacher_names
    teacher = store.teacher(key)
    # A 10-class file that is no enum's download: classes numbered, ImageNet's normalisation; its digest recorded.
    assert teacher["classes"] == [str(i) for i in range(10)]
    assert teacher["input"]["mean"] == list(IMAGENET_MEAN) and teacher["input"]["std"] == list(IMAGENET_STD)
    assert store.attrs["settings"]["teacher_checkpoints"][key] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The stored logits of the un-augmented view are the file's network's on those pixels.
    images = load_dataset(SPEC).train.images.float()
    with torch.no_grad():
        expected = model(augment.normalise(images, IMAGENET_MEAN, IMAGENET_STD, channels_last=False)).numpy()
    stored = store.logits(key, store.identity_view).astype(np.float32)
    np.testing.assert_allclose(stored, expected, atol=0.02, rtol=0.01)


@pytest.mark.parametrize("case", ["missing", "unreadable", "another architecture"])
def test_a_local_torchvision_file_that_cannot_be_used_is_one_line(tmp_path, case, monkeypatch):
    path = tmp_path / "w.pth"
    if case == "unreadable":
        path.write_bytes(b"not a checkpoint")
    if case == "another architecture":
        _saved(path, torchvision.models.shufflenet_v2_x0_5(num_classes=10))
    arch = "resnet18" if case == "another architecture" else "shufflenet_v2_x0_5"
    line = refusal_line(run_in_process(["extract", "--teachers", f"{arch}:{path}", "--views", "1", "--out",
                                        str(tmp_path / "s"), *DATA], tmp_path, monkeypatch))  # fmt: skip
    expected = {
        "missing": f"weights file '{path}' for shufflenet_v2_x0_5 does not exist",
        "unreadable": f"weights file '{path}' is not a readable state dict (UnpicklingError",
        "another architecture": f"weights file '{path}' is not a state dict of resnet18 (missing bn1.bias",
    }[case]
    assert expected in line, line
    assert not (tmp_path / "s").exists()


def test_timm_pretrained_offline_fails_at_once_naming_the_cache_and_the_file_form(tmp_path):
    started = time.monotonic()
    result = run_console(["train", "--arch", "timm:resnet18:pretrained", "--image-size", "32", "--epochs", "1",
                          "--out", str(tmp_path / "t.pt"), *DATA], tmp_path)  # fmt: skip
    line = one_error_line(result)
    # Without HF_HUB_OFFLINE the hub retries for about 52 s; offline it is the process's start-up, a few seconds.
    assert time.monotonic() - started < 40
    assert "could not download timm's weights or config for 'timm:resnet18'" in line, line
    cache = tmp_path / "hf" / "hub"
    assert f"HF_HUB_OFFLINE is set, so they are read only from the Hugging Face cache '{cache}'" in line, line
    assert "or pass timm:resnet18:file=/path/to/weights" in line, line
    assert not (tmp_path / "t.pt").exists()


def test_a_local_timm_checkpoint_is_what_train_loads(tmp_path, monkeypatch):
    torch.manual_seed(5)
    path = tmp_path / "resnet10t.pth"
    state = _saved(path, timm.create_model("resnet10t", num_classes=10))
    out = tmp_path / "t.pt"
    ran(run_in_process(["train", "--arch", f"timm:resnet10t:file={path}", "--image-size", "32", *STILL, "--out",
                         str(out), *DATA], tmp_path, monkeypatch))  # fmt: skip
    payload = torch.load(out, weights_only=True)
    trained = payload["model"]
    torch.testing.assert_close(trained["net.conv1.0.weight"], state["conv1.0.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["net.fc.weight"], state["fc.weight"], atol=1e-6, rtol=0)
    assert payload["input"]["pretrained"]["file"] == str(path)


def test_a_missing_timm_checkpoint_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "none.pth"
    line = refusal_line(run_in_process(["train", "--arch", f"timm:resnet10t:file={path}", "--image-size", "32",
                                        "--epochs", "1", "--out", str(tmp_path / "t.pt"), *DATA], tmp_path,
                                       monkeypatch))  # fmt: skip
    assert f"weights file '{path}' for timm:resnet10t does not exist" in line


def test_unreadable_torchvision_weights_in_the_cache_say_which_file_to_delete(tmp_path, monkeypatch):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / RESNET18_FILE).write_bytes(b"cut short")
    line = refusal_line(run_in_process(["extract", "--teachers", "resnet18:IMAGENET1K_V1", "--views", "1", "--out",
                                        str(tmp_path / "s"), *DATA], tmp_path, monkeypatch))  # fmt: skip
    assert f"in '{cache / RESNET18_FILE}' are not readable" in line and "delete the file so it is fetched again" in line
