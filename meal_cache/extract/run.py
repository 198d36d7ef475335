"""Stage 1: run every teacher exactly once over V replayable views of a dataset split and fill the store.

For each unit of rows (a chunk of them, or with ``--shard-chunks K`` a shard's K chunks, which is written whole: see
:meth:`TeacherStore.write_rows`): the source renders every view the unit still needs of its images as the views'
stored parameters say (on the device for in-memory data, in decoding workers for image files: each image is decoded
once for all its views and all teachers), every teacher that has not yet done a (view, unit) runs on it once in
eval mode under ``torch.inference_mode`` (AMP and channels_last on CUDA), one view's mini-batch at a time, with
forward hooks on its blocks, and the logits, pooled blocks and channel-mean maps go to a background writer that
compresses and writes the whole (view, unit), then marks it done. A killed extract, run again with the same
settings, skips the (view, unit)s marked done and ends with the same store as an uninterrupted run; a unit killed
mid-write is unmarked, so it is written again whole.

Under ``torchrun`` every rank runs this function: rank 0 creates the store, every rank takes the units whose index
``u`` has ``u % world_size == rank`` (whole units, so no two ranks write one chunk or shard), and after a barrier
rank 0 records the teachers' accuracy and marks the store complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meal_cache.data.datasets import ImageDataset, load_dataset
from meal_cache.data.source import replay_decode, views_pixels
from meal_cache.dense import (
    DenseSettings,
    dense_outputs,
    dense_teacher,
)
from meal_cache.engine.distributed import World, init_world
from meal_cache.engine.progress import progress_bar
from meal_cache.errors import UserError
from meal_cache.extract.config import DIVERGENT_FIELDS, MIXING_FIELDS, ExtractConfig, fitted_to_data
from meal_cache.extract.divergent import DivergentSource, search_from_json
from meal_cache.extract.finite import NonFiniteOutput, store_arrays
from meal_cache.extract.target import open_or_create
from meal_cache.nets.teachers import Teacher, keep_projections, projected_teachers, resolve_teacher, teacher_outputs
from meal_cache.projection import PCA_ROWS_PER_DIM, pca_projection, pooled_rows, stored_projections
from meal_cache.runtime import Precision
from meal_cache.store.create import sole_writer
from meal_cache.store.schema import BlockSpec
from meal_cache.store.teacher_store import TeacherStore, open_store
from meal_cache.views import augment

# Units (a chunk of rows, or a shard's K chunks) handed to the writer but not yet durable; bounds the memory the
# background writer may hold.
MAX_PENDING_WRITES = 4


def _settings(config: ExtractConfig, dataset: ImageDataset, teachers: list[Teacher]) -> dict:
    """What must be equal for an existing store to be resumed rather than refused: every setting that changes what
    the store holds (not where or how fast it is computed, nor the options of a feature left off)."""
    recorded = augment.recorded_options(asdict(config))
    for transient in ("device", "batch_size", "data_root", "download", "teacher_dir", "workers", "decode"):
        recorded.pop(transient)
    unused = {MIXING_FIELDS: config.mixing() is None, DIVERGENT_FIELDS: not config.divergent_views,
              ("projection",): config.project is None, ("dense_sizes", "dense_grid"): not config.dense,
              ("shard_chunks",): config.shard_chunks == 1}  # fmt: skip
    for names, off in unused.items():
        if off:
            for name in names:
                recorded.pop(name)
    recorded["fingerprint"] = dataset.fingerprint(config.split)
    recorded["teacher_checkpoints"] = {t.spec.key: t.spec.checkpoint_sha256 for t in teachers}
    return recorded


def extract(
    config: ExtractConfig,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
) -> TeacherStore:
    """Build (or resume) the teacher cache at ``out`` (a folder or an fsspec URL) and return it opened.

    A failed write (disk full, no permission) raises a :class:`UserError` and leaves the store resumable: the
    chunks whose progress mark was set are kept, and the store is never marked complete."""
    asked, config = config, config.resolved()
    world, device = init_world(config.device)
    progress = progress and world.is_main
    precision = Precision(device)
    dataset = dataset or load_dataset(config.data, config.data_root, config.download, config.image_size)
    config = fitted_to_data(config, asked, dataset.num_classes)
    teachers = [
        resolve_teacher(name, config.teacher_dir, dataset, config.blocks, config.grid) for name in config.teachers
    ]
    if config.project is not None:
        teachers = projected_teachers(teachers, config.project, config.seed, config.projection,
                                      required=asked.project is not None)  # fmt: skip
    dense = config.dense_settings(dataset.image_size, dataset.streamed)
    if dense is not None:
        teachers = [dense_teacher(t, dense) for t in teachers]
    settings = _settings(config, dataset, teachers)
    # The main rank holds the store for the whole run; torchrun's other ranks write under its hold.
    with sole_writer(out) if world.is_main else contextlib.nullcontext():
        return _extract_into(out, config, dataset, teachers, settings, overwrite, precision, device, world, progress,
                             dense)  # fmt: skip


def _extract_into(out: str | Path, config: ExtractConfig, dataset: ImageDataset, teachers: list[Teacher],
                  settings: dict, overwrite: bool, precision: Precision, device: torch.device, world: World,
                  progress: bool, dense: DenseSettings | None) -> TeacherStore:  # fmt: skip
    """Open or create the store at ``out`` and write every unit it still lacks (see :func:`extract`)."""
    try:
        world.run_on_main(lambda: open_or_create(config, out, dataset, teachers, settings, overwrite, device))
        store = open_store(out, mode="r+")
        fit = partial(_fit_pca, store=store, dataset=dataset, config=config, precision=precision, device=device,
                      outputs=_outputs(dense, config.attention_p))  # fmt: skip
        world.run_on_main(lambda: keep_projections(store, teachers, fit))
        world.barrier()
        for teacher in teachers:  # every rank writes with the main rank's fitted matrices
            teacher.projections.update(stored_projections(store, teacher.spec.key))
        if store.complete:
            if progress:
                tqdm.write(f"{out} is complete; nothing to do")
            return store
        _run_teachers(store, teachers, dataset, config, precision, device, world, progress, dense)
        world.barrier()
        world.run_on_main(lambda: _finalise(store, teachers))
    except OSError as err:
        raise UserError(
            f"writing the store '{out}' failed: {err.strerror or err}; the chunks already written are kept and "
            "the store is not marked complete: fix the cause and run the same command to resume"
        ) from err
    return open_store(out)


def _outputs(dense: DenseSettings | None, attention_p: float | None) -> Callable[..., dict[str, torch.Tensor]]:
    """What a teacher's forward writes: a view's outputs (attention maps at the store's p), or a dense store's maps
    of the whole image."""
    if dense is not None:
        return partial(dense_outputs, settings=dense)
    return teacher_outputs if attention_p is None else partial(teacher_outputs, attention_p=attention_p)


def _open_source(dataset: ImageDataset, config: ExtractConfig, device: torch.device, store: TeacherStore):
    """The split's image source, at the whole image's first size for a dense store; a resumed store's files
    decoded where its first chunks were (``auto``)."""
    dense = config.dense_settings(dataset.image_size, dataset.streamed)
    decode = replay_decode(config.decode, store.dataset.get("decode"))
    return dataset.split(config.split).open(device, config.workers, None if dense is None else dense.sizes[0],
                                            decode=decode)  # fmt: skip


@torch.inference_mode()
def _fit_pca(teacher: Teacher, blocks: list[BlockSpec], *, store: TeacherStore, dataset: ImageDataset,
             config: ExtractConfig, precision: Precision, device: torch.device,
             outputs: Callable[..., dict[str, torch.Tensor]] = teacher_outputs) -> dict[str, torch.Tensor]:  # fmt: skip
    """``--projection pca``: each of ``blocks``' top ``--project`` principal directions, fitted on the teacher's
    unprojected pooled outputs over the first rows of view 0 (whole chunks, at least PCA_ROWS_PER_DIM rows per
    dimension), before any chunk is written."""
    wanted = max(config.rows_per_chunk, PCA_ROWS_PER_DIM * config.project)
    stop = min(store.n, math.ceil(wanted / config.rows_per_chunk) * config.rows_per_chunk)
    params = store.view_params(0)
    unprojected = dataclasses.replace(teacher, model=precision.prepare(teacher.model), projections={})
    rows: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    requests = ((torch.arange(start, min(stop, start + config.batch_size)),
                 params[start : min(stop, start + config.batch_size)], None)
                for start in range(0, stop, config.batch_size))  # fmt: skip
    source = _open_source(dataset, config, device, store)
    try:
        for _, pixels in source.pixels(requests):
            pooled = outputs(unprojected, pixels, ("blocks",), precision)
            for block in blocks:
                rows[block.name].append(pooled_rows(pooled[f"blocks/{block.key}"]).double().cpu())
    finally:
        source.close()
    return {name: pca_projection(torch.cat(parts), config.project) for name, parts in rows.items()}


def _run_teachers(
    store: TeacherStore,
    teachers: list[Teacher],
    dataset: ImageDataset,
    config: ExtractConfig,
    precision: Precision,
    device: torch.device,
    world: World,
    progress: bool,
    dense: DenseSettings | None = None,
) -> None:
    """This rank's share of every (view, unit) some teacher has not done, written by a background writer: the
    replayed views unit by unit, every view of a unit's rows from one decode of each image, then each
    divergent view (a search of its own) unit by unit."""
    for teacher in teachers:
        teacher.model = precision.prepare(teacher.model)
    done = {t.spec.key: _progress_marks(store, t.spec.key) for t in teachers}
    outputs = _outputs(dense, config.attention_p)
    units = range(world.rank, store.n_units, world.size)
    source = _open_source(dataset, config, device, store)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-writer") as writer:
        pending: deque[Future] = deque()

        def write(written: Iterator[tuple[int, int, dict[str, dict]]]) -> None:
            for view, unit, arrays in written:
                for key, teacher_arrays in arrays.items():
                    pending.append(writer.submit(store.write_rows, key, view, unit, teacher_arrays))
                while len(pending) > MAX_PENDING_WRITES:
                    pending.popleft().result()

        try:
            replayed = [v for v in range(store.num_views) if v not in store.divergent_views]
            todo = _todo(done, replayed, units)
            # A bar is closed once its work is done; one a failure leaves open, the command line closes
            # before its message (cli.close_progress_bars), so the message starts a line of its own.
            bar = _bar(store, todo, replayed, progress)
            write(_chunk_outputs(source, teachers, {v: store.view_params(v) for v in replayed}, store, todo, done,
                                 config, precision, bar.update, outputs))  # fmt: skip
            bar.close()
            for view in store.divergent_views:
                todo = _todo(done, [view], units)
                view_source = DivergentSource(source, teachers, store, search_from_json(store.attrs["views"]
                                              ["divergent"]), store.divergent_views.index(view),
                                              precision.channels_last)  # fmt: skip
                bar = _bar(store, todo, [view], progress)
                write(_chunk_outputs(view_source, teachers, {view: store.view_params(view)}, store, todo, done,
                                     config, precision, bar.update, outputs))  # fmt: skip
                bar.close()
        finally:
            source.close()
            # Whatever happens, chunks already handed to the writer are finished (or their error raised).
            while pending:
                pending.popleft().result()
    for teacher in teachers:
        teacher.model = teacher.model.cpu()


def _todo(done: dict[str, np.ndarray], views: list[int], units: Iterable[int]) -> dict[int, list[int]]:
    """Unit -> the ``views`` some teacher has not done for it, for the units with any."""
    todo = {u: [v for v in views if not all(marks[v, u] for marks in done.values())] for u in units}
    return {c: views for c, views in todo.items() if views}


def _bar(store: TeacherStore, todo: dict[int, list[int]], views: list[int], progress: bool) -> tqdm:
    """A bar over the images of the (view, unit)s to do, named by its view or the range of its views."""
    name = f"view {views[0] + 1}" if len(views) == 1 else f"views {views[0] + 1}-{views[-1] + 1}"
    return progress_bar(total=sum(_unit_len(store, u) * len(v) for u, v in todo.items()), unit="img", leave=False,
                desc=f"{name}/{store.num_views}", disable=not progress)  # fmt: skip


@torch.inference_mode()
def _chunk_outputs(source, teachers: list[Teacher], params: dict[int, augment.ViewParams], store: TeacherStore,
                   todo: dict[int, list[int]], done: dict[str, np.ndarray], config: ExtractConfig,
                   precision: Precision, advance: Callable[[int], object],
                   teacher_outputs=teacher_outputs) -> Iterator[tuple[int, int, dict[str, dict]]]:  # fmt: skip
    """Per (view, unit) of ``todo`` (unit -> its views), the store arrays of every teacher that has not done
    it. A teacher runs on mini-batches of ``batch_size`` rows of one view, split within each chunk of rows (a fixed
    split, so a resumed unit is bit-equal, and a sharded store's values are an unsharded one's); the source is
    asked for every view of a mini-batch's rows at once, in requests of about
    ``batch_size`` samples (a slice of the rows, all its views), so each image is decoded once for all its views
    while a request stays as large as one view's mini-batch. ``advance(images)`` is called after each mini-batch
    (the bar). A unit whose outputs are not finite raises a UserError after the unit's other arrays reach the
    writer, so it is never marked done."""

    def requests() -> Iterator[tuple[torch.Tensor, list[augment.ViewParams], tuple[int, slice, slice, bool]]]:
        for unit, views in todo.items():
            rows = store.unit_rows(unit)
            for chunk in store.unit_chunks(unit):
                chunk_rows = store.chunk_rows(chunk)
                for start in range(chunk_rows.start, chunk_rows.stop, config.batch_size):
                    stop = min(chunk_rows.stop, start + config.batch_size)
                    piece = math.ceil((stop - start) / len(views))
                    for first in range(start, stop, piece):
                        last = min(stop, first + piece)
                        yield (torch.arange(first, last), [params[v][first:last] for v in views],
                               (unit, rows, slice(start, stop), last == stop))  # fmt: skip

    features = tuple(config.features)
    pieces: list[list[torch.Tensor]] = []
    parts: dict[tuple[int, str], dict[str, list[torch.Tensor]]] = {}
    for (unit, rows, batch, batch_done), pixels in views_pixels(source, requests()):
        pieces.append(pixels)
        if not batch_done:
            continue
        views = todo[unit]
        for view, view_pixels in zip(views, (torch.cat(p) for p in zip(*pieces, strict=True)), strict=True):
            for teacher in teachers:
                key = teacher.spec.key
                if not done[key][view, unit]:
                    outputs = teacher_outputs(teacher, view_pixels, features, precision)
                    for name, value in outputs.items():
                        parts.setdefault((view, key), {}).setdefault(name, []).append(value.to(torch.float32).cpu())
        pieces = []
        advance((batch.stop - batch.start) * len(views))
        if batch.stop == rows.stop:
            refused = None
            for view in views:
                arrays = {}
                for teacher in teachers:
                    key = teacher.spec.key
                    if (view, key) not in parts:
                        continue
                    try:
                        arrays[key] = store_arrays(parts.pop((view, key)), config)
                    except NonFiniteOutput as err:
                        refused = refused or err.explain(key, _view_name(store, view), rows, config, precision)
                yield view, unit, arrays  # the unit's other arrays are written before the refusal
            if refused:
                raise UserError(refused)


def _progress_marks(store: TeacherStore, teacher: str) -> np.ndarray:
    try:
        return store.progress(teacher)
    except ValueError as err:  # a progress chunk fails its checksum
        raise UserError(
            f"the store's progress marks for {teacher} are corrupt ({err}); run `meal-cache verify --repair` on it"
        ) from err


def _unit_len(store: TeacherStore, unit: int) -> int:
    rows = store.unit_rows(unit)
    return rows.stop - rows.start


def _view_name(store: TeacherStore, view: int) -> str:
    """A view as the progress bars count them (from 1), saying which is the un-augmented one."""
    name = f"view {view + 1} of {store.num_views}"
    return f"{name} (the identity view)" if view == store.identity_view else name


def _finalise(store: TeacherStore, teachers: list[Teacher]) -> None:
    """Record each teacher's top-1 per view (from the stored logits) and mark the store complete."""
    labels = store.labels()
    recorded = store.attrs["teachers"]
    for teacher in teachers:
        key = teacher.spec.key
        if not store.progress(key).all():
            raise RuntimeError(f"teacher {key} has chunks not written; the store is left incomplete")
        accuracy = []
        for view in range(store.num_views):
            predicted = store.logits(key, view).astype(np.float32).argmax(1)
            accuracy.append(round(100.0 * float((predicted == labels).mean()), 4))
        recorded[key]["accuracy"] = accuracy
    store.set_attrs(teachers=recorded, complete=True)
