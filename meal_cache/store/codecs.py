"""The store's value codecs: the compressors (with their CRC-32C checksum), bit rounding, 8-bit quantisation of
blocks and maps with a per-row range (see :mod:`meal_cache.store`; top-k and sampled logits are in
:mod:`meal_cache.store.logits`)."""

from __future__ import annotations

import warnings

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from meal_cache.errors import UserError
from meal_cache.store.schema import StoreLayout

QUANTIZE_BITS = (8,)

# zarr warns, each time such an array is opened, that numcodecs' codecs (BitRound, for --keep-bits) are outside
# the Zarr v3 specification; meal-cache documents that and installs numcodecs, so the warning says nothing new.
# Installed here because every module that creates or opens a store's arrays imports this one.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


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


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes of each row (its own minimum to maximum in 255 steps) and the rows' (low, step)."""
    flat = values.reshape(len(values), -1).astype(np.float32)
    low = flat.min(1)
    step = (flat.max(1) - low) / 255.0
    safe = np.where(step > 0, step, 1.0)
    codes = np.rint((flat - low[:, None]) / safe[:, None]).clip(0, 255).astype(np.uint8)
    return codes.reshape(values.shape), np.stack([low, step], 1).astype(np.float32)


def dequantize_rows(codes: np.ndarray, ranges: np.ndarray, dtype: str) -> np.ndarray:
    """The values ``quantize_rows`` encoded, to within half a step."""
    shape = (len(codes),) + (1,) * (codes.ndim - 1)
    low, step = ranges[:, 0].reshape(shape), ranges[:, 1].reshape(shape)
    return (low + codes.astype(np.float32) * step).astype(dtype)
