"""Running under ``torchrun``: which rank this process is, its device, and the few collectives meal-cache needs.

Outside ``torchrun`` (no ``WORLD_SIZE`` above 1 in the environment) every helper here is a no-op for a world of
one, so extract and distill keep one code path. Collectives carry tensors only: text is sent as UTF-8 bytes in a
uint8 tensor, never pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from meal_cache.errors import SettingsMismatch, UserError
from meal_cache.runtime import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` ranks (a world of one when not launched by ``torchrun``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # Where collectives run: NCCL takes CUDA tensors only.
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def share(self, value: object, source: int = 0) -> object:
        """``value`` as held by rank ``source`` (JSON-serialisable), on every rank."""
        if not self.enabled:
            return value
        payload = json.dumps(value).encode() if self.rank == source else b""
        length = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(length, source)
        buffer = torch.zeros(int(length), dtype=torch.uint8, device=self.device)
        if self.rank == source:
            buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buffer, source)
        return json.loads(bytes(buffer.cpu().tolist()).decode())

    def run_on_main(self, action: Callable[[], object]) -> None:
        """Run ``action`` on rank 0 only; a :class:`UserError` there is raised on every rank (none hangs)."""
        if not self.enabled:
            action()
            return
        failure = None
        if self.is_main:
            try:
                action()
            except UserError as err:
                failure = [type(err).__name__, str(err)]
        failure = self.share(failure)
        self.barrier()
        if failure is not None:
            kind, message = failure
            raise (SettingsMismatch if kind == SettingsMismatch.__name__ else UserError)(message)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average the gradients of modules outside DistributedDataParallel (discriminators, adapters).

        Every rank makes the same choices each step (the teacher, the discriminators used), so the set of
        parameters holding a gradient is the same on every rank and the collectives line up."""
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def check_identical(self, module: nn.Module, what: str) -> None:
        """Raise if ``module``'s parameters differ between ranks (a broken synchronisation, never a user error)."""
        if not self.enabled:
            return
        with torch.no_grad():
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            total = sum((p.detach().double().sum().to(self.device) for p in module.parameters()), zero)
        gathered = [torch.zeros_like(total) for _ in range(self.size)]
        dist.all_gather(gathered, total)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"{what} diverged between ranks: {[float(g) for g in gathered]}")


def init_world(device_name: str = "auto") -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (gloo on CPU, NCCL on CUDA) and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local_rank, device if device.type == "cuda" else torch.device("cpu")), device


def is_main_process() -> bool:
    """Rank 0 under ``torchrun``, or a process launched alone: the one that prints and writes reports."""
    return int(os.environ.get("RANK", "0")) == 0
