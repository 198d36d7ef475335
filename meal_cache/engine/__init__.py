"""What runs a training: the one loop train and distill share, supervised training, evaluation, and the
collectives under ``torchrun``.

- :mod:`.distributed`  this process's rank and device, and the few collectives meal-cache needs
- :mod:`.evaluate`     logits of un-augmented images, metrics, a checkpoint evaluated end to end
- :mod:`.loop`         epochs, steps, checkpoints and resume, progress, metrics.jsonl
- :mod:`.train`        ``meal-cache train``: a teacher or a student trained on labels alone

Imports data, views, nets, store, :mod:`meal_cache.losses` and :mod:`meal_cache.runtime`; never extract, distill
or pipeline, which use it. This package re-exports nothing: import from its modules.
"""
