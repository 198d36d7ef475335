"""Running under ``torchrun``: which rank this process is, its device, and the few collectives meal-cache needs.

Outside ``torchrun`` (no ``WORLD_SIZE`` above 1 in the environment) every helper here is a no-op for a world of
one, so extract and distill keep one code path. Collectives carry tensors only: text is sent as UTF-8 bytes in a
uint8 tensor, never pickled.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

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


BACKEND_ENV = "MEAL_CACHE_DIST_BACKEND"
BACKENDS = ("auto", "nccl", "gloo")


def backend_from_env() -> str:
    """``MEAL_CACHE_DIST_BACKEND``: auto (unset; gloo on CPU, NCCL on CUDA), nccl or gloo. Set, it also lets
    several ranks share one GPU (rank i on GPU i mod count), which is how a one-GPU machine tests DDP on CUDA:
    some NCCL versions refuse two ranks on one GPU, gloo takes CUDA tensors too (tests/test_decode.py)."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={backend} is not one of {', '.join(BACKENDS)}")
    return backend


def init_world(device_name: str = "auto") -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (gloo on CPU, NCCL on CUDA, or as ``MEAL_CACHE_DIST_BACKEND``
    says) and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    backend = backend_from_env()
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count and backend == "auto":
            raise UserError(f"torchrun started rank {local_rank} on a node with {count} visible GPU(s); start at most "
                            f"{count} per node (--nproc-per-node), or set {BACKEND_ENV} to share them")  # fmt: skip
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"{BACKEND_ENV}=nccl needs CUDA devices, but this run's device is {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    # meal-cache's own collectives run on CPU tensors under gloo (which takes every collective there); DDP's
    # gradients stay CUDA tensors, which gloo reduces too.
    return World(rank, size, local_rank, device if backend == "nccl" else torch.device("cpu")), device


def is_main_process() -> bool:
    """Rank 0 under ``torchrun``, or a process launched alone: the one that prints and writes reports."""
    return int(os.environ.get("RANK", "0")) == 0


# How long a rank other than 0, failing, waits for rank 0 to have printed the mistake before printing it itself.
REPORT_WAIT_S = 10.0


def exit_with_user_error(message: str, status: int = 2) -> NoReturn:
    """End a rank under ``torchrun`` after a user's mistake: one ``Error:`` line in all, every rank exits ``status``.

    The ranks usually all meet the same mistake (a setting they all check, or rank 0's error shared by
    :meth:`World.run_on_main`). Rank 0 alone prints it; another rank waits, through the store torchrun's agent
    serves, until rank 0 has printed, then leaves silently, and prints the line itself only if rank 0 has not
    within ``REPORT_WAIT_S`` (a mistake that rank alone met). A rank on its way out ignores torchrun's SIGTERM
    (sent once another rank has exited), so it exits ``status`` as well. Every rank also leaves the message in
    torchrun's error file, so that the summary torchrun prints when a rank failed names the mistake instead of
    pointing at how to enable tracebacks; that summary, with torchrun's own ChildFailedError traceback and exit
    status 1, cannot be prevented from a rank (docs/errors.md shows what a user sees). Outside torchrun's agent
    (no store to wait on) every failing rank prints its line.
    """
    # Ignored, not handled: Python puts its own handlers back to the default while it shuts down, and torchrun's
    # SIGTERM would then end a rank as "-15" on its way out.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_torchelastic_error_file(message)
    rank = int(os.environ.get("RANK", "0"))
    store = _agent_store()
    key = f"meal-cache/error-reported/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        _print_error(message)
        if store is not None:
            try:
                store.set(key, "1")
            except Exception:  # the others then print the line themselves: never hide the mistake
                pass
        sys.exit(status)
    reported = False
    if store is not None:
        try:
            store.wait([key], timedelta(seconds=REPORT_WAIT_S))
            reported = True
        except Exception:  # rank 0 met no mistake (or is gone): this rank's own is the one to print
            pass
    if not reported:
        _print_error(message)
    sys.exit(status)


def _print_error(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()


def _agent_store() -> dist.Store | None:
    """A client of the key-value store torchrun's agent serves to every rank, or None outside torchrun."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not address or not port:
        return None
    try:
        return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=REPORT_WAIT_S))
    except Exception:
        return None


def _write_torchelastic_error_file(message: str) -> None:
    """Leave ``message`` where torchrun reads a failed rank's error (the "traceback" of its closing summary)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                            "timestamp": str(int(time.time()))}}}  # fmt: skip
    try:
        with open(path, "w") as file:
            json.dump(record, file)
    except OSError:
        pass
