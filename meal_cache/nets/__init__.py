"""Networks: the architecture registry, timm and torchvision weights, block taps, checkpoints, and teachers resolved
by name and run with their taps.

- :mod:`.taps`                 forward hooks that collect a model's named block outputs
- :mod:`.torchvision_weights`  torchvision's pretrained weights by name (never downloaded in tests)
- :mod:`.timm_models`          timm's models as meal-cache models (``timm:NAME``), their blocks found
- :mod:`.models`               :func:`~.models.create_model`, the built-in architectures
- :mod:`.checkpoint`           training state written atomically, read with ``weights_only=True``
- :mod:`.teachers`             a teacher by name or ``ARCH:WEIGHTS``, and its outputs (logits, blocks, maps)

Imports :mod:`meal_cache.errors`, :mod:`meal_cache.runtime`, :mod:`meal_cache.projection`, :mod:`meal_cache.data`,
:mod:`meal_cache.views` and the store's schema; never extract, distill, engine or pipeline. This package
re-exports nothing: import from its modules.
"""
