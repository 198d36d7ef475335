"""Top-k logits (``--logits topk:K``): each row's K largest logits and the log-sum-exp of all of them at T.

Read back, softmax(x / T) gives the K classes their exact probabilities at T and spreads the rest of the mass
evenly over the others (FKD's and TinyViT's rule, made exact at the temperature the student learns at).
Deterministic, but biased: the tail is flattened.
"""

from __future__ import annotations

import numpy as np

from meal_cache.store.encodings import LogitsEncoding


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


def decode_topk_tensors(index, value, lse, classes: int, dtype, temperature: float = 1.0):
    """:func:`decode_topk` on torch tensors (any rows, on their device), in float64 as it computes, to ``dtype``."""
    import torch

    top = value.double()
    norm = lse.double()[:, None]
    kept = torch.exp(top / temperature - norm).sum(1)
    rows, k = index.shape
    dense = torch.empty((rows, classes), dtype=torch.float64, device=top.device)
    if classes > k:
        rest = torch.clamp(1.0 - kept, min=1e-6 * (classes - k)) / (classes - k)
        dense[:] = (temperature * (norm[:, 0] + torch.log(rest)))[:, None]
    return dense.scatter_(1, index.long(), top).to(dtype)


ENCODING = LogitsEncoding(
    name="topk",
    parts=(("index", "int16", True), ("value", None, True), ("lse", "float32", False)),
    encode=lambda logits, k, dtype, temperature, rng: encode_topk(logits, k, dtype, temperature),
    decode=lambda parts, classes, dtype, temperature: decode_topk(
        parts["index"], parts["value"], parts["lse"], classes, dtype, temperature
    ),  # fmt: skip
    decode_tensors=lambda parts, classes, dtype, temperature: decode_topk_tensors(
        parts["index"], parts["value"], parts["lse"], classes, dtype, temperature
    ),  # fmt: skip
    description="the top {k} logits, exact at T={temperature:g}",
    kept="top {k}",
    top1="top-1",
    help="each row's K largest logits (int16 classes, --dtype values) and the log-sum-exp of all at "
    "--logits-temperature; read back exact at that temperature, the rest of the probability spread evenly over "
    "the other classes (4K+4 bytes a row)",
)
