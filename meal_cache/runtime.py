"""Where and how tensors run: device choice, mixed precision, memory layout, seeding.

CPU and CUDA take the same code path; AMP (bf16 where supported, else fp16 with loss scaling),
channels_last and pinned host memory switch on only where they help, on CUDA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from meal_cache.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from err


@dataclass(frozen=True)
class Precision:
    """Mixed precision and memory layout for a device: bf16/fp16 autocast and channels_last on CUDA only."""

    device: torch.device

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.on_cuda

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.on_cuda and torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.on_cuda:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # bf16 needs no loss scaling; fp16 does.
        return torch.amp.GradScaler("cuda", enabled=self.on_cuda and self.dtype == torch.float16)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
