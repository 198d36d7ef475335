"""A view's policy after its crop (``extract --policy randaugment|trivialaugment``): torchvision.transforms.v2's
RandAugment (2 ops a row at magnitude bin 9 of 31) and TrivialAugmentWide (1 op a row, a uniform bin), with
torchvision's op list and magnitude ranges (:data:`SPACES`, checked against torchvision's own tables in the tests).
Each row's ops are drawn as indices into :data:`OP_NAMES` (int8, -1 none) with signed magnitude bins (int8);
:func:`apply_ops` applies them on uint8 with torchvision.transforms.v2.functional, once per (op, magnitude) present
in the batch on the rows that drew it, so a row's pixels never depend on the other rows. Glyphs (the ``digits``
recipe) draw from :data:`GLYPH_OPS` over RandAugment's narrower ranges (:func:`policy_for`). The rest of a view
(crop, flips, mixing) is :mod:`meal_cache.views.augment`'s, which re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from meal_cache.errors import unknown_choice

# torchvision.transforms.v2's RandAugment and TrivialAugmentWide (torchvision 0.29, _auto_augment.py): both draw
# from these 14 ops in this order; a stored op is an index into this tuple, so the order never changes.
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # fmt: skip
OP_INDEX = {name: index for index, name in enumerate(OP_NAMES)}
NUM_BINS = 31  # torchvision's num_magnitude_bins
NO_OP = -1


def _linear(low: float, high: float):
    return lambda bins, height, width: torch.linspace(low, high, bins)


# Per space, each op's magnitudes over the bins (None: the op takes none) and whether its sign is drawn: the
# lambdas of torchvision's _AUGMENTATION_SPACE, copied so a stored bin keeps its meaning whatever torchvision's
# version (tests/test_augment_replay.py checks them against the installed torchvision).
SPACES: dict[str, dict[str, tuple]] = {
    "randaugment": {
        "Identity": (None, False),
        "ShearX": (_linear(0.0, 0.3), True),
        "ShearY": (_linear(0.0, 0.3), True),
        "TranslateX": (lambda bins, height, width: torch.linspace(0.0, 150.0 / 331.0 * width, bins), True),
        "TranslateY": (lambda bins, height, width: torch.linspace(0.0, 150.0 / 331.0 * height, bins), True),
        "Rotate": (_linear(0.0, 30.0), True),
        "Brightness": (_linear(0.0, 0.9), True),
        "Color": (_linear(0.0, 0.9), True),
        "Contrast": (_linear(0.0, 0.9), True),
        "Sharpness": (_linear(0.0, 0.9), True),
        "Posterize": (lambda bins, height, width: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
        "Solarize": (_linear(1.0, 0.0), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    },
    "trivialaugment-wide": {
        "Identity": (None, False),
        "ShearX": (_linear(0.0, 0.99), True),
        "ShearY": (_linear(0.0, 0.99), True),
        "TranslateX": (_linear(0.0, 32.0), True),
        "TranslateY": (_linear(0.0, 32.0), True),
        "Rotate": (_linear(0.0, 135.0), True),
        "Brightness": (_linear(0.0, 0.99), True),
        "Color": (_linear(0.0, 0.99), True),
        "Contrast": (_linear(0.0, 0.99), True),
        "Sharpness": (_linear(0.0, 0.99), True),
        "Posterize": (lambda bins, height, width: (8 - (torch.arange(bins) / ((bins - 1) / 6))).round().int(), False),
        "Solarize": (_linear(1.0, 0.0), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    },
}
# What glyphs draw from: no Solarize (it inverts the strokes above its threshold, so ink and background swap)
# and no Equalize (on a glyph that is mostly background it lifts the background to mid-grey); flips are never
# drawn for glyphs anyway. Color stays: a no-op on grey digits, but the digits recipe also serves SVHN's colour.
GLYPH_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
             "Contrast", "Sharpness", "Posterize", "AutoContrast")  # fmt: skip
POLICY_NAMES = ("crop", "randaugment", "trivialaugment")


@dataclass(frozen=True)
class Policy:
    """The ops a view draws after its crop: ``num_ops`` a row from ``ops``, at bin ``magnitude`` of
    ``space``'s ranges (RandAugment) or a uniform bin (``magnitude`` None: TrivialAugmentWide)."""

    name: str
    space: str
    ops: tuple[str, ...]
    num_ops: int
    magnitude: int | None

    def to_json(self) -> dict:
        return {"name": self.name, "space": self.space, "ops": list(self.ops), "num_ops": self.num_ops,
                "magnitude": self.magnitude, "bins": NUM_BINS}  # fmt: skip


def policy_for(name: str, data_recipe: str) -> Policy | None:
    """``extract --policy NAME`` for data of ``data_recipe``: None for ``crop`` (the crop and flip alone).
    RandAugment is torchvision's defaults (2 ops, bin 9 of 31), TrivialAugment its TrivialAugmentWide; glyphs
    draw from :data:`GLYPH_OPS`, and TrivialAugment's wide ranges (rotations to 135 degrees, which turn a 6
    into a 9; 32 px shifts, twice a 16 px digit) become RandAugment's there."""
    if name not in POLICY_NAMES:
        raise unknown_choice("--policy", name, list(POLICY_NAMES))
    if name == "crop":
        return None
    glyphs = data_recipe == "digits"
    ops = GLYPH_OPS if glyphs else OP_NAMES
    if name == "randaugment":
        return Policy("randaugment", "randaugment", ops, 2, 9)
    return Policy("trivialaugment", "randaugment" if glyphs else "trivialaugment-wide", ops, 1, None)


def policy_from_json(data: dict | None) -> Policy | None:
    if not data:
        return None
    return Policy(data["name"], data["space"], tuple(data["ops"]), int(data["num_ops"]), data["magnitude"])


def _draw_ops(policy: Policy, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, policy.num_ops)
    allowed = torch.tensor([OP_INDEX[name] for name in policy.ops])
    ops = allowed[torch.randint(len(allowed), shape, generator=generator)]
    if policy.magnitude is None:
        bins = torch.randint(NUM_BINS, shape, generator=generator)
    else:
        bins = torch.full(shape, policy.magnitude)
    negative = torch.rand(shape, generator=generator) <= 0.5  # torchvision's test for a negated magnitude
    space = SPACES[policy.space]
    takes = torch.tensor([space[name][0] is not None for name in OP_NAMES])[ops]
    signed = torch.tensor([space[name][1] for name in OP_NAMES])[ops]
    bins = torch.where(takes, bins, 0)
    magnitude = torch.where(signed & negative, -bins, bins)
    return ops.to(torch.int8), magnitude.to(torch.int8)


def op_magnitude(space: str, op: int, signed_bin: int, height: int, width: int) -> float:
    """The magnitude torchvision would pass for op ``op`` at ``signed_bin`` on an image of ``height x width``."""
    magnitudes, _ = SPACES[space][OP_NAMES[op]]
    if magnitudes is None:
        return 0.0
    value = float(magnitudes(NUM_BINS, height, width)[abs(signed_bin)])
    return -value if signed_bin < 0 else value


def _apply_op(images: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's _AutoAugmentBase._apply_image_or_video_transform on uint8 ``(B, 3, H, W)``, its default
    nearest interpolation and no fill (zeros)."""
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return images
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear], interpolation=nearest,
                         fill=None, center=[0, 0])  # fmt: skip
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                         fill=None)  # fmt: skip
    if name == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=nearest, fill=None)
    if name == "Brightness":
        return TF.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if name == "Solarize":
        return TF.solarize(images, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(images)
    if name == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"no op {name}")


class ViewOps(Protocol):
    """The ops of a view's rows, as :class:`~meal_cache.views.augment.ViewParams` holds them (None: no policy)."""

    @property
    def ops(self) -> torch.Tensor | None: ...

    @property
    def magnitude(self) -> torch.Tensor | None: ...

    @property
    def space(self) -> str | None: ...

    def __len__(self) -> int: ...

    def to(self, device: torch.device | str) -> ViewOps: ...


def apply_ops(images: torch.Tensor, params: ViewOps) -> torch.Tensor:
    """The view's ops on its rows' pixels (uint8, or float 0-255 from :func:`render`), in order, after the crop
    and flip; same dtype and device out. A row with any op (Identity too) is taken as uint8, as torchvision's
    ops take it (float pixels are rounded first: exact for every crop of the output size); rows without ops are
    returned untouched. Each op runs once per magnitude present, on the rows that drew that pair, so every row's
    pixels depend on its own parameters alone."""
    if params.ops is None or not len(params):
        return images
    params = params.to(images.device)
    ops, magnitude = params.ops.long(), params.magnitude.long()
    touched = (ops != NO_OP).any(1)
    if not bool(touched.any()):
        return images
    rows = touched.nonzero()[:, 0]
    pixels = images[rows]
    if pixels.dtype != torch.uint8:
        pixels = pixels.round().clamp_(0, 255).to(torch.uint8)
    ops, magnitude = ops[rows], magnitude[rows]
    height, width = pixels.shape[-2:]
    for k in range(ops.shape[1]):
        key = ops[:, k] * 256 + magnitude[:, k] + 128  # (op, signed bin) as one integer
        for value in torch.unique(key[ops[:, k] != NO_OP]).tolist():
            op, signed_bin = value // 256, value % 256 - 128
            if OP_NAMES[op] == "Identity":
                continue
            group = (key == value).nonzero()[:, 0]
            amount = op_magnitude(params.space, op, signed_bin, height, width)
            pixels[group] = _apply_op(pixels[group], OP_NAMES[op], amount)
    out = images.clone()
    out[rows] = pixels.to(images.dtype)
    return out
