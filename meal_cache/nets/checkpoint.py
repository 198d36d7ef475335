"""Checkpoints: full training state written atomically, read back with ``weights_only=True`` (no code runs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from meal_cache.data.datasets import ImageDataset
from meal_cache.errors import UserError
from meal_cache.nets.models import create_model

CHECKPOINT_FORMAT = "meal-cache-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write atomically (temporary file, then rename): a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a meal-cache checkpoint safely (``weights_only=True``: tensors and plain data, no code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: '{path}'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        reason = (str(err).strip().splitlines() or [""])[0]  # torch's messages run to many lines
        raise UserError(f"'{path}' is not a readable checkpoint ({type(err).__name__}: {reason})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a meal-cache checkpoint (no format '{CHECKPOINT_FORMAT}')")
    return payload


def model_from_checkpoint(payload: dict, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the network a checkpoint records and load its weights."""
    model = create_model(payload["arch"], payload["num_classes"], payload["input"]["image_size"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload, device), payload


def model_payload(
    model: nn.Module,
    arch: str,
    dataset: ImageDataset,
    config: dict,
    epoch: int,
    history: list[dict],
    test: dict,
) -> dict:
    """A checkpoint of a trained network: everything needed to rebuild, identify and evaluate it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": dataset.num_classes,
        "classes": list(dataset.classes),
        "block_names": list(model.block_names),
        "input": {
            "image_size": dataset.image_size,
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "channels": 3,
            # A pretrained timm model's own input (normalisation, native size), beside the data's it trained on.
            **({"pretrained": model.pretrained_input} if hasattr(model, "pretrained_input") else {}),
        },
        "data": dataset.describe(),
        "metrics": {"test": test},
        "config": config,
        "epoch": epoch,
        "history": history,
        "model": state_dict_cpu(model),
    }


def save_student(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str,
    dataset: ImageDataset,
    history: list[dict] | None = None,
    test: dict | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``model``, a student trained in your own loop (with :class:`~meal_cache.CachedViews`, say), as the
    checkpoint ``meal-cache evaluate`` and the pipeline's report read: ``arch`` is its name in meal-cache's
    registry (``meal-cache models``) and ``dataset`` the data it was trained on (``views.dataset``), which record
    its classes, input size, normalisation and fingerprint. ``history`` (one dict an epoch), ``test`` (its test
    metrics) and ``config`` (your settings, JSON-able) are recorded as given. Refused, before anything is written,
    where ``model`` is not that architecture for the data's classes and size: evaluate rebuilds it from ``arch``.
    Returns the path written."""
    rebuilt = create_model(arch, dataset.num_classes, dataset.image_size)
    try:
        rebuilt.load_state_dict(model.state_dict())
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0].rstrip(":. ")
        raise UserError(f"the model is not meal-cache's {arch} for {dataset.num_classes} classes at "
                        f"{dataset.image_size} px ({reason}); pass the arch it was created as") from err  # fmt: skip
    history = list(history or [])
    payload = model_payload(rebuilt, arch, dataset, dict(config or {}), len(history), history, test)
    save_checkpoint(path, payload)
    return Path(path)


def state_dict_cpu(module: nn.Module) -> dict:
    """A module's state as contiguous CPU tensors (channels_last weights saved in the default layout)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
