"""Where and how tensors run: device choice, mixed precision, memory layout, seeding.

CPU and CUDA take the same code path; AMP (bf16 where supported, else fp16 with loss scaling),
channels_last and pinned host memory switch on only where they help, on CUDA. ``MEAL_CACHE_AMP=fp16`` (or
``bf16``) forces one half precision on CUDA; ``auto`` (the default, or unset) keeps the choice above. The
switch exists so that fp16 with its GradScaler can be exercised on a GPU that supports bf16 (`make gpu-check`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from meal_cache.errors import UserError

AMP_ENV = "MEAL_CACHE_AMP"
AMP_CHOICES = ("auto", "bf16", "fp16")


def amp_from_env() -> str:
    """The half precision asked for in ``MEAL_CACHE_AMP`` (auto when unset); read when a Precision is made, so a
    run's subprocesses and torchrun's ranks inherit it with the environment."""
    return os.environ.get(AMP_ENV, "auto").strip().lower() or "auto"


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
    amp: str = field(default_factory=amp_from_env)  # auto, bf16 or fp16: see the module's docstring

    def __post_init__(self) -> None:
        # Checked on every device, so a typo fails on the CPU too instead of waiting for a GPU.
        if self.amp not in AMP_CHOICES:
            raise UserError(f"{AMP_ENV}={self.amp} is not one of {', '.join(AMP_CHOICES)}")

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.on_cuda

    @property
    def dtype(self) -> torch.dtype:
        if self.amp == "fp16":
            return torch.float16
        if self.amp == "bf16":
            if self.on_cuda and not torch.cuda.is_bf16_supported():
                raise UserError(f"{AMP_ENV}=bf16, but {self.device} does not support bf16 (use fp16 or auto)")
            return torch.bfloat16
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
