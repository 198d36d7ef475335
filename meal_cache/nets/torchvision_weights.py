"""torchvision's pretrained weights for ``ARCH:WEIGHTS``: an enum name (``resnet50:IMAGENET1K_V2``), fetched once
into torch.hub's cache, or a local state dict (``resnet50:/path/to/weights.pth``), read with ``weights_only=True``.

Either way a failure is one :class:`~meal_cache.errors.UserError` that says what to do: a name that cannot be
fetched names the file torchvision looks for, the directory it looks in and the local-file form; a local file that
is missing, unreadable or of another architecture says so. The classes and normalisation a weights' head expects
come back as :class:`WeightsInfo`, which a teacher used as it is needs (:mod:`meal_cache.nets.teachers`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from meal_cache.errors import UserError, unknown_choice

# Every torchvision classification weight is normalised with ImageNet's statistics; a local state dict is taken
# to be too (a network fine-tuned from torchvision's weights keeps its stem's expectations).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a missing network looks like on the way to download.pytorch.org: urllib's URLError and socket errors are
# OSErrors; a connection cut mid-transfer is http.client's.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException)
# What torch.load raises for a cached file cut short or not a checkpoint at all.
UNREADABLE_ERRORS = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


@dataclass(frozen=True)
class WeightsInfo:
    """What pretrained weights' head expects: its classes in order, and the input normalisation."""

    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sha256: str | None = None  # a local file's, so a store records which file its teacher was (None: an enum's)


def is_weights_file(weights: str) -> bool:
    """Whether the WEIGHTS of ``ARCH:WEIGHTS`` is a path (it has a ``/`` or ends .pth/.pt) rather than an enum."""
    return "/" in weights or weights.endswith((".pth", ".pt"))


def load_weights(arch: str, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """torchvision's ``arch`` with ``weights`` (an enum name or a local file) and its head as the weights have it."""
    if is_weights_file(weights):
        return _load_file(arch, Path(weights).expanduser())
    return _load_named(arch, weights)


def cache_file(weight_enum: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision looks for an enum's weights before downloading them: torch.hub's directory (TORCH_HOME,
    else ~/.cache/torch) ``/hub/checkpoints``, under the file name of the enum's URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weight_enum.url).path)


def _weight_enum(arch: str, weights: str) -> torchvision.models.WeightsEnum:
    choices = torchvision.models.get_model_weights(arch)
    try:
        return choices[weights]
    except KeyError as err:
        raise unknown_choice(f"weights for {arch}", weights, [w.name for w in choices]) from err


def _load_named(arch: str, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """The cache is looked at first and filled here where the file is missing, so torchvision only ever reads it:
    a failed download is then one line (torchvision's own would first print its "Downloading: ..." line)."""
    weight_enum = _weight_enum(arch, weights)
    cached = cache_file(weight_enum)
    if not cached.is_file():
        _download(arch, weights, weight_enum, cached)
    try:
        model = torchvision.models.get_model(arch, weights=weight_enum)
    except UNREADABLE_ERRORS as err:
        # A cached file torch cannot read is never fetched again by torchvision: say which file to delete.
        raise UserError(f"torchvision's weights for '{arch}:{weights}' in '{cached}' are not readable "
                        f"({_first_line(err)}); delete the file so it is fetched again, or copy a whole one "
                        "there") from err  # fmt: skip
    return model, _enum_info(weight_enum)


def _download(arch: str, weights: str, weight_enum: torchvision.models.WeightsEnum, cached: Path) -> None:
    """Fetch an enum's file into torch.hub's cache as torchvision would (checked against the hash prefix in its
    name), or one error naming the file, the directory and the two ways to do without a network."""
    match = torch.hub.HASH_REGEX.search(cached.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weight_enum.url, str(cached), match.group(1) if match else None)
    except (*DOWNLOAD_ERRORS, RuntimeError) as err:  # RuntimeError: a download whose hash does not match
        raise UserError(
            f"could not fetch torchvision's weights for '{arch}:{weights}' ({_first_line(err)}); torchvision looks "
            f"for '{cached.name}' in '{cached.parent}' (TORCH_HOME/hub/checkpoints): download {weight_enum.url} "
            f"elsewhere and copy it there, or pass {arch}:/path/to/weights.pth"
        ) from err


def _enum_info(weight_enum: torchvision.models.WeightsEnum) -> WeightsInfo:
    transform = weight_enum.transforms()
    classes = tuple(weight_enum.meta.get("categories") or ())
    return WeightsInfo(classes, tuple(transform.mean), tuple(transform.std))


def _load_file(arch: str, path: Path) -> tuple[nn.Module, WeightsInfo]:
    """A local state dict into torchvision's ``arch``, built with as many classes as the state dict's head has."""
    if not path.is_file():
        raise UserError(f"weights file '{path}' for {arch} does not exist (ARCH:PATH reads a state dict saved with "
                        "torch.save(model.state_dict(), PATH))")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign, corrupt or pickled-object files
        raise UserError(f"weights file '{path}' is not a readable state dict ({_first_line(err)})") from err
    state = _unwrap(state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file '{path}' holds no state dict of tensors (save model.state_dict())")
    head = _head_name(arch)
    num_classes = int(state[f"{head}.weight"].shape[0]) if f"{head}.weight" in state else None
    model = torchvision.models.get_model(arch, **({} if num_classes is None else {"num_classes": num_classes}))
    mismatch = _key_mismatch(model, state)
    if mismatch:
        raise UserError(f"weights file '{path}' is not a state dict of {arch} ({mismatch})")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # the same names, other shapes: torch's line for the first of them says which
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise UserError(f"weights file '{path}' is not a state dict of {arch} ({(shapes or [''])[0]})") from err
    with path.open("rb") as handle:
        sha = hashlib.file_digest(handle, "sha256").hexdigest()
    return model, _file_info(arch, path, _head_classes(model), sha)


def _key_mismatch(model: nn.Module, state: dict) -> str:
    """The state dict's names that ``model`` lacks and the model's that the state dict lacks, a few of each."""
    expected = set(model.state_dict())
    parts = []
    for what, names in (("missing", expected - set(state)), ("unexpected", set(state) - expected)):
        if names:
            shown = ", ".join(sorted(names)[:3])
            parts.append(f"{what} {shown}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    return "; ".join(parts)


def _unwrap(state: object) -> object:
    """The state dict inside what training scripts save: ``{"state_dict": ...}`` or ``{"model": ...}``, and
    DataParallel's ``module.`` prefix taken off."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _head_name(arch: str) -> str | None:
    """The dotted name of ``arch``'s last linear layer (its classifier), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linear[-1] if linear else None


def _head_classes(model: nn.Module) -> int | None:
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linear[-1].out_features if linear else None


def _file_info(arch: str, path: Path, num_classes: int | None, sha: str) -> WeightsInfo:
    """A local file's classes and normalisation: an enum's where the file is that enum's download (the same file
    name) or its head has as many classes as the arch's default weights (an ImageNet-1k head); otherwise classes
    numbered from 0 and ImageNet's statistics."""
    choices = list(torchvision.models.get_model_weights(arch))
    named = [w for w in choices if os.path.basename(urlparse(w.url).path) == path.name]
    default = [w for w in choices[:1] if len(w.meta.get("categories") or ()) == num_classes]
    for weight_enum in named + default:
        info = _enum_info(weight_enum)
        if len(info.classes) == num_classes:
            return WeightsInfo(info.classes, info.mean, info.std, sha)
    classes = tuple(str(i) for i in range(num_classes or 0))
    return WeightsInfo(classes, IMAGENET_MEAN, IMAGENET_STD, sha)


def _first_line(err: BaseException) -> str:
    # torch's and urllib's messages run to many lines; the first says what went wrong.
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
