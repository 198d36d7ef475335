"""Teacher logits kept in fewer bytes than every class: ``extract --logits-topk K`` and ``--logits-sample K``.

Both keep a handful of numbers per row and are read back as dense logits (so every loss reads any store alike),
built to be right at the store's *logits temperature* T (``--logits-temperature``, distill's soft-label
temperature; 1 in stores made before it existed):

- **top-k** keeps each row's K largest logits and the log-sum-exp of all of them at T. Read back, softmax(x / T)
  gives the K classes their exact probabilities at T and spreads the rest of the mass evenly over the others
  (FKD's and TinyViT's rule, made exact at the temperature the student learns at). Deterministic, but biased:
  the tail is flattened.
- **sampled** keeps K classes drawn from the teacher's softmax at T, as distinct classes with their counts (random
  sampling KD). Read back, softmax(x / T) is ``count / K``: an unbiased estimate of the teacher's distribution,
  so a loss whose gradient is linear in the soft target (cross-entropy, KL) has an unbiased gradient, and
  cross-entropy an unbiased value (KL's is not: the draws' entropy is biased low, so distill logs a sampled store's
  soft term as ``soft_ce``); each draw is noisy. Losses not linear in the target (DKD's renormalised parts, a
  discriminator fed the targets, RoIAlign over their logarithms) are refused. The draws are seeded per (store
  seed, teacher, view, chunk), so a resumed or repeated extract writes the same ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from meal_cache.errors import UserError

MAX_SAMPLE = 255  # counts are stored as uint8
# Each class never drawn keeps this share of the mass (over all of them at most this much), so its logit stays
# finite in float16 while the estimate moves by less than a millionth.
SAMPLE_FLOOR = 1e-6


# The temperature top-k and sampled logits are made at unless --logits-temperature says: distill's default (every
# method's, unless it sets its own), so a store made for a method serves it without a temperature mismatch.
DEFAULT_LOGITS_TEMPERATURE = 4.0


def encode_topk(logits: np.ndarray, k: int, dtype: str, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Each row's ``k`` largest logits (classes as int16, largest first; values as ``dtype``) and the log-sum-exp
    of all its logits divided by ``temperature`` (float32, computed from the ``dtype`` values so the rebuilt
    probabilities match them)."""
    values = logits.astype(dtype)
    order = np.argsort(-values.astype(np.float32), axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(values, order, axis=1)
    wide = values.astype(np.float64) / temperature
    peak = wide.max(1, keepdims=True)
    lse = (peak[:, 0] + np.log(np.exp(wide - peak).sum(1))).astype(np.float32)
    return {"index": order.astype(np.int16), "value": top, "lse": lse}


def decode_topk(
    index: np.ndarray, value: np.ndarray, lse: np.ndarray, classes: int, dtype: str, temperature: float = 1.0
) -> np.ndarray:
    """Dense logits whose softmax at ``temperature`` gives each stored class its own probability,
    ``exp(value / T - lse)``, and spreads the remaining mass evenly over the other ``classes - k`` classes. With
    k = classes nothing is spread and the logits are the stored ones up to a constant."""
    rows, k = index.shape
    top = value.astype(np.float64)
    norm = lse.astype(np.float64)[:, None]
    kept = np.exp(top / temperature - norm).sum(1)
    dense = np.empty((rows, classes), dtype=np.float64)
    if classes > k:
        # At least a millionth of the mass each, so a rounded-off remainder never becomes log(0).
        rest = np.clip(1.0 - kept, 1e-6 * (classes - k), None) / (classes - k)
        dense[:] = (temperature * (norm[:, 0] + np.log(rest)))[:, None]
    np.put_along_axis(dense, index.astype(np.int64), top, axis=1)
    return dense.astype(dtype)


def softmax_rows(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Each row's softmax at ``temperature``, in float64 and summing to 1 (as numpy's multinomial wants it)."""
    wide = logits.astype(np.float64) / temperature
    wide -= wide.max(1, keepdims=True)
    probs = np.exp(wide)
    return probs / probs.sum(1, keepdims=True)


def encode_sample(logits: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``k`` classes drawn with replacement from each row's softmax at ``temperature``: the distinct classes
    (int16, most drawn first; ``min(k, classes)`` slots, unused ones with count 0) and their counts (uint8,
    summing to ``k``)."""
    counts = rng.multinomial(k, softmax_rows(logits, temperature))
    slots = min(k, logits.shape[1])
    order = np.argsort(-counts, axis=1, kind="stable")[:, :slots]
    return {"index": order.astype(np.int16), "count": np.take_along_axis(counts, order, axis=1).astype(np.uint8)}


def decode_sample(index: np.ndarray, count: np.ndarray, classes: int, dtype: str, temperature: float) -> np.ndarray:
    """Dense logits whose softmax at ``temperature`` is each row's share of the draws, ``count / K`` (classes
    never drawn: :data:`SAMPLE_FLOOR` / classes each)."""
    draws = count.astype(np.float64).sum(1, keepdims=True)
    share = np.zeros((len(index), classes), dtype=np.float64)
    np.put_along_axis(share, index.astype(np.int64), count / np.maximum(draws, 1), axis=1)
    return (temperature * np.log(np.maximum(share, SAMPLE_FLOOR / classes))).astype(dtype)


@dataclass(frozen=True)
class LogitsEncoding:
    """One way of keeping a teacher's logits in a few numbers per row: its arrays (``logits_NAME/PART``), how a
    chunk is encoded and read back dense."""

    name: str
    option: str
    parts: tuple[tuple[str, str | None, bool], ...]  # (part, dtype (None: the layout's), has a slot axis)
    encode: Callable[..., dict[str, np.ndarray]]  # (logits, k, dtype, temperature, rng)
    decode: Callable[..., np.ndarray]  # (parts dict, classes, dtype, temperature)
    description: str  # of a layout, formatted with k and temperature
    distinct: bool = False  # one slot a distinct class, so never more slots than classes

    def keys(self, key: str) -> list[str]:
        """The arrays that hold ``teachers/NAME/logits``, in the order of :attr:`parts`."""
        return [f"{key}_{self.name}/{part}" for part, _, _ in self.parts]

    def slots(self, k: int, classes: int) -> int:
        return min(k, classes) if self.distinct else k

    def row_bytes(self, k: int, classes: int, dtype: str) -> int:
        """Bytes one row's parts take before compression, at ``k`` and the layout's ``dtype``."""
        slots = self.slots(k, classes)
        return sum(np.dtype(part_dtype or dtype).itemsize * (slots if slotted else 1)
                   for _, part_dtype, slotted in self.parts)  # fmt: skip


LOGITS_ENCODINGS = {
    "topk": LogitsEncoding(
        "topk", "--logits-topk", (("index", "int16", True), ("value", None, True), ("lse", "float32", False)),
        lambda logits, k, dtype, temperature, rng: encode_topk(logits, k, dtype, temperature),
        lambda parts, classes, dtype, temperature: decode_topk(parts["index"], parts["value"], parts["lse"],
                                                               classes, dtype, temperature),
        "the top {k} logits, exact at T={temperature:g}",
    ),
    "sample": LogitsEncoding(
        "sample", "--logits-sample", (("index", "int16", True), ("count", "uint8", True)),
        lambda logits, k, dtype, temperature, rng: encode_sample(logits, k, temperature, rng),
        lambda parts, classes, dtype, temperature: decode_sample(parts["index"], parts["count"], classes, dtype,
                                                                 temperature),
        "{k} classes drawn at T={temperature:g}",
        distinct=True,
    ),
}  # fmt: skip


def chosen_encoding(topk: int | None, sample: int | None) -> tuple[LogitsEncoding, int] | None:
    """The compact encoding ``--logits-sample K`` or ``--logits-topk K`` chooses, with its K; None: every logit."""
    if sample is not None:
        return LOGITS_ENCODINGS["sample"], sample
    return None if topk is None else (LOGITS_ENCODINGS["topk"], topk)


def sample_rng(seed: int, teacher: str, view: int, chunk: int) -> np.random.Generator:
    """The generator of one chunk's draws: fixed by the store's seed, the teacher, the view and the chunk, so a
    chunk written again (resume, repair) gets the same draws whatever the batch size."""
    return np.random.default_rng([seed, zlib.crc32(teacher.encode()), view, chunk])


def check_logits_options(topk: int | None, sample: int | None, temperature: float | None) -> None:
    """Refuse lossy-logits settings that make no sense, naming the option."""
    if topk is not None and sample is not None:
        raise UserError("--logits-topk and --logits-sample are two ways of keeping the logits; choose one")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 0):
        raise UserError(f"--logits-topk must be a whole number, at least 1 (0: every logit), got {topk!r}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise UserError(f"--logits-sample must be a whole number, at least 1, got {sample!r}")
    if sample is not None and sample > MAX_SAMPLE:
        raise UserError(f"--logits-sample draws at most {MAX_SAMPLE} classes a row (counts are one byte), got {sample}")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise UserError(f"--logits-temperature must be a positive number, got {temperature!r}")
