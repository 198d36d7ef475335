"""Cached views for any training loop: the pixels of a store's replayed views and the teachers' targets for exactly
those pixels, batch by batch, as ``meal-cache distill`` itself sees them (one code path: the batches come from
:func:`meal_cache.distill.step.replay_batches`).

    from meal_cache import CachedViews, kd_loss

    views = CachedViews("feats.zarr", batch_size=64, seed=0, temperature=4.0)
    for epoch in range(30):
        for batch in views.epoch(epoch):
            logits = student(batch["pixels"])
            loss = kd_loss(logits, batch["soft_targets"]["mean"], 4.0)
            ...

A loader class, not a ``torch.utils.data.Dataset``: a batch's rows, its view and its pixels are decided together
(the store's views are whole-view reads, image files are decoded in their own worker processes, multi-crop batches
hold K views of each image), so the loader hands out whole batches and you iterate it per epoch. Epoch ``e`` serves
view ``e mod V`` (with ``crops_per_image`` K, views ``eK .. eK+K-1``; from a dense store, fresh crops drawn from
the seed with their targets derived); rows are shuffled by ``seed`` and ``e``; under ``torchrun`` each rank gets its
share of every batch of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from meal_cache.data.datasets import ImageDataset
from meal_cache.data.source import replay_decode
from meal_cache.dense import DenseTargets
from meal_cache.distill.config import DistillConfig
from meal_cache.distill.feed import make_batch_source
from meal_cache.distill.run import (
    ReplayedViews,
    check_logits_temperature,
    load_store_dataset,
    refuse_damaged,
    replayed_views,
    source_sizes,
)
from meal_cache.distill.step import epoch_views, hard_labels, replay_batches
from meal_cache.engine.distributed import World, init_world
from meal_cache.engine.loop import Schedule
from meal_cache.errors import UserError
from meal_cache.losses import kd_kl, soft_targets
from meal_cache.runtime import Precision
from meal_cache.store.keys import FEATURE_KINDS, feature_key, logits_key
from meal_cache.store.teacher_store import TeacherStore, open_store
from meal_cache.views import augment

__all__ = ["CachedViews", "kd_loss"]

kd_loss = kd_kl  # T^2 KL(teacher || student) at T, the teacher already softened: distill's --soft-loss kl


@dataclass
class _Replay:
    """What :func:`~meal_cache.distill.step.replay_batches` reads, built for a loader rather than a run."""

    config: DistillConfig
    world: World
    store: TeacherStore
    dataset: ImageDataset
    images: object
    source: object
    views: list[int]
    view_params: ReplayedViews
    recipe: augment.Recipe
    sizes: torch.Tensor
    dense: DenseTargets | None
    schedule: Schedule
    divergent: None = None


class CachedViews:
    """Batches of a store's cached views for your own loop (see the module's docstring for the batch's keys).

    Each batch is a dict:

    - ``pixels``: float32 (B, 3, S, S), normalised with the dataset's mean and std (what the student takes);
    - ``labels``: int64 (B,) class indices, or float32 (B, C) class shares where the store mixes rows (Mixup,
      CutMix: each row's own label and its partner's, by the row's lambda);
    - ``logits``: per teacher, its logits for those pixels as the store rebuilds them (top-k, sampled or exact);
    - ``soft_targets``: per teacher, softmax(logits / ``temperature``), and ``"mean"``, the teachers' mean of
      those (distill's ``--teacher-selection mean``);
    - ``features``: per teacher, per ``KIND/BLOCK`` asked for with ``features`` (``blocks``: pooled channels
      (B, C, g, g); ``maps``: channel-mean maps; ``attention``: attention maps, mean |A|^p over channels);
    - ``rows``: int64 (B,) the split's rows; ``view``: int64 (B,) the cached view of each sample (-1: a dense
      store's fresh crop).
    """

    def __init__(
        self,
        store: str | Path,
        *,
        batch_size: int = 64,
        seed: int = 0,
        epochs: int | None = None,
        crops_per_image: int = 1,
        temperature: float = 4.0,
        features: tuple[str, ...] = (),
        data: str | None = None,
        data_root: str | None = None,
        download: bool = False,
        device: str = "auto",
        workers: int | None = None,
        max_memory: str | None = None,
        dataset: ImageDataset | None = None,
    ) -> None:
        unknown = [kind for kind in features if kind not in FEATURE_KINDS]
        if unknown:
            raise UserError(f"features takes {', '.join(FEATURE_KINDS)}, got {', '.join(unknown)}")
        # ``epochs`` only lets the last epoch skip prefetching a next view; any epoch may be asked for.
        config = DistillConfig(store=str(store), student="", method="kd", batch_size=batch_size, seed=seed,
                               epochs=epochs or 2**31, crops_per_image=crops_per_image, temperature=temperature,
                               data=data, data_root=data_root, download=download, device=device, workers=workers,
                               max_memory=max_memory)  # fmt: skip
        world, self.device = init_world(device)
        self.store = store_ = open_store(store)
        if dataset is None:
            dataset = load_store_dataset(config, store_)
        else:
            store_.check_matches(dataset.describe(), store_.dataset["split"])
        check_logits_temperature(config, store_)
        self.temperature, self.features = float(temperature), tuple(features)
        self.teachers = store_.teacher_names
        keys = [logits_key(t) for t in self.teachers] + [key for _, _, key in self._feature_keys()]
        refuse_damaged(store_, str(store), keys)
        split = dataset.split(store_.dataset["split"])
        self.replay = _Replay(
            config=config, world=world, store=store_, dataset=dataset,
            images=split.open(self.device, workers, decode=replay_decode("auto", store_.dataset.get("decode"))),
            source=make_batch_source(config, store_, keys, self.device),
            views=replayed_views(store_, crops_per_image, str(store), option="crops_per_image"),
            view_params=ReplayedViews(store_, keep=2 * crops_per_image), recipe=store_.view_recipe,
            sizes=source_sizes(store_, split, workers),
            dense=DenseTargets(store_, keys) if store_.dense else None,
            schedule=Schedule.of(config, len(split.labels) * crops_per_image),
        )  # fmt: skip
        self.labels = split.labels.to(self.device)
        self.channels_last = Precision(self.device).channels_last

    def _feature_keys(self) -> list[tuple[str, str, str]]:
        """(teacher, KIND/BLOCK, array key) of every feature asked for, refused where the store lacks it."""
        missing = [kind for kind in self.features if kind not in self.store.layout.features]
        if missing:
            held = ", ".join(self.store.layout.features) or "logits only"
            raise UserError(f"the store holds no block {' or '.join(missing)} (it holds {held}): extract with "
                            f"--features {','.join(missing)}, or ask for fewer features")  # fmt: skip
        return [(t, f"{kind}/{b.key}", feature_key(t, kind, b.key))
                for t in self.teachers for kind in self.features for b in self.store.blocks(t)]  # fmt: skip

    def __len__(self) -> int:
        """Batches in an epoch (of this rank's share, under torchrun)."""
        return self.replay.schedule.steps

    @property
    def num_classes(self) -> int:
        return self.store.num_classes()

    @property
    def dataset(self) -> ImageDataset:
        """The dataset the store was extracted from: its image size for your student, and what
        :func:`meal_cache.save_student` records."""
        return self.replay.dataset

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Epoch ``epoch``'s batches, as dicts (see the class's docstring)."""
        replay = self.replay
        crops = replay.config.crops_per_image
        views = epoch_views(replay, epoch)
        features = self._feature_keys()
        for (rows, targets, mixed), pixels in replay_batches(replay, epoch):
            rows_dev = rows.to(self.device, non_blocking=True)
            labels = hard_labels(self.labels, self.labels[rows_dev], mixed, self.num_classes)
            logits = {t: targets[logits_key(t)].float() for t in self.teachers}
            soft = {t: F.softmax(value / self.temperature, dim=1) for t, value in logits.items()}
            soft["mean"] = soft_targets(list(logits.values()), self.temperature)
            # Multi-crop batches hold their views one after the other; under torchrun this rank has every
            # world-size-th sample of the whole batch.
            world = replay.world
            whole = torch.tensor(views).repeat_interleave(len(rows) * world.size // crops)
            view = torch.full((len(rows),), -1) if replay.dense is not None else whole[world.rank :: world.size]
            yield {
                "pixels": augment.normalise(pixels, replay.dataset.mean, replay.dataset.std, self.channels_last),
                "labels": labels,
                "logits": logits,
                "soft_targets": soft,
                "features": {
                    t: {name: targets[key] for teacher, name, key in features if teacher == t} for t in self.teachers
                },  # fmt: skip
                "rows": rows,
                "view": view,
            }

    def close(self) -> None:
        """Stop the decoding workers and the prefetch thread."""
        self.replay.source.close()
        self.replay.images.close()

    def __enter__(self) -> CachedViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
