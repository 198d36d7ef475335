"""`make bench`: the cache's speed and size as ratios of two measurements taken in the same run.

Every figure is a ratio (or a rate beside its baseline) measured here and now, each timing the median of
repeats, so it holds on a noisy shared machine. Writes bench/results.json and prints a table.

    python benchmarks/bench.py [--out bench/results.json] [--repeats 3] [--only digits|stream]

`--only stream` runs only the streaming-image section (generated JPEG folders, about 6 minutes on 2 cores);
`--only host` the host's ceiling (benchmarks/bench_host.py, about 1 minute); `--only memory` distill's memory per
view against the view's stored bytes (benchmarks/bench_memory.py, about 1 minute); `--only shards` a store's
objects per view and its read rate with and without Zarr sharding (benchmarks/bench_shard_chunks.py, 12 s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from bench_dense import DENSE_REPORTED, DENSE_TARGETS, bench_dense
from bench_host import HOST_TARGETS, bench_host
from bench_memory import MEMORY_REPORTED, MEMORY_TARGETS, bench_memory
from bench_shard_chunks import bench_shard_chunks

from meal_cache.data.datasets import ImageDataset, load_dataset
from meal_cache.distill import DistillConfig, InMemoryBatches, StreamingBatches, ViewFeed, distill
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig, fitted_to_data, store_presets
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.nets.checkpoint import model_payload, save_checkpoint
from meal_cache.nets.models import create_model
from meal_cache.nets.taps import block_shapes
from meal_cache.nets.teachers import resolve_teacher
from meal_cache.runtime import Precision, resolve_device
from meal_cache.store.codecs import quantize_rows
from meal_cache.store.encodings.topk import encode_topk
from meal_cache.store.teacher_store import open_store
from meal_cache.views import augment

TARGETS = {
    "extract_overhead": ("<=", 1.10),
    "cache_tax": ("<=", 1.15),
    "offline_speedup_mean": (">=", 2.0),
    "loader_in_memory_samples_per_s": (">=", 100_000),
}


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def untrained_teacher(folder: Path, name: str, arch: str, dataset: ImageDataset) -> None:
    """A teacher checkpoint with initial weights: speed does not depend on what a network has learnt."""
    torch.manual_seed(0)
    model = create_model(arch, dataset.num_classes, dataset.image_size)
    save_checkpoint(folder / f"{name}.pt", model_payload(model, arch, dataset, {}, 0, [], {}))


def bench_extract(work: Path, digits: ImageDataset, repeats: int, device: str = "cpu") -> dict:
    """extract's wall time over the teachers' bare forward passes on the same augmented images (on CUDA under
    the same autocast and memory layout extract uses), and both as images per second."""
    teachers = work / "teachers"
    teachers.mkdir()
    for arch in ("resnet20", "densenet_k12"):
        untrained_teacher(teachers, arch, arch, digits)
    config = ExtractConfig(teachers=["resnet20", "densenet_k12"], views=4, teacher_dir=str(teachers), device=device)
    precision = Precision(resolve_device(device))
    resolved = [resolve_teacher(n, teachers, digits, config.blocks, config.grid) for n in config.teachers]
    models = [precision.prepare(t.model) for t in resolved]
    recipe = augment.recipe_for(digits.recipe, digits.image_size)
    sizes = augment.square_sizes(len(digits.train), digits.image_size)
    views = [augment.draw(recipe, sizes, augment.view_generator(0, v)) for v in range(4)]
    batches = [augment.apply(digits.train.images, v, t.mean, t.std, channels_last=precision.channels_last)
               .to(precision.device) for t in resolved for v in views]  # fmt: skip

    def bare() -> None:
        with torch.inference_mode(), precision.autocast():
            for index, batch in enumerate(batches):
                model = models[index // len(views)]
                for chunk in batch.split(config.batch_size):
                    model(chunk)
        if precision.on_cuda:
            torch.cuda.synchronize()

    def full() -> None:
        extract(config, work / "extract.zarr", overwrite=True, progress=False, dataset=digits)

    bare_times, full_times = [], []
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits both alike
        bare_times.append(median_time(bare, 1))
        full_times.append(median_time(full, 1))
    bare_s, full_s = statistics.median(bare_times), statistics.median(full_times)
    images = 4 * 2 * len(digits.train)
    return {"device": str(precision.device), "extract_s": full_s, "bare_forward_s": bare_s,
            "extract_overhead": full_s / bare_s, "images": images, "extract_images_per_s": images / full_s,
            "bare_forward_images_per_s": images / bare_s}  # fmt: skip


def bench_cache_tax(work: Path, digits: ImageDataset, store: Path, repeats: int) -> dict:
    """A MEAL epoch from the cache (discriminators on) over an epoch of the same student trained alone.

    The three runs alternate, ``repeats`` rounds of two epochs each, and each figure is the median of the
    second epochs (the first warms up), so drift in the machine's speed hits all three alike."""
    seconds: dict[str, list[float]] = {"alone": [], "meal": [], "kd": []}
    for _ in range(repeats):
        alone = train_supervised(TrainConfig(arch="resnet20", epochs=2, device="cpu"), work / "alone.pt",
                                 overwrite=True, progress=False, dataset=digits)  # fmt: skip
        seconds["alone"].append(alone["history"][1]["seconds"])
        for method in ("meal", "kd"):
            run = distill(DistillConfig(store=str(store), student="resnet20", method=method, epochs=2, device="cpu"),
                          work / method, overwrite=True, progress=False, dataset=digits)  # fmt: skip
            seconds[method].append(run["history"][1]["seconds"])
    alone_s, meal_s, kd_s = (statistics.median(seconds[k]) for k in ("alone", "meal", "kd"))
    return {"student": "resnet20", "alone_epoch_s": alone_s, "meal_epoch_s": meal_s, "kd_epoch_s": kd_s,
            "cache_tax": meal_s / alone_s, "cache_tax_kd": kd_s / alone_s}  # fmt: skip


def bench_offline_speedup(work: Path, repeats: int) -> dict:
    """An online MEAL epoch (teachers in the loop) over the same epoch from the cache: resnet50 + densenet121
    teachers, a resnet18 student, 32 px images."""
    data = load_dataset("fake:96", image_size=32)
    teachers = work / "big"
    teachers.mkdir()
    for arch in ("resnet50", "densenet121"):
        untrained_teacher(teachers, arch, arch, data)
    store = work / "big.zarr"
    extract(ExtractConfig(teachers=["resnet50", "densenet121"], data="fake:96", image_size=32, views=1,
                          teacher_dir=str(teachers), batch_size=32, device="cpu"),
            store, overwrite=True, progress=False, dataset=data)  # fmt: skip
    results = {"images": len(data.train)}
    for selection in ("mean", "random"):
        seconds = {}
        for online in (False, True):
            config = DistillConfig(store=str(store), student="resnet18", epochs=repeats, batch_size=32,
                                   teacher_selection=selection, online=online, teacher_dir=str(teachers),
                                   teachers=["resnet50", "densenet121"] if online else [], device="cpu")  # fmt: skip
            run = distill(config, work / f"big-{selection}-{online}", overwrite=True, progress=False, dataset=data)
            seconds["online" if online else "cached"] = statistics.median(h["seconds"] for h in run["history"])
        results[f"cached_epoch_s_{selection}"] = seconds["cached"]
        results[f"online_epoch_s_{selection}"] = seconds["online"]
        results[f"offline_speedup_{selection}"] = seconds["online"] / seconds["cached"]
    return results


def bench_loader(store_path: Path, repeats: int) -> dict:
    """Samples per second from the store into training batches, against plain tensor indexing."""
    store = open_store(store_path)
    keys = [k for t in store.teacher_names for k in store.feature_keys(t)]
    device = torch.device("cpu")
    n = store.n

    def drain(source) -> None:
        for _ in source.epoch(0, 0, None):
            pass

    feed = ViewFeed(store, keys, device)
    memory = InMemoryBatches(feed, n, 64, seed=0)
    memory_times = []
    for _ in range(repeats):
        feed.prefetch(0)
        feed._pending[0].result()  # the view is in memory before the clock starts, as prefetching makes it
        started = time.perf_counter()
        drain(memory)
        memory_times.append(time.perf_counter() - started)
    memory_s = statistics.median(memory_times)
    memory.close()
    load_s = median_time(lambda: ViewFeed(store, keys, device)._read(0), repeats)
    stream = StreamingBatches(store, keys, device, 64, seed=0, buffer_chunks=2)
    stream_s = median_time(lambda: drain(stream), repeats)
    stream.close()
    tensors = {k: torch.from_numpy(store.array(k)[0]) for k in keys}

    def plain() -> None:
        for rows in torch.randperm(n).split(64):
            {k: v[rows] for k, v in tensors.items()}

    plain_s = median_time(plain, repeats)
    return {
        "arrays": len(keys),
        "loader_in_memory_samples_per_s": n / memory_s,
        "loader_view_load_samples_per_s": n / load_s,
        "loader_streaming_samples_per_s": n / stream_s,
        "plain_indexing_samples_per_s": n / plain_s,
        "in_memory_vs_plain": plain_s / memory_s,
    }


def bench_size(work: Path, digits: ImageDataset) -> dict:
    """Stored bytes per sample per view for each store option, against raw float32."""
    teachers = work / "teachers"
    options = {
        "float32, no codec": dict(dtype="float32", codec="none"),
        "float16, no codec": dict(dtype="float16", codec="none"),
        "float16, zstd:3 (default)": dict(),
        "float16, blosc:5": dict(codec="blosc:5"),
        "float16, zstd:3, grid 2": dict(grid=2),
        "float16, zstd:3, blocks only": dict(features=["blocks"]),
        "float16, zstd:3, maps only": dict(features=["maps"]),
        "float16, zstd:3, last block only": dict(blocks="1"),
        "float16, zstd:3, keep 6 bits": dict(keep_bits=6),
        "float16, zstd:3, keep 4 bits": dict(keep_bits=4),
        "float16, zstd:3, keep 2 bits": dict(keep_bits=2),
        "float16, zstd:3, keep 4 bits, last block only": dict(keep_bits=4, blocks="1"),
        "8-bit blocks and maps, zstd:3": dict(quantize=8),
        "8-bit blocks and maps, zstd:3, last block only": dict(quantize=8, blocks="1"),
    }
    rows = {}
    for label, overrides in options.items():
        config = ExtractConfig(teachers=["resnet20", "densenet_k12"], views=1, teacher_dir=str(teachers),
                               device="cpu", **overrides)  # fmt: skip
        store = extract(config, work / "size.zarr", overwrite=True, progress=False, dataset=digits)
        sizes = store.sizes()
        stored = sum(v["stored"] for v in sizes.values())
        raw = sum(v["raw_float32"] for v in sizes.values())
        rows[label] = {"bytes_per_sample_view": stored / store.n, "float32_bytes_per_sample_view": raw / store.n,
                       "vs_float32": raw / stored}  # fmt: skip
    return rows


def bench_lossy_accuracy(work: Path, digits: ImageDataset, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """The student's accuracy cost of lossy stores: MEAL from each store, same seeds, paired against the
    lossless default. Teachers are trained briefly (8 epochs) so their outputs carry real structure."""
    teachers = work / "trained"
    teachers.mkdir()
    for arch in ("resnet20", "densenet_k12"):
        train_supervised(TrainConfig(arch=arch, epochs=8, device="cpu"), teachers / f"{arch}.pt", progress=False,
                         dataset=digits)  # fmt: skip
    options = {"lossless": {}, "keep 6 bits": dict(keep_bits=6), "keep 4 bits": dict(keep_bits=4),
               "keep 2 bits": dict(keep_bits=2), "8-bit blocks and maps": dict(quantize=8)}  # fmt: skip
    top1: dict[str, list[float]] = {}
    for label, overrides in options.items():
        config = ExtractConfig(teachers=["resnet20", "densenet_k12"], views=4, teacher_dir=str(teachers),
                               device="cpu", **overrides)  # fmt: skip
        store = work / f"lossy-{label.replace(' ', '-')}.zarr"
        extract(config, store, overwrite=True, progress=False, dataset=digits)
        for seed in seeds:
            run = distill(DistillConfig(store=str(store), student="resnet8_w4", epochs=10, seed=seed, device="cpu"),
                          work / "lossy-run", overwrite=True, progress=False, dataset=digits)  # fmt: skip
            top1.setdefault(label, []).append(run["test"]["top1"])
    base = top1["lossless"]
    return {
        label: {"top1": values, "mean": statistics.fmean(values),
                "mean_difference": statistics.fmean(a - b for a, b in zip(values, base, strict=True))}
        for label, values in top1.items()
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- compact stores

COMPACT_TARGETS = {
    # The blocks' budget, what --for meal's PCA to 128 is sized for; its logits are every float16 one (2,000 B at
    # 1,000 classes), since top-10 at T = 4 lost 18 points of top-1 at 100 classes (docs/results.md, "At the class
    # counts users have"): store_bytes_meal_224 and the top-10 row are reported beside it.
    "store_bytes_meal_224_blocks": ("<=", 600),
    "store_bytes_kd_224_top5": ("<=", 60),
    "topk_kl_T4": ("<=", 0.01),
    # The bar for meal's 8-bit blocks and maps (docs/design.md, "Lossy stores"): the maps' soft-ce block loss
    # moves by less than the logits' KL target, and blocks and maps by less than 1 % in L2.
    "meal_maps_soft_ce_change": ("<=", 0.01),
    "meal_relative_l2": ("<=", 0.01),  # the pooled blocks --for meal stores
    "meal_maps_relative_l2": ("<=", 0.01),
}
TOPK_DEFAULT = 5
TOPK_CURVE = (1, 2, 3, 5, 8, 10, 20, 50)  # issue 16's k, where the classes allow, and digits' finer points
MAP_ENCODINGS = {"keep 6 bits": dict(keep_bits=6), "keep 4 bits": dict(keep_bits=4), "8-bit": dict(quantize=8)}


def sample_at_bytes_of(k: int) -> int:
    """How many sampled classes (2-byte class and 1-byte count each) fit in the bytes of top-k (4k + 4)."""
    return (4 * k + 4) // 3


PROJECT_DEFAULT = 128  # the D the bench reports --project at (not yet --for meal's default)


def preset_logits_bytes(config: ExtractConfig, classes: int) -> int:
    """Raw bytes of one row's logits under ``config``'s encoding (every float16 logit where it keeps no other)."""
    chosen = config.logits_choice()
    if chosen is None:
        return classes * np.dtype(config.dtype).itemsize
    return chosen.encoding.row_bytes(chosen.k, classes, config.dtype)


def meal_bytes_224(arch: str) -> dict:
    """Raw bytes a row and view for one 1,000-class teacher at 224 px, from the network's own block shapes
    (untrained: bytes do not need weights): ``--for meal`` keeps its preset's logits (every one at 1,000 classes)
    and the last 3 blocks' pooled channels (grid 1), 8-bit, projected to the preset's D where wider; beside it the
    blocks alone, with top-10 logits, every channel, and MEAL's reference maps of the same blocks."""
    model = create_model(arch, 1000, 224)
    shapes = block_shapes(model, 224)
    last = model.block_names[-3:]
    channels = [shapes[name][0] for name in last]
    maps = [shapes[name][1] * shapes[name][2] for name in last]
    # Bytes as the store's own encoders write one row: float16 logits, top-k, float16 and 8-bit values.
    logits = np.zeros((1, 1000), dtype=np.float16)
    topk = sum(a.nbytes for a in encode_topk(logits, TOPK_DEFAULT, "float16").values())
    preset = store_presets()["meal"]
    asked = ExtractConfig(teachers=[arch], preset="meal")
    fitted = fitted_to_data(asked.resolved(), asked, 1000)
    preset_logits = preset_logits_bytes(fitted, 1000)
    top10 = sum(a.nbytes for a in encode_topk(logits, 10, "float16").values())

    def quantized(sizes: list[int]) -> int:
        return sum(sum(a.nbytes for a in quantize_rows(np.zeros((1, m), np.float16))) for m in sizes)

    return {
        "channels": dict(zip(last, channels, strict=True)),
        "maps": dict(zip(last, maps, strict=True)),
        "meal": preset_logits + quantized([min(c, preset.project) for c in channels]),
        "meal_blocks": quantized([min(c, preset.project) for c in channels]),
        "meal_top10": top10 + quantized([min(c, preset.project) for c in channels]),
        "meal_every_channel": logits.nbytes + quantized(channels),
        "meal_float16": logits.nbytes + 2 * sum(channels),
        "meal_top5": topk + quantized(channels),
        # extract --project 128: blocks wider than 128 channels stored as 128 numbers (issue 28's first part)
        "meal_project128_top5": topk + quantized([min(c, PROJECT_DEFAULT) for c in channels]),
        "meal_maps": logits.nbytes + quantized(maps),
        "meal_maps_top5": topk + quantized(maps),
        "kd": logits.nbytes,
        "kd_top5": topk,
    }


def _worst(teachers: list[dict]) -> dict:
    """The worst teacher's figures: the largest KL and block errors (pooled blocks and maps apart), the lowest
    top-1 agreement."""
    worst = {"kl_T1": max(t["kl"]["T=1"] for t in teachers), "kl_T4": max(t["kl"]["T=4"] for t in teachers),
             "top1_agreement": min(t["top1_agreement"] for t in teachers),
             "gradient_bias_T4": max(t["gradient"]["T=4"]["bias"] for t in teachers),
             "gradient_error_T4": max(t["gradient"]["T=4"]["error"] for t in teachers)}  # fmt: skip
    for kind in ("blocks", "maps"):
        errors = [v for t in teachers for k, v in t["blocks"].items() if k.startswith(kind + "/")]
        if errors:
            worst[f"relative_l2_{kind}"] = max(e["relative_l2"] for e in errors)
    changes = [v["soft_ce_change"] for t in teachers for v in t["blocks"].values() if "soft_ce_change" in v]
    if changes:
        worst["soft_ce_change"] = max(changes)
    return worst


def bench_compact(work: Path, digits: ImageDataset) -> dict:
    """Issue 16's sizes at 224 px for 1,000 classes (resnet50, densenet121), and ``info --fidelity`` of every lossy
    option against the lossless store on the digits teachers trained by the lossy-accuracy section: top-k logits
    over k, and meal's maps under bit rounding and 8-bit codes."""
    sizes = {arch: meal_bytes_224(arch) for arch in ("resnet50", "densenet121")}
    if not (work / "trained").is_dir():  # run alone (--only compact): train the teachers as that section does
        (work / "trained").mkdir()
        for arch in ("resnet20", "densenet_k12"):
            train_supervised(TrainConfig(arch=arch, epochs=8, device="cpu"), work / "trained" / f"{arch}.pt",
                             progress=False, dataset=digits)  # fmt: skip

    def fidelity(name: str, reference: ExtractConfig, **lossy) -> dict:
        paths = work / f"{name}-reference.zarr", work / f"{name}.zarr"
        if not paths[0].exists():
            extract(reference, paths[0], overwrite=True, progress=False, dataset=digits)
        opened = extract(dataclasses.replace(reference, **lossy), paths[1], overwrite=True, progress=False,
                         dataset=digits)  # fmt: skip
        stored = sum(v["stored"] for v in opened.sizes().values())
        worst = _worst(list(store_fidelity(str(paths[1]), str(paths[0]))["teachers"].values()))
        return {**worst, "bytes_per_row_view": stored / (opened.n * opened.num_views)}

    base = ExtractConfig(teachers=["resnet20", "densenet_k12"], views=2, teacher_dir=str(work / "trained"),
                         device="cpu")  # fmt: skip
    kd = dataclasses.replace(base, preset="kd")
    curve = {k: fidelity(f"topk-{k}", kd, logits=f"topk:{k}") for k in TOPK_CURVE if k <= digits.num_classes}
    # Sampled classes in the bytes of each top-k: 3 bytes a draw against 4k + 4 (k = 5: 8 draws in 24 bytes).
    sampled = {k: fidelity(f"sample-{k}", kd, logits=f"sample:{sample_at_bytes_of(k)}") for k in curve}
    # What --for meal stores (pooled blocks) and the reference's maps of the same blocks, lossless.
    lossless_meal = dataclasses.replace(base, features=["blocks", "maps"], blocks="3")
    maps = {label: fidelity(f"maps-{label.replace(' ', '-')}", lossless_meal, **encoding)
            for label, encoding in MAP_ENCODINGS.items()}  # fmt: skip
    return {
        "sizes_224": sizes,
        "store_bytes_meal_224": max(v["meal"] for v in sizes.values()),
        "store_bytes_meal_224_blocks": max(v["meal_blocks"] for v in sizes.values()),
        "store_bytes_meal_224_top10": max(v["meal_top10"] for v in sizes.values()),
        "store_bytes_meal_224_float16": max(v["meal_float16"] for v in sizes.values()),
        "store_bytes_meal_224_every_channel": max(v["meal_every_channel"] for v in sizes.values()),
        "store_bytes_meal_224_top5": max(v["meal_top5"] for v in sizes.values()),
        "store_bytes_meal_224_project128_top5": max(v["meal_project128_top5"] for v in sizes.values()),
        "store_bytes_meal_maps_224": max(v["meal_maps"] for v in sizes.values()),
        "store_bytes_meal_maps_224_top5": max(v["meal_maps_top5"] for v in sizes.values()),
        "store_bytes_kd_224_top5": max(v["kd_top5"] for v in sizes.values()),
        "topk_curve_digits": curve,
        "topk_kl_T4": curve[TOPK_DEFAULT]["kl_T4"],
        "sampled_curve_digits": sampled,
        "sampled_kl_T4": sampled[TOPK_DEFAULT]["kl_T4"],
        "topk_gradient_bias_T4": curve[TOPK_DEFAULT]["gradient_bias_T4"],
        "sampled_gradient_bias_T4": sampled[TOPK_DEFAULT]["gradient_bias_T4"],
        "sampled_gradient_error_T4": sampled[TOPK_DEFAULT]["gradient_error_T4"],
        "topk_top1_agreement": curve[TOPK_DEFAULT]["top1_agreement"],
        "maps_fidelity_digits": maps,
        "meal_maps_soft_ce_change": maps["8-bit"]["soft_ce_change"],
        "meal_relative_l2": maps["8-bit"]["relative_l2_blocks"],
        "meal_maps_relative_l2": maps["8-bit"]["relative_l2_maps"],
    }


# ---------------------------------------------------------------------------------------------- many views

VIEWS_TARGETS = {
    "views64_extract_per_view_ratio": ("<=", 1.05),
    "views64_peak_rss_ratio": ("<=", 1.10),
}
VIEW_COUNTS = (4, 64)


def bench_views(work: Path, digits: ImageDataset) -> dict:
    """Many views as a normal case: extract's seconds and stored bytes per view with 64 views against 4 (one
    teacher, logits and pooled blocks), and the peak RSS of `meal-cache distill` (kd, 4 epochs) from each store
    as a separate process, so nothing held by this one counts."""
    teachers = work / "views-teachers"
    teachers.mkdir(exist_ok=True)
    untrained_teacher(teachers, "resnet20", "resnet20", digits)
    cli = str(Path(sys.executable).with_name("meal-cache"))
    result: dict = {"views": list(VIEW_COUNTS), "extract_s_per_view": [], "stored_bytes_per_view": [],
                    "distill_peak_rss_mb": []}  # fmt: skip
    for count in VIEW_COUNTS:
        store = work / f"views{count}.zarr"
        config = ExtractConfig(teachers=["resnet20"], views=count, teacher_dir=str(teachers), device="cpu",
                               features=["blocks"])  # fmt: skip
        started = time.perf_counter()
        extract(config, store, overwrite=True, progress=False, dataset=digits)
        seconds = time.perf_counter() - started
        opened = open_store(store)
        result["extract_s_per_view"].append(seconds / count)
        result["stored_bytes_per_view"].append(sum(v["stored"] for v in opened.sizes().values()) / count)
        result["distill_peak_rss_mb"].append(peak_rss_mb([
            cli, "distill", "--store", str(store), "--student", "resnet8_w4", "--method", "kd", "--epochs", "4",
            "--device", "cpu", "--quiet", "--out", str(work / f"views{count}-run")]))  # fmt: skip
    result["views64_extract_per_view_ratio"] = result["extract_s_per_view"][1] / result["extract_s_per_view"][0]
    result["views64_peak_rss_ratio"] = result["distill_peak_rss_mb"][1] / result["distill_peak_rss_mb"][0]
    return result


# ---------------------------------------------------------------------------------------------- streaming images

STREAM_TARGETS = {
    "stream_extract_overhead": ("<=", 1.05),
    "stream_cache_tax_kd": ("<=", 1.00),
    "stream_multicrop_ratio": ("<=", 0.85),
}
STREAM_TEACHERS = ("resnet8_w4", "densenet_k12")
STREAM_STUDENT = "resnet8_w4"
STREAM_BATCH = 64  # extract and distill alike: CIFAR-style networks keep full resolution, 224 px batches are large
STREAM_WORKERS = 1  # one decoding process beside the training process: the 2-core machine's split


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """What the streaming measures run: the 2-core CPU's networks and split by default; benchmarks/gpu_check.py
    passes 224 px ImageNet networks, more workers and ``cuda``. On CUDA the plain torchvision pipeline runs under
    the same autocast, channels_last and pinned memory as meal-cache, so the two compare like with like."""

    teachers: tuple[str, ...] = STREAM_TEACHERS
    student: str = STREAM_STUDENT
    batch: int = STREAM_BATCH
    workers: int = STREAM_WORKERS
    device: str = "cpu"
    decode: str = "auto"  # where meal-cache decodes the JPEGs (--decode); the plain pipeline always on the CPU

    @property
    def precision(self) -> Precision:
        return Precision(resolve_device(self.device))

    def synchronize(self) -> None:
        # CUDA runs asynchronously: a timing must wait for the queued kernels.
        if self.precision.on_cuda:
            torch.cuda.synchronize()


CPU_STREAM = StreamSettings()


def image_folder(root: Path, classes: int, train: int, val: int, seed: int) -> Path:
    """A generated ImageFolder of JPEGs, 150-500 px a side (the tests' helper, tests/imagefolder.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from imagefolder import make_image_folder

    return make_image_folder(root, classes, train, val, sizes=(150, 500), seed=seed)


def decoded_mb(root: Path) -> float:
    """The decoded size of every image of the folder (train and val): the sum of H x W x 3 bytes."""
    from PIL import Image

    total = 0
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            total += image.width * image.height * 3
    return total / 1e6


def plain_loader(folder: Path, train: bool, mean, std, shuffle: bool,
                 settings: StreamSettings = CPU_STREAM) -> torch.utils.data.DataLoader:  # fmt: skip
    """What a user writes with torchvision: ImageFolder (PIL decoding), v2 transforms, a DataLoader."""
    from torchvision import datasets
    from torchvision.transforms import v2

    crop = ([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(256, antialias=True), v2.CenterCrop(224)])  # fmt: skip
    transform = v2.Compose([v2.PILToTensor(), *crop, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=transform),
                                       batch_size=settings.batch, shuffle=shuffle, num_workers=settings.workers,
                                       pin_memory=settings.precision.on_cuda)  # fmt: skip


def _on_device(images: torch.Tensor, precision: Precision) -> torch.Tensor:
    images = images.to(precision.device, non_blocking=True)
    return images.to(memory_format=torch.channels_last) if precision.channels_last else images


def plain_extract(root: Path, teachers: list[torch.nn.Module], mean, std,
                  settings: StreamSettings = CPU_STREAM) -> None:  # fmt: skip
    """The teachers' forward (eval, inference mode, no store) over one augmented pass of the training images;
    ``teachers`` already prepared for ``settings.device`` (Precision.prepare)."""
    precision = settings.precision
    with torch.inference_mode(), precision.autocast():
        for images, _ in plain_loader(root / "train", True, mean, std, shuffle=False, settings=settings):
            images = _on_device(images, precision)
            for model in teachers:
                model(images)
    settings.synchronize()


def plain_epoch(root: Path, mean, std, seed: int = 0, settings: StreamSettings = CPU_STREAM) -> float:
    """One epoch of the student trained alone (SGD, cross-entropy, distill's optimiser settings), then its test
    accuracy as distill's epoch ends: the seconds of both, as distill's history records them."""
    started = time.perf_counter()
    precision = settings.precision
    torch.manual_seed(seed)
    model = precision.prepare(create_model(settings.student, 10, 224))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = precision.grad_scaler()  # disabled on the CPU and under bf16: then a plain backward and step
    model.train()
    for images, labels in plain_loader(root / "train", True, mean, std, shuffle=True, settings=settings):
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(_on_device(images, precision)),
                                                     labels.to(precision.device, non_blocking=True))  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    model.eval()
    with torch.inference_mode(), precision.autocast():
        for images, _ in plain_loader(root / "val", False, mean, std, shuffle=False, settings=settings):
            model(_on_device(images, precision))
    settings.synchronize()
    return time.perf_counter() - started


def stream_teachers(folder: Path, dataset: ImageDataset, archs=STREAM_TEACHERS) -> list[str]:
    folder.mkdir(exist_ok=True)
    for arch in archs:
        untrained_teacher(folder, arch, arch, dataset)
    return list(archs)


def bench_stream_extract(work: Path, root: Path, repeats: int, settings: StreamSettings = CPU_STREAM) -> dict:
    """extract over a streamed 224 px ImageFolder (one view, both teachers) against the torchvision pipeline with
    the same teachers' bare forward; each timing loads the folder afresh, as each run of either would."""
    spec = f"imagefolder:{root}"
    teacher_dir = work / "stream-teachers"
    names = stream_teachers(teacher_dir, load_dataset(spec, image_size=224), settings.teachers)
    config = ExtractConfig(teachers=names, data=spec, image_size=224, views=1, batch_size=settings.batch,
                           teacher_dir=str(teacher_dir), device=settings.device, workers=settings.workers,
                           decode=settings.decode)  # fmt: skip
    data = load_dataset(spec, image_size=224)
    models = [settings.precision.prepare(resolve_teacher(n, teacher_dir, data).model) for n in names]
    store = work / "stream.zarr"
    plain_times, full_times = [], []
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits both alike
        plain_times.append(median_time(lambda: plain_extract(root, models, data.mean, data.std, settings), 1))
        full_times.append(median_time(lambda: extract(config, store, overwrite=True, progress=False,
                                                      dataset=load_dataset(spec, image_size=224)), 1))  # fmt: skip
    plain_s, full_s = statistics.median(plain_times), statistics.median(full_times)
    images = len(names) * len(data.train)
    return {"stream_images": len(data.train), "stream_extract_s": full_s, "plain_extract_s": plain_s,
            "stream_extract_overhead": full_s / plain_s, "stream_extract_images_per_s": images / full_s,
            "plain_extract_images_per_s": images / plain_s}  # fmt: skip


def bench_stream_cache_tax(work: Path, root: Path, store: Path, repeats: int,
                           settings: StreamSettings = CPU_STREAM) -> dict:  # fmt: skip
    """One distill epoch (kd, meal) from the streamed store against one epoch of the same student trained alone
    with the torchvision pipeline (same workers, batch size, test pass at the end); alternating rounds."""
    data = load_dataset(f"imagefolder:{root}", image_size=224)
    seconds: dict[str, list[float]] = {"alone": [], "kd": [], "meal": []}
    for _ in range(repeats):
        seconds["alone"].append(plain_epoch(root, data.mean, data.std, settings=settings))
        for method in ("kd", "meal"):
            # meal matches the last 2 blocks: the student's first map is 224x224 at 224 px, and its MLP
            # discriminator (50,176 -> 25,088 -> ...) would hold 1.26 G parameters (20 GB with Adam's state).
            config = DistillConfig(store=str(store), student=settings.student, method=method, epochs=1,
                                   batch_size=settings.batch, device=settings.device, workers=settings.workers,
                                   decode=settings.decode,
                                   match_blocks=2 if method == "meal" else None)  # fmt: skip
            run = distill(config, work / f"stream-{method}", overwrite=True, progress=False, dataset=data)
            seconds[method].append(run["history"][0]["seconds"])
    alone_s, kd_s, meal_s = (statistics.median(seconds[k]) for k in ("alone", "kd", "meal"))
    return {"stream_alone_epoch_s": alone_s, "stream_kd_epoch_s": kd_s, "stream_meal_epoch_s": meal_s,
            "stream_cache_tax_kd": kd_s / alone_s, "stream_cache_tax_meal": meal_s / alone_s}  # fmt: skip


def bench_stream_multicrop(work: Path, root: Path, repeats: int) -> dict:
    """Seconds per trained sample of a kd epoch with 4 crops of each decoded image against 1 (a 4-view store of
    one teacher; the crops-4 epoch has 4x the samples of the crops-1 one, and one test pass each)."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    if "crops_per_image" not in fields:
        return {
            "stream_multicrop_ratio": None,
            "stream_multicrop_note": "not available: no DistillConfig.crops_per_image",
        }
    spec = f"imagefolder:{root}"
    data = load_dataset(spec, image_size=224)
    teacher_dir = work / "multicrop-teachers"
    names = stream_teachers(teacher_dir, data, (STREAM_TEACHERS[0],))
    store = work / "multicrop.zarr"
    extract(ExtractConfig(teachers=names, data=spec, image_size=224, views=4, batch_size=STREAM_BATCH,
                          teacher_dir=str(teacher_dir), device="cpu", workers=STREAM_WORKERS),
            store, progress=False, dataset=data)  # fmt: skip
    per_sample: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(repeats):
        for crops in (1, 4):
            config = DistillConfig(store=str(store), student=STREAM_STUDENT, method="kd", epochs=1,
                                   batch_size=STREAM_BATCH, device="cpu", workers=STREAM_WORKERS,
                                   crops_per_image=crops)  # fmt: skip
            run = distill(config, work / f"multicrop-{crops}", overwrite=True, progress=False, dataset=data)
            record = run["history"][0]  # whole batches only: seconds per sample trained
            per_sample[crops].append(record["seconds"] / (record["steps"] * STREAM_BATCH))
    one, four = statistics.median(per_sample[1]), statistics.median(per_sample[4])
    return {"multicrop_images": len(data.train), "crops1_s_per_sample": one, "crops4_s_per_sample": four,
            "stream_multicrop_ratio": four / one}  # fmt: skip


# The child is started from this small wrapper, not forked from the bench: a forked child's peak RSS starts at
# its parent's (Linux keeps the pre-exec high-water mark), so it would read the bench's own peak.
RSS_WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident memory of a child process (the largest of it and the decoding workers it reaps), in MB."""
    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.split()[-1]) * 1024 / 1e6  # Linux: KiB


def bench_stream_memory(work: Path, counts: tuple[int, int], size: int = 32) -> dict:
    """Peak RSS of `meal-cache extract` (one teacher, one view) and `meal-cache distill` (kd, one epoch) over a
    folder of ``counts[0]`` and of ``counts[1]`` training images, against the folder's decoded size, and over the
    same images as WebDataset shards of 64 (so the shard count doubles with the images). Served at ``size`` px so
    the networks' own activations stay small beside the data."""
    cli = str(Path(sys.executable).with_name("meal-cache"))
    result: dict = {"images": list(counts), "image_size": size, "decoded_dataset_mb": [], "shards": [],
                    "peak_rss_mb": {"extract": [], "distill": [], "extract_wds": [], "distill_wds": []}}  # fmt: skip
    for count in counts:
        root = image_folder(work / f"rss-{count}", 10, count // 10, 1, seed=count)
        shards, _ = folder_as_shards_and_parquet(root, work / f"rss-sources-{count}")
        teacher_dir = work / f"rss-teachers-{count}"
        stream_teachers(teacher_dir, load_dataset(f"imagefolder:{root}", image_size=size), (STREAM_TEACHERS[0],))
        common = ["--device", "cpu", "--workers", str(STREAM_WORKERS), "--quiet"]
        for suffix, spec in (("", f"imagefolder:{root}"), ("_wds", f"wds:{shards}")):
            store = work / f"rss-{count}{suffix}.zarr"
            result["peak_rss_mb"][f"extract{suffix}"].append(peak_rss_mb([
                cli, "extract", "--teachers", STREAM_TEACHERS[0], "--data", spec, "--image-size", str(size),
                "--views", "1", "--teacher-dir", str(teacher_dir), "--out", str(store), *common]))  # fmt: skip
            result["peak_rss_mb"][f"distill{suffix}"].append(peak_rss_mb([
                cli, "distill", "--store", str(store), "--student", STREAM_STUDENT, "--method", "kd", "--epochs",
                "1", "--out", str(work / f"rss-run-{count}{suffix}"), *common]))  # fmt: skip
        result["decoded_dataset_mb"].append(decoded_mb(root))
        result["shards"].append(len(list(shards.glob("train-*.tar"))))
    return result


def bench_decode_spec(spec: str, repeats: int) -> float:
    """Images per second of one decoding worker: the dataset's FileSource over its training split's evaluation
    views at 224 px (after a first pass that starts the worker and warms the page cache)."""
    split = load_dataset(spec, image_size=224).train
    view = split.eval_view(STREAM_WORKERS)
    source = split.open(torch.device("cpu"), STREAM_WORKERS)

    def drain() -> None:
        for _ in source.pixels((rows, view[rows], None) for rows in torch.arange(len(split)).split(STREAM_BATCH)):
            pass

    drain()
    seconds = median_time(drain, repeats)
    source.close()
    return len(split) / seconds


def bench_decode(root: Path, repeats: int) -> dict:
    """Images per second of one decoding worker over the image folder (:func:`bench_decode_spec`)."""
    images = len(load_dataset(f"imagefolder:{root}", image_size=224).train)
    return {"decode_images": images, "decode_images_per_s_per_worker": bench_decode_spec(f"imagefolder:{root}",
                                                                                          repeats)}  # fmt: skip


def folder_as_shards_and_parquet(root: Path, work: Path, per_shard: int = 64) -> tuple[Path, Path]:
    """The image folder's files as WebDataset shards (``train-NNN.tar``, ``val-NNN.tar``, webdataset's TarWriter,
    ``classes.txt``) and as hub-style parquet (``data/{train,validation}-*.parquet``, ``datasets``' Image and
    ClassLabel features): the same encoded bytes in each, so a decode rate compares the readers alone."""
    import datasets
    import webdataset

    classes = sorted(p.name for p in (root / "train").iterdir())
    shards, parquet = work / "shards", work / "parquet" / "data"
    shards.mkdir(parents=True)
    parquet.mkdir(parents=True)
    (shards / "classes.txt").write_text("\n".join(classes) + "\n")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    for split, hub_split in (("train", "train"), ("val", "validation")):
        files = sorted((root / split).glob("*/*"))
        for number, start in enumerate(range(0, len(files), per_shard)):
            with webdataset.TarWriter(str(shards / f"{split}-{number:03d}.tar")) as sink:
                for index, path in enumerate(files[start : start + per_shard], start):
                    sink.write({"__key__": f"{index:06d}", path.suffix[1:].lower(): path.read_bytes(),
                                "cls": str(classes.index(path.parent.name))})  # fmt: skip
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": p.read_bytes(), "path": p.name} for p in files],
                "label": [classes.index(p.parent.name) for p in files],
            },
            features,
        )
        table.to_parquet(str(parquet / f"{hub_split}-00000-of-00001.parquet"))
    return shards, parquet.parent


def bench_decode_sources(work: Path, root: Path, repeats: int) -> dict:
    """One decoding worker's images per second over the same JPEGs as an image folder, as WebDataset shards and as
    parquet (issue 40), each at 224 px: the shard and parquet readers' cost beside the folder's."""
    shards, parquet = folder_as_shards_and_parquet(root, work / "sources")
    rates = {}
    for name, spec in (("imagefolder", f"imagefolder:{root}"), ("wds", f"wds:{shards}"), ("hf", f"hf:{parquet}")):
        rates[name] = bench_decode_spec(spec, repeats)
    return {**{f"decode_{name}_images_per_s_per_worker": rate for name, rate in rates.items()},
            "decode_wds_vs_imagefolder": rates["wds"] / rates["imagefolder"],
            "decode_hf_vs_imagefolder": rates["hf"] / rates["imagefolder"]}  # fmt: skip


def index_cache_in(folder: Path) -> contextlib.AbstractContextManager:
    """wds's shard index cache in ``folder`` (this process's and its children's), so a bench leaves none behind
    in the user's cache."""
    from meal_cache.data.sources.wds import INDEX_CACHE_ENV

    return mock.patch.dict(os.environ, {INDEX_CACHE_ENV: str(folder)})


def bench_wds_index(work: Path, repeats: int, shards: int = 32, per_shard: int = 256) -> dict:
    """Indexing ``shards`` WebDataset shards (``per_shard`` samples each: a 2 KB stand-in image and a label) from
    their tar headers, into an empty index cache, against reading the same index from the cache, in one run: the
    cold time over the cached. Local files in the page cache, so it is the parse alone; in object storage every
    header block and label read of the cold load is a ranged GET, which the cached load does not make."""
    import webdataset

    from meal_cache.data.sources import wds

    folder = work / "index-shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(shards):
        split = "val" if number == shards - 1 else "train"
        with webdataset.TarWriter(str(folder / f"{split}-{number:03d}.tar")) as sink:
            for sample in range(per_shard):
                sink.write({"__key__": f"{number:03d}-{sample:05d}", "jpg": rng.bytes(2048), "cls": str(sample % 10)})
    caches = iter(range(1_000_000))

    def cold() -> None:
        with index_cache_in(work / f"index-cold-{next(caches)}"):
            wds.index_shards(str(folder))

    def cached() -> None:
        with index_cache_in(work / "index-warm"):
            wds.index_shards(str(folder))

    cached()  # fills index-warm
    repeats = max(3, repeats)  # a few seconds in all
    cold_s, cached_s = median_time(cold, repeats), median_time(cached, repeats)
    return {"wds_index_shards": shards, "wds_index_samples": shards * per_shard, "wds_index_cold_s": cold_s,
            "wds_index_cached_s": cached_s, "wds_index_cold_vs_cached": cold_s / cached_s}  # fmt: skip


def bench_stream(work: Path, repeats: int, train: int = 400, multicrop: int = 200,
                 rss: tuple[int, int] = (1000, 2000)) -> dict:  # fmt: skip
    """The streaming-image figures (issue 15) on generated JPEG folders of 10 classes, 150-500 px a side."""
    root = image_folder(work / "stream-folder", 10, train // 10, 1, seed=0)
    results = bench_stream_extract(work, root, repeats)
    results.update(bench_stream_cache_tax(work, root, work / "stream.zarr", repeats))
    results.update(bench_stream_multicrop(work, image_folder(work / "multicrop-folder", 10, multicrop // 10, 1, 1),
                                          repeats))  # fmt: skip
    results.update(bench_decode(root, repeats))
    with index_cache_in(work / "wds-index"):
        results.update(bench_decode_sources(work, root, repeats))
        results.update(bench_stream_memory(work, rss))
    results.update(bench_wds_index(work, repeats))
    results["workers"], results["batch_size"] = STREAM_WORKERS, STREAM_BATCH
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-repeats", type=int, default=1, help="Rounds of the streaming section's timings.")
    parser.add_argument("--only", choices=["digits", "stream", "compact", "views", "dense", "host", "memory", "shards"],
                        help="Run one section: digits (1-6), compact (6b), views (6c), dense (6d), stream (7), "
                        "host (8), memory (9) or shards (10).")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="Where extraction overhead is measured (cuda: also img/s).")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    results: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
    }
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.only == "compact":
            print("6b/7 compact stores: sizes at 224 px and the top-k curve ...", flush=True)
            results["compact"] = bench_compact(work, load_dataset("digits"))
        if args.only == "views":
            print("6c/7 many views: extract seconds and distill memory with 64 views against 4 ...", flush=True)
            results["views"] = bench_views(work, load_dataset("digits"))
        if args.only == "dense":
            print("6d/7 dense stores: bytes at 224 px, fidelity to true crops, distill epoch ...", flush=True)
            results["dense"] = bench_dense(work, load_dataset("digits"))
        if args.only in (None, "digits"):
            digits = load_dataset("digits")
            print("1/7 extraction overhead ...", flush=True)
            results["extract"] = bench_extract(work, digits, args.repeats, args.device)
            print("2/7 cache tax ...", flush=True)
            store = work / "tax.zarr"
            shutil.copytree(work / "extract.zarr", store)
            results["cache_tax"] = bench_cache_tax(work, digits, store, args.repeats)
            print("3/7 offline speed-up ...", flush=True)
            results["offline"] = bench_offline_speedup(work, max(2, args.repeats - 1))
            print("4/7 loader ...", flush=True)
            results["loader"] = bench_loader(store, args.repeats)
            print("5/7 store size ...", flush=True)
            results["size"] = bench_size(work, digits)
            print("6/7 accuracy cost of lossy stores ...", flush=True)
            results["lossy_accuracy"] = bench_lossy_accuracy(work, digits)
            print("6b/7 compact stores: sizes at 224 px and the top-k curve ...", flush=True)
            results["compact"] = bench_compact(work, digits)
            print("6c/7 many views: extract seconds and distill memory with 64 views against 4 ...", flush=True)
            results["views"] = bench_views(work, digits)
            print("6d/7 dense stores: bytes at 224 px, fidelity to true crops, distill epoch ...", flush=True)
            results["dense"] = bench_dense(work, digits)
        if args.only not in ("digits", "compact", "views", "dense", "host", "memory", "shards"):
            print("7/7 streamed image folders ...", flush=True)
            results["stream"] = bench_stream(work, args.stream_repeats)
        if args.only in (None, "host"):
            print("8 the host's ceiling: extract and distill's batch source with networks that cost nothing ...",
                  flush=True)  # fmt: skip
            results["host"] = bench_host(work, args.repeats)
        if args.only in (None, "memory"):
            print("9 distill's memory per view against its stored bytes (1,000 classes, top-10, 8-bit blocks) ...",
                  flush=True)  # fmt: skip
            results["memory"] = bench_memory(work)
        if args.only in (None, "shards"):
            print("10 Zarr sharding: a store's objects per view and its read rate, --shard-chunks 8 against none ...",
                  flush=True)  # fmt: skip
            results["shards"] = bench_shard_chunks(work)
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started
    write_results(results, Path(args.out), render_table(results))


def write_results(results: dict, out: Path, table: str) -> None:
    """The results as JSON at ``out`` (its folder made), then the table and where they went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"-> {out} ({results['seconds']:.0f} s)")


def targets(results: dict) -> dict:
    """Each targeted figure with its target and whether it is met; the streaming section's untargeted figures
    with target "(reported)" and met null. A figure that could not be measured (null) is not met."""
    sections = [results[k] for k in ("extract", "cache_tax", "offline", "loader", "stream", "compact", "views",
                                     "dense", "host", "memory") if k in results]  # fmt: skip
    flat = {k: v for section in sections for k, v in section.items()}
    rows = {}
    every_target = {**TARGETS, **STREAM_TARGETS, **COMPACT_TARGETS, **VIEWS_TARGETS, **DENSE_TARGETS, **HOST_TARGETS,
                    **MEMORY_TARGETS}  # fmt: skip
    for name, (op, limit) in every_target.items():
        if name not in flat:
            continue
        value = flat[name]
        met = None if value is None else value <= limit if op == "<=" else value >= limit
        rows[name] = {"value": value, "target": f"{op} {limit}", "met": met}
    if "compact" in results:
        for key in (
            "store_bytes_meal_224",
            "store_bytes_meal_224_top10",
            "store_bytes_meal_224_top5",
            "store_bytes_meal_224_project128_top5",
            "store_bytes_meal_224_float16",
            "store_bytes_meal_224_every_channel",
            "store_bytes_meal_maps_224",
            "store_bytes_meal_maps_224_top5",
            "topk_top1_agreement",
            "sampled_kl_T4",
            "topk_gradient_bias_T4",
            "sampled_gradient_bias_T4",
            "sampled_gradient_error_T4",
        ):
            rows[key] = {"value": results["compact"][key], "target": "(reported)", "met": None}
    if "dense" in results:
        for key in DENSE_REPORTED:
            rows[key] = {"value": results["dense"][key], "target": "(reported)", "met": None}
    if "host" in results:
        for key in ("host_plain_decode_images_per_s", "host_extract_views1_images_per_s",
                    "host_extract_views8_images_per_s", "host_distill_batch_source_images_per_s",
                    "host_distill_batch_source_batches_per_s"):  # fmt: skip
            rows[key] = {"value": results["host"][key], "target": "(reported)", "met": None}
        for preset, rate in results["host"]["host_extract_bytes_per_s"].items():
            rows[f"host_extract_bytes_per_s_for_{preset}"] = {"value": rate, "target": "(reported)", "met": None}
    if "shards" in results:
        for key, value in results["shards"].items():
            rows[key] = {"value": value, "target": "(reported)", "met": None}
    if "memory" in results:
        for key in MEMORY_REPORTED:
            rows[key] = {"value": results["memory"][key], "target": "(reported)", "met": None}
    if "stream" in results:
        stream = results["stream"]
        rows["stream_cache_tax_meal"] = {"value": stream["stream_cache_tax_meal"], "target": "(reported)", "met": None}
        rows["decode_images_per_s_per_worker"] = {"value": stream["decode_images_per_s_per_worker"],
                                                  "target": "(reported)", "met": None}  # fmt: skip
        for key in ("peak_rss_mb", "decoded_dataset_mb", "images", "shards", "wds_index_cold_vs_cached"):
            rows[key] = {"value": stream[key], "target": "(reported)", "met": None}
    return rows


def render_table(results: dict) -> str:
    lines = [f"meal-cache bench, {results['date']}, {results['machine']}", "",
             "| figure | value | target | met |", "|---|---|---|---|"]  # fmt: skip
    for name, row in results["targets"].items():
        met = {True: "yes", False: "no", None: ""}[row["met"]]
        lines.append(f"| {name} | {format_value(row['value'])} | {row['target']} | {met} |")
    if "extract" in results:
        offline = results["offline"]
        loader = results["loader"]
        lines += [
            f"| offline_speedup_random | {offline['offline_speedup_random']:.2f} | (reported) | |",
            f"| cache_tax_kd | {results['cache_tax']['cache_tax_kd']:.2f} | (reported) | |",
            f"| loader_streaming_samples_per_s | {loader['loader_streaming_samples_per_s']:,.0f} | (reported) | |",
            f"| plain_indexing_samples_per_s | {loader['plain_indexing_samples_per_s']:,.0f} | (baseline) | |",
            f"| extract_images_per_s ({results['extract']['device']}) | "
            f"{results['extract']['extract_images_per_s']:,.0f} | (absolute) | |",
            f"| bare_forward_images_per_s | {results['extract']['bare_forward_images_per_s']:,.0f} | (absolute) | |",
        ]
    if "stream" in results:
        stream = results["stream"]
        lines += [
            f"| stream_extract_images_per_s (cpu) | {stream['stream_extract_images_per_s']:,.1f} | (absolute) | |",
            f"| plain_extract_images_per_s (cpu) | {stream['plain_extract_images_per_s']:,.1f} | (baseline) | |",
        ]
    if "size" in results:
        lines += ["", "| store option (2 teachers, digits) | bytes / sample / view | vs float32 |", "|---|---|---|"]
        for label, row in results["size"].items():
            lines.append(f"| {label} | {row['bytes_per_sample_view']:.0f} | {row['vs_float32']:.2f}x |")
        lines += [
            "",
            "| lossy store (MEAL student, 3 seeds) | top-1 % | difference to lossless (points) |",
            "|---|---|---|",
        ]
        for label, row in results["lossy_accuracy"].items():
            lines.append(f"| {label} | {row['mean']:.2f} | {row['mean_difference']:+.2f} |")
    return "\n".join(lines)


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " / ".join(format_value(v) for v in value)
    if isinstance(value, int):
        return f"{value:,}"
    if value > 1000:
        return f"{value:,.0f}"
    return f"{value:.2e}" if 0 < abs(value) < 0.1 else f"{value:.2f}"  # KL and L2 errors live far below 0.01


if __name__ == "__main__":
    main()
