"""Plain supervised training: the teachers and the student-alone baseline, with cross-entropy on freshly drawn
augmentation each epoch. The epochs, schedule, checkpoints and resume are :mod:`meal_cache.engine.loop`'s; this module
supplies the step. The checkpoint ``out`` is the trained network (:func:`~meal_cache.nets.checkpoint.model_payload`)
plus the optimiser's state, rewritten after every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from meal_cache.data.datasets import ImageDataset, load_dataset
from meal_cache.data.source import check_decode
from meal_cache.engine.loop import (
    TENSORBOARD_DIR,
    Optimisation,
    Schedule,
    Stage,
    StepOutput,
    Stream,
    check_nesterov,
    check_number,
    check_optimisation,
    check_workers,
    epoch_generator,
    fit,
    make_optimizer,
    resume_state,
    shuffled_batches,
)
from meal_cache.nets.checkpoint import model_payload, save_checkpoint
from meal_cache.nets.models import create_model
from meal_cache.runtime import Precision, resolve_device, seed_everything
from meal_cache.views import augment


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
    nesterov: bool = True  # Nesterov momentum; recorded only when off, so older checkpoints still resume
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    # The test split is evaluated after every eval_every-th epoch and the last; recorded only when not 1.
    eval_every: int = 1
    label_smoothing: float = 0.0
    # timm's train.py knobs (None: the data's recipe's own; see augment.AugmentOptions).
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    vflip: float | None = None
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # decoding processes for image files (None: from the core count); not recorded
    decode: str = "auto"  # where image files' JPEGs are decoded: cpu, cuda or auto; not recorded

    def validate(self) -> None:
        """Refuse every choice and number outside what training accepts, before anything runs."""
        check_optimisation(self)
        check_nesterov(self.nesterov)
        check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        check_workers(self.workers)
        check_decode(self.decode)
        self.augment_options()

    def augment_options(self) -> augment.AugmentOptions:
        """``--scale``, ``--ratio``, ``--hflip``, ``--vflip``, checked."""
        return augment.augment_options(self)

    def recorded(self) -> dict:
        """The config as checkpoints record it: everything but how many processes decode, and the augmentation
        options, Nesterov and the evaluation interval left at their unset values (so checkpoints written before
        them still resume)."""
        recorded = augment.recorded_options(dataclasses.asdict(self))
        recorded.pop("workers")
        recorded.pop("decode")
        for name, unset in RECORDED_WHEN_SET.items():
            if recorded[name] == unset:
                recorded.pop(name)
        return recorded


# Settings a checkpoint's config holds only when they differ from these values, so the records of runs made before
# they existed stay the same.
RECORDED_WHEN_SET = {"nesterov": True, "eval_every": 1}


def tensorboard_dir(out: str | Path) -> Path:
    """Where ``train --tensorboard`` writes a checkpoint's events: ``tensorboard/STEM/`` beside it, so the
    teachers of one folder are runs side by side under ``tensorboard --logdir FOLDER/tensorboard``."""
    out = Path(out)
    return out.parent / TENSORBOARD_DIR / out.stem


def train_supervised(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
    tensorboard: bool = False,
) -> dict:
    """Train ``config.arch`` on ``config.data`` with cross-entropy and write the checkpoint to ``out``.

    The checkpoint is rewritten after every epoch; ``resume`` continues an interrupted run from it. With
    ``tensorboard``, each epoch's record is also written as TensorBoard scalars to :func:`tensorboard_dir`.
    Returns the final checkpoint payload (without tensors' copies: the same dict that was saved).
    """
    config.validate()
    out = Path(out)
    state = resume_state(out, out, config.recorded(), resume, overwrite, out.exists(),
                         f"'{out}' exists; pass --resume to continue it or --overwrite to replace it")  # fmt: skip
    device = resolve_device(config.device)
    precision = Precision(device)
    dataset = dataset or load_dataset(config.data, config.data_root, config.download, config.image_size)
    seed_everything(config.seed)
    model = precision.prepare(create_model(config.arch, dataset.num_classes, dataset.image_size))
    optimizer = make_optimizer(model.parameters(), config.lr, config.momentum, config.weight_decay, config.nesterov)
    optimisation = Optimisation(optimizer, precision.grad_scaler())
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimisation.load_state_dict(state)
        history, start_epoch = list(state["history"]), int(state["epoch"])
    source = dataset.train.open(device, config.workers, decode=config.decode)
    labels = dataset.train.labels.to(device, non_blocking=True)
    sizes = dataset.train.source_sizes(config.workers)
    recipe = dataset.view_recipe(config.augment_options())
    saved_payload = state

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        params = augment.draw(recipe, sizes, epoch_generator(config.seed, epoch, Stream.AUGMENTATION))
        rows = shuffled_batches(len(labels), config.batch_size, config.seed, epoch)
        return source.pixels((batch, params[batch], batch) for batch in rows)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        rows, pixels = batch
        inputs = augment.normalise(pixels, dataset.mean, dataset.std, precision.channels_last)
        target = labels[rows.to(device, non_blocking=True)]
        with precision.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
        return StepOutput(logits, target, {"loss": loss})

    def save(epoch: int, history: list[dict], test: dict) -> None:
        payload = model_payload(model, config.arch, dataset, config.recorded(), epoch, history, test)
        payload.update(optimisation.state_dict())
        nonlocal saved_payload
        save_checkpoint(out, payload)
        saved_payload = payload

    stage = Stage(model=model, train_mode=model.train, step=step, batches=batches, save=save)
    try:
        fit(stage, optimisation, Schedule.of(config, len(labels)), dataset, device, config.seed, start_epoch, history,
            progress=progress, workers=config.workers, decode=config.decode,
            tensorboard=tensorboard_dir(out) if tensorboard else None, eval_every=config.eval_every)  # fmt: skip
    finally:
        source.close()
    return saved_payload
