"""Stage 2: train the student (and MEAL's discriminators) from the teacher cache alone.

Each epoch ``e`` replays augmented view ``e mod V`` of the store: the stored crop and flip are applied to the
dataset's images on the device, so the student sees exactly the pixels the teachers saw, and the teachers'
logits and block features for those pixels are read from memory (a whole view is loaded at a time, the next one
prefetched in a background thread). The teachers' checkpoints are never opened, except by the ``--online``
reference, which runs the teachers in the loop on the same replayed images.

A :class:`Distiller` holds the student, the adapters and the discriminators and, like mdistiller's
distillers, turns a batch into logits and a dict of named losses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from dask.utils import parse_bytes
from torch import nn
from tqdm.auto import tqdm

from meal_cache import augment, losses
from meal_cache.checkpoint import model_payload, save_checkpoint, state_dict_cpu
from meal_cache.data import ImageDataset, load_dataset
from meal_cache.distributed import World, init_world
from meal_cache.errors import SettingsMismatch, UserError, unknown_choice
from meal_cache.evaluate import evaluate
from meal_cache.loop import (
    Optimisation,
    Schedule,
    Stage,
    StepOutput,
    Stream,
    check_number,
    check_optimisation,
    check_workers,
    epoch_batches,
    epoch_generator,
    fit,
    make_optimizer,
    resume_state,
    shuffled_batches,
)
from meal_cache.models import BlockTap, block_shapes, create_model
from meal_cache.runtime import Precision, seed_everything
from meal_cache.source import ImageSource
from meal_cache.store import BlockSpec, TeacherStore, open_store, verify_store
from meal_cache.teachers import resolve_teacher, teacher_outputs

SELECTIONS = ("random", "mean", "all")
REPRESENTATIONS = ("maps", "blocks")
DISCRIMINATORS = ("blocks", "output")
# How the discriminators are trained. "adversarial": their own Adam step on detached student features, then the
# student's loss for fooling them (a GAN game). "joint": MEAL's reference code, whose discriminator loss is added
# to the student's loss on one optimiser with gradient reversal off, so the student also lowers it.
ADV_GAMES = ("adversarial", "joint")
# Every this many steps, the gradient norm each loss family sends into the student's parameters is logged (one
# extra backward pass per family on that step).
GRAD_NORM_EVERY = 20
# One divergent batch for every four natural ones: ACN trains on natural and divergent examples together; a
# quarter keeps natural images the bulk of each epoch (docs/design.md, "Divergent views").
DIVERGENT_RATIO = 0.25


@dataclass(frozen=True)
class Method:
    """What a method trains with: block losses, adversarial losses on blocks and on the output."""

    blocks: bool
    block_adversarial: bool
    output_adversarial: bool
    soft_loss: str
    temperature: float
    selection: str
    help: str
    peers: bool = False  # trains --peers students together (meal_cache.afd) instead of one


METHODS: dict[str, Method] = {
    # Soft labels: T=4 KL for all three. The references' T=1 soft cross-entropy (MEAL, MEAL V2) was measured
    # worse on digits (docs/design.md); --soft-loss soft-ce --temperature 1 restores it.
    "meal": Method(True, True, True, "kl", 4.0, "random",
                   "MEAL: block similarity + per-block and output discriminators, one random teacher a step"),
    "kd": Method(False, False, False, "kl", 4.0, "mean", "Hinton KD from the ensemble mean of the cached logits"),
    "meal-v2": Method(False, False, True, "kl", 4.0, "mean",
                      "MEAL V2: ensemble soft labels + one discriminator on the output"),
    "afd": Method(False, False, False, "kl", 4.0, "mean",
                  "AFD: --peers students, each with conv discriminators on its last feature map against its "
                  "cyclic peer's and the teachers' maps, plus mutual KL", peers=True),
}  # fmt: skip


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; written to ``config.json``."""

    store: str
    student: str
    method: str = "meal"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    teacher_selection: str | None = None  # None: the method's own
    # None: pooled block channels through learned adapters, the ablation's choice over MEAL's channel-mean maps
    # (docs/design.md, "MEAL's ablation"), or maps where the store holds maps and no blocks (stores extracted
    # with --features maps, and --for meal before the ablation); "maps" is the reference's.
    representation: str | None = None
    block_loss: str | None = None  # None: soft-ce for maps (MEAL's reference), l2 for blocks
    block_weights: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.01])
    match_blocks: int | None = None
    soft_loss: str | None = None
    temperature: float | None = None
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    adv_weight: float = 0.1
    adv_loss: str = "bce"
    disc_lr: float = 2e-4
    discriminators: list[str] | None = None  # None: the method's own (DISCRIMINATORS); [] none
    adv_game: str = "adversarial"  # see ADV_GAMES
    preset: str | None = None  # see PRESETS: settings a preset fills in where they are left at their defaults
    data: str | None = None
    data_root: str | None = None
    download: bool = False
    online: bool = False
    # Online only: a fresh augmentation of every image each epoch (drawn from the seed and the epoch, with the
    # store's recipe) instead of replaying the store's views: function matching's ideal the views curve is
    # measured against.
    fresh_views: bool = False
    teachers: list[str] = field(default_factory=list)
    teacher_dir: str = "teachers"
    seed: int = 0
    refine_labels: bool = False  # hard labels of suspect rows (see `meal-cache inspect`) become the ensemble's
    refine_confidence: float = 0.5
    max_memory: str | None = None  # e.g. "2GB": stream chunks when two views of the targets do not fit
    device: str = "auto"
    workers: int | None = None  # decoding processes for image files (None: from the core count); not recorded
    # FKD's multi-crop: each batch holds K cached views of batch_size / K images, decoded once for the K crops.
    crops_per_image: int = 1
    # Divergent views (extract --divergent-views): this many of their batches per natural batch, interleaved
    # through each epoch; None: DIVERGENT_RATIO where the store has them, else 0.
    divergent_ratio: float | None = None
    # AFD's peers: students trained together (None: one, and the only value a method without peers takes).
    peers: int | None = None

    def resolved(self, stored: tuple[str, ...] | None = None) -> DistillConfig:
        """The config with a preset's and the method's defaults filled in and every choice and number checked;
        ``stored``: the store's feature kinds, which choose the representation left unset."""
        self = self._with_preset()
        if self.representation is None:
            only_maps = stored is not None and "maps" in stored and "blocks" not in stored
            self = dataclasses.replace(self, representation="maps" if only_maps else "blocks")
        if self.method not in METHODS:
            raise unknown_choice("method", self.method, list(METHODS))
        method = METHODS[self.method]
        if self.representation not in REPRESENTATIONS:
            raise unknown_choice("representation", self.representation, REPRESENTATIONS)
        if self.discriminators is not None:
            self = dataclasses.replace(self, discriminators=parse_discriminators(self.discriminators))
            if "blocks" in self.discriminators and not method_blocks(self.method):
                raise UserError(f"--discriminators blocks needs block terms, which --method {self.method} has not "
                                "(use --method meal, or --discriminators output)")  # fmt: skip
        if self.adv_game not in ADV_GAMES:
            raise unknown_choice("adversarial game", self.adv_game, ADV_GAMES)
        own = [name for name, on in zip(DISCRIMINATORS, (method.block_adversarial, method.output_adversarial),
                                        strict=True) if on]  # fmt: skip
        chosen = self.discriminators if self.discriminators is not None else own
        config = dataclasses.replace(
            self,
            discriminators=[d for d in DISCRIMINATORS if d in chosen],
            teacher_selection=self.teacher_selection or method.selection,
            block_loss=self.block_loss or ("soft-ce" if self.representation == "maps" else "l2"),
            soft_loss=self.soft_loss or method.soft_loss,
            temperature=method.temperature if self.temperature is None else self.temperature,
        )
        if config.teacher_selection not in SELECTIONS:
            raise unknown_choice("teacher selection", config.teacher_selection, SELECTIONS)
        losses.similarity(config.block_loss)
        if config.soft_loss not in losses.SOFT_LABEL:
            raise unknown_choice("soft-label loss", config.soft_loss, list(losses.SOFT_LABEL))
        if config.adv_loss not in losses.ADVERSARIAL:
            raise unknown_choice("adversarial loss", config.adv_loss, list(losses.ADVERSARIAL))
        check_optimisation(config)
        check_number("temperature", config.temperature, low=0.0, low_open=True)
        for name in ("soft_weight", "hard_weight", "adv_weight"):
            check_number(name, getattr(config, name), low=0.0)
        check_number("disc_lr", config.disc_lr, low=0.0, low_open=True)
        check_workers(config.workers)
        _check_crops(config)
        if config.divergent_ratio is not None:
            check_number("divergent_ratio", config.divergent_ratio, low=0.0)
            if config.divergent_ratio > 0 and config.crops_per_image > 1:
                raise UserError("--divergent-ratio mixes whole batches of divergent views; it does not combine with "
                                "--crops-per-image")  # fmt: skip
        config = _check_peers(config, method)
        check_number("refine_confidence", config.refine_confidence, low=0.0, high=1.0)
        if any(not math.isfinite(w) or w < 0 for w in config.block_weights):
            raise UserError(f"--block-weights must be numbers >= 0, got {config.block_weights}")
        if config.match_blocks is not None and config.match_blocks < 0:
            raise UserError(f"--match-blocks must be at least 0, got {config.match_blocks}")
        if config.max_memory is not None:
            try:
                parse_bytes(config.max_memory)
            except (ValueError, TypeError) as err:
                raise UserError(f"--max-memory takes a size such as 512MB or 4GB, got '{config.max_memory}'") from err
        if config.online and not config.teachers:
            raise UserError("--online runs the teachers in the loop: name them with --teachers")
        if config.fresh_views and not config.online:
            raise UserError("--fresh-views draws new augmentations the store has no targets for: it needs --online")
        if not _has_a_loss(config, method):
            raise UserError(f"--method {config.method} with these weights trains on nothing: set --soft-weight or "
                            "--hard-weight above 0 (or, for meal, block or adversarial weights)")  # fmt: skip
        if config.refine_labels and not config.hard_weight:
            raise UserError("--refine-labels replaces hard labels, which only train with --hard-weight > 0 "
                            "(MEAL's refinement uses --hard-weight 1)")  # fmt: skip
        return config

    def _with_preset(self) -> DistillConfig:
        """The config with its preset's settings wherever this config leaves them at the dataclass defaults."""
        if self.preset is None:
            return self
        if self.preset not in PRESETS:
            raise unknown_choice("preset", self.preset, list(PRESETS))
        unset = dataclasses.MISSING
        defaults = {f.name: f.default if f.default is not unset else f.default_factory()
                    for f in dataclasses.fields(self) if (f.default, f.default_factory) != (unset, unset)}  # fmt: skip
        # A setting may be a function of the config (the reference's discriminator rate is a hundredth of --lr).
        chosen = {k: v(self) if callable(v) else v for k, v in PRESETS[self.preset].settings.items()
                  if getattr(self, k) == defaults[k]}  # fmt: skip
        return dataclasses.replace(self, **chosen)


@dataclass(frozen=True)
class Preset:
    """Settings ``distill --preset NAME`` fills in (each one only where the command leaves it at its default
    value); a value may be a function of the config."""

    settings: dict
    help: str


PRESETS: dict[str, Preset] = {
    # MEAL's reference code (AaronHeee/MEAL, main.py and loss.py): channel-mean maps with soft cross-entropy,
    # soft cross-entropy at T = 1 on the outputs, a
    # random teacher each step, block weights from its README's single-teacher command (the last blocks weigh
    # most; the same as meal-cache's default), eta = 1 on every discriminator, and the discriminators on the
    # student's optimiser at a hundredth of its learning rate (d_lr 1e-3 against lr 0.1), no gradient reversal.
    "reference": Preset({"method": "meal", "representation": "maps", "soft_loss": "soft-ce", "temperature": 1.0,
                         "teacher_selection": "random", "adv_weight": 1.0, "adv_game": "joint",
                         "disc_lr": lambda config: config.lr / 100, "hard_weight": 0.0},
                        "MEAL's reference code: T=1 soft-ce, random teacher, joint discriminators, eta 1"),
}  # fmt: skip


def parse_discriminators(value: object) -> list[str]:
    """``--discriminators``' value as names: a list of them, a comma-separated string, or ``none`` (no
    discriminators); anything else is one clear error."""
    if isinstance(value, str):
        value = [] if value.strip() == "none" else [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UserError(f"--discriminators takes {', '.join(DISCRIMINATORS)} or none, got {value!r}")
    names = [] if list(value) == ["none"] else list(value)
    unknown = [v for v in names if v not in DISCRIMINATORS]
    if unknown:
        raise UserError(f"--discriminators takes {', '.join(DISCRIMINATORS)} or none, got {','.join(unknown)}")
    return names


def method_blocks(name: str) -> bool:
    """Whether a method (unknown names: assumed so, refused elsewhere) has block terms."""
    return name not in METHODS or METHODS[name].blocks


def _check_crops(config: DistillConfig) -> None:
    crops = config.crops_per_image
    if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
        raise UserError(f"--crops-per-image must be at least 1, got {crops!r}")
    if config.batch_size % crops:
        raise UserError(f"--batch-size {config.batch_size} must be a multiple of --crops-per-image {crops} (a batch "
                        f"holds {crops} crops of each of its images)")  # fmt: skip
    if crops > 1 and config.online:
        raise UserError("--crops-per-image replays cached views; the online reference (--online) takes one view")


def _has_a_loss(config: DistillConfig, method: Method) -> bool:
    """Whether some term of the student's loss has a weight above 0."""
    blocks = method.blocks and config.match_blocks != 0 and any(w > 0 for w in config.block_weights)
    adversarial = ("blocks" in config.discriminators and blocks) or "output" in config.discriminators
    adversarial = adversarial or method.peers  # AFD's map discriminators
    return config.soft_weight > 0 or config.hard_weight > 0 or blocks or (adversarial and config.adv_weight > 0)


def _check_peers(config: DistillConfig, method: Method) -> DistillConfig:
    """``--peers``: a whole number >= 1, taken only by a method that trains peers (None there means one)."""
    peers = config.peers
    if peers is not None and (isinstance(peers, bool) or not isinstance(peers, int) or peers < 1):
        raise UserError(f"--peers must be a whole number of students, at least 1, got {peers!r}")
    if not method.peers:
        if peers is not None:
            takers = ", ".join(name for name, m in METHODS.items() if m.peers)
            raise UserError(f"--peers trains several students together, which only --method {takers} does "
                            f"(got --method {config.method})")  # fmt: skip
        return config
    if config.discriminators:
        raise UserError(f"--method {config.method} trains its own discriminators on the peers' maps; --discriminators "
                        "is not read (--adv-weight 0 turns the adversarial terms off)")  # fmt: skip
    return dataclasses.replace(config, peers=1 if peers is None else peers)


# ------------------------------------------------------------------------------------------------ matching


@dataclass(frozen=True)
class BlockPair:
    """A student block matched to a teacher block, counted from the end (rank 0 = the last blocks)."""

    teacher: str
    rank: int
    student_block: str
    teacher_block: BlockSpec
    weight: float

    @property
    def key(self) -> str:
        # ModuleDict keys may not contain dots.
        return f"{self.teacher}__{self.rank}".replace(".", "_")


def match_blocks(
    student_blocks: tuple[str, ...],
    teacher_blocks: dict[str, list[BlockSpec]],
    weights: list[float],
    limit: int | None,
) -> list[BlockPair]:
    """Pair blocks from the end, so any two architectures match: the last with the last, and so on,
    for as many blocks as both have and ``weights`` (and ``limit``) allow."""
    pairs = []
    for teacher, blocks in teacher_blocks.items():
        count = min(len(student_blocks), len(blocks), len(weights), limit if limit is not None else len(weights))
        for rank in range(count):
            pairs.append(BlockPair(teacher, rank, student_blocks[-1 - rank], blocks[-1 - rank], float(weights[rank])))
    return pairs


# ------------------------------------------------------------------------------------------------ feeding


class ViewFeed:
    """Whole views of the needed store arrays in memory (pinned on CUDA), the next one read in the background.

    Batches are then plain tensor indexing; Zarr is only ever read a whole view at a time.
    """

    def __init__(self, store: TeacherStore, keys: list[str], device: torch.device) -> None:
        self.store = store
        self.keys = keys
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="view-prefetch")
        self._pending: dict[int, Future] = {}

    def _read(self, view: int) -> dict[str, torch.Tensor]:
        arrays = {}
        for key in self.keys:
            tensor = torch.from_numpy(self.store.read(key, view))
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            arrays[key] = tensor.to(self.device, non_blocking=True)
        return arrays

    def prefetch(self, view: int) -> None:
        if view not in self._pending:
            self._pending[view] = self._pool.submit(self._read, view)

    def get(self, view: int) -> dict[str, torch.Tensor]:
        self.prefetch(view)
        return self._pending.pop(view).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class InMemoryBatches:
    """Shuffled batches of a view held whole in memory (see :class:`ViewFeed`)."""

    def __init__(self, feed: ViewFeed, n: int, batch_size: int, seed: int) -> None:
        self.feed, self.n, self.batch_size, self.seed = feed, n, batch_size, seed

    def epoch(self, epoch: int, view: int, next_view: int | None) -> Iterator[tuple[torch.Tensor, dict]]:
        cached = self.feed.get(view)
        if next_view is not None:
            self.feed.prefetch(next_view)
        for rows in shuffled_batches(self.n, self.batch_size, self.seed, epoch):
            rows_dev = rows.to(self.feed.device, non_blocking=True)
            yield rows, {key: value[rows_dev] for key, value in cached.items()}

    def close(self) -> None:
        self.feed.close()


class MultiCropBatches:
    """FKD's multi-crop: every batch holds ``crops`` views of each of its ``batch_size / crops`` rows, laid out
    view by view, the targets of those views held whole in memory. Each image is then decoded once for its
    ``crops`` crops."""

    def __init__(self, feed: ViewFeed, n: int, batch_size: int, seed: int, crops: int) -> None:
        self.feed, self.n, self.batch_size, self.seed, self.crops = feed, n, batch_size, seed, crops

    def epoch(self, epoch: int, views: list[int],
              next_views: list[int] | None) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:  # fmt: skip
        """``(rows, targets, crop)`` per batch: ``crop[i]`` is which of ``views`` sample ``i`` is."""
        cached = [self.feed.get(view) for view in views]
        for view in next_views or []:
            self.feed.prefetch(view)
        for rows in shuffled_batches(self.n, self.batch_size // self.crops, self.seed, epoch):
            rows_dev = rows.to(self.feed.device, non_blocking=True)
            targets = {key: torch.cat([arrays[key][rows_dev] for arrays in cached]) for key in cached[0]}
            yield rows.repeat(self.crops), targets, torch.arange(self.crops).repeat_interleave(len(rows))

    def close(self) -> None:
        self.feed.close()


class StreamingBatches:
    """For views larger than memory: whole chunks in shuffled order, ``buffer_chunks`` at a time, rows shuffled
    within that buffer (the next buffer read in the background). Each epoch still sees every row once, in
    ``floor(N / batch_size)`` full batches, as in memory."""

    def __init__(self, store: TeacherStore, keys: list[str], device: torch.device, batch_size: int, seed: int,
                 buffer_chunks: int) -> None:  # fmt: skip
        self.store, self.keys, self.device = store, keys, device
        self.batch_size, self.seed, self.buffer_chunks = batch_size, seed, max(1, buffer_chunks)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-prefetch")

    def _read(self, view: int, chunks: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slices = [self.store.chunk_rows(c) for c in chunks]
        rows = torch.cat([torch.arange(r.start, r.stop) for r in slices])
        arrays = {key: torch.cat([torch.from_numpy(self.store.read(key, view, r)) for r in slices])
                  for key in self.keys}  # fmt: skip
        return rows, arrays

    def epoch(self, epoch: int, view: int, next_view: int | None) -> Iterator[tuple[torch.Tensor, dict]]:
        generator = epoch_generator(self.seed, epoch, Stream.BATCH_ORDER)
        groups = torch.randperm(self.store.n_chunks, generator=generator).split(self.buffer_chunks)
        pending = self._pool.submit(self._read, view, groups[0].tolist())
        carry_rows, carry = torch.empty(0, dtype=torch.long), {}
        yielded = 0
        for index in range(len(groups)):
            rows, arrays = pending.result()
            if index + 1 < len(groups):
                pending = self._pool.submit(self._read, view, groups[index + 1].tolist())
            if len(carry_rows):
                rows = torch.cat([carry_rows, rows])
                arrays = {key: torch.cat([carry[key], value]) for key, value in arrays.items()}
            order = torch.randperm(len(rows), generator=generator)
            full = len(order) // self.batch_size * self.batch_size
            for batch in order[:full].split(self.batch_size):
                yield (
                    rows[batch],
                    {key: value[batch].to(self.device, non_blocking=True) for key, value in arrays.items()},
                )
                yielded += 1
            rest = order[full:]
            carry_rows, carry = rows[rest], {key: value[rest] for key, value in arrays.items()}
        if not yielded and len(carry_rows):  # fewer rows than one batch: one short batch, as in memory
            yield carry_rows, {key: value.to(self.device) for key, value in carry.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class OnlineBatches:
    """Batches of row indices only: the online reference computes the targets in the loop."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def epoch(self, epoch: int, view: int, next_view: int | None) -> Iterator[tuple[torch.Tensor, dict | None]]:
        for rows in shuffled_batches(self.n, self.batch_size, self.seed, epoch):
            yield rows, None

    def close(self) -> None:
        pass


def view_bytes(store: TeacherStore, keys: list[str]) -> int:
    """Bytes of one view of ``keys`` in memory."""
    total = 0
    for key in keys:
        total += int(np.prod(store.logical_shape(key)[1:])) * store.value_itemsize(key)
    return total


def make_batch_source(config: DistillConfig, store: TeacherStore, keys: list[str], device: torch.device):
    """In memory when two views (the current and the prefetched one) fit ``--max-memory``, else streaming."""
    n = store.n
    if config.online:
        return OnlineBatches(n, config.batch_size, config.seed)
    per_view = view_bytes(store, keys)
    limit = parse_bytes(config.max_memory) if config.max_memory else None
    crops = config.crops_per_image
    if crops > 1:
        if limit is not None and 2 * crops * per_view > limit:
            raise UserError(f"--crops-per-image {crops} needs the targets of {crops} views in memory (and the next "
                            f"{crops}, prefetched): {2 * crops * per_view / 2**20:.0f} MB, more than --max-memory "
                            f"{config.max_memory}")  # fmt: skip
        return MultiCropBatches(ViewFeed(store, keys, device), n, config.batch_size, config.seed, crops)
    if limit is None or 2 * per_view <= limit:
        return InMemoryBatches(ViewFeed(store, keys, device), n, config.batch_size, config.seed)
    per_chunk = max(1, per_view // store.n_chunks)
    # Two buffers live at once: the one in use and the one being read.
    return StreamingBatches(store, keys, device, config.batch_size, config.seed, limit // (2 * per_chunk))


class OnlineTeachers:
    """The reference: the same targets as the cache, computed by running the teachers in the loop."""

    def __init__(self, config: DistillConfig, store: TeacherStore, dataset: ImageDataset, precision: Precision):
        by_source = {store.teacher(key)["source"]: key for key in store.teacher_names}
        self.teachers = {}
        for name in config.teachers:
            key = by_source.get(name, name)
            if key not in store.teacher_names:
                raise UserError(f"online teacher '{name}' is not in the store (it has {', '.join(by_source)})")
            blocks = store.blocks(key)
            teacher = resolve_teacher(name, config.teacher_dir, dataset, ",".join(b.name for b in blocks),
                                      max(b.grid for b in blocks))  # fmt: skip
            recorded = store.teacher(key)["checkpoint_sha256"]
            if teacher.spec.checkpoint_sha256 != recorded:
                raise UserError(f"teacher '{name}' is not the checkpoint the store was extracted from (sha256 differs)")
            teacher.model = precision.prepare(teacher.model).eval()
            self.teachers[key] = teacher
        self.features = store.layout.features
        self.precision = precision

    def targets(self, pixels: torch.Tensor, selected: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Targets of the ``selected`` teachers (default all) on a view's ``pixels``: a random-teacher step runs
        only its teacher."""
        out = {}
        for key, teacher in self.teachers.items():
            if selected is not None and key not in selected:
                continue
            for name, value in teacher_outputs(teacher, pixels, self.features, self.precision).items():
                out[f"teachers/{key}/{name}"] = value
        return out


# ------------------------------------------------------------------------------------------------ distiller


class AdversarialInput(NamedTuple):
    """One discriminator's input of a step: teacher (real) and student (fake) representations, and the weight of
    the student's adversarial loss on it."""

    key: str
    real: torch.Tensor
    fake: torch.Tensor
    weight: float


def soft_target_sets(config: DistillConfig, teacher_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """The soft targets a step learns from: the ensemble mean of the selected teachers' (``--teacher-selection
    mean``), or each selected teacher's own."""
    if config.teacher_selection == "mean":
        return [losses.soft_targets(teacher_logits, config.temperature)]
    return [losses.soft_targets([t], config.temperature) for t in teacher_logits]


@dataclass
class DistillerOutput:
    """What the distiller makes of a batch: the student's logits, its named losses (summed and backpropagated),
    the discriminators' inputs, and values that are only logged."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    adversarial: list[AdversarialInput]
    stats: dict[str, torch.Tensor]


class Distiller(nn.Module):
    """The student plus the adapters and discriminators MEAL trains beside it."""

    def __init__(self, student: nn.Module, config: DistillConfig, store: TeacherStore, image_size: int) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self.method = METHODS[config.method]
        self.teachers = list(store.teacher_names)
        teacher_blocks = {t: store.blocks(t) for t in self.teachers} if self.method.blocks else {}
        self.pairs = match_blocks(tuple(student.block_names), teacher_blocks, config.block_weights,
                                  config.match_blocks)  # fmt: skip
        stored = store.layout.features
        if self.pairs and config.representation not in stored:
            other = next((kind for kind in REPRESENTATIONS if kind in stored), None)
            instead = f", or distill with --representation {other}" if other else ""
            if config.preset is not None:
                instead += f" (--preset {config.preset} reads {config.representation})"
            preset = (store.attrs.get("settings") or {}).get("preset")
            if preset is not None:
                wanted = "meal" if config.representation == "blocks" else "all"
                raise UserError(f"the store holds no block {config.representation}: it was extracted with --for "
                                f"{preset}, which stores {', '.join(stored) or 'logits only'}; extract with --for "
                                f"{wanted} for --method {config.method}{instead}")  # fmt: skip
            raise UserError(f"the store holds no block {config.representation} (it was extracted with --features "
                            f"{','.join(stored)}): extract with --features {config.representation} "
                            f"(or blocks,maps){instead}")  # fmt: skip
        self.similarity = losses.similarity(config.block_loss)
        self.soft_loss = losses.SOFT_LABEL[config.soft_loss]
        student_shapes = block_shapes(student, image_size) if self.pairs else {}
        self.adapters = nn.ModuleDict()
        self.discriminators = nn.ModuleDict()
        self.target_shapes: dict[str, tuple[int, ...]] = {}
        for pair in self.pairs:
            channels, height, width = student_shapes[pair.student_block]
            tb = pair.teacher_block
            if config.representation == "maps":
                shape = (min(height, tb.height), min(width, tb.width))
                disc_shape = shape  # the representation is the map flattened; the discriminator knows its shape
            else:
                self.adapters[pair.key] = losses.Adapter(channels, tb.channels)
                shape = (tb.channels, tb.grid, tb.grid)
                disc_shape = shape
            self.target_shapes[pair.key] = shape
            if "blocks" in config.discriminators:
                self.discriminators[pair.key] = losses.make_discriminator(disc_shape)
        if "output" in config.discriminators:
            self.discriminators["logits"] = losses.MLPDiscriminator(store.attrs["dataset"]["num_classes"])

    def needed_keys(self) -> list[str]:
        """The store arrays training reads."""
        kind = self.config.representation
        keys = [f"teachers/{t}/logits" for t in self.teachers]
        keys += [f"teachers/{p.teacher}/{kind}/{p.teacher_block.key}" for p in self.pairs]
        return keys

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.adapters.parameters())

    def _represent(self, pair: BlockPair, student_out: torch.Tensor, teacher_value: torch.Tensor):
        """Student and teacher block representations of equal shape, in float32 (under autocast the adapter
        computes in bf16/fp16; the discriminators' step, outside autocast, takes float32)."""
        shape = self.target_shapes[pair.key]
        if self.config.representation == "maps":
            student_rep = F.adaptive_avg_pool2d(student_out.float().mean(1, keepdim=True), shape).flatten(1)
            teacher_rep = F.adaptive_avg_pool2d(teacher_value.float().unsqueeze(1), shape).flatten(1)
            return student_rep, teacher_rep
        pooled = F.adaptive_avg_pool2d(student_out.float(), shape[-1])
        return self.adapters[pair.key](pooled).float(), teacher_value.float()

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        labels: torch.Tensor,
        selected: list[str],
        run_student: nn.Module | None = None,
    ) -> DistillerOutput:
        """Student logits, its named losses, the inputs of the discriminators' step and logged-only values.
        ``labels`` are class indices, or class probabilities (mixed rows' labels, see
        :func:`~meal_cache.augment.mixed_labels`). ``run_student`` is what runs the student (its
        DistributedDataParallel wrapper under ``torchrun``).

        Weighting over teachers: ``mean`` has one soft-label term and one output-adversarial term (on the
        ensemble) and averages the block terms over the teachers; ``all`` sums every teacher's terms; ``random``
        has the one selected teacher's."""
        config = self.config
        with BlockTap(self.student, sorted({p.student_block for p in self.pairs})) as tap:
            logits = (run_student or self.student)(images)
        logits = logits.float()
        out = DistillerOutput(logits, {}, [], {})
        block_weight = 1.0 / len(selected) if config.teacher_selection == "mean" else 1.0

        teacher_logits = [targets[f"teachers/{t}/logits"].float() for t in selected]
        soft_sets = soft_target_sets(config, teacher_logits)
        if config.soft_weight:
            out.losses["soft"] = config.soft_weight * sum(self.soft_loss(logits, p, config.temperature)
                                                          for p in soft_sets)  # fmt: skip
        if config.hard_weight:
            out.losses["hard"] = config.hard_weight * F.cross_entropy(logits, labels)

        for pair in self.pairs:
            if pair.teacher not in selected:
                continue
            key = f"teachers/{pair.teacher}/{config.representation}/{pair.teacher_block.key}"
            student_rep, teacher_rep = self._represent(pair, tap.outputs[pair.student_block], targets[key])
            similarity = self.similarity(student_rep, teacher_rep)
            out.losses[f"sim/{pair.key}"] = pair.weight * block_weight * similarity
            if config.block_loss == "soft-ce":
                # soft-ce includes the teacher map's entropy, which no student can lower: KL shows the movement.
                entropy = losses.soft_entropy(teacher_rep)
                out.stats[f"sim_kl/{pair.key}"] = similarity.detach() - entropy
            if pair.key in self.discriminators:
                out.adversarial.append(AdversarialInput(pair.key, teacher_rep, student_rep, block_weight))
        everyone = [f"teachers/{t}/logits" for t in self.teachers]
        # How often the teacher drawn this step agrees with the whole ensemble (mean and all learn from the
        # ensemble itself; the online reference runs only the drawn teacher, so it cannot say).
        if config.teacher_selection == "random" and len(everyone) > 1 and all(key in targets for key in everyone):
            ensemble = losses.soft_targets([targets[key] for key in everyone], 1.0)
            chosen = losses.soft_targets(teacher_logits, 1.0)
            out.stats["teacher_agreement"] = (chosen.argmax(1) == ensemble.argmax(1)).float().mean()
        if "logits" in self.discriminators:
            student_probs = F.softmax(logits / config.temperature, dim=1)
            for probs in soft_sets:
                out.adversarial.append(AdversarialInput("logits", probs, student_probs, 1.0))
        return out

    def adversarial_losses(self, inputs: list[AdversarialInput]) -> dict[str, torch.Tensor]:
        """The student's losses for fooling each discriminator (called after the discriminators' step, so
        the student plays against their updated weights), weighted as :meth:`forward` describes."""
        named: dict[str, torch.Tensor] = {}
        for item in inputs:
            loss = losses.generator_loss(self.config.adv_loss, self.discriminators[item.key](item.fake))
            name = f"adv/{item.key}"
            weighted = self.config.adv_weight * item.weight * loss
            named[name] = named[name] + weighted if name in named else weighted
        return named

    def joint_losses(self, inputs: list[AdversarialInput]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``--adv-game joint`` (MEAL's reference code): each discriminator's own loss on teacher (real) against
        student (fake, not detached) features, weighted as :meth:`adversarial_losses` weighs the student's, and
        added to the student's loss; one backward pass trains both. Returns the losses and the logged stats."""
        named: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for item in inputs:
            loss = self._discriminate(item.key, item.real, item.fake, stats)
            name = f"joint/{item.key}"
            weighted = self.config.adv_weight * item.weight * loss
            named[name] = named[name] + weighted if name in named else weighted
        return named, stats

    def _discriminate(self, key: str, real: torch.Tensor, fake: torch.Tensor, stats: dict) -> torch.Tensor:
        """Discriminator ``key``'s loss on teacher (real, detached) against student (fake, as given) features;
        its loss and accuracy are logged into ``stats``."""
        real_scores, fake_scores = self.discriminators[key](real.detach()), self.discriminators[key](fake)
        loss = losses.discriminator_loss(self.config.adv_loss, real_scores, fake_scores)
        stats[f"disc/{key}"] = loss.detach()
        stats[f"disc_acc/{key}"] = losses.discriminator_accuracy(real_scores, fake_scores, self.config.adv_loss)
        return loss

    def discriminator_step(
        self, inputs: list[AdversarialInput], optimizer: torch.optim.Optimizer, world: World | None = None
    ) -> dict[str, torch.Tensor]:
        """One step of every discriminator on teacher (real) against detached student (fake) features
        (gradients averaged over ranks under ``torchrun``)."""
        if not inputs:
            return {}
        total = 0.0
        stats: dict[str, torch.Tensor] = {}
        for disc_key, real, fake, _ in inputs:
            total = total + self._discriminate(disc_key, real, fake.detach(), stats)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if world is not None:
            world.average_gradients(self.discriminators.parameters())
        optimizer.step()
        return stats


# ------------------------------------------------------------------------------------------------ run


def load_store_dataset(config: DistillConfig, store: TeacherStore) -> ImageDataset:
    """The dataset the store records (or ``config.data``), refused unless it matches the store."""
    recorded = store.dataset
    spec = config.data or recorded["spec"]
    root = config.data_root or recorded["options"].get("root", "data")
    image_size = recorded["options"].get("image_size")
    dataset = load_dataset(spec, root, config.download, image_size)
    store.check_matches(dataset.describe(), recorded["split"])
    return dataset


def stored_features(path: str) -> tuple[str, ...] | None:
    """The feature kinds the store at ``path`` holds, or None where there is no readable store (distill then
    reports that with its own message)."""
    try:
        return open_store(path).layout.features
    except (UserError, OSError, KeyError, ValueError):
        return None


def _selection(config: DistillConfig, teachers: list[str], generator: torch.Generator) -> list[str]:
    if config.teacher_selection == "random":
        return [teachers[int(torch.randint(len(teachers), (1,), generator=generator))]]
    return list(teachers)


def distill(
    config: DistillConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
) -> dict:
    """Train a student from a store; writes ``config.json``, ``metrics.jsonl``, ``last.pt`` and ``student.pt``
    under ``out`` and returns the final summary (test metrics, history).

    Under ``torchrun`` each rank takes its share of every batch (the global batch is ``batch_size``, so the
    schedule is the one a single process runs); the student is wrapped in DistributedDataParallel, the
    discriminators' and adapters' gradients are averaged over ranks, and rank 0 alone writes files."""
    config = config.resolved(stored_features(config.store))
    world, device = init_world(config.device)
    progress = progress and world.is_main
    if config.batch_size % world.size:
        raise UserError(f"--batch-size {config.batch_size} must be a multiple of the {world.size} ranks")
    out = Path(out)
    occupied = f"'{out}' is not empty; pass --resume to continue it or --overwrite to replace it"
    state = resume_state(out, out / "last.pt", _config_json(config), resume, overwrite,
                         out.exists() and any(out.iterdir()), occupied)  # fmt: skip
    world.barrier()  # every rank has looked at ``out`` before rank 0 writes into it
    run = build_run(config, world, device, dataset, progress)
    start_epoch, history = run.restore(state)
    if world.is_main:
        run.start_output(out, fresh=state is None)
    epochs = DistillEpochs(run)
    stage = Stage(model=run.distiller.student, train_mode=run.distiller.train, step=epochs.step,
                  batches=epochs.batches, save=lambda epoch, history, _test: run.save_state(out, epoch, history),
                  record_fields=epochs.record_fields, desc=config.method)  # fmt: skip
    try:
        history, test = fit(stage, run.optimisation, run.schedule, run.dataset, device, config.seed, start_epoch,
                            history, world, out / "metrics.jsonl", progress, config.workers)  # fmt: skip
    finally:
        run.source.close()
        run.images.close()
        if run.divergent is not None:
            run.divergent.close()
    if test is None:  # resumed a run that had already finished
        test = evaluate(run.distiller.student, run.dataset, "test", device, workers=config.workers)
    world.check_identical(run.distiller, "the student, adapters and discriminators")
    summary = {"test": test, "history": history}
    if world.is_main:
        run.save_student(out / "student.pt", history, test)
        if METHODS[config.method].peers:
            from meal_cache.afd import save_peers

            summary["peers"] = save_peers(run, out, history)
    return summary


@dataclass
class DistillRun:
    """Everything a distillation run trains with, built once: the store and its dataset, the distiller and its
    optimisers, the image source and the labels, the views to replay and the batch source of the targets."""

    config: DistillConfig
    world: World
    device: torch.device
    precision: Precision
    store: TeacherStore
    dataset: ImageDataset
    distiller: Distiller
    run_student: nn.Module | None
    optimisation: Optimisation
    disc_optimizer: torch.optim.Optimizer | None
    schedule: Schedule
    images: ImageSource
    labels: torch.Tensor
    views: list[int]
    view_params: dict[int, augment.ViewParams]
    recipe: augment.Recipe
    online: OnlineTeachers | None
    source: object
    sizes: torch.Tensor  # each row's source (H, W), for fresh views
    divergent: DivergentBatches | None = None

    def restore(self, state: dict | None) -> tuple[int, list[dict]]:
        """Load a saved state (see :meth:`save_state`); the epoch to start from and the history so far."""
        if state is None:
            return 0, []
        # A run is resumable only on the targets it trained on: a store re-extracted at the same path with other
        # settings or retrained teachers would otherwise finish (or pass as finished) on stale weights.
        if "store_settings" in state and state["store_settings"] != self.store.attrs.get("settings"):
            raise SettingsMismatch(f"the run in progress was distilled from '{self.config.store}' as it was extracted "
                                   "with other settings or teachers; --resume needs the same store (or pass "
                                   "--overwrite to start again)")  # fmt: skip
        self.distiller.load_state_dict(state["distiller"])
        self.optimisation.load_state_dict({"optimizer": state["student_optimizer"], "scaler": state.get("scaler")})
        if self.disc_optimizer is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        return int(state["epoch"]), list(state["history"])

    def start_output(self, out: Path, fresh: bool) -> None:
        """``config.json`` always; a fresh run also empties ``metrics.jsonl`` and removes stale checkpoints."""
        if fresh:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("")
            for stale in ("last.pt", "student.pt", *(p.name for p in out.glob("peer*.pt"))):
                (out / stale).unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(_config_json(self.config), indent=2) + "\n")

    def save_state(self, out: Path, epoch: int, history: list[dict]) -> None:
        """``last.pt``: what :meth:`restore` needs to continue after ``epoch``."""
        optimisation = self.optimisation.state_dict()
        save_checkpoint(out / "last.pt", {
            "format": "meal-cache-checkpoint/1",
            "kind": "distill-state",
            "config": _config_json(self.config),
            "store_settings": self.store.attrs.get("settings"),
            "epoch": epoch,
            "history": history,
            "distiller": state_dict_cpu(self.distiller),
            "student_optimizer": optimisation["optimizer"],
            "scaler": optimisation["scaler"],
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else {},
        })  # fmt: skip

    def save_student(self, path: Path, history: list[dict], test: dict, model: nn.Module | None = None) -> None:
        """``student.pt``: the trained student (or ``model``, an AFD peer) as ``train`` writes networks, plus where
        it was distilled from."""
        config = self.config
        payload = model_payload(model or self.distiller.student, config.student, self.dataset, _config_json(config),
                                config.epochs, history, test)  # fmt: skip
        payload["distillation"] = {"store": str(config.store), "teachers": self.distiller.teachers,
                                   "method": config.method}  # fmt: skip
        save_checkpoint(path, payload)


def build_run(
    config: DistillConfig, world: World, device: torch.device, dataset: ImageDataset | None, progress: bool
) -> DistillRun:
    """Open the store, load (or check) its dataset, and build the distiller, its optimisers and the batch source.
    The student and the discriminators are initialised from ``config.seed``."""
    store = open_store(config.store)
    if dataset is None:
        dataset = load_store_dataset(config, store)
    else:
        store.check_matches(dataset.describe(), store.dataset["split"])
    precision = Precision(device)
    seed_everything(config.seed)
    student = create_model(config.student, dataset.num_classes, dataset.image_size)
    method = METHODS[config.method]
    if method.peers:
        from meal_cache.afd import PeerDistiller  # afd builds on this module

        if world.enabled:
            raise UserError(f"--method {config.method} trains its peers in one process; run it without torchrun")
        distiller = PeerDistiller(student, config, store, dataset.image_size)
    else:
        distiller = Distiller(student, config, store, dataset.image_size)
    _refuse_damaged(store, config.store, distiller.needed_keys())
    distiller = distiller.to(device)
    if precision.channels_last:
        for network in distiller.peers if method.peers else [distiller.student]:
            network.to(memory_format=torch.channels_last)
    run_student = None
    if world.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run_student = DistributedDataParallel(distiller.student, device_ids=[device] if device.type == "cuda" else None)
    s_opt = make_optimizer(distiller.student_parameters(), config.lr, config.momentum, config.weight_decay)
    d_params = list(distiller.discriminators.parameters())
    d_opt = None
    if d_params and config.adv_game == "joint":  # the reference's one optimiser, at disc_lr / lr of its rate
        s_opt.add_param_group({"params": d_params, "lr": config.disc_lr, "lr_scale": config.disc_lr / config.lr})
    elif d_params:
        d_opt = torch.optim.Adam(d_params, lr=config.disc_lr, betas=(0.5, 0.999))
    # Parameters DistributedDataParallel does not own: the adapters, and jointly trained discriminators.
    shared = list(distiller.adapters.parameters()) + (d_params if d_opt is None else [])
    optimisation = Optimisation(s_opt, precision.grad_scaler(), lambda: world.average_gradients(shared))
    split = dataset.split(store.dataset["split"])
    images = split.open(device, config.workers)
    labels = split.labels.to(device, non_blocking=True)
    if config.refine_labels:
        labels = _refined_labels(config, labels, device, progress)
    views = store.augmented_views or [store.identity_view]
    recorded_sizes = store.source_sizes()  # image files: each row's size, so fresh views need no header scan
    if config.crops_per_image > len(views):
        raise UserError(f"--crops-per-image {config.crops_per_image} needs as many cached views; '{config.store}' has "
                        f"{len(views)} (extract with --views {config.crops_per_image} or more)")  # fmt: skip
    schedule = Schedule.of(config, len(labels) * config.crops_per_image)
    divergent = _divergent_batches(config, store, distiller.needed_keys(), device, schedule.steps)
    if divergent is not None:
        schedule = dataclasses.replace(schedule, steps=schedule.steps + divergent.per_epoch)
    return DistillRun(
        config=config, world=world, device=device, precision=precision, store=store, dataset=dataset,
        distiller=distiller, run_student=run_student, optimisation=optimisation, disc_optimizer=d_opt,
        schedule=schedule, images=images, labels=labels, views=views, divergent=divergent,
        view_params={v: store.view_params(v) for v in set(views)},
        recipe=augment.recipe_for(store.dataset["recipe"], dataset.image_size),
        sizes=recorded_sizes if recorded_sizes is not None else split.source_sizes(config.workers),
        online=OnlineTeachers(config, store, dataset, precision) if config.online else None,
        source=make_batch_source(config, store, distiller.needed_keys(), device),
    )  # fmt: skip


class DivergentBatches:
    """The divergent views' batches (``extract --divergent-views``): epoch ``e`` takes divergent view ``e mod K``,
    ``per_epoch`` shuffled batches of it, their pixels the stored uint8 (held in memory, on the device) and their
    targets that view's stored teacher outputs."""

    def __init__(self, store: TeacherStore, keys: list[str], device: torch.device, batch_size: int, seed: int,
                 per_epoch: int) -> None:  # fmt: skip
        from meal_cache.divergent import stored_pixels

        self.views, self.per_epoch = store.divergent_views, per_epoch
        self.feed = ViewFeed(store, keys, device)
        self.pixels = [stored_pixels(store, k).to(device) for k in range(len(self.views))]
        self.n, self.batch_size, self.seed = store.n, batch_size, seed

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        """``(rows, targets, pixels)`` of the epoch's divergent batches."""
        k = epoch % len(self.views)
        cached = self.feed.get(self.views[k])
        order = epoch_batches(self.n, self.batch_size, epoch_generator(self.seed, epoch, Stream.DIVERGENT_ORDER))
        for rows in order[: self.per_epoch]:
            rows_dev = rows.to(self.feed.device, non_blocking=True)
            yield rows, {key: value[rows_dev] for key, value in cached.items()}, self.pixels[k][rows_dev].float()

    def close(self) -> None:
        self.feed.close()


def _divergent_batches(config: DistillConfig, store: TeacherStore, keys: list[str], device: torch.device,
                       natural_steps: int) -> DivergentBatches | None:  # fmt: skip
    """The divergent batch source at ``--divergent-ratio`` (see :data:`DIVERGENT_RATIO`), None without any."""
    ratio = config.divergent_ratio
    if ratio is None:
        ratio = DIVERGENT_RATIO if store.divergent_views and config.crops_per_image == 1 else 0.0
    if ratio > 0 and not store.divergent_views:
        raise UserError(f"--divergent-ratio {ratio:g}: store '{config.store}' has no divergent views (extract with "
                        "--divergent-views K)")  # fmt: skip
    per_epoch = round(ratio * natural_steps)
    if per_epoch == 0:
        return None
    return DivergentBatches(store, keys, device, config.batch_size, config.seed, per_epoch)


def _interleaved(natural: Iterator, divergent: Iterator, natural_count: int, divergent_count: int) -> Iterator:
    """The natural batches with the divergent ones spread evenly among them."""
    given = 0
    for index, batch in enumerate(natural):
        yield batch
        while given < (index + 1) * divergent_count // natural_count:
            yield next(divergent)
            given += 1


def _refined_labels(config: DistillConfig, labels: torch.Tensor, device: torch.device, progress: bool) -> torch.Tensor:
    """``--refine-labels``: the hard labels of the rows `meal-cache inspect` finds suspect become the ensemble's."""
    from meal_cache.analysis import suspect_rows

    refined = suspect_rows(config.store, config.refine_confidence)
    if refined:
        rows = torch.tensor(sorted(refined), device=device)
        labels = labels.clone()
        labels[rows] = torch.tensor([refined[r] for r in sorted(refined)], device=device)
    if progress:
        tqdm.write(f"--refine-labels: {len(refined)} suspect label(s) replaced by the teachers' ensemble")
    return labels


class DistillEpochs:
    """The per-epoch plan and the step of a distillation run: epoch ``e`` replays view ``e mod V`` (or a fresh
    augmentation), and each step applies the view to the batch's images, picks the teachers, runs the distiller,
    steps the discriminators, and returns the student's named losses for the loop to backpropagate."""

    def __init__(self, run: DistillRun) -> None:
        self.run = run
        self.chooser: torch.Generator | None = None
        self.steps = 0  # steps taken in this process (paces the gradient-norm diagnostics)

    def view(self, epoch: int) -> int:
        return self.run.views[epoch % len(self.run.views)]

    def epoch_views(self, epoch: int) -> list[int]:
        """The views epoch ``epoch`` replays: view ``e mod V``, or with K crops per image views ``eK .. eK+K-1``
        (mod V)."""
        crops = self.run.config.crops_per_image
        return [self.run.views[(epoch * crops + j) % len(self.run.views)] for j in range(crops)]

    def record_fields(self, epoch: int) -> dict:
        divergent = self.run.divergent
        extra = {} if divergent is None else {"divergent_view": divergent.views[epoch % len(divergent.views)],
                                              "divergent_batches": divergent.per_epoch}  # fmt: skip
        if self.run.config.fresh_views:
            return {"view": "fresh", **extra}
        views = self.epoch_views(epoch)
        return {"view": views[0] if len(views) == 1 else views, **extra}

    def batches(self, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, dict | None, augment.ViewParams | None],
                                                    torch.Tensor]]:  # fmt: skip
        """The epoch's ``((rows, targets, mixed), pixels)``: rows and targets from the store's batch source, the
        pixels of those rows in this epoch's view from the image source, and the rows' view parameters when the
        view mixes rows (None otherwise). Under torchrun each rank asks only for its
        share of every batch, so it decodes only its own rows."""
        run, config, world = self.run, self.run.config, self.run.world
        self.chooser = epoch_generator(config.seed, epoch, Stream.TEACHER_CHOICE)
        views = self.epoch_views(epoch)
        if config.fresh_views:
            generator = epoch_generator(config.seed, epoch, Stream.FRESH_VIEWS)
            params = [augment.draw(run.recipe, run.sizes, generator, run.store.policy, run.store.mixing,
                                   run.dataset.image_size)]  # fmt: skip
        else:
            params = [run.view_params[view] for view in views]
        last = epoch + 1 >= config.epochs
        if config.crops_per_image > 1:
            batches = run.source.epoch(epoch, views, None if last else self.epoch_views(epoch + 1))
        else:
            one_view = run.source.epoch(epoch, views[0], None if last else self.view(epoch + 1))
            batches = ((rows, targets, None) for rows, targets in one_view)

        def requests() -> Iterator[tuple[torch.Tensor, augment.ViewParams, tuple]]:
            for rows, targets, crop in batches:
                rows, targets, crop = _rank_share(world, rows, targets, crop)
                rows_params = _crop_params(params, rows, crop)
                # Mixed rows' hard labels are mixed with the same lambda (the pixels are mixed by the source).
                yield rows, rows_params, (rows, targets, rows_params if rows_params.mix_partner is not None else None)

        natural = run.images.pixels(requests())
        if run.divergent is None:
            return natural

        def divergent() -> Iterator:
            for rows, targets, pixels in run.divergent.epoch(epoch):
                rows, targets, pixels = _rank_share(world, rows, targets, pixels)
                yield (rows, targets, None), pixels

        natural_steps = run.schedule.steps - run.divergent.per_epoch
        return _interleaved(natural, divergent(), natural_steps, run.divergent.per_epoch)

    def step(self, batch: tuple[tuple, torch.Tensor]) -> StepOutput:
        """One step on a batch of :meth:`batches`."""
        run, world, distiller = self.run, self.run.world, self.run.distiller
        (rows, targets, mixed), pixels = batch
        rows_dev = rows.to(run.device, non_blocking=True)
        inputs = augment.normalise(pixels, run.dataset.mean, run.dataset.std, run.precision.channels_last)
        selected = _selection(run.config, distiller.teachers, self.chooser)
        if run.online is not None:
            targets = run.online.targets(pixels, selected)
        labels = run.labels[rows_dev]
        hard_targets = labels
        if mixed is not None:
            partners = run.labels[mixed.mix_partner.to(run.device, non_blocking=True).long()]
            hard_targets = augment.mixed_labels(labels, mixed, run.dataset.num_classes, partners)
        with run.precision.autocast():
            out = distiller(inputs, targets, hard_targets, selected, run.run_student)
        if run.config.adv_game == "joint":
            with run.precision.autocast():
                joint, stats = distiller.joint_losses(out.adversarial)
            out.losses.update(joint)
            out.stats.update(stats)
        else:
            if run.disc_optimizer is not None:
                out.stats.update(distiller.discriminator_step(out.adversarial, run.disc_optimizer, world))
            with run.precision.autocast():
                out.losses.update(distiller.adversarial_losses(out.adversarial))
        if self.steps % GRAD_NORM_EVERY == 0 and not world.enabled:
            out.stats.update(gradient_norms(out.losses, distiller.student_parameters()))
        self.steps += 1
        return StepOutput(out.logits, labels, out.losses, out.stats)


def _rank_share(world: World, rows: torch.Tensor, targets: dict | None, extra: torch.Tensor | None):
    """This rank's share of a global batch under torchrun (every ``world.size``-th sample from its rank): the rows,
    their targets and one more per-sample tensor (or None); the whole batch outside torchrun."""
    if not world.enabled:
        return rows, targets, extra
    share = slice(world.rank, None, world.size)
    targets = targets and {key: value[share] for key, value in targets.items()}
    return rows[share], targets, None if extra is None else extra[share]


LOSS_FAMILIES = {"soft": "soft", "hard": "hard", "sim/": "sim", "adv/": "adv", "joint/": "adv"}


def gradient_norms(named: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The L2 norm of the gradient each loss family (soft labels, hard labels, block similarity, adversarial)
    sends into ``params``, as ``grad/FAMILY``: which part of the loss actually moves the student. The graph is
    kept for the step's own backward pass."""
    families: dict[str, torch.Tensor] = {}
    for name, loss in named.items():
        family = next((f for prefix, f in LOSS_FAMILIES.items() if name.startswith(prefix)), "other")
        families[family] = families[family] + loss if family in families else loss
    norms = {}
    for family, loss in families.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[f"grad/{family}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
    return norms


def _crop_params(params: list[augment.ViewParams], rows: torch.Tensor, crop: torch.Tensor | None) -> augment.ViewParams:
    """Each sample's parameters: of the one view, or of view ``crop[i]`` of ``params`` for sample ``i``."""
    if crop is None:
        return params[0][rows]
    return augment.stack_views(params, crop, rows)


def _refuse_damaged(store: TeacherStore, path: str, keys: list[str]) -> None:
    """Refuse a store whose needed chunks are missing or fail their checksums, before any training."""
    report = verify_store(store, keys=["labels", *store.view_keys, *store.with_companions(keys)])
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise UserError(f"store '{path}' is damaged: {report.problems[0]}{more}; `meal-cache verify --repair "
                        f"{path}` marks those chunks, then the same extract command re-extracts them")  # fmt: skip


def _config_json(config: DistillConfig) -> dict:
    """The recorded config: everything but how many processes decode, which changes no result."""
    recorded = dataclasses.asdict(config)
    recorded.pop("workers")
    if recorded.get("peers") is None:  # runs of methods without peers record what they recorded before
        recorded.pop("peers", None)
    return json.loads(json.dumps(recorded))
