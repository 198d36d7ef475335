"""`make bench`: the cache's speed and size as ratios of two measurements taken in the same run.

Every figure is a ratio (or a rate beside its baseline) measured here and now, each timing the median of
repeats, so it holds on a noisy shared machine. Writes bench/results.json and prints a table.

    python benchmarks/bench.py [--out bench/results.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from meal_cache import augment
from meal_cache.checkpoint import model_payload, save_checkpoint
from meal_cache.data import ImageDataset, load_dataset
from meal_cache.distill import DistillConfig, InMemoryBatches, StreamingBatches, ViewFeed, distill
from meal_cache.extract import ExtractConfig, extract
from meal_cache.models import create_model
from meal_cache.runtime import Precision, resolve_device
from meal_cache.store import open_store
from meal_cache.teachers import resolve_teacher
from meal_cache.train import TrainConfig, train_supervised

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="Where extraction overhead is measured (cuda: also img/s).")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    digits = load_dataset("digits")
    started = time.perf_counter()
    results: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
    }
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        print("1/6 extraction overhead ...", flush=True)
        results["extract"] = bench_extract(work, digits, args.repeats, args.device)
        print("2/6 cache tax ...", flush=True)
        store = work / "tax.zarr"
        shutil.copytree(work / "extract.zarr", store)
        results["cache_tax"] = bench_cache_tax(work, digits, store, args.repeats)
        print("3/6 offline speed-up ...", flush=True)
        results["offline"] = bench_offline_speedup(work, max(2, args.repeats - 1))
        print("4/6 loader ...", flush=True)
        results["loader"] = bench_loader(store, args.repeats)
        print("5/6 store size ...", flush=True)
        results["size"] = bench_size(work, digits)
        print("6/6 accuracy cost of lossy stores ...", flush=True)
        results["lossy_accuracy"] = bench_lossy_accuracy(work, digits)
    flat = {**results["extract"], **results["cache_tax"], **results["offline"], **results["loader"]}
    results["targets"] = {
        name: {"value": flat[name], "target": f"{op} {limit}",
               "met": flat[name] <= limit if op == "<=" else flat[name] >= limit}
        for name, (op, limit) in TARGETS.items()
    }  # fmt: skip
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render_table(results))
    print(f"-> {out}")


def render_table(results: dict) -> str:
    lines = [f"meal-cache bench, {results['date']}, {results['machine']}", "",
             "| figure | value | target | met |", "|---|---|---|---|"]  # fmt: skip
    for name, row in results["targets"].items():
        value = f"{row['value']:,.0f}" if row["value"] > 1000 else f"{row['value']:.2f}"
        lines.append(f"| {name} | {value} | {row['target']} | {'yes' if row['met'] else 'no'} |")
    offline = results["offline"]
    loader = results["loader"]
    lines += [
        f"| offline_speedup_random | {offline['offline_speedup_random']:.2f} | (reported) | |",
        f"| cache_tax_kd | {results['cache_tax']['cache_tax_kd']:.2f} | (reported) | |",
        f"| loader_streaming_samples_per_s | {loader['loader_streaming_samples_per_s']:,.0f} | (reported) | |",
        f"| plain_indexing_samples_per_s | {loader['plain_indexing_samples_per_s']:,.0f} | (baseline) | |",
        f"| extract_images_per_s ({results['extract']['device']}) | {results['extract']['extract_images_per_s']:,.0f}"
        " | (absolute) | |",
        f"| bare_forward_images_per_s | {results['extract']['bare_forward_images_per_s']:,.0f} | (absolute) | |",
        "",
        "| store option (2 teachers, digits) | bytes / sample / view | vs float32 |",
        "|---|---|---|",
    ]
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


if __name__ == "__main__":
    main()
