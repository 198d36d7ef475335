"""meal-cache: offline multi-teacher adversarial distillation.

For your own training loop: ``from meal_cache import CachedViews, kd_loss, save_student``
(:mod:`meal_cache.cached_views`; ``save_student`` writes the checkpoint ``meal-cache evaluate`` reads).
"""

__version__ = "0.1.0"

# Imported on first use, so ``import meal_cache`` stays light (no torch) for the command line's start.
_LAZY = {
    "CachedViews": "meal_cache.cached_views",
    "kd_loss": "meal_cache.cached_views",
    "save_student": "meal_cache.nets.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meal_cache' has no attribute {name!r}")
