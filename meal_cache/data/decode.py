"""Image files decoded on the CPU: TorchCodec's ``decode_image`` where it loads beside this torch, else
torchvision.io's (deprecated since torchvision 0.29 in TorchCodec's favour).

Both wrap the same libjpeg-turbo, libpng and libwebp, so their pixels agree bit for bit on every format the
tests make (grey, palette, RGBA, CMYK, RGB JPEG and PNG, WebP; tests/test_decode.py); a store still records
:data:`DECODER`, the decoder and its build, since another build may differ by a level. Beyond TorchCodec's
default there are two differences, both in its favour: a 16-bit PNG comes back as 8-bit pixels (each value
times 255/65535, rounded; the fallback converts the same way) where torchvision.io returned uint16, which no
later step expects; an animated WebP gives its first frame.

A file TorchCodec does not read (BMP, TIFF, an empty or unrecognised file; HEIC without libheif) goes to
torchvision.io, which raises ``RuntimeError("... Unsupported image file ...")`` for what it does not read
either, so the caller (:func:`meal_cache.data.source.decode_rgb`) can hand those to PIL. A file that is
recognised but broken (a truncated JPEG) raises a ``RuntimeError`` whose message is the library's reason
without its C++ source location (``decode_jpeg, /__w/.../decode_jpeg.cpp:171, ``), which users cannot act on.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch

# "decode_rows, /__w/torchcodec/.../DecodeJpeg.cpp:287, Image is incomplete or truncated."
_SOURCE_LOCATION = re.compile(r"^[^,]+, \S+\.(?:cpp|cu|cc|h):\d+, ")


def _load_torchcodec() -> tuple[Callable[..., torch.Tensor] | None, str | None]:
    """TorchCodec's ``decode_image`` and version, or ``(None, None)`` when it is absent or its libraries do not
    load against this torch (a build for another torch fails in ``torch.ops.load_library``)."""
    try:
        import torchcodec
        from torchcodec.decoders import decode_image
    except (ImportError, OSError, RuntimeError):
        return None, None
    return decode_image, torchcodec.__version__


_TORCHCODEC_DECODE, _TORCHCODEC_VERSION = _load_torchcodec()


def _torchvision_description() -> str:
    import torchvision

    return f"torchvision.io.decode_image {torchvision.__version__}"


# What a streamed dataset's description records of how its files became pixels.
DECODER = (
    f"torchcodec.decoders.decode_image {_TORCHCODEC_VERSION}"
    if _TORCHCODEC_DECODE is not None
    else _torchvision_description()
)


def without_source_location(message: str) -> str:
    """A decoder's message without the ``function, /path/File.cpp:LINE, `` its C++ code puts before the reason."""
    return _SOURCE_LOCATION.sub("", message.strip())


def decode_file(path: str) -> torch.Tensor:
    """uint8 RGB ``(3, H, W)`` of the image file at ``path`` (grey, palette, RGBA and CMYK converted), decoded by
    TorchCodec, or torchvision.io where TorchCodec is absent or does not read the format (module doc)."""
    return _decode(path)


def decode_data(data: torch.Tensor) -> torch.Tensor:
    """:func:`decode_file` of an image's encoded bytes (uint8 ``(L,)``: a tar shard's or parquet row's member)."""
    return _decode(data)


def _decode(source: str | torch.Tensor) -> torch.Tensor:
    if _TORCHCODEC_DECODE is not None:
        try:
            image = _TORCHCODEC_DECODE(source, mode="RGB")
        except (ValueError, ImportError):  # a format it does not read; HEIC without libheif
            pass
        except RuntimeError as err:
            raise RuntimeError(without_source_location(str(err))) from err
        else:
            return image[0] if image.ndim == 4 else image
    return _decode_with_torchvision(source)


def _decode_with_torchvision(source: str | torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        with warnings.catch_warnings():  # its deprecation, once a file, says what the module doc already does
            warnings.simplefilter("ignore", DeprecationWarning)
            data = read_file(source) if isinstance(source, str) else source
            image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise RuntimeError(without_source_location(str(err))) from err
    image = image[0] if image.ndim == 4 else image
    if image.dtype == torch.uint16:  # 16-bit PNG: rounded to 8 bits as TorchCodec does (no ties: v / 257)
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image
