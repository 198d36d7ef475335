"""The one training loop that ``train`` (supervised) and ``distill`` share.

A stage supplies an iterable of batches per epoch and a step function that turns one batch into logits and a dict
of named losses (as mdistiller's distillers do); the loop owns the rest, in the manner of torchvision's
classification reference and timm's train loop: epochs, the learning-rate schedule, the optimiser step with loss
scaling, running means kept on the device (read once per logging interval, not after every step), evaluation on
the test split, the history, ``metrics.jsonl`` (and, where asked, the same records as TensorBoard scalars),
checkpoints after every epoch and resume from them.

Randomness is derived from the run's seed, the epoch and a named :class:`Stream`, so a resumed run replays exactly
the epochs an uninterrupted one would have run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from meal_cache.data.datasets import ImageDataset
from meal_cache.engine.distributed import World, is_main_process
from meal_cache.engine.evaluate import evaluate
from meal_cache.engine.progress import progress_bar
from meal_cache.errors import SettingsMismatch, UserError, settings_difference, unknown_choice
from meal_cache.nets.checkpoint import load_checkpoint

SCHEDULES = ("cosine", "step", "constant")
# Seeds of successive epochs are this far apart, so (seed, epoch) pairs of nearby runs never collide.
EPOCH_SEED_STRIDE = 10_007
# The progress bar's loss is read from the device (a host sync) once per this many steps.
LOG_EVERY_STEPS = 10


class Stream(IntEnum):
    """The independent random streams of one epoch (see :func:`epoch_generator`)."""

    BATCH_ORDER = 0  # which rows form each batch
    AUGMENTATION = 1  # supervised training's fresh crops and flips
    TEACHER_CHOICE = 2  # distillation's random teacher per step
    FRESH_VIEWS = 3  # the online reference's fresh augmentation (``--fresh-views``)
    DIVERGENT_ORDER = 4  # which rows form each divergent batch (``distill --divergent-ratio``)
    ACN_NOISE = 5  # the noise z of ACN's generator (``distill --method acn``)


# ---------------------------------------------------------------------------------------------- settings


def check_number(name: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:  # fmt: skip
    """Refuse a setting outside ``[low, high]`` (an end excluded where ``*_open``), NaN or infinite included;
    ``name`` is the config field, shown as its command-line option."""
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{option} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise UserError(f"{option} must be {'<' if high_open else '<='} {high:g}, got {value:g}")


def check_workers(workers: int | None) -> None:
    """``--workers``: None (from the core count) or a whole number of decoding processes, 0 for none."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"--workers must be 0 or more decoding processes, got {workers!r}")


def check_optimisation(config) -> None:
    """The settings every training stage shares: epochs, batch size, SGD and its schedule."""
    if config.schedule not in SCHEDULES:
        raise unknown_choice("schedule", config.schedule, SCHEDULES)
    for name in ("epochs", "batch_size", "eval_every"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
    check_number("lr", config.lr, low=0.0, low_open=True)
    check_number("momentum", config.momentum, low=0.0, high=1.0, high_open=True)
    check_number("weight_decay", config.weight_decay, low=0.0)
    check_number("warmup_epochs", config.warmup_epochs, low=0.0)


def evaluated_epoch(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (from 1) of ``epochs`` is evaluated on the test split: every ``eval_every``-th one,
    and the last, so a run always ends with its test metrics. A function of the epoch's number alone, so a resumed
    run evaluates the epochs an uninterrupted one would."""
    return epoch % eval_every == 0 or epoch == epochs


# ---------------------------------------------------------------------------------------------- schedule


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int) -> float:
    """Linear warm-up, then cosine to zero, steps of 10x at 50% and 75%, or constant."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "step":
        return base_lr * (0.1 ** sum(progress >= m for m in (0.5, 0.75)))
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params, lr: float, momentum: float, weight_decay: float, nesterov: bool = True) -> torch.optim.SGD:
    """SGD with momentum, Nesterov's unless ``nesterov`` is False (torch refuses Nesterov without momentum)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)  # fmt: skip


def check_nesterov(nesterov: object) -> None:
    """``--nesterov/--no-nesterov`` (a pipeline file's ``nesterov = true|false``): a boolean."""
    if not isinstance(nesterov, bool):
        raise UserError(f"nesterov takes true or false, got {nesterov!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for every group; a group with an ``lr_scale`` (distill's jointly trained
    discriminators) follows the schedule at that fraction of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches :func:`epoch_batches` cuts ``n`` rows into: full ones, or one short one if none is full."""
    return max(1, n // batch_size)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> list[torch.Tensor]:
    """A shuffled epoch of row indices cut into batches (a last short batch dropped unless asked)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Epoch ``epoch``'s batches of row indices under ``seed`` (the :attr:`Stream.BATCH_ORDER` stream)."""
    return epoch_batches(n, batch_size, epoch_generator(seed, epoch, Stream.BATCH_ORDER))


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed in-model randomness (dropout) per epoch, so a resumed run replays the same epochs."""
    torch.manual_seed(seed * EPOCH_SEED_STRIDE + epoch)


def epoch_generator(seed: int, epoch: int, stream: Stream) -> torch.Generator:
    """Per-epoch randomness of one :class:`Stream`, derived from the run seed."""
    mixed = (seed * EPOCH_SEED_STRIDE + epoch) * 31 + int(stream)
    return torch.Generator().manual_seed(mixed & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every step of a run: ``steps`` per epoch for ``epochs`` epochs."""

    base_lr: float
    kind: str
    steps: int
    epochs: int
    warmup_epochs: float

    @classmethod
    def of(cls, config, rows: int) -> Schedule:
        """The schedule of a train or distill config over ``rows`` training rows."""
        steps = steps_per_epoch(rows, config.batch_size)
        return cls(config.lr, config.schedule, steps, config.epochs, config.warmup_epochs)

    def __call__(self, step: int) -> float:
        warmup_steps = int(self.warmup_epochs * self.steps)
        return learning_rate(step, self.steps * self.epochs, self.base_lr, self.kind, warmup_steps)


# ---------------------------------------------------------------------------------------------- steps


@dataclass
class StepOutput:
    """What a stage's step returns: the logits and labels (for train accuracy), the named losses whose sum is
    backpropagated, and named values that are only logged (a discriminator's loss, say)."""

    logits: torch.Tensor
    labels: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Optimisation:
    """The optimiser the loop steps, its loss scaler, and what runs between backward and step (averaging the
    gradients of parameters DistributedDataParallel does not own, say)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    after_backward: Callable[[], None] | None = None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.after_backward is not None:
            self.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # checkpoints written before the scaler was saved hold none
            self.scaler.load_state_dict(state["scaler"])


class RunningMeans:
    """Sums of named values kept on the device, each averaged over the steps in which it occurred; reading them is
    one host sync."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1

    def count(self, name: str) -> int:
        return self._counts.get(name, 0)

    def means(self) -> dict[str, float]:
        if not self._sums:
            return {}
        names = sorted(self._sums)
        totals = torch.stack([self._sums[n] for n in names]).tolist()
        return {n: total / self._counts[n] for n, total in zip(names, totals, strict=True)}


def run_epoch(
    step: Callable[[object], StepOutput],
    batches: Iterable,
    optimisation: Optimisation,
    schedule: Schedule,
    epoch: int,
    world: World,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """One epoch of ``step`` over ``batches``: the learning rate of each step set first, the sum of the named
    losses backpropagated; returns the epoch's learning rate, mean losses and stats, steps and train top-1."""
    means = RunningMeans()
    correct, seen, lr = None, 0, schedule(epoch * schedule.steps)
    bar = progress_bar(batches, total=schedule.steps, leave=False, desc=desc, disable=not progress, unit="batch")
    for index, batch in enumerate(bar):
        lr = schedule(epoch * schedule.steps + index)
        set_learning_rate(optimisation.optimizer, lr)
        out = step(batch)
        loss = sum(out.losses.values())
        optimisation.step(loss)
        means.add({**out.losses, **out.stats, "loss": loss})
        hits = (out.logits.argmax(1) == out.labels).sum()
        correct = hits if correct is None else correct + hits
        seen += len(out.labels)
        if progress and index % LOG_EVERY_STEPS == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    record = {"lr": lr, **means.means(), "steps": means.count("loss")}
    total_correct, total_seen = world.sum([int(correct) if correct is not None else 0, seen])
    record["train_top1"] = 100.0 * total_correct / max(1, total_seen)
    return record


# ---------------------------------------------------------------------------------------------- epochs


@dataclass
class Stage:
    """What a stage gives the loop: the model evaluated after each epoch, a step function, the batches of each
    epoch, fields of its own for each epoch's record, and what to save after each epoch."""

    model: nn.Module
    train_mode: Callable[[], None]
    step: Callable[[object], StepOutput]
    batches: Callable[[int], Iterable]
    save: Callable[[int, list[dict], dict], None]
    record_fields: Callable[[int], dict] = lambda epoch: {}
    desc: str = ""


# The folder of the TensorBoard event files: in a distill run directory, and beside a train checkpoint (one run
# folder per checkpoint in it); docs/design.md, "The run directory".
TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """``--tensorboard`` needs the tensorboard package, an extra: refused before anything runs or is written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not installed ({err}): pip install "
                        "'meal-cache[tensorboard]'") from err  # fmt: skip


class ScalarLog:
    """Each epoch's record as TensorBoard scalars in ``log_dir``: every number in it under its own name (as in
    ``metrics.jsonl``), at step = the record's epoch (from 1)."""

    def __init__(self, log_dir: Path, start_epoch: int) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events at and after the first epoch this run writes: a run killed after logging an
        # epoch but before its checkpoint runs that epoch again on --resume, and TensorBoard shows it once; a
        # fresh run (start 0) hides what an overwritten run left.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch + 1)

    def add(self, record: dict) -> None:
        for name, value in record.items():
            if name != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, record["epoch"])
        self.writer.flush()  # an epoch's scalars are on disk with its metrics.jsonl line

    def close(self) -> None:
        self.writer.close()


def fit(
    stage: Stage,
    optimisation: Optimisation,
    schedule: Schedule,
    dataset: ImageDataset,
    device: torch.device,
    seed: int,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    world: World | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
    decode: str = "auto",
    tensorboard: Path | None = None,
    eval_every: int = 1,
) -> tuple[list[dict], dict | None]:
    """Epochs ``start_epoch`` to ``schedule.epochs``: train, evaluate on the test split after the epochs
    :func:`evaluated_epoch` names (every ``eval_every``-th and the last), record, save (on rank 0 only under
    ``torchrun``); with ``tensorboard``, each record also as scalars in that folder (rank 0). The record of an
    epoch not evaluated has no ``test_*`` fields, and ``stage.save`` gets None as its test metrics. Returns the
    history and the last epoch's test metrics (None when none ran)."""
    world = world or World()
    history = list(history or [])
    test = None
    # Flushed after each epoch, so a run that stops on an exception loses nothing by not closing it.
    scalars = ScalarLog(tensorboard, start_epoch) if tensorboard is not None and world.is_main else None
    for epoch in range(start_epoch, schedule.epochs):
        seed_epoch(seed, epoch)
        started = time.perf_counter()
        stage.train_mode()
        record = {"epoch": epoch + 1, **stage.record_fields(epoch)}
        prefix = f"{stage.desc} " if stage.desc else ""
        desc = f"{prefix}epoch {epoch + 1}/{schedule.epochs}"
        record.update(run_epoch(stage.step, stage.batches(epoch), optimisation, schedule, epoch, world, desc,
                                progress and world.is_main))  # fmt: skip
        test = None
        if evaluated_epoch(epoch + 1, eval_every, schedule.epochs):
            test = evaluate(stage.model, dataset, "test", device, workers=workers,
                            progress=progress and world.is_main, decode=decode)  # fmt: skip
            record.update({"test_top1": test["top1"], "test_top5": test["top5"], "test_nll": test["nll"]})
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if not world.is_main:
            continue
        if metrics_path is not None:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if scalars is not None:
            scalars.add(record)
        if progress:
            tested = f"test {test['top1']:.2f}%  " if test is not None else ""
            tqdm.write(f"{desc}  loss {record['loss']:.4f}  train {record['train_top1']:.1f}%  {tested}"
                       f"lr {record['lr']:.4f}  {record['seconds']:.1f}s")  # fmt: skip
        stage.save(epoch + 1, history, test)
    if scalars is not None:
        scalars.close()
    return history, test


# A saved state's entries, as a resume names what it kept (train's checkpoint; distill's last.pt, whose
# "distiller" holds the student and every network a method trains beside it, named by its first key part).
KEPT_STATE = {
    "model": "the network's weights",
    "optimizer": "its optimizer's state (momentum)",
    "student_optimizer": "the student's optimizer state (momentum)",
    "disc_optimizer": "the discriminators' optimizer state",
    "own_optimizers": "the method's own optimizers ({names})",
    "scaler": "the mixed-precision loss scale",
}


def resume_note(checkpoint: Path, state: dict) -> str:
    """What a resume of ``state`` (read from ``checkpoint``) keeps and from which epoch it continues."""
    done, epochs = int(state["epoch"]), state["config"].get("epochs")
    kept = []
    if state.get("distiller"):
        networks = list(dict.fromkeys(key.split(".")[0] for key in state["distiller"]))
        kept.append(f"the weights of {', '.join(networks)}")
    for key, description in KEPT_STATE.items():
        if state.get(key):  # an empty entry (no discriminators, AMP off) kept nothing
            kept.append(description.format(names=", ".join(state[key]) if isinstance(state[key], dict) else ""))
    kept.append(f"the metrics of epoch{'s 1-' if done > 1 else ' '}{done}")
    if epochs is not None and done >= epochs:
        return f"'{checkpoint}' has finished all {epochs} epochs: nothing left to train; kept {', '.join(kept)}"
    return (f"resuming '{checkpoint}' after epoch {done} of {epochs}: kept {', '.join(kept)}; continuing with epoch "
            f"{done + 1}")  # fmt: skip


def resume_state(
    output: Path, checkpoint: Path, config: dict, resume: bool, overwrite: bool, occupied: bool, occupied_message: str
) -> dict | None:
    """The saved state to resume ``output`` from, or None to start afresh. ``occupied``: the output already holds
    something; without ``resume`` or ``overwrite`` that is refused with ``occupied_message``. A resumed state must
    have been written with the same ``config``; what it keeps and the epoch it continues from are printed (by
    rank 0 under torchrun). Resuming an output with no ``checkpoint`` yet (a run killed in its first epoch) starts
    it, and says so."""
    if not occupied:
        return None
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        if state["config"] != config:
            raise SettingsMismatch(f"'{output}' was written with other settings "
                                   f"({settings_difference(state['config'], config)}); --resume needs the same "
                                   "ones (or pass --overwrite to start again)")  # fmt: skip
        if is_main_process():
            tqdm.write(resume_note(checkpoint, state))
        return state
    if resume and is_main_process():
        tqdm.write(f"nothing to resume in '{output}' (no {checkpoint.name} yet: the run stopped in its first epoch); "
                   "starting it from epoch 1")  # fmt: skip
    if not resume and not overwrite:
        raise UserError(occupied_message)
    return None
