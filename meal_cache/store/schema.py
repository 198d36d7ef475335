"""What a store records about itself: its format, the teachers and their blocks, and the layout of their
outputs (see :mod:`meal_cache.store` for the arrays)."""

from __future__ import annotations

from dataclasses import dataclass

from meal_cache.store.logits import LogitsChoice, LogitsEncoding

# The format of the 0.x line: every store is written in it, whatever it holds (docs/store-format.md). A change a
# reader of this format would misread gets the next number, which this reader then refuses by name.
FORMAT = "meal-cache/11"
# The development formats before it (one per feature: /3 views' ops, /4 mixing, ... /9 attention maps, /10 the
# compact logits as two fields), never released: refused with the one fix, extract it again.
DEVELOPMENT_FORMATS = tuple(f"meal-cache/{n}" for n in range(1, 11))
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
    logits: LogitsChoice | None = None  # lossy: a compact encoding of the logits and its k (None: every logit)
    logits_temperature: float | None = None  # the T compact logits are made at (None: every logit kept)
    # extract --dense: {"sizes": [px, ...], "grid": G}, the teacher's input sizes of the whole image and the
    # blocks' stored grid (see meal_cache.dense); None: a store of views.
    dense: dict | None = None
    # The p of the attention maps (the channel mean of |A|^p) where the store holds them; None without them.
    attention_p: float | None = None
    # extract --shard-chunks K: K chunks of rows of one view in one Zarr shard object, and one unit of work (written
    # whole, marked done once); None: one chunk an object and a unit.
    shard_chunks: int | None = None

    @property
    def chunks_per_unit(self) -> int:
        """Chunks of rows in one unit of work: one shard's, or one."""
        return 1 if self.shard_chunks is None else int(self.shard_chunks)

    @property
    def rows_per_unit(self) -> int:
        """Rows one writer writes whole and marks done at once: a shard's rows, or a chunk's."""
        return self.rows_per_chunk * self.chunks_per_unit

    @property
    def logits_encoding(self) -> LogitsEncoding | None:
        """How the logits are kept when not every one is (see :mod:`meal_cache.store.encodings`)."""
        return None if self.logits is None else self.logits.encoding

    @property
    def logits_k(self) -> int | None:
        return None if self.logits is None else self.logits.k

    @property
    def logits_estimated(self) -> bool:
        """Whether the logits read back are an estimate at the store's temperature only (sampled classes)."""
        return self.logits is not None and self.logits.encoding.estimate

    @property
    def temperature(self) -> float:
        return 1.0 if self.logits_temperature is None else float(self.logits_temperature)

    def to_json(self) -> dict:
        data = {"rows_per_chunk": self.rows_per_chunk, "dtype": self.dtype, "codec": self.codec,
                "features": list(self.features), "keep_bits": self.keep_bits, "quantize": self.quantize,
                "logits": None if self.logits is None else self.logits.to_json()}  # fmt: skip
        # Recorded only when set, so a layout without them reads as it is written.
        for name in ("logits_temperature", "dense", "attention_p", "shard_chunks"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoreLayout:
        logits = None if data.get("logits") is None else LogitsChoice.from_json(data["logits"])
        return cls(int(data["rows_per_chunk"]), data["dtype"], data["codec"], tuple(data["features"]),
                   data.get("keep_bits"), data.get("quantize"), logits, data.get("logits_temperature"),
                   data.get("dense"), data.get("attention_p"), data.get("shard_chunks"))  # fmt: skip


@dataclass(frozen=True)
class StoreNeeds:
    """What ``extract --for METHOD`` stores: the feature kinds besides the logits (``blocks``: pooled channels,
    ``maps``: channel-mean maps), which blocks (``extract --blocks``), the lossy encoding of blocks and maps it
    uses unless ``--quantize``/``--keep-bits`` choose one, and the compact encoding of the logits it tolerates."""

    features: tuple[str, ...] = ()
    blocks: str = "all"
    help: str = "every logit"
    quantize: int | None = None
    # Unless --logits chooses: the logits in this compact encoding, made at distill's default temperature, wherever
    # that takes fewer bytes a row than every float16 logit of the data's classes. None: every logit, the safe
    # default for a method that has not been measured on a compact encoding.
    logits: LogitsChoice | None = None
    project: int | None = None  # unless --project: pooled blocks wider than this stored through PCA to it
