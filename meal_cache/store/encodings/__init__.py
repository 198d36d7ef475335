"""The compact encodings of a teacher's logits, one module each, every one a :class:`LogitsEncoding` called
``ENCODING`` (``extract --logits NAME:K``): top-k and sampled classes. A new encoding is one new module here; the
store creates its arrays, writes and reads them, checks K and refuses what it cannot serve from these fields alone.

Every encoding is read back as dense logits, so every loss reads any store alike, and is built to be right at
the store's *logits temperature* T (``--logits-temperature``, distill's soft-label temperature).

Imports only numpy and :mod:`meal_cache.errors` (an encoding's tensor decoder imports torch when it runs);
:mod:`meal_cache.store.logits` finds the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The temperature compact logits are made at unless --logits-temperature says: distill's default (every method's,
# unless it sets its own), so a store made for a method serves it without a temperature mismatch.
DEFAULT_LOGITS_TEMPERATURE = 4.0


@dataclass(frozen=True)
class LogitsEncoding:
    """One way of keeping a teacher's logits in ``k`` numbers a row: its arrays (``logits_NAME/PART``), how a
    chunk is encoded and read back dense, and what the read-back logits are good for."""

    name: str
    parts: tuple[tuple[str, str | None, bool], ...]  # (part, dtype (None: the layout's), has a slot axis)
    # (logits (rows, classes), k, dtype, temperature, rng) -> each part's values; rng is the chunk's own generator.
    encode: Callable[..., dict[str, np.ndarray]]
    decode: Callable[..., np.ndarray]  # (parts dict, classes, dtype, temperature) -> dense logits (rows, classes)
    description: str  # of a layout, formatted with k and temperature
    kept: str  # how many a row it keeps, for a table: formatted with k ("top {k}")
    top1: str  # what its stored top-1 agreement with the teacher measures
    help: str  # what `extract --help` says of it
    # An estimate at its temperature only: the read-back softmax estimates the teacher's at T (unbiased for a loss
    # linear in the soft labels), so distill refuses other temperatures and losses not linear in the target, and
    # a dense store (which averages logits over a crop's box) cannot hold it. False: the values are the teacher's
    # own where kept.
    estimate: bool = False
    distinct: bool = False  # one slot a distinct class, so never more slots than classes (else k <= classes)
    max_k: int | None = None  # the largest k its parts can hold
    max_k_reason: str = ""
    # ``decode`` on torch tensors of any rows, on their device (distill keeps a view as stored and decodes each
    # batch): (parts dict of tensors, classes, torch dtype, temperature) -> dense logits. None: ``decode`` runs on
    # the batch's parts on the CPU.
    decode_tensors: Callable[..., Any] | None = None

    def keys(self, key: str) -> list[str]:
        """The arrays that hold ``teachers/NAME/logits``, in the order of :attr:`parts`."""
        return [f"{key}_{self.name}/{part}" for part, _, _ in self.parts]

    def slots(self, k: int, classes: int) -> int:
        return min(k, classes) if self.distinct else k

    def keeps_every_logit(self, k: int, classes: int) -> bool:
        """Whether the read-back logits are the teacher's, up to a constant a row."""
        return not self.estimate and k >= classes

    def row_bytes(self, k: int, classes: int, dtype: str) -> int:
        """Bytes one row's parts take before compression, at ``k`` and the layout's ``dtype``."""
        slots = self.slots(k, classes)
        return sum(np.dtype(part_dtype or dtype).itemsize * (slots if slotted else 1)
                   for _, part_dtype, slotted in self.parts)  # fmt: skip
