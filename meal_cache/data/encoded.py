"""Rows whose encoded image bytes come from a reader (tar shards, Hugging Face tables): an
:class:`EncodedSplit`, served by the same :class:`~meal_cache.data.source.FileSource` workers as image files.

A :class:`ByteReader` holds every row of a dataset (both splits, so a fold split can pool them) and reads one
row's bytes by its index; a split is a subset of those indices. The workers receive the reader (pickled, so it
holds paths and arrays, never open handles) and decode each row's bytes with the decoder image files use, so
the same JPEG gives the same pixels from a folder, a shard or a parquet file; crop boxes, resizing, mirroring,
decoding once per request and ``--decode cuda``'s byte path are the image files' own
(:class:`~meal_cache.data.source._Decoder`).

A row is named stably by its reader (``train-000.tar/KEY.jpg``, ``train-00000.parquet/ROW.jpg``): the names, the
readers' files and their sizes, each image's byte length and the labels make the fingerprint, so a changed shard
or parquet file is refused by name as a changed folder is.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from meal_cache.data import decode
from meal_cache.data.source import (
    DECODE_ERRORS,
    MAX_SIDE,
    BadImage,
    FileSplit,
    _Decoder,
    first_line,
    worker_count,
)
from meal_cache.errors import UserError

# Enough of an encoded image for PIL to find its size (a JPEG's EXIF block comes before its frame header).
HEADER_BYTES = 64 * 1024


class ByteReader(Protocol):
    """Every row of a dataset by index: its name (``names``, bytes, ending in the image's format as a file name
    does), its image's byte length (``lengths``), and its bytes on demand. Picklable: workers receive it."""

    location: str
    kind: str
    names: np.ndarray
    lengths: np.ndarray

    def read(self, index: int, limit: int | None = None) -> bytes:
        """Row ``index``'s encoded image (its first ``limit`` bytes, when given)."""
        ...

    def identity(self) -> bytes:
        """What defines the reader's files (their names and sizes), for the fingerprint."""
        ...

    def remedy(self) -> str:
        """What a user does about a row whose image is refused."""
        ...


def decode_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``(3, H, W)`` from encoded bytes, as :func:`~meal_cache.data.source.decode_rgb` decodes a file:
    :func:`~meal_cache.data.decode.decode_data`, PIL for the formats it does not read."""
    try:
        return decode.decode_data(data)
    except RuntimeError as err:
        if "Unsupported image file" not in str(err):
            raise
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return TF.pil_to_tensor(image.convert("RGB"))


class _ReaderDecoder(_Decoder):
    """The image files' worker, its rows' bytes read from a :class:`ByteReader` (``rows``: the split's reader
    indices)."""

    def __init__(self, reader: ByteReader, rows: np.ndarray, sizes: torch.Tensor | None, out_size: int,
                 encoded: bool = False) -> None:  # fmt: skip
        super().__init__(reader.location, reader.names[rows], sizes, out_size, encoded)
        self.reader, self.rows = reader, rows

    def path(self, row: int) -> str:
        return f"{self.reader.location}/{self.files[row].decode(errors='replace')}"

    def encoded_bytes(self, row: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.reader.read(int(self.rows[row]))), dtype=torch.uint8)

    def refusal(self, bad: BadImage) -> str:
        return f"image '{bad.path}' {bad.reason}; {self.reader.remedy()}"

    def _decode(self, row: int) -> torch.Tensor | BadImage:
        try:
            image = decode_bytes(self.encoded_bytes(row))
        except DECODE_ERRORS as err:
            return BadImage(self.path(row), f"cannot be decoded ({first_line(err)})")
        return self.size_problem(row, image) or image


class EncodedSplit(FileSplit):
    """Rows ``rows`` of ``reader`` with their labels, served at ``image_size`` px: an image folder's split in every
    stage (it is one: :class:`~meal_cache.data.source.FileSplit`'s workers, views and evaluation view), its bytes
    read through the reader instead of from files."""

    def __init__(self, reader: ByteReader, rows: np.ndarray, labels: torch.Tensor, image_size: int,
                 sizes: torch.Tensor | None = None) -> None:  # fmt: skip
        rows = np.asarray(rows, dtype=np.int64)
        super().__init__(reader.location, reader.names[rows], labels, reader.lengths[rows], image_size, sizes)
        self.reader, self.rows = reader, rows

    def take(self, index: torch.Tensor) -> EncodedSplit:
        sizes = self.known_sizes[index] if self.known_sizes is not None else None
        return EncodedSplit(self.reader, self.rows[index.numpy()], self.labels[index].contiguous(), self.image_size,
                            sizes)  # fmt: skip

    def concat(self, other: FileSplit) -> EncodedSplit:
        if not isinstance(other, EncodedSplit) or other.reader is not self.reader:
            raise ValueError("encoded splits of different readers")
        both = self.known_sizes is not None and other.known_sizes is not None
        sizes = torch.cat([self.known_sizes, other.known_sizes]) if both else None
        return EncodedSplit(self.reader, np.concatenate([self.rows, other.rows]),
                            torch.cat([self.labels, other.labels]), self.image_size, sizes)  # fmt: skip

    def relabel(self, labels: torch.Tensor) -> EncodedSplit:
        return EncodedSplit(self.reader, self.rows, labels, self.image_size, self.known_sizes)

    def origin(self) -> tuple[str, bytes]:
        """The reader's kind and its files (names and sizes): a row's name is only unique within them."""
        return self.reader.kind, self.reader.identity()

    def decoder(self, out_size: int, encoded: bool = False) -> _ReaderDecoder:
        return _ReaderDecoder(self.reader, self.rows, self.known_sizes, out_size, encoded=encoded)

    def source_sizes(self, workers: int | None = None) -> torch.Tensor:
        """int32 ``(N, 2)``: each image's (H, W), from the first bytes of each (in parallel) and kept."""
        if self.known_sizes is None:
            self.known_sizes = scan_encoded_sizes(self.reader, self.rows, workers)
        return self.known_sizes


class _EncodedHeaders(Dataset):
    """Image sizes of a chunk of rows per item, from each image's first bytes; a refusal comes back as its text."""

    def __init__(self, reader: ByteReader, rows: np.ndarray, chunk: int) -> None:
        self.reader, self.rows, self.chunk = reader, rows, chunk

    def __len__(self) -> int:
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, index: int) -> tuple[list[tuple[int, int]], str | None]:
        from PIL import Image

        sizes = []
        for row in self.rows[index * self.chunk : (index + 1) * self.chunk].tolist():
            name = f"{self.reader.location}/{self.reader.names[row].decode(errors='replace')}"
            try:
                width, height = _header_size(Image, self.reader, row)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                return sizes, f"image '{name}' is not a readable image ({first_line(err)}); {self.reader.remedy()}"
            if max(width, height) > MAX_SIDE:
                return sizes, f"image '{name}' is {width}x{height} px; meal-cache takes sides up to {MAX_SIDE} px"
            sizes.append((height, width))
        return sizes, None


def _header_size(image_module, reader: ByteReader, row: int) -> tuple[int, int]:
    """(width, height) from the image's first bytes, or from all of them where its header lies further in."""
    try:
        with image_module.open(io.BytesIO(reader.read(row, HEADER_BYTES))) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):
        pass
    with image_module.open(io.BytesIO(reader.read(row))) as image:
        return image.size


def scan_encoded_sizes(reader: ByteReader, rows: np.ndarray, workers: int | None = None) -> torch.Tensor:
    """(H, W) of every row's image, read by workers from its header bytes."""
    loader = DataLoader(_EncodedHeaders(reader, rows, 256), batch_size=None, num_workers=worker_count(workers))
    sizes: list[tuple[int, int]] = []
    for chunk, problem in loader:
        if problem is not None:
            raise UserError(problem)
        sizes.extend(chunk)
    return torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2)
