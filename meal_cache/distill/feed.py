"""The feed: which rows a step trains on and their targets. Whole views of the needed store arrays are read into
memory (the next one prefetched in a background thread), or streamed a few chunks at a time where they do not fit;
the online reference computes the targets in the loop instead, and divergent views come as whole batches spread
through each epoch. Zarr is only ever read a whole view, or whole chunks, at a time.

Views are held as stored (:class:`StoredRows`): top-k and sampled logits as their parts, 8-bit blocks as codes and
ranges, decoded per batch on the device, so memory follows the store's bytes, not classes x rows of floats."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from dask.utils import parse_bytes

from meal_cache.distill.config import DIVERGENT_RATIO, DistillConfig
from meal_cache.engine.loop import Stream, epoch_batches, epoch_generator, shuffled_batches
from meal_cache.errors import UserError
from meal_cache.nets.teachers import resolve_teacher, teacher_outputs
from meal_cache.projection import stored_projections
from meal_cache.runtime import Precision
from meal_cache.store.keys import teacher_key
from meal_cache.store.schema import DEFAULT_ATTENTION_P
from meal_cache.store.teacher_store import TeacherStore

if TYPE_CHECKING:
    from meal_cache.data.datasets import ImageDataset


class StoredRows:
    """Rows of the needed store arrays as stored (:meth:`TeacherStore.read_stored`'s parts, as tensors), decoded
    only for a batch (:meth:`decoded`)."""

    def __init__(self, store: TeacherStore, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        self.store, self.parts = store, parts

    @classmethod
    def read(cls, store: TeacherStore, keys: list[str], view: int, rows: slice = slice(None)) -> StoredRows:
        """Rows ``rows`` of view ``view`` of ``keys``, as stored, on the CPU."""
        parts = {}
        for key in keys:
            parts[key] = {part: torch.from_numpy(value) for part, value in store.read_stored(key, view, rows).items()}
        return cls(store, parts)

    @classmethod
    def cat(cls, pieces: list[StoredRows]) -> StoredRows:
        """The rows of ``pieces``, one after the other."""
        first = pieces[0]
        return cls(first.store, {key: {part: torch.cat([p.parts[key][part] for p in pieces]) for part in parts}
                                 for key, parts in first.parts.items()})  # fmt: skip

    def to(self, device: torch.device) -> StoredRows:
        """On ``device`` (through pinned memory on CUDA, so the copy overlaps)."""

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and tensor.device.type == "cpu":
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)

        return StoredRows(self.store, {key: {part: moved(value) for part, value in parts.items()}
                                       for key, parts in self.parts.items()})  # fmt: skip

    def take(self, rows: torch.Tensor) -> StoredRows:
        """The rows at positions ``rows`` (on the parts' device), still as stored."""
        return StoredRows(self.store, {key: {part: value[rows] for part, value in parts.items()}
                                       for key, parts in self.parts.items()})  # fmt: skip

    def decoded(self, rows: torch.Tensor | None = None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The values of the rows at positions ``rows`` (every row: None) by key, decoded on ``device`` (the
        parts' own: None), as :meth:`TeacherStore.read` gives them."""
        picked = self if rows is None else self.take(rows)
        if device is not None:
            picked = picked.to(device)
        return {key: self.store.decode_stored(key, parts) for key, parts in picked.parts.items()}

    def nbytes(self) -> int:
        return sum(value.nbytes for parts in self.parts.values() for value in parts.values())


class ViewFeed:
    """Whole views of the needed store arrays in memory as stored (on the device), the next one read in the
    background. A batch is then tensor indexing and a decode on the device; Zarr is only ever read a whole view at
    a time.
    """

    def __init__(self, store: TeacherStore, keys: list[str], device: torch.device) -> None:
        self.store = store
        self.keys = keys
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="view-prefetch")
        self._pending: dict[int, Future] = {}
        # The last view handed out, kept: a dense store's one view (and a multi-crop batch's repeated one) is
        # read once, not once an epoch.
        self._last: tuple[int, StoredRows] | None = None

    def _read(self, view: int) -> StoredRows:
        return StoredRows.read(self.store, self.keys, view).to(self.device)

    def prefetch(self, view: int) -> None:
        if view not in self._pending and (self._last is None or self._last[0] != view):
            self._pending[view] = self._pool.submit(self._read, view)

    def get(self, view: int) -> StoredRows:
        if self._last is not None and self._last[0] == view:
            return self._last[1]
        self.prefetch(view)
        self._last = (view, self._pending.pop(view).result())
        return self._last[1]

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
            yield rows, cached.decoded(rows.to(self.feed.device, non_blocking=True))

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
            decoded = [view_rows.decoded(rows_dev) for view_rows in cached]
            targets = {key: torch.cat([arrays[key] for arrays in decoded]) for key in decoded[0]}
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

    def _read(self, view: int, chunks: list[int]) -> tuple[torch.Tensor, StoredRows]:
        slices = [self.store.chunk_rows(c) for c in chunks]
        rows = torch.cat([torch.arange(r.start, r.stop) for r in slices])
        return rows, StoredRows.cat([StoredRows.read(self.store, self.keys, view, r) for r in slices])

    def epoch(self, epoch: int, view: int, next_view: int | None) -> Iterator[tuple[torch.Tensor, dict]]:
        generator = epoch_generator(self.seed, epoch, Stream.BATCH_ORDER)
        groups = torch.randperm(self.store.n_chunks, generator=generator).split(self.buffer_chunks)
        pending = self._pool.submit(self._read, view, groups[0].tolist())
        carry_rows, carry = torch.empty(0, dtype=torch.long), None
        yielded = 0
        for index in range(len(groups)):
            rows, arrays = pending.result()
            if index + 1 < len(groups):
                pending = self._pool.submit(self._read, view, groups[index + 1].tolist())
            if len(carry_rows):
                rows, arrays = torch.cat([carry_rows, rows]), StoredRows.cat([carry, arrays])
            order = torch.randperm(len(rows), generator=generator)
            full = len(order) // self.batch_size * self.batch_size
            for batch in order[:full].split(self.batch_size):
                yield rows[batch], arrays.decoded(batch, self.device)
                yielded += 1
            rest = order[full:]
            carry_rows, carry = rows[rest], arrays.take(rest)
        if not yielded and len(carry_rows):  # fewer rows than one batch: one short batch, as in memory
            yield carry_rows, carry.decoded(device=self.device)

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
    """Bytes of one view of ``keys`` in memory, as stored (see :class:`StoredRows`)."""
    return store.n * store.stored_row_bytes(keys)


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


def online_teacher_keys(config: DistillConfig, store: TeacherStore) -> dict[str, str]:
    """``--online``'s teachers (as given to extract, or by their store keys) -> their keys in the store, refused
    unless they are exactly the store's teachers: the method trains on every teacher the store holds, so one left
    out would have no targets, and one the store lacks has no recorded blocks to match."""
    by_source = {store.teacher(key)["source"]: key for key in store.teacher_names}
    keys = {name: by_source.get(name, name) for name in config.teachers}
    if set(keys.values()) != set(store.teacher_names):
        given = ", ".join(config.teachers) or "none"
        raise UserError(f"--online runs the store's own teachers in the loop: '{config.store}' holds "
                        f"{', '.join(by_source)}, --teachers gave {given}; pass --teachers "
                        f"{','.join(by_source)}")  # fmt: skip
    return keys


class OnlineTeachers:
    """The reference: the same targets as the cache, computed by running the teachers in the loop."""

    def __init__(self, config: DistillConfig, store: TeacherStore, dataset: ImageDataset, precision: Precision):
        self.teachers = {}
        for name, key in online_teacher_keys(config, store).items():
            blocks = store.blocks(key)
            teacher = resolve_teacher(name, config.teacher_dir, dataset, ",".join(b.name for b in blocks),
                                      max(b.grid for b in blocks))  # fmt: skip
            recorded = store.teacher(key)["checkpoint_sha256"]
            if teacher.spec.checkpoint_sha256 != recorded:
                raise UserError(f"teacher '{name}' is not the checkpoint the store was extracted from (sha256 differs)")
            teacher.model = precision.prepare(teacher.model).eval()
            teacher.projections = stored_projections(store, key)  # the store's blocks are these projections
            self.teachers[key] = teacher
        self.features = store.layout.features
        # The store's p, so online attention maps are the ones the cache holds.
        self.attention_p = store.layout.attention_p or DEFAULT_ATTENTION_P
        self.precision = precision

    def targets(self, pixels: torch.Tensor, selected: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Targets of the ``selected`` teachers (default all) on a view's ``pixels``: a random-teacher step runs
        only its teacher."""
        out = {}
        for key, teacher in self.teachers.items():
            if selected is not None and key not in selected:
                continue
            for name, value in teacher_outputs(
                teacher, pixels, self.features, self.precision, self.attention_p
            ).items():
                out[teacher_key(key, name)] = value
        return out


class DivergentBatches:
    """The divergent views' batches (``extract --divergent-views``): epoch ``e`` takes divergent view ``e mod K``,
    ``per_epoch`` shuffled batches of it, their pixels the stored uint8 (held in memory, on the device) and their
    targets that view's stored teacher outputs."""

    def __init__(self, store: TeacherStore, keys: list[str], device: torch.device, batch_size: int, seed: int,
                 per_epoch: int) -> None:  # fmt: skip
        self.views, self.per_epoch = store.divergent_views, per_epoch
        self.feed = ViewFeed(store, keys, device)
        self.pixels = [store.divergent_pixels(k).to(device) for k in range(len(self.views))]
        self.n, self.batch_size, self.seed = store.n, batch_size, seed

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        """``(rows, targets, pixels)`` of the epoch's divergent batches."""
        k = epoch % len(self.views)
        cached = self.feed.get(self.views[k])
        order = epoch_batches(self.n, self.batch_size, epoch_generator(self.seed, epoch, Stream.DIVERGENT_ORDER))
        for rows in order[: self.per_epoch]:
            rows_dev = rows.to(self.feed.device, non_blocking=True)
            yield rows, cached.decoded(rows_dev), self.pixels[k][rows_dev].float()

    def close(self) -> None:
        self.feed.close()


def divergent_batches(config: DistillConfig, store: TeacherStore, keys: list[str], device: torch.device,
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


def interleaved(natural: Iterator, divergent: Iterator, natural_count: int, divergent_count: int) -> Iterator:
    """The natural batches with the divergent ones spread evenly among them."""
    given = 0
    for index, batch in enumerate(natural):
        yield batch
        while given < (index + 1) * divergent_count // natural_count:
            yield next(divergent)
            given += 1
