"""The teacher cache: a Zarr (v3) store, its format, and everything that reads, writes, checks and describes one.

Every store is written in one format, ``meal-cache/11``, the format of the 0.x line (docs/store-format.md, which
also says what each array means); the development formats before it (/1 to /10) are refused with one fix: extract
the store again.

The layout, array by array, and what a writer promises about chunks, checksums and metadata: docs/store-format.md.

The modules, each importing only those listed before it:

- :mod:`.keys`           the arrays' names, built and split in one place (imports nothing)
- :mod:`.encodings`      the compact encodings of the logits, one module each (top-k, sampled classes), encoded
  and read back dense (imports nothing of the store)
- :mod:`.logits`         which encoding a store keeps its logits in (``--logits NAME:K``), found by name, checked
- :mod:`.schema`         what a store records: formats, teachers' and blocks' specs, the layout of their outputs
- :mod:`.codecs`         compressors, bit rounding, 8-bit quantisation
- :mod:`.create`         a new store's location, arrays and attributes
- :mod:`.teacher_store`  :class:`TeacherStore` (reads, the writes extract makes), :func:`create_store`,
  :func:`open_store`
- :mod:`.verify`         verify (every due chunk exists and passes its checksum) and repair
- :mod:`.describe`       ``meal-cache info``'s text summary of a store
- :mod:`.growth`         stores that grow by teachers or views: what may grow, and a store read as it was before

Beyond them the package imports numpy, zarr, torch (dask, tqdm, fsspec and botocore inside the functions that use
them), :mod:`meal_cache.errors`, :mod:`meal_cache.registry` (the lazy re-exports), :mod:`meal_cache.remote` (stores
at fsspec URLs), and :mod:`meal_cache.views.augment` and :mod:`meal_cache.views.mixing` for the
views' parameters; never nets, extract, distill, engine, pipeline or cli, which build on it. Its modules import
each other by their own names, never through this package, which re-exports their public names lazily: ``from
meal_cache.store import TeacherStore`` loads :mod:`.teacher_store` (and what it imports) and nothing else.
"""

from __future__ import annotations

from meal_cache.registry import lazy_exports

# Each module's names that ``meal_cache.store`` offers (tests/test_import_graph.py reads this table too).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "keys": (
        "DIVERGENT_PIXELS", "FEATURE_KINDS", "LABELS", "LOGITS", "MIX_KEYS", "OPS_KEYS", "PROGRESS", "SOURCE_SIZE",
        "TEACHERS", "VIEW_CROP", "VIEW_FLIP", "VIEW_VFLIP", "feature_key", "feature_name", "is_feature_key",
        "is_logits_key", "is_teacher_key", "logits_key", "progress_key", "range_key", "split_teacher_key",
        "teacher_key", "teacher_of", "view_field",
    ),
    "encodings": ("DEFAULT_LOGITS_TEMPERATURE", "LogitsEncoding"),
    "logits": ("EVERY_LOGIT", "LogitsChoice", "check_logits_choice", "chunk_rng", "logits_encodings", "parse_logits"),
    "schema": (
        "DEVELOPMENT_FORMATS", "DTYPES", "FORMAT", "BlockSpec", "StoreLayout", "TeacherSpec",
    ),
    "codecs": ("QUANTIZE_BITS", "dequantize_rows", "lossy_filters", "parse_codec", "quantize_rows"),
    "create": ("ARRAY_CONFIG", "create_group", "json_safe", "remove_store", "store_exists"),
    "teacher_store": ("TeacherStore", "create_store", "open_store"),
    "verify": ("VERIFY_CHUNKS_AT_ONCE", "ChunkProblem", "VerifyReport", "repair_store", "verify_store"),
    "describe": ("describe_store",),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
