"""Image sources: full-resolution views of image files, replayed bit for bit (issue 15)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from imagefolder import make_image_folder, write_image
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.datasets import load_dataset
from meal_cache.data.source import decode_rgb
from meal_cache.errors import UserError
from meal_cache.views import augment

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("jpegs"), classes=4, train=5, val=2)


def test_resized_crop_boxes_follow_torchvision_in_each_images_own_coordinates():
    sizes = torch.tensor([[150, 500], [480, 160], [300, 300], [200, 350]] * 500, dtype=torch.int32)
    params = augment.draw(augment.RECIPES["full"], sizes, augment.view_generator(0, 0))
    y0, x0, h, w = params.crop.long().unbind(1)
    height, width = sizes[:, 0].long(), sizes[:, 1].long()
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= height).all() and (x0 + w <= width).all()
    area = (h * w).double() / (height * width).double()
    ratio = w.double() / h.double()
    # Rounding the sides to pixels moves area and ratio a little past torchvision's bounds.
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.9
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert 0.4 < params.flip.float().mean() < 0.6
    # Wide boxes do reach the far edge of a wide image: the offsets span the whole image, not a square of it.
    assert int((x0 + w)[::4].max()) > 450


def test_an_extreme_aspect_ratio_falls_back_to_torchvision_centre_crop():
    sizes = torch.tensor([[10, 1000], [1000, 10]], dtype=torch.int32)
    params = augment.draw(augment.RECIPES["full"], sizes, augment.view_generator(0, 0))
    # 10 tries never fit a box of ratio <= 4/3 and area >= 8 % in a 1:100 image: torchvision's fallback.
    assert params.crop.tolist() == [[0, 493, 10, 13], [493, 0, 13, 10]]


def test_evaluation_view_is_the_central_224_of_256():
    sizes = torch.tensor([[256, 512], [300, 200]], dtype=torch.int32)
    params = augment.identity(sizes, augment.RECIPES["full"])
    assert params.crop.tolist() == [[16, 144, 224, 224], [62, 12, 175, 175]]
    assert not params.flip.any()


def test_a_rows_resized_crop_does_not_depend_on_the_other_rows_of_its_batch():
    images = torch.randint(0, 256, (6, 3, 96, 96), dtype=torch.uint8)
    params = augment.ViewParams(torch.tensor([[0, 0, 96, 96], [5, 3, 60, 70], [2, 2, 96, 96], [0, 0, 96, 96],
                                              [10, 10, 40, 40], [-3, 4, 96, 96]], dtype=torch.int16),
                                torch.tensor([False, True, False, True, False, False]))  # fmt: skip
    batch = augment.render(images, params)
    for row in range(6):
        alone = augment.render(images[row : row + 1], params[row : row + 1])
        assert torch.equal(batch[row], alone[0]), row
    # A box of the output size is an exact gather: the image itself (mirrored where flipped).
    assert torch.equal(batch[0], images[0].float()) and torch.equal(batch[3], images[3].float().flip(-1))


def test_files_are_decoded_cropped_resized_and_mirrored_the_same_with_any_worker_count(folder):
    data = load_dataset(f"imagefolder:{folder}", image_size=32)
    split = data.train
    assert data.streamed and data.image_size == 32 and len(split) == 20 and data.recipe == "full"
    sizes = split.source_sizes(0)
    params = augment.draw(augment.RECIPES["full"], sizes, augment.view_generator(1, 0))
    # Rows in any order and one row three times in a request (the multi-crop case: one decode, three crops).
    rows = torch.tensor([3, 0, 7, 7, 7, 12, 19, 5])
    crops = augment.ViewParams(params.crop[rows].clone(), params.flip[rows].clone())
    crops.crop[3] = torch.tensor([0, 0, int(sizes[7, 0]), int(sizes[7, 1])], dtype=torch.int16)
    crops.flip[4] = ~crops.flip[3]
    expected = []
    for row, (y0, x0, h, w), flip in zip(rows.tolist(), crops.crop.tolist(), crops.flip.tolist(), strict=True):
        image = decode_rgb(f"{folder}/{split.files[row].decode()}")
        assert tuple(image.shape[-2:]) == tuple(sizes[row].tolist())
        pixels = TF.resize(image[:, y0 : y0 + h, x0 : x0 + w], [32, 32], antialias=True)
        expected.append(pixels.flip(-1) if flip else pixels)
    expected = torch.stack(expected).float()
    for workers in (0, 2):
        source = split.open(CPU, workers)
        got = [pixels for _, pixels in source.pixels([(rows[:4], crops[:4], "a"), (rows[4:], crops[4:], "b")])]
        source.close()
        assert torch.equal(torch.cat(got), expected), workers
    source = split.open(CPU, 2)
    payloads = [payload for payload, _ in source.pixels((rows[i : i + 1], crops[i : i + 1], i) for i in range(8))]
    assert payloads == list(range(8))  # in request order, whatever worker decoded them


def test_streamed_rows_follow_the_folder_and_are_fingerprinted_by_file(folder, tmp_path):
    data = load_dataset(f"imagefolder:{folder}", image_size=32)
    assert data.classes == ("c00", "c01", "c02", "c03")
    assert data.train.labels.tolist() == [label for label in range(4) for _ in range(5)]
    assert len(data.test) == 8 and data.mean == (0.485, 0.456, 0.406)
    assert data.describe()["decoder"].startswith("torchcodec.decoders.decode_image 0.16")
    other = make_image_folder(tmp_path / "copy", classes=4, train=5, val=2)
    assert load_dataset(f"imagefolder:{other}", image_size=32).fingerprint("train") == data.fingerprint("train")
    first = other / "train" / "c00" / "0.jpg"
    write_image(first, 151, 152, np.array([1.0, 2.0, 3.0]), np.random.default_rng(5))
    assert load_dataset(f"imagefolder:{other}", image_size=32).fingerprint("train") != data.fingerprint("train")
    # Train fraction, folds and label noise take rows of files as they take rows of tensors.
    part = load_dataset(f"imagefolder:{folder}?train_fraction=0.5&label_noise=0.5", image_size=32)
    assert len(part.train) == 10 and part.clean_train_labels is not None
    assert (part.train.labels != part.clean_train_labels).sum() == 5
    fold = load_dataset(f"imagefolder:{folder}?folds=4&fold=1", image_size=32)
    assert len(fold.train) + len(fold.test) == 28 and len(fold.test) == 7


def test_grey_cmyk_rgba_and_palette_images_are_converted_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, mode, suffix in (("grey", "L", ".jpg"), ("cmyk", "CMYK", ".jpg"), ("rgba", "RGBA", ".png"),
                                   ("palette", "P", ".png")):  # fmt: skip
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            write_image(folder / f"0{suffix}", 90, 120, np.array([120.0, 60.0, 200.0]), rng, mode=mode)
    data = load_dataset(f"imagefolder:{tmp_path}", image_size=16)
    params = data.train.eval_view(0)
    ((_, pixels),) = data.train.open(CPU, 0).pixels([(torch.arange(4), params, None)])
    assert pixels.shape == (4, 3, 16, 16)
    grey = pixels[data.classes.index("grey")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    colour = pixels[data.classes.index("palette")].mean((1, 2))
    assert colour[2] > colour[0] > colour[1]  # the blue-violet it was drawn with, in RGB order


def test_bad_files_are_refused_or_skipped_on_request(tmp_path):
    root = make_image_folder(tmp_path / "bad", classes=2, train=3, val=1)
    (root / "train" / "c00" / "notes.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"notes\.jpg' is not a readable image.*skip_bad=1"):
        load_dataset(f"imagefolder:{root}").train.source_sizes(0)
    data = load_dataset(f"imagefolder:{root}?skip_bad=1", image_size=16, workers=0)
    assert len(data.train) == 6
    # A truncated JPEG has a readable header: it is found when decoded.
    good = root / "train" / "c01" / "0.jpg"
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "train" / "c00" / "notes.jpg").unlink()
    data = load_dataset(f"imagefolder:{root}", image_size=16)
    rows = torch.arange(len(data.train))
    with pytest.raises(UserError, match=r"c01/0\.jpg' cannot be decoded"):
        list(data.train.open(CPU, 0).pixels([(rows, data.train.eval_view(0), None)]))
    assert len(load_dataset(f"imagefolder:{root}?skip_bad=1", image_size=16, workers=0).train) == 5
    (root / "train" / "c02").mkdir()
    with pytest.raises(UserError, match="Found no valid file"):
        load_dataset(f"imagefolder:{root}")


def test_sizes_are_read_from_the_headers_by_workers(folder):
    split = load_dataset(f"imagefolder:{folder}", image_size=32).train
    sizes = split.source_sizes(2)
    assert sizes.dtype == torch.int32 and sizes.shape == (20, 2)
    assert 150 <= int(sizes.min()) and int(sizes.max()) <= 500
    assert not math.isclose(float(sizes[:, 0].float().std()), 0.0)


# ------------------------------------------------------------------------------------ replay through the stages


@pytest.fixture(scope="module")
def streamed_run(folder, tmp_path_factory):
    """Two teachers trained one epoch on the streamed folder at 32 px, for the replay tests."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    teachers = tmp_path_factory.mktemp("stream-teachers")
    for arch in ("resnet8_w4", "densenet_k12"):
        config = TrainConfig(arch=arch, data=f"imagefolder:{folder}", image_size=32, epochs=1, batch_size=8,
                             device="cpu", workers=0)  # fmt: skip
        train_supervised(config, teachers / f"{arch}.pt", progress=False)
    return folder, teachers


def _extract_recording(spec, teachers, out, monkeypatch, workers):
    """Extract 3 views + the identity view of ``spec``; returns, per view, the pixels the first teacher was fed
    for every row (captured at the teacher's forward)."""
    from by_hand import record_teacher_pixels
    from extract_order import fed_per_view

    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    fed = record_teacher_pixels(monkeypatch, "resnet8_w4")
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=spec, image_size=32, views=3,
                           identity_view=True, teacher_dir=str(teachers), rows_per_chunk=8, batch_size=4,
                           device="cpu", workers=workers)  # fmt: skip
    store = extract(config, out, progress=False)
    monkeypatch.undo()
    return store, fed_per_view(fed, store.n, store.num_views, config.rows_per_chunk, config.batch_size)


@pytest.mark.parametrize(("option", "workers"), [("?in_memory=1", 0), ("", 0), ("", 2)])
def test_distill_replays_the_pixels_and_targets_the_teachers_saw(streamed_run, tmp_path, monkeypatch, option,
                                                                  workers):  # fmt: skip
    from meal_cache import distill as distill_module
    from meal_cache.distill import DistillConfig, distill

    folder, teachers = streamed_run
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(f"imagefolder:{folder}{option}", teachers, path, monkeypatch, workers)
    assert (store.source_sizes() is None) == bool(option)
    assert ("decoder" in store.dataset) == (not option)
    seen = []
    real_step = distill_module.DistillEpochs.step

    def record(self, batch):
        (rows, targets, _), pixels = batch
        seen.append((rows.clone(), {k: v.clone() for k, v in targets.items()}, pixels.clone()))
        return real_step(self, batch)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    config = DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=3, batch_size=8,
                           device="cpu", workers=workers)  # fmt: skip
    distill(config, tmp_path / "run", progress=False)
    steps_per_epoch = store.n // 8
    assert len(seen) == 3 * steps_per_epoch
    logits = {view: torch.from_numpy(store.logits("resnet8_w4", view)) for view in range(3)}
    for index, (rows, targets, pixels) in enumerate(seen):
        view = index // steps_per_epoch  # epoch e replays view e mod 3
        assert torch.equal(pixels, fed[view][rows]), (index, view)
        assert torch.equal(targets["teachers/resnet8_w4/logits"].to(logits[view].dtype), logits[view][rows])
    # Every row was seen in every epoch; the views differ, so replay is not one view thrice.
    assert not torch.equal(fed[0], fed[1])


def test_multi_crop_batches_hold_k_cached_views_of_each_image_from_one_decode(streamed_run, tmp_path, monkeypatch):
    from meal_cache import distill as distill_module
    from meal_cache.data import source as source_module
    from meal_cache.distill import DistillConfig, distill

    folder, teachers = streamed_run
    path = tmp_path / "s.zarr"
    store, fed = _extract_recording(f"imagefolder:{folder}", teachers, path, monkeypatch, 0)
    seen, decoded = [], []
    real_step, real_decode = distill_module.DistillEpochs.step, source_module.decode_rgb

    def record(self, batch):
        (rows, targets, _), pixels = batch
        seen.append((rows.clone(), {k: v.clone() for k, v in targets.items()}, pixels.clone()))
        return real_step(self, batch)

    def counting_decode(file):
        decoded.append(file)
        return real_decode(file)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    monkeypatch.setattr(source_module, "decode_rgb", counting_decode)
    config = DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=2, batch_size=6,
                           crops_per_image=3, device="cpu", workers=0)  # fmt: skip
    summary = distill(config, tmp_path / "run", progress=False)
    assert [record["view"] for record in summary["history"]] == [[0, 1, 2], [0, 1, 2]]
    assert len(seen) == 2 * (store.n // 2)  # batches of 2 images x 3 crops: an epoch is 3 views of every image
    logits = torch.from_numpy(np.stack([store.logits("resnet8_w4", view) for view in range(3)]))
    for rows, targets, pixels in seen:
        images = rows[:2]
        assert torch.equal(rows, images.repeat(3))
        for crop in range(3):
            block = slice(2 * crop, 2 * crop + 2)
            assert torch.equal(pixels[block], fed[crop][images])
            assert torch.equal(targets["teachers/resnet8_w4/logits"][block].to(logits.dtype), logits[crop][images])
    train_decodes = [file for file in decoded if "/train/" in file]
    assert len(train_decodes) == 2 * store.n  # once per image and epoch, not once per crop
    # More cached views than crops: epoch e reads views 2e, 2e + 1 (mod 3), so the whole cache is replayed.
    seen.clear()
    fewer = dataclasses.replace(config, crops_per_image=2, batch_size=4, epochs=3)
    summary = distill(fewer, tmp_path / "run2", progress=False)
    assert [record["view"] for record in summary["history"]] == [[0, 1], [2, 0], [1, 2]]
    per_epoch = store.n // 2
    for index, (rows, targets, pixels) in enumerate(seen):
        images = rows[:2]
        for crop, view in enumerate([[0, 1], [2, 0], [1, 2]][index // per_epoch]):
            block = slice(2 * crop, 2 * crop + 2)
            assert torch.equal(pixels[block], fed[view][images]), (index, crop, view)
            assert torch.equal(targets["teachers/resnet8_w4/logits"][block].to(logits.dtype), logits[view][images])
    with pytest.raises(UserError, match="needs as many cached views"):
        distill(dataclasses.replace(config, crops_per_image=6, batch_size=12), tmp_path / "run6", progress=False)
    with pytest.raises(UserError, match="multiple of --crops-per-image"):
        distill(dataclasses.replace(config, batch_size=8), tmp_path / "run8", progress=False)
