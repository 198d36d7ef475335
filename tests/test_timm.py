"""timm models (issue 17): golden taps per family, names, pretrained configs without downloads, bad input through
the console script, and one end-to-end run on digits at 32 px (ViT and CNN teachers into a CNN student, a CNN
teacher into a ViT student). Every model is untrained and tiny at 32 px; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from meal_cache.cli import main
from meal_cache.errors import UserError
from meal_cache.nets.models import create_model, is_model_name, split_weights
from meal_cache.nets.taps import BlockTap, block_shapes
from meal_cache.nets.timm_models import choose_stages

timm = pytest.importorskip("timm")

# (family, name, the blocks meal-cache takes at 32 px)
FAMILIES = [
    ("vit", "timm:vit_tiny_patch16_224", ["taps.blocks_2", "taps.blocks_5", "taps.blocks_8", "taps.blocks_11"]),
    ("convnext", "timm:convnext_atto", ["taps.stages_0", "taps.stages_1", "taps.stages_2", "taps.stages_3"]),
    ("resnet", "timm:resnet10t", ["taps.layer1", "taps.layer2", "taps.layer3", "taps.layer4"]),
]


@pytest.mark.parametrize("family, name, blocks", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_taps_read_the_models_own_forward_and_blocks_have_timms_shapes(family, name, blocks):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=32).eval()
    assert list(model.block_names) == blocks
    x = torch.randn(2, 3, 32, 32)
    with BlockTap(model) as tap, torch.no_grad():
        logits = model(x)
    with torch.no_grad():
        own = model.net(x)  # timm's own forward, not meal-cache's
        maps = model.net.forward_intermediates(x, indices=model.indices, intermediates_only=True, output_fmt="NCHW")
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, own, rtol=0, atol=1e-6)
    assert list(tap.outputs) == blocks
    info = {e["module"].replace(".", "_"): e for e in model.net.feature_info}
    for (block, out), expected in zip(tap.outputs.items(), maps, strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        entry = info[block.removeprefix("taps.")]
        side = 32 // entry["reduction"]
        assert tuple(out.shape) == (2, entry["num_chs"], side, side), (block, out.shape, entry)
    assert block_shapes(model, 32) == {b: tuple(o.shape[1:]) for b, o in tap.outputs.items()}


def test_a_vit_tap_named_blocks_i_reads_timms_block_i():
    """Every ViT block has the same shape, so a tap reading the block before or after the one it is named for would
    pass the shape checks above; here the expected maps come from forward hooks on timm's own modules, found by
    the name the tap carries (taps.blocks_2 -> net.blocks.2), not from the indices meal-cache chose."""
    torch.manual_seed(0)
    model = create_model("timm:vit_tiny_patch16_224", num_classes=10, image_size=32).eval()
    modules = dict(model.net.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for block in model.block_names:
        name = block.removeprefix("taps.").replace("_", ".")  # blocks_2 -> blocks.2
        assert name in modules and name.startswith("blocks."), name
        handles.append(modules[name].register_forward_hook(lambda _m, _i, out, key=block: seen.setdefault(key, out)))
    x = torch.randn(2, 3, 32, 32)
    try:
        with BlockTap(model) as tap, torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert list(seen) == list(tap.outputs) == ["taps.blocks_2", "taps.blocks_5", "taps.blocks_8", "taps.blocks_11"]
    prefix = model.net.num_prefix_tokens  # the class token, dropped from a token map
    for block, tokens in seen.items():
        # (B, prefix + 2 * 2 patches, C) tokens -> (B, C, 2, 2): a 32 px image cut into 16 px patches.
        expected = tokens[:, prefix:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(tap.outputs[block], expected, rtol=0, atol=0, msg=lambda m, b=block: f"{b}: {m}")


def test_stage_choice_names_and_the_registry():
    assert choose_stages([16] * 12) == [2, 5, 8, 11] and choose_stages([16, 16]) == [0, 1]
    assert choose_stages([2, 4, 8, 16, 32]) == [1, 2, 3, 4]  # the stem's stride-2 map is left out
    assert choose_stages([2, 4, 8, 8, 16]) == [1, 3, 4]  # the last of each stride
    assert split_weights("timm:resnet18") == ("timm:resnet18", None)
    assert split_weights("timm:resnet18:pretrained") == ("timm:resnet18", "pretrained")
    assert split_weights("timm:resnet18.a1_in1k") == ("timm:resnet18.a1_in1k", "pretrained")
    assert split_weights("timm:hf-hub:timm/resnet18.a1_in1k")[1] == "pretrained"
    assert split_weights("resnet50:IMAGENET1K_V2") == ("resnet50", "IMAGENET1K_V2")
    assert is_model_name("timm:vit_tiny_patch16_224") and is_model_name("timm:resnet18.a1_in1k")
    assert not is_model_name("timm:resnet19") and not is_model_name("timm:resnet18.nope") and is_model_name("resnet8")
    with pytest.raises(UserError, match="unknown pretrained tag for timm:resnet18 'nope'"):
        create_model("timm:resnet18.nope", 10, 32)


def test_pretrained_records_timms_input_and_gets_a_new_head(monkeypatch, digits):
    """``timm:NAME:pretrained`` asks timm for its weights (stubbed: no download in tests), keeps the pretrained
    config's normalisation and native size, and replaces the 1000-class head for the dataset's classes."""
    real = timm.create_model
    asked = {}

    def offline(name, pretrained=False, **kwargs):
        asked.update(kwargs, name=name, pretrained=pretrained)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    model = create_model("timm:vit_tiny_patch16_224:pretrained", 10, 32)
    assert asked == {"name": "vit_tiny_patch16_224", "pretrained": True, "img_size": 32}
    assert model.net.num_classes == 10 and len(model.pretrained_classes) == 1000
    assert model.pretrained_input["mean"] == [0.5, 0.5, 0.5] and model.pretrained_input["input_size"] == [3, 224, 224]
    from meal_cache.nets.teachers import resolve_teacher

    # Used as it is, a 1000-class teacher does not fit digits' 10 classes: the torchvision rule.
    with pytest.raises(UserError, match="predicts 1000 classes.*fine-tune it first"):
        resolve_teacher("timm:vit_tiny_patch16_224:pretrained", "teachers", digits)


def _console(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("meal-cache")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "meal_cache"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


# (case, arguments, what the one line says). The missing network is HF_HUB_OFFLINE (no request is made at all);
# that row, met deep inside extract, runs as a real process of the console script, the others in click's runner
# (as tests/test_errors.py splits its rows; a process costs seconds of imports).
CASES = [
    ("unknown timm model", ["train", "--arch", "timm:vit_tiny_patch16", "--epochs", "1", "--out", "x.pt"],
     "unknown timm model 'timm:vit_tiny_patch16'; did you mean timm:vit_tiny_patch16_"),
    ("timm model without features at that size", ["train", "--arch", "timm:inception_v3", "--image-size", "32",
                                                  "--out", "x.pt"], "'timm:inception_v3' has no features at 32 px"),
    ("ViT patch not dividing the image size", ["train", "--arch", "timm:vit_tiny_patch16_224", "--image-size",
                                               "24", "--out", "x.pt"], "16x16 px patches, which do not divide 24 px"),
    ("timm weights without a network", ["extract", "--teachers", "timm:hf-hub:timm/resnet10t.c3_in1k",
                                        "--image-size", "32", "--out", "s.zarr", "--device", "cpu", "--quiet"],
     "could not download timm's weights or config for 'timm:hf-hub:timm/resnet10t.c3_in1k'"),
]  # fmt: skip
CONSOLE = {"timm weights without a network"}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_timm_input_gives_one_line_and_exit_2(tmp_path, monkeypatch, case):
    _, args, message = next(c for c in CASES if c[0] == case)
    args = [str(tmp_path / a) if a in ("x.pt", "s.zarr") else a for a in args]
    if case in CONSOLE:
        result = _console(args, env={"HF_HUB_OFFLINE": "1"})
        status, stderr, output = result.returncode, result.stderr, result.stdout + result.stderr
    else:
        result = CliRunner().invoke(main, args)
        assert isinstance(result.exception, SystemExit), result.exc_info  # anything else would be a traceback
        status, stderr, output = result.exit_code, result.stderr, result.output
    assert status == 2, (status, stderr[-3000:])
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr[-3000:]
    assert message in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a refused command wrote a file"


def test_models_lists_timm_models_with_their_blocks():
    result = CliRunner().invoke(main, ["models", "timm:convnext_at*", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert "timm:convnext_atto " in result.output and "taps.stages_3 320x2x2" in result.output


def test_vit_and_cnn_teachers_into_a_cnn_student_and_a_cnn_teacher_into_a_vit_student(tmp_path):
    """End to end at 32 px on 85 training and 90 test rows of digits, one epoch each: train two timm teachers, cache
    them, distill a CNN student from both and a ViT student from the CNN's store alone, evaluate the students."""
    runner = CliRunner()
    data = ["--data", "digits?folds=20&fold=0&train_fraction=0.05", "--image-size", "32"]
    cpu = ["--device", "cpu", "--quiet"]
    teachers = tmp_path / "teachers"

    def run(*args: str) -> str:
        result = runner.invoke(main, list(args))
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    for key, arch in (("vit", "timm:vit_tiny_patch16_224"), ("resnet", "timm:resnet10t")):
        run("train", "--arch", arch, *data, "--epochs", "1", "--out", str(teachers / f"{key}.pt"), *cpu)
    store = ["--views", "1", "--identity-view", "--teacher-dir", str(teachers), *data, *cpu]
    run("extract", "--teachers", "vit,resnet", *store, "--out", str(tmp_path / "both.zarr"))
    run("extract", "--teachers", "resnet", *store, "--out", str(tmp_path / "cnn.zarr"))
    info = run("info", str(tmp_path / "both.zarr"))
    assert "taps.blocks_11" in info and "taps.layer4" in info
    # Every step distils from both teachers (--teacher-selection all), so both teachers' blocks are in the losses.
    for student, source in (("resnet8_w4", "both.zarr"), ("timm:vit_tiny_patch16_224", "cnn.zarr")):
        out = tmp_path / student.replace(":", "-")
        run("distill", "--store", str(tmp_path / source), "--student", student, "--epochs", "1", "--out", str(out),
            "--teacher-selection", "all", *cpu)  # fmt: skip
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert history and all(torch.isfinite(torch.tensor(h["loss"])) and "test_top1" in h for h in history)
        # A ViT teacher's token maps are matched like a CNN's stages: MEAL's similarity per block, discriminators.
        if source == "both.zarr":
            assert {"sim/vit__0", "sim/resnet__0", "disc/vit__0"} <= set(history[0]), sorted(history[0])
        report = run("evaluate", str(out / "student.pt"), "--device", "cpu", "--json", str(out / "eval.json"))
        assert "top-1" in report, report
        assert json.loads((out / "eval.json").read_text())["metrics"]["n"] == 90
