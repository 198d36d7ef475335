"""Many views as a normal case (issue 28): a 64-view store is extracted one view at a time, verified, and
distilled from with only the views in use held; multi-crop takes its crops from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig, distill
from meal_cache.distill.built_run import ReplayedViews
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store import open_store, verify_store
from meal_cache.views import augment

VIEWS = 64


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits?train_fraction=0.1")


@pytest.fixture(scope="module")
def many_views(tmp_path_factory, teacher_dir, small_digits):
    """64 augmented views of 143 digits rows (logits and the last block's pooled channels), 64-row chunks."""
    path = tmp_path_factory.mktemp("views") / "v64.zarr"
    config = ExtractConfig(teachers=["resnet8_w4"], views=VIEWS, teacher_dir=str(teacher_dir), device="cpu",
                           features=["blocks"], blocks="1", rows_per_chunk=64, quantize=8)  # fmt: skip
    extract(config, path, progress=False, dataset=small_digits)
    return path, config


def test_a_64_view_store_holds_each_view_drawn_from_its_own_seed_in_its_own_chunks(many_views, small_digits):
    path, config = many_views
    store = open_store(path)
    assert store.num_views == VIEWS and store.complete and verify_store(store).ok
    assert store.progress("resnet8_w4").shape == (VIEWS, 3) and store.progress("resnet8_w4").all()
    # One epoch reads one view's chunks: every teacher array is chunked one view deep.
    for key in store.feature_keys("resnet8_w4"):
        for array in store.with_companions([key]):
            assert store.array(array).chunks[0] == 1, array
    # Views drawn one at a time while the store was created are the views drawn from their own generators.
    split = small_digits.split("train")
    recipe = augment.recipe_for(small_digits.recipe, small_digits.image_size)
    sizes = split.source_sizes(0)
    for view in (0, 17, VIEWS - 1):
        drawn = augment.draw(recipe, sizes, augment.view_generator(config.seed, view), None, None,
                             small_digits.image_size)  # fmt: skip
        stored = store.view_params(view)
        assert torch.equal(stored.crop, drawn.crop) and torch.equal(stored.flip, drawn.flip)
    crops = np.asarray(store.array("views/crop")[:])
    assert len({crops[v].tobytes() for v in range(VIEWS)}) == VIEWS  # 64 different views


def test_replayed_views_hold_only_the_last_few(many_views):
    store = open_store(many_views[0])
    replayed = ReplayedViews(store, keep=2)
    for view in range(VIEWS):
        params = replayed(view)
        assert torch.equal(params.crop, store.view_params(view).crop)
        assert len(replayed.held) <= 2
    assert list(replayed.held) == [VIEWS - 2, VIEWS - 1]
    assert replayed(VIEWS - 2) is replayed.held[VIEWS - 2]  # a view in use is read once


def test_distill_replays_the_64_views_one_per_epoch_and_multi_crop_takes_four_a_step(many_views, small_digits,
                                                                                    tmp_path):  # fmt: skip
    path, _ = many_views
    config = DistillConfig(store=str(path), student="resnet8_w4", method="meal", epochs=3, batch_size=32,
                           device="cpu", workers=0)  # fmt: skip
    summary = distill(config, tmp_path / "one", progress=False, dataset=small_digits)
    assert [row["view"] for row in summary["history"]] == [0, 1, 2]
    crops = DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=2, batch_size=32,
                          crops_per_image=4, device="cpu", workers=0)  # fmt: skip
    summary = distill(crops, tmp_path / "four", progress=False, dataset=small_digits)
    assert [row["view"] for row in summary["history"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(np.isfinite(row["loss"]) for row in summary["history"])


def test_distill_notes_when_each_view_is_replayed_more_than_the_long_schedule_allows(many_views, small_digits,
                                                                                     capsys):  # fmt: skip
    """64 views: 960 epochs replay each 15 times (no note), 1,000 epochs 16 times (a note naming the views that
    would do)."""
    from meal_cache.distill import build_run
    from meal_cache.engine.distributed import World

    def note(epochs: int, **options) -> str:
        config = DistillConfig(store=str(many_views[0]), student="resnet8_w4", method="kd", epochs=epochs,
                               device="cpu", workers=0, **options).resolved(("blocks",))  # fmt: skip
        run = build_run(config, World(), torch.device("cpu"), small_digits, progress=True)
        run.source.close()
        run.images.close()
        return capsys.readouterr().out

    assert "note:" not in note(960)
    text = note(1000)
    assert "1000 epochs replay each of the store's 64 views 16 times" in text and "--views 67 or more" in text
