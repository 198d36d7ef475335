"""Stage 2: train the student (and a method's discriminators, adapters or peers) from the teacher cache alone.

Each epoch ``e`` replays augmented view ``e mod V`` of the store: the stored augmentation is applied to the
dataset's images on the device, so the student sees exactly the pixels the teachers saw, and the teachers' logits
and block features for those pixels come from the store. The teachers' checkpoints are never opened, except by the
``--online`` reference, which runs the teachers in the loop on the same replayed images.

The house: :mod:`.config` (the run's settings and their checks), :mod:`.feed` (which rows, targets and views a step
gets), :mod:`.step` (the epoch plan and one step), :mod:`.run` (build, train, resume, write), and
:mod:`.methods`, one file a method, found by :mod:`.registry` (plug-ins too, by entry point).
"""

from meal_cache.distill.config import (
    ADV_GAMES,
    DIVERGENT_RATIO,
    PRESETS,
    DistillConfig,
    Preset,
    parse_discriminators,
)
from meal_cache.distill.feed import (
    InMemoryBatches,
    MultiCropBatches,
    OnlineTeachers,
    StreamingBatches,
    ViewFeed,
    make_batch_source,
    view_bytes,
)
from meal_cache.distill.methods.base import (
    DISCRIMINATORS,
    REPRESENTATIONS,
    SELECTIONS,
    AdversarialInput,
    DistillerOutput,
    Method,
    StoreNeeds,
    soft_target_sets,
)
from meal_cache.distill.methods.meal import BlockPair, Distiller, match_blocks
from meal_cache.distill.registry import ENTRY_POINT_GROUP, available_methods, method_class
from meal_cache.distill.run import DistillRun, build_run, distill, load_store_dataset, stored_features
from meal_cache.distill.step import DistillEpochs, gradient_norms

__all__ = [
    "ADV_GAMES", "DISCRIMINATORS", "DIVERGENT_RATIO", "ENTRY_POINT_GROUP", "PRESETS", "REPRESENTATIONS",
    "SELECTIONS", "AdversarialInput", "BlockPair", "DistillConfig", "DistillEpochs", "DistillRun", "Distiller",
    "DistillerOutput", "InMemoryBatches", "Method", "MultiCropBatches", "OnlineTeachers", "Preset", "StoreNeeds",
    "StreamingBatches", "ViewFeed", "available_methods", "build_run", "distill", "gradient_norms",
    "load_store_dataset", "make_batch_source", "match_blocks", "method_class", "parse_discriminators",
    "soft_target_sets", "stored_features", "view_bytes",
]  # fmt: skip
