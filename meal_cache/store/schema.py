"""What a store records about itself: its format (and which formats this version reads), the teachers and
their blocks, and the layout of their outputs (see :mod:`meal_cache.store` for the arrays)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meal_cache.store.logits import LogitsEncoding, chosen_encoding

if TYPE_CHECKING:
    from meal_cache.views.augment import ViewParams

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
# A dense store (extract --dense): one whole-image pass per teacher, its logits a map of positions and its blocks a
# grid, from which distill derives any crop's targets. A /7 reader would take the maps for one view's targets.
DENSE_FORMAT = "meal-cache/8"
# A store holding attention maps (extract --features attention, --for at): a /8 reader does not know the kind, so
# it would read 8-bit attention codes as values (TeacherStore.read decodes only the kinds it knows), verify them
# without their ranges and compare them as such in info --fidelity. Stores without attention keep their format.
ATTENTION_FORMAT = "meal-cache/9"
# Formats this version reads: /2 added top-k logits (a layout /1 readers would not know), /3 views' ops, /4 mixing,
# /5 divergent views, /6 sampled logits and the logits' temperature, /7 vertical flips, /8 dense stores, /9
# attention maps.
READABLE_FORMATS = ("meal-cache/1", FORMAT, OPS_FORMAT, MIX_FORMAT, DIVERGENT_FORMAT, LOGITS_FORMAT, VFLIP_FORMAT,
                    DENSE_FORMAT, ATTENTION_FORMAT)  # fmt: skip
VERSION = 1
# The power p of a stored attention map, the channel mean of |A|^p, unless extract --attention-p says: the
# paper's default (Zagoruyko and Komodakis, ICLR 2017), as in mdistiller.
DEFAULT_ATTENTION_P = 2.0
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
    # A dense store's: the grid the whole image's block output is stored at (``grid`` is then what distill pools
    # each crop's box of it to).
    stored_grid: int | None = None

    @property
    def key(self) -> str:
        return self.name

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """A row's pooled output as stored: (channels, g, g), g the dense grid in a dense store."""
        side = self.grid if self.stored_grid is None else self.stored_grid
        return self.channels, side, side

    def to_json(self) -> dict:
        data = {"name": self.name, "channels": self.channels, "grid": self.grid, "map": [self.height, self.width]}
        for name in ("projected_from", "stored_grid"):  # recorded only when set: older specs unchanged
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: dict) -> BlockSpec:
        optional = {name: None if data.get(name) is None else int(data[name])
                    for name in ("projected_from", "stored_grid")}  # fmt: skip
        return cls(data["name"], int(data["channels"]), int(data["grid"]), *map(int, data["map"]), **optional)


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
    # A dense store's: (h, w) of the logit map, the classifier at each position of the last block's output.
    dense_map: tuple[int, int] | None = None

    def to_json(self) -> dict:
        data = {
            "source": self.source,
            "arch": self.arch,
            "checkpoint_sha256": self.checkpoint_sha256,
            "classes": list(self.classes),
            "input": self.input,
            "blocks": [b.to_json() for b in self.blocks],
        }
        return data if self.dense_map is None else {**data, "dense_map": list(self.dense_map)}


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
    # extract --dense: {"sizes": [px, ...], "grid": G}, the teacher's input sizes of the whole image and the
    # blocks' stored grid (see meal_cache.dense); None: a store of views.
    dense: dict | None = None
    # The p of the attention maps (the channel mean of |A|^p) where the store holds them; None without them.
    attention_p: float | None = None

    @property
    def logits_encoding(self) -> LogitsEncoding | None:
        """How the logits are kept when not every one is (see :mod:`meal_cache.store.logits`)."""
        chosen = chosen_encoding(self.logits_topk, self.logits_sample)
        return None if chosen is None else chosen[0]

    @property
    def logits_k(self) -> int | None:
        chosen = chosen_encoding(self.logits_topk, self.logits_sample)
        return None if chosen is None else chosen[1]

    @property
    def temperature(self) -> float:
        return 1.0 if self.logits_temperature is None else float(self.logits_temperature)

    def to_json(self) -> dict:
        data = {"rows_per_chunk": self.rows_per_chunk, "dtype": self.dtype, "codec": self.codec,
                "features": list(self.features), "keep_bits": self.keep_bits, "quantize": self.quantize,
                "logits_topk": self.logits_topk}  # fmt: skip
        # Recorded only when set: older layouts unchanged.
        for name in ("logits_sample", "logits_temperature", "dense", "attention_p"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoreLayout:
        return cls(int(data["rows_per_chunk"]), data["dtype"], data["codec"], tuple(data["features"]),
                   data.get("keep_bits"), data.get("quantize"), data.get("logits_topk"), data.get("logits_sample"),
                   data.get("logits_temperature"), data.get("dense"), data.get("attention_p"))  # fmt: skip


def format_of(view: ViewParams, divergent: bool = False, layout: StoreLayout | None = None) -> str:
    """The oldest format whose readers replay ``view`` right (and know divergent views, the layout's logits and
    its feature kinds)."""
    if layout is not None and "attention" in layout.features:
        return ATTENTION_FORMAT
    if layout is not None and layout.dense is not None:
        return DENSE_FORMAT
    if view.vflip is not None:
        return VFLIP_FORMAT
    if layout is not None and (layout.logits_sample is not None or layout.temperature != 1.0):
        return LOGITS_FORMAT
    if divergent:
        return DIVERGENT_FORMAT
    if view.mix_partner is not None:
        return MIX_FORMAT
    return FORMAT if view.ops is None else OPS_FORMAT


@dataclass(frozen=True)
class StoreNeeds:
    """What ``extract --for METHOD`` stores: the feature kinds besides the logits (``blocks``: pooled channels,
    ``maps``: channel-mean maps), which blocks (``extract --blocks``), the lossy encoding of blocks and maps it
    uses unless ``--quantize``/``--keep-bits`` choose one, and the compact encoding of the logits it tolerates."""

    features: tuple[str, ...] = ()
    blocks: str = "all"
    help: str = "every logit"
    quantize: int | None = None
    # Unless --logits-topk/--logits-sample choose: the logits kept as their top k (logits_topk) or as k classes drawn
    # from the teacher's softmax (logits_sample), made at distill's default temperature, wherever that takes fewer
    # bytes a row than every float16 logit of the data's classes. Neither: every logit, the safe default for a
    # method that has not been measured on a compact encoding.
    logits_topk: int | None = None
    logits_sample: int | None = None
    project: int | None = None  # unless --project: pooled blocks wider than this stored through PCA to it

    def __post_init__(self) -> None:
        if self.logits_topk is not None and self.logits_sample is not None:
            raise ValueError("a store preset keeps its logits as top-k or as sampled classes, not both")
