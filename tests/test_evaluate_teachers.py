"""``evaluate --teachers`` names teachers as extract and distill do (issue 42): a checkpoint path, NAME for
TEACHER_DIR/NAME.pt, or ARCH:WEIGHTS (here a local torchvision state dict, no network)."""

from __future__ import annotations

import json

import numpy as np
import torch
import torchvision
from console import run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.nets.checkpoint import load_model
from meal_cache.nets.torchvision_weights import IMAGENET_MEAN, IMAGENET_STD
from meal_cache.views import augment


def _evaluate(args: list[str], home) -> dict:
    result = run_console(["evaluate", *args, "--device", "cpu", "--quiet"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_evaluate_takes_arch_weights_and_names_as_extract_does(teacher_dir, tmp_path):
    torch.manual_seed(3)
    teacher = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    weights = tmp_path / "mine.pth"
    torch.save(teacher.state_dict(), weights)
    student = teacher_dir / "resnet8_w4.pt"

    out = tmp_path / "pretrained.json"
    _evaluate([str(student), "--teachers", f"shufflenet_v2_x0_5:{weights}", "--json", str(out)], tmp_path)
    metrics = json.loads(out.read_text())["metrics"]
    # Independently: each network on the un-augmented test images with its own normalisation (the file's network
    # takes ImageNet's), then the share of images whose top classes agree.
    digits = load_dataset("digits")
    images = digits.test.images.float()
    model, payload = load_model(student)
    with torch.no_grad():
        teacher_top = teacher(augment.normalise(images, IMAGENET_MEAN, IMAGENET_STD, channels_last=False)).argmax(1)
        student_top = model(augment.normalise(images, tuple(payload["input"]["mean"]), tuple(payload["input"]["std"]),
                                              channels_last=False)).argmax(1)  # fmt: skip
    expected = 100.0 * float(np.mean(teacher_top.numpy() == student_top.numpy()))
    assert abs(metrics["fidelity"] - expected) < 1e-6 and "kl_to_ensemble" in metrics

    # NAME in --teacher-dir is the checkpoint there, as extract resolves it.
    by_name, by_path = tmp_path / "name.json", tmp_path / "path.json"
    _evaluate([str(student), "--teachers", "densenet_k12", "--teacher-dir", str(teacher_dir), "--json",
               str(by_name)], tmp_path)  # fmt: skip
    _evaluate([str(student), "--teachers", str(teacher_dir / "densenet_k12.pt"), "--json", str(by_path)], tmp_path)
    assert json.loads(by_name.read_text())["metrics"] == json.loads(by_path.read_text())["metrics"]
