from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meal_cache.data.datasets import load_dataset
from meal_cache.data.registry import dataset_sources
from meal_cache.errors import UserError


def test_digits_shapes_split_and_normalisation(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.train.images.shape == (1437, 3, 16, 16) and digits.train.images.dtype == torch.uint8
    assert digits.num_classes == 10 and digits.image_size == 16 and digits.recipe == "digits"
    # Grey-scale replicated: the three channels are equal.
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])
    # Stratified: every class is in the test split in proportion (each digit has ~180 images, 20% ~ 36).
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # The recorded normalisation is the training pixels' statistics.
    pixels = digits.train.images.float() / 255
    assert digits.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-4)
    assert digits.std[0] == pytest.approx(pixels.std().item(), abs=1e-3)


def test_digits_fingerprint_stable_and_sensitive(digits):
    again = load_dataset("digits")
    assert digits.fingerprint("train") == again.fingerprint("train")
    assert digits.fingerprint("train") != digits.fingerprint("test")
    assert load_dataset("digits", image_size=32).fingerprint("train") != digits.fingerprint("train")
    describe = digits.describe()
    assert describe["fingerprint"]["test"] == digits.fingerprint("test")
    assert describe["sizes"] == {"train": 1437, "test": 360}


def test_fingerprint_changes_with_one_label_or_one_pixel(digits):
    from meal_cache.data.loader import fingerprint_rows

    images, labels = digits.train.images.clone(), digits.train.labels.clone()
    base = fingerprint_rows("digits", "train", images, labels)
    labels[5] = (labels[5] + 1) % 10
    assert fingerprint_rows("digits", "train", images, labels) != base
    images2 = digits.train.images.clone()
    images2[7, 1, 3, 3] ^= 1
    assert fingerprint_rows("digits", "train", images2, digits.train.labels) != base


def test_npz_without_split_draws_a_seeded_stratified_split(npz_path):
    data = load_dataset(f"npz:{npz_path}")
    assert (len(data.train), len(data.test)) == (48, 12)
    assert torch.bincount(data.test.labels).tolist() == [4, 4, 4]
    assert data.recipe == "digits" and data.image_size == 12
    assert data.fingerprint("test") == load_dataset(f"npz:{npz_path}").fingerprint("test")
    assert data.fingerprint("test") != load_dataset(f"npz:{npz_path}", seed=1).fingerprint("test")


def test_npz_with_split_and_colour(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10) % 2
    split = np.array([0] * 7 + [1] * 3)
    path = tmp_path / "c.npz"
    np.savez(path, images=images, labels=labels, split=split, classes=np.array(["cat", "dog"]))
    data = load_dataset(f"npz:{path}")
    assert data.classes == ("cat", "dog") and data.recipe == "natural"
    assert torch.equal(data.test.images, torch.from_numpy(images[7:]).permute(0, 3, 1, 2))
    assert data.test.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"pixels": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, int)}, "lacks array.s. images"),
        ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4, int)}, "images must be uint8"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, int)}, "labels must be integers"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, int), "split": np.zeros(4, int)}, "empty"),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        load_dataset(f"npz:{path}")


def test_imagefolder_reads_resizes_and_checks_classes(tmp_path):
    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("ants", "bees"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}?in_memory=1", image_size=16)
    assert data.train.images.shape == (6, 3, 16, 16) and data.test.images.shape == (4, 3, 16, 16)
    assert data.classes == ("ants", "bees") and data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert not data.streamed and load_dataset(f"imagefolder:{tmp_path}").streamed
    (tmp_path / "val" / "wasps").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "wasps" / "0.png")
    with pytest.raises(UserError, match="wasps that train/ lacks"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_fake_is_deterministic():
    a, b = load_dataset("fake:32"), load_dataset("fake:32")
    assert a.train.images.shape == (32, 3, 16, 16) and len(a.test) == 8
    assert torch.equal(a.train.images, b.train.images) and a.fingerprint("train") == b.fingerprint("train")


def test_torchvision_sets_without_files_ask_for_download(tmp_path):
    with pytest.raises(UserError, match="--download"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_loader_converts_torchvision_arrays(monkeypatch, tmp_path):
    """The CIFAR path on arrays shaped as torchvision gives them (no download in tests)."""
    import torchvision.datasets

    class FakeCifar:
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            n = 6 if train else 2
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.train.images.shape == (6, 3, 32, 32) and data.recipe == "natural" and data.classes == ("a", "b")
    assert data.train.images[1, 2, 0, 0] == FakeCifar(None, True, False).data[1, 0, 0, 2]


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError, match="choose one of: cifar10, cifar100, digit-pairs, digits"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="needs a path"):
        load_dataset("npz")
    assert set(dataset_sources()) >= {"digits", "cifar10", "cifar100", "svhn", "imagefolder", "npz", "fake"}


def test_label_noise_is_seeded_exact_and_spares_the_test_split(digits):
    noisy = load_dataset("digits?label_noise=0.4&noise=symmetric")
    changed = noisy.train.labels != digits.train.labels
    assert int(changed.sum()) == round(0.4 * 1437)
    assert torch.equal(noisy.clean_train_labels, digits.train.labels)
    assert torch.equal(noisy.test.labels, digits.test.labels) and torch.equal(noisy.train.images, digits.train.images)
    assert noisy.fingerprint("train") != digits.fingerprint("train")
    assert noisy.fingerprint("test") == digits.fingerprint("test")
    again = load_dataset("digits?label_noise=0.4&noise=symmetric")
    assert torch.equal(again.train.labels, noisy.train.labels)
    other_seed = load_dataset("digits?label_noise=0.4&noise_seed=1")
    assert not torch.equal(other_seed.train.labels, noisy.train.labels)
    pairs = load_dataset("digits?label_noise=0.2&noise=pairflip")
    moved = pairs.train.labels != digits.train.labels
    assert torch.equal(pairs.train.labels[moved], (digits.train.labels[moved] + 1) % 10)
    assert digits.clean_train_labels is None


def test_train_fraction_keeps_a_stratified_subset(digits):
    small = load_dataset("digits?train_fraction=0.2")
    assert len(small.train) == pytest.approx(0.2 * 1437, abs=1) and len(small.test) == 360
    assert torch.bincount(small.train.labels, minlength=10).min() >= 27


@pytest.mark.parametrize(
    "spec, message",
    [
        ("digits?label_noise=1.5", "label_noise must be in"),
        ("digits?noise=random&label_noise=0.1", "unknown noise kind 'random'"),
        ("digits?colour=red", "unknown dataset option 'colour=red'"),
        ("digits?train_fraction=lots", "takes a number"),
    ],
)
def test_bad_dataset_options_are_named(spec, message):
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def _row_keys(split, labels: torch.Tensor | None = None) -> list[bytes]:
    """One key per row, its pixels and label: rows compare across splits without knowing their pooled index."""
    labels = split.labels if labels is None else labels
    return [
        image.numpy().tobytes() + bytes([label]) for image, label in zip(split.images, labels.tolist(), strict=True)
    ]


def test_folds_test_every_image_exactly_once(digits):
    from collections import Counter

    folds = [load_dataset(f"digits?folds=5&fold={i}") for i in range(5)]
    pooled = Counter(_row_keys(digits.train) + _row_keys(digits.test))
    tested = Counter(key for fold in folds for key in _row_keys(fold.test))
    # Equal as multisets: every pooled row in exactly one test fold (a duplicated image counts as often as it occurs).
    assert tested == pooled and sum(tested.values()) == 1797
    for fold in folds:
        assert len(fold.train) + len(fold.test) == 1797
        assert Counter(_row_keys(fold.train)) + Counter(_row_keys(fold.test)) == pooled
    # Stratified: each class's share of a test fold is its pooled count / 5, within one image.
    class_counts = torch.bincount(torch.cat([digits.train.labels, digits.test.labels]), minlength=10).double()
    for fold in folds:
        in_fold = torch.bincount(fold.test.labels, minlength=10).double()
        assert (in_fold - class_counts / 5).abs().max() <= 1.0
    # Each fold is other data: its own fingerprints, distinct from the built-in split's; describe() records it.
    prints = {fold.fingerprint("test") for fold in folds} | {digits.fingerprint("test")}
    assert len(prints) == 6
    describe = folds[2].describe()
    assert describe["spec"] == "digits?folds=5&fold=2" and describe["fingerprint"]["test"] == folds[2].fingerprint(
        "test"
    )
    assert describe["sizes"] == {"train": len(folds[2].train), "test": len(folds[2].test)}
    # Normalisation is the fold's own training pixels'.
    assert folds[0].mean[0] == pytest.approx((folds[0].train.images.float() / 255).mean().item(), abs=1e-4)


def test_folds_are_reproducible_and_seeded():
    a, b = load_dataset("digits?folds=5&fold=3"), load_dataset("digits?folds=5&fold=3")
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    assert a.fingerprint("train") == b.fingerprint("train") and a.fingerprint("test") == b.fingerprint("test")
    # The run's seed does not move the folds; fold_seed does.
    assert load_dataset("digits?folds=5&fold=3", seed=7).fingerprint("test") == a.fingerprint("test")
    assert load_dataset("digits?folds=5&fold=3&fold_seed=1").fingerprint("test") != a.fingerprint("test")


def test_folds_compose_with_train_fraction_and_label_noise(digits):
    from collections import Counter

    fold = load_dataset("digits?folds=5&fold=1")
    both = load_dataset("digits?folds=5&fold=1&train_fraction=0.5&label_noise=0.4&noise=symmetric")
    # The fold split comes first: the same test rows, and their labels stay clean.
    assert torch.equal(both.test.images, fold.test.images) and torch.equal(both.test.labels, fold.test.labels)
    assert both.fingerprint("test") == fold.fingerprint("test")
    # Then half of the fold's training rows, then noise on exactly 40% of those.
    assert len(both.train) == pytest.approx(0.5 * len(fold.train), abs=1)
    kept, available = Counter(_row_keys(both.train, both.clean_train_labels)), Counter(_row_keys(fold.train))
    assert kept <= available
    changed = both.train.labels != both.clean_train_labels
    assert int(changed.sum()) == round(0.4 * len(both.train))
    noisy = load_dataset("digits?folds=5&fold=1&label_noise=0.2&noise=pairflip")
    moved = noisy.train.labels != fold.train.labels
    assert int(moved.sum()) == round(0.2 * len(fold.train))
    assert torch.equal(noisy.train.labels[moved], (fold.train.labels[moved] + 1) % 10)
    assert torch.equal(noisy.test.labels, fold.test.labels) and noisy.fingerprint("test") == fold.fingerprint("test")


FOLD_ERRORS = [
    ("digits?folds=5", "folds=5 needs fold=I"),
    ("digits?fold=0", "fold=0 needs folds=K"),
    ("digits?folds=1&fold=0", "folds must be at least 2"),
    ("digits?folds=5&fold=5", "fold must be in 0..4 for folds=5, got 5"),
    ("digits?folds=5&fold=-1", "fold must be in 0..4"),
    ("digits?folds=5.5&fold=0", "takes a whole number"),
    ("digits?folds=200&fold=0", "folds=200 is more than the 174 images of the smallest class (8)"),
]


@pytest.mark.parametrize("spec, message", FOLD_ERRORS)
def test_bad_fold_options_are_named(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_dataset(spec)


def test_fold_errors_through_the_cli_are_one_line(tmp_path):
    """The rows docs/errors.md adds for folds, run as tests/test_errors.py runs its own."""
    from click.testing import CliRunner

    from meal_cache.cli import main

    out = tmp_path / "x.pt"
    for spec, message in FOLD_ERRORS:
        result = CliRunner().invoke(main, ["train", "--arch", "resnet8", "--data", spec, "--out", str(out)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        # CliRunner keeps exceptions out of the output: an uncaught one would be result.exception, not SystemExit.
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (spec, result.exc_info)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
        assert not out.exists()
    errors_doc = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for spec, message in FOLD_ERRORS:
        if spec != "digits?folds=5&fold=-1":  # the same row as fold=5
            assert f"`train --data '{spec}'` | {message}" in errors_doc, spec
