"""How a store keeps its teachers' logits: every one (the default), or a compact encoding of
:mod:`meal_cache.store.encodings` chosen as ``NAME:K`` (``extract --logits topk:10``, ``--logits sample:16``).

:class:`LogitsChoice` is that choice as a layout records it; :func:`logits_encodings` finds the encodings (one
module each); :func:`parse_logits` reads the option and :func:`check_logits_choice` refuses what an encoding cannot
hold, naming the option.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import zlib
from dataclasses import dataclass

import numpy as np

import meal_cache.store.encodings as encodings_package
from meal_cache.errors import UserError, unknown_choice
from meal_cache.store.encodings import LogitsEncoding

# What ``--logits`` says for every logit (float16 or float32 as --dtype).
EVERY_LOGIT = "all"


@functools.cache
def logits_encodings() -> dict[str, LogitsEncoding]:
    """Every compact encoding by name, one module of :mod:`meal_cache.store.encodings` each."""
    found = {}
    for info in sorted(pkgutil.iter_modules(encodings_package.__path__), key=lambda info: info.name):
        encoding = importlib.import_module(f"{encodings_package.__name__}.{info.name}").ENCODING
        found[encoding.name] = encoding
    return found


@dataclass(frozen=True)
class LogitsChoice:
    """A compact encoding of the logits and its ``k``, as ``--logits NAME:K`` chooses it."""

    encoding_name: str
    k: int

    @property
    def encoding(self) -> LogitsEncoding:
        encodings = logits_encodings()
        if self.encoding_name not in encodings:
            raise unknown_choice("logits encoding", self.encoding_name, list(encodings))
        return encodings[self.encoding_name]

    def __str__(self) -> str:
        return f"{self.encoding_name}:{self.k}"

    def to_json(self) -> dict:
        return {"encoding": self.encoding_name, "k": self.k}

    @classmethod
    def from_json(cls, data: dict) -> LogitsChoice:
        return cls(str(data["encoding"]), int(data["k"]))


def parse_logits(text: str | None) -> LogitsChoice | None:
    """``--logits``: ``NAME:K`` for a compact encoding, ``all`` (or None) for every logit; a malformed value is one
    error naming the encodings."""
    if text is None or text == EVERY_LOGIT:
        return None
    encodings = logits_encodings()
    name, sep, k = str(text).partition(":")
    if name not in encodings and sep:
        raise unknown_choice("--logits encoding", name, list(encodings))
    if name not in encodings:
        forms = ", ".join(f"{name}:K" for name in encodings)
        raise UserError(f"--logits takes {EVERY_LOGIT} (every logit) or NAME:K ({forms}), got '{text}'")
    if not sep or not k.strip().isdigit():
        raise UserError(f"--logits {name}:K needs K, a whole number of classes a row, got '{text}'")
    return LogitsChoice(name, int(k))


def check_logits_choice(choice: LogitsChoice | None, temperature: float | None) -> None:
    """Refuse a ``k`` the encoding cannot hold and a temperature that is not a positive number, naming the option."""
    if choice is not None:
        encoding, k = choice.encoding, choice.k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"--logits {encoding.name}:K needs K of at least 1 ({EVERY_LOGIT}: every logit), "
                            f"got {k!r}")  # fmt: skip
        if encoding.max_k is not None and k > encoding.max_k:
            raise UserError(f"--logits {encoding.name}:K keeps at most {encoding.max_k} a row "
                            f"({encoding.max_k_reason}), got {k}")  # fmt: skip
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise UserError(f"--logits-temperature must be a positive number, got {temperature!r}")


def chunk_rng(seed: int, teacher: str, view: int, chunk: int) -> np.random.Generator:
    """The generator an encoding draws one chunk with: fixed by the store's seed, the teacher, the view and the
    chunk, so a chunk written again (resume, repair) gets the same draws whatever the batch size."""
    return np.random.default_rng([seed, zlib.crc32(teacher.encode()), view, chunk])
