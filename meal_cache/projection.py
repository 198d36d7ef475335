"""Fixed projections of pooled block channels (``extract --project D``): each block wider than D channels is stored
as its pooled channels times a ``(C, D)`` matrix with orthogonal columns, one of two kinds (``--projection``):

- ``pca``: the block's top D principal directions (orthonormal columns), fitted on the first rows of the first
  view before any chunk is written: the D-dimensional subspace that keeps the most of the rows' variance;
- ``random``: a seeded random matrix with orthonormal columns scaled by sqrt(C / D), so squared distances between
  rows are kept in expectation (Johnson-Lindenstrauss), whatever the data.

The matrix is stored in the store
(``teachers/NAME/projection/BLOCK``), so the store alone describes what its blocks are; distill's adapters map the
student's block to D channels, as to any teacher block. Blocks of D channels or fewer are stored as they are.

:func:`projection_quality` measures what a projection keeps, without training: the share of the rows' variance
in the projected subspace, and the relative error of distances between rows.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from meal_cache.store.keys import teacher_key

if TYPE_CHECKING:
    from meal_cache.store.teacher_store import TeacherStore

PROJECTION = "projection"
PROJECTIONS = ("pca", "random")
# PCA is fitted on at least this many rows per projected dimension (and at least one chunk), each pooled position a
# row: enough for the top D directions of a covariance without fitting every one of the C.
PCA_ROWS_PER_DIM = 8


def projection_key(teacher: str, block: str) -> str:
    """``teachers/NAME/projection/B``: the ``(C, D)`` matrix block ``B``'s pooled channels were multiplied by."""
    return teacher_key(teacher, f"{PROJECTION}/{block}")


def orthogonal_projection(channels: int, dim: int, seed: int, name: str) -> torch.Tensor:
    """A ``(channels, dim)`` float32 matrix with orthogonal columns of norm sqrt(channels / dim), drawn from
    ``seed`` and ``name`` (a teacher's block), the same on every run."""
    if not 1 <= dim <= channels:
        raise ValueError(f"a projection takes 1 <= dim <= channels, got dim {dim} for {channels} channels")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    gaussian = torch.randn(channels, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # QR's signs are the LAPACK's choice; fix them so Q is Haar-random
    return (q * math.sqrt(channels / dim)).float()


def pca_projection(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``(C, dim)`` float32 matrix of the top ``dim`` principal directions of ``rows`` (``(M, C)``), largest
    first, each column's sign fixed so its largest entry is positive (the eigensolver's sign is arbitrary)."""
    channels = rows.shape[1]
    if not 1 <= dim <= channels:
        raise ValueError(f"a projection takes 1 <= dim <= channels, got dim {dim} for {channels} channels")
    centred = rows.double() - rows.double().mean(0)
    covariance = centred.T @ centred / max(1, len(rows) - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors[:, -dim:].flip(1)
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return (top * torch.where(signs == 0, 1.0, signs)).float()


def column_norm(matrix: torch.Tensor) -> float:
    """The norm of a projection's columns (all equal): sqrt(C / D) for ``random``, 1 for ``pca``."""
    return float(matrix.double()[:, 0].norm())


def pooled_rows(pooled: torch.Tensor) -> torch.Tensor:
    """``(N, C, g, g)`` pooled channels as ``(N g g, C)``: each pooled position one row of channels."""
    return pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])


def project(pooled: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``(N, C, g, g)`` pooled channels as ``(N, D, g, g)``: each position's channels times ``matrix``."""
    pooled = pooled if pooled.dtype == torch.float64 else pooled.float()
    return torch.einsum("ncij,cd->ndij", pooled, matrix.to(pooled.device, pooled.dtype))


def stored_projections(store: TeacherStore, teacher: str) -> dict[str, torch.Tensor]:
    """The projection matrices of ``teacher``'s projected blocks, by block name (empty where none is; a matrix
    not written yet is left out)."""
    keys = {b.name: projection_key(teacher, b.key) for b in store.blocks(teacher) if b.projected_from is not None}
    return {name: torch.from_numpy(store.group[key][:]) for name, key in keys.items() if key in store.group}


def write_projection(store: TeacherStore, teacher: str, block: str, matrix: torch.Tensor) -> None:
    """Store ``matrix`` as block ``block``'s projection (one chunk: it is read whole)."""
    values = matrix.numpy().astype(np.float32)
    array = store.group.create_array(projection_key(teacher, block), shape=values.shape, chunks=values.shape,
                                     dtype="float32", overwrite=True)  # fmt: skip
    array[:] = values


class ProjectionSums:
    """Running sums over rows of a block's features (flattened, ``(N, F)``) and their projection, for
    :func:`projection_quality` chunk by chunk."""

    def __init__(self) -> None:
        self.rows = 0
        self.sum = self.sum_projected = None
        self.squares = self.squares_projected = 0.0
        self.distance_error = 0.0
        self.pairs = 0

    def add(self, features: np.ndarray, projected: np.ndarray, scale: float) -> None:
        """``features`` and their ``projected`` rows; ``scale`` is the projection's column norm (its matrix
        divided by it has orthonormal columns)."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float64)).flatten(1)
        y = torch.from_numpy(np.asarray(projected, dtype=np.float64)).flatten(1)
        self.rows += len(x)
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.sum_projected = y.sum(0) if self.sum_projected is None else self.sum_projected + y.sum(0)
        self.squares += float((x**2).sum())
        self.squares_projected += float((y**2).sum()) / scale**2
        # Distances between consecutive rows: a sample of pairs that needs no second pass.
        original = (x[1:] - x[:-1]).norm(dim=1)
        kept = original > 0
        moved = (y[1:] - y[:-1]).norm(dim=1)
        self.distance_error += float(((moved[kept] - original[kept]).abs() / original[kept]).sum())
        self.pairs += int(kept.sum())

    def summary(self, scale: float) -> dict:
        total = self.squares - float((self.sum**2).sum()) / self.rows
        inside = self.squares_projected - float((self.sum_projected**2).sum()) / scale**2 / self.rows
        return {"variance_kept": inside / total if total > 0 else 1.0,
                "distance_error": self.distance_error / max(1, self.pairs)}  # fmt: skip


def projection_quality(features: np.ndarray, matrix: np.ndarray) -> dict:
    """What projecting ``features`` (``(N, C)``, or ``(N, C, g, g)`` projected per position) by ``matrix`` keeps:
    ``variance_kept``, the share of the rows' variance (about their mean) inside the projected subspace, and
    ``distance_error``, the mean relative error of the distance between consecutive rows after projection."""
    features = np.asarray(features, dtype=np.float64)
    grid = features if features.ndim == 4 else features[:, :, None, None]
    projected = project(torch.from_numpy(grid), torch.from_numpy(np.asarray(matrix, dtype=np.float64))).numpy()
    scale = column_norm(torch.from_numpy(np.asarray(matrix, dtype=np.float64)))
    sums = ProjectionSums()
    sums.add(grid, projected, scale)
    return sums.summary(scale)
