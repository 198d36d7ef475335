"""WebDataset tar shards, ``wds:LOCATION``: a folder of ``.tar`` shards or a brace pattern
(``/d/imagenet-{train-{0000..1023},val-{0000..0063}}.tar``), split by shard name (``train-*``; ``val-*``,
``validation-*`` or ``test-*``), streamed at full resolution as image folders are.

A sample is the members that share a key, as webdataset groups them (its ``base_plus_ext``): the image under
``jpg``, ``jpeg``, ``png`` or ``webp``, the class under ``cls`` (an integer as text) or else ``json``'s field
``label``. Class names come from ``classes.txt`` (one a line) or ``_info.json``'s ``classes`` beside the shards,
else they are ``"0"`` .. ``"C-1"``, C one more than the largest label.

Random access: the index records each sample's image member as (shard, byte offset, length), read once per load
from the shards' tar headers; a worker reads a row by seeking there. webdataset 1.0.2 iterates shards only as a
stream (and its ``wids`` random-access reader is not part of it), so the headers are read with Python's
``tarfile`` in seekable mode, which skips over the members' data; nothing here parses tar itself.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

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
    local_path,
)
from meal_cache.errors import UserError
from meal_cache.remote import check_bucket, filesystem_of, is_url, object_storage_errors
from meal_cache.views import augment

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
LABEL_SUFFIXES = ("cls", "json")
TRAIN_PREFIXES = ("train",)
HELD_OUT_PREFIXES = ("val", "validation", "test")


@dataclass(frozen=True)
class ShardReader:
    """Every sample of a set of shards: its shard, its image member's offset and length."""

    location: str
    shards: tuple[str, ...]
    shard_bytes: tuple[int, ...]
    shard_of: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    names: np.ndarray
    kind: str = "wds"

    def read(self, index: int, limit: int | None = None) -> bytes:
        length = int(self.lengths[index]) if limit is None else min(limit, int(self.lengths[index]))
        shard, start = self.shards[int(self.shard_of[index])], int(self.offsets[index])
        if is_url(shard):  # one ranged GET
            filesystem, path = filesystem_of(shard)
            with object_storage_errors(shard):
                return filesystem.cat_file(path, start=start, end=start + length)
        with open(shard, "rb") as file:
            file.seek(start)
            return file.read(length)

    def identity(self) -> bytes:
        return json.dumps([[os.path.basename(s), n] for s, n in zip(self.shards, self.shard_bytes, strict=True)])\
            .encode()  # fmt: skip

    def remedy(self) -> str:
        return "replace that sample in its shard (the dataset's fingerprint then changes: extract again)"


@dataclass(frozen=True)
class _Place:
    """Where the shards are: a local folder or an fsspec URL's filesystem (``s3://bucket/imagenet-wds``)."""

    filesystem: Any
    url: bool

    def full(self, path: str) -> str:
        """``path`` as the reader names it: a URL keeps its protocol."""
        return self.filesystem.unstrip_protocol(path) if self.url else path


def _place(location: str) -> tuple[_Place, str]:
    if not is_url(location):
        from fsspec.implementations.local import LocalFileSystem

        return _Place(LocalFileSystem(), False), str(local_path("wds", location))
    filesystem, root = filesystem_of(location)
    with object_storage_errors(location):
        check_bucket(filesystem, root.split("{")[0], location)
    return _Place(filesystem, True), root


def _shard_paths(location: str) -> tuple[_Place, list[str]]:
    """The shards a folder holds (``*.tar``), or a brace pattern's, every one of which must exist."""
    place, root = _place(location)
    filesystem = place.filesystem
    with object_storage_errors(location):
        if "{" in location:
            from webdataset.shardlists import expand_urls

            paths = list(expand_urls(root))
            missing = [p for p in paths if not filesystem.isfile(p)]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise UserError(f"wds '{location}': shard '{place.full(missing[0])}'{more} does not exist")
            return place, paths
        if not filesystem.exists(root):
            raise UserError(f"wds '{location}': folder does not exist")
        if filesystem.isfile(root):
            raise UserError(f"wds '{location}' is a file; give the folder of its shards or a brace pattern")
        return place, sorted(filesystem.glob(root.rstrip("/") + "/*.tar"))


def _split_of(shard: str) -> str | None:
    name = posixpath.basename(shard)
    if any(name.startswith(f"{p}-") or name.startswith(f"{p}_") for p in TRAIN_PREFIXES):
        return "train"
    if any(name.startswith(f"{p}-") or name.startswith(f"{p}_") for p in HELD_OUT_PREFIXES):
        return "test"
    return None


@dataclass
class _Sample:
    image: tarfile.TarInfo | None = None
    image_suffix: str = ""
    label: tarfile.TarInfo | None = None
    label_suffix: str = ""


def _index_shard(place: _Place, path: str) -> tuple[list[str], list[_Sample], tarfile.TarFile]:
    """The shard's samples in order, their image and label members (an open tar, to read the labels)."""
    from webdataset.tariterators import base_plus_ext

    size = place.filesystem.size(path)
    path = place.full(path)
    try:
        tar = tarfile.open(path, "r:") if not place.url else tarfile.open(fileobj=_opened(place, path), mode="r:")
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"wds shard '{path}' is not a readable tar file ({err}); rewrite or remove it") from err
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError) as err:  # tarfile checks that every header and member lies in the file
        tar.close()
        raise UserError(f"wds shard '{path}' is truncated or damaged ({err}, at {size} bytes); copy the shard "
                        "again") from err  # fmt: skip
    keys: list[str] = []
    samples: dict[str, _Sample] = {}
    for member in members:
        if not member.isreg() or os.path.basename(member.name).startswith("__"):
            continue
        key, suffix = base_plus_ext(member.name)
        if key is None:
            continue
        suffix = suffix.lower()
        sample = samples.get(key)
        if sample is None:
            sample = samples[key] = _Sample()
            keys.append(key)
        if suffix in IMAGE_SUFFIXES and sample.image is None:
            sample.image, sample.image_suffix = member, suffix
        elif suffix in LABEL_SUFFIXES and (sample.label is None or suffix == "cls"):
            sample.label, sample.label_suffix = member, suffix
    return keys, [samples[k] for k in keys], tar


def _opened(place: _Place, url: str):
    """A seekable file of the shard at ``url`` (reads are ranged GETs through a read-ahead block cache)."""
    return place.filesystem.open(filesystem_of(url)[1], "rb")


def _label(tar: tarfile.TarFile, path: str, key: str, sample: _Sample) -> int:
    where = f"sample '{key}' of wds shard '{path}'"
    if sample.image is None:
        raise UserError(f"{where} has no image (a member {', '.join('.' + s for s in IMAGE_SUFFIXES)}); "
                        "every sample needs one")  # fmt: skip
    if sample.label is None:
        raise UserError(f"{where} has no label (a member .cls, or .json with a field 'label'); every sample needs one")
    text = tar.extractfile(sample.label).read().decode(errors="replace")
    try:
        value = json.loads(text)["label"] if sample.label_suffix == "json" else text.strip()
        label = int(value)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{where}: its .{sample.label_suffix} label {text[:40]!r} is not a class number") from err
    if label < 0:
        raise UserError(f"{where}: its label {label} is negative; classes are numbered from 0")
    return label


def _class_names(place: _Place, folder: str, num_classes: int) -> tuple[str, ...]:
    """``classes.txt`` or ``_info.json``'s ``classes`` beside the shards, else the label numbers as text."""
    filesystem = place.filesystem
    listed, info = posixpath.join(folder, "classes.txt"), posixpath.join(folder, "_info.json")
    names: list[str] | None = None
    if filesystem.isfile(listed):
        text = filesystem.cat_file(listed).decode()
        names = [line.strip() for line in text.splitlines() if line.strip()]
        origin = place.full(listed)
    elif filesystem.isfile(info):
        origin = place.full(info)
        try:
            names = list(json.loads(filesystem.cat_file(info))["classes"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"wds '{origin}' is not JSON with a list 'classes' ({err})") from err
    if names is None:
        return tuple(str(c) for c in range(num_classes))
    if len(names) < num_classes:
        raise UserError(f"wds '{origin}' names {len(names)} classes, but the shards' labels go up to "
                        f"{num_classes - 1}")  # fmt: skip
    return tuple(str(n) for n in names)


def index_shards(location: str) -> tuple[ShardReader, dict[str, np.ndarray], np.ndarray, _Place, str]:
    """The reader over every shard of ``location``, each split's reader rows, every row's label, and the shards'
    place and folder."""
    place, shards = _shard_paths(location)
    by_split = {"train": [s for s in shards if _split_of(s) == "train"],
                "test": [s for s in shards if _split_of(s) == "test"]}  # fmt: skip
    for split, wanted in (("train", "train-*.tar"), ("test", "val-*.tar or validation-*.tar (or test-*.tar)")):
        if not by_split[split]:
            raise UserError(f"wds '{location}' has no {split} shards: it needs {wanted} (found "
                            f"{len(shards)} .tar file(s))")  # fmt: skip
    ordered = by_split["train"] + by_split["test"]
    shard_of, offsets, lengths, names, labels = [], [], [], [], []
    split_rows: dict[str, list[int]] = {"train": [], "test": []}
    for number, path in enumerate(ordered):
        keys, samples, tar = _index_shard(place, path)
        with tar:
            for key, sample in zip(keys, samples, strict=True):
                labels.append(_label(tar, place.full(path), key, sample))
                split_rows[_split_of(path)].append(len(offsets))
                shard_of.append(number)
                offsets.append(sample.image.offset_data)
                lengths.append(sample.image.size)
                names.append(os.fsencode(f"{posixpath.basename(path)}/{key}.{sample.image_suffix}"))
    for split, rows in split_rows.items():
        if not rows:
            raise UserError(f"wds '{location}': the {split} shards hold no samples")
    with object_storage_errors(location):
        sizes = tuple(int(place.filesystem.size(p)) for p in ordered)
    reader = ShardReader(str(location), tuple(place.full(p) for p in ordered), sizes,
                         np.asarray(shard_of, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                         np.asarray(lengths, dtype=np.int64), np.array(names, dtype=bytes))  # fmt: skip
    rows = {split: np.asarray(r, dtype=np.int64) for split, r in split_rows.items()}
    return reader, rows, np.asarray(labels, dtype=np.int64), place, posixpath.dirname(ordered[0])


def _load_wds(arg: str | None, options: LoadOptions) -> RawDataset:
    """Shards streamed at --image-size (default 224), as a streamed image folder is."""
    reader, rows, labels, place, folder = index_shards(arg)
    num_classes = int(labels[rows["train"]].max()) + 1
    unknown = labels[rows["test"]] >= num_classes
    if unknown.any():
        raise UserError(f"wds '{arg}': held-out label {int(labels[rows['test']][unknown][0])} is not a class of the "
                        f"train shards (0..{num_classes - 1})")  # fmt: skip
    classes = _class_names(place, folder, num_classes)
    size = options.image_size or STREAM_IMAGE_SIZE
    train, test = (EncodedSplit(reader, rows[s], torch.from_numpy(labels[rows[s]]), size) for s in ("train", "test"))
    return RawDataset(train, test, classes, augment.FULL_RECIPE, IMAGENET_MEAN, IMAGENET_STD)


SOURCES = (
    DatasetSource(
        "wds",
        _load_wds,
        True,
        "wds:FOLDER (or a brace pattern) of WebDataset train-*/val-*.tar shards, streamed",
    ),
)
