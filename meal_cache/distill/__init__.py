"""Stage 2: train the student (and a method's discriminators, adapters or peers) from the teacher cache alone.

Each epoch ``e`` replays augmented view ``e mod V`` of the store: the stored augmentation is applied to the
dataset's images on the device, so the student sees exactly the pixels the teachers saw, and the teachers' logits
and block features for those pixels come from the store. The teachers' checkpoints are never opened, except by the
``--online`` reference, which runs the teachers in the loop on the same replayed images.

The house: :mod:`.config` (the run's settings and their checks), :mod:`.feed` (which rows, targets and views a step
gets), :mod:`.step` (the epoch plan and one step), :mod:`.run` (build, train, resume, write), and
:mod:`.methods`, one file a method, found by :mod:`.registry` (plug-ins too, by entry point).

Imports the flat modules (errors, registry, remote, runtime, losses, dense, projection, analysis) and the data,
views, nets, store and engine packages; nothing of extract or pipeline (tests/test_import_graph.py holds the layers).
"""

from __future__ import annotations

from meal_cache.registry import lazy_exports

# Each module's names that ``meal_cache.distill`` offers, loaded on first use: ``from meal_cache.distill import
# Method`` loads the method base and not the run, its feed or the loop (tests/test_import_graph.py reads this table).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "config": ("DIVERGENT_RATIO", "PRESETS", "DistillConfig", "Preset"),
    "feed": (
        "InMemoryBatches", "MultiCropBatches", "OnlineTeachers", "StreamingBatches", "ViewFeed", "make_batch_source",
        "view_bytes",
    ),
    "methods.adversarial": (
        "ADV_GAMES", "DISCRIMINATORS", "AdversarialInput", "AdversarialMethod", "AdversarialOutput",
    ),
    "methods.base": ("REPRESENTATIONS", "SELECTIONS", "Batch", "Method", "MethodOutput", "StoreNeeds",
                     "soft_target_sets"),
    "methods.meal": ("BlockPair", "MealFamily", "match_blocks", "parse_discriminators"),
    "registry": ("ENTRY_POINT_GROUP", "available_methods", "method_class"),
    "run": ("DistillRun", "build_run", "distill", "load_store_dataset", "stored_features"),
    "step": ("DistillEpochs", "gradient_norms"),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
