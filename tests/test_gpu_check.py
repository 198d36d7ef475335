"""`make gpu-check` and the cuda-marked tests on a machine without a GPU: nothing measured, exit 0, and the cuda
tests collected and counted as skipped rather than hidden."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meal_cache.errors import UserError
from meal_cache.runtime import AMP_ENV, Precision

ROOT = Path(__file__).resolve().parent.parent
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@needs_no_gpu
def test_gpu_check_without_cuda_measures_nothing_and_exits_0(tmp_path):
    out = tmp_path / "results.json"
    done = _run("benchmarks/gpu_check.py", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no CUDA device: nothing measured"
    assert not out.exists()


@needs_no_gpu
def test_cuda_tests_are_collected_and_skipped_without_cuda():
    collected = _run("-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                     "tests/test_cuda.py")  # fmt: skip
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if line.startswith("tests/test_cuda.py::")]
    # Every test in the file carries the marker, and each of train, extract and distill is there per precision.
    assert len(ids) >= 20 and any("test_distill_resumes_after_sigterm_under_amp[fp16]" in i for i in ids), ids
    assert {"fp16", "bf16"} <= {p for i in ids for p in re.findall(r"fp16|bf16", i)}
    run = _run("-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(rf"\b{len(ids)} skipped\b", run.stdout), run.stdout
    assert "no CUDA device" in run.stdout and "passed" not in run.stdout and "failed" not in run.stdout


@pytest.mark.parametrize(("amp", "dtype"), [("fp16", torch.float16), ("FP16", torch.float16)])
def test_the_amp_switch_picks_the_half_precision(monkeypatch, amp, dtype):
    monkeypatch.setenv(AMP_ENV, amp)
    # A CUDA device object needs no GPU to exist: fp16 is chosen without asking the device about bf16.
    assert Precision(torch.device("cuda")).dtype == dtype


def test_the_amp_switch_defaults_to_auto_and_refuses_a_typo(monkeypatch):
    monkeypatch.delenv(AMP_ENV, raising=False)
    assert Precision(torch.device("cpu")).amp == "auto"
    monkeypatch.setenv(AMP_ENV, "fp8")
    with pytest.raises(UserError, match="MEAL_CACHE_AMP=fp8 is not one of auto, bf16, fp16"):
        Precision(torch.device("cpu"))


@needs_no_gpu
def test_bf16_asked_of_a_device_without_it_is_a_user_error(monkeypatch):
    monkeypatch.setenv(AMP_ENV, "bf16")
    with pytest.raises(UserError, match="cuda does not support bf16"):
        Precision(torch.device("cuda")).dtype  # noqa: B018


@needs_no_gpu
def test_gpu_check_runs_the_decode_and_ddp_cuda_tests_too():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import CUDA_TEST_FILES

    collected = _run("-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "tests/test_decode.py::test_gpu_decoded_pixels_match_the_cpu_ones_within_a_few_levels[0]" in collected.stdout
    assert "tests/test_decode.py::test_a_store_extracted_with_gpu_decoding_replays" in collected.stdout
    assert "tests/test_distributed.py::test_two_ranks_on_one_gpu_train_the_one_rank_student" in collected.stdout
