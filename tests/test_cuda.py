"""Every CUDA path on one GPU: AMP (fp16 with its GradScaler, bf16), channels_last, pinned memory, a store extracted
on the GPU against the CPU one, and a resume after SIGTERM. Skipped ("no CUDA device") without a GPU (conftest.py);
`make gpu-check` runs them. Sized to take a few minutes on an H100: digits, 1-4 epochs, the tiny networks.

Tolerances, against a float32 CPU reference (why these numbers: half precision rounds each value to 2^-11
(fp16) or 2^-8 (bf16) of itself, and the error compounds over the ~10-20 layers of these networks; a real bug (a
wrong view, channel order, normalisation or a skipped step) differs by the values' own size, far outside them):

- stored arrays: max |GPU - CPU| <= 1 % (fp16) or 4 % (bf16) of the array's largest |CPU| value, and the
  teachers' top-1 agreeing on >= 99 % (fp16) or 98 % (bf16) of the rows;
- a model trained on the GPU, evaluated there (autocast, channels_last) and again on the CPU in float32: test
  top-1 within 1 point (3-4 of digits' 360 test rows flipping on near ties) and NLL within 0.05.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from by_hand import store_arrays

from meal_cache.distill import DistillConfig, distill
from meal_cache.engine.evaluate import evaluate
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_checkpoint, load_model
from meal_cache.nets.models import create_model
from meal_cache.runtime import AMP_ENV, Precision

pytestmark = pytest.mark.cuda

TEACHERS = ["resnet8_w4", "densenet_k12"]
ARRAY_TOLERANCE = {"fp16": 0.01, "bf16": 0.04}  # of the array's largest |value| (see the docstring)
TOP1_AGREEMENT = {"fp16": 0.99, "bf16": 0.98}
EVAL_TOP1_POINTS = 1.0
EVAL_NLL = 0.05
# (method, representation, online): every seed method from the cache, and meal with its teachers run every step.
DISTILL_CASES = [("meal", "blocks", False), ("meal", "maps", False), ("kd", None, False), ("meal-v2", None, False),
                 ("afd", None, False), ("meal", "blocks", True)]  # fmt: skip


@pytest.fixture(params=["fp16", "bf16"])
def amp(request, monkeypatch) -> str:
    """Each test once per half precision; Precision reads the switch when it is made, so setting it here reaches
    train, extract and distill alike."""
    if request.param == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    monkeypatch.setenv(AMP_ENV, request.param)
    return request.param


def _finite_record(record: dict) -> None:
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"not finite: {bad}"


def _moved(initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> None:
    """Every trained float tensor is finite, and nearly all moved from their initial values (a scaler that skips
    every step, or gradients that never reach the weights, leave them where they started)."""
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    for key in floats:
        assert torch.isfinite(trained[key]).all(), key
    moved = [k for k in floats if not torch.equal(initial[k], trained[k].cpu())]
    assert len(moved) >= 0.9 * len(floats), f"only {len(moved)} of {len(floats)} tensors moved"


def _matches_cpu(checkpoint: Path, on_gpu: dict, digits) -> None:
    """The test metrics measured on the GPU (autocast, channels_last) against the same weights on the CPU."""
    model, _ = load_model(checkpoint, "cpu")
    on_cpu = evaluate(model, digits, "test", torch.device("cpu"))
    assert abs(on_gpu["top1"] - on_cpu["top1"]) <= EVAL_TOP1_POINTS, (on_gpu, on_cpu)
    assert abs(on_gpu["nll"] - on_cpu["nll"]) <= EVAL_NLL, (on_gpu, on_cpu)


def test_precision_on_cuda_follows_the_switch(amp):
    precision = Precision(torch.device("cuda"))
    assert precision.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    assert precision.grad_scaler().is_enabled() == (amp == "fp16")  # bf16 needs no loss scaling
    model = precision.prepare(create_model("resnet8_w4", 10, 16))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert precision.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    with precision.autocast():
        out = model(torch.randn(4, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last))
    assert out.dtype == precision.dtype and torch.isfinite(out).all()


def test_train_under_amp(amp, digits, tmp_path):
    config = TrainConfig(arch="resnet8_w4", data="digits", epochs=2, seed=0, device="cuda")
    torch.manual_seed(config.seed)  # as train_supervised seeds before it builds the network
    initial = create_model(config.arch, digits.num_classes, digits.image_size).state_dict()
    payload = train_supervised(config, tmp_path / "t.pt", progress=False, dataset=digits)
    for record in payload["history"]:
        _finite_record(record)
    assert payload["history"][-1]["loss"] < payload["history"][0]["loss"]
    # Above chance (10 %): 29 % after these 2 epochs on the CPU in float32, still in its warm-up's wake.
    assert payload["metrics"]["test"]["top1"] > 20.0
    _moved(initial, load_checkpoint(tmp_path / "t.pt")["model"])
    _matches_cpu(tmp_path / "t.pt", payload["metrics"]["test"], digits)


def test_store_extracted_on_the_gpu_matches_the_cpu_one(amp, small_store, teacher_dir, digits, tmp_path):
    cpu_path, cpu_config = small_store
    config = dataclasses.replace(cpu_config, device="cuda")
    extract(config, tmp_path / "gpu.zarr", progress=False, dataset=digits)
    on_cpu = store_arrays(zarr.open_group(str(cpu_path), mode="r"))
    on_gpu = store_arrays(zarr.open_group(str(tmp_path / "gpu.zarr"), mode="r"))
    assert on_cpu.keys() == on_gpu.keys()
    for key, reference in on_cpu.items():
        got = on_gpu[key]
        assert got.shape == reference.shape and got.dtype == reference.dtype, key
        if not np.issubdtype(reference.dtype, np.floating):  # labels, views' boxes and flips, progress flags
            np.testing.assert_array_equal(got, reference, err_msg=key)
            continue
        reference, got = reference.astype(np.float32), got.astype(np.float32)
        assert np.isfinite(got).all(), key
        error = np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-6)
        assert error <= ARRAY_TOLERANCE[amp], f"{key}: {error:.4f} of its scale"
        if key.endswith("/logits"):
            agree = (got.argmax(-1) == reference.argmax(-1)).mean()
            assert agree >= TOP1_AGREEMENT[amp], f"{key}: top-1 agrees on {agree:.4f}"


@pytest.mark.parametrize(("method", "representation", "online"), DISTILL_CASES)
def test_distill_under_amp(amp, small_store, teacher_dir, digits, tmp_path, method, representation, online):
    path, _ = small_store
    extra = dict(teachers=TEACHERS, teacher_dir=str(teacher_dir)) if online else {}
    config = DistillConfig(store=str(path), student="resnet8_w4", method=method, representation=representation,
                           online=online, epochs=2, seed=0, device="cuda", **extra)  # fmt: skip
    torch.manual_seed(config.seed)  # as distill() seeds before it builds the student
    initial = create_model("resnet8_w4", digits.num_classes, digits.image_size).state_dict()
    summary = distill(config, tmp_path / "run", progress=False, dataset=digits)
    for record in summary["history"]:
        _finite_record(record)
        assert record["steps"] == 1437 // config.batch_size
    # No accuracy floor: 2 epochs in the schedule's warm-up reach 19 % (kd, CPU, float32), too near chance to
    # tell a bug from noise; the weights moving, staying finite and matching the CPU evaluation do.
    _moved(initial, load_checkpoint(tmp_path / "run" / "student.pt")["model"])
    _matches_cpu(tmp_path / "run" / "student.pt", summary["test"], digits)
    scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    if amp == "fp16":  # the scaler ran and ended on a usable scale, not one driven to 0 or inf by overflow
        assert 0 < float(scaler["scale"]) < math.inf, scaler
    else:
        assert not scaler, scaler  # disabled: bf16 has fp32's range


def _distill_command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meal_cache", "distill", "--store", str(store), "--student", "resnet8_w4",
            "--method", "meal", "--epochs", "4", "--device", "cuda", "--quiet", "--out", str(out), *extra]  # fmt: skip


def test_distill_resumes_after_sigterm_under_amp(amp, small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "run"
    env = {**os.environ, AMP_ENV: amp}  # the subprocess runs the same tree (PYTHONPATH) and precision
    process = subprocess.Popen(_distill_command(path, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    try:
        while process.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.002)
        assert process.poll() is None, "the run ended before the first checkpoint: " + process.stderr.read().decode()
        process.send_signal(signal.SIGTERM)  # a scheduler's stop
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    before = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= before < 4 and not (out / "student.pt").exists()
    resumed = subprocess.run(_distill_command(path, out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for record in records:
        _finite_record(record)
    if amp == "fp16":  # the scaler's state came back with the checkpoint and is still usable
        assert 0 < float(torch.load(out / "last.pt", weights_only=True)["scaler"]["scale"]) < math.inf
