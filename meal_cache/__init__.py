"""meal-cache: offline multi-teacher adversarial distillation.

For your own training loop: ``from meal_cache import CachedViews, kd_loss, save_student``
(:mod:`meal_cache.cached_views`; ``save_student`` writes the checkpoint ``meal-cache evaluate`` reads).
"""

__version__ = "0.1.0"

from meal_cache.registry import lazy_exports

# Imported on first use, so ``import meal_cache`` stays light (no torch) for the command line's start.
_EXPORTS = {"cached_views": ("CachedViews", "kd_loss"), "nets.checkpoint": ("save_student",)}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
