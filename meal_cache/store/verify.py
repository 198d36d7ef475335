"""Verify and repair a store: every object (a chunk, or a shard of chunks) that should hold data exists and every
chunk in it passes its CRC-32C checksum, and a damaged teacher object is cleared for the same extract command to
redo (see :mod:`meal_cache.store`).

An object is named by its coordinates in the array's grid of objects: a chunk's in an unsharded array, a shard's
in a sharded one, where ``(view, s)`` is the view's s-th shard, which is also the s-th unit of work (the teacher's
progress mark ``(view, s)``). Damage anywhere in a shard (a chunk's bytes, the shard's index, a truncated object)
fails a checksum on reading it, so the shard is reported whole, and repair redoes that unit."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync

from meal_cache.errors import UserError
from meal_cache.store.keys import DIVERGENT_PIXELS, LABELS, is_teacher_key, progress_key, teacher_of

if TYPE_CHECKING:
    from meal_cache.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class ChunkProblem:
    """An object (a chunk, or a shard: ``shard``) that should hold data and does not: ``missing`` (lost) or
    ``corrupt`` (fails its checksum); ``chunk`` is its coordinates in the array's grid of objects."""

    array: str
    chunk: tuple[int, ...]
    kind: str
    detail: str = ""
    shard: bool = False

    def __str__(self) -> str:
        where = f"{self.array} {'shard' if self.shard else 'chunk'} ({', '.join(map(str, self.chunk))})"
        return f"{where}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    chunks_pending: int = 0  # not extracted yet (an incomplete store), which is not damage
    problems: list[ChunkProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _stored_chunks(array: zarr.Array) -> set[tuple[int, ...]]:
    """Object (chunk or shard) indices present in the store (one listing, no reads)."""
    store, prefix = array.store_path.store, f"{array.store_path.path}/c/"

    async def listing() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    found = set()
    for key in sync(listing()):
        parts = key[len(prefix) :].split("/")
        if all(part.isdigit() for part in parts):  # not an interrupted atomic write's temporary file
            found.add(tuple(int(part) for part in parts))
    return found


def _object_shape(array: zarr.Array) -> tuple[int, ...]:
    """The shape one object of ``array`` covers: a shard's where it is sharded, else a chunk's."""
    return array.shards if array.shards is not None else array.chunks


def _chunk_grid(array: zarr.Array) -> Iterator[tuple[int, ...]]:
    """The coordinates of every object of ``array`` (its chunks, or its shards)."""
    counts = [math.ceil(size / side) for size, side in zip(array.shape, _object_shape(array), strict=True)]
    return itertools.product(*(range(count) for count in counts))


def _read_objects(array: zarr.Array, first: tuple[int, ...], last: tuple[int, ...]) -> None:
    """Decode the objects from ``first`` to ``last`` (sharing all but their second index; 1-d: every object)."""
    if array.ndim == 1:
        array[:]
        return
    side = _object_shape(array)
    region = tuple(slice(a * s, (b + 1) * s) for a, b, s in zip(first, last, side, strict=True))
    array[region]


# A shard index entry of a chunk the shard does not hold: offset and length both 2**64 - 1 (Zarr v3 sharding spec).
_EMPTY_ENTRY = np.uint64(2**64 - 1)
# A shard index entry's bytes (offset, length: two little-endian uint64) and the index's CRC-32C after them.
_ENTRY_BYTES, _INDEX_CHECKSUM_BYTES = 16, 4


def _shard_holes(array: zarr.Array, coords: tuple[int, ...]) -> list[int]:
    """The chunks of rows inside the array that shard ``coords`` lacks, by their index within the shard (read from
    its index at the object's end; one ranged read). A shard written whole has none: a hole is a partial write,
    which reads back as fill values, so it is damage a checksum alone does not show."""
    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    per_shard = [s // c for s, c in zip(array.shards, array.chunks, strict=True)]
    entries = math.prod(per_shard)
    key = f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"
    request = SuffixByteRequest(entries * _ENTRY_BYTES + _INDEX_CHECKSUM_BYTES)
    found = sync(array.store_path.store.get(key, prototype=default_buffer_prototype(), byte_range=request))
    if found is None:
        return []  # missing altogether: reported as missing
    index = np.frombuffer(found.to_bytes()[:-_INDEX_CHECKSUM_BYTES], dtype="<u8").reshape(*per_shard, 2)
    holes = []
    for inner in itertools.product(*(range(n) for n in per_shard)):
        start = [(c * n + i) * side for c, n, i, side in zip(coords, per_shard, inner, array.chunks, strict=True)]
        inside = all(first < size for first, size in zip(start, array.shape, strict=True))
        if inside and (index[inner] == _EMPTY_ENTRY).all():
            holes.append(int(np.ravel_multi_index(inner, per_shard)))
    return holes


def _hole_problems(array: zarr.Array, key: str, shards: list[tuple[int, ...]]) -> list[ChunkProblem]:
    problems = []
    for coords in shards:
        holes = _shard_holes(array, coords)
        if holes:
            chunks = ", ".join(map(str, holes))
            problems.append(ChunkProblem(key, coords, "missing", f"its chunk(s) {chunks} absent from its index",
                                         shard=True))  # fmt: skip
    return problems


# Chunks decoded together by verify: bounds its memory whatever the size of a view.
VERIFY_CHUNKS_AT_ONCE = 16


def _decode_problems(array: zarr.Array, key: str, chunks: list[tuple[int, ...]]) -> list[ChunkProblem]:
    """Decode ``chunks`` (objects sharing their first index) a few at a time, one by one only where that
    fails."""
    if array.ndim == 1:
        groups = [chunks]
    else:
        ordered = sorted(chunks)
        groups = [ordered[i : i + VERIFY_CHUNKS_AT_ONCE] for i in range(0, len(ordered), VERIFY_CHUNKS_AT_ONCE)]
    problems, sharded = [], array.shards is not None
    for group in groups:
        try:
            _read_objects(array, group[0], group[-1])
            continue
        except Exception:  # noqa: BLE001 - some object of the group does not decode: find which, below
            pass
        for coords in group:
            try:
                _read_objects(array, coords, coords)
            except Exception as err:  # noqa: BLE001
                problems.append(ChunkProblem(key, coords, "corrupt", str(err).split(".")[0], sharded))
    return problems


def verify_store(store: TeacherStore, keys: list[str] | None = None,
                 progress: Callable[..., Iterable[str]] | None = None) -> VerifyReport:  # fmt: skip
    """Check that every chunk that should hold data exists and decodes (its CRC-32C matches).

    Labels and views are written at creation, so all their chunks must exist; a teacher's output chunk must
    exist once its progress mark is set. ``keys`` limits the check to some arrays (distill checks those it
    reads). ``progress`` makes the bar over the arrays, called as tqdm is (the CLI passes
    ``engine.progress.progress_bar``, which keeps a redirected log short); None: no bar."""
    report = VerifyReport()
    done = {teacher: _progress_marks(store, teacher, report) for teacher in store.teacher_names}
    arrays = keys if keys is not None else _all_keys(store)
    for key in progress(arrays, desc="verify", unit="array") if progress is not None else arrays:
        array = store.group[key]
        stored = _stored_chunks(array)
        if is_teacher_key(key):
            marks = done[teacher_of(key)]
            expected = [c for c in _chunk_grid(array) if marks[c[0], c[1]]]
            report.chunks_pending += int((~marks).sum())
        elif key == DIVERGENT_PIXELS:
            expected = _divergent_expected(store, array, done)
        else:
            expected = list(_chunk_grid(array))
        present = [c for c in expected if c in stored]
        sharded = array.shards is not None
        report.problems += [ChunkProblem(key, c, "missing", shard=sharded) for c in expected if c not in stored]
        by_first: dict[int, list[tuple[int, ...]]] = {}
        for coords in present:
            by_first.setdefault(coords[0], []).append(coords)
        for chunks in by_first.values():
            report.problems += _decode_problems(array, key, chunks)
        if sharded:
            corrupt = {p.chunk for p in report.problems if p.array == key}
            report.problems += _hole_problems(array, key, [c for c in present if c not in corrupt])
        report.chunks_checked += len(present)
    return report


def _progress_marks(store: TeacherStore, teacher: str, report: VerifyReport) -> np.ndarray:
    """A teacher's progress marks, a corrupt one reported in ``report`` and counted as not done."""
    key = progress_key(teacher)
    array = store.group[key]
    marks = np.zeros(array.shape, dtype=bool)
    for view in range(array.shape[0]):
        try:
            marks[view] = array[view]
        except Exception:  # noqa: BLE001 - a corrupt mark: report it, count its chunk as not done
            for chunk in range(array.shape[1]):
                try:
                    marks[view, chunk] = array[view, chunk]
                except Exception as err:  # noqa: BLE001
                    report.problems.append(ChunkProblem(key, (view, chunk), "corrupt", str(err).split(".")[0]))
    return marks


def _all_keys(store: TeacherStore) -> list[str]:
    """Every array that holds data: labels, views, each teacher's outputs with their companions, divergent pixels."""
    keys = [LABELS, *store.view_keys]
    for teacher in store.teacher_names:
        keys += store.with_companions(store.feature_keys(teacher))
    if DIVERGENT_PIXELS in store.group:
        keys.append(DIVERGENT_PIXELS)
    return keys


# ------------------------------------------------------------------ divergent pixels
# Their chunks are written by extract, not at creation, yet carry no progress marks of their own: a chunk is
# due once any teacher marked its (divergent view, chunk) done, and a damaged one is redone by every teacher.


def _divergent_expected(store: TeacherStore, array: zarr.Array, done: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The divergent pixel chunks that must exist: a view's chunk is written before any teacher marks it."""
    views = store.divergent_views
    marked = [np.logical_or.reduce([done[t][views[c[0]], c[1]] for t in done]) for c in _chunk_grid(array)]
    return [c for c, m in zip(_chunk_grid(array), marked, strict=True) if m]


def _divergent_redo(store: TeacherStore, problems: list[ChunkProblem]) -> set[tuple[str, int, int]]:
    """A damaged divergent pixel chunk: every teacher redoes that (view, chunk), which searches its pixels again."""
    return {(t, store.divergent_views[p.chunk[0]], p.chunk[1]) for p in problems
            if p.array == DIVERGENT_PIXELS for t in store.teacher_names}  # fmt: skip


def _written_by_extract(key: str) -> bool:
    """Teacher arrays and divergent pixels, which the same extract command can write again (not labels, views)."""
    return is_teacher_key(key) or key.startswith(DIVERGENT_PIXELS)


def repair_store(store: TeacherStore, report: VerifyReport) -> int:
    """Clear the progress marks of damaged teacher chunks (and the store's ``complete`` flag) so the same
    extract command re-extracts exactly those; returns how many (teacher, view, chunk) units will be redone."""
    fixed_at_creation = [p for p in report.problems if not _written_by_extract(p.array)]
    if fixed_at_creation:
        raise UserError(f"{fixed_at_creation[0]}: labels and views are written when the store is created and "
                        "cannot be re-extracted; extract it again with --overwrite")  # fmt: skip
    redo = {(teacher_of(p.array), p.chunk[0], p.chunk[1]) for p in report.problems if p.array != DIVERGENT_PIXELS}
    redo |= _divergent_redo(store, report.problems)
    for teacher, view, chunk in sorted(redo):
        store.array(progress_key(teacher))[view, chunk] = False
    if redo:
        store.set_attrs(complete=False)
    return len(redo)
