"""Dense stores (``extract --dense``): each teacher runs once per image, on the whole image, and the store keeps
maps from which distill derives the targets of *any* crop, so views are limited neither by storage nor by teacher
passes.

- **The logit map** is ReLabel's (Yun et al., CVPR 2021): the teacher's classifier applied at every position of
  its last block's output, taken by a forward hook that hands the rest of the network each position as a 1x1 map
  (so whatever follows the last block, a norm, a ReLU, the pooling and the classifier, runs per position). For a
  classifier after global average pooling the map's mean is exactly the teacher's logits of the whole image;
  :func:`check_position_head` refuses a teacher for which it is not (a ViT's class token, a norm after pooling).
- **The blocks** meal reads are kept as their whole-image outputs average-pooled to a ``grid`` x ``grid`` grid
  (projected and 8-bit where the store's layout says, as any pooled block).
- **A crop's targets** (:class:`DenseTargets`): its box, in the source image's pixels, mapped onto each map and
  averaged there by RoIAlign (``aligned``, adaptive sampling: a box of the whole image samples every cell's centre
  once, which is the map's plain mean): logits pooled to one vector then softened by the loss as usual, blocks
  pooled to the grid the method reads and mirrored with the crop.

The teacher sees the whole image at ``sizes[0]`` px (the data's own size for in-memory data; 256 for image files,
torchvision's resize before its 224 crop), squashed to a square; further sizes run the same pixels resampled, and
their maps are resampled to the largest map and averaged (a second scale, as ReLabel's multi-scale variant).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from meal_cache.errors import UserError
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.projection import project
from meal_cache.runtime import Precision
from meal_cache.store.keys import LOGITS, split_teacher_key
from meal_cache.views import augment

DEFAULT_GRID = 4  # at 224 px: 3 blocks of 128 PCA dims, 8-bit, and top-10 logits on 8x8 fit 10 KB a teacher
# Image files are seen whole at this size (torchvision's resize before its 224 crop), scaled with the data's size.
FILES_SIZE_AT_224 = 256


@dataclass(frozen=True)
class DenseSettings:
    """How a dense store was made: the teacher's input sizes of the whole image and the blocks' stored grid."""

    sizes: tuple[int, ...]
    grid: int = DEFAULT_GRID

    def to_json(self) -> dict:
        return {"sizes": list(self.sizes), "grid": self.grid}

    @classmethod
    def from_json(cls, data: dict) -> DenseSettings:
        return cls(tuple(int(s) for s in data["sizes"]), int(data["grid"]))


def default_size(image_size: int, streamed: bool) -> int:
    """The whole image's size for the teacher: the data's own for in-memory rows; for image files 256 at 224 (the
    resize torchvision's evaluation transform makes before its crop), in proportion at other sizes."""
    return round(image_size * FILES_SIZE_AT_224 / 224) if streamed else image_size


def check_settings(sizes: list[int] | tuple[int, ...] | None, grid: int) -> None:
    if sizes is not None and (not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 8 for s in sizes)):
        raise UserError(f"--dense-sizes takes whole numbers of pixels, at least 8, got {sizes!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise UserError(f"--dense-grid must be a whole number, at least 1, got {grid!r}")


def whole_image(sizes: torch.Tensor) -> augment.ViewParams:
    """The one view a dense store renders: every row's whole image, unmirrored (resized to a square)."""
    height, width = sizes[:, 0].long(), sizes[:, 1].long()
    zeros = torch.zeros_like(height)
    crop = torch.stack([zeros, zeros, height, width], 1).to(torch.int16)
    return augment.ViewParams(crop, torch.zeros(len(sizes), dtype=torch.bool))


@contextmanager
def _per_position(model: torch.nn.Module, block: str) -> Iterator[dict]:
    """While open, the output of ``block`` (B, C, h, w) goes on as ``B h w`` maps of 1x1, so the model returns one
    row of logits per position; ``found["shape"]`` is (B, h, w)."""
    found: dict = {}

    def spread(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise RuntimeError(f"block '{block}' gives no (B, C, H, W) map")
        b, c, h, w = output.shape
        found["shape"] = (b, h, w)
        return output.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)

    handle = model.get_submodule(block).register_forward_hook(spread)
    try:
        yield found
    finally:
        handle.remove()


def head_input(model: torch.nn.Module) -> str:
    """The module whose output the head reads: a timm network's ``dense_tap`` (the final map before
    ``forward_head``), else the last block."""
    return getattr(model, "dense_tap", None) or model.block_names[-1]


def _logit_map(model: torch.nn.Module, batch: torch.Tensor, precision: Precision) -> torch.Tensor:
    """(B, h, w, C): the model's classifier at each position of its last block's output."""
    with _per_position(model, head_input(model)) as found, precision.autocast():
        rows = model(batch)
    if "shape" not in found or rows.shape[0] != math.prod(found["shape"]):
        # The head did not take the spread output (a wrapper that pools elsewhere).
        raise RuntimeError(f"the logits are not one row per position of '{head_input(model)}'")
    b, h, w = found["shape"]
    return rows.float().reshape(b, h, w, -1)


@torch.no_grad()
def check_position_head(teacher, size: int, precision: Precision, device: torch.device) -> tuple[int, int]:
    """The (h, w) of ``teacher``'s logit map at ``size`` px, refused (UserError) unless the map's mean gives back
    the teacher's own logits: only then is "the classifier at each position" what the teacher computes."""
    model, last = teacher.model, head_input(teacher.model)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, size, size, generator=generator) * 255).to(device)
    batch = augment.normalise(pixels, teacher.mean, teacher.std, channels_last=precision.channels_last)
    refusal = (f"--dense needs teacher '{teacher.spec.key}' ({teacher.spec.arch}) to classify the global average "
               f"of its final map ('{last}') with layers that act on each position alone (ReLabel's label-map "
               "rule)")  # fmt: skip
    try:
        with precision.autocast():
            whole = model(batch).float()
        positions = _logit_map(model, batch, precision)
    except RuntimeError as err:
        raise UserError(f"{refusal}; running it per position failed ({str(err).splitlines()[0]}): extract a store "
                        "of views for it instead") from err  # fmt: skip
    # Relative to the logits' own scale: an untrained head's logits can be tiny, and a nonlinear head's error too.
    difference = float((positions.mean((1, 2)) - whole).abs().max()) / max(float(whole.abs().max()), 1e-12)
    if difference > (2e-2 if precision.on_cuda else 1e-3):
        raise UserError(f"{refusal}; the mean of its per-position logits differs from its logits by "
                        f"{100 * difference:.2g}% of their largest: extract a store of views for it "
                        "instead")  # fmt: skip
    return tuple(positions.shape[1:3])


def dense_spec(teacher, settings: DenseSettings):
    """``teacher``'s TeacherSpec in a dense store: its logit map's (h, w) at the largest size and each block's
    stored grid (the grid, or the block's own size at the first size where smaller)."""
    shapes = block_shapes(teacher.model, settings.sizes[0])
    blocks = [dataclasses.replace(b, stored_grid=min(settings.grid, *shapes[b.name][1:])) for b in teacher.spec.blocks]
    return dataclasses.replace(teacher.spec, blocks=blocks)


@torch.no_grad()
def dense_outputs(teacher, pixels: torch.Tensor, features: tuple[str, ...], precision: Precision,
                  settings: DenseSettings) -> dict[str, torch.Tensor]:  # fmt: skip
    """The dense store's outputs of whole images (``pixels`` rendered at ``settings.sizes[0]``): ``logits`` (B, h w,
    C), the classifier at each position of the largest size's map, the other sizes' maps resampled to it and
    averaged; ``blocks/B`` (B, C, g, g) at the block's stored grid, averaged over the sizes, projected where the
    teacher's blocks are."""
    names = [b.name for b in teacher.spec.blocks]
    maps, blocks = [], {name: [] for name in names}
    for size in settings.sizes:
        scaled = pixels if size == pixels.shape[-1] else F.interpolate(
            pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)  # fmt: skip
        batch = augment.normalise(scaled, teacher.mean, teacher.std, channels_last=precision.channels_last)
        with BlockTap(teacher.model, names) as tap:  # entered first: its hook sees the block's own output
            maps.append(_logit_map(teacher.model, batch, precision).permute(0, 3, 1, 2))
        if "blocks" in features:
            for block in teacher.spec.blocks:
                blocks[block.name].append(F.adaptive_avg_pool2d(tap.outputs[block.name].float(), block.stored_grid))
    largest = max(maps, key=lambda m: m.shape[-1] * m.shape[-2]).shape[-2:]
    resampled = [m if m.shape[-2:] == largest else F.interpolate(m, size=largest, mode="bilinear",
                                                                  align_corners=False) for m in maps]  # fmt: skip
    logits = torch.stack(resampled).mean(0)
    outputs = {LOGITS: logits.flatten(2).transpose(1, 2)}
    for block in teacher.spec.blocks if "blocks" in features else []:
        pooled = torch.stack(blocks[block.name]).mean(0)
        matrix = teacher.projections.get(block.name)
        outputs[f"blocks/{block.key}"] = pooled if matrix is None else project(pooled, matrix)
    return outputs


def crop_rois(crop: torch.Tensor, sizes: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """RoIAlign's boxes ``(B, 5)``: each row's crop (y0, x0, h, w in its source image's pixels, of size ``sizes``
    (B, 2) as H, W) cut to the image (the teacher never saw a padded border) and scaled onto a map of ``map_size``
    (h, w) covering the whole image."""
    crop, sizes = crop.to(torch.float32), sizes.to(crop.device, torch.float32)
    height, width = sizes[:, 0], sizes[:, 1]
    y0, x0, h, w = crop.unbind(1)
    y1, y2 = y0.clamp(min=0).minimum(height - 1), (y0 + h).minimum(height)
    x1, x2 = x0.clamp(min=0).minimum(width - 1), (x0 + w).minimum(width)
    scale_y, scale_x = map_size[0] / height, map_size[1] / width
    index = torch.arange(len(crop), dtype=torch.float32, device=crop.device)
    return torch.stack([index, x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y], 1)


def pool_boxes(maps: torch.Tensor, rois: torch.Tensor, out: int) -> torch.Tensor:
    """Each row's map (B, C, h, w) averaged over its box to ``out`` x ``out`` (B, C, out, out): RoIAlign with
    aligned corners and as many samples a bin as the box has cells, so a whole-map box of ``out`` = 1 is the mean
    of every cell's centre."""
    return roi_align(maps.float(), rois.to(maps.device), output_size=out, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)  # fmt: skip


# Feature kinds a view's own pixels make (a channel mean, of A or of |A|^p), which no box of the whole image's
# stored maps gives.
PER_VIEW_KINDS = ("maps", "attention")


class DenseTargets:
    """A dense store's maps turned into the targets of a batch's crops, keyed as a store of views keys them."""

    def __init__(self, store, keys: list[str]) -> None:
        self.map_size = {t: tuple(store.teacher(t)["dense_map"]) for t in store.teacher_names}
        self.out_grid = {f"blocks/{b.key}": b.grid for t in store.teacher_names for b in store.blocks(t)}
        self.keys = keys
        refused = [key for key in keys if split_teacher_key(key)[1].split("/")[0] in PER_VIEW_KINDS]
        if refused:
            raise UserError(f"a dense store derives logits and pooled blocks for any crop, not channel-mean or "
                            f"attention maps ({refused[0]}); distill with a method that reads logits or blocks (kd, "
                            "meal, meal-v2, fitnet, ...), or extract a store of views for this one")  # fmt: skip

    def __call__(self, stored: dict[str, torch.Tensor], params: augment.ViewParams,
                 sizes: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """The targets of rows whose crops and flips are ``params`` and source sizes ``sizes`` (B, 2), from their
        stored maps ``stored``. Maps of one size pooled to one grid (every teacher's logits and blocks, often)
        go through one RoIAlign, their channels side by side."""
        params = params.to(next(iter(stored.values())).device)
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for key, value in stored.items():
            teacher, name = split_teacher_key(key)
            if name == LOGITS:
                h, w = self.map_size[teacher]
                grid, out = value.reshape(len(value), h, w, -1).permute(0, 3, 1, 2), 1
            else:
                grid, out = value, self.out_grid[name]
            groups.setdefault((tuple(grid.shape[-2:]), out), []).append((key, grid.float()))
        targets = {}
        for (map_size, out), members in groups.items():
            pooled = pool_boxes(torch.cat([grid for _, grid in members], 1), crop_rois(params.crop, sizes, map_size),
                                out)  # fmt: skip
            if out > 1:  # mirrored with the crop (one position is its own mirror)
                pooled = torch.where(params.flip[:, None, None, None], pooled.flip(-1), pooled)
                pooled = augment.vertical_flips(pooled, params)
            parts = pooled.split([grid.shape[1] for _, grid in members], dim=1)
            for (key, _), part in zip(members, parts, strict=True):
                targets[key] = part.flatten(1) if split_teacher_key(key)[1] == LOGITS else part
        return targets


def stored_bytes_per_image(classes: int, map_positions: int, blocks: list[tuple[int, int]], topk: int | None,
                           quantized: bool) -> int:  # fmt: skip
    """Bytes a dense store keeps per image and teacher, from its shapes: the logit map (every float16 logit, or
    top-k: k int16 classes, k float16 values and a float32 log-sum-exp a position) and the blocks ((channels, grid)
    each, 8-bit with an 8-byte range, or float16)."""
    per_position = 2 * classes if topk is None else 4 * topk + 4
    logits = map_positions * per_position
    features = sum(channels * grid * grid * (1 if quantized else 2) + (8 if quantized else 0)
                   for channels, grid in blocks)  # fmt: skip
    return logits + features


def dense_teacher(teacher, dense: DenseSettings):
    """A teacher as a dense store records it: refused unless its logit map is well defined (checked on the CPU,
    before the store exists), with the map's size and the blocks' stored grids in its spec."""
    cpu = torch.device("cpu")
    map_size = check_position_head(teacher, max(dense.sizes), Precision(cpu), cpu)
    spec = dataclasses.replace(dense_spec(teacher, dense), dense_map=map_size)
    return dataclasses.replace(teacher, spec=spec)
