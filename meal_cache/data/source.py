"""Image sources: the pixels of a list of rows as a view's parameters say, from memory or from image files.

Every stage asks a source, never a tensor of the whole dataset, so the same code serves digits and ImageNet:
``source.pixels(requests)`` takes ``(rows, params, payload)`` requests (rows of the split, their
:class:`~meal_cache.views.augment.ViewParams`, and anything the caller wants back with the pixels) and yields
``(payload, pixels)``, the pixels float32 ``(B, 3, S, S)`` in 0-255 on the device, in request order; the caller
normalises them with its network's statistics.

- :class:`MemorySource`: uint8 images held on the device, cropped there (:func:`~meal_cache.views.augment.render`).
- :class:`FileSource`: image files read and decoded in ``torch.utils.data.DataLoader`` worker processes
  (:mod:`meal_cache.data.decode`: TorchCodec, torchvision.io where it is absent; both 1.4-1.7x faster than PIL
  on this machine's JPEGs). A worker
  decodes each file once per request, however many of the request's rows name it (FKD's multi-crop), crops each
  box in the source image's own coordinates, resizes it to ``S`` with antialiasing, mirrors it (left-right, and
  top to bottom where the view draws vertical flips), and hands back
  uint8; memory does not grow with the dataset. A view's policy ops (RandAugment, TrivialAugment) then run on
  the device (:func:`~meal_cache.views.augment.apply_ops`). Same decoder, same box: the same pixels, bit for bit, on one
  machine, whatever the number of workers or the other rows of a request.

  With GPU decoding (``--decode cuda``, or ``auto`` on a GPU for a folder of .jpg/.jpeg files) the workers only
  read each request's file bytes, and the training process decodes the request's JPEGs in one batched nvjpeg
  call (``torchvision.io.decode_jpeg(list, device="cuda")``), then crops, resizes and mirrors each row there with
  the same box and the same functions (:func:`render_decoded`); a file that is not a JPEG is decoded by the
  worker on the CPU, as without it. nvjpeg's pixels differ from libjpeg's by a few levels (docs/design.md).

:func:`views_pixels` asks for several views of the same rows in one request (extract's views of a chunk, as
distill's multi-crop asks for K crops of a row), so each image is decoded once for all of them.

A file that cannot be decoded, or no longer has the size recorded for it, comes back from the worker as a
:class:`BadImage` and is raised as a :class:`~meal_cache.errors.UserError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from meal_cache.data import decode
from meal_cache.errors import UserError
from meal_cache.views import augment, mixing

DECODER = decode.DECODER
# Boxes are int16: no source side may exceed this.
MAX_SIDE = 32767

Request = tuple[torch.Tensor, augment.ViewParams, Any]
# What a decoder raises for a file that is not a readable image (PIL's UnidentifiedImageError is an OSError).
DECODE_ERRORS = (RuntimeError, OSError, SyntaxError, ValueError)


class ImageSource(Protocol):
    """What every stage reads images through (see the module doc)."""

    def pixels(self, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]: ...

    def close(self) -> None: ...


def default_workers() -> int:
    """Decoding workers when none are asked for: one core is left to the training process, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def worker_count(workers: int | None) -> int:
    """``--workers`` as given, or :func:`default_workers` when not given."""
    return default_workers() if workers is None else workers


class MemorySource:
    """Rows of an in-memory split, cropped on the device."""

    def __init__(self, images: torch.Tensor, device: torch.device, out_size: int) -> None:
        if device.type == "cuda":
            images = images.pin_memory()
        self.images = images.to(device, non_blocking=True)
        self.device, self.out_size = device, out_size

    def pixels(self, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]:
        return with_partners(self._rendered, requests)

    def _rendered(self, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]:
        for rows, params, payload in requests:
            yield payload, augment.render(self.images[rows.to(self.device, non_blocking=True)], params, self.out_size)

    def close(self) -> None:
        pass


def with_partners(render, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]:
    """``render``'s pixels of the requests, each mixed row mixed with its partner (Mixup, CutMix): a request's
    mixed rows ask ``render`` for their partners' rows too, in the same request, so a source decodes and
    crops the partners as it does any row, and a row's pixels depend on its own and its partner's parameters
    alone, whatever else the request holds."""

    def expanded() -> Iterator[Request]:
        for rows, params, payload in requests:
            mixed = mixing.mixed_rows(params)
            if params.mix_partner is None:
                yield rows, params, (payload, None, None)
                continue
            partners = params.mix_partner[mixed].long().to(rows.device)
            both = augment.concat_views([params.unmixed(), params.partner[mixed]])
            yield torch.cat([rows, partners]), both, (payload, params, mixed)

    for (payload, params, mixed), pixels in render(expanded()):
        if params is None:
            yield payload, pixels
            continue
        own = len(params)
        yield payload, mixing.mix(pixels[:own], pixels[own:], params, mixed)


ViewsRequest = tuple[torch.Tensor, list[augment.ViewParams], Any]


def concat_rows(parts: list[augment.ViewParams]) -> augment.ViewParams:
    """Parameters of some rows of several views one after the other, their mixing kept (each part's partners
    already resolved, as ``view[rows]`` resolves them)."""
    joined = augment.concat_views(parts)
    if parts[0].mix_partner is None:
        return joined
    return dataclasses.replace(joined, mix_partner=torch.cat([p.mix_partner for p in parts]),
                               mix_lambda=torch.cat([p.mix_lambda for p in parts]),
                               mix_box=torch.cat([p.mix_box for p in parts]),
                               partner=augment.concat_views([p.partner for p in parts]))  # fmt: skip


def views_pixels(source: ImageSource, requests: Iterable[ViewsRequest]) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """Several views of the same rows, one request each: ``(rows, [params of view 1, ...], payload)`` in,
    ``(payload, [pixels of view 1, ...])`` out. Each request goes to ``source`` as one request of every view's
    rows, so a file source decodes each of its images once for all the views (it decodes a request's image once
    however many of its samples name it), and each row's pixels are the ones a request of that view alone gives
    (a row's pixels depend on its own parameters and its partner's alone)."""

    def joined() -> Iterator[Request]:
        for rows, views, payload in requests:
            yield rows.repeat(len(views)), concat_rows(views), (payload, len(rows))

    for (payload, count), pixels in source.pixels(joined()):
        yield payload, list(pixels.split(count))


@dataclass(frozen=True)
class BadImage:
    """A file a worker could not turn into its row's pixels."""

    path: str
    reason: str


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 ``(3, H, W)``: grey, palette, CMYK and RGBA images converted to RGB (:mod:`meal_cache.data.decode`:
    TorchCodec, torchvision.io where it is absent or refuses the format). What neither reads goes through PIL."""
    try:
        return decode.decode_file(path)
    except RuntimeError as err:
        if "Unsupported image file" not in str(err):
            raise
    from PIL import Image

    with Image.open(path) as image:
        return TF.pil_to_tensor(image.convert("RGB"))


def render_decoded(images: list[torch.Tensor], crops: torch.Tensor, flips: torch.Tensor, vflips: torch.Tensor | None,
                   size: int) -> torch.Tensor:  # fmt: skip
    """uint8 ``(B, 3, size, size)`` on the images' device: row ``i``'s box ``crops[i]`` (y0, x0, h, w, in its
    source image's pixels) of ``images[i]`` (uint8 ``(3, H, W)``; K crops of one image may pass the same tensor),
    resized with antialiasing and mirrored as ``flips`` and ``vflips`` say. The CPU workers and the GPU decoding
    path both render through here, so a row's pixels differ between them only by what the decoder gives."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device if images else "cpu")
    for index, (image, crop, flip) in enumerate(zip(images, crops.tolist(), flips.tolist(), strict=True)):
        y0, x0, h, w = crop
        pixels = TF.resize(image[:, y0 : y0 + h, x0 : x0 + w], [size, size], antialias=True)
        out[index] = pixels.flip(-1) if flip else pixels
    if vflips is not None:  # the same function as in memory, so both sources mirror alike
        out = augment.vertical_flips(out, augment.ViewParams(crops.to(out.device), flips.to(out.device),
                                                             vflip=vflips.to(out.device)))  # fmt: skip
    return out


def is_jpeg(data: torch.Tensor) -> bool:
    """Whether encoded bytes start as a JPEG does (its SOI marker), whatever the file's name says."""
    return len(data) >= 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


class _Decoder(Dataset):
    """What a worker runs: one request of (rows, boxes, flips, vertical flips or None) in, uint8 pixels of its
    rows out; or, with ``encoded`` (GPU decoding), each distinct row's file bytes for the main process to decode
    (a file that is not a JPEG is decoded here, so nvjpeg only ever sees JPEGs)."""

    def __init__(self, root: str, files: np.ndarray, sizes: torch.Tensor | None, out_size: int,
                 encoded: bool = False) -> None:  # fmt: skip
        self.root, self.files, self.sizes, self.out_size, self.encoded = root, files, sizes, out_size, encoded

    def __len__(self) -> int:
        return len(self.files)

    def path(self, row: int) -> str:
        """How a refusal names the row's image (for a file, its path)."""
        return os.path.join(self.root, os.fsdecode(self.files[row]))

    def encoded_bytes(self, row: int) -> torch.Tensor:
        """The row's encoded image, uint8 ``(L,)``."""
        # A copy: read_file's tensor is backed by the file itself, and sending it to the main process
        # hangs the DataLoader (seen with torch 2.14 / torchvision 0.29).
        return torchvision.io.read_file(self.path(row)).clone()

    def refusal(self, bad: BadImage) -> str:
        """The one line that refuses a row's image, with what to do about it."""
        return (f"image '{bad.path}' {bad.reason}; remove or replace it (the dataset's fingerprint then changes: "
                "extract again), or load the data with ?skip_bad=1 to leave unreadable files out")  # fmt: skip

    def __getitem__(self, item: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]):
        rows, crops, flips, vflips = item
        if self.encoded:
            return self.read(rows)
        decoded: dict[int, torch.Tensor] = {}
        for row in rows.tolist():
            if row not in decoded:  # K crops of one image: one decode
                image = self._decode(row)
                if isinstance(image, BadImage):
                    return None, image
                decoded[row] = image
        images = [decoded[row] for row in rows.tolist()]
        bad = self.box_problem(rows, images, crops)
        if bad is not None:
            return None, bad
        return render_decoded(images, crops, flips, vflips, self.out_size), None

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[bool], BadImage | None]:
        """Each distinct row's file bytes once (``encoded`` True) or, for a file that is not a JPEG, its decoded
        image (False); ``index`` maps each row of the request to its entry."""
        position: dict[int, int] = {}
        items: list[torch.Tensor] = []
        encoded: list[bool] = []
        for row in rows.tolist():
            if row in position:
                continue
            position[row] = len(items)
            try:
                data = self.encoded_bytes(row)
            except DECODE_ERRORS as err:
                return torch.empty(0), [], [], BadImage(self.path(row), f"cannot be decoded ({first_line(err)})")
            if not is_jpeg(data):  # PNG, BMP, ...: decoded on the CPU here, as without GPU decoding
                image = self._decode(row)
                if isinstance(image, BadImage):
                    return torch.empty(0), [], [], image
                data = image
            items.append(data)
            encoded.append(data.dim() == 1)
        index = torch.tensor([position[row] for row in rows.tolist()], dtype=torch.int64)
        return index, items, encoded, None

    def size_problem(self, row: int, image: torch.Tensor) -> BadImage | None:
        if self.sizes is None:
            return None
        expected = tuple(int(v) for v in self.sizes[row])
        if tuple(image.shape[-2:]) == expected:
            return None
        found = f"{image.shape[-1]}x{image.shape[-2]}"
        return BadImage(self.path(row), f"is {found} px, not the {expected[1]}x{expected[0]} recorded for it")

    def box_problem(self, rows: torch.Tensor, images: list[torch.Tensor], crops: torch.Tensor) -> BadImage | None:
        for row, image, (y0, x0, h, w) in zip(rows.tolist(), images, crops.tolist(), strict=True):
            height, width = image.shape[-2:]
            if y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
                return BadImage(self.path(row), f"is {width}x{height} px, too small for its recorded crop box (it "
                                "changed since the view was drawn)")  # fmt: skip
        return None

    def _decode(self, row: int) -> torch.Tensor | BadImage:
        path = self.path(row)
        try:
            image = decode_rgb(path)
        except DECODE_ERRORS as err:
            return BadImage(path, f"cannot be decoded ({first_line(err)})")
        return self.size_problem(row, image) or image


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return decode.without_source_location(text[-1]) if text else type(err).__name__


class _Plan(Sampler):
    """The requests of the current pass: each ``iter(loader)`` reads whatever :meth:`FileSource.pixels` set."""

    def __init__(self) -> None:
        self.items: Iterator = iter(())

    def __iter__(self) -> Iterator:
        return self.items


class FileSource:
    """Rows of a :class:`FileSplit`, decoded in ``workers`` DataLoader processes (0: in this process); with
    ``jpeg_device`` (GPU decoding, :func:`decode_device`), the workers only read the files' bytes and this
    process decodes each request's JPEGs there in one batched call (:func:`decode_jpegs`)."""

    def __init__(self, split: FileSplit, device: torch.device, workers: int, out_size: int,
                 jpeg_device: torch.device | None = None) -> None:  # fmt: skip
        self.device, self.jpeg_device, self.out_size = device, jpeg_device, out_size
        self._plan = _Plan()
        self.decoder = split.decoder(out_size, encoded=jpeg_device is not None)
        self.loader = DataLoader(self.decoder, sampler=self._plan, batch_size=None, num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                 prefetch_factor=2 if workers > 0 else None)  # fmt: skip

    def pixels(self, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]:
        return with_partners(self._decoded, requests)

    def _decoded(self, requests: Iterable[Request]) -> Iterator[tuple[Any, torch.Tensor]]:
        payloads: deque = deque()

        def items() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
            for rows, params, payload in requests:
                payloads.append((payload, params, rows))
                yield rows, params.crop, params.flip, params.vflip

        self._plan.items = items()
        for item in self.loader:
            payload, params, rows = payloads.popleft()
            if self.jpeg_device is None:
                pixels, bad = item
            else:
                pixels, bad = self._render_encoded(rows, params, *item)
            if bad is not None:
                raise UserError(self.decoder.refusal(bad))
            # A policy's ops run on the device, on the uint8 crops (as in memory, after the crop and flip).
            yield payload, augment.apply_ops(pixels.to(self.device, non_blocking=True), params).float()

    def _render_encoded(self, rows: torch.Tensor, params: augment.ViewParams, index: torch.Tensor,
                        items: list[torch.Tensor], encoded: list[bool],
                        bad: BadImage | None) -> tuple[torch.Tensor | None, BadImage | None]:  # fmt: skip
        """A worker's bytes of one request turned into its rows' uint8 pixels on ``jpeg_device``."""
        if bad is not None:
            return None, bad
        firsts = {}  # each entry's first row, for its path and recorded size
        for row, entry in zip(rows.tolist(), index.tolist(), strict=True):
            firsts.setdefault(entry, row)
        jpegs = [entry for entry, is_encoded in enumerate(encoded) if is_encoded]
        paths = [self.decoder.path(firsts[entry]) for entry in jpegs]
        decoded = decode_jpegs([items[entry] for entry in jpegs], paths, self.jpeg_device)
        images = [item.to(self.jpeg_device, non_blocking=True) for item in items]
        for entry, image in zip(jpegs, decoded, strict=True):
            if isinstance(image, BadImage):
                return None, image
            images[entry] = image
            problem = self.decoder.size_problem(firsts[entry], image)
            if problem is not None:
                return None, problem
        per_row = [images[entry] for entry in index.tolist()]
        problem = self.decoder.box_problem(rows, per_row, params.crop)
        if problem is not None:
            return None, problem
        return render_decoded(per_row, params.crop, params.flip, params.vflip, self.out_size), None

    def close(self) -> None:
        # Persistent workers end with the loader's iterator.
        self.loader = None


def decode_jpegs(datas: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor | BadImage]:
    """JPEG bytes decoded to uint8 RGB ``(3, H, W)`` on ``device`` in one batched call (nvjpeg on a GPU). When the
    batch fails, each file is decoded alone to find which; one nvjpeg refuses (CMYK, say) is decoded by libjpeg on
    the CPU instead, and one neither reads comes back as a :class:`BadImage` naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except DECODE_ERRORS:  # one bad file fails the whole batch ("no partial results")
        pass
    out: list[torch.Tensor | BadImage] = []
    for data, path in zip(datas, paths, strict=True):
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            continue
        except DECODE_ERRORS:
            pass
        try:
            out.append(decode_rgb(path).to(device))
        except DECODE_ERRORS as err:
            out.append(BadImage(path, f"cannot be decoded ({first_line(err)})"))
    return out


DECODE_CHOICES = ("auto", "cpu", "cuda")
JPEG_SUFFIXES = (b".jpg", b".jpeg")


def check_decode(decode: str) -> None:
    """``--decode``: one of :data:`DECODE_CHOICES`, and ``cuda`` only where a CUDA GPU is (checked with the
    other settings, before any work)."""
    if decode not in DECODE_CHOICES:
        raise UserError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "cuda" and not torch.cuda.is_available():
        raise UserError("--decode cuda was asked for, but no CUDA GPU is available (use --decode cpu or auto)")


def replay_decode(decode: str, recorded: str | None) -> str:
    """Where a run that replays a store's views decodes its image files: as asked, or with ``auto`` where the
    store's own views were decoded (its dataset's recorded ``decode``; stores made before the option were decoded
    on the CPU), so the student sees pixels of the decoder the teachers saw (libjpeg and nvjpeg differ by a few
    levels)."""
    if decode != "auto":
        return decode
    return "auto" if recorded == "cuda" else "cpu"


def used_decode(decode: str, device: torch.device, files: np.ndarray) -> str:
    """``cpu`` or ``cuda``: what :func:`decode_device` chooses, as a store records it."""
    return "cpu" if decode_device(decode, device, files) is None else "cuda"


def all_jpeg_names(files: np.ndarray) -> bool:
    """Whether every file is named as a JPEG (.jpg, .jpeg, any case): the names, not the bytes, so deciding
    costs nothing on a million-file folder."""
    names = np.char.lower(files.astype(bytes))
    return bool(np.all(np.char.endswith(names, JPEG_SUFFIXES[0]) | np.char.endswith(names, JPEG_SUFFIXES[1])))


def decode_device(decode: str, device: torch.device, files: np.ndarray) -> torch.device | None:
    """Where a FileSource decodes JPEGs: None for the CPU workers, else the GPU. ``auto`` takes the GPU when the
    run's device is one and every file is named as a JPEG (a folder with PNGs or other formats stays on the
    CPU); ``cuda`` takes it whatever the names, decoding the files that are not JPEGs on the CPU."""
    check_decode(decode)
    if decode == "cpu" or (decode == "auto" and (device.type != "cuda" or not all_jpeg_names(files))):
        return None
    if device.type != "cuda":
        raise UserError(f"--decode cuda decodes on the run's GPU, but its device is {device} (use --device cuda, "
                        "or --decode cpu or auto)")  # fmt: skip
    return device


# ---------------------------------------------------------------------------------------------- file split


class FileSplit:
    """A split of image files under ``root``: relative paths, labels and each file's byte size (the fingerprint's
    input), served at ``image_size`` px. Each image's own size is read from its header on first need
    (:meth:`source_sizes`), since only drawing views needs it."""

    def __init__(self, root: str, files: np.ndarray, labels: torch.Tensor, file_bytes: np.ndarray, image_size: int,
                 sizes: torch.Tensor | None = None) -> None:  # fmt: skip
        self.root, self.files, self.labels, self.file_bytes = root, files, labels, file_bytes
        self.image_size = image_size
        self.known_sizes = sizes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> FileSplit:
        picked = index.numpy()
        sizes = self.known_sizes[index] if self.known_sizes is not None else None
        return FileSplit(self.root, self.files[picked], self.labels[index].contiguous(), self.file_bytes[picked],
                         self.image_size, sizes)  # fmt: skip

    def concat(self, other: FileSplit) -> FileSplit:
        if other.root != self.root:
            raise ValueError("file splits of different roots")
        both = self.known_sizes is not None and other.known_sizes is not None
        sizes = torch.cat([self.known_sizes, other.known_sizes]) if both else None
        return FileSplit(self.root, np.concatenate([self.files, other.files]), torch.cat([self.labels, other.labels]),
                         np.concatenate([self.file_bytes, other.file_bytes]), self.image_size, sizes)  # fmt: skip

    def relabel(self, labels: torch.Tensor) -> FileSplit:
        return FileSplit(self.root, self.files, labels, self.file_bytes, self.image_size, self.known_sizes)

    def origin(self) -> tuple[str, bytes]:
        """What the rows' names are relative to, for the fingerprint: files under the root (nothing more to add)."""
        return "files", b""

    def fingerprint(self, kind: str, split: str) -> str:
        """The rows' names, byte lengths and labels, and where they come from (:meth:`origin`)."""
        tag, identity = self.origin()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{kind}|{split}|{tag}|{len(self)}".encode())
        digest.update(identity)
        digest.update(b"\0".join(self.files.tolist()))
        digest.update(self.file_bytes.astype(np.int64).tobytes())
        digest.update(self.labels.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def decoder(self, out_size: int, encoded: bool = False) -> _Decoder:
        """What a :class:`FileSource`'s workers run for these rows (``encoded``: read bytes for GPU decoding)."""
        return _Decoder(self.root, self.files, self.known_sizes, out_size, encoded=encoded)

    def source_sizes(self, workers: int | None = None) -> torch.Tensor:
        """int32 ``(N, 2)``: each image's (H, W), read from the file headers (in parallel) and kept."""
        if self.known_sizes is None:
            self.known_sizes = scan_sizes(self.root, self.files, workers)
        return self.known_sizes

    def eval_view(self, workers: int | None = None) -> augment.ViewParams:
        """The evaluation view: the central 224/256 of each image's shorter side (resized to the output size)."""
        return augment.identity(self.source_sizes(workers), augment.RECIPES[augment.FULL_RECIPE])

    def open(self, device: torch.device, workers: int | None = None, out_size: int | None = None,
             decode: str = "auto") -> FileSource:  # fmt: skip
        """Decoding workers for these files, rendering at ``out_size`` px (default: the data's size); ``decode``
        says where JPEGs are decoded (:func:`decode_device`)."""
        return FileSource(self, device, worker_count(workers), out_size or self.image_size,
                          decode_device(decode, device, self.files))  # fmt: skip

    def sample_pixels(self, count: int) -> torch.Tensor:
        """uint8 pixels of the first ``count`` rows' evaluation views, decoded here (for timing networks)."""
        sample = self.take(torch.arange(min(count, len(self))))
        source = FileSource(sample, torch.device("cpu"), 0, self.image_size)
        rows = torch.arange(len(sample))
        return next(source.pixels([(rows, sample.eval_view(0), None)]))[1].to(torch.uint8)


class _Headers(Dataset):
    """Image sizes from the headers, a chunk of rows per item; an unreadable file comes back as a message."""

    def __init__(self, root: str, files: np.ndarray, chunk: int) -> None:
        self.root, self.files, self.chunk = root, files, chunk

    def __len__(self) -> int:
        return (len(self.files) + self.chunk - 1) // self.chunk

    def __getitem__(self, index: int) -> tuple[list[tuple[int, int]], str | None]:
        from PIL import Image

        sizes = []
        for name in self.files[index * self.chunk : (index + 1) * self.chunk]:
            path = os.path.join(self.root, os.fsdecode(name))
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                return sizes, f"image '{path}' is not a readable image ({first_line(err)})"
            if max(width, height) > MAX_SIDE:
                return sizes, f"image '{path}' is {width}x{height} px; meal-cache takes sides up to {MAX_SIDE} px"
            sizes.append((height, width))
        return sizes, None


def scan_sizes(root: str, files: np.ndarray, workers: int | None = None) -> torch.Tensor:
    """(H, W) of every file from its header (PIL reads it without decoding the pixels)."""
    loader = DataLoader(_Headers(root, files, 256), batch_size=None, num_workers=worker_count(workers))
    sizes: list[tuple[int, int]] = []
    for chunk, problem in loader:
        if problem is not None:
            raise UserError(f"{problem}; remove it, or load the data with ?skip_bad=1 to leave unreadable files out")
        sizes.extend(chunk)
    return torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2)


def readable(path: str) -> str | None:
    """None when ``path`` decodes to an image, else why not (for ``?skip_bad=1``, which decodes every file)."""
    try:
        image = decode_rgb(path)
    except DECODE_ERRORS as err:
        return first_line(err)
    if max(image.shape[-2:]) > MAX_SIDE:
        return f"larger than {MAX_SIDE} px"
    return None


class _Check(Dataset):
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        return readable(self.paths[index])


def find_unreadable(paths: list[str], workers: int | None = None) -> dict[int, str]:
    """Index -> reason for every path that does not decode, checked in parallel."""
    loader = DataLoader(_Check(paths), batch_size=None, num_workers=worker_count(workers))
    return {index: reason for index, reason in enumerate(loader) if reason is not None}


def list_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None):
    """``(relative paths, labels, class names)`` of ``folder/<class>/<image>``, as torchvision's ImageFolder finds
    them; with ``class_to_idx`` (the training split's), a class folder the mapping lacks is refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, found_idx = find_classes(str(folder))
    except FileNotFoundError as err:
        raise UserError(f"imagefolder '{folder}': {err}") from err
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise UserError(f"imagefolder '{folder}' has class folder(s) {', '.join(unknown[:5])} that train/ lacks; "
                            "every held-out class must be a training class")  # fmt: skip
        found_idx = {c: class_to_idx[c] for c in classes}
    try:
        samples = make_dataset(str(folder), found_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise UserError(f"imagefolder '{folder}': {first_line(err)}; every subfolder of {folder.name}/ is a class: "
                        "put images in it or remove it") from err  # fmt: skip
    relative = [os.path.relpath(path, folder) for path, _ in samples]
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return relative, labels, classes
