"""The teacher cache: a Zarr (v3) store, its format, and everything that reads, writes, checks and describes one.

The store's format is ``meal-cache/2``, ``meal-cache/3`` when its views carry a policy's ops, ``meal-cache/4``
when they mix rows (Mixup, CutMix), up to ``meal-cache/7`` when they flip rows vertically (:mod:`.schema` says which
feature needs which); ``meal-cache/1`` stores, which cannot hold top-k logits, are read as they are.

Layout (``V`` views, ``N`` rows of one dataset split, ``C`` classes)::

    attrs    format, version, dataset{...describe(), split, n, fingerprint}, views{count, augmented, identity,
             recipe, seed[, augmentation]}, teachers{NAME: {source, arch, checkpoint_sha256, classes, input,
             blocks[...], accuracy[per view]}}, layout{rows_per_chunk, dtype, codec, grid, features}, settings, complete
    labels                         (N,)               int64
    views/crop                     (V, N, 4)          int16   y0, x0, h, w
    views/flip                     (V, N)             bool
    views/vflip                    (V, N)             bool    with --vflip above 0 only (format /7): mirrored top
                                                               to bottom (attrs views.augmentation)
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
    teachers/NAME/logits_topk/lse  (V, N)             float32  log-sum-exp of all C logits / T (layout's
                                                               logits_temperature T, 1 when absent)
                                   or, with --logits-sample K (format /6), instead:
    teachers/NAME/logits_sample/index (V, N, K')      int16    K' = min(K, C) distinct classes drawn, most first
    teachers/NAME/logits_sample/count (V, N, K')      uint8    how often each was drawn (summing to K)
    teachers/NAME/blocks/B         (V, N, C_B, g, g)  float16  block output average-pooled to a g x g grid
    teachers/NAME/maps/B           (V, N, H_B, W_B)   float16  channel mean of the block output (MEAL's form)
    teachers/NAME/attention/B      (V, N, H_B, W_B)   float16  channel mean of |A|^p, AT's (layout attention_p;
                                                               format /9)
    teachers/NAME/ranges/KIND/B    (V, N, 2)          float32  with --quantize 8 only: each row's (low, step), the
                                                               blocks/maps/attention arrays then holding uint8 codes
    teachers/NAME/progress         (V, N_chunks)      bool     set only after that chunk's arrays are written

Chunks are ``(1, rows_per_chunk, ...)``; every write covers whole chunks, so no two writers share one, and the
progress array has one chunk per element for the same reason. Every chunk carries a CRC-32C checksum (the Zarr
v3 ``crc32c`` codec, after compression) and is written even when it holds only the fill value, so a corrupt
chunk fails to decode and a lost one is missing from the store: :func:`verify_store` finds both. Metadata is
JSON; nothing is pickled. ``path`` may be a local directory or an fsspec URL (``memory://``, ``s3://``, ...).

The modules, each importing only those listed before it:

- :mod:`.keys`           the arrays' names, built and split in one place (imports nothing)
- :mod:`.logits`         logits in a few numbers a row: top-k and sampled classes, encoded and read back dense
- :mod:`.schema`         what a store records: formats, teachers' and blocks' specs, the layout of their outputs
- :mod:`.codecs`         compressors, bit rounding, 8-bit quantisation
- :mod:`.create`         a new store's location, arrays and attributes
- :mod:`.teacher_store`  :class:`TeacherStore` (reads, the writes extract makes), :func:`create_store`,
  :func:`open_store`
- :mod:`.verify`         verify (every due chunk exists and passes its checksum) and repair
- :mod:`.describe`       ``meal-cache info``'s text summary of a store

Beyond them the package imports numpy, zarr, torch (dask, tqdm, fsspec and botocore inside the functions that use
them), :mod:`meal_cache.errors`, and :mod:`meal_cache.views.augment` and :mod:`meal_cache.views.mixing` for the
views' parameters; never nets, extract, distill, engine, pipeline or cli, which build on it. Its modules import
each other by their own names, never through this package, which re-exports their public names lazily: ``from
meal_cache.store import TeacherStore`` loads :mod:`.teacher_store` (and what it imports) and nothing else.
"""

from __future__ import annotations

import importlib

# Each module's names that ``meal_cache.store`` offers (tests/test_import_graph.py reads this table too).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "keys": (
        "DIVERGENT_PIXELS", "FEATURE_KINDS", "LABELS", "LOGITS", "MIX_KEYS", "OPS_KEYS", "PROGRESS", "SOURCE_SIZE",
        "TEACHERS", "VIEW_CROP", "VIEW_FLIP", "VIEW_VFLIP", "feature_key", "feature_name", "is_feature_key",
        "is_logits_key", "is_teacher_key", "logits_key", "progress_key", "range_key", "split_teacher_key",
        "teacher_key", "teacher_of", "view_field",
    ),
    "logits": ("LOGITS_ENCODINGS", "LogitsEncoding", "decode_topk", "encode_topk", "sample_rng"),
    "schema": (
        "DENSE_FORMAT", "DIVERGENT_FORMAT", "DTYPES", "FORMAT", "LOGITS_FORMAT", "MIX_FORMAT", "OPS_FORMAT",
        "READABLE_FORMATS", "VERSION", "VFLIP_FORMAT", "BlockSpec", "StoreLayout", "TeacherSpec", "format_of",
    ),
    "codecs": ("QUANTIZE_BITS", "dequantize_rows", "lossy_filters", "parse_codec", "quantize_rows"),
    "create": ("ARRAY_CONFIG", "create_group", "is_url", "json_safe", "remove_store", "store_exists"),
    "teacher_store": ("TeacherStore", "create_store", "open_store"),
    "verify": ("VERIFY_CHUNKS_AT_ONCE", "ChunkProblem", "VerifyReport", "repair_store", "verify_store"),
    "describe": ("describe_store",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
