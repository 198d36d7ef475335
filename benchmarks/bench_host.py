"""The host side's ceiling (issue 39): how many images a second the loader path (decode, crop, render, collate
and the store's reads) feeds when the networks cost nothing.

Teachers and student are :class:`FreeNet`: a module that returns logits and blocks of the right shapes from a
global average of its input, so nearly all of a timing is the host's own work. Every figure is a ratio of two
timings of the same run, or a rate beside its baseline (the plain torchvision ImageFolder + DataLoader decode of
the same files); the repeats alternate and the median is taken (see bench.py).

    python benchmarks/bench_host.py [--out bench/host.json] [--repeats 3] [--images 300] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from meal_cache.data.datasets import load_dataset
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import model_payload, save_checkpoint
from meal_cache.nets.models import create_model

HOST_WORKERS = 0  # decoding in the timed process: one core, whatever the machine's load
HOST_BATCH = 64
HOST_TEACHER = "resnet8_w4"


def host_folder(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """A generated ImageFolder of ``images`` training JPEGs of ``size`` px a side, 10 classes (tests/imagefolder.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from imagefolder import make_image_folder

    return make_image_folder(root, 10, images // 10, 1, sizes=(size, size), seed=seed)


def host_teacher(folder: Path, spec: str, size: int, arch: str = HOST_TEACHER) -> str:
    """An untrained checkpoint of ``arch`` for ``spec`` (speed does not depend on what a network learnt)."""
    dataset = load_dataset(spec, image_size=size)
    torch.manual_seed(0)
    model = create_model(arch, dataset.num_classes, dataset.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / f"{arch}.pt", model_payload(model, arch, dataset, {}, 0, [], {}))
    return arch


def extract_seconds(root: Path, teacher_dir: Path, teacher: str, size: int, views: int, out: Path) -> float:
    """Wall seconds of one extract of ``views`` views (a fresh store, the dataset loaded afresh)."""
    spec = f"imagefolder:{root}"
    config = ExtractConfig(teachers=[teacher], data=spec, image_size=size, views=views, batch_size=HOST_BATCH,
                           teacher_dir=str(teacher_dir), device="cpu", workers=HOST_WORKERS, preset="kd")  # fmt: skip
    started = time.perf_counter()
    extract(config, out, overwrite=True, progress=False, dataset=load_dataset(spec, image_size=size))
    return time.perf_counter() - started


def time_extract_views(work: Path, images: int, size: int, views: int, repeats: int) -> dict:
    """extract's seconds over a generated folder with ``views`` views, ``repeats`` times."""
    root = host_folder(work / "folder", images, size)
    teacher_dir = work / "teachers"
    teacher = host_teacher(teacher_dir, f"imagefolder:{root}", size)
    extract_seconds(root, teacher_dir, teacher, size, 1, work / "warm.zarr")  # page cache, imports
    times = [extract_seconds(root, teacher_dir, teacher, size, views, work / "s.zarr") for _ in range(repeats)]
    return {"images": images, "size": size, "views": views, "seconds": times, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(time_extract_views(Path(work), args.images, args.size, args.views, args.repeats)))


if __name__ == "__main__":
    main()
