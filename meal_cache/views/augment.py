"""Replayable augmentation: draw a view's parameters from a seed, apply given parameters to a batch on device.

A cached teacher output is valid only for the exact pixels the teacher saw, so augmentation is split in two:
:func:`draw` turns a seed into per-sample parameters (a crop box and a flip), which extract stores, and
:func:`apply` turns uint8 images plus those parameters into the normalised float batch, on whatever device
the images are. The same parameters always give the same pixels.

Recipes follow the data: ``digits`` (glyphs: crop with zero padding, never flip), ``natural`` (crop with
padding and horizontal flip for images up to 64 px; random-resized-crop and flip above) and ``full`` (image files
decoded at their own resolution: torchvision's RandomResizedCrop, scale 0.08-1 and ratio 3/4-4/3, and flip, with
boxes in each source image's own coordinates; the evaluation view is the central 224/256 of the shorter side, as
torchvision's resize-256 / centre-crop-224).

Boxes are drawn for each row's source size ``(H, W)``: for in-memory data every row has the dataset's square size.

timm's train.py knobs (``--scale``, ``--ratio``, ``--hflip``, ``--vflip``; :class:`AugmentOptions`) change a recipe
(:meth:`Recipe.with_options`): the random-resized crop's area share and aspect ratio bounds (a padded-crop recipe
given either becomes a random-resized crop, as timm's always is) and each flip's chance. A vertical flip is a
per-row boolean of its own (``ViewParams.vflip``), present only when the recipe draws it, so views without it
have the fields they always had.

On top of the crop, a view may take a *policy* (``extract --policy randaugment|trivialaugment``): its ops are
drawn after the crop and flip and applied after them (:mod:`meal_cache.views.policies`, whose names this module
re-exports).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from meal_cache.errors import UserError, unknown_choice
from meal_cache.views.mixing import Mixing, draw_mixing, unmixed_mixing
from meal_cache.views.policies import (  # noqa: F401  (re-exported: augment is where views' names have lived)
    GLYPH_OPS,
    NO_OP,
    NUM_BINS,
    OP_INDEX,
    OP_NAMES,
    POLICY_NAMES,
    SPACES,
    Policy,
    _apply_op,
    _draw_ops,
    apply_ops,
    op_magnitude,
    policy_for,
    policy_from_json,
)

SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of one view: ``crop`` int16 ``(N, 4)`` as y0, x0, h, w in source pixels (y0 and
    x0 may be negative: the zero-padding border), ``flip`` bool ``(N,)`` horizontal mirror after cropping.

    With a policy, also ``ops`` int8 ``(N, K)``: each row's k-th op as an index into :data:`OP_NAMES` (-1: none,
    as in an identity view), ``magnitude`` int8 ``(N, K)``: its magnitude bin, negative for a negated magnitude,
    and ``space``: whose magnitude ranges the bins index (a key of :data:`SPACES`). Without one, ``ops`` and
    ``magnitude`` are None and the view is the crop and flip alone, as stores written before policies hold.

    With mixing (``extract --mixup/--cutmix``), also ``mix_partner`` int32 ``(N,)``: the row of the split whose
    view (the same view, unmixed) is mixed in, ``mix_lambda`` float32 ``(N,)``: the row's own share (1: not
    mixed), and ``mix_box`` int16 ``(N, 4)``: y0, x0, h, w in output pixels of the partner's patch pasted in
    (CutMix), all zero for a blend (Mixup). A view of a whole split finds each partner's parameters in itself;
    a view of some rows (``view[rows]``) carries them in ``partner``, resolved when it was taken.

    With vertical flips (``--vflip`` above 0), also ``vflip`` bool ``(N,)``: the row mirrored top to bottom after
    cropping (with ``flip``, before any op); None where the view never flips vertically, as every store before
    the option holds."""

    crop: torch.Tensor
    flip: torch.Tensor
    ops: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    space: str | None = None
    mix_partner: torch.Tensor | None = None
    mix_lambda: torch.Tensor | None = None
    mix_box: torch.Tensor | None = None
    partner: ViewParams | None = None
    vflip: torch.Tensor | None = None  # last, so positional constructions of the fields above are unchanged

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def unmixed(self) -> ViewParams:
        """The same crops, flips and ops without mixing (what a partner contributes)."""
        return ViewParams(self.crop, self.flip, self.ops, self.magnitude, self.space, vflip=self.vflip)

    def _rows(self, rows: torch.Tensor | slice) -> ViewParams:
        def take(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[rows]

        return ViewParams(self.crop[rows], self.flip[rows], take(self.ops), take(self.magnitude), self.space,
                          vflip=take(self.vflip))  # fmt: skip

    def __getitem__(self, rows: torch.Tensor | slice) -> ViewParams:
        taken = self._rows(rows)
        if self.mix_partner is None:
            return taken
        partner = self.partner[rows] if self.partner is not None else self.unmixed()[self.mix_partner[rows].long()]
        return dataclasses.replace(taken, mix_partner=self.mix_partner[rows], mix_lambda=self.mix_lambda[rows],
                                   mix_box=self.mix_box[rows], partner=partner)  # fmt: skip

    def to(self, device: torch.device | str) -> ViewParams:
        def move(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(device, non_blocking=True)

        return ViewParams(move(self.crop), move(self.flip), move(self.ops), move(self.magnitude), self.space,
                          move(self.mix_partner), move(self.mix_lambda), move(self.mix_box),
                          None if self.partner is None else self.partner.to(device), move(self.vflip))  # fmt: skip


def stack_views(views: list[ViewParams], view: torch.Tensor, rows: torch.Tensor) -> ViewParams:
    """Row ``rows[i]`` of view ``views[view[i]]`` for every ``i`` (views of one store, of a whole split: one
    policy, one mixing); a mixed row's partner is taken from the same view."""

    def pick(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.stack(values)[view, rows]

    first = views[0]
    taken = ViewParams(pick([v.crop for v in views]), pick([v.flip for v in views]), pick([v.ops for v in views]),
                       pick([v.magnitude for v in views]), first.space,
                       vflip=pick([v.vflip for v in views]))  # fmt: skip
    if first.mix_partner is None:
        return taken
    partners = pick([v.mix_partner for v in views])
    return dataclasses.replace(taken, mix_partner=partners, mix_lambda=pick([v.mix_lambda for v in views]),
                               mix_box=pick([v.mix_box for v in views]),
                               partner=stack_views([v.unmixed() for v in views], view, partners.long()))  # fmt: skip


def concat_views(parts: list[ViewParams]) -> ViewParams:
    """Unmixed views of some rows, one after the other (what one request of a source renders)."""

    def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.cat(values)

    return ViewParams(cat([p.crop for p in parts]), cat([p.flip for p in parts]), cat([p.ops for p in parts]),
                      cat([p.magnitude for p in parts]), parts[0].space,
                      vflip=cat([p.vflip for p in parts]))  # fmt: skip


# torchvision's RandomResizedCrop defaults (and timm's train.py's): the area share and the aspect ratio (w / h).
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Recipe:
    name: str
    hflip: float  # the chance a row is mirrored left-right; 0: never, and nothing is drawn for it
    resized_crop_scale: tuple[float, float] | None  # None: crop with padding instead
    # The un-augmented (evaluation) view: the central square of this fraction of the shorter side.
    eval_crop: float = 1.0
    ratio: tuple[float, float] = DEFAULT_RATIO  # the random-resized crop's aspect ratio (w / h) bounds
    vflip: float = 0.0  # the chance a row is mirrored top to bottom; 0: never, and no vflip array at all

    def pad(self, image_size: int) -> int:
        # 4 px at 32 px (the CIFAR convention), 2 px at 16 px.
        return max(1, image_size // 8)

    def with_options(self, options: AugmentOptions, glyphs: bool = False) -> Recipe:
        """This recipe as ``options`` change it. ``glyphs`` (the dataset option ``?glyphs=1``) makes both flips'
        default 0: a mirrored glyph is another glyph. A padded-crop recipe given ``scale`` or ``ratio`` draws
        random-resized crops instead (the other bound at torchvision's default), since only those have either."""
        scale, ratio = self.resized_crop_scale, self.ratio
        if options.scale is not None or options.ratio is not None:
            scale = options.scale or scale or DEFAULT_SCALE
            ratio = options.ratio or ratio

        def chance(asked: float | None, own: float) -> float:
            return asked if asked is not None else (0.0 if glyphs else own)

        return dataclasses.replace(self, hflip=chance(options.hflip, self.hflip), resized_crop_scale=scale,
                                   ratio=ratio, vflip=chance(options.vflip, self.vflip))  # fmt: skip

    def to_json(self) -> dict:
        """How the views are drawn, as a store records it where it differs from the data's own recipe."""
        resized = self.resized_crop_scale is not None
        return {"crop": "resized" if resized else "padded",
                "scale": list(self.resized_crop_scale) if resized else None,
                "ratio": list(self.ratio) if resized else None, "hflip": self.hflip, "vflip": self.vflip}  # fmt: skip

    def recorded(self, record: dict | None) -> Recipe:
        """This (the data's own) recipe as a store's record of :meth:`to_json` says it was drawn; None (every
        store written before the options, and any without them) leaves it as it is."""
        if not record:
            return self
        resized = record["crop"] == "resized"
        return dataclasses.replace(self, hflip=float(record["hflip"]), vflip=float(record["vflip"]),
                                   resized_crop_scale=_pair(record["scale"]) if resized else None,
                                   ratio=_pair(record["ratio"]) if resized else self.ratio)  # fmt: skip


def _pair(values) -> tuple[float, float]:
    low, high = values
    return float(low), float(high)


RECIPES: dict[str, Recipe] = {
    "digits": Recipe("digits", hflip=0.0, resized_crop_scale=None),
    "natural": Recipe("natural", hflip=0.5, resized_crop_scale=None),
    "natural-large": Recipe("natural-large", hflip=0.5, resized_crop_scale=(0.25, 1.0)),
    "full": Recipe("full", hflip=0.5, resized_crop_scale=DEFAULT_SCALE, eval_crop=224 / 256),
}
FULL_RECIPE = "full"


def recipe_for(data_recipe: str, image_size: int) -> Recipe:
    """The recipe for a dataset's kind of images at its size."""
    if data_recipe == "natural" and image_size > SMALL_IMAGE_MAX:
        return RECIPES["natural-large"]
    if data_recipe not in RECIPES:
        raise unknown_choice("augmentation recipe", data_recipe, list(RECIPES))
    return RECIPES[data_recipe]


# ---------------------------------------------------------------------------------------- timm's knobs
AUGMENT_FIELDS = ("scale", "ratio", "hflip", "vflip")
# Each pair option's rule and how an error states it; the flips are probabilities in [0, 1].
PAIR_RULES: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "scale": (lambda low, high: 0 < low <= high <= 1, "MIN MAX, shares of the image's area with 0 < MIN <= MAX <= 1"),
    "ratio": (lambda low, high: 0 < low <= high, "MIN MAX, aspect ratios (width / height) with 0 < MIN <= MAX"),
}
PROBABILITY_FIELDS = ("hflip", "vflip")


@dataclass(frozen=True)
class AugmentOptions:
    """``--scale MIN MAX``, ``--ratio MIN MAX``, ``--hflip P``, ``--vflip P`` as given, each None where the data's
    recipe keeps its own (see :meth:`Recipe.with_options`)."""

    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    vflip: float | None = None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def augment_options(settings: object) -> AugmentOptions:
    """The :data:`AUGMENT_FIELDS` of ``settings`` (a TrainConfig, an ExtractConfig), checked: a bad value is a
    UserError naming the option and its rule."""
    values: dict = {}
    for name, (rule, wanted) in PAIR_RULES.items():
        given = getattr(settings, name, None)
        if given is None:
            continue
        pair = [_number(v) for v in given] if isinstance(given, list | tuple) else []
        if len(pair) != 2 or None in pair or not rule(*pair):
            shown = " ".join(map(str, given)) if isinstance(given, list | tuple) else repr(given)
            raise UserError(f"--{name} takes {wanted}, got {shown}")
        values[name] = (pair[0], pair[1])
    for name in PROBABILITY_FIELDS:
        given = getattr(settings, name, None)
        if given is None:
            continue
        chance = _number(given)
        if chance is None or not 0 <= chance <= 1:
            raise UserError(f"--{name} is a probability in [0, 1] (0: never flip), got {given!r}")
        values[name] = chance
    return AugmentOptions(**values)


def recorded_options(settings: dict) -> dict:
    """``settings`` (a config's fields) as checkpoints, store settings and pipeline stamps record them: the
    augmentation options left unset are left out, so records made before the options existed still match, and
    pairs are lists, as they read back from JSON."""
    recorded = {k: v for k, v in settings.items() if k not in AUGMENT_FIELDS or v is not None}
    for name in PAIR_RULES:
        if recorded.get(name) is not None:
            recorded[name] = list(recorded[name])
    return recorded


def view_generator(seed: int, view: int) -> torch.Generator:
    """The generator of view ``view`` under ``seed``: views are independent and each reproducible alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + view)


def square_sizes(n: int, image_size: int) -> torch.Tensor:
    """The source sizes of ``n`` in-memory rows of ``image_size`` px: int32 ``(n, 2)`` as (H, W)."""
    return torch.full((n, 2), image_size, dtype=torch.int32)


def identity(sizes: torch.Tensor, recipe: Recipe | None = None, policy: Policy | None = None,
             mixing: Mixing | None = None) -> ViewParams:  # fmt: skip
    """The un-augmented view of rows of source ``sizes`` (N, 2): the central square of ``recipe.eval_crop`` of the
    shorter side (the whole image for in-memory data), not mirrored (with a ``vflip`` array of False where the
    recipe flips vertically, so every view of a store has the same fields); under a ``policy``, with no ops; under
    ``mixing``, not mixed."""
    fraction = recipe.eval_crop if recipe is not None else 1.0
    height, width = sizes[:, 0].long(), sizes[:, 1].long()
    side = torch.minimum(height, width)
    if fraction != 1.0:
        side = (side.double() * fraction).round().long().clamp_min(1)
    crop = torch.stack([(height - side) // 2, (width - side) // 2, side, side], 1)
    flip = torch.zeros(len(sizes), dtype=torch.bool)
    view = ViewParams(crop.to(torch.int16), flip)
    if policy is not None:
        none = torch.full((len(sizes), policy.num_ops), NO_OP, dtype=torch.int8)
        view = ViewParams(view.crop, flip, none, torch.zeros_like(none), policy.space)
    if recipe is not None and recipe.vflip > 0:
        view = dataclasses.replace(view, vflip=torch.zeros(len(sizes), dtype=torch.bool))
    if mixing is not None and mixing.enabled:
        view = dataclasses.replace(view, **unmixed_mixing(len(sizes)))
    return view


def _random_resized_boxes(sizes: torch.Tensor, scale: tuple[float, float], gen: torch.Generator,
                          ratios: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:  # fmt: skip
    # Ten tries per sample as torchvision's RandomResizedCrop, vectorised; where all fail, its fallback: the
    # largest centred box whose aspect ratio is within ``ratios`` (3/4-4/3 by default).
    n, tries = len(sizes), 10
    height, width = sizes[:, 0].to(torch.float32), sizes[:, 1].to(torch.float32)
    area = (height * width)[:, None] * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratios[0]), math.log(ratios[1]), generator=gen)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    ok = (w >= 1) & (w <= width[:, None]) & (h >= 1) & (h <= height[:, None])
    found = ok.any(1)
    first = ok.float().argmax(1)
    rows = torch.arange(n)
    aspect = width / height
    fallback_w = torch.where(aspect > ratios[1], (height * ratios[1]).round(), width)
    fallback_h = torch.where(aspect < ratios[0], (width / ratios[0]).round(), height)
    h = torch.where(found, h[rows, first], fallback_h)
    w = torch.where(found, w[rows, first], fallback_w)
    y0 = (torch.rand(n, generator=gen) * (height - h + 1)).floor()
    x0 = (torch.rand(n, generator=gen) * (width - w + 1)).floor()
    y0 = torch.where(found, y0, ((height - h) / 2).floor())
    x0 = torch.where(found, x0, ((width - w) / 2).floor())
    return torch.stack([y0, x0, h, w], 1)


def draw(recipe: Recipe, sizes: torch.Tensor, generator: torch.Generator, policy: Policy | None = None,
         mixing: Mixing | None = None, out_size: int | None = None) -> ViewParams:  # fmt: skip
    """Draw one view's parameters for rows of source ``sizes`` (int ``(N, 2)`` as H, W; see
    :func:`square_sizes`). Padded crops keep the source size, so they take square in-memory images only. The
    crop and flip are drawn first, then the policy's ops, then the mixing (CutMix boxes in ``out_size`` px
    output), then the vertical flips, so each addition keeps the draws before it: a policy's view has the crops
    of the policy-less view of the same seed, a ``--vflip`` view the crops, flips, ops and mixing of the view
    without it. A flip whose chance is 0 draws nothing (the ``digits`` recipe never has)."""
    n = len(sizes)
    if recipe.resized_crop_scale is not None:
        boxes = _random_resized_boxes(sizes, recipe.resized_crop_scale, generator, recipe.ratio)
    else:
        pad = recipe.pad(int(sizes[0, 0]) if n else 0)
        offsets = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
        boxes = torch.cat([offsets, sizes.to(offsets.dtype)], 1)
    flips = torch.rand(n, generator=generator) < recipe.hflip if recipe.hflip > 0 else torch.zeros(n, dtype=torch.bool)
    view = ViewParams(boxes.to(torch.int16), flips)
    if policy is not None:
        ops, magnitude = _draw_ops(policy, n, generator)
        view = ViewParams(view.crop, flips, ops, magnitude, policy.space)
    if mixing is not None and mixing.enabled:
        if out_size is None:
            raise ValueError("mixing needs the output size (for CutMix's boxes)")
        view = dataclasses.replace(view, **draw_mixing(mixing, n, out_size, generator))
    if recipe.vflip > 0:
        view = dataclasses.replace(view, vflip=torch.rand(n, generator=generator) < recipe.vflip)
    return view


def _crop_same_size(images: torch.Tensor, crop: torch.Tensor, size: int) -> torch.Tensor:
    """Integer crops of the output size, with zero padding: a pure gather, exact on every device."""
    height, width = images.shape[-2:]
    y0, x0 = crop[:, 0].long(), crop[:, 1].long()
    pad = int(max(0, (-y0).max(), (-x0).max(), (y0 + size - height).max(), (x0 + size - width).max()))
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    steps = torch.arange(size, device=images.device)
    rows = (y0 + pad)[:, None] + steps
    cols = (x0 + pad)[:, None] + steps
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _crop_resized(images: torch.Tensor, crop: torch.Tensor, size: int) -> torch.Tensor:
    """Crop any box and resize it to ``size`` with bilinear sampling (2x2 samples a bin)."""
    boxes = crop.to(torch.float32)
    y0, x0, h, w = boxes.unbind(1)
    index = torch.arange(images.shape[0], device=images.device, dtype=torch.float32)
    rois = torch.stack([index, x0, y0, x0 + w, y0 + h], 1)
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def render(images: torch.Tensor, params: ViewParams, out_size: int | None = None) -> torch.Tensor:
    """The view's pixels of uint8 ``(B, 3, H, W)`` images: float32 ``(B, 3, out_size, out_size)`` in 0-255, on the
    images' device. Each row's pixels depend on that row alone: a box of the output size is an exact gather, any
    other box is resampled bilinearly, whatever the other rows of the batch are; then the view's ops, if it has
    any (:func:`apply_ops`). Flips come after the crop: left-right where ``flip``, top to bottom where ``vflip``."""
    size = out_size or images.shape[-1]
    params = params.to(images.device)
    crop = params.crop
    same_size = (crop[:, 2] == size) & (crop[:, 3] == size)
    if bool(same_size.all()):
        pixels = _crop_same_size(images, crop, size).float()
    elif not bool(same_size.any()):
        pixels = _crop_resized(images, crop, size)
    else:
        pixels = torch.empty((images.shape[0], 3, size, size), dtype=torch.float32, device=images.device)
        exact, resampled = same_size.nonzero()[:, 0], (~same_size).nonzero()[:, 0]
        pixels[exact] = _crop_same_size(images[exact], crop[exact], size).float()
        pixels[resampled] = _crop_resized(images[resampled], crop[resampled], size)
    pixels = torch.where(params.flip[:, None, None, None], pixels.flip(-1), pixels)
    return apply_ops(vertical_flips(pixels, params), params)


def vertical_flips(pixels: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """``pixels`` (B, C, H, W) with the rows whose ``vflip`` is set mirrored top to bottom (a pure permutation:
    exact on every device and dtype); unchanged where the view has no vertical flips."""
    if params.vflip is None:
        return pixels
    flips = params.vflip.to(pixels.device)
    return torch.where(flips[:, None, None, None], pixels.flip(-2), pixels)


def apply(
    images: torch.Tensor,
    params: ViewParams,
    mean: torch.Tensor | tuple[float, ...],
    std: torch.Tensor | tuple[float, ...],
    out_size: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Augment and normalise a batch: uint8 ``(B, 3, H, W)`` plus its rows' parameters -> float32
    ``(B, 3, out_size, out_size)``, on the images' device (:func:`render`, then :func:`normalise`)."""
    return normalise(render(images, params, out_size), mean, std, channels_last)


def normalise(
    images: torch.Tensor,
    mean: torch.Tensor | tuple[float, ...],
    std: torch.Tensor | tuple[float, ...],
    channels_last: bool = False,
) -> torch.Tensor:
    """``images`` (uint8, or float pixels in 0-255 from :func:`render`) normalised as the network takes them."""
    return _normalise(images.float(), mean, std, channels_last)


def _normalise(pixels: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    # (p / 255 - mean) / std as one fused divide-add (three passes over a batch of views made it half of a
    # free-teacher extract's time at 224 px); the per-channel factors are formed in float64.
    divisor = (255.0 * std_t).to(device=pixels.device, dtype=torch.float32)
    shift = (-mean_t / std_t).to(device=pixels.device, dtype=torch.float32)
    batch = torch.addcdiv(shift, pixels, divisor)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
