"""A Hugging Face dataset kept offline, ``hf:LOCATION``: a ``save_to_disk`` folder (a DatasetDict with ``train``
and ``validation``, ``val`` or ``test``) or parquet files as the hub lays them out (``LOCATION/data/train-*.parquet``
and ``validation-*``/``test-*``), read with ``datasets`` (nothing downloads), streamed at full resolution as image
folders are.

The image column is the one whose feature is an ``Image``, the label column the ``ClassLabel`` one, whose names
are the classes. The image column is read as bytes (``Image(decode=False)``) and decoded by the image files'
decoder, so the same JPEG gives the same pixels as in a folder. ``datasets`` keeps parquet files as an Arrow
cache (under ``HF_DATASETS_CACHE``, made once), which is what gives each row random access. Parquet files in
object storage (``hf:s3://bucket/imagenet``) are first copied into that cache, once; the dataset's fingerprint is
the same as of the same files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meal_cache.data.encoded import EncodedSplit
from meal_cache.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STREAM_IMAGE_SIZE,
    DatasetSource,
    LoadOptions,
    RawDataset,
)
from meal_cache.data.source import first_line
from meal_cache.errors import UserError
from meal_cache.remote import check_bucket, filesystem_of, is_url, object_storage_errors
from meal_cache.views import augment

HELD_OUT_SPLITS = ("validation", "val", "test")


@dataclass(frozen=True)
class TableReader:
    """Every row of a dataset's splits, one table after the other (``starts``: each table's first index)."""

    location: str
    tables: tuple
    column: str
    starts: np.ndarray
    files: tuple[tuple[str, int], ...]
    names: np.ndarray
    lengths: np.ndarray
    kind: str = "hf"

    def read(self, index: int, limit: int | None = None) -> bytes:
        table = int(np.searchsorted(self.starts, index, side="right")) - 1
        value = self.tables[table][int(index - self.starts[table])][self.column]
        data = value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()
        return data if limit is None else data[:limit]

    def identity(self) -> bytes:
        return json.dumps(self.files).encode()

    def remedy(self) -> str:
        return "replace that row's image in the dataset (its fingerprint then changes: extract again)"


def _datasets_module():
    """``datasets``, kept from the network (it reads HF_DATASETS_OFFLINE when imported) and quiet (its progress
    bars would come between a refusal and the one line that says it)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _parquet_files(root: Path) -> dict[str, list[Path]]:
    found = sorted((root / "data").glob("*.parquet"))
    by_split: dict[str, list[Path]] = {}
    for name in ("train", *HELD_OUT_SPLITS):
        files = [f for f in found if f.name.startswith(f"{name}-") or f.name == f"{name}.parquet"]
        if files:
            by_split[name] = files
    return by_split


def _fetched_from_object_storage(location: str) -> Path:
    """Hub-style parquet files at an fsspec URL (``s3://bucket/imagenet``: ``data/train-*.parquet`` and the held-out
    split's), copied once into a folder of datasets' cache, as datasets copies every parquet file it reads into an
    Arrow file there: a row's random access needs a local file. A file is fetched again when its size changes; each
    arrives under a temporary name and is renamed whole, so a killed fetch or two ranks fetching at once leave no
    half file."""
    filesystem, root = filesystem_of(location)
    with object_storage_errors(location):
        check_bucket(filesystem, root, location)
        filesystem.invalidate_cache()  # fsspec keeps listings per process: a file replaced since must be seen
        found = sorted(filesystem.glob(f"{root.rstrip('/')}/data/*.parquet"))
        if not found:
            raise UserError(f"hf '{location}': no parquet files under data/ (data/train-*.parquet, "
                            "data/validation-*.parquet); save_to_disk folders are read from a local disk "
                            "only")  # fmt: skip
        sizes = {path: int(filesystem.info(path)["size"]) for path in found}
        listed = sorted((Path(path).name, size) for path, size in sizes.items())
        digest = hashlib.sha256(json.dumps([location, listed]).encode()).hexdigest()[:16]
        folder = Path(_datasets_module().config.HF_DATASETS_CACHE) / "meal-cache-object-storage" / digest
        (folder / "data").mkdir(parents=True, exist_ok=True)
        for path, size in sizes.items():
            target = folder / "data" / Path(path).name
            if target.is_file() and target.stat().st_size == size:
                continue
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            filesystem.get_file(path, str(partial))
            os.replace(partial, target)
    return folder


def _open_splits(location: str) -> tuple[dict, dict[str, list[tuple[str, int]]], dict[str, list[tuple[str, int]]]]:
    """Each split's Dataset, its files (name, bytes) and, per file, (name, rows) for naming rows."""
    root = _fetched_from_object_storage(location) if is_url(location) else Path(location)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "folder does not exist"
        raise UserError(f"hf '{location}': {problem}")
    datasets = _datasets_module()
    parquet = _parquet_files(root)
    if parquet:
        import pyarrow.parquet as pq

        try:
            parts = {k: [(f"data/{f.name}", pq.read_metadata(f).num_rows) for f in v] for k, v in parquet.items()}
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"hf '{location}': a parquet file cannot be read ({first_line(err)})") from err
        for split, counts in parts.items():
            if not sum(rows for _, rows in counts):  # datasets refuses such a split with a message about itself
                raise UserError(f"hf '{location}': the {split} split has no rows")
        try:
            loaded = datasets.load_dataset("parquet", data_files={k: [str(f) for f in v] for k, v in parquet.items()})
        except Exception as err:  # datasets and pyarrow raise many kinds for a file that is not parquet
            raise UserError(f"hf '{location}': its parquet files cannot be read ({type(err).__name__}: "
                            f"{first_line(err)})") from err  # fmt: skip
        files = {k: [(f"data/{f.name}", f.stat().st_size) for f in v] for k, v in parquet.items()}
        return dict(loaded), files, parts
    if not (root / "dataset_dict.json").is_file():
        raise UserError(f"hf '{location}' is neither a save_to_disk folder (dataset_dict.json) nor parquet files "
                        "under data/ (data/train-*.parquet, data/validation-*.parquet)")  # fmt: skip
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises many kinds for a damaged folder (IndexError for an empty one)
        raise UserError(f"hf '{location}': datasets cannot load it ({type(err).__name__}: {first_line(err)})") from err
    files, parts = {}, {}
    for split, dataset in loaded.items():
        arrows = [Path(c["filename"]) for c in dataset.cache_files]
        files[split] = [(f"{split}/{a.name}", a.stat().st_size) for a in arrows]
        parts[split] = [(split, len(dataset))]
    return dict(loaded), files, parts


def _column_of(dataset, feature_type, what: str, location: str, split: str) -> str:
    columns = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if not columns:
        listed = ", ".join(f"{n} ({type(f).__name__})" for n, f in dataset.features.items())
        raise UserError(f"hf '{location}': the {split} split has no {what} column (a {feature_type.__name__} "
                        f"feature); its columns are {listed}")  # fmt: skip
    return columns[0]


def _row_names(dataset, column: str, parts: list[tuple[str, int]]) -> tuple[list[bytes], np.ndarray]:
    """Each row's stable name (its file and row there, with its image's format as a suffix) and its bytes' length."""
    import pyarrow.compute as pc

    images = dataset.data.column(column)
    lengths = pc.binary_length(pc.struct_field(images, "bytes")).to_numpy(zero_copy_only=False)
    paths = pc.struct_field(images, "path").to_pylist()
    names = []
    for part, count in parts:
        for row in range(count):
            suffix = Path(paths[len(names)] or "").suffix.lower() or ".img"
            names.append(os.fsencode(f"{part}/{row}{suffix}"))
    return names, np.nan_to_num(lengths.astype(np.float64), nan=-1).astype(np.int64)


def _load_hf(arg: str | None, options: LoadOptions) -> RawDataset:
    """The train split and the held-out one, streamed at --image-size (default 224)."""
    datasets = _datasets_module()
    loaded, files, parts = _open_splits(arg)
    held_out = next((name for name in HELD_OUT_SPLITS if name in loaded), None)
    if "train" not in loaded or held_out is None:
        raise UserError(f"hf '{arg}' needs a train split and a validation (or val, test) split; it has "
                        f"{', '.join(loaded) or 'none'}")  # fmt: skip
    tables, names, lengths, labels, starts = [], [], [], [], []
    classes: tuple[str, ...] = ()
    image_column = ""
    for split in ("train", held_out):
        dataset = loaded[split]
        if len(dataset) == 0:
            raise UserError(f"hf '{arg}': the {split} split has no rows")
        image_column = _column_of(dataset, datasets.Image, "image", arg, split)
        label_column = _column_of(dataset, datasets.ClassLabel, "label", arg, split)
        if split == "train":
            classes = tuple(dataset.features[label_column].names)
        split_names, split_lengths = _row_names(dataset, image_column, parts[split])
        starts.append(len(names))
        names += split_names
        lengths.append(split_lengths)
        labels.append(np.array(dataset.data.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64))
        tables.append(dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False)))
    file_list = tuple((name, size) for split in ("train", held_out) for name, size in files[split])
    reader = TableReader(str(arg), tuple(tables), image_column, np.asarray(starts, dtype=np.int64), file_list,
                         np.array(names, dtype=bytes), np.concatenate(lengths))  # fmt: skip
    size = options.image_size or STREAM_IMAGE_SIZE
    train_rows = np.arange(starts[1], dtype=np.int64)
    test_rows = np.arange(starts[1], len(names), dtype=np.int64)
    train, test = (EncodedSplit(reader, rows, torch.from_numpy(split_labels), size)
                   for rows, split_labels in ((train_rows, labels[0]), (test_rows, labels[1])))  # fmt: skip
    return RawDataset(train, test, classes, augment.FULL_RECIPE, IMAGENET_MEAN, IMAGENET_STD)


SOURCES = (
    DatasetSource(
        "hf",
        _load_hf,
        True,
        "hf:FOLDER, a Hugging Face save_to_disk folder or hub-style parquet (data/train-*.parquet, also at an "
        "s3:// URL), streamed",
    ),
)
