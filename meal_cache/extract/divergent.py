"""Divergent views: images on which the fixed teachers disagree, found once by a PGD search and cached.

This is not ACN (adversarial co-distillation), whose generator is trained in alternation with co-distilling
classifiers to make them disagree; it borrows ACN's observation that images on which classifiers disagree carry the
dark knowledge, and makes such images once, at extraction, and caches them: ``extract --divergent-views K`` adds K
views per row, each made from the row's un-augmented image by ``--divergent-steps`` signed-gradient ascent steps on
the teachers' disagreement, kept within an L-infinity ball of ``--divergent-eps`` (a fraction of the 0-255 range)
around it and within the valid pixels (projected gradient ascent, as Madry et al.'s PGD, from a seeded uniform start
inside the ball). The disagreement is the generalised Jensen-Shannon divergence of the teachers' softmax outputs at
T = 1: the mean over teachers of KL(p_i || mean p), zero exactly when they all agree, and bounded by log(number of
teachers).

Divergent pixels cannot be replayed from a few parameters, so they are stored as uint8 (``divergent/pixels``), and
the teachers' outputs are computed on those stored uint8 pixels, the exact ones distill then feeds (see
:class:`DivergentSource`). Their teacher outputs are views of the store like any other, after the augmented and
identity views (``views.divergent`` says which), so distill, inspect and verify read them unchanged; distill mixes
their batches into its epochs (``distill --divergent-ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from meal_cache.errors import UserError
from meal_cache.store.keys import DIVERGENT_PIXELS
from meal_cache.views import augment

# PGD's usual step: 2.5 eps / steps lets a search reach the ball's boundary and move along it.
STEP_FACTOR = 2.5


@dataclass(frozen=True)
class DivergentSearch:
    """How divergent views are made: ``views`` per row, ``steps`` signed-gradient steps of ``step_size`` within
    ``eps`` (both fractions of the 0-255 pixel range), from a uniform start drawn from ``seed`` per (view, row)."""

    views: int
    eps: float
    steps: int
    seed: int
    loss: str = "js"  # generalised Jensen-Shannon divergence among the teachers at T = 1
    start: str = "identity"  # the row's un-augmented image

    @property
    def step_size(self) -> float:
        return STEP_FACTOR * self.eps / self.steps

    def to_json(self) -> dict:
        return {**asdict(self), "step_size": self.step_size}


def search_from_json(data: dict | None) -> DivergentSearch | None:
    if not data:
        return None
    return DivergentSearch(int(data["views"]), float(data["eps"]), int(data["steps"]), int(data["seed"]),
                           data.get("loss", "js"), data.get("start", "identity"))  # fmt: skip


def check_search(views: int, eps: float, steps: int, teachers: int) -> None:
    """A user's ``--divergent-*`` settings, refused with the reason."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise UserError(f"--divergent-views takes 0 (none) or more views a row, got {views!r}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or math.isnan(eps) or not 0 <= eps <= 1:
        raise UserError(f"--divergent-eps is a fraction of the pixel range in [0, 1] (8/255 = 0.031), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--divergent-steps must be at least 1, got {steps!r}")
    if views and teachers < 2:
        raise UserError("--divergent-views searches for images the teachers disagree on: name at least two teachers")


def disagreement(logits: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the teachers' generalised Jensen-Shannon divergence at T = 1: mean_i KL(p_i || mean_j p_j)."""
    log_probs = torch.stack([F.log_softmax(value.float(), dim=1) for value in logits])
    mean_log = torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
    return (log_probs.exp() * (log_probs - mean_log)).sum(-1).mean(0)


def _start_noise(rows: torch.Tensor, shape: tuple[int, ...], search: DivergentSearch, view: int) -> torch.Tensor:
    """Uniform in [-1, 1), one generator per (view, row): a row's start never depends on its batch."""
    noise = torch.empty((len(rows), *shape))
    for index, row in enumerate(rows.tolist()):
        generator = torch.Generator().manual_seed((search.seed * 1_000_003 + view) * 1_000_033 + row)
        noise[index] = torch.rand(shape, generator=generator) * 2 - 1
    return noise


def divergent_pixels(teachers: list, start: torch.Tensor, rows: torch.Tensor, search: DivergentSearch, view: int,
                     channels_last: bool = False) -> torch.Tensor:  # fmt: skip
    """uint8 pixels of ``rows`` (their un-augmented ``start`` pixels, float 0-255) after the search: every
    teacher in eval mode, gradients taken with respect to the input alone, in float32. Raises a UserError
    naming a teacher whose output carries no gradient to its input."""
    eps, alpha = 255.0 * search.eps, 255.0 * search.step_size
    with torch.inference_mode(False), torch.enable_grad():
        origin = start.detach().clone().float()
        noise = _start_noise(rows, tuple(origin.shape[1:]), search, view).to(origin.device)
        pixels = (origin + eps * noise).clamp(0, 255)
        low, high = (origin - eps).clamp(min=0), (origin + eps).clamp(max=255)
        for _ in range(search.steps):
            pixels.requires_grad_(True)
            logits = []
            for teacher in teachers:
                batch = augment.normalise(pixels, teacher.mean, teacher.std, channels_last)
                out = teacher.model(batch)
                if not out.requires_grad:
                    raise UserError(f"teacher {teacher.spec.key} gives no gradient with respect to its input "
                                    "(its forward runs without autograd), so --divergent-views cannot search "
                                    "its images; leave it out of --teachers or extract without "
                                    "--divergent-views")  # fmt: skip
                logits.append(out)
            (gradient,) = torch.autograd.grad(disagreement(logits).sum(), pixels)
            pixels = torch.minimum(torch.maximum(pixels.detach() + alpha * gradient.sign(), low), high)
    return pixels.detach().round().clamp(0, 255).to(torch.uint8)


class DivergentSource:
    """An image source for one divergent view during extraction: each request's rows are rendered un-augmented
    by ``source``, searched, rounded to uint8 and stored; the teachers are then fed those stored pixels. The
    requests cover each unit's rows in order (as extract asks), and a unit's pixels (a chunk's, or a shard's) are
    written with its last row, whole units only, as every store write."""

    def __init__(self, source, teachers: list, store, search: DivergentSearch, view: int, channels_last: bool) -> None:
        self.source, self.teachers, self.store, self.search = source, teachers, store, search
        self.view, self.channels_last = view, channels_last

    def pixels(self, requests: Iterable[tuple[torch.Tensor, augment.ViewParams, Any]]):
        parts: list[torch.Tensor] = []
        # Each request's rows travel with its payload, so the search knows whose pixels came back.
        asked = ((rows, params, (rows, payload)) for rows, params, payload in requests)
        for (rows, payload), pixels in self.source.pixels(asked):
            found = divergent_pixels(self.teachers, pixels, rows, self.search, self.view, self.channels_last)
            parts.append(found.cpu())
            unit_rows = self.store.unit_rows(int(rows[0]) // self.store.layout.rows_per_unit)
            if int(rows[-1]) + 1 == unit_rows.stop:
                self.store.array(DIVERGENT_PIXELS)[self.view, unit_rows] = torch.cat(parts).numpy()
                parts = []
            yield payload, found.float()

    def close(self) -> None:
        self.source.close()
