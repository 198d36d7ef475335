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
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import meal_cache.extract.run as extract_run
from meal_cache.cached_views import CachedViews
from meal_cache.data.datasets import load_dataset
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import model_payload, save_checkpoint
from meal_cache.nets.models import create_model
from meal_cache.store.schema import BlockSpec

HOST_WORKERS = 0  # decoding in the timed process: one core, whatever the machine's load
HOST_BATCH = 64
HOST_TEACHER = "resnet8_w4"
# The --for presets whose write rate the section reports: a logit-only method, MEAL's blocks, FitNet's hint, AT's
# maps, and everything.
HOST_WRITE_PRESETS = ("kd", "meal", "fitnet", "at", "all")
HOST_TARGETS = {
    "host_extract_views8_per_decode_ratio": ("<=", 1.5),
    "host_extract_vs_plain_decode": (">=", 0.9),
    "host_distill_vs_plain_decode": (">=", 0.9),
}


class FreeNet(nn.Module):
    """A stand-in for a network that costs next to nothing: logits and one output per block of the real network's
    shapes (``blocks``, named as its block modules, so extract's forward hooks find them), taken from the input's
    pixels without arithmetic, so the store gets values that are not constant (and compress as data, not as
    zeros)."""

    def __init__(self, blocks: list[BlockSpec], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.names = [b.name for b in blocks]  # top-level children: BlockTap finds them by these names
        for block in blocks:
            self.add_module(block.name, _Shaped(block.channels, block.height, block.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            self.get_submodule(name)(x)
        return x.flatten(1)[:, : self.num_classes]


class _Shaped(nn.Module):
    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.channels, self.height, self.width = channels, height, width

    def picked(self, x: torch.Tensor) -> torch.Tensor:
        """Every s-th pixel of ``x``, the block's height and width of them: a view, no arithmetic."""
        step = max(1, x.shape[-1] // self.width)
        picked = x[:, :, ::step, ::step][:, :, : self.height, : self.width]
        if picked.shape[-2:] != (self.height, self.width):  # a map larger than the input
            picked = F.interpolate(picked, (self.height, self.width))
        return picked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.picked(x[:, :1]).expand(-1, self.channels, -1, -1)  # the first channel, broadcast


class FreeDenseNet(FreeNet):
    """:class:`FreeNet` with a head a dense store can read at each position (``extract --dense``): the logits are
    the last block's output averaged over its positions, so the mean of the per-position logits is the whole
    image's, as for a classifier after global average pooling. The last block's channels are the input's colours
    at their own scales (a buffer), so the classes' logits differ from one image to the next."""

    def __init__(self, blocks: list[BlockSpec], num_classes: int) -> None:
        super().__init__(blocks, num_classes)
        last = blocks[-1]
        self.add_module(last.name, _Coloured(last.channels, last.height, last.width))
        # No weights to learn, but the block probes (nets.taps) find the device from a parameter.
        self.device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def block_names(self) -> list[str]:
        return self.names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            out = self.get_submodule(name)(x)
        pooled = out.mean((2, 3))  # (rows, C): a row per position where the dense pass spreads the last block
        return pooled.repeat(1, -(-self.num_classes // pooled.shape[1]))[:, : self.num_classes]


class _Coloured(_Shaped):
    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__(channels, height, width)
        self.register_buffer("scales", torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = self.picked(x)
        colours = picked.repeat(1, -(-self.channels // picked.shape[1]), 1, 1)[:, : self.channels]
        return colours * self.scales


@contextlib.contextmanager
def free_teachers(widen: int = 1, dense: bool = False) -> Iterator[None]:
    """extract's teachers resolved as usual (checkpoint, blocks, what the store records), their networks swapped
    for :class:`FreeNet` (``dense``: :class:`FreeDenseNet`) of the same block shapes (``widen`` times the channels:
    a small checkpoint standing in for a wide network's blocks): what extract then spends is its own work."""
    real = extract_run.resolve_teacher

    def resolved(*args, **kwargs):
        teacher = real(*args, **kwargs)
        blocks = [dataclasses.replace(b, name=b.name.replace(".", "_"), channels=b.channels * widen)
                  for b in teacher.spec.blocks]  # fmt: skip
        spec = dataclasses.replace(teacher.spec, blocks=blocks)
        network = (FreeDenseNet if dense else FreeNet)(blocks, len(spec.classes))
        return dataclasses.replace(teacher, model=network.eval(), spec=spec)

    extract_run.resolve_teacher = resolved
    try:
        yield
    finally:
        extract_run.resolve_teacher = real


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


def extract_seconds(root: Path, teacher_dir: Path, teacher: str, size: int, views: int, out: Path,
                    preset: str | None = "kd", dense: bool = False) -> float:  # fmt: skip
    """Wall seconds of one extract of ``views`` views at the ``--for`` preset, or of a dense store (``dense``: the
    whole image once, maps for any crop); a fresh store, the dataset loaded afresh."""
    spec = f"imagefolder:{root}"
    config = ExtractConfig(teachers=[teacher], data=spec, image_size=size, views=views, batch_size=HOST_BATCH,
                           teacher_dir=str(teacher_dir), device="cpu", workers=HOST_WORKERS,
                           preset=None if dense else preset, dense=dense)  # fmt: skip
    started = time.perf_counter()
    extract(config, out, overwrite=True, progress=False, dataset=load_dataset(spec, image_size=size))
    return time.perf_counter() - started


def plain_decode_seconds(root: Path, size: int) -> tuple[float, int]:
    """One pass of what a user writes with torchvision over the same files: ImageFolder (PIL), RandomResizedCrop
    to ``size`` and a flip, float conversion and normalisation, a DataLoader of batches, in this process."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # fmt: skip
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), transform=transform),
                                         batch_size=HOST_BATCH, shuffle=True, num_workers=HOST_WORKERS)  # fmt: skip
    started, images = time.perf_counter(), 0
    for batch, _ in loader:
        images += len(batch)
    return time.perf_counter() - started, images


def batch_source_seconds(store: Path, epoch: int) -> tuple[float, int]:
    """One epoch of distill's batch source (:class:`CachedViews`: the store's targets of a view read whole, the
    rows' pixels decoded and rendered, normalised, batched) with no student: its seconds and images."""
    started, images = time.perf_counter(), 0
    with CachedViews(store, batch_size=HOST_BATCH, seed=0, device="cpu", workers=HOST_WORKERS,
                     features=()) as views:  # fmt: skip
        for batch in views.epoch(epoch):
            images += len(batch["pixels"])
    return time.perf_counter() - started, images


def stored_bytes(store: Path) -> int:
    """The bytes of every file of a local store (what the disk or a bucket holds)."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def bench_host(work: Path, repeats: int, images: int = 300, size: int = 64, views: int = 8) -> dict:
    """The host's ceiling on a generated folder of ``images`` JPEGs of ``size`` px: extract with free teachers at
    1 and ``views`` views and of a dense store, distill's batch source over the ``views``-view store and over the
    dense one (fresh crops' targets cut from the maps), the plain torchvision decode of
    the same files, and the bytes a second extract writes at each of HOST_WRITE_PRESETS (one view); the rounds
    alternate, and each figure is the median of its ``repeats``."""
    root = host_folder(work / "host-folder", images, size)
    teacher_dir = work / "host-teachers"
    teacher = host_teacher(teacher_dir, f"imagefolder:{root}", size)
    store = work / "host-views.zarr"
    dense_store = work / "host-dense.zarr"
    seconds: dict[str, list[float]] = {"plain": [], "extract1": [], f"extract{views}": [], "batch_source": [],
                                       "extract_dense": [], "dense_batch_source": []}  # fmt: skip
    written: dict[str, list[float]] = {preset: [] for preset in HOST_WRITE_PRESETS}
    bytes_per_image: dict[str, float] = {}
    with free_teachers():
        extract_seconds(root, teacher_dir, teacher, size, 1, work / "host-warm.zarr")  # imports, page cache
        for round_ in range(repeats):
            plain_s, plain_images = plain_decode_seconds(root, size)
            seconds["plain"].append(plain_s / plain_images)
            seconds["extract1"].append(extract_seconds(root, teacher_dir, teacher, size, 1,
                                                       work / "host-1.zarr") / images)  # fmt: skip
            seconds[f"extract{views}"].append(extract_seconds(root, teacher_dir, teacher, size, views, store) / images)
            source_s, source_images = batch_source_seconds(store, round_)
            seconds["batch_source"].append(source_s / source_images)
            with free_teachers(dense=True):
                seconds["extract_dense"].append(extract_seconds(root, teacher_dir, teacher, size, 1, dense_store,
                                                                dense=True) / images)  # fmt: skip
            dense_s, dense_images = batch_source_seconds(dense_store, round_)
            seconds["dense_batch_source"].append(dense_s / dense_images)
            for preset in HOST_WRITE_PRESETS:
                out = work / f"host-{preset}.zarr"
                preset_s = extract_seconds(root, teacher_dir, teacher, size, 1, out, preset=preset)
                stored = stored_bytes(out)  # the same bytes every round: one extract's settings, one seed
                written[preset].append(stored / preset_s)
                bytes_per_image[preset] = stored / images
    per_image = {key: statistics.median(values) for key, values in seconds.items()}
    return {
        "host_images": images, "host_size": size, "host_views": views, "host_workers": HOST_WORKERS,
        "host_seconds_per_image": seconds,
        "host_plain_decode_images_per_s": 1 / per_image["plain"],
        "host_extract_views1_images_per_s": 1 / per_image["extract1"],
        f"host_extract_views{views}_images_per_s": 1 / per_image[f"extract{views}"],
        "host_distill_batch_source_images_per_s": 1 / per_image["batch_source"],
        "host_distill_batch_source_batches_per_s": 1 / (per_image["batch_source"] * HOST_BATCH),
        "host_extract_dense_images_per_s": 1 / per_image["extract_dense"],
        "host_distill_dense_batch_source_batches_per_s": 1 / (per_image["dense_batch_source"] * HOST_BATCH),
        "host_distill_dense_vs_plain_decode": per_image["plain"] / per_image["dense_batch_source"],
        "host_extract_bytes_per_s": {preset: statistics.median(rates) for preset, rates in written.items()},
        "host_extract_bytes_per_image": bytes_per_image,
        f"host_extract_views{views}_per_decode_ratio": per_image[f"extract{views}"] / per_image["extract1"],
        "host_extract_vs_plain_decode": per_image["plain"] / per_image["extract1"],
        "host_distill_vs_plain_decode": per_image["plain"] / per_image["batch_source"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/host.json")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        results = bench_host(Path(work), args.repeats, args.images, args.size, args.views)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
