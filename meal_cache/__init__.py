"""meal-cache: offline multi-teacher adversarial distillation."""

__version__ = "0.1.0"
