"""Creating a store: where it lives (a local folder, built beside its path and renamed into place, or an fsspec
URL), its compressors, and every array and attribute of a new store (see :mod:`meal_cache.store` for the layout)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zarr

from meal_cache.errors import UserError
from meal_cache.remote import check_bucket, filesystem_of, is_url, object_storage_errors
from meal_cache.store.codecs import QUANTIZE_BITS, lossy_filters, parse_codec
from meal_cache.store.keys import (
    DIVERGENT_PIXELS,
    LABELS,
    MIX_KEYS,
    OPS_KEYS,
    SOURCE_SIZE,
    VIEW_CROP,
    VIEW_FLIP,
    VIEW_VFLIP,
    feature_key,
    is_feature_key,
    logits_key,
    progress_key,
    range_key,
    view_field,
)
from meal_cache.store.logits import check_logits_choice
from meal_cache.store.origins import create_origins
from meal_cache.store.schema import DTYPES, FORMAT, BlockSpec, StoreLayout, TeacherSpec
from meal_cache.views.augment import ViewParams

# Every array is created with it: all chunks written, so a missing chunk means a lost one.
ARRAY_CONFIG = {"write_empty_chunks": True}


def store_exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    filesystem, root = filesystem_of(path)
    with object_storage_errors(path):
        if filesystem.exists(root):
            return True
        check_bucket(filesystem, root, path)
    return False


def remove_store(path: str | Path) -> None:
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    filesystem, root = filesystem_of(path)
    with object_storage_errors(path):
        if filesystem.exists(root):
            filesystem.rm(root, recursive=True)


@contextmanager
def sole_writer(path: str | Path) -> Iterator[None]:
    """Hold the store at ``path`` for one extract: a second one started on it while the first runs (creating it,
    or writing its chunks) is one error, not two writers removing each other's half-made store. A local store's
    lock is ``.NAME.lock`` beside it, removed when the extract ends; the operating system drops the hold of a killed
    one, so its leftover file never blocks the next. Object storage has no lock: there, one extract a store is the
    user's to keep."""
    if is_url(path):
        yield
        return
    import fcntl
    import os

    lock = Path(path).with_name(f".{Path(path).name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Held, but perhaps on a file the previous holder removed as this one opened it: the lock is the
            # file at the path now.
            held = lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except BlockingIOError:
            held = False
        if not held:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"another extract is writing '{path}' (process {holder}); wait for it to finish "
                            "(then run this command again to resume or check it), or choose another "
                            "--out") from None  # fmt: skip
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # before the hold ends, so no one takes a file that is going away
            fcntl.flock(handle, fcntl.LOCK_UN)


def json_safe(value: Any) -> Any:
    """Round-trip through JSON so attributes compare equal to what a reader gets back."""
    return json.loads(json.dumps(value))


def _checked_compressors(layout: StoreLayout, teachers: list[TeacherSpec]) -> list:
    """The layout's compressors, once its dtype, codec and lossy options are known to make sense together."""
    if layout.dtype not in DTYPES:
        raise UserError(f"unknown dtype '{layout.dtype}'; choose one of: {', '.join(DTYPES)}")
    compressors = parse_codec(layout.codec)
    if layout.quantize is not None and layout.quantize not in QUANTIZE_BITS:
        raise UserError(f"--quantize takes {', '.join(map(str, QUANTIZE_BITS))}, got {layout.quantize}")
    if layout.quantize is not None and layout.keep_bits is not None:
        raise UserError("--quantize and --keep-bits are two lossy encodings; choose one")
    check_logits_choice(layout.logits, layout.logits_temperature)
    encoding, k = layout.logits_encoding, layout.logits_k
    for teacher in teachers:
        if encoding is not None and not encoding.distinct and k > len(teacher.classes):
            raise UserError(f"--logits {layout.logits} keeps more than teacher {teacher.key}'s "
                            f"{len(teacher.classes)} classes")  # fmt: skip
    return compressors


@dataclass(frozen=True)
class _NewArrays:
    """What every array of a store being created shares: its group, its rows a chunk, its chunks a shard (1: no
    sharding), its compressors (the checksum last) and config (every chunk written, so a missing one is a lost
    one)."""

    group: zarr.Group
    rows: int
    compressors: list
    shard_chunks: int = 1

    def create(self, key: str, **options: Any) -> zarr.Array:
        return self.group.create_array(key, compressors=self.compressors, config=ARRAY_CONFIG, **options)

    def per_view(self, key: str, shape: tuple[int, ...], dtype: str, **options: Any) -> zarr.Array:
        """An array of ``(view, row, ...)``, one chunk per view and ``rows`` rows; sharded, ``shard_chunks`` of
        them (one view's) in one object, each chunk keeping its own checksum and the shard's index one more."""
        row_shape = shape[2:]
        if self.shard_chunks > 1:
            options["shards"] = (1, self.rows * self.shard_chunks, *row_shape)
        return self.create(key, shape=shape, chunks=(1, self.rows, *row_shape), dtype=dtype, **options)


def _new_arrays(group: zarr.Group, layout: StoreLayout, compressors: list) -> _NewArrays:
    return _NewArrays(group, layout.rows_per_chunk, compressors, layout.chunks_per_unit)


def _write_views(arrays: _NewArrays, views: Sequence[ViewParams], n: int) -> None:
    """Every view's parameters (crops and flips, and the vertical flips, the policy's ops or the mixing where the
    views have them),
    written one view at a time, so a store of many views is created in the memory of one."""
    count, first = len(views), views[0]
    fields = [(VIEW_CROP, "int16"), (VIEW_FLIP, "bool")]
    if first.ops is not None:
        fields += [(key, "int8") for key in OPS_KEYS]
    if first.mix_partner is not None:
        fields += list(zip(MIX_KEYS, ("int32", "float32", "int16"), strict=True))
    if first.vflip is not None:
        fields.append((VIEW_VFLIP, "bool"))
    created = {key: arrays.per_view(key, (count, *getattr(first, view_field(key)).shape), dtype)
               for key, dtype in fields}  # fmt: skip
    for index in range(count):
        view = first if index == 0 else views[index]
        for key, array in created.items():
            array[index] = getattr(view, view_field(key)).numpy()


def _create_divergent_pixels(arrays: _NewArrays, shape: tuple[int, ...]) -> None:
    """``divergent/pixels`` (K, N, 3, S, S): left to extract, which writes each chunk as its search finds it
    (before any teacher marks the chunk done; verify and repair count on that order)."""
    arrays.per_view(DIVERGENT_PIXELS, shape, "uint8", fill_value=0)


# A row's shape of each feature kind: pooled channels (C, g, g); a map over the block's positions (H, W).
FEATURE_SHAPES: dict[str, Callable[[BlockSpec], tuple[int, ...]]] = {
    "blocks": lambda block: block.stored_shape,
    "maps": lambda block: (block.height, block.width),
    "attention": lambda block: (block.height, block.width),
}


def add_teacher_arrays(group: zarr.Group, teachers: list[TeacherSpec], layout: StoreLayout, count: int,
                       n: int) -> None:  # fmt: skip
    """Every array of ``teachers`` in an existing store's ``group`` of ``count`` views and ``n`` rows, as
    :func:`create_group` makes them (unwritten, progress unset): growing a store by teachers."""
    arrays = _new_arrays(group, layout, _checked_compressors(layout, teachers))
    for teacher in teachers:
        _create_teacher_arrays(arrays, teacher, layout, lossy_filters(layout), count, n)


def _create_teacher_arrays(
    arrays: _NewArrays, teacher: TeacherSpec, layout: StoreLayout, filters: list, count: int, n: int
) -> None:
    """A teacher's outputs (as the layout encodes them, ``filters`` their lossy ones), unwritten, and its progress
    marks, all unset."""

    def output_array(key: str, shape: tuple[int, ...]) -> None:
        if layout.quantize is not None and is_feature_key(key):
            arrays.per_view(key, shape, "uint8", fill_value=0)
            arrays.per_view(range_key(key), (count, n, 2), "float32", fill_value=0)
            return
        arrays.per_view(key, shape, layout.dtype, filters=filters, fill_value=0)

    encoding, classes = layout.logits_encoding, len(teacher.classes)
    # A dense store's logits are a map: one row of logits per position of it.
    positions = () if teacher.dense_map is None else (math.prod(teacher.dense_map),)
    if encoding is None:
        output_array(logits_key(teacher.key), (count, n, *positions, classes))
    else:
        slots = encoding.slots(layout.logits_k, classes)
        for key, (_, dtype, per_slot) in zip(encoding.keys(logits_key(teacher.key)), encoding.parts, strict=True):
            shape = (count, n, *positions, slots) if per_slot else (count, n, *positions)
            arrays.per_view(key, shape, dtype or layout.dtype, fill_value=0)
    for block in teacher.blocks:
        for kind in layout.features:
            output_array(feature_key(teacher.key, kind, block.key), (count, n, *FEATURE_SHAPES[kind](block)))
    # One mark a unit of work (a chunk of rows, or a shard of them), each its own object, so marks never collide.
    arrays.create(progress_key(teacher.key), shape=(count, math.ceil(n / (arrays.rows * arrays.shard_chunks))),
                  chunks=(1, 1), dtype="bool", fill_value=False)  # fmt: skip


def create_group(
    path: str | Path,
    *,
    dataset: dict,
    labels: torch.Tensor,
    views: Sequence[ViewParams],
    views_info: dict,
    teachers: list[TeacherSpec],
    layout: StoreLayout,
    settings: dict,
    source_sizes: torch.Tensor | None = None,
    divergent_pixels: tuple[int, ...] | None = None,
) -> zarr.Group:
    """Create every array and attribute of a new store (replacing ``path``), with labels and views written, and
    return its group (:func:`meal_cache.store.create_store` opens it as a store).

    ``divergent_pixels`` is the shape of the divergent views' pixels, which extract writes as it finds them.
    A local store is built beside ``path`` and renamed into place, so a process killed while creating it leaves
    no half-made store behind, only a ``.creating`` folder the next attempt removes."""
    compressors = _checked_compressors(layout, teachers)
    filters = lossy_filters(layout)  # teacher outputs only: labels, views and progress stay exact
    n = int(labels.shape[0])
    target = path
    if not is_url(path):
        path = Path(path)
        path = path.with_name(f".{path.name}.creating")
        remove_store(path)
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update(
        json_safe(
            {
                "format": FORMAT,
                "dataset": dataset,
                "views": views_info,
                "teachers": {t.key: t.to_json() for t in teachers},
                "layout": layout.to_json(),
                "settings": settings,
                "complete": False,
            }
        )
    )
    arrays = _new_arrays(group, layout, compressors)
    arrays.create(LABELS, shape=(n,), chunks=(max(n, 1),), dtype="int64")[:] = labels.numpy()
    _write_views(arrays, views, n)
    if divergent_pixels is not None:
        _create_divergent_pixels(arrays, divergent_pixels)
    if source_sizes is not None:
        sizes = arrays.create(SOURCE_SIZE, shape=(n, 2), chunks=(layout.rows_per_chunk, 2), dtype="int32")
        sizes[:] = source_sizes.numpy()
    for teacher in teachers:
        _create_teacher_arrays(arrays, teacher, layout, filters, len(views), n)
    create_origins(group, [t.key for t in teachers], len(views))  # inside the store renamed into place
    if str(target) != str(path):
        remove_store(target)
        Path(path).rename(target)
        group = zarr.open_group(str(target), mode="r+")
    return group
