"""`make bench`'s dense section (issue 30): what a dense store costs and loses, and what it costs distill.

- ``dense_bytes_224``: bytes per image (every crop), resnet50 and densenet121 together, at 224 px data (the teacher
  sees the whole image at 256) with 1,000 classes, as ``extract --dense --for meal`` stores them: the logit map
  top-10 a position, the last 3 blocks PCA-128 and 8-bit on a 4 x 4 grid. From the networks' shapes.
- ``dense_kl_T4``, ``dense_top1_agreement``: a lossless dense store's targets of 4 views' random-resized crops
  against the teachers run on those crops (a lossless store of the 4 views), worst of the two teachers, on a
  generated 224-px JPEG folder with torchvision resnet50 and densenet121 teachers (random weights: no pretrained
  weights offline), beside the whole-image baseline (every crop given its image's targets) and as functions of
  the blocks' grid and a second scale. The same on digits' trained teachers (resnet20, densenet_k12).
- ``dense_distill_epoch_ratio``: a meal distill epoch from a dense store against one from a store of 4 views of
  the same rows and teachers (digits, median of the epochs after the first).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meal_cache.data.datasets import ImageDataset, load_dataset
from meal_cache.dense import stored_bytes_per_image
from meal_cache.distill import DistillConfig, distill
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.fidelity import store_fidelity
from meal_cache.nets.models import create_model
from meal_cache.nets.taps import block_shapes
from meal_cache.store.keys import logits_key
from meal_cache.store.teacher_store import open_store

DENSE_TARGETS = {
    "dense_top1_agreement": (">=", 0.95),
    "dense_kl_T4": ("<=", 0.05),
    "dense_distill_epoch_ratio": ("<=", 1.10),
}
DENSE_REPORTED = ("dense_bytes_224", "dense_bytes_224_per_teacher_max", "dense_whole_image_kl_T4",
                  "dense_digits_kl_T4", "dense_digits_whole_image_kl_T4")  # fmt: skip
DENSE_TEACHERS_224 = ("resnet50", "densenet121")
VIEWS = 4


def dense_bytes_224(arch: str, classes: int = 1000, topk: int = 10, project: int = 128, grid: int = 4) -> int:
    """Bytes per image of one teacher in ``extract --dense --for meal`` at 224 px data (whole image at 256)."""
    model = create_model(arch, classes, 224)
    shapes = block_shapes(model, 256)
    last = model.block_names[-1]
    positions = shapes[last][1] * shapes[last][2]
    blocks = [(min(shapes[b][0], project), min(grid, shapes[b][1])) for b in model.block_names[-3:]]
    return stored_bytes_per_image(classes, positions, blocks, topk, quantized=True)


def _whole_image_kl(dense_path: Path, views_path: Path, temperature: float = 4.0) -> float:
    """The baseline: each crop given its whole image's targets (the logit maps' means), worst teacher."""
    dense, views = open_store(dense_path), open_store(views_path)
    worst = 0.0
    for teacher in dense.teacher_names:
        whole = F.log_softmax(torch.from_numpy(dense.logits(teacher, 0).astype(np.float64)) / temperature, 1)
        total = 0.0
        for view in range(views.num_views):
            crop = torch.from_numpy(views.read(logits_key(teacher), view).astype(np.float64))
            p = F.log_softmax(crop / temperature, 1)
            total += float((p.exp() * (p - whole)).sum(1).mean())
        worst = max(worst, total / views.num_views)
    return worst


def _worst_fidelity(result: dict) -> dict:
    teachers = list(result["teachers"].values())
    return {
        "kl_T1": max(t["kl"]["T=1"] for t in teachers),
        "kl_T4": max(t["kl"]["T=4"] for t in teachers),
        "top1_agreement": min(t["top1_agreement"] for t in teachers) / 100.0,
        "blocks_relative_l2": max(b["relative_l2"] for t in teachers for b in t["blocks"].values()),
    }


def _fidelity_curve(work: Path, name: str, common: dict, dataset: ImageDataset, variants: dict) -> dict:
    """A lossless views store, then per variant a dense store and its fidelity against the views."""
    views = work / f"{name}-views.zarr"
    extract(ExtractConfig(views=VIEWS, seed=1, **common), views, progress=False, dataset=dataset)
    curve = {}
    for label, dense_settings in variants.items():
        path = work / f"{name}-dense-{label}.zarr"
        extract(ExtractConfig(dense=True, **common, **dense_settings), path, progress=False, dataset=dataset)
        stored = open_store(path)
        curve[label] = {**_worst_fidelity(store_fidelity(str(path), str(views))),
                        "bytes_per_image": sum(v["stored"] for v in stored.sizes().values()) / stored.n}  # fmt: skip
    curve["whole_image_kl_T4"] = _whole_image_kl(work / f"{name}-dense-{next(iter(variants))}.zarr", views)
    return curve


def bench_dense_224(work: Path, images: int = 6) -> dict:
    """The 224 px figures on a generated JPEG folder (``images`` a class, 10 classes) with untrained torchvision
    teachers."""
    from bench import image_folder, untrained_teacher

    root = image_folder(work / "dense-jpegs", classes=10, train=images, val=1, seed=3)
    spec = f"imagefolder:{root}"
    data = load_dataset(spec, image_size=224)
    teachers = work / "dense-teachers-224"
    teachers.mkdir(exist_ok=True)
    for arch in DENSE_TEACHERS_224:
        untrained_teacher(teachers, arch, arch, data)
    common = dict(teachers=list(DENSE_TEACHERS_224), data=spec, image_size=224, teacher_dir=str(teachers),
                  device="cpu", features=["blocks"], blocks="3", batch_size=16, workers=1)  # fmt: skip
    variants = {"grid4": {}, "grid2": {"dense_grid": 2}, "grid7": {"dense_grid": 7},
                "grid4+384px": {"dense_sizes": [256, 384]}}  # fmt: skip
    return _fidelity_curve(work, "jpeg224", common, data, variants)


def bench_dense_digits(work: Path, digits: ImageDataset) -> dict:
    """The same curve on digits' teachers trained 8 epochs (the compact section's), the digits recipe's crops."""
    trained = work / "trained"
    if not trained.is_dir():  # run alone: train them as the lossy-accuracy section does
        trained.mkdir()
        for arch in ("resnet20", "densenet_k12"):
            train_supervised(TrainConfig(arch=arch, epochs=8, device="cpu"), trained / f"{arch}.pt",
                             progress=False, dataset=digits)  # fmt: skip
    common = dict(teachers=["resnet20", "densenet_k12"], teacher_dir=str(trained), device="cpu",
                  features=["blocks"], blocks="3")  # fmt: skip
    variants = {"grid4": {}, "grid2": {"dense_grid": 2}, "grid1": {"dense_grid": 1},
                "grid4+32px": {"dense_sizes": [16, 32]}}  # fmt: skip
    return _fidelity_curve(work, "digits", common, digits, variants)


def bench_dense_epoch(work: Path, digits: ImageDataset, epochs: int = 4) -> dict:
    """Seconds of a meal distill epoch from a dense store and from a store of 4 views (same rows, teachers)."""
    from bench import untrained_teacher

    teachers = work / "dense-epoch-teachers"
    teachers.mkdir(exist_ok=True)
    for arch in ("resnet20", "densenet_k12"):
        untrained_teacher(teachers, arch, arch, digits)
    common = dict(teachers=["resnet20", "densenet_k12"], teacher_dir=str(teachers), device="cpu",
                  features=["blocks"], blocks="3")  # fmt: skip
    seconds = {}
    for name, settings in (("views", {"views": VIEWS}), ("dense", {"dense": True})):
        store = work / f"epoch-{name}.zarr"
        extract(ExtractConfig(**common, **settings), store, progress=False, dataset=digits)
        config = DistillConfig(store=str(store), student="resnet8_w4", method="meal", epochs=epochs, device="cpu",
                               workers=0)  # fmt: skip
        history = distill(config, work / f"epoch-{name}-run", progress=False, dataset=digits)["history"]
        seconds[name] = statistics.median(row["seconds"] for row in history[1:])
    return {"dense_epoch_s": seconds["dense"], "views_epoch_s": seconds["views"],
            "dense_distill_epoch_ratio": seconds["dense"] / seconds["views"]}  # fmt: skip


def bench_dense(work: Path, digits: ImageDataset) -> dict:
    per_teacher = {arch: dense_bytes_224(arch) for arch in DENSE_TEACHERS_224}
    jpeg = bench_dense_224(work)
    digits_curve = bench_dense_digits(work, digits)
    return {
        "dense_bytes_224": sum(per_teacher.values()),
        "dense_bytes_224_per_teacher": per_teacher,
        "dense_bytes_224_per_teacher_max": max(per_teacher.values()),
        "dense_kl_T4": jpeg["grid4"]["kl_T4"],
        "dense_top1_agreement": jpeg["grid4"]["top1_agreement"],
        "dense_whole_image_kl_T4": jpeg["whole_image_kl_T4"],
        "dense_digits_kl_T4": digits_curve["grid4"]["kl_T4"],
        "dense_digits_whole_image_kl_T4": digits_curve["whole_image_kl_T4"],
        "jpeg224": jpeg,
        "digits": digits_curve,
        **bench_dense_epoch(work, digits),
    }
