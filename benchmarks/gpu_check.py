"""`make gpu-check`: one command that proves every CUDA path on a lent GPU, then measures 224 px throughput.

A GPU is lent rarely and for minutes, so everything is in one prepared run, sized to finish in a few minutes on
an H100:

1. `pytest -m cuda tests/test_cuda.py tests/test_decode.py tests/test_distributed.py`: train, extract and
   distill under fp16 (with its GradScaler) and bf16, channels_last, a GPU store against the CPU one, a resume
   after SIGTERM; GPU JPEG decoding (--decode cuda) against the CPU's pixels and its replay; 2 DDP ranks on the GPU;
2. 224 px throughput on a generated JPEG folder: extract (random-weight resnet50 and densenet121 teachers) with
   the JPEGs decoded on the GPU (--decode cuda) and again on the CPU workers (--decode cpu), and a distill epoch
   (resnet18 student, kd and meal, --decode cuda) in images/s, against a plain torchvision ImageFolder +
   DataLoader pipeline in the same run, with the peak GPU memory of each.

Writes gpu/results.json and prints a table. Without CUDA it prints "no CUDA device: nothing measured" and exits 0.

    python benchmarks/gpu_check.py [--out gpu/results.json] [--images 512] [--skip-tests]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench import StreamSettings, bench_stream_cache_tax, bench_stream_extract, image_folder, write_results

from meal_cache.runtime import Precision

ROOT = Path(__file__).resolve().parent.parent
NOTHING = "no CUDA device: nothing measured"
# 224 px ImageNet networks, as pipelines/imagenet.toml runs them; batch and decoding workers for a GPU host.
GPU_STREAM = StreamSettings(teachers=("resnet50", "densenet121"), student="resnet18", batch=128,
                            workers=min(8, os.cpu_count() or 1), device="cuda", decode="cuda")  # fmt: skip
CLASSES = 8
CUDA_TEST_FILES = ["tests/test_cuda.py", "tests/test_decode.py", "tests/test_distributed.py"]
REPEATS = 3  # the median of three drops the first, cold round (CUDA context, cuDNN's algorithm search)


def run_cuda_tests() -> dict:
    """The cuda-marked tests in a child pytest (their output shown as it comes); its exit status and last line."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip())
    child.wait()
    summary = next((line for line in reversed(lines) if line.strip()), "")
    return {"exit_status": child.returncode, "summary": summary, "seconds": time.perf_counter() - started}


def peak_gib(measure: Callable[[], dict]) -> tuple[dict, float]:
    """What ``measure`` returns, and the most GPU memory torch held while it ran (GiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = measure()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() / 2**30


def measure_throughput(work: Path, images: int) -> dict:
    """Extract, distill and the plain pipeline at 224 px, reusing benchmarks/bench.py's streaming measures."""
    root = image_folder(work / "folder", CLASSES, images // CLASSES, 2, seed=0)
    train = CLASSES * (images // CLASSES)
    extracted, extract_gib = peak_gib(lambda: bench_stream_extract(work, root, REPEATS, GPU_STREAM))
    # The same extract with the JPEGs decoded by the CPU workers: what GPU decoding buys on this host.
    cpu_decoded = bench_stream_extract(work, root, REPEATS, dataclasses.replace(GPU_STREAM, decode="cpu"))
    epochs, distill_gib = peak_gib(lambda: bench_stream_cache_tax(work, root, work / "stream.zarr", REPEATS,
                                                                  GPU_STREAM))  # fmt: skip
    return {
        "images": train,
        "settings": {
            "teachers": list(GPU_STREAM.teachers),
            "student": GPU_STREAM.student,
            "batch": GPU_STREAM.batch,
            "workers": GPU_STREAM.workers,
            "decode": GPU_STREAM.decode,
            "image_size": 224,
        },  # fmt: skip
        # extract's rates count each image once per teacher, as bench.py does.
        "extract_images_per_s": extracted["stream_extract_images_per_s"],  # --decode cuda
        "extract_decode_cuda_images_per_s": extracted["stream_extract_images_per_s"],
        "extract_decode_cpu_images_per_s": cpu_decoded["stream_extract_images_per_s"],
        "plain_extract_images_per_s": extracted["plain_extract_images_per_s"],
        # An epoch's seconds include its test pass (the folder's val split), for distill and the plain one alike.
        "distill_kd_images_per_s": train / epochs["stream_kd_epoch_s"],
        "distill_meal_images_per_s": train / epochs["stream_meal_epoch_s"],
        "plain_train_images_per_s": train / epochs["stream_alone_epoch_s"],
        "peak_gpu_gib": {"extract_and_plain_forward": extract_gib, "distill_and_plain_train": distill_gib},
        "raw": {**extracted, **epochs, "decode_cpu": cpu_decoded},
    }


def render(results: dict) -> str:
    lines = [f"meal-cache gpu-check, {results['date']}, {results['device']}, AMP {results['amp_dtype']}", ""]
    tests = results.get("tests")
    if tests:
        lines.append(f"cuda tests: exit {tests['exit_status']}, {tests['summary']} ({tests['seconds']:.0f} s)")
    speed = results["throughput"]
    lines += ["", f"| 224 px, {speed['images']} JPEGs | meal-cache img/s | plain torchvision img/s |", "|---|---|---|",
              f"| extract ({' + '.join(speed['settings']['teachers'])}), --decode cuda | "
              f"{speed['extract_decode_cuda_images_per_s']:,.0f} | {speed['plain_extract_images_per_s']:,.0f} |",
              f"| extract, --decode cpu | {speed['extract_decode_cpu_images_per_s']:,.0f} | |",
              f"| distill kd ({speed['settings']['student']}) | {speed['distill_kd_images_per_s']:,.0f} | "
              f"{speed['plain_train_images_per_s']:,.0f} |",
              f"| distill meal | {speed['distill_meal_images_per_s']:,.0f} | |", ""]  # fmt: skip
    lines.append("peak GPU memory: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in speed["peak_gpu_gib"].items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu/results.json")
    parser.add_argument("--images", type=int, default=512, help="Training JPEGs generated for the throughput.")
    parser.add_argument("--skip-tests", action="store_true", help="Only the throughput measure.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(NOTHING)
        return 0
    started = time.perf_counter()
    results: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}",
        "amp_dtype": str(Precision(torch.device("cuda")).dtype).removeprefix("torch."),
    }
    if not args.skip_tests:
        results["tests"] = run_cuda_tests()
    with tempfile.TemporaryDirectory() as folder:
        results["throughput"] = measure_throughput(Path(folder), args.images)
    results["seconds"] = time.perf_counter() - started
    write_results(results, Path(args.out), render(results))
    # The measures are written either way; a failed cuda test still fails the command.
    return results.get("tests", {}).get("exit_status", 0)


if __name__ == "__main__":
    sys.exit(main())
