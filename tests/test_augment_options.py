"""timm's train.py augmentation knobs (--scale, --ratio, --hflip, --vflip) and ?glyphs=1: drawn into the store's
views, recorded with them, replayed from them, and drawn again as recorded by distill's fresh views."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from imagefolder import make_image_folder
from torchvision.transforms.v2 import functional as TF

from meal_cache.cli import main
from meal_cache.data.datasets import load_dataset
from meal_cache.data.source import decode_rgb
from meal_cache.errors import UserError
from meal_cache.store import FORMAT, VIEW_FLIP, VIEW_VFLIP, describe_store, open_store
from meal_cache.views import augment

TEACHERS = "resnet8_w4,densenet_k12"  # conftest's teacher_dir: 10 digit classes at 16 px
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Ten classes (as the digits teachers predict) of two small JPEGs each, aspect ratios within 1.4 so that even
    RandomResizedCrop's fallback box keeps over half the area."""
    return make_image_folder(tmp_path_factory.mktemp("jpegs"), classes=10, train=2, val=1, sizes=(40, 56))


def _extract(spec: str, teacher_dir: Path, out: Path, *options: str) -> None:
    """``meal-cache extract`` of one view of ``spec`` at 16 px, through the command line (in this process)."""
    args = ["extract", "--teachers", TEACHERS, "--teacher-dir", str(teacher_dir), "--data", spec, "--image-size",
            str(SIZE), "--views", "1", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out),
            *options]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_scale_and_ratio_bound_every_stored_crop(folder, teacher_dir, tmp_path):
    out = tmp_path / "s.zarr"
    _extract(f"imagefolder:{folder}", teacher_dir, out, "--scale", "0.5", "1", "--ratio", "1", "1")
    store = open_store(out)
    boxes, sizes = store.view_params(0).crop.long(), store.source_sizes().long()
    y0, x0, h, w = boxes.unbind(1)
    height, width = sizes.unbind(1)
    assert torch.equal(h, w)  # ratio 1: square boxes (both sides are the same rounded root)
    # Each side is a rounded square root of a share in [0.5, 1] of the area: at most half a pixel short.
    assert ((h + 0.5) * (w + 0.5) >= 0.5 * height * width).all() and (h * w <= height * width).all()
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= height).all() and (x0 + w <= width).all()
    record = store.attrs["views"]["augmentation"]
    assert record["scale"] == [0.5, 1.0] and record["ratio"] == [1.0, 1.0] and record["hflip"] == 0.5
    assert store.view_recipe.resized_crop_scale == (0.5, 1.0) and store.view_recipe.ratio == (1.0, 1.0)
    assert "(full [scale 0.5-1, ratio 1-1, hflip 0.5, vflip 0]" in describe_store(store)  # what `info` shows


def test_hflip_0_stores_no_flips(folder, teacher_dir, tmp_path):
    out = tmp_path / "s.zarr"
    _extract(f"imagefolder:{folder}", teacher_dir, out, "--hflip", "0", "--views", "2")
    store = open_store(out)
    assert not store.array(VIEW_FLIP)[:].any() and VIEW_VFLIP not in store.group
    assert store.attrs["views"]["augmentation"]["hflip"] == 0.0 and store.view_recipe.hflip == 0.0


def test_vflip_1_flips_every_row_and_replays_the_vertically_flipped_image(folder, teacher_dir, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    from by_hand import record_teacher_pixels

    seen = record_teacher_pixels(monkeypatch, "resnet8_w4")
    out = tmp_path / "s.zarr"
    _extract(f"imagefolder:{folder}", teacher_dir, out, "--vflip", "1", "--hflip", "0")
    monkeypatch.undo()
    store = open_store(out)
    params = store.view_params(0)
    assert store.attrs["format"] == FORMAT and params.vflip is not None and bool(params.vflip.all())
    split = load_dataset(f"imagefolder:{folder}", image_size=SIZE).train
    expected = []
    for row, (y0, x0, h, w) in enumerate(params.crop.tolist()):
        image = decode_rgb(str(Path(split.root) / split.files[row].decode()))
        crop = TF.resize(image[:, y0 : y0 + h, x0 : x0 + w], [SIZE, SIZE], antialias=True)
        expected.append(torch.flip(crop, dims=[-2]))
    expected = torch.stack(expected).float()
    source = split.open(torch.device("cpu"), 0)
    replayed = next(source.pixels([(torch.arange(store.n), params, None)]))[1]
    assert torch.equal(replayed, expected)  # what distill replays
    assert torch.equal(torch.cat(seen), expected)  # what the teachers saw


def test_glyphs_option_turns_flips_off_unless_asked(folder, teacher_dir, tmp_path):
    out = tmp_path / "s.zarr"
    _extract(f"imagefolder:{folder}?glyphs=1", teacher_dir, out, "--views", "2")
    store = open_store(out)
    assert not store.array(VIEW_FLIP)[:].any() and store.view_recipe.hflip == 0.0
    # In memory too (natural images flip by default), and a flip given explicitly still counts.
    fake = load_dataset("fake:8?glyphs=1")
    assert fake.view_recipe().hflip == 0.0 and load_dataset("fake:8").view_recipe().hflip == 0.5
    assert fake.view_recipe(augment.AugmentOptions(hflip=1.0)).hflip == 1.0


def test_fresh_views_in_distill_draw_with_the_recorded_options(teacher_dir, tmp_path, monkeypatch):
    """In-memory digits (a padded crop, never flipped) extracted with --scale/--ratio/--vflip: the fresh views
    of the online reference are random-resized square crops, every one flipped top to bottom, as the store's."""
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.distill import step as step_module

    spec = "digits?train_fraction=0.1"
    out = tmp_path / "s.zarr"
    _extract(spec, teacher_dir, out, "--scale", "0.5", "1", "--ratio", "1", "1", "--vflip", "1")
    store = open_store(out)
    assert store.view_recipe == augment.Recipe("digits", 0.0, (0.5, 1.0), ratio=(1.0, 1.0), vflip=1.0)
    drawn = []
    real = augment.draw

    def recording(recipe, *args, **kwargs):
        drawn.append((recipe, real(recipe, *args, **kwargs)))
        return drawn[-1][1]

    monkeypatch.setattr(step_module.augment, "draw", recording)
    config = DistillConfig(store=str(out), student="resnet8_w4", method="kd", epochs=1, batch_size=64, online=True,
                           fresh_views=True, teachers=TEACHERS.split(","), teacher_dir=str(teacher_dir),
                           device="cpu")  # fmt: skip
    distill(config, tmp_path / "run", progress=False)
    assert len(drawn) == 1
    recipe, params = drawn[0]
    assert recipe == store.view_recipe
    assert params.vflip is not None and bool(params.vflip.all()) and not params.flip.any()
    h, w = params.crop[:, 2].long(), params.crop[:, 3].long()
    assert torch.equal(h, w) and ((h + 0.5) ** 2 >= 0.5 * SIZE * SIZE).all() and (h <= SIZE).all()


# ------------------------------------------------------------------------------------------------ bad values
# (case, settings, what the one Error: line contains), each a row of docs/errors.md.
BAD_VALUES = [
    ("--scale out of order", {"scale": (0.9, 0.5)}, "--scale takes MIN MAX"),
    ("--scale outside (0, 1]", {"scale": (0.0, 1.0)}, "shares of the image's area with 0 < MIN <= MAX <= 1"),
    ("--ratio out of order", {"ratio": (2.0, 1.0)}, "--ratio takes MIN MAX"),
    ("--ratio not positive", {"ratio": (0.0, 1.0)}, "aspect ratios (width / height) with 0 < MIN <= MAX"),
    ("--hflip outside [0, 1]", {"hflip": 1.5}, "--hflip is a probability in [0, 1]"),
    ("--vflip outside [0, 1]", {"vflip": -0.1}, "--vflip is a probability in [0, 1]"),
]


@pytest.mark.parametrize(("case", "settings", "message"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_user_errors(case, settings, message):
    with pytest.raises(UserError, match=f"^--{next(iter(settings))} ") as caught:
        augment.augment_options(SimpleNamespace(**settings))
    assert message in str(caught.value)


def test_bad_value_through_the_console_script_gives_one_line_and_exit_2(tmp_path):
    """What a user sees: the real command, no teacher or data loaded before the value is refused."""
    commands = [
        ["train", "--arch", "resnet8_w4", "--scale", "0.9", "0.5", "--out", str(tmp_path / "t.pt")],
        ["extract", "--teachers", "t", "--vflip", "-0.1", "--out", str(tmp_path / "s.zarr")],
    ]
    for args, message in zip(commands, ("--scale takes MIN MAX", "--vflip is a probability"), strict=True):
        result = subprocess.run([sys.executable, "-m", "meal_cache", *args], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr + result.stdout
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_pipeline_refuses_a_bad_value_before_running(tmp_path):
    from meal_cache.pipeline.config import load_pipeline

    path = tmp_path / "p.toml"
    path.write_text('[data]\nspec = "digits"\n[[teachers]]\nname = "a"\narch = "resnet8_w4"\nhflip = 0\n'
                    '[store]\nscale = [0.9, 0.5]\n[student]\narch = "resnet8_w4"\n[methods.kd]\n')  # fmt: skip
    with pytest.raises(UserError, match=r"\[store\]: --scale takes MIN MAX"):
        load_pipeline(path)
    path.write_text(path.read_text().replace("[0.9, 0.5]", "[0.5, 1.0]"))
    assert load_pipeline(path).store["scale"] == [0.5, 1.0]


def test_errors_doc_lists_every_bad_value():
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for case, _, message in BAD_VALUES:
        assert f"| {case} |" in text and message in text, case
