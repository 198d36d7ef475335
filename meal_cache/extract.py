"""Stage 1: run every teacher exactly once over V replayable views of a dataset split and fill the store.

For each view and chunk of rows: the source renders the chunk's images as the view's stored parameters say (on
the device for in-memory data, in decoding workers for image files: each image is decoded once per view for all
teachers), every teacher that has not yet done the chunk runs once in eval mode under ``torch.inference_mode``
(AMP and channels_last on CUDA) with forward hooks on its blocks, and the logits, pooled blocks and channel-mean
maps go to a background writer that compresses and writes the whole chunk, then marks it done. A killed extract,
run again with the same settings, skips the chunks marked done and ends with the same store as an uninterrupted
run.

Under ``torchrun`` every rank runs this function: rank 0 creates the store, every rank takes the chunks whose
index ``c`` has ``c % world_size == rank`` (whole chunks, so no two ranks write one), and after a barrier rank 0
records the teachers' accuracy and marks the store complete.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meal_cache import augment
from meal_cache.data import ImageDataset, load_dataset
from meal_cache.dense import (
    DEFAULT_GRID,
    DenseSettings,
    check_settings,
    default_size,
    dense_outputs,
    dense_teacher,
)
from meal_cache.distill.methods.base import Method, StoreNeeds
from meal_cache.distill.registry import available_methods
from meal_cache.distributed import World, init_world
from meal_cache.divergent import DivergentSearch, DivergentSource, check_search, search_from_json
from meal_cache.errors import UserError, unknown_choice
from meal_cache.extract_finite import NonFiniteOutput, store_arrays
from meal_cache.extract_store import open_or_create
from meal_cache.loop import check_workers
from meal_cache.mixing import Mixing
from meal_cache.projection import PCA_ROWS_PER_DIM, PROJECTIONS, pca_projection, pooled_rows, stored_projections
from meal_cache.runtime import Precision
from meal_cache.source import check_decode, replay_decode
from meal_cache.store.keys import DEFAULT_FEATURES, FEATURE_KINDS
from meal_cache.store.logits import check_logits_options, chosen_encoding
from meal_cache.store.schema import DEFAULT_ATTENTION_P, BlockSpec
from meal_cache.store.teacher_store import TeacherStore, open_store
from meal_cache.teachers import Teacher, keep_projections, projected_teachers, resolve_teacher, teacher_outputs

# Chunks written but not yet durable; bounds the memory the background writer may hold.
MAX_PENDING_WRITES = 4
# Top-k logits are made exact, and sampled ones drawn, at distill's default soft-label temperature.
DEFAULT_LOGITS_TEMPERATURE = Method.temperature
MIXING_FIELDS = ("mixup", "cutmix", "mix_prob", "mix_switch_prob")
DIVERGENT_FIELDS = ("divergent_views", "divergent_eps", "divergent_steps")


# ``--for all``: the default layout, as without --for; ``--for METHOD``: what the method declares it reads
# (:attr:`meal_cache.distill.Method.store_needs`).
STORE_EVERYTHING = StoreNeeds(DEFAULT_FEATURES, "all", "logits, and every block's pooled output and map (the default)")


def store_presets() -> dict[str, StoreNeeds]:
    """What ``extract --for NAME`` stores, by name: ``all``, then every method's (plug-ins included)."""
    return {"all": STORE_EVERYTHING, **{name: cls.store_needs for name, cls in available_methods().items()}}


DEFAULT_BLOCKS = "all"


@dataclass
class ExtractConfig:
    """Everything that defines a store's contents; an existing store is resumed only under equal settings."""

    teachers: list[str]
    data: str = "digits"
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None
    split: str = "train"
    views: int = 4  # the views curve (docs/design.md): no gain measured beyond
    identity_view: bool = False
    recipe: str = "crop"  # the views' policy after the crop: crop (none), randaugment, trivialaugment
    # timm's train.py knobs (None: the data's recipe's own; see augment.AugmentOptions): the random-resized crop's
    # area share and aspect ratio bounds, and each flip's chance.
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    vflip: float | None = None
    mixup: float = 0.0  # Mixup's Beta alpha (0: none); the teachers see the mixed images
    cutmix: float = 0.0  # CutMix's Beta alpha (0: none)
    mix_prob: float = 1.0  # the share of (view, row)s mixed
    mix_switch_prob: float = 0.5  # with both alphas: the chance of CutMix rather than Mixup (timm's switch_prob)
    divergent_views: int = 0  # divergent views: a PGD search for the fixed teachers' disagreement, stored
    divergent_eps: float = 0.03  # their L-infinity bound around the un-augmented image, a fraction of 0-255
    divergent_steps: int = 5  # signed-gradient ascent steps of 2.5 eps / steps each
    dense: bool = False  # one whole-image pass per teacher, maps from which distill derives any crop's targets
    dense_sizes: list[int] | None = None  # the whole image's sizes for the teacher (None: dense.default_size)
    dense_grid: int = DEFAULT_GRID  # the blocks' stored grid in a dense store
    seed: int = 0
    grid: int = 1
    blocks: str = "all"
    features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    # The p of the attention maps, the channel mean of |A|^p (None: DEFAULT_ATTENTION_P where they are stored).
    attention_p: float | None = None
    dtype: str = "float16"
    codec: str = "zstd:3"
    keep_bits: int | None = None
    quantize: int | None = None  # None: the --for preset's encoding (lossless without one); 0: lossless
    logits_topk: int | None = None  # lossy: only each row's K largest logits (and their log-sum-exp)
    logits_sample: int | None = None  # lossy: K classes drawn from each row's softmax, with their counts
    logits_temperature: float | None = None  # the T of top-k and sampled logits (None: DEFAULT_LOGITS_TEMPERATURE)
    project: int | None = None  # pooled blocks wider than this many channels are stored projected to it
    projection: str = "pca"  # how: the top principal directions (fitted on the first rows) or a random matrix
    preset: str | None = None  # ``--for METHOD``: store only what that method reads (see store_presets)
    batch_size: int = 256
    rows_per_chunk: int = 512
    teacher_dir: str = "teachers"
    device: str = "auto"
    workers: int | None = None  # decoding processes for image files (None: from the core count)
    decode: str = "auto"  # where image files' JPEGs are decoded: cpu, cuda or auto (source.decode_device)

    def mixing(self) -> Mixing | None:
        """The views' Mixup/CutMix, None when neither is asked for."""
        mixing = Mixing(float(self.mixup), float(self.cutmix), float(self.mix_prob), float(self.mix_switch_prob))
        return mixing if mixing.enabled else None

    def augment_options(self) -> augment.AugmentOptions:
        """``--scale``, ``--ratio``, ``--hflip``, ``--vflip``, checked."""
        return augment.augment_options(self)

    def dense_settings(self, image_size: int, streamed: bool) -> DenseSettings | None:
        """A dense store's sizes and grid, None for a store of views."""
        if not self.dense:
            return None
        return DenseSettings(tuple(self.dense_sizes or (default_size(image_size, streamed),)), self.dense_grid)

    def divergent_search(self) -> DivergentSearch | None:
        """How the divergent views are searched, None without ``--divergent-views``."""
        if not self.divergent_views:
            return None
        return DivergentSearch(self.divergent_views, float(self.divergent_eps), self.divergent_steps, self.seed)

    def resolved(self) -> ExtractConfig:
        """The config with a ``--for`` preset's features and blocks filled in, every setting checked."""
        config = self
        if self.preset is not None:
            presets = store_presets()
            if self.preset not in presets:
                raise unknown_choice("--for method", self.preset, list(presets))
            preset = presets[self.preset]
            chosen = (tuple(self.features), self.blocks)
            if chosen not in ((DEFAULT_FEATURES, DEFAULT_BLOCKS), (preset.features, preset.blocks)):
                raise UserError(f"--for {self.preset} chooses the features and blocks itself; pass --for or "
                                "--features/--blocks, not both")  # fmt: skip
            config = dataclasses.replace(self, features=list(preset.features), blocks=preset.blocks)
            if self.quantize is None and self.keep_bits is None:
                config = dataclasses.replace(config, quantize=preset.quantize)
            if self.logits_topk is None and self.logits_sample is None:
                config = dataclasses.replace(config, logits_topk=preset.logits_topk,
                                             logits_sample=preset.logits_sample)  # fmt: skip
            if self.project is None:
                config = dataclasses.replace(config, project=preset.project)
        if config.dense and self.logits_sample is None and config.logits_sample is not None:
            # A preset's draws serve views only: a dense store averages logits over each crop's box, so it keeps
            # every logit unless --logits-topk chooses fewer.
            config = dataclasses.replace(config, logits_sample=None)
        if config.dense and config.preset is None and tuple(config.features) == DEFAULT_FEATURES:
            # A dense store's default: what it can derive per crop (channel-mean maps are per view).
            config = dataclasses.replace(config, features=["blocks"])
        if config.project == 0:
            config = dataclasses.replace(config, project=None)
        if config.logits_topk == 0:
            config = dataclasses.replace(config, logits_topk=None)
        if config.quantize == 0:
            config = dataclasses.replace(config, quantize=None)
        lossy_logits = config.logits_topk is not None or config.logits_sample is not None
        if lossy_logits and config.logits_temperature is None:
            config = dataclasses.replace(config, logits_temperature=DEFAULT_LOGITS_TEMPERATURE)
        if "attention" in config.features and config.attention_p is None:
            config = dataclasses.replace(config, attention_p=DEFAULT_ATTENTION_P)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.teachers:
            raise UserError("name at least one teacher (--teachers resnet,densenet)")
        if len(set(self.teachers)) != len(self.teachers):
            raise UserError(f"a teacher is named twice in {','.join(self.teachers)}")
        if self.recipe not in augment.POLICY_NAMES:
            raise unknown_choice("--recipe", self.recipe, list(augment.POLICY_NAMES))
        self.augment_options()
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or math.isnan(value):
                raise UserError(f"--{name} takes a Beta alpha >= 0 (0: no {name}), got {value!r}")
        for name in ("mix_prob", "mix_switch_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UserError(f"--{name.replace('_', '-')} is a probability in [0, 1], got {value!r}")
        check_search(self.divergent_views, self.divergent_eps, self.divergent_steps, len(self.teachers))
        if self.views < 1 and not self.identity_view:
            raise UserError("--views must be at least 1 (or 0 with --identity-view)")
        if self.grid not in (1, 2, 4):
            raise UserError(f"--grid must be 1, 2 or 4, got {self.grid}")
        unknown = set(self.features) - set(FEATURE_KINDS)
        if unknown or (not self.features and self.preset is None):
            raise UserError(f"--features takes {', '.join(FEATURE_KINDS)}, got {','.join(self.features)}")
        self._validate_attention()
        if self.batch_size < 1 or self.rows_per_chunk < 1:
            raise UserError("--batch-size and --rows-per-chunk must be at least 1")
        check_workers(self.workers)
        check_decode(self.decode)
        check_logits_options(self.logits_topk, self.logits_sample, self.logits_temperature)
        if self.dense:
            self._validate_dense()
        if self.project is not None:
            if isinstance(self.project, bool) or not isinstance(self.project, int) or self.project < 0:
                raise UserError(f"--project must be a whole number of channels, at least 1 (0: every channel), "
                                f"got {self.project!r}")  # fmt: skip
            if self.projection not in PROJECTIONS:
                raise unknown_choice("--projection", self.projection, list(PROJECTIONS))
            if "blocks" not in self.features:
                raise UserError(f"--project reduces the pooled blocks' channels; this store keeps no blocks "
                                f"(--features {','.join(self.features)}): add blocks, or leave --project "
                                "out")  # fmt: skip

    def _validate_attention(self) -> None:
        """Refuse an attention power that is not a positive number, one given without attention maps to apply it
        to, and attention maps in a dense store (they are per view, as channel-mean maps are)."""
        chosen = f"--for {self.preset}" if self.preset else f"--features {','.join(self.features)}"
        if self.attention_p is not None:
            p = self.attention_p
            if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0:
                raise UserError(f"--attention-p is the power of |A| in the stored attention maps, a number above 0 "
                                f"(the paper's default 2), got {p!r}")  # fmt: skip
            if "attention" not in self.features:
                raise UserError(f"--attention-p sets the power of the stored attention maps; {chosen} stores none: "
                                "add --features attention (or --for at), or leave --attention-p out")  # fmt: skip
        if self.dense and "attention" in self.features:
            raise UserError(f"--dense keeps logits and pooled blocks, from which any crop's are derived; {chosen} "
                            "asks for attention maps of each view, which it cannot derive: pass --features blocks "
                            "(or --for kd, meal, fitnet), or extract a store of views")  # fmt: skip

    def _validate_dense(self) -> None:
        """Refuse what a dense store cannot hold: anything but a crop and flips of the image (distill draws those
        per epoch), and per-view maps."""
        check_settings(self.dense_sizes, self.dense_grid)
        conflicts = {"--mixup/--cutmix": self.mixing() is not None,
                     f"--recipe {self.recipe}": self.recipe != "crop",
                     "--divergent-views": bool(self.divergent_views),
                     "--identity-view": self.identity_view}  # fmt: skip
        for option, conflict in conflicts.items():
            if conflict:
                raise UserError(f"--dense derives a crop's targets from the whole image's maps, so distill draws only "
                                f"crops and flips; {option} makes views a dense store cannot derive: extract a store "
                                "of views for it, or leave it out")  # fmt: skip
        if self.logits_sample is not None:
            # RoIAlign averages the stored map's logits, T log(count / K), over a crop's box: a geometric mean of
            # draws, no estimate of the teacher's softmax on the crop.
            raise UserError(f"--dense derives a crop's logits by averaging the whole image's logit map over the box; "
                            f"--logits-sample {self.logits_sample} stores counts, whose averaged logs estimate "
                            "nothing: pass --logits-topk K (or every logit) with --dense, or extract a store of "
                            "views with --logits-sample")  # fmt: skip
        if "maps" in self.features:
            chosen = f"--for {self.preset}" if self.preset else "--features maps"
            raise UserError(f"--dense keeps logits and pooled blocks, from which any crop's are derived; {chosen} "
                            "asks for channel-mean maps of each view, which it cannot derive: pass --features blocks "
                            "(or --for kd, meal, fitnet), or extract a store of views")  # fmt: skip


def fitted_to_data(config: ExtractConfig, asked: ExtractConfig, num_classes: int) -> ExtractConfig:
    """A ``--for`` preset's compact logits dropped where the data has no more classes than it keeps, or every logit
    takes no more bytes a row (every logit is then exact and about as small: 10 float16 logits are 20 bytes, the top
    10 are 44); what the user asked for is kept as asked."""
    filled = asked.logits_topk is None and asked.logits_sample is None
    chosen = chosen_encoding(config.logits_topk, config.logits_sample)
    if not filled or chosen is None:
        return config
    encoding, k = chosen
    every_logit = num_classes * np.dtype(config.dtype).itemsize
    if k >= num_classes or encoding.row_bytes(k, num_classes, config.dtype) >= every_logit:
        return dataclasses.replace(config, logits_topk=None, logits_sample=None,
                                   logits_temperature=asked.logits_temperature)  # fmt: skip
    return config


def _settings(config: ExtractConfig, dataset: ImageDataset, teachers: list[Teacher]) -> dict:
    """What must be equal for an existing store to be resumed rather than refused."""
    recorded = augment.recorded_options(asdict(config))  # ... and before --scale, --ratio, --hflip, --vflip
    for transient in ("device", "batch_size", "data_root", "download", "teacher_dir", "workers", "decode"):
        recorded.pop(transient)
    if recorded["recipe"] == "crop":  # the settings of stores extracted before --recipe existed
        recorded.pop("recipe")
    if config.mixing() is None:  # ... and before --mixup/--cutmix
        for name in MIXING_FIELDS:
            recorded.pop(name)
    if not config.divergent_views:  # ... and before --divergent-views
        for name in DIVERGENT_FIELDS:
            recorded.pop(name)
    for name in ("project", "logits_sample", "logits_temperature", "attention_p"):  # ... and before these options
        if recorded[name] is None:
            recorded.pop(name)
    if config.project is None:
        recorded.pop("projection")
    if not config.dense:  # ... and before --dense
        for name in ("dense", "dense_sizes", "dense_grid"):
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
    """This rank's share of every (view, chunk) some teacher has not done, written by a background writer."""
    for teacher in teachers:
        teacher.model = precision.prepare(teacher.model)
    done = {t.spec.key: _progress_marks(store, t.spec.key) for t in teachers}
    source = _open_source(dataset, config, device, store)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-writer") as writer:
        pending: deque[Future] = deque()
        try:
            for view in range(store.num_views):
                todo = [c for c in range(world.rank, store.n_chunks, world.size)
                        if not all(marks[view, c] for marks in done.values())]  # fmt: skip
                bar = tqdm(total=sum(_chunk_len(store, c) for c in todo), desc=f"view {view + 1}/{store.num_views}",
                           unit="img", leave=False, disable=not progress)  # fmt: skip
                params = store.view_params(view)
                view_source = source
                if view in store.divergent_views:
                    view_source = DivergentSource(source, teachers, store, search_from_json(store.attrs["views"]
                                                  ["divergent"]), store.divergent_views.index(view),
                                                  precision.channels_last)  # fmt: skip
                chunks = _chunk_outputs(view_source, teachers, params, store, todo, done, view, config, precision,
                                        bar.update, _outputs(dense, config.attention_p))  # fmt: skip
                for chunk, outputs in chunks:
                    for key, arrays in outputs.items():
                        pending.append(writer.submit(store.write_rows, key, view, chunk, arrays))
                    while len(pending) > MAX_PENDING_WRITES:
                        pending.popleft().result()
                bar.close()
        finally:
            source.close()
            # Whatever happens, chunks already handed to the writer are finished (or their error raised).
            while pending:
                pending.popleft().result()
    for teacher in teachers:
        teacher.model = teacher.model.cpu()


@torch.inference_mode()
def _chunk_outputs(source, teachers: list[Teacher], params: augment.ViewParams, store: TeacherStore, chunks: list[int],
                   done: dict[str, np.ndarray], view: int, config: ExtractConfig, precision: Precision,
                   advance: Callable[[int], object],
                   teacher_outputs=teacher_outputs) -> Iterator[tuple[int, dict[str, dict]]]:  # fmt: skip
    """Per chunk, the store arrays of every teacher that has not done it, from mini-batches of ``batch_size`` rows
    (a fixed split, so a resumed chunk is bit-equal), calling ``advance(rows)`` after each mini-batch (the bar). A
    chunk whose outputs are not finite raises a UserError before it reaches the writer, so it is never marked
    done."""

    def requests() -> Iterator[tuple[torch.Tensor, augment.ViewParams, tuple[int, slice, bool]]]:
        for chunk in chunks:
            rows = store.chunk_rows(chunk)
            for start in range(rows.start, rows.stop, config.batch_size):
                stop = min(rows.stop, start + config.batch_size)
                yield torch.arange(start, stop), params[start:stop], (chunk, rows, stop == rows.stop)

    features = tuple(config.features)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for (chunk, rows, last), pixels in source.pixels(requests()):
        for teacher in teachers:
            key = teacher.spec.key
            if not done[key][view, chunk]:
                outputs = teacher_outputs(teacher, pixels, features, precision)
                for name, value in outputs.items():
                    parts.setdefault(key, {}).setdefault(name, []).append(value.to(torch.float32).cpu())
        advance(len(pixels))
        if last:
            arrays, refused = {}, None
            for key, teacher_parts in parts.items():
                try:
                    arrays[key] = store_arrays(teacher_parts, config)
                except NonFiniteOutput as err:
                    refused = refused or err.explain(key, _view_name(store, view), rows, config, precision)
            parts = {}
            yield chunk, arrays  # the other teachers' arrays of the chunk are written before the refusal
            if refused:
                raise UserError(refused)


def _progress_marks(store: TeacherStore, teacher: str) -> np.ndarray:
    try:
        return store.progress(teacher)
    except ValueError as err:  # a progress chunk fails its checksum
        raise UserError(
            f"the store's progress marks for {teacher} are corrupt ({err}); run `meal-cache verify --repair` on it"
        ) from err


def _chunk_len(store: TeacherStore, chunk: int) -> int:
    rows = store.chunk_rows(chunk)
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
