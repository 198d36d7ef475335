"""Sampled classes (``--logits sample:K``): K classes drawn from each row's softmax at T, kept as distinct classes
with their counts (random sampling KD).

Read back, softmax(x / T) is ``count / K``: an unbiased estimate of the teacher's distribution, so a loss whose
gradient is linear in the soft target (cross-entropy, KL) has an unbiased gradient, and cross-entropy an unbiased
value (KL's is not: the draws' entropy is biased low, so distill logs a sampled store's soft term as ``soft_ce``);
each draw is noisy. Losses not linear in the target (DKD's renormalised parts, a discriminator fed the targets,
RoIAlign over their logarithms) are refused. The draws are seeded per (store seed, teacher, view, chunk), so a
resumed or repeated extract writes the same ones.
"""

from __future__ import annotations

import numpy as np

from meal_cache.store.encodings import LogitsEncoding

MAX_SAMPLE = 255  # counts are stored as uint8
# Each class never drawn keeps this share of the mass (over all of them at most this much), so its logit stays
# finite in float16 while the estimate moves by less than a millionth.
SAMPLE_FLOOR = 1e-6


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


def decode_sample_tensors(index, count, classes: int, dtype, temperature: float):
    """:func:`decode_sample` on torch tensors (any rows, on their device), in float64 as it computes, to
    ``dtype``."""
    import torch

    draws = count.double().sum(1, keepdim=True)
    share = torch.zeros((len(index), classes), dtype=torch.float64, device=count.device)
    share.scatter_(1, index.long(), count.double() / torch.clamp(draws, min=1))
    return (temperature * torch.log(torch.clamp(share, min=SAMPLE_FLOOR / classes))).to(dtype)


ENCODING = LogitsEncoding(
    name="sample",
    parts=(("index", "int16", True), ("count", "uint8", True)),
    encode=lambda logits, k, dtype, temperature, rng: encode_sample(logits, k, temperature, rng),
    decode=lambda parts, classes, dtype, temperature: decode_sample(
        parts["index"], parts["count"], classes, dtype, temperature
    ),  # fmt: skip
    decode_tensors=lambda parts, classes, dtype, temperature: decode_sample_tensors(
        parts["index"], parts["count"], classes, dtype, temperature
    ),  # fmt: skip
    description="{k} classes drawn at T={temperature:g}",
    kept="{k} drawn",
    top1="most-drawn class right",
    help="K classes drawn (seeded) from each row's softmax at --logits-temperature, with their counts; read back "
    "as count / K, an unbiased estimate at that temperature for losses linear in the soft labels (3K bytes a row)",
    estimate=True,
    distinct=True,
    max_k=MAX_SAMPLE,
    max_k_reason="counts are one byte",
)
