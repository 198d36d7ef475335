"""What one extract stores: :class:`ExtractConfig` (every setting of ``meal-cache extract``, checked, a ``--for``
preset's needs filled in) and the presets by name."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from meal_cache.data.source import check_decode
from meal_cache.dense import (
    DEFAULT_GRID,
    DenseSettings,
    check_settings,
    default_size,
)
from meal_cache.engine.loop import check_workers
from meal_cache.errors import UserError, unknown_choice
from meal_cache.extract.divergent import DivergentSearch, check_search
from meal_cache.projection import PROJECTIONS
from meal_cache.store.encodings import DEFAULT_LOGITS_TEMPERATURE
from meal_cache.store.keys import DEFAULT_FEATURES, FEATURE_KINDS
from meal_cache.store.logits import EVERY_LOGIT, LogitsChoice, check_logits_choice, logits_encodings, parse_logits
from meal_cache.store.schema import DEFAULT_ATTENTION_P, StoreNeeds
from meal_cache.views import augment
from meal_cache.views.mixing import Mixing

MIXING_FIELDS = ("mixup", "cutmix", "mix_prob", "mix_switch_prob")
DIVERGENT_FIELDS = ("divergent_views", "divergent_eps", "divergent_steps")


# ``--for all``: the default layout, as without --for; ``--for METHOD``: what the method declares it reads
# (:attr:`meal_cache.distill.Method.store_needs`).
STORE_EVERYTHING = StoreNeeds(DEFAULT_FEATURES, "all", "logits, and every block's pooled output and map (the default)")


def store_presets() -> dict[str, StoreNeeds]:
    """What ``extract --for NAME`` stores, by name: ``all``, then every method's (plug-ins included)."""
    # The methods own their needs; the registry is loaded only when a preset is asked for.
    from meal_cache.distill.registry import available_methods

    return {"all": STORE_EVERYTHING, **{name: cls.store_needs for name, cls in available_methods().items()}}


DEFAULT_BLOCKS = "all"


@dataclass
class ExtractConfig:
    """Everything that defines a store's contents; an existing store is resumed only under equal settings."""

    teachers: list[str]
    data: str = "digits"
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None
    split: str = "train"
    views: int = 4  # the views curve (docs/decisions.md): no gain measured beyond
    identity_view: bool = False
    policy: str = "crop"  # the views' policy after the crop: crop (none), randaugment, trivialaugment
    # timm's train.py knobs (None: the data's recipe's own; see augment.AugmentOptions): the random-resized crop's
    # area share and aspect ratio bounds, and each flip's chance.
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    vflip: float | None = None
    mixup: float = 0.0  # Mixup's Beta alpha (0: none); the teachers see the mixed images
    cutmix: float = 0.0  # CutMix's Beta alpha (0: none)
    mix_prob: float = 1.0  # the share of (view, row)s mixed
    mix_switch_prob: float = 0.5  # with both alphas: the chance of CutMix rather than Mixup (timm's switch_prob)
    divergent_views: int = 0  # divergent views: a PGD search for the fixed teachers' disagreement, stored
    divergent_eps: float = 0.03  # their L-infinity bound around the un-augmented image, a fraction of 0-255
    divergent_steps: int = 5  # signed-gradient ascent steps of 2.5 eps / steps each
    dense: bool = False  # one whole-image pass per teacher, maps from which distill derives any crop's targets
    dense_sizes: list[int] | None = None  # the whole image's sizes for the teacher (None: dense.default_size)
    dense_grid: int = DEFAULT_GRID  # the blocks' stored grid in a dense store
    seed: int = 0
    grid: int = 1
    blocks: str = "all"
    features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    # The p of the attention maps, the channel mean of |A|^p (None: DEFAULT_ATTENTION_P where they are stored).
    attention_p: float | None = None
    dtype: str = "float16"
    codec: str = "zstd:3"
    keep_bits: int | None = None
    quantize: int | None = None  # None: the --for preset's encoding (lossless without one); 0: lossless
    # lossy: "NAME:K", the logits in a compact encoding ("topk:10", "sample:16"); "all": every logit; None: the --for
    # preset's encoding, every logit without one
    logits: str | None = None
    logits_temperature: float | None = None  # the T of compact logits (None: DEFAULT_LOGITS_TEMPERATURE)
    project: int | None = None  # pooled blocks wider than this many channels are stored projected to it
    projection: str = "pca"  # how: the top principal directions (fitted on the first rows) or a random matrix
    preset: str | None = None  # ``--for METHOD``: store only what that method reads (see store_presets)
    batch_size: int = 256
    rows_per_chunk: int = 512
    # Zarr sharding: K chunks of rows of a view in one object, the unit of work (1: a chunk an object)
    shard_chunks: int = 1
    teacher_dir: str = "teachers"
    device: str = "auto"
    workers: int | None = None  # decoding processes for image files (None: from the core count)
    decode: str = "auto"  # where image files' JPEGs are decoded: cpu, cuda or auto (source.decode_device)

    def mixing(self) -> Mixing | None:
        """The views' Mixup/CutMix, None when neither is asked for."""
        mixing = Mixing(float(self.mixup), float(self.cutmix), float(self.mix_prob), float(self.mix_switch_prob))
        return mixing if mixing.enabled else None

    def augment_options(self) -> augment.AugmentOptions:
        """``--scale``, ``--ratio``, ``--hflip``, ``--vflip``, checked."""
        return augment.augment_options(self)

    def dense_settings(self, image_size: int, streamed: bool) -> DenseSettings | None:
        """A dense store's sizes and grid, None for a store of views."""
        if not self.dense:
            return None
        return DenseSettings(tuple(self.dense_sizes or (default_size(image_size, streamed),)), self.dense_grid)

    def divergent_search(self) -> DivergentSearch | None:
        """How the divergent views are searched, None without ``--divergent-views``."""
        if not self.divergent_views:
            return None
        return DivergentSearch(self.divergent_views, float(self.divergent_eps), self.divergent_steps, self.seed)

    def logits_choice(self) -> LogitsChoice | None:
        """The compact encoding of the logits and its k (None: every logit), checked."""
        return parse_logits(self.logits)

    def resolved(self) -> ExtractConfig:
        """The config with a ``--for`` preset's features and blocks filled in, every setting checked."""
        config = self
        if self.preset is not None:
            presets = store_presets()
            if self.preset not in presets:
                raise unknown_choice("--for method", self.preset, list(presets))
            preset = presets[self.preset]
            chosen = (tuple(self.features), self.blocks)
            if chosen not in ((DEFAULT_FEATURES, DEFAULT_BLOCKS), (preset.features, preset.blocks)):
                raise UserError(f"--for {self.preset} chooses the features and blocks itself; pass --for or "
                                "--features/--blocks, not both")  # fmt: skip
            config = dataclasses.replace(self, features=list(preset.features), blocks=preset.blocks)
            if self.quantize is None and self.keep_bits is None:
                config = dataclasses.replace(config, quantize=preset.quantize)
            if self.logits is None:
                config = dataclasses.replace(config, logits=None if preset.logits is None else str(preset.logits))
            if self.project is None:
                config = dataclasses.replace(config, project=preset.project)
        chosen = config.logits_choice()
        if config.dense and self.logits is None and chosen is not None and chosen.encoding.estimate:
            # A preset's estimate serves views only: a dense store averages logits over each crop's box, so it
            # keeps every logit unless --logits chooses an exact encoding.
            config, chosen = dataclasses.replace(config, logits=None), None
        if config.dense and config.preset is None and tuple(config.features) == DEFAULT_FEATURES:
            # A dense store's default: what it can derive per crop (channel-mean maps are per view).
            config = dataclasses.replace(config, features=["blocks"])
        if config.project == 0:
            config = dataclasses.replace(config, project=None)
        if config.logits == EVERY_LOGIT:
            config = dataclasses.replace(config, logits=None)
        elif chosen is not None:
            config = dataclasses.replace(config, logits=str(chosen))
        if config.quantize == 0:
            config = dataclasses.replace(config, quantize=None)
        if chosen is not None and config.logits_temperature is None:
            config = dataclasses.replace(config, logits_temperature=DEFAULT_LOGITS_TEMPERATURE)
        if "attention" in config.features and config.attention_p is None:
            config = dataclasses.replace(config, attention_p=DEFAULT_ATTENTION_P)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.teachers:
            raise UserError("name at least one teacher (--teachers resnet,densenet)")
        if len(set(self.teachers)) != len(self.teachers):
            raise UserError(f"a teacher is named twice in {','.join(self.teachers)}")
        if self.policy not in augment.POLICY_NAMES:
            raise unknown_choice("--policy", self.policy, list(augment.POLICY_NAMES))
        self.augment_options()
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or math.isnan(value):
                raise UserError(f"--{name} takes a Beta alpha >= 0 (0: no {name}), got {value!r}")
        for name in ("mix_prob", "mix_switch_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UserError(f"--{name.replace('_', '-')} is a probability in [0, 1], got {value!r}")
        check_search(self.divergent_views, self.divergent_eps, self.divergent_steps, len(self.teachers))
        if self.views < 1 and not self.identity_view:
            raise UserError("--views must be at least 1 (or 0 with --identity-view)")
        if self.grid not in (1, 2, 4):
            raise UserError(f"--grid must be 1, 2 or 4, got {self.grid}")
        unknown = set(self.features) - set(FEATURE_KINDS)
        if unknown or (not self.features and self.preset is None):
            raise UserError(f"--features takes {', '.join(FEATURE_KINDS)}, got {','.join(self.features)}")
        self._validate_attention()
        if self.batch_size < 1 or self.rows_per_chunk < 1:
            raise UserError("--batch-size and --rows-per-chunk must be at least 1")
        check_shard_chunks(self.shard_chunks)
        check_workers(self.workers)
        check_decode(self.decode)
        check_logits_choice(self.logits_choice(), self.logits_temperature)
        if self.dense:
            self._validate_dense()
        if self.project is not None:
            if isinstance(self.project, bool) or not isinstance(self.project, int) or self.project < 0:
                raise UserError(f"--project must be a whole number of channels, at least 1 (0: every channel), "
                                f"got {self.project!r}")  # fmt: skip
            if self.projection not in PROJECTIONS:
                raise unknown_choice("--projection", self.projection, list(PROJECTIONS))
            if "blocks" not in self.features:
                raise UserError(f"--project reduces the pooled blocks' channels; this store keeps no blocks "
                                f"(--features {','.join(self.features)}): add blocks, or leave --project "
                                "out")  # fmt: skip

    def _validate_attention(self) -> None:
        """Refuse an attention power that is not a positive number, one given without attention maps to apply it
        to, and attention maps in a dense store (they are per view, as channel-mean maps are)."""
        chosen = f"--for {self.preset}" if self.preset else f"--features {','.join(self.features)}"
        if self.attention_p is not None:
            p = self.attention_p
            if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0:
                raise UserError(f"--attention-p is the power of |A| in the stored attention maps, a number above 0 "
                                f"(the paper's default 2), got {p!r}")  # fmt: skip
            if "attention" not in self.features:
                raise UserError(f"--attention-p sets the power of the stored attention maps; {chosen} stores none: "
                                "add --features attention (or --for at), or leave --attention-p out")  # fmt: skip
        if self.dense and "attention" in self.features:
            raise UserError(f"--dense keeps logits and pooled blocks, from which any crop's are derived; {chosen} "
                            "asks for attention maps of each view, which it cannot derive: pass --features blocks "
                            "(or --for kd, meal, fitnet), or extract a store of views")  # fmt: skip

    def _validate_dense(self) -> None:
        """Refuse what a dense store cannot hold: anything but a crop and flips of the image (distill draws those
        per epoch), and per-view maps."""
        check_settings(self.dense_sizes, self.dense_grid)
        conflicts = {"--mixup/--cutmix": self.mixing() is not None,
                     f"--policy {self.policy}": self.policy != "crop",
                     "--divergent-views": bool(self.divergent_views),
                     "--identity-view": self.identity_view}  # fmt: skip
        for option, conflict in conflicts.items():
            if conflict:
                raise UserError(f"--dense derives a crop's targets from the whole image's maps, so distill draws only "
                                f"crops and flips; {option} makes views a dense store cannot derive: extract a store "
                                "of views for it, or leave it out")  # fmt: skip
        chosen = self.logits_choice()
        if chosen is not None and chosen.encoding.estimate:
            # RoIAlign averages the stored map's logits (for sampled classes T log(count / K)) over a crop's box: a
            # geometric mean of an estimate, no estimate of the teacher's softmax on the crop.
            exact = [f"{name}:K" for name, encoding in logits_encodings().items() if not encoding.estimate]
            raise UserError(f"--dense derives a crop's logits by averaging the whole image's logit map over the box; "
                            f"--logits {chosen} stores an estimate of the soft labels, whose averaged logs estimate "
                            f"nothing: pass --logits {' or '.join([*exact, EVERY_LOGIT])} with --dense, or extract a "
                            f"store of views with --logits {chosen}")  # fmt: skip
        if "maps" in self.features:
            chosen = f"--for {self.preset}" if self.preset else "--features maps"
            raise UserError(f"--dense keeps logits and pooled blocks, from which any crop's are derived; {chosen} "
                            "asks for channel-mean maps of each view, which it cannot derive: pass --features blocks "
                            "(or --for kd, meal, fitnet), or extract a store of views")  # fmt: skip


def check_shard_chunks(shard_chunks: object) -> None:
    """Refuse a ``--shard-chunks`` that is not a whole number of chunks, at least 1 (1: no sharding). Any such K is
    allowed: a view's last shard holds what rows are left, as its last chunk does."""
    if isinstance(shard_chunks, bool) or not isinstance(shard_chunks, int) or shard_chunks < 1:
        raise UserError(f"--shard-chunks K puts K chunks of rows of a view in one Zarr shard object, a whole number "
                        f"of at least 1 (1: no sharding), got {shard_chunks!r}")  # fmt: skip


def fitted_to_data(config: ExtractConfig, asked: ExtractConfig, num_classes: int) -> ExtractConfig:
    """A ``--for`` preset's compact logits dropped where the data has no more classes than it keeps, or every logit
    takes no more bytes a row (every logit is then exact and about as small: 10 float16 logits are 20 bytes, the top
    10 are 44); what the user asked for is kept as asked."""
    chosen = config.logits_choice()
    if asked.logits is not None or chosen is None:
        return config
    encoding, k = chosen.encoding, chosen.k
    every_logit = num_classes * np.dtype(config.dtype).itemsize
    if k >= num_classes or encoding.row_bytes(k, num_classes, config.dtype) >= every_logit:
        return dataclasses.replace(config, logits=None, logits_temperature=asked.logits_temperature)
    return config
