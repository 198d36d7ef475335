"""Teachers: resolving a teacher by name and running it with its block taps.

A name is a checkpoint written by ``meal-cache train`` (``TEACHER_DIR/NAME.pt`` or a path to a ``.pt`` file), or
``ARCH:WEIGHTS`` for torchvision's pretrained weights (or ``ARCH:/path/to/weights.pth``, a local state dict), or
timm's (``timm:NAME:pretrained``, ``timm:NAME.TAG``, ``timm:hf-hub:ORG/NAME``, ``timm:NAME:file=PATH``). A
:class:`Teacher` carries the network, its input normalisation and the :class:`~meal_cache.store.TeacherSpec` a
store records about it. Extraction and the online reference of distillation both run teachers through
:func:`teacher_outputs`, so the two compute the same targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.data.datasets import ImageDataset
from meal_cache.errors import UserError
from meal_cache.nets.checkpoint import load_checkpoint, model_from_checkpoint
from meal_cache.nets.models import create_model, split_weights
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.projection import orthogonal_projection, project, stored_projections, write_projection
from meal_cache.runtime import Precision
from meal_cache.store.schema import DEFAULT_ATTENTION_P, BlockSpec, TeacherSpec
from meal_cache.views import augment

if TYPE_CHECKING:
    from meal_cache.store.teacher_store import TeacherStore


@dataclass
class Teacher:
    """A teacher ready to run: the network, how it normalises its input, and what the store records."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    spec: TeacherSpec
    # ``extract --project``: the (C, D) matrix each projected block's pooled channels are multiplied by.
    projections: dict[str, torch.Tensor] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def select_blocks(names: tuple[str, ...], selection: str) -> tuple[str, ...]:
    """``all``, ``K`` (the last K blocks) or a comma list of block names."""
    if selection == "all":
        return names
    if selection.isdigit():
        count = int(selection)
        if not 1 <= count <= len(names):
            raise UserError(f"--blocks {count}: the teacher has {len(names)} blocks ({', '.join(names)})")
        return names[-count:]
    chosen = tuple(n.strip() for n in selection.split(",") if n.strip())
    missing = [n for n in chosen if n not in names]
    if missing:
        raise UserError(f"unknown block(s) {', '.join(missing)}; the teacher's blocks are {', '.join(names)}")
    return chosen


def _available_checkpoints(teacher_dir: Path) -> str:
    found = sorted(p.stem for p in teacher_dir.glob("*.pt")) if teacher_dir.is_dir() else []
    return ", ".join(found) if found else "none"


def resolve_teacher(
    name: str, teacher_dir: str | Path, dataset: ImageDataset, blocks: str = "all", grid: int = 1
) -> Teacher:
    """The teacher ``name`` for ``dataset``, tapping ``blocks`` (``all``, the last ``K`` or a comma list) pooled
    to at most a ``grid`` x ``grid`` grid. A name is a checkpoint ``TEACHER_DIR/NAME.pt`` (or a path to a .pt
    file), else ``ARCH:WEIGHTS``."""
    teacher_dir = Path(teacher_dir)
    path = Path(name) if name.endswith(".pt") else teacher_dir / f"{name}.pt"
    if path.is_file():
        payload = load_checkpoint(path)
        if payload["num_classes"] != dataset.num_classes:
            raise UserError(
                f"teacher '{name}' predicts {payload['num_classes']} classes; {dataset.spec} has {dataset.num_classes}"
            )
        if payload["input"]["image_size"] != dataset.image_size:
            raise UserError(
                f"teacher '{name}' was trained on {payload['input']['image_size']} px images; the data is "
                f"{dataset.image_size} px (set --image-size)"
            )
        model = model_from_checkpoint(payload)
        key, arch, sha = path.stem, payload["arch"], file_sha256(path)
        mean, std, classes = tuple(payload["input"]["mean"]), tuple(payload["input"]["std"]), payload["classes"]
        pretrained = {k: v for k, v in payload["input"].items() if k == "pretrained"}
    elif split_weights(name)[1] is not None:
        arch, weights = split_weights(name)
        model = create_model(name, dataset.num_classes, dataset.image_size)
        categories, mean, std, pretrained = _pretrained_input(model)
        if len(categories) != dataset.num_classes:
            raise UserError(
                f"pretrained teacher '{name}' predicts {len(categories)} classes; {dataset.spec} has "
                f"{dataset.num_classes}: fine-tune it first (meal-cache train --arch {name} ...)"
            )
        # The key names the store's group: no ':' and no '/' (a hub name's), which Zarr would nest.
        key, classes = name.replace(":", "-").replace("/", "-"), list(categories)
        # A local weights file's digest, so a store extracted again from another file is told apart.
        sha = getattr(getattr(model, "torchvision_weights", None), "sha256", None)
    else:
        raise UserError(
            f"teacher '{name}' not found: no '{path}' and not ARCH:WEIGHTS (or timm:NAME:pretrained); "
            f"checkpoints in '{teacher_dir}': {_available_checkpoints(teacher_dir)}"
        )
    chosen = select_blocks(tuple(model.block_names), blocks)
    shapes = block_shapes(model, dataset.image_size)
    specs = [BlockSpec(b, shapes[b][0], min(grid, shapes[b][1], shapes[b][2]), shapes[b][1], shapes[b][2])
             for b in chosen]  # fmt: skip
    spec = TeacherSpec(
        key=key,
        source=name,
        arch=arch,
        checkpoint_sha256=sha,
        classes=list(classes),
        input={"image_size": dataset.image_size, "mean": list(mean), "std": list(std), **pretrained},
        blocks=specs,
    )
    return Teacher(model.eval(), mean, std, spec)


def _pretrained_input(model: nn.Module) -> tuple[list[str], tuple[float, ...], tuple[float, ...], dict]:
    """A pretrained teacher's classes and normalisation: timm's from the model's pretrained config (also
    recorded whole, as ``pretrained``, with its native input size), torchvision's from its weights
    (:class:`~meal_cache.nets.torchvision_weights.WeightsInfo`: the enum's, or a local file's)."""
    if hasattr(model, "pretrained_input"):
        info = model.pretrained_input
        return list(model.pretrained_classes), tuple(info["mean"]), tuple(info["std"]), {"pretrained": info}
    info = model.torchvision_weights
    return list(info.classes), info.mean, info.std, {}


def projected_teachers(
    teachers: list[Teacher], dim: int, seed: int, kind: str = "random", required: bool = True
) -> list[Teacher]:
    """``extract --project D``: each teacher with its blocks wider than ``dim`` channels recorded as projected to
    ``dim`` (see :mod:`meal_cache.projection`), with their seeded matrices for ``kind`` random; a ``pca`` matrix
    is fitted on the data later (:func:`keep_projections`). Where no block of any teacher is wider, refused when
    ``required`` (the user asked for D), else the teachers are left as they are (a preset's D)."""
    widest = max(b.channels for t in teachers for b in t.spec.blocks)
    if dim >= widest and required:
        raise UserError(f"--project {dim} is not below any block's channels (the widest has {widest}): choose D "
                        "below the channels it should reduce")  # fmt: skip
    projected = []
    for teacher in teachers:
        blocks, matrices = [], {}
        for block in teacher.spec.blocks:
            if block.channels > dim:
                if kind == "random":
                    name = f"{teacher.spec.key}/{block.name}"
                    matrices[block.name] = orthogonal_projection(block.channels, dim, seed, name)
                block = dataclasses.replace(block, channels=dim, projected_from=block.channels)
            blocks.append(block)
        spec = dataclasses.replace(teacher.spec, blocks=blocks)
        projected.append(dataclasses.replace(teacher, spec=spec, projections=matrices))
    return projected


def keep_projections(
    store: TeacherStore, teachers: list[Teacher], fit: Callable[[Teacher, list[BlockSpec]], dict] | None = None
) -> None:
    """Write each projected block's matrix into a new store, or take a resumed store's own (so a store is never
    written with two matrices, whatever the machine's linear algebra). Blocks without a matrix yet (``pca``) get
    ``fit(teacher, blocks)``'s, fitted on the teacher's unprojected outputs before any chunk is written."""
    for teacher in teachers:
        stored = stored_projections(store, teacher.spec.key)
        projected = [b for b in teacher.spec.blocks if b.projected_from is not None]
        unfitted = [b for b in projected if b.name not in stored and b.name not in teacher.projections]
        fitted = fit(teacher, unfitted) if unfitted and fit is not None else {}
        for block in projected:
            if block.name in stored:
                teacher.projections[block.name] = stored[block.name]
                continue
            matrix = teacher.projections.get(block.name, fitted.get(block.name))
            if matrix is None:
                raise RuntimeError(f"no projection for {teacher.spec.key}/{block.name}: pass fit for pca")
            write_projection(store, teacher.spec.key, block.name, matrix)
            teacher.projections[block.name] = matrix


def channel_attention(activation: torch.Tensor, p: float) -> torch.Tensor:
    """AT's attention map of a block output ``(B, C, H, W)``: the mean over channels of ``|A|^p``, ``(B, H, W)``
    (Zagoruyko and Komodakis's F_sum^p, divided by C, which the loss's normalisation removes). The absolute
    value matters: many blocks' outputs are signed (DenseNet's raw conv features, linear bottlenecks, ViT
    tokens), where the signed channel mean (``maps``) is another map altogether."""
    return activation.float().abs().pow(p).mean(1)


# no_grad, not inference_mode: the online reference feeds these outputs to losses that save tensors for backward.
@torch.no_grad()
def teacher_outputs(
    teacher: Teacher,
    pixels: torch.Tensor,
    features: tuple[str, ...],
    precision: Precision,
    attention_p: float = DEFAULT_ATTENTION_P,
) -> dict[str, torch.Tensor]:
    """One forward of the teacher over a replayed view's ``pixels`` (float 0-255 from a source, see
    :mod:`meal_cache.data.source`): logits and, per block, the pooled output, the map and the attention map (its
    power ``attention_p``, the store's), as ``features`` ask."""
    batch = augment.normalise(pixels, teacher.mean, teacher.std, channels_last=precision.channels_last)
    names = [b.name for b in teacher.spec.blocks]
    with BlockTap(teacher.model, names) as tap, precision.autocast():
        logits = teacher.model(batch)
    outputs = {"logits": logits.float()}
    for block in teacher.spec.blocks:
        value = tap.outputs[block.name].float()
        if "blocks" in features:
            pooled = F.adaptive_avg_pool2d(value, block.grid)
            matrix = teacher.projections.get(block.name)
            outputs[f"blocks/{block.key}"] = pooled if matrix is None else project(pooled, matrix)
        if "maps" in features:
            outputs[f"maps/{block.key}"] = value.mean(1)
        if "attention" in features:
            outputs[f"attention/{block.key}"] = channel_attention(value, attention_p)
    return outputs
