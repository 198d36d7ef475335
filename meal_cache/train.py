"""Plain supervised training (teachers, the student-alone baseline) and the loop pieces distill shares.

In the manner of torchvision's classification reference: plain ``train_one_epoch`` / ``evaluate`` functions,
a full checkpoint after every epoch (model, optimizer, epoch, history), and resume from it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from meal_cache import augment
from meal_cache.checkpoint import load_checkpoint, model_payload, save_checkpoint
from meal_cache.data import ImageDataset, load_dataset
from meal_cache.errors import SettingsMismatch, UserError, unknown_choice
from meal_cache.evaluate import evaluate
from meal_cache.models import create_model
from meal_cache.runtime import Precision, device_images, resolve_device, seed_everything

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a supervised run; recorded whole in the checkpoint."""

    arch: str
    data: str = "digits"
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")


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


def make_optimizer(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed in-model randomness (dropout) per epoch, so a resumed run replays the same epochs."""
    torch.manual_seed(seed * 10_007 + epoch)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Per-epoch randomness derived from the run seed, so a resumed run replays the same epochs."""
    return torch.Generator().manual_seed(((seed * 10_007 + epoch) * 31 + stream) & 0x7FFF_FFFF_FFFF_FFFF)


# ---------------------------------------------------------------------------------------------- train


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: ImageDataset,
    config: TrainConfig,
    epoch: int,
    steps: int,
    precision: Precision,
    progress: bool = True,
) -> dict[str, float]:
    """One epoch of cross-entropy training on freshly drawn augmentation; returns loss and train accuracy."""
    model.train()
    recipe = augment.recipe_for(dataset.recipe, dataset.image_size)
    params = augment.draw(recipe, len(labels), dataset.image_size, epoch_generator(config.seed, epoch, 1))
    batches = epoch_batches(len(labels), config.batch_size, epoch_generator(config.seed, epoch, 0))
    total_steps = steps * config.epochs
    warmup = int(config.warmup_epochs * steps)
    loss_sum, seen = torch.zeros((), device=precision.device), 0
    correct_t = torch.zeros((), device=precision.device, dtype=torch.long)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress, unit="batch")
    for step_in_epoch, rows in enumerate(bar):
        lr = learning_rate(epoch * steps + step_in_epoch, total_steps, config.lr, config.schedule, warmup)
        set_learning_rate(optimizer, lr)
        rows_dev = rows.to(precision.device, non_blocking=True)
        batch = augment.apply(
            images[rows_dev], params[rows], dataset.mean, dataset.std, channels_last=precision.channels_last
        )
        target = labels[rows_dev]
        with precision.autocast():
            logits = model(batch)
            loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(rows)
        correct_t += (logits.argmax(1) == target).sum()
        seen += len(rows)
    correct = int(correct_t.item())
    return {"loss": float(loss_sum.item()) / max(1, seen), "train_top1": 100.0 * correct / max(1, seen), "lr": lr}


def train_supervised(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
) -> dict:
    """Train ``config.arch`` on ``config.data`` with cross-entropy and write the checkpoint to ``out``.

    The checkpoint is rewritten after every epoch; ``resume`` continues an interrupted run from it.
    Returns the final checkpoint payload (without tensors' copies: the same dict that was saved).
    """
    config.validate()
    out = Path(out)
    state = None
    if out.exists():
        if resume:
            state = load_checkpoint(out)
            if state["config"] != dataclasses.asdict(config):
                raise SettingsMismatch(
                    f"'{out}' was written with other settings; resume needs the same ones "
                    "(or pass --overwrite to start again)"
                )
        elif not overwrite:
            raise UserError(f"'{out}' exists; pass --resume to continue it or --overwrite to replace it")
    device = resolve_device(config.device)
    precision = Precision(device)
    dataset = dataset or load_dataset(config.data, config.data_root, config.download, config.image_size)
    seed_everything(config.seed)
    model = precision.prepare(create_model(config.arch, dataset.num_classes, dataset.image_size))
    optimizer = make_optimizer(model.parameters(), config.lr, config.momentum, config.weight_decay)
    scaler = precision.grad_scaler()
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
    images, labels = device_images(dataset.train, device)
    steps = steps_per_epoch(len(labels), config.batch_size)
    payload = state
    for epoch in range(start_epoch, config.epochs):
        seed_epoch(config.seed, epoch)
        started = time.perf_counter()
        stats = train_one_epoch(
            model, optimizer, scaler, images, labels, dataset, config, epoch, steps, precision, progress
        )
        test = evaluate(model, dataset, "test", device)
        record = {
            "epoch": epoch + 1,
            **stats,
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "test_nll": test["nll"],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}  loss {stats['loss']:.4f}  train {stats['train_top1']:.1f}%  "
                f"test {test['top1']:.2f}%  lr {stats['lr']:.4f}  {record['seconds']:.1f}s"
            )
        payload = model_payload(model, config.arch, dataset, dataclasses.asdict(config), epoch + 1, history, test)
        payload["optimizer"] = optimizer.state_dict()
        save_checkpoint(out, payload)
    return payload
