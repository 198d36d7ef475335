"""Mixup and CutMix in replayable views: a view's partners, shares and boxes drawn from its seed
(:func:`draw_mixing`, called by :func:`~meal_cache.views.augment.draw`), and the mixed pixels and labels rebuilt from
them (:func:`mix`, :func:`mixed_labels`).

The drawn fields live on :class:`~meal_cache.views.augment.ViewParams` (``mix_partner``, ``mix_lambda``, ``mix_box``),
which imports this module; what is read back of a view is described by :class:`MixedView`, so no import, not even
a type checker's, goes back to augment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mixing:
    """Mixup and CutMix over a view's rows, as timm's ``Mixup`` in its per-element mode: each row is mixed with
    probability ``prob``; where both alphas are set, CutMix is chosen with probability ``switch_prob``, else
    Mixup; the row's own share ``lambda`` is drawn from Beta(alpha, alpha), and CutMix's box has sides
    ``sqrt(1 - lambda)`` of the image, centred uniformly and clipped, ``lambda`` then corrected to the area
    kept. Partners are a random permutation of the split's rows (each view its own)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def mixing_from_json(data: dict | None) -> Mixing | None:
    return Mixing(**data) if data else None


def cutmix_boxes(lam: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """timm's ``rand_bbox``: int16 ``(N, 4)`` y0, x0, h, w of a box with sides ``int(size * sqrt(1 - lam))``
    centred at a uniform pixel and clipped to the image."""
    cut = (size * torch.sqrt(1.0 - lam.double())).long()
    centre = torch.randint(size, (len(lam), 2), generator=generator)
    low = (centre - cut[:, None] // 2).clamp(0, size)
    high = (centre + cut[:, None] // 2).clamp(0, size)
    return torch.cat([low, high - low], 1).to(torch.int16)


def draw_mixing(mixing: Mixing, n: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One view's ``mix_partner``, ``mix_lambda`` and ``mix_box`` for ``n`` rows of ``size`` px output."""
    partner = torch.randperm(n, generator=generator).to(torch.int32)
    # torch draws no Beta from a Generator; numpy does, from a seed this generator gives.
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    use_cutmix = np.zeros(n, dtype=bool)
    if mixing.mixup > 0 and mixing.cutmix > 0:
        use_cutmix = rng.random(n) < mixing.switch_prob
        lam = np.where(use_cutmix, rng.beta(mixing.cutmix, mixing.cutmix, n), rng.beta(mixing.mixup, mixing.mixup, n))
    elif mixing.cutmix > 0:
        use_cutmix = np.ones(n, dtype=bool)
        lam = rng.beta(mixing.cutmix, mixing.cutmix, n)
    else:
        lam = rng.beta(mixing.mixup, mixing.mixup, n)
    mixed = rng.random(n) < mixing.prob
    lam = torch.from_numpy(np.where(mixed, lam, 1.0).astype(np.float32))
    use_cutmix = torch.from_numpy(use_cutmix & mixed)
    box = torch.where(use_cutmix[:, None], cutmix_boxes(lam, size, generator), torch.zeros(n, 4, dtype=torch.int16))
    area = box[:, 2].float() * box[:, 3].float()
    # CutMix's share is the area kept (timm's correct_lam), so a box clipped at the border mixes its labels right.
    lam = torch.where(use_cutmix, 1.0 - area / float(size * size), lam)
    return {"mix_partner": partner, "mix_lambda": lam, "mix_box": box}


def unmixed_mixing(n: int) -> dict[str, torch.Tensor]:
    """The mixing fields of rows that are not mixed (an identity view of a mixing store)."""
    return {"mix_partner": torch.arange(n, dtype=torch.int32), "mix_lambda": torch.ones(n),
            "mix_box": torch.zeros(n, 4, dtype=torch.int16)}  # fmt: skip


class MixedView(Protocol):
    """The mixing fields of a view's rows, as :class:`~meal_cache.views.augment.ViewParams` holds them (None: no
    mixing)."""

    @property
    def mix_lambda(self) -> torch.Tensor | None: ...

    @property
    def mix_box(self) -> torch.Tensor | None: ...


def mixed_rows(params: MixedView) -> torch.Tensor:
    """The indices of the rows that take a partner (none without mixing)."""
    if params.mix_lambda is None:
        return torch.zeros(0, dtype=torch.long)
    return (params.mix_lambda.cpu() < 1).nonzero()[:, 0]


def mix(pixels: torch.Tensor, partner_pixels: torch.Tensor, params: MixedView, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``pixels`` (float 0-255, after each row's own crop, flip and ops) mixed with their
    partners' pixels (``partner_pixels[i]`` for ``rows[i]``): the partner's patch pasted into the box (CutMix) or
    the two blended by the row's ``lambda`` (Mixup). Elementwise per row, so a row's pixels depend on its own
    and its partner's alone."""
    if not len(rows):
        return pixels
    out = pixels.clone()
    device = pixels.device
    rows_dev = rows.to(device)
    own, other = pixels[rows_dev], partner_pixels.to(pixels.dtype)
    box = params.mix_box[rows].to(device).long()
    lam = params.mix_lambda[rows].to(device).to(pixels.dtype).view(-1, 1, 1, 1)
    size_y, size_x = pixels.shape[-2:]
    y = torch.arange(size_y, device=device).view(1, -1, 1)
    x = torch.arange(size_x, device=device).view(1, 1, -1)
    y0, x0, h, w = (box[:, i].view(-1, 1, 1) for i in range(4))
    inside = ((y >= y0) & (y < y0 + h) & (x >= x0) & (x < x0 + w))[:, None]
    cut = (h * w > 0).view(-1, 1, 1, 1)
    blended = own * lam + other * (1.0 - lam)
    out[rows_dev] = torch.where(cut, torch.where(inside, other, own), blended)
    return out


def mixed_labels(labels: torch.Tensor, params: MixedView | None, num_classes: int,
                 partner_labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Hard labels as class probabilities, mixed with the partners' by each row's ``lambda`` (timm's and FKD's
    mixed targets); unmixed rows are one-hot. ``partner_labels`` are the partners' labels."""
    target = F.one_hot(labels, num_classes).float()
    if params is None or params.mix_lambda is None or partner_labels is None:
        return target
    lam = params.mix_lambda.to(labels.device).float()[:, None]
    return lam * target + (1.0 - lam) * F.one_hot(partner_labels, num_classes).float()
