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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from meal_cache.errors import unknown_choice

SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of one view: ``crop`` int16 ``(N, 4)`` as y0, x0, h, w in source pixels (y0 and
    x0 may be negative: the zero-padding border), ``flip`` bool ``(N,)`` horizontal mirror after cropping."""

    crop: torch.Tensor
    flip: torch.Tensor

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def __getitem__(self, rows: torch.Tensor | slice) -> ViewParams:
        return ViewParams(self.crop[rows], self.flip[rows])

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams(self.crop.to(device, non_blocking=True), self.flip.to(device, non_blocking=True))


@dataclass(frozen=True)
class Recipe:
    name: str
    flip: bool
    resized_crop_scale: tuple[float, float] | None  # None: crop with padding instead
    # The un-augmented (evaluation) view: the central square of this fraction of the shorter side.
    eval_crop: float = 1.0

    def pad(self, image_size: int) -> int:
        # 4 px at 32 px (the CIFAR convention), 2 px at 16 px.
        return max(1, image_size // 8)


RECIPES: dict[str, Recipe] = {
    "digits": Recipe("digits", flip=False, resized_crop_scale=None),
    "natural": Recipe("natural", flip=True, resized_crop_scale=None),
    "natural-large": Recipe("natural-large", flip=True, resized_crop_scale=(0.25, 1.0)),
    "full": Recipe("full", flip=True, resized_crop_scale=(0.08, 1.0), eval_crop=224 / 256),
}
FULL_RECIPE = "full"


def recipe_for(data_recipe: str, image_size: int) -> Recipe:
    """The recipe for a dataset's kind of images at its size."""
    if data_recipe == "natural" and image_size > SMALL_IMAGE_MAX:
        return RECIPES["natural-large"]
    if data_recipe not in RECIPES:
        raise unknown_choice("augmentation recipe", data_recipe, list(RECIPES))
    return RECIPES[data_recipe]


def view_generator(seed: int, view: int) -> torch.Generator:
    """The generator of view ``view`` under ``seed``: views are independent and each reproducible alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + view)


def square_sizes(n: int, image_size: int) -> torch.Tensor:
    """The source sizes of ``n`` in-memory rows of ``image_size`` px: int32 ``(n, 2)`` as (H, W)."""
    return torch.full((n, 2), image_size, dtype=torch.int32)


def identity(sizes: torch.Tensor, recipe: Recipe | None = None) -> ViewParams:
    """The un-augmented view of rows of source ``sizes`` (N, 2): the central square of ``recipe.eval_crop`` of the
    shorter side (the whole image for in-memory data), not mirrored."""
    fraction = recipe.eval_crop if recipe is not None else 1.0
    height, width = sizes[:, 0].long(), sizes[:, 1].long()
    side = torch.minimum(height, width)
    if fraction != 1.0:
        side = (side.double() * fraction).round().long().clamp_min(1)
    crop = torch.stack([(height - side) // 2, (width - side) // 2, side, side], 1)
    return ViewParams(crop.to(torch.int16), torch.zeros(len(sizes), dtype=torch.bool))


def _random_resized_boxes(sizes: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    # Ten tries per sample as torchvision's RandomResizedCrop, vectorised; where all fail, its fallback: the
    # largest centred box whose aspect ratio is within 3/4-4/3.
    n, tries = len(sizes), 10
    height, width = sizes[:, 0].to(torch.float32), sizes[:, 1].to(torch.float32)
    area = (height * width)[:, None] * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    ok = (w >= 1) & (w <= width[:, None]) & (h >= 1) & (h <= height[:, None])
    found = ok.any(1)
    first = ok.float().argmax(1)
    rows = torch.arange(n)
    aspect = width / height
    fallback_w = torch.where(aspect > 4 / 3, (height * 4 / 3).round(), width)
    fallback_h = torch.where(aspect < 3 / 4, (width / (3 / 4)).round(), height)
    h = torch.where(found, h[rows, first], fallback_h)
    w = torch.where(found, w[rows, first], fallback_w)
    y0 = (torch.rand(n, generator=gen) * (height - h + 1)).floor()
    x0 = (torch.rand(n, generator=gen) * (width - w + 1)).floor()
    y0 = torch.where(found, y0, ((height - h) / 2).floor())
    x0 = torch.where(found, x0, ((width - w) / 2).floor())
    return torch.stack([y0, x0, h, w], 1)


def draw(recipe: Recipe, sizes: torch.Tensor, generator: torch.Generator) -> ViewParams:
    """Draw one view's parameters for rows of source ``sizes`` (int ``(N, 2)`` as H, W; see
    :func:`square_sizes`). Padded crops keep the source size, so they take square in-memory images only."""
    n = len(sizes)
    if recipe.resized_crop_scale is not None:
        boxes = _random_resized_boxes(sizes, recipe.resized_crop_scale, generator)
    else:
        pad = recipe.pad(int(sizes[0, 0]) if n else 0)
        offsets = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
        boxes = torch.cat([offsets, sizes.to(offsets.dtype)], 1)
    flips = torch.rand(n, generator=generator) < 0.5 if recipe.flip else torch.zeros(n, dtype=torch.bool)
    return ViewParams(boxes.to(torch.int16), flips)


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
    other box is resampled bilinearly, whatever the other rows of the batch are."""
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
    return torch.where(params.flip[:, None, None, None], pixels.flip(-1), pixels)


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
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    batch = (pixels / 255.0 - mean_t) / std_t
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
