"""Replayable views: a view's parameters drawn from a seed (crop, flips, a policy's ops, Mixup/CutMix partners)
and applied to a batch on the device.

- :mod:`.mixing`    Mixup and CutMix: partners, shares and boxes drawn, mixed pixels and labels rebuilt
- :mod:`.augment`   :class:`~.augment.ViewParams`, :func:`~.augment.draw` and :func:`~.augment.render`
- :mod:`.policies`  RandAugment and TrivialAugmentWide ops after the crop

Imports only :mod:`meal_cache.errors` (and torch, torchvision); every other stage builds on it. This package
re-exports nothing: import from its modules.
"""
