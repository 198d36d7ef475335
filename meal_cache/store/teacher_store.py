"""A store opened: :class:`TeacherStore` reads its attributes, views and teacher outputs as values, and makes the
few writes extract makes; :func:`create_store` and :func:`open_store` give one (the layout is in
:mod:`meal_cache.store`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from meal_cache.errors import UnreadableFormat, UserError
from meal_cache.store.codecs import dequantize_rows, quantize_rows
from meal_cache.store.create import ARRAY_CONFIG, add_teacher_arrays, create_group, json_safe, store_exists
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
    is_logits_key,
    logits_key,
    progress_key,
    range_key,
    teacher_key,
    teacher_of,
    view_field,
)
from meal_cache.store.logits import LogitsEncoding, chunk_rng
from meal_cache.store.schema import DEVELOPMENT_FORMATS, FORMAT, BlockSpec, StoreLayout, TeacherSpec
from meal_cache.views.augment import Policy, Recipe, ViewParams, policy_from_json, recipe_for
from meal_cache.views.mixing import Mixing, mixing_from_json


def create_store(path: str | Path, **contents: Any) -> TeacherStore:
    """A new store at ``path`` (replacing it) holding ``contents``, opened: see
    :func:`meal_cache.store.create.create_group` for what it takes (dataset, labels, views, teachers, layout, ...)."""
    return TeacherStore(create_group(path, **contents), str(path))


def open_store(path: str | Path, mode: str = "r") -> TeacherStore:
    """Open a meal-cache store; a missing path or a foreign Zarr group is a clear error."""
    if not store_exists(path):
        raise UserError(f"store not found: '{path}'")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, ValueError, zarr.errors.ContainsArrayError) as err:
        raise UserError(f"'{path}' is not a Zarr store ({err})") from err
    found = group.attrs.get("format")
    if found in DEVELOPMENT_FORMATS:
        raise UnreadableFormat(f"'{path}' was written by a development version of meal-cache (format '{found}'), "
                               f"which this one ({FORMAT}) does not read; extract it again (--overwrite replaces "
                               "it)")  # fmt: skip
    if isinstance(found, str) and found.startswith("meal-cache/") and found != FORMAT:
        raise UnreadableFormat(f"'{path}' is a store of format '{found}', which this meal-cache ({FORMAT}) cannot "
                               "read; upgrade meal-cache or extract it again")  # fmt: skip
    if found != FORMAT:
        raise UserError(f"'{path}' is not a meal-cache store (format '{found}', want '{FORMAT}')")
    return TeacherStore(group, str(path))


class TeacherStore:
    """Read access to a store (and the few writes extract makes), with its attributes parsed."""

    def __init__(self, group: zarr.Group, location: str | None = None) -> None:
        self.group = group
        # Where the store was opened from, as the user named it (a path or a URL such as s3://bucket/feats.zarr).
        self.location = location if location is not None else str(group.store)

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

    def divergent_pixels(self, view: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 ``(N, 3, S, S)`` pixels of divergent view ``view`` (its index among :attr:`divergent_views`), or
        of the given rows only."""
        array = self.array(DIVERGENT_PIXELS)
        if rows is None:
            return torch.from_numpy(array[view])
        return torch.from_numpy(array.oindex[view, rows.numpy()])

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout.from_json(self.attrs["layout"])

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

    @property
    def n_units(self) -> int:
        """Units of work a view: what extract writes whole and marks done at once (a shard's rows where the store
        is sharded, else a chunk's), what torchrun's ranks divide and what repair redoes."""
        return math.ceil(self.n / self.layout.rows_per_unit)

    def unit_rows(self, unit: int) -> slice:
        rows = self.layout.rows_per_unit
        return slice(unit * rows, min(self.n, (unit + 1) * rows))

    def unit_chunks(self, unit: int) -> range:
        """The chunks of rows of ``unit``."""
        per_unit = self.layout.chunks_per_unit
        return range(unit * per_unit, min(self.n_chunks, (unit + 1) * per_unit))

    # ------------------------------------------------------------------ arrays
    def array(self, key: str) -> zarr.Array:
        """The array at ``key``, writing every chunk it is given: a chunk that happens to equal the fill value (a
        dead block's zeros) is stored, not left out, so verify can tell written from lost."""
        return self.group[key].with_config(ARRAY_CONFIG)

    def labels(self) -> np.ndarray:
        return self.group[LABELS][:]

    @property
    def policy(self) -> Policy | None:
        """The views' policy (``extract --policy``), None for crop-only views."""
        return policy_from_json(self.attrs["views"].get("policy"))

    @property
    def mixing(self) -> Mixing | None:
        """The views' Mixup/CutMix settings (``extract --mixup/--cutmix``), None for unmixed views."""
        return mixing_from_json(self.attrs["views"].get("mixing"))

    @property
    def view_keys(self) -> list[str]:
        """The arrays that define the views' pixels."""
        present = [key for key in (*OPS_KEYS, *MIX_KEYS, VIEW_VFLIP) if key in self.group]
        return [VIEW_CROP, VIEW_FLIP, *present]

    def view_params(self, view: int) -> ViewParams:
        """View ``view`` of every row (its partners, when mixed, found in itself)."""
        crop = torch.from_numpy(self.group[VIEW_CROP][view])
        flip = torch.from_numpy(self.group[VIEW_FLIP][view])
        params = ViewParams(crop, flip)
        if OPS_KEYS[0] in self.group:
            ops, magnitude = (torch.from_numpy(self.group[key][view]) for key in OPS_KEYS)
            params = ViewParams(crop, flip, ops, magnitude, self.policy.space)
        if MIX_KEYS[0] in self.group:
            mixed = {view_field(key): torch.from_numpy(self.group[key][view]) for key in MIX_KEYS}
            params = dataclasses.replace(params, **mixed)
        if VIEW_VFLIP in self.group:
            params = dataclasses.replace(params, vflip=torch.from_numpy(self.group[VIEW_VFLIP][view]))
        return params

    @property
    def view_recipe(self) -> Recipe:
        """How the views were drawn (what ``distill --fresh-views`` draws): the data's recipe as the store's
        ``views.augmentation`` record changes it (``--scale``, ``--ratio``, ``--hflip``, ``--vflip``); stores
        without the record were drawn with the recipe's own values."""
        base = recipe_for(self.dataset["recipe"], int(self.dataset["image_size"]))
        return base.recorded(self.attrs["views"].get("augmentation"))

    def source_sizes(self) -> torch.Tensor | None:
        """Each row's source (H, W) when the store was extracted from image files, else None."""
        if SOURCE_SIZE not in self.group:
            return None
        return torch.from_numpy(self.group[SOURCE_SIZE][:])

    def logits(self, teacher: str, view: int) -> np.ndarray:
        """A teacher's logits of a view's rows, ``(N, C)``; a dense store's are its logit maps' means, the teacher's
        logits of the whole image (exactly, for a classifier after global average pooling)."""
        return self._whole_logits(logits_key(teacher), view)

    def _whole_logits(self, key: str, view: int, rows: slice = slice(None)) -> np.ndarray:
        logits = self.read(key, view, rows)
        return logits if logits.ndim == 2 else logits.astype(np.float32).mean(1).astype(logits.dtype)

    @property
    def dense(self) -> bool:
        """Whether this is a dense store (``extract --dense``): targets of any crop derived from whole-image maps."""
        return self.layout.dense is not None

    def positions(self, teacher: str) -> tuple[int, ...]:
        """The logits' position axes of a row: ``(h w,)`` in a dense store, none in a store of views."""
        dense_map = self.teacher(teacher).get("dense_map")
        return () if dense_map is None else (math.prod(dense_map),)

    def dask_array(self, key: str):
        """A lazy dask array of ``key`` as :meth:`read` gives it, chunk by chunk (top-k logits rebuilt per chunk; a
        dense store's logits as the whole image's, :meth:`logits`)."""
        import dask
        import dask.array as da

        dense_logits = is_logits_key(key) and self.dense
        if self._encoding(key) is None and not dense_logits:
            return da.from_zarr(self.group[key])
        read = self._whole_logits if dense_logits else self.read
        dtype = np.dtype(self.layout.dtype)
        views = []
        for view in range(self.num_views):
            chunks = []
            for chunk in range(self.n_chunks):
                rows = self.chunk_rows(chunk)
                shape = (rows.stop - rows.start, self.num_classes())
                chunks.append(da.from_delayed(dask.delayed(read)(key, view, rows), shape=shape, dtype=dtype))
            views.append(da.concatenate(chunks))
        return da.stack(views)

    def num_classes(self) -> int:
        return int(self.dataset["num_classes"])

    def logical_shape(self, key: str) -> tuple[int, ...]:
        """The shape of an array as :meth:`read` gives it (top-k and sampled logits are rebuilt dense)."""
        if self._encoding(key) is not None:
            return (self.num_views, self.n, *self.positions(teacher_of(key)), self.num_classes())
        return tuple(self.group[key].shape)

    def _encoding(self, key: str) -> LogitsEncoding | None:
        """How ``key`` is kept when it is logits stored top-k or sampled, else None."""
        return self.layout.logits_encoding if is_logits_key(key) else None

    def feature(self, teacher: str, kind: str, block: str, view: int) -> np.ndarray:
        return self.read(feature_key(teacher, kind, block), view)

    def read(self, key: str, view: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows of one view of a teacher array as values (8-bit codes decoded with their ranges, top-k and
        sampled logits rebuilt dense: see :mod:`meal_cache.store.encodings`)."""
        encoding = self._encoding(key)
        if encoding is not None:
            parts = {part: self.group[array][view, rows] for (part, _, _), array in
                     zip(encoding.parts, encoding.keys(key), strict=True)}  # fmt: skip
            # Rows (and a dense store's positions) are decoded as one list of rows.
            lead = parts[encoding.parts[0][0]].shape[:-1]
            flat = {part: value.reshape(-1, *value.shape[len(lead) :]) for part, value in parts.items()}
            dense = encoding.decode(flat, self.num_classes(), self.layout.dtype, self.layout.temperature)
            return dense.reshape(*lead, self.num_classes())
        values = self.group[key][view, rows]
        if self.layout.quantize is not None and is_feature_key(key):
            return dequantize_rows(values, self.group[range_key(key)][view, rows], self.layout.dtype)
        return values

    def read_stored(self, key: str, view: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Rows of one view of a teacher array as stored, which :meth:`decode_stored` turns into :meth:`read`'s
        values: compact logits as their encoding's parts, 8-bit features as ``codes`` and ``ranges``, anything
        else as ``values``. Kept so in memory, a view costs its stored bytes, not classes x rows of floats."""
        encoding = self._encoding(key)
        if encoding is not None:
            return {part: self.group[array][view, rows] for (part, _, _), array in
                    zip(encoding.parts, encoding.keys(key), strict=True)}  # fmt: skip
        if self.layout.quantize is not None and is_feature_key(key):
            return {"codes": self.group[key][view, rows], "ranges": self.group[range_key(key)][view, rows]}
        return {"values": self.group[key][view, rows]}

    def decode_stored(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`read`'s values of any rows from their :meth:`read_stored` parts as tensors, on the parts'
        device, computed as :meth:`read` computes them (an encoding without a tensor decoder decodes on the CPU)."""
        if "values" in parts:
            return parts["values"]
        dtype = getattr(torch, self.layout.dtype)
        if "codes" in parts:
            codes, ranges = parts["codes"], parts["ranges"]
            shape = (len(codes),) + (1,) * (codes.dim() - 1)
            low, step = ranges[:, 0].reshape(shape), ranges[:, 1].reshape(shape)
            return (low + codes.float() * step).to(dtype)
        encoding = self._encoding(key)
        lead = parts[encoding.parts[0][0]].shape[:-1]  # rows, and a dense store's positions
        flat = {part: value.reshape(-1, *value.shape[len(lead) :]) for part, value in parts.items()}
        classes, temperature = self.num_classes(), self.layout.temperature
        if encoding.decode_tensors is not None:
            dense = encoding.decode_tensors(flat, classes, dtype, temperature)
        else:
            numpy_parts = {part: value.cpu().numpy() for part, value in flat.items()}
            decoded = encoding.decode(numpy_parts, classes, self.layout.dtype, temperature)
            dense = torch.from_numpy(decoded).to(next(iter(parts.values())).device)
        return dense.reshape(*lead, classes)

    def stored_row_bytes(self, keys: list[str]) -> int:
        """Bytes one row of one view of ``keys`` takes as stored (:meth:`read_stored`), before compression."""
        total = 0
        for array in self.with_companions(keys):
            shape = self.group[array].shape
            total += math.prod(shape[2:]) * self.group[array].dtype.itemsize
        return total

    def value_itemsize(self, key: str) -> int:
        """Bytes per value as :meth:`read` returns it."""
        if (self.layout.quantize is not None and is_feature_key(key)) or self._encoding(key) is not None:
            return np.dtype(self.layout.dtype).itemsize
        return self.group[key].dtype.itemsize

    def with_companions(self, keys: list[str]) -> list[str]:
        """The arrays that hold ``keys``: the keys themselves and the ranges of quantised features, or for top-k
        and sampled logits their arrays."""
        quantized, encoding = self.layout.quantize is not None, self.layout.logits_encoding
        out = []
        for key in keys:
            if encoding is not None and is_logits_key(key):
                out += encoding.keys(key)
            else:
                out += [key, range_key(key)] if quantized and is_feature_key(key) else [key]
        return out

    def progress(self, teacher: str) -> np.ndarray:
        return self.group[progress_key(teacher)][:]

    def feature_keys(self, teacher: str) -> list[str]:
        """Every data array of a teacher, relative to the store root."""
        keys = [logits_key(teacher)]
        for kind in self.layout.features:
            keys += [feature_key(teacher, kind, b.key) for b in self.blocks(teacher)]
        return keys

    # ------------------------------------------------------------------ writes (extract)
    def write_rows(self, teacher: str, view: int, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one unit's rows (:meth:`unit_rows`) of every array of a teacher (quantised where the layout says),
        each array in one write, so a sharded store's shard object is written whole, never read, merged and written
        back; then mark the unit done."""
        rows, layout = self.unit_rows(unit), self.layout
        for key, values in arrays.items():
            full = teacher_key(teacher, key)
            encoding = self._encoding(full)
            if encoding is not None:
                for array_key, encoded in self._encoded_parts(full, teacher, view, unit, values):
                    self.array(array_key)[view, rows] = encoded
                continue
            if layout.quantize is not None and is_feature_key(full):
                values, ranges = quantize_rows(values)
                self.array(range_key(full))[view, rows] = ranges
            self.array(full)[view, rows] = values
        self.array(progress_key(teacher))[view, unit] = True

    def _encoded_parts(self, key: str, teacher: str, view: int, unit: int,
                       values: np.ndarray) -> list[tuple[str, np.ndarray]]:  # fmt: skip
        """A unit's rows of logits ``values`` in the store's compact encoding: (array, its values) per part. The
        draws are made chunk by chunk of rows, each with its own generator, so a sharded store holds the draws an
        unsharded one does."""
        layout, encoding = self.layout, self._encoding(key)
        seed, start = int(self.attrs["views"]["seed"]), self.unit_rows(unit).start
        pieces: dict[str, list[np.ndarray]] = {part: [] for part, _, _ in encoding.parts}
        for chunk in self.unit_chunks(unit):
            rows = self.chunk_rows(chunk)
            chunk_values = values[rows.start - start : rows.stop - start]
            lead = chunk_values.shape[:-1]  # rows, and a dense store's positions: encoded as one list of rows
            rng = chunk_rng(seed, teacher, view, chunk)
            encoded = encoding.encode(chunk_values.reshape(-1, chunk_values.shape[-1]), layout.logits_k,
                                      layout.dtype, layout.temperature, rng)  # fmt: skip
            for part, _, per_slot in encoding.parts:
                pieces[part].append(encoded[part].reshape((*lead, -1) if per_slot else lead))
        return [(array_key, np.concatenate(pieces[part]))
                for (part, _, _), array_key in zip(encoding.parts, encoding.keys(key), strict=True)]  # fmt: skip

    def add_teachers(self, teachers: list[TeacherSpec], settings: dict) -> None:
        """Grow the store by ``teachers`` (their arrays unwritten), recording the extract ``settings`` that include
        them; the store is incomplete until their chunks are written. Nothing already stored changes."""
        add_teacher_arrays(self.group, teachers, self.layout, self.num_views, self.n)
        recorded = {**self.attrs["teachers"], **{t.key: t.to_json() for t in teachers}}
        self.set_attrs(teachers=json_safe(recorded), settings=json_safe(settings), complete=False)

    def add_views(self, views: list[ViewParams], settings: dict, views_info: dict) -> None:
        """Grow the store by ``views`` after its last (their parameters written, every teacher's outputs of them
        unwritten), recording the extract ``settings`` and ``views_info`` that include them; incomplete until their
        chunks are written. Nothing already stored changes: a store of augmented views only, so no view moves."""
        start, count = self.num_views, self.num_views + len(views)
        outputs = [key for teacher in self.teacher_names for key in self.with_companions(self.feature_keys(teacher))]
        for key in [*self.view_keys, *outputs, *(progress_key(t) for t in self.teacher_names)]:
            array = self.group[key]
            array.resize((count, *array.shape[1:]))
        for offset, params in enumerate(views):
            for key in self.view_keys:
                self.array(key)[start + offset] = getattr(params, view_field(key)).numpy()
        self.set_attrs(views=views_info, settings=settings, complete=False)

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(json_safe(values))

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
