"""A dataset spec's modifiers: the ``?OPTION=VALUE&...`` after ``NAME[:ARG]``, parsed and checked, and the seeded
draws they call for (label noise, a k-fold re-split).

Nothing here knows the registry or the splits' storage: :func:`~meal_cache.data.datasets.parse_spec` checks the name
against the registry and :func:`~meal_cache.data.datasets.load_dataset` applies the modifiers to whichever splits a
loader returns, in the order :class:`Modifiers` documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meal_cache.errors import UserError, unknown_choice


@dataclass(frozen=True)
class Modifiers:
    """Changes to a dataset's splits, written into the spec after ``?`` so that every stage that reloads the data
    from a recorded spec reproduces them: ``digits?label_noise=0.4&noise=symmetric``.

    - ``folds`` K (>= 2) with ``fold`` I (0 <= I < K): pool the train and test rows and re-split them with
      scikit-learn's ``StratifiedKFold(K, shuffle=True, random_state=fold_seed)``; fold I is the test split, the
      other K - 1 folds the train split. Over I = 0..K-1 every image is tested exactly once;
    - ``train_fraction`` (0-1]: keep a stratified, seeded fraction of the training rows (low-data protocol);
    - ``label_noise`` [0-1): the fraction of training labels changed, seeded; the test split stays clean;
    - ``noise``: ``symmetric`` (to a uniformly drawn other class) or ``pairflip`` (class c to c+1 mod C, the
      class-dependent kind);
    - ``noise_seed`` / ``fraction_seed`` / ``fold_seed``: the seeds of the three draws (default 0, whatever the
      run's ``--seed``, so runs with other seeds see the same rows);
    - ``in_memory`` 1 (``imagefolder`` only): decode once into memory at --image-size (default 32) instead of
      streaming the files at full resolution (default 224);
    - ``skip_bad`` 1 (``imagefolder`` only): decode every file first and leave out, counted and reported, those
      that do not decode, instead of refusing them;
    - ``glyphs`` 1 (any dataset): the images are glyphs (digits, letters, text), which a mirror turns into other
      glyphs: the views' horizontal and vertical flips default to 0 (``--hflip``/``--vflip`` still set them).
      The built-in digits, SVHN and grey-scale npz data never flip anyway.

    They apply in this order: the fold split, then ``train_fraction`` on its train part, then label noise on what
    is left of the train part; the test split is never subsampled or corrupted.
    """

    train_fraction: float = 1.0
    label_noise: float = 0.0
    noise: str = "symmetric"
    noise_seed: int = 0
    fraction_seed: int = 0
    folds: int | None = None
    fold: int | None = None
    fold_seed: int = 0
    in_memory: int = 0
    skip_bad: int = 0
    glyphs: int = 0


# Options of how a source is read rather than of which rows it has.
LOADER_OPTIONS = ("in_memory", "skip_bad")
# Options that are switched on with 1 (off with 0, their default).
FLAG_OPTIONS = (*LOADER_OPTIONS, "glyphs")
NOISE_KINDS = ("symmetric", "pairflip")


def _what_it_takes(key: str, kind: str) -> str:
    """How a refusal names an option's values: a flag's ``0 or 1`` (the words its range check uses), else the
    kind of number."""
    if key in FLAG_OPTIONS:
        return "0 or 1"
    return "a whole number" if kind.startswith("int") else "a number"


def parse_modifiers(text: str) -> Modifiers:
    """The text after a spec's ``?`` (``label_noise=0.4&noise=pairflip``) -> :class:`Modifiers`, every value
    checked."""
    values: dict = {}
    fields = {f.name: f.type for f in Modifiers.__dataclass_fields__.values()}
    for item in filter(None, text.split("&")):
        key, sep, value = item.partition("=")
        if key not in fields or not sep:
            raise UserError(f"unknown dataset option '{item}'; options are {', '.join(f'{k}=...' for k in fields)}")
        # The annotations are strings (postponed evaluation): "str", "float", "int" or "int | None".
        kind = fields[key]
        try:
            values[key] = value if kind == "str" else (int(value) if kind.startswith("int") else float(value))
        except ValueError as err:
            raise UserError(f"dataset option {key} takes {_what_it_takes(key, kind)}, got '{value}'") from err
    modifiers = Modifiers(**values)
    if not 0.0 < modifiers.train_fraction <= 1.0:
        raise UserError(f"train_fraction must be in (0, 1], got {modifiers.train_fraction}")
    if not 0.0 <= modifiers.label_noise < 1.0:
        raise UserError(f"label_noise must be in [0, 1), got {modifiers.label_noise}")
    if modifiers.noise not in NOISE_KINDS:
        raise unknown_choice("noise kind", modifiers.noise, NOISE_KINDS)
    if modifiers.folds is not None and modifiers.fold is None:
        raise UserError(f"dataset option folds={modifiers.folds} needs fold=I, the test fold (e.g. folds=5&fold=0)")
    if modifiers.fold is not None and modifiers.folds is None:
        raise UserError(
            f"dataset option fold={modifiers.fold} needs folds=K, the number of folds (e.g. folds=5&fold=0)"
        )
    for flag in FLAG_OPTIONS:
        if getattr(modifiers, flag) not in (0, 1):
            raise UserError(f"dataset option {flag} takes 0 or 1, got {getattr(modifiers, flag)}")
    if modifiers.folds is not None:  # and so fold, checked above
        if modifiers.folds < 2:
            raise UserError(f"folds must be at least 2, got {modifiers.folds}")
        if not 0 <= modifiers.fold < modifiers.folds:
            raise UserError(
                f"fold must be in 0..{modifiers.folds - 1} for folds={modifiers.folds}, got {modifiers.fold}"
            )
    return modifiers


def corrupt_labels(labels: torch.Tensor, num_classes: int, rate: float, kind: str, seed: int) -> torch.Tensor:
    """Seeded label noise: exactly ``round(rate * N)`` rows changed, to another class (see :class:`Modifiers`)."""
    generator = torch.Generator().manual_seed(seed)
    count = round(rate * len(labels))
    rows = torch.randperm(len(labels), generator=generator)[:count]
    noisy = labels.clone()
    if kind == "pairflip":
        noisy[rows] = (labels[rows] + 1) % num_classes
    else:
        shift = torch.randint(1, num_classes, (count,), generator=generator)
        noisy[rows] = (labels[rows] + shift) % num_classes
    return noisy


def fold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows in test fold ``fold`` of a seeded, shuffled ``StratifiedKFold(folds)``."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if folds > smallest:
        # scikit-learn only warns here, and some folds would then lack the class entirely.
        rarest = int(np.flatnonzero(counts == smallest)[0])
        raise UserError(
            f"folds={folds} is more than the {smallest} images of the smallest class ({rarest}); "
            "every fold needs at least one image of each class"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, test_idx = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    return mask
