"""WebDataset tar shards, ``wds:LOCATION``: a folder of ``.tar`` shards or a brace pattern
(``/d/imagenet-{train-{0000..1023},val-{0000..0063}}.tar``), split by shard name (``train-*``; ``val-*``,
``validation-*`` or ``test-*``), streamed at full resolution as image folders are.

A sample is the members that share a key, as webdataset groups them (its ``base_plus_ext``): the image under
``jpg``, ``jpeg``, ``png`` or ``webp``, the class under ``cls`` (an integer as text) or else ``json``'s field
``label``. Class names come from ``classes.txt`` (one a line) or ``_info.json``'s ``classes`` beside the shards,
else they are ``"0"`` .. ``"C-1"``, C one more than the largest label.

Random access: the index records each sample's image member as (shard, byte offset, length), read from the
shards' tar headers; a worker reads a row by seeking there. webdataset 1.0.2 iterates shards only as a stream (and
its ``wids`` random-access reader is not part of it), so the headers are read with Python's ``tarfile`` in seekable
mode, which skips over the members' data; nothing here parses tar itself.

The index cache: reading every shard's headers and each sample's label member is thousands of ranged GETs for
ImageNet's 1,024 shards in object storage, on every load (each extract, distill, train and torchrun rank), so each
shard's index (its keys, image members' offsets, lengths and suffixes, and labels) is kept as one JSON file in
``$MEAL_CACHE_WDS_INDEX`` if set, else ``$XDG_CACHE_HOME/meal-cache/wds-index`` (``~/.cache/meal-cache/wds-index``).
A file is keyed by what identifies the shard's bytes, as fsspec's ``info()`` gives them: its location, its size, and
its ``ETag`` (S3) or else its ``mtime`` (local files); a shard with another size or tag is indexed again, and a
shard whose file system gives neither tag is indexed every load. Files are written whole (a temporary file, then a
rename), so two ranks or a kill never leave half of one; a file that does not parse or does not match is ignored and
rewritten; a folder that cannot be written costs only the speed: the shards are indexed from their headers, without
a word. Only shards that index cleanly are kept, so every refusal of a bad shard below still comes from its headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path
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
INDEX_CACHE_ENV = "MEAL_CACHE_WDS_INDEX"
INDEX_FORMAT = 1  # raised whenever what a shard's index holds, or how it is read from the headers, changes
BYTES_TAGS = ("ETag", "etag", "mtime")  # fsspec info() fields that change with a file's bytes: s3fs, gcsfs, local


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
        # fsspec keeps listings per process: a shard replaced since must be seen, its tag in the index cache's key.
        filesystem.invalidate_cache()
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


def _index_shard(place: _Place, path: str, size: int) -> tuple[list[str], list[_Sample], tarfile.TarFile]:
    """The shard's samples in order, their image and label members (an open tar, to read the labels): the one
    read of its tar headers."""
    from webdataset.tariterators import base_plus_ext

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


@dataclass(frozen=True)
class _ShardIndex:
    """One shard's samples in order: each one's key, its image member's suffix, data offset and length, its label."""

    keys: list[str]
    suffixes: list[str]
    offsets: list[int]
    lengths: list[int]
    labels: list[int]

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def _read_headers(place: _Place, path: str, size: int) -> _ShardIndex:
    """The shard's index from its tar headers and label members; the shard's refusals are raised here."""
    keys, samples, tar = _index_shard(place, path, size)
    with tar:
        labels = [_label(tar, place.full(path), key, sample) for key, sample in zip(keys, samples, strict=True)]
    return _ShardIndex(keys, [s.image_suffix for s in samples], [s.image.offset_data for s in samples],
                       [s.image.size for s in samples], labels)  # fmt: skip


def index_cache_folder() -> Path:
    """Where shard indexes are kept: ``$MEAL_CACHE_WDS_INDEX``, else ``$XDG_CACHE_HOME/meal-cache/wds-index``
    (``~/.cache/meal-cache/wds-index``)."""
    explicit = os.environ.get(INDEX_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "meal-cache" / "wds-index"


@dataclass(frozen=True)
class _IndexCache:
    """Shard indexes as JSON files in ``folder``, one a shard location, each valid for the size and tag it
    records (the module docstring has the rules)."""

    folder: Path

    def _file(self, shard: str) -> Path:
        return self.folder / f"{hashlib.sha256(shard.encode(errors='surrogatepass')).hexdigest()[:32]}.json"

    @staticmethod
    def _identity(shard: str, info: dict) -> dict | None:
        tags = {name: str(info[name]) for name in BYTES_TAGS if info.get(name) is not None}
        if not tags:
            return None  # nothing says when its bytes change: the size alone would keep a rewritten shard's index
        return {"format": INDEX_FORMAT, "shard": shard, "size": int(info["size"]), "tags": tags}

    def get(self, shard: str, info: dict) -> _ShardIndex | None:
        identity = self._identity(shard, info)
        if identity is None:
            return None
        try:
            kept = json.loads(self._file(shard).read_bytes())
            if {name: kept[name] for name in identity} != identity:
                return None
            index = _ShardIndex(**{name: kept[name] for name in _ShardIndex.__dataclass_fields__})
            return index if _well_formed(index, identity["size"]) else None
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none yet, or not written whole
            return None

    def put(self, shard: str, info: dict, index: _ShardIndex) -> None:
        identity = self._identity(shard, info)
        if identity is None:
            return
        target = self._file(shard)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = str(target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
            # Not mkstemp, whose files are 0600: the umask's permissions let one folder serve a team.
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError:
            return  # an unwritable cache costs only the speed
        try:
            with os.fdopen(handle, "w") as out:
                json.dump({**identity, **index.as_json()}, out)
            os.replace(temporary, target)  # whole or not at all, whichever rank or kill comes first
        except OSError:
            pass
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _well_formed(index: _ShardIndex, size: int) -> bool:
    """Whether a parsed cache file holds an index these shards could have: a file edited or damaged so that it
    still parses is read from the headers again rather than served."""
    count = len(index.keys)
    if not all(isinstance(column, list) and len(column) == count for column in index.as_json().values()):
        return False
    if not all(isinstance(key, str) for key in index.keys) or not set(index.suffixes) <= set(IMAGE_SUFFIXES):
        return False
    if not all(type(n) is int and n >= 0 for n in index.offsets + index.lengths + index.labels):
        return False
    return all(o + n <= size for o, n in zip(index.offsets, index.lengths, strict=True))


def index_shards(location: str) -> tuple[ShardReader, dict[str, np.ndarray], np.ndarray, _Place, str]:
    """The reader over every shard of ``location``, each split's reader rows, every row's label, and the shards'
    place and folder. Each shard's index comes from the index cache when it holds one for the shard's bytes, else
    from its headers (and is then kept)."""
    place, shards = _shard_paths(location)
    by_split = {"train": [s for s in shards if _split_of(s) == "train"],
                "test": [s for s in shards if _split_of(s) == "test"]}  # fmt: skip
    for split, wanted in (("train", "train-*.tar"), ("test", "val-*.tar or validation-*.tar (or test-*.tar)")):
        if not by_split[split]:
            raise UserError(f"wds '{location}' has no {split} shards: it needs {wanted} (found "
                            f"{len(shards)} .tar file(s))")  # fmt: skip
    ordered = by_split["train"] + by_split["test"]
    cache = _IndexCache(index_cache_folder())
    shard_of, offsets, lengths, names, labels = [], [], [], [], []
    split_rows: dict[str, list[int]] = {"train": [], "test": []}
    sizes = []
    for number, path in enumerate(ordered):
        with object_storage_errors(location):
            info = place.filesystem.info(path)  # size and tag: from s3fs's kept listing, else one HEAD
        sizes.append(int(info["size"]))
        where = place.full(path) if place.url else os.path.abspath(path)  # a brace pattern's may be relative
        index = cache.get(where, info)
        if index is None:
            index = _read_headers(place, path, sizes[-1])
            cache.put(where, info, index)
        start = len(offsets)
        split_rows[_split_of(path)].extend(range(start, start + len(index.keys)))
        shard_of.extend([number] * len(index.keys))
        offsets.extend(index.offsets)
        lengths.extend(index.lengths)
        labels.extend(index.labels)
        base = posixpath.basename(path)
        names.extend(
            os.fsencode(f"{base}/{key}.{suffix}") for key, suffix in zip(index.keys, index.suffixes, strict=True)
        )
    for split, rows in split_rows.items():
        if not rows:
            raise UserError(f"wds '{location}': the {split} shards hold no samples")
    reader = ShardReader(str(location), tuple(place.full(p) for p in ordered), tuple(sizes),
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
