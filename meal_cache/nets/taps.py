"""Block taps: the outputs of a model's named modules, collected with forward hooks during an ordinary forward.

A model's *blocks* are the modules named in ``model.block_names`` (set by :func:`~meal_cache.nets.models.create_model`):
the stage outputs MEAL compares between student and teacher. :class:`BlockTap` records them; :func:`block_shapes`
gives their shapes for one input size; :func:`infer_blocks` chooses them for a network that names none. Kept apart
from the registries (:mod:`meal_cache.nets.models`, :mod:`meal_cache.nets.timm_models`) so both can tap blocks without
importing each other.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from meal_cache.errors import UserError


def _block_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{name}", module) for name, module in features.named_children()]
    return list(model.named_children())


def infer_blocks(model: nn.Module, image_size: int) -> tuple[str, ...]:
    """The last module at each spatial resolution among the model's stages (global pools excluded)."""
    candidates = [
        (name, module)
        for name, module in _block_candidates(model)
        if not isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)
    ]
    seen: dict[str, tuple[int, int]] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: (
                seen.__setitem__(name, tuple(out.shape[-2:]))
                if isinstance(out, torch.Tensor) and out.ndim == 4
                else None
            )
        )
        for name, module in candidates
    ]
    try:
        _probe(model, image_size)
    finally:
        for handle in handles:
            handle.remove()
    last_at: dict[tuple[int, int], str] = {}
    for name, _ in candidates:
        if name in seen:
            last_at.pop(seen[name], None)
            last_at[seen[name]] = name
    blocks = tuple(sorted(last_at.values(), key=[n for n, _ in candidates].index))
    if not blocks:
        raise UserError(f"found no convolutional stages in {type(model).__name__} to use as blocks")
    return blocks


def _probe(model: nn.Module, image_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            return model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)


def block_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of every block output for one ``image_size`` input."""
    with BlockTap(model) as tap:
        _probe(model, image_size)
    return {name: tuple(out.shape[1:]) for name, out in tap.outputs.items()}


class BlockTap:
    """Context manager that records the outputs of named modules during forward passes.

    ``with BlockTap(model) as tap: logits = model(x)`` leaves ``tap.outputs[name]`` holding each block's
    output of the last forward (by default ``model.block_names``).
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str] | None = None) -> None:
        self.model = model
        self.names = tuple(names if names is not None else model.block_names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _record(self, name: str, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.outputs[name] = output

    def __enter__(self) -> BlockTap:
        for name in self.names:
            try:
                module = self.model.get_submodule(name)
            except AttributeError as err:
                raise UserError(f"{type(self.model).__name__} has no module '{name}' to tap") from err
            self._handles.append(module.register_forward_hook(partial(self._record, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
