"""The store's value codecs: the compressors (with their CRC-32C checksum), bit rounding, 8-bit quantisation of
blocks and maps with a per-row range, and top-k logits with their log-sum-exp (see :mod:`meal_cache.store`)."""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from meal_cache.errors import UserError
from meal_cache.store_schema import StoreLayout

QUANTIZE_BITS = (8,)


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


def encode_topk(logits: np.ndarray, k: int, dtype: str) -> dict[str, np.ndarray]:
    """Each row's ``k`` largest logits (classes as int16, largest first; values as ``dtype``) and the log-sum-exp
    of all its logits (float32, computed from the ``dtype`` values so the rebuilt probabilities match them)."""
    values = logits.astype(dtype)
    order = np.argsort(-values.astype(np.float32), axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(values, order, axis=1)
    wide = values.astype(np.float64)
    peak = wide.max(1, keepdims=True)
    lse = (peak[:, 0] + np.log(np.exp(wide - peak).sum(1))).astype(np.float32)
    return {"index": order.astype(np.int16), "value": top, "lse": lse}


def decode_topk(index: np.ndarray, value: np.ndarray, lse: np.ndarray, classes: int, dtype: str) -> np.ndarray:
    """Dense logits whose softmax gives each stored class its own probability, ``exp(value - lse)``, and spreads
    the remaining mass evenly over the other ``classes - k`` classes (the rule of FKD's and TinyViT's top-k soft
    labels); the log-sum-exp makes the stored classes' probabilities exact at temperature 1. With k = classes
    nothing is spread and the logits are the stored ones up to a constant."""
    rows, k = index.shape
    top = value.astype(np.float64)
    norm = lse.astype(np.float64)[:, None]
    kept = np.exp(top - norm).sum(1)
    dense = np.empty((rows, classes), dtype=np.float64)
    if classes > k:
        # At least a millionth of the mass each, so a rounded-off remainder never becomes log(0).
        rest = np.clip(1.0 - kept, 1e-6 * (classes - k), None) / (classes - k)
        dense[:] = (norm[:, 0] + np.log(rest))[:, None]
    np.put_along_axis(dense, index.astype(np.int64), top, axis=1)
    return dense.astype(dtype)


def dequantize_rows(codes: np.ndarray, ranges: np.ndarray, dtype: str) -> np.ndarray:
    """The values ``quantize_rows`` encoded, to within half a step."""
    shape = (len(codes),) + (1,) * (codes.ndim - 1)
    low, step = ranges[:, 0].reshape(shape), ranges[:, 1].reshape(shape)
    return (low + codes.astype(np.float32) * step).astype(dtype)
