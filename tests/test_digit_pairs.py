"""`--data digit-pairs`: 100 classes of real pixels offline, two sklearn digits side by side, class 10a + b.

Pinned against scikit-learn's own digits (never through the loader under test): each half of every pair is one of
the digits of its class, training pairs come only from the training split's images and test pairs only from the
test split's, classes are balanced, the rows are the same on every load, and a bad count is one `Error:` line."""

from __future__ import annotations

import numpy as np
import pytest
from console import run_console
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from meal_cache.data.datasets import load_dataset


@pytest.fixture(scope="module")
def pairs():
    return load_dataset("digit-pairs")


@pytest.fixture(scope="module")
def digit_halves():
    """Per split, the set of (class, 8x8 bytes) of sklearn's digits, split as the `digits` dataset is documented
    to be split (stratified 80/20, seed 0)."""
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(bunch.target))
    train, test = train_test_split(index, test_size=0.2, random_state=0, stratify=bunch.target)
    return {name: {(int(bunch.target[i]), pixels[i].tobytes()) for i in rows}
            for name, rows in (("train", train), ("test", test))}  # fmt: skip


def _halves(split) -> list[tuple[tuple[int, bytes], tuple[int, bytes]]]:
    images = split.images[:, 0].numpy()  # grey replicated to three channels
    labels = split.labels.numpy()
    return [((int(y) // 10, img[4:12, 0:8].tobytes()), (int(y) % 10, img[4:12, 8:16].tobytes()))
            for img, y in zip(images, labels, strict=True)]  # fmt: skip


def test_pairs_are_two_digits_of_their_class_from_their_own_split(pairs, digit_halves):
    assert pairs.num_classes == 100 and pairs.image_size == 16
    assert (len(pairs.train), len(pairs.test)) == (20_000, 3_600)
    for name in ("train", "test"):
        split = pairs.split(name)
        halves = _halves(split)
        known = digit_halves[name]
        assert all(left in known and right in known for left, right in halves), name
        # The rest of the canvas is blank, and the three channels are one grey image.
        images = split.images.numpy()
        assert images[:, :, :4].max() == 0 and images[:, :, 12:].max() == 0
        assert (images[:, 0] == images[:, 2]).all()
    # No digit image is in both splits (sklearn's digits hold no exact duplicate across this split).
    train_images = {img for _, img in digit_halves["train"]}
    test_used = {img for pair in _halves(pairs.test) for _, img in pair}
    assert not train_images & test_used


def test_classes_are_balanced_and_every_digit_is_used(pairs, digit_halves):
    assert np.bincount(pairs.train.labels.numpy(), minlength=100).tolist() == [200] * 100
    assert np.bincount(pairs.test.labels.numpy(), minlength=100).tolist() == [36] * 100
    # 3,600 test pairs draw 7,200 halves from 360 test digits: nearly every one appears.
    used = {half for pair in _halves(pairs.test) for half in pair}
    assert len(used) >= 0.95 * len(digit_halves["test"])
    # Rows are shuffled, not grouped by class.
    assert len(set(pairs.train.labels[:100].tolist())) > 50


def test_the_same_rows_on_every_load_and_a_chosen_count(pairs):
    again = load_dataset("digit-pairs")
    assert again.fingerprint("train") == pairs.fingerprint("train")
    assert again.fingerprint("test") == pairs.fingerprint("test")
    small = load_dataset("digit-pairs:250")
    assert len(small.train) == 250 and len(small.test) == 3_600
    assert np.bincount(small.train.labels.numpy(), minlength=100).max() == 3
    assert small.fingerprint("test") == pairs.fingerprint("test")
    assert load_dataset("digit-pairs", image_size=32).image_size == 32


@pytest.mark.parametrize("spec", ["digit-pairs:ten", "digit-pairs:99"])
def test_a_bad_pair_count_is_one_error_line(spec, tmp_path):
    result = run_console(["train", "--arch", "resnet8_w4", "--data", spec, "--out", str(tmp_path / "t.pt")], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: digit-pairs:N takes the number of training pairs, a whole number of at least 100 (one a class); "
        f"got '{spec.split(':')[1]}'"
    ]


def test_datasets_lists_the_sizes(tmp_path):
    result = run_console(["datasets"], tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("digit-pairs"))
    assert "100 classes" in line and "20,000 training" in line and "3,600 test" in line


def test_digits_with_a_count_is_one_error_line_not_silently_every_row(tmp_path):
    """`digits:300` is refused, naming what keeps fewer rows, rather than loading all 1,437 training rows."""
    result = run_console(["train", "--arch", "resnet8_w4", "--data", "digits:300", "--out", str(tmp_path / "t.pt")],
                         tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: digits takes no ':300'") and "train_fraction" in lines[0]
    assert not (tmp_path / "t.pt").exists()
