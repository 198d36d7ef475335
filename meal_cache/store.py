"""The teacher cache: a Zarr (v3) store in format ``meal-cache/2``, ``meal-cache/3`` when its views carry a
policy's ops, ``meal-cache/4`` when they mix rows (Mixup, CutMix); ``meal-cache/1`` stores, which cannot hold
top-k logits, are read as they are.

Layout (``V`` views, ``N`` rows of one dataset split, ``C`` classes)::

    attrs    format, version, dataset{...describe(), split, n, fingerprint}, views{count, augmented, identity,
             recipe, seed}, teachers{NAME: {source, arch, checkpoint_sha256, classes, input, blocks[...],
             accuracy[per view]}}, layout{rows_per_chunk, dtype, codec, grid, features}, settings, complete
    labels                         (N,)               int64
    views/crop                     (V, N, 4)          int16   y0, x0, h, w
    views/flip                     (V, N)             bool
    views/ops                      (V, N, K)          int8    with a policy only (format /3): each row's K ops as
                                                               indices into augment.OP_NAMES, -1 none
    views/magnitude                (V, N, K)          int8    their signed magnitude bins (attrs views.policy)
    views/mix_partner              (V, N)             int32   with mixing only (format /4): the row mixed in
    views/mix_lambda               (V, N)             float32 the row's own share (1: not mixed)
    views/mix_box                  (V, N, 4)          int16   y0, x0, h, w of the partner's patch (CutMix), in
                                                               output pixels; all zero for a blend (Mixup)
    divergent/pixels               (K, N, 3, S, S)    uint8   with --divergent-views only (format /5): the stored
                                                               pixels of the K divergent views, which are the
                                                               store's last K views (attrs views.divergent)
    views/source_size              (N, 2)             int32   H, W of each source image (image files only: the
                                                               boxes are in each image's own coordinates)
    teachers/NAME/logits           (V, N, C)          float16  or, with --logits-topk K, instead:
    teachers/NAME/logits_topk/index (V, N, K)         int16    the K largest logits' classes, largest first
    teachers/NAME/logits_topk/value (V, N, K)         float16  their logits
    teachers/NAME/logits_topk/lse  (V, N)             float32  log-sum-exp of all C logits (see read_topk)
    teachers/NAME/blocks/B         (V, N, C_B, g, g)  float16  block output average-pooled to a g x g grid
    teachers/NAME/maps/B           (V, N, H_B, W_B)   float16  channel mean of the block output (MEAL's form)
    teachers/NAME/ranges/KIND/B    (V, N, 2)          float32  with --quantize 8 only: each row's (low, step), the
                                                               blocks/maps arrays then holding uint8 codes
    teachers/NAME/progress         (V, N_chunks)      bool     set only after that chunk's arrays are written

Chunks are ``(1, rows_per_chunk, ...)``; every write covers whole chunks, so no two writers share one, and the
progress array has one chunk per element for the same reason. Every chunk carries a CRC-32C checksum (the Zarr
v3 ``crc32c`` codec, after compression) and is written even when it holds only the fill value, so a corrupt
chunk fails to decode and a lost one is missing from the store: :func:`verify_store` finds both. Metadata is
JSON; nothing is pickled. ``path`` may be a local directory or an fsspec URL (``memory://``, ``s3://``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from meal_cache.augment import Mixing, Policy, ViewParams, mixing_from_json, policy_from_json
from meal_cache.errors import UserError

# zarr warns, each time such an array is opened, that numcodecs' codecs (BitRound, for --keep-bits) are outside
# the Zarr v3 specification; meal-cache documents that and installs numcodecs, so the warning says nothing new.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT = "meal-cache/2"
# A store whose views carry a policy's ops (extract --recipe randaugment|trivialaugment): a /2 reader would
# replay its views without the ops, so such a store says /3 and /2 readers refuse it. Crop-only stores stay /2.
OPS_FORMAT = "meal-cache/3"
# A store whose views mix rows (extract --mixup/--cutmix): /2 and /3 readers would replay unmixed pixels.
MIX_FORMAT = "meal-cache/4"
# A store with divergent views (extract --divergent-views): their pixels are stored, not replayed, so a /4 reader
# would take them for views to render from their (identity) crops.
DIVERGENT_FORMAT = "meal-cache/5"
# Formats this version reads: /2 added top-k logits (a layout /1 readers would not know), /3 views' ops, /4 mixing,
# /5 divergent views.
READABLE_FORMATS = ("meal-cache/1", FORMAT, OPS_FORMAT, MIX_FORMAT, DIVERGENT_FORMAT)
OPS_KEYS = ("views/ops", "views/magnitude")
MIX_KEYS = ("views/mix_partner", "views/mix_lambda", "views/mix_box")
DIVERGENT_PIXELS = "divergent/pixels"
VERSION = 1
FEATURE_KINDS = ("blocks", "maps")
DTYPES = ("float16", "float32")
# Every array is created with it: all chunks written, so a missing chunk means a lost one.
ARRAY_CONFIG = {"write_empty_chunks": True}


def is_url(path: str | Path) -> bool:
    """An fsspec URL (``memory://``, ``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(path)


def _filesystem(url: str | Path):
    """The fsspec filesystem of a URL; a protocol whose package is missing or unknown is a user error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as err:
        raise UserError(f"'{url}' needs a package that is not installed ({err}); for s3:// install "
                        "'meal-cache[s3]'") from err  # fmt: skip
    except ValueError as err:
        raise UserError(f"'{url}': {err} (fsspec URLs such as memory://, s3://, gs://)") from err


def store_exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    filesystem, root = _filesystem(path)
    return bool(filesystem.exists(root))


def remove_store(path: str | Path) -> None:
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    filesystem, root = _filesystem(path)
    if filesystem.exists(root):
        filesystem.rm(root, recursive=True)


def parse_codec(spec: str) -> list:
    """``zstd`` / ``zstd:LEVEL``, ``blosc`` / ``blosc:LEVEL`` (zstd inside, byte shuffle), or ``none``; the
    CRC-32C checksum always comes last."""
    name, _, level = spec.partition(":")
    try:
        level_value = int(level) if level else 3
    except ValueError as err:
        raise UserError(f"codec level must be a number, got '{spec}'") from err
    if name == "zstd":
        return [ZstdCodec(level=level_value), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=min(level_value, 9), shuffle="shuffle"), Crc32cCodec()]
    if name == "none":
        return [Crc32cCodec()]
    raise UserError(f"unknown codec '{spec}'; choose zstd[:LEVEL], blosc[:LEVEL] or none")


def lossy_filters(layout: StoreLayout) -> list:
    """Bit rounding (numcodecs' BitRound): zeroes the low mantissa bits so the compressor finds runs. Readers
    need numcodecs, which meal-cache installs; the values read back are the rounded ones."""
    if layout.keep_bits is None:
        return []
    mantissa = {"float16": 10, "float32": 23}[layout.dtype]
    if not 1 <= layout.keep_bits <= mantissa:
        raise UserError(f"--keep-bits must be between 1 and {mantissa} for {layout.dtype}, got {layout.keep_bits}")
    from zarr.codecs.numcodecs import BitRound

    return [BitRound(keepbits=layout.keep_bits)]


@dataclass(frozen=True)
class BlockSpec:
    """One teacher block as stored: its module name, array key, channels, pooled grid and map size."""

    name: str
    channels: int
    grid: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return self.name

    def to_json(self) -> dict:
        return {"name": self.name, "channels": self.channels, "grid": self.grid, "map": [self.height, self.width]}

    @classmethod
    def from_json(cls, data: dict) -> BlockSpec:
        return cls(data["name"], int(data["channels"]), int(data["grid"]), *map(int, data["map"]))


@dataclass(frozen=True)
class TeacherSpec:
    """What the store records about one teacher; ``key`` names its group under ``teachers/``."""

    key: str
    source: str
    arch: str
    checkpoint_sha256: str | None
    classes: list[str]
    input: dict
    blocks: list[BlockSpec]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "arch": self.arch,
            "checkpoint_sha256": self.checkpoint_sha256,
            "classes": list(self.classes),
            "input": self.input,
            "blocks": [b.to_json() for b in self.blocks],
        }


@dataclass(frozen=True)
class StoreLayout:
    rows_per_chunk: int
    dtype: str
    codec: str
    features: tuple[str, ...]
    keep_bits: int | None = None  # lossy: mantissa bits kept by bit rounding (None: lossless)
    quantize: int | None = None  # lossy: blocks and maps as 8-bit codes with a per-row range (None: as dtype)
    logits_topk: int | None = None  # lossy: the K largest logits and the log-sum-exp (None: every logit)

    def to_json(self) -> dict:
        return {"rows_per_chunk": self.rows_per_chunk, "dtype": self.dtype, "codec": self.codec,
                "features": list(self.features), "keep_bits": self.keep_bits, "quantize": self.quantize,
                "logits_topk": self.logits_topk}  # fmt: skip


QUANTIZE_BITS = (8,)


def is_feature_key(key: str) -> bool:
    """``teachers/NAME/blocks/B`` or ``teachers/NAME/maps/B`` (not logits, progress or ranges)."""
    parts = key.split("/")
    return len(parts) >= 4 and parts[0] == "teachers" and parts[2] in FEATURE_KINDS


def range_key(key: str) -> str:
    """Where a quantised feature array keeps its rows' ranges."""
    _, teacher, rest = key.split("/", 2)
    return f"teachers/{teacher}/ranges/{rest}"


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes of each row (its own minimum to maximum in 255 steps) and the rows' (low, step)."""
    flat = values.reshape(len(values), -1).astype(np.float32)
    low = flat.min(1)
    step = (flat.max(1) - low) / 255.0
    safe = np.where(step > 0, step, 1.0)
    codes = np.rint((flat - low[:, None]) / safe[:, None]).clip(0, 255).astype(np.uint8)
    return codes.reshape(values.shape), np.stack([low, step], 1).astype(np.float32)


TOPK_PARTS = ("index", "value", "lse")


def is_logits_key(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "teachers" and parts[2] == "logits"


def topk_keys(key: str) -> list[str]:
    """The arrays that hold ``teachers/NAME/logits`` in a top-k store."""
    return [f"{key}_topk/{part}" for part in TOPK_PARTS]


def encode_topk(logits: np.ndarray, k: int, dtype: str) -> dict[str, np.ndarray]:
    """Each row's ``k`` largest logits (classes as int16, largest first; values as ``dtype``) and the log-sum-exp
    of all its logits (float32, computed from the ``dtype`` values so the rebuilt probabilities match them)."""
    values = logits.astype(dtype)
    order = np.argsort(-values.astype(np.float32), axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(values, order, axis=1)
    wide = values.astype(np.float64)
    peak = wide.max(1, keepdims=True)
    lse = (peak[:, 0] + np.log(np.exp(wide - peak).sum(1))).astype(np.float32)
    return {"index": order.astype(np.int16), "value": top, "lse": lse}


def decode_topk(index: np.ndarray, value: np.ndarray, lse: np.ndarray, classes: int, dtype: str) -> np.ndarray:
    """Dense logits whose softmax gives each stored class its own probability, ``exp(value - lse)``, and spreads
    the remaining mass evenly over the other ``classes - k`` classes (the rule of FKD's and TinyViT's top-k soft
    labels); the log-sum-exp makes the stored classes' probabilities exact at temperature 1. With k = classes
    nothing is spread and the logits are the stored ones up to a constant."""
    rows, k = index.shape
    top = value.astype(np.float64)
    norm = lse.astype(np.float64)[:, None]
    kept = np.exp(top - norm).sum(1)
    dense = np.empty((rows, classes), dtype=np.float64)
    if classes > k:
        # At least a millionth of the mass each, so a rounded-off remainder never becomes log(0).
        rest = np.clip(1.0 - kept, 1e-6 * (classes - k), None) / (classes - k)
        dense[:] = (norm[:, 0] + np.log(rest))[:, None]
    np.put_along_axis(dense, index.astype(np.int64), top, axis=1)
    return dense.astype(dtype)


def dequantize_rows(codes: np.ndarray, ranges: np.ndarray, dtype: str) -> np.ndarray:
    """The values ``quantize_rows`` encoded, to within half a step."""
    shape = (len(codes),) + (1,) * (codes.ndim - 1)
    low, step = ranges[:, 0].reshape(shape), ranges[:, 1].reshape(shape)
    return (low + codes.astype(np.float32) * step).astype(dtype)


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so attributes compare equal to what a reader gets back."""
    return json.loads(json.dumps(value))


def _format_of(view: ViewParams, divergent: bool = False) -> str:
    """The oldest format whose readers replay ``view`` right (and know divergent views)."""
    if divergent:
        return DIVERGENT_FORMAT
    if view.mix_partner is not None:
        return MIX_FORMAT
    return FORMAT if view.ops is None else OPS_FORMAT


def create_store(
    path: str | Path,
    *,
    dataset: dict,
    labels: torch.Tensor,
    views: list[ViewParams],
    views_info: dict,
    teachers: list[TeacherSpec],
    layout: StoreLayout,
    settings: dict,
    source_sizes: torch.Tensor | None = None,
    divergent_pixels: tuple[int, ...] | None = None,
) -> TeacherStore:
    """Create every array and attribute of a new store (replacing ``path``), with labels and views written.

    A local store is built beside ``path`` and renamed into place, so a process killed while creating it leaves
    no half-made store behind, only a ``.creating`` folder the next attempt removes."""
    if layout.dtype not in DTYPES:
        raise UserError(f"unknown dtype '{layout.dtype}'; choose one of: {', '.join(DTYPES)}")
    compressors = parse_codec(layout.codec)
    if layout.quantize is not None and layout.quantize not in QUANTIZE_BITS:
        raise UserError(f"--quantize takes {', '.join(map(str, QUANTIZE_BITS))}, got {layout.quantize}")
    if layout.quantize is not None and layout.keep_bits is not None:
        raise UserError("--quantize and --keep-bits are two lossy encodings; choose one")
    k = layout.logits_topk
    if k is not None and k < 1:
        raise UserError(f"--logits-topk must be at least 1, got {k}")
    for teacher in teachers:
        if k is not None and k > len(teacher.classes):
            raise UserError(f"--logits-topk {k} is more than teacher {teacher.key}'s {len(teacher.classes)} classes")
    # Teacher outputs only: labels, views and progress stay exact.
    filters = lossy_filters(layout)
    n = int(labels.shape[0])
    rows = layout.rows_per_chunk
    target = path
    if not is_url(path):
        path = Path(path)
        path = path.with_name(f".{path.name}.creating")
        remove_store(path)
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update(
        _json_safe(
            {
                "format": _format_of(views[0], divergent_pixels is not None),
                "version": VERSION,
                "dataset": dataset,
                "views": views_info,
                "teachers": {t.key: t.to_json() for t in teachers},
                "layout": layout.to_json(),
                "settings": settings,
                "complete": False,
            }
        )
    )
    exact = {"compressors": compressors, "config": ARRAY_CONFIG}
    group.create_array("labels", shape=(n,), chunks=(max(n, 1),), dtype="int64", **exact)[:] = labels.numpy()
    count = len(views)
    crop = group.create_array("views/crop", shape=(count, n, 4), chunks=(1, rows, 4), dtype="int16", **exact)
    flip = group.create_array("views/flip", shape=(count, n), chunks=(1, rows), dtype="bool", **exact)
    crop[:] = torch.stack([v.crop for v in views]).numpy()
    flip[:] = torch.stack([v.flip for v in views]).numpy()
    if views[0].ops is not None:
        k = views[0].ops.shape[1]
        for key, name in zip(OPS_KEYS, ("ops", "magnitude"), strict=True):
            group.create_array(key, shape=(count, n, k), chunks=(1, rows, k), dtype="int8",
                               **exact)[:] = torch.stack([getattr(v, name) for v in views]).numpy()  # fmt: skip
    if views[0].mix_partner is not None:
        for key, dtype in zip(MIX_KEYS, ("int32", "float32", "int16"), strict=True):
            values = torch.stack([getattr(v, key.split("/")[1]) for v in views]).numpy()
            group.create_array(key, shape=values.shape, chunks=(1, rows, *values.shape[2:]), dtype=dtype,
                               **exact)[:] = values  # fmt: skip
    if divergent_pixels is not None:  # (K, N, 3, S, S), written by extract as it finds them
        group.create_array(DIVERGENT_PIXELS, shape=divergent_pixels, chunks=(1, rows, *divergent_pixels[2:]),
                           dtype="uint8", fill_value=0, **exact)  # fmt: skip
    if source_sizes is not None:
        group.create_array("views/source_size", shape=(n, 2), chunks=(rows, 2), dtype="int32",
                           **exact)[:] = source_sizes.numpy()  # fmt: skip
    n_chunks = math.ceil(n / rows)

    def output_array(key: str, shape: tuple[int, ...]) -> None:
        if layout.quantize is not None and is_feature_key(key):
            group.create_array(key, shape=shape, chunks=(1, rows, *shape[2:]), dtype="uint8", fill_value=0, **exact)
            group.create_array(range_key(key), shape=(count, n, 2), chunks=(1, rows, 2), dtype="float32",
                               fill_value=0, **exact)  # fmt: skip
            return
        group.create_array(key, shape=shape, chunks=(1, rows, *shape[2:]), dtype=layout.dtype, filters=filters,
                           fill_value=0, **exact)  # fmt: skip

    for teacher in teachers:
        base = f"teachers/{teacher.key}"
        k = layout.logits_topk
        if k is None:
            output_array(f"{base}/logits", (count, n, len(teacher.classes)))
        else:
            index, value, lse = topk_keys(f"{base}/logits")
            for key, dtype in ((index, "int16"), (value, layout.dtype)):
                group.create_array(key, shape=(count, n, k), chunks=(1, rows, k), dtype=dtype, fill_value=0,
                                   **exact)  # fmt: skip
            group.create_array(lse, shape=(count, n), chunks=(1, rows), dtype="float32", fill_value=0, **exact)
        for block in teacher.blocks:
            if "blocks" in layout.features:
                output_array(f"{base}/blocks/{block.key}", (count, n, block.channels, block.grid, block.grid))
            if "maps" in layout.features:
                output_array(f"{base}/maps/{block.key}", (count, n, block.height, block.width))
        group.create_array(f"{base}/progress", shape=(count, n_chunks), chunks=(1, 1), dtype="bool",
                           fill_value=False, **exact)  # fmt: skip
    if str(target) != str(path):
        remove_store(target)
        Path(path).rename(target)
        group = zarr.open_group(str(target), mode="r+")
    return TeacherStore(group)


def open_store(path: str | Path, mode: str = "r") -> TeacherStore:
    """Open a meal-cache store; a missing path or a foreign Zarr group is a clear error."""
    if not store_exists(path):
        raise UserError(f"store not found: '{path}'")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, ValueError, zarr.errors.ContainsArrayError) as err:
        raise UserError(f"'{path}' is not a Zarr store ({err})") from err
    found = group.attrs.get("format")
    if isinstance(found, str) and found.startswith("meal-cache/") and found not in READABLE_FORMATS:
        raise UserError(f"'{path}' is a store of format '{found}', which this meal-cache ({FORMAT}) cannot read; "
                        "upgrade meal-cache or extract it again")  # fmt: skip
    if found not in READABLE_FORMATS:
        raise UserError(f"'{path}' is not a meal-cache store (format '{found}', want '{FORMAT}')")
    return TeacherStore(group)


class TeacherStore:
    """Read access to a store (and the few writes extract makes), with its attributes parsed."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    # ------------------------------------------------------------------ attributes
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    @property
    def dataset(self) -> dict:
        return self.attrs["dataset"]

    @property
    def n(self) -> int:
        return int(self.dataset["n"])

    @property
    def num_views(self) -> int:
        return int(self.attrs["views"]["count"])

    @property
    def augmented_views(self) -> list[int]:
        """Indices of the augmented views, the ones distill cycles through (the identity view excluded)."""
        return list(range(int(self.attrs["views"]["augmented"])))

    @property
    def identity_view(self) -> int | None:
        info = self.attrs["views"]
        return int(info["augmented"]) if info.get("identity") else None

    @property
    def divergent_views(self) -> list[int]:
        """Indices of the divergent views (``extract --divergent-views``), after the augmented and identity ones;
        their pixels are ``divergent/pixels[k]`` for the k-th of them."""
        info = self.attrs["views"].get("divergent")
        if not info:
            return []
        first = int(self.attrs["views"]["augmented"]) + bool(self.attrs["views"]["identity"])
        return list(range(first, first + int(info["views"])))

    @property
    def layout(self) -> StoreLayout:
        data = self.attrs["layout"]
        return StoreLayout(int(data["rows_per_chunk"]), data["dtype"], data["codec"], tuple(data["features"]),
                           data.get("keep_bits"), data.get("quantize"), data.get("logits_topk"))  # fmt: skip

    @property
    def teacher_names(self) -> list[str]:
        return list(self.attrs["teachers"])

    def teacher(self, name: str) -> dict:
        teachers = self.attrs["teachers"]
        if name not in teachers:
            raise UserError(f"store has no teacher '{name}'; it has {', '.join(teachers)}")
        return teachers[name]

    def blocks(self, teacher: str) -> list[BlockSpec]:
        return [BlockSpec.from_json(b) for b in self.teacher(teacher)["blocks"]]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.layout.rows_per_chunk)

    def chunk_rows(self, chunk: int) -> slice:
        rows = self.layout.rows_per_chunk
        return slice(chunk * rows, min(self.n, (chunk + 1) * rows))

    # ------------------------------------------------------------------ arrays
    def array(self, key: str) -> zarr.Array:
        return self.group[key]

    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    @property
    def policy(self) -> Policy | None:
        """The views' policy (``extract --recipe``), None for crop-only views."""
        return policy_from_json(self.attrs["views"].get("policy"))

    @property
    def mixing(self) -> Mixing | None:
        """The views' Mixup/CutMix settings (``extract --mixup/--cutmix``), None for unmixed views."""
        return mixing_from_json(self.attrs["views"].get("mixing"))

    @property
    def view_keys(self) -> list[str]:
        """The arrays that define the views' pixels."""
        present = [key for key in (*OPS_KEYS, *MIX_KEYS) if key in self.group]
        return ["views/crop", "views/flip", *present]

    def view_params(self, view: int) -> ViewParams:
        """View ``view`` of every row (its partners, when mixed, found in itself)."""
        crop = torch.from_numpy(self.group["views/crop"][view])
        flip = torch.from_numpy(self.group["views/flip"][view])
        params = ViewParams(crop, flip)
        if OPS_KEYS[0] in self.group:
            ops, magnitude = (torch.from_numpy(self.group[key][view]) for key in OPS_KEYS)
            params = ViewParams(crop, flip, ops, magnitude, self.policy.space)
        if MIX_KEYS[0] in self.group:
            mixed = {key.split("/")[1]: torch.from_numpy(self.group[key][view]) for key in MIX_KEYS}
            params = dataclasses.replace(params, **mixed)
        return params

    def source_sizes(self) -> torch.Tensor | None:
        """Each row's source (H, W) when the store was extracted from image files, else None."""
        if "views/source_size" not in self.group:
            return None
        return torch.from_numpy(self.group["views/source_size"][:])

    def logits(self, teacher: str, view: int) -> np.ndarray:
        return self.read(f"teachers/{teacher}/logits", view)

    def dask_array(self, key: str):
        """A lazy dask array of ``key`` as :meth:`read` gives it, chunk by chunk (top-k logits rebuilt per chunk)."""
        import dask
        import dask.array as da

        if not (self.layout.logits_topk is not None and is_logits_key(key)):
            return da.from_zarr(self.group[key])
        dtype = np.dtype(self.layout.dtype)
        views = []
        for view in range(self.num_views):
            chunks = []
            for chunk in range(self.n_chunks):
                rows = self.chunk_rows(chunk)
                shape = (rows.stop - rows.start, self.num_classes())
                chunks.append(da.from_delayed(dask.delayed(self.read)(key, view, rows), shape=shape, dtype=dtype))
            views.append(da.concatenate(chunks))
        return da.stack(views)

    def num_classes(self) -> int:
        return int(self.dataset["num_classes"])

    def logical_shape(self, key: str) -> tuple[int, ...]:
        """The shape of an array as :meth:`read` gives it (a top-k store's logits are rebuilt dense)."""
        if self.layout.logits_topk is not None and is_logits_key(key):
            return (self.num_views, self.n, self.num_classes())
        return tuple(self.group[key].shape)

    def feature(self, teacher: str, kind: str, block: str, view: int) -> np.ndarray:
        return self.read(f"teachers/{teacher}/{kind}/{block}", view)

    def read(self, key: str, view: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows of one view of a teacher array as values (8-bit codes decoded with their ranges, top-k logits
        rebuilt dense by :func:`decode_topk`)."""
        if self.layout.logits_topk is not None and is_logits_key(key):
            index, value, lse = (self.group[part][view, rows] for part in topk_keys(key))
            return decode_topk(index, value, lse, self.num_classes(), self.layout.dtype)
        values = self.group[key][view, rows]
        if self.layout.quantize is not None and is_feature_key(key):
            return dequantize_rows(values, self.group[range_key(key)][view, rows], self.layout.dtype)
        return values

    def value_itemsize(self, key: str) -> int:
        """Bytes per value as :meth:`read` returns it."""
        if (self.layout.quantize is not None and is_feature_key(key)) or (
            self.layout.logits_topk is not None and is_logits_key(key)
        ):
            return np.dtype(self.layout.dtype).itemsize
        return self.group[key].dtype.itemsize

    def with_companions(self, keys: list[str]) -> list[str]:
        """The arrays that hold ``keys``: the keys themselves and the ranges of quantised features, or for top-k
        logits their three arrays."""
        quantized, topk = self.layout.quantize is not None, self.layout.logits_topk is not None
        out = []
        for key in keys:
            if topk and is_logits_key(key):
                out += topk_keys(key)
            else:
                out += [key, range_key(key)] if quantized and is_feature_key(key) else [key]
        return out

    def progress(self, teacher: str) -> np.ndarray:
        return self.group[f"teachers/{teacher}/progress"][:]

    def feature_keys(self, teacher: str) -> list[str]:
        """Every data array of a teacher, relative to the store root."""
        keys = [f"teachers/{teacher}/logits"]
        for kind in self.layout.features:
            keys += [f"teachers/{teacher}/{kind}/{b.key}" for b in self.blocks(teacher)]
        return keys

    # ------------------------------------------------------------------ writes (extract)
    def write_rows(self, teacher: str, view: int, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one chunk's rows of every array of a teacher (quantised where the layout says), then mark the
        chunk done."""
        rows = self.chunk_rows(chunk)
        for key, values in arrays.items():
            full = f"teachers/{teacher}/{key}"
            if self.layout.logits_topk is not None and is_logits_key(full):
                encoded = encode_topk(values, self.layout.logits_topk, self.layout.dtype)
                for part, array_key in zip(TOPK_PARTS, topk_keys(full), strict=True):
                    self.group[array_key][view, rows] = encoded[part]
                continue
            if self.layout.quantize is not None and is_feature_key(full):
                values, ranges = quantize_rows(values)
                self.group[range_key(full)][view, rows] = ranges
            self.group[full][view, rows] = values
        self.group[f"teachers/{teacher}/progress"][view, chunk] = True

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(_json_safe(values))

    # ------------------------------------------------------------------ checks and sizes
    def check_matches(self, dataset_description: dict, split: str) -> None:
        """Refuse a store built from other rows, classes or image size than ``dataset_description``."""
        recorded = self.dataset
        problems = []
        if recorded["split"] != split:
            problems.append(f"it caches the {recorded['split']} split, not {split}")
        if recorded["fingerprint"] != dataset_description["fingerprint"][split]:
            problems.append("its dataset fingerprint differs (other images or labels)")
        if recorded["num_classes"] != dataset_description["num_classes"]:
            problems.append(f"it has {recorded['num_classes']} classes, the data {dataset_description['num_classes']}")
        if recorded["image_size"] != dataset_description["image_size"]:
            problems.append(
                f"its images are {recorded['image_size']} px, the data's {dataset_description['image_size']}"
            )
        if problems:
            raise UserError(
                f"store was built from {recorded['spec']} and does not match this data: " + "; ".join(problems)
            )
        if not self.complete:
            raise UserError("store is incomplete (an extract was interrupted); run the same extract again to finish it")

    def stored_bytes(self, key: str) -> int:
        return int(self.group[key].nbytes_stored())

    def sizes(self) -> dict[str, dict[str, int]]:
        """Per teacher and array: stored (compressed) bytes and raw bytes at float32."""
        out: dict[str, dict[str, int]] = {}
        for teacher in self.teacher_names:
            for key in self.feature_keys(teacher):
                companions = self.with_companions([key])
                out[key] = {
                    "stored": sum(self.stored_bytes(k) for k in companions),
                    "raw_float32": int(np.prod(self.logical_shape(key))) * 4,
                    "raw": sum(int(self.group[k].nbytes) for k in companions),
                }
        return out


# ---------------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that should hold data and does not: ``missing`` (lost) or ``corrupt`` (fails its checksum)."""

    array: str
    chunk: tuple[int, ...]
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.array} chunk ({', '.join(map(str, self.chunk))})"
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
    """Chunk indices present in the store (one listing, no reads)."""
    store, prefix = array.store_path.store, f"{array.store_path.path}/c/"

    async def listing() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    found = set()
    for key in sync(listing()):
        parts = key[len(prefix) :].split("/")
        if all(part.isdigit() for part in parts):  # not an interrupted atomic write's temporary file
            found.add(tuple(int(part) for part in parts))
    return found


def _chunk_grid(array: zarr.Array) -> Iterator[tuple[int, ...]]:
    import itertools

    counts = [math.ceil(size / chunk) for size, chunk in zip(array.shape, array.chunks, strict=True)]
    return itertools.product(*(range(count) for count in counts))


# Chunks decoded together by verify: bounds its memory whatever the size of a view.
VERIFY_CHUNKS_AT_ONCE = 16


def _decode_problems(array: zarr.Array, key: str, chunks: list[tuple[int, ...]]) -> list[ChunkProblem]:
    """Decode ``chunks`` (sharing their first index) a few at a time, one by one only where that fails."""
    if array.ndim == 1:
        groups = [chunks]
    else:
        ordered = sorted(chunks)
        groups = [ordered[i : i + VERIFY_CHUNKS_AT_ONCE] for i in range(0, len(ordered), VERIFY_CHUNKS_AT_ONCE)]
    problems = []
    for group in groups:
        try:
            if array.ndim == 1:
                array[:]
            else:
                rows = slice(group[0][1], group[-1][1] + 1)
                array.get_block_selection((group[0][0], rows))
            continue
        except Exception:  # noqa: BLE001 - some chunk of the group does not decode: find which, below
            pass
        for coords in group:
            try:
                array.get_block_selection(coords)
            except Exception as err:  # noqa: BLE001
                problems.append(ChunkProblem(key, coords, "corrupt", str(err).split(".")[0]))
    return problems


def verify_store(store: TeacherStore, keys: list[str] | None = None, progress: bool = False) -> VerifyReport:
    """Check that every chunk that should hold data exists and decodes (its CRC-32C matches).

    Labels and views are written at creation, so all their chunks must exist; a teacher's output chunk must
    exist once its progress mark is set. ``keys`` limits the check to some arrays (distill checks those it
    reads)."""
    from tqdm.auto import tqdm

    report = VerifyReport()
    done: dict[str, np.ndarray] = {}
    for teacher in store.teacher_names:
        key = f"teachers/{teacher}/progress"
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
        done[teacher] = marks
    all_keys = ["labels", *store.view_keys]
    for teacher in store.teacher_names:
        all_keys += store.with_companions(store.feature_keys(teacher))
    if DIVERGENT_PIXELS in store.group:
        all_keys.append(DIVERGENT_PIXELS)
    for key in tqdm(keys if keys is not None else all_keys, desc="verify", unit="array", disable=not progress):
        array = store.group[key]
        stored = _stored_chunks(array)
        if key.startswith("teachers/"):
            marks = done[key.split("/")[1]]
            expected = [c for c in _chunk_grid(array) if marks[c[0], c[1]]]
            report.chunks_pending += int((~marks).sum())
        elif key == DIVERGENT_PIXELS:  # a divergent view's pixel chunk is written before any teacher marks it
            views = store.divergent_views
            marked = [np.logical_or.reduce([done[t][views[c[0]], c[1]] for t in done]) for c in _chunk_grid(array)]
            expected = [c for c, m in zip(_chunk_grid(array), marked, strict=True) if m]
        else:
            expected = list(_chunk_grid(array))
        present = [c for c in expected if c in stored]
        report.problems += [ChunkProblem(key, c, "missing") for c in expected if c not in stored]
        by_first: dict[int, list[tuple[int, ...]]] = {}
        for coords in present:
            by_first.setdefault(coords[0], []).append(coords)
        for chunks in by_first.values():
            report.problems += _decode_problems(array, key, chunks)
        report.chunks_checked += len(present)
    return report


def repair_store(store: TeacherStore, report: VerifyReport) -> int:
    """Clear the progress marks of damaged teacher chunks (and the store's ``complete`` flag) so the same
    extract command re-extracts exactly those; returns how many (teacher, view, chunk) units will be redone."""
    fixed_at_creation = [p for p in report.problems if not p.array.startswith(("teachers/", DIVERGENT_PIXELS))]
    if fixed_at_creation:
        raise UserError(f"{fixed_at_creation[0]}: labels and views are written when the store is created and "
                        "cannot be re-extracted; extract it again with --overwrite")  # fmt: skip
    redo = {(p.array.split("/")[1], p.chunk[0], p.chunk[1]) for p in report.problems if p.array != DIVERGENT_PIXELS}
    # A damaged divergent pixel chunk: every teacher redoes that (view, chunk), which searches its pixels again.
    redo |= {(t, store.divergent_views[p.chunk[0]], p.chunk[1]) for p in report.problems
             if p.array == DIVERGENT_PIXELS for t in store.teacher_names}  # fmt: skip
    for teacher, view, chunk in sorted(redo):
        store.group[f"teachers/{teacher}/progress"][view, chunk] = False
    if redo:
        store.set_attrs(complete=False)
    return len(redo)


def _array_label(store: TeacherStore, key: str, teacher: str) -> str:
    label = key.removeprefix(f"teachers/{teacher}/")
    k = store.layout.logits_topk
    return f"{label} (top {k}, read back dense)" if k is not None and is_logits_key(key) else label


def _lossy_description(layout: StoreLayout) -> str:
    lossy = []
    if layout.keep_bits is not None:
        lossy.append(f"{layout.keep_bits} mantissa bits kept")
    if layout.quantize is not None:
        lossy.append(f"blocks and maps as {layout.quantize}-bit codes")
    if layout.logits_topk is not None:
        lossy.append(f"the top {layout.logits_topk} logits")
    return "lossy: " + ", ".join(lossy) if lossy else "lossless"


def _mixing_description(mixing: dict | None) -> str:
    if not mixing:
        return ""
    kinds = [f"{kind} {mixing[kind]:g}" for kind in ("mixup", "cutmix") if mixing[kind] > 0]
    switch = f", switch {mixing['switch_prob']:g}" if len(kinds) == 2 else ""
    return f" + {' / '.join(kinds)} (p {mixing['prob']:g}{switch})"


def describe_store(store: TeacherStore) -> str:
    """A readable summary: dataset, views, and per teacher its accuracy, blocks, shapes and stored bytes."""
    attrs = store.attrs
    data, views, layout = attrs["dataset"], attrs["views"], store.layout
    lines = [
        f"store     {store.group.store}  ({'complete' if store.complete else 'INCOMPLETE: run the extract again'})",
        f"dataset   {data['spec']} [{data['split']}]  {data['n']} rows, {data['num_classes']} classes, "
        f"{data['image_size']} px, fingerprint {data['fingerprint'][:12]}",
        f"views     {views['augmented']} augmented ({views['recipe']}"
        + (f" + {views['policy']['name']}" if views.get("policy") else "")
        + _mixing_description(views.get("mixing"))
        + f", seed {views['seed']})"
        + (" + identity" if views["identity"] else "")
        + (f" + {views['divergent']['views']} divergent (eps {views['divergent']['eps']:g}, "
           f"{views['divergent']['steps']} steps)" if views.get("divergent") else ""),
        f"layout    {layout.dtype}, codec {layout.codec}, {layout.rows_per_chunk} rows a chunk, "
        f"features {', '.join(layout.features) or 'none (logits only)'}, {_lossy_description(layout)}",
        "",
    ]
    sizes = store.sizes()
    total_stored = total_raw32 = 0
    for key in store.teacher_names:
        teacher = store.teacher(key)
        accuracy = teacher.get("accuracy")
        if accuracy:
            augmented = accuracy[: views["augmented"]] or accuracy[:1]
            acc_text = f"top-1 {np.mean(augmented):.2f}% on augmented views"
            if views["identity"]:
                acc_text += f", {accuracy[store.identity_view]:.2f}% on the identity view"
            if store.divergent_views:
                divergent = [accuracy[v] for v in store.divergent_views]
                acc_text += f", {np.mean(divergent):.2f}% on divergent views"
        else:
            acc_text = "accuracy not yet recorded"
        done = store.progress(key)
        lines.append(f"teacher {key}  ({teacher['arch']}, from {teacher['source']})  {acc_text}  "
                     f"[{int(done.sum())}/{done.size} chunks]")  # fmt: skip
        lines.append(f"  {'array':40s} {'shape':>22s} {'stored':>10s} {'vs f32':>7s}")
        for array_key in store.feature_keys(key):
            size = sizes[array_key]
            total_stored += size["stored"]
            total_raw32 += size["raw_float32"]
            shape = "x".join(str(s) for s in store.logical_shape(array_key))
            ratio = size["raw_float32"] / max(1, size["stored"])
            lines.append(
                f"  {_array_label(store, array_key, key):40s} {shape:>22s} {_human(size['stored']):>10s} {ratio:6.1f}x"
            )
        lines.append("")
    per_row = total_stored / max(1, store.n * store.num_views)
    lines.append(
        f"total     {_human(total_stored)} stored, {_human(total_raw32)} as float32 "
        f"({total_raw32 / max(1, total_stored):.1f}x smaller); {per_row:.0f} bytes per sample per view"
    )
    if DIVERGENT_PIXELS in store.group:  # beside the teachers' outputs: the divergent views' own pixels
        pixels = store.group[DIVERGENT_PIXELS]
        lines.append(f"divergent pixels {_human(store.stored_bytes(DIVERGENT_PIXELS))} stored "
                     f"({'x'.join(map(str, pixels.shape))} uint8, {_human(pixels.nbytes)} raw)")  # fmt: skip
    return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
