"""A student whose output for a sample depends on that sample alone: resnet8_w4 with every BatchNorm replaced by a
one-group GroupNorm (per-sample statistics). Two ranks each holding half of a global batch then compute what one
process computes on the whole batch, up to float rounding, so a torchrun run can be compared with one process
weight for weight (tests/test_distributed.py). Run as a script, it is ``meal-cache`` with that student known as
``resnet8_w4_gn``: ``torchrun ... tests/groupnorm_student.py distill --student resnet8_w4_gn ...``."""

from __future__ import annotations

from torch import nn

from meal_cache.nets import models

NAME = "resnet8_w4_gn"


def _per_sample_norms(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            _per_sample_norms(child)
    return module


def _build(num_classes: int) -> nn.Module:
    return _per_sample_norms(models.MODELS["resnet8_w4"].build(num_classes))


ENTRY = models.ModelEntry(_build, models.MODELS["resnet8_w4"].blocks, "resnet8_w4 with per-sample GroupNorm")


if __name__ == "__main__":
    from meal_cache.cli import main

    models.MODELS[NAME] = ENTRY
    main()
