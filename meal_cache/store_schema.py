"""What a store records about itself: its format (and which formats this version reads), the teachers and
their blocks, and the layout of their outputs (see :mod:`meal_cache.store` for the arrays)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meal_cache.store_logits import LOGITS_ENCODINGS, LogitsEncoding

if TYPE_CHECKING:
    from meal_cache.augment import ViewParams

FORMAT = "meal-cache/2"
# A store whose views carry a policy's ops (extract --recipe randaugment|trivialaugment): a /2 reader would
# replay its views without the ops, so such a store says /3 and /2 readers refuse it. Crop-only stores stay /2.
OPS_FORMAT = "meal-cache/3"
# A store whose views mix rows (extract --mixup/--cutmix): /2 and /3 readers would replay unmixed pixels.
MIX_FORMAT = "meal-cache/4"
# A store with divergent views (extract --divergent-views): their pixels are stored, not replayed, so a /4 reader
# would take them for views to render from their (identity) crops.
DIVERGENT_FORMAT = "meal-cache/5"
# A store whose logits are sampled, or top-k made exact at a temperature other than 1 (extract --logits-sample,
# --logits-temperature): a /5 reader would rebuild them as top-k at temperature 1, silently wrong.
LOGITS_FORMAT = "meal-cache/6"
# A store whose views flip rows top to bottom (extract --vflip, the views/vflip array): a /6 reader would replay
# them unflipped. The other augmentation options (--scale, --ratio, --hflip) only change what is drawn into the
# arrays every reader replays, so they need no new format.
VFLIP_FORMAT = "meal-cache/7"
# Formats this version reads: /2 added top-k logits (a layout /1 readers would not know), /3 views' ops, /4 mixing,
# /5 divergent views, /6 sampled logits and the logits' temperature, /7 vertical flips.
READABLE_FORMATS = ("meal-cache/1", FORMAT, OPS_FORMAT, MIX_FORMAT, DIVERGENT_FORMAT, LOGITS_FORMAT, VFLIP_FORMAT)
VERSION = 1
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class BlockSpec:
    """One teacher block as stored: its module name, array key, channels, pooled grid and map size."""

    name: str
    channels: int  # as stored: the projection's D where the block is projected
    grid: int
    height: int
    width: int
    projected_from: int | None = None  # the block's own channels, where extract --project reduced them

    @property
    def key(self) -> str:
        return self.name

    def to_json(self) -> dict:
        data = {"name": self.name, "channels": self.channels, "grid": self.grid, "map": [self.height, self.width]}
        return data if self.projected_from is None else {**data, "projected_from": self.projected_from}

    @classmethod
    def from_json(cls, data: dict) -> BlockSpec:
        projected = data.get("projected_from")
        return cls(data["name"], int(data["channels"]), int(data["grid"]), *map(int, data["map"]),
                   projected_from=None if projected is None else int(projected))  # fmt: skip


@dataclass(frozen=True)
class TeacherSpec:
    """What the store records about one teacher; ``key`` names its group under ``teachers/``."""

    key: str
    source: str
    arch: str
    checkpoint_sha256: str | None
    classes: list[str]
    input: dict
    blocks: list[BlockSpec]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "arch": self.arch,
            "checkpoint_sha256": self.checkpoint_sha256,
            "classes": list(self.classes),
            "input": self.input,
            "blocks": [b.to_json() for b in self.blocks],
        }


@dataclass(frozen=True)
class StoreLayout:
    rows_per_chunk: int
    dtype: str
    codec: str
    features: tuple[str, ...]
    keep_bits: int | None = None  # lossy: mantissa bits kept by bit rounding (None: lossless)
    quantize: int | None = None  # lossy: blocks and maps as 8-bit codes with a per-row range (None: as dtype)
    logits_topk: int | None = None  # lossy: the K largest logits and the log-sum-exp (None: every logit)
    logits_sample: int | None = None  # lossy: K classes drawn from the teacher's softmax, with their counts
    logits_temperature: float | None = None  # the T top-k and sampled logits are made at (None: 1, older stores)

    @property
    def logits_encoding(self) -> LogitsEncoding | None:
        """How the logits are kept when not every one is (see :mod:`meal_cache.store_logits`)."""
        if self.logits_sample is not None:
            return LOGITS_ENCODINGS["sample"]
        return None if self.logits_topk is None else LOGITS_ENCODINGS["topk"]

    @property
    def logits_k(self) -> int | None:
        return self.logits_sample if self.logits_sample is not None else self.logits_topk

    @property
    def temperature(self) -> float:
        return 1.0 if self.logits_temperature is None else float(self.logits_temperature)

    def to_json(self) -> dict:
        data = {"rows_per_chunk": self.rows_per_chunk, "dtype": self.dtype, "codec": self.codec,
                "features": list(self.features), "keep_bits": self.keep_bits, "quantize": self.quantize,
                "logits_topk": self.logits_topk}  # fmt: skip
        for name in ("logits_sample", "logits_temperature"):  # recorded only when set: older layouts unchanged
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoreLayout:
        return cls(int(data["rows_per_chunk"]), data["dtype"], data["codec"], tuple(data["features"]),
                   data.get("keep_bits"), data.get("quantize"), data.get("logits_topk"), data.get("logits_sample"),
                   data.get("logits_temperature"))  # fmt: skip


def format_of(view: ViewParams, divergent: bool = False, layout: StoreLayout | None = None) -> str:
    """The oldest format whose readers replay ``view`` right (and know divergent views and the layout's logits)."""
    if view.vflip is not None:
        return VFLIP_FORMAT
    if layout is not None and (layout.logits_sample is not None or layout.temperature != 1.0):
        return LOGITS_FORMAT
    if divergent:
        return DIVERGENT_FORMAT
    if view.mix_partner is not None:
        return MIX_FORMAT
    return FORMAT if view.ops is None else OPS_FORMAT
