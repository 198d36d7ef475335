"""Teacher outputs refused before they reach the store when not finite: already in float32 (a broken teacher),
after the cast to the store's dtype (an overflow) or after its bit rounding, each explained by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.runtime import Precision


class NonFiniteOutput(Exception):
    """A chunk's teacher outputs hold inf or NaN: already in float32 (``stage`` "float32"), after the cast to the
    store's dtype ("cast") or after its bit rounding ("keep_bits"). Turned into a UserError naming the teacher
    and view by :func:`_run_teachers`."""

    def __init__(self, stage: str, keys: list[str], largest: float) -> None:
        super().__init__(stage, keys)
        self.stage, self.keys, self.largest = stage, keys, largest

    def explain(self, teacher: str, view: str, rows: slice, config: ExtractConfig, precision: Precision) -> str:
        others = f" (and {len(self.keys) - 1} more of its arrays)" if len(self.keys) > 1 else ""
        where = f"in its {self.keys[0]}{others} on {view}, rows {rows.start}-{rows.stop - 1}"
        overwrite = "(with --overwrite, to replace this unfinished store)"
        if self.stage == "float32":
            amp = (f"; it ran under {precision.dtype} autocast on CUDA: run with --device cpu to see whether it does"
                   " so in float32 too" if precision.on_cuda else "")  # fmt: skip
            return (f"teacher '{teacher}' gives non-finite values (inf or NaN) {where}, already in float32, before "
                    f"any cast to the store's {config.dtype}: the teacher itself is broken (check its checkpoint "
                    f"with `meal-cache evaluate`, or retrain it){amp}")  # fmt: skip
        largest = f"largest |value| {self.largest:.3g}"
        if self.stage == "cast":
            limit = float(np.finfo(config.dtype).max)
            return (f"teacher '{teacher}' gives values beyond {config.dtype}'s range ({largest}; {config.dtype} holds "
                    f"up to {limit:.6g}) {where}, which the store would hold as inf: extract with --dtype float32 "
                    f"{overwrite}")  # fmt: skip
        return (f"teacher '{teacher}' gives values that --keep-bits {config.keep_bits} rounds up to inf ({largest}, "
                f"near {config.dtype}'s largest) {where}: extract without --keep-bits, or with --dtype float32 "
                f"{overwrite}")  # fmt: skip


def _check_finite(raw: dict[str, np.ndarray], stored: dict[str, np.ndarray], config: ExtractConfig) -> None:
    """Raise :class:`NonFiniteOutput` when a teacher output is not finite as computed (float32), as cast to the
    store's dtype, or as the store's bit rounding (``keep_bits``) would write it; a quantised feature is coded
    from the cast values, so the cast covers it."""
    # A value not finite in float32 stays so after the cast, so one pass over the cast values finds every chunk
    # at fault; the float32 values are read only to tell a broken teacher from an overflowing cast.
    bad = [key for key, value in stored.items() if not np.isfinite(value).all()]
    if bad:
        broken = [key for key in bad if not np.isfinite(raw[key]).all()]
        stage, keys = ("float32", broken) if broken else ("cast", bad)
        raise NonFiniteOutput(stage, keys, _largest(raw, keys))
    if config.keep_bits is not None:
        from numcodecs import BitRound

        rounding = BitRound(keepbits=config.keep_bits)
        bad = [key for key, value in stored.items()
               if not np.isfinite(np.asarray(rounding.encode(value)).view(value.dtype)).all()]  # fmt: skip
        if bad:
            raise NonFiniteOutput("keep_bits", bad, _largest(raw, bad))


def _largest(raw: dict[str, np.ndarray], keys: list[str]) -> float:
    finite = [np.abs(raw[key][np.isfinite(raw[key])]) for key in keys]
    return max((float(values.max()) for values in finite if values.size), default=float("nan"))


def store_arrays(parts: dict[str, list[torch.Tensor]], config: ExtractConfig) -> dict[str, np.ndarray]:
    """A chunk's outputs cast to the store's dtype, refused (:class:`NonFiniteOutput`) when not finite."""
    raw = {key: torch.cat(values).numpy() for key, values in parts.items()}
    dtype = np.dtype(config.dtype)
    with np.errstate(over="ignore"):  # an overflow is reported below, by name, not as a numpy warning
        arrays = {key: value.astype(dtype) for key, value in raw.items()}
    _check_finite(raw, arrays, config)
    return arrays
