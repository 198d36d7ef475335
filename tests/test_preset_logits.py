"""Which logits each ``extract --for`` preset keeps, and at which class counts it keeps every one.

The presets follow the 100-class table (docs/results.md, "At the class counts users have"): the methods whose every
reader of the logits is linear in the soft target (kd, fitnet, at, afd) store 16 classes drawn from each teacher's
softmax, DKD and the MEAL pair (whose output discriminator refuses draws) every logit. A compact encoding is kept only
where its row takes fewer bytes than every float16 logit of the data's classes; what the user asks for is kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from console import run_console

from meal_cache.cli import main
from meal_cache.distill import DistillConfig, available_methods, method_class
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig, fitted_to_data

# By hand, from the store's parts (docs/store-format): a drawn class is an int16 index and a uint8 count, 3 bytes;
# a top-k slot an int16 index and a value of the logits' dtype, plus one float32 log-sum-exp a row.
SAMPLED_16_BYTES = 16 * (2 + 1)  # 48: every float16 logit of 24 classes
TOP_10_FLOAT16_BYTES = 10 * (2 + 2) + 4  # 44: 22 classes
TOP_10_FLOAT32_BYTES = 10 * (2 + 4) + 4  # 64: 16 float32 logits

SHIPPED = {"kd": 16, "fitnet": 16, "at": 16, "afd": 16, "dkd": None, "meal": None, "meal-v2": None, "acn": None}


@pytest.mark.parametrize("method", sorted(SHIPPED))
def test_each_shipped_preset_keeps_the_logits_the_table_chose(method):
    resolved = ExtractConfig(teachers=["t"], preset=method).resolved()
    assert resolved.logits == (None if SHIPPED[method] is None else f"sample:{SHIPPED[method]}")
    assert resolved.logits_temperature == (4.0 if SHIPPED[method] else None)


def test_every_registered_preset_that_draws_classes_is_accepted_by_its_method():
    """A preset may only choose draws its own method accepts at its defaults: one whose output discriminator or DKD
    term refuses them would make `extract --for M` then `distill --method M` an error."""
    drawing = [
        name
        for name, cls in available_methods().items()
        if cls.store_needs.logits and cls.store_needs.logits.encoding.estimate
    ]
    assert {"kd", "fitnet", "at", "afd"} <= set(drawing)
    for name in drawing:
        config = DistillConfig(store="", student="s", method=name).resolved()
        assert method_class(name).sampled_logits_refusal(config) is None, name


def _filled(preset: str, **layout) -> tuple[ExtractConfig, ExtractConfig]:
    """(the resolved config, what the user asked), with the preset's logits replaced by ``layout``'s."""
    asked = ExtractConfig(teachers=["t"], preset=preset)
    return dataclasses.replace(asked.resolved(), **layout), asked


@pytest.mark.parametrize(
    ("layout", "last_whole"),
    [
        (dict(logits="sample:16"), SAMPLED_16_BYTES // 2),  # 24
        (dict(logits="topk:10"), TOP_10_FLOAT16_BYTES // 2),  # 22
        (dict(logits="topk:10", dtype="float32"), TOP_10_FLOAT32_BYTES // 4),  # 16
        # 48 bytes are 12 float32 logits, but 16 draws from 16 classes or fewer are noise at no saving: k decides.
        (dict(logits="sample:16", dtype="float32"), 16),
    ],
)
def test_a_preset_keeps_compact_logits_only_above_the_class_count_where_they_save_bytes(layout, last_whole):
    """Up to ``last_whole`` classes every logit is kept (no more bytes than the compact row, or no more classes than
    it keeps); one class more and the preset's encoding is kept, at its temperature."""
    config, asked = _filled("kd", **layout)
    for classes in (2, 10, last_whole - 1, last_whole):
        fitted = fitted_to_data(config, asked, classes)
        assert (fitted.logits, fitted.logits_temperature) == (None, None), classes
    for classes in (last_whole + 1, 100, 1000):
        fitted = fitted_to_data(config, asked, classes)
        assert fitted.logits == layout["logits"]
        assert fitted.logits_temperature == 4.0


def test_a_dense_store_keeps_every_logit_where_its_preset_draws_classes_for_views():
    """RoIAlign averages a dense store's logits over a crop's box, which draws cannot serve (and a user's
    --logits sample:K with --dense is refused); the preset falls back to every logit, a user's top-k is kept."""
    for method in ("kd", "fitnet"):  # (afd reads per-view maps, which a dense store refuses)
        resolved = ExtractConfig(teachers=["t"], preset=method, dense=True).resolved()
        assert resolved.logits is None, method
    chosen = ExtractConfig(teachers=["t"], preset="kd", dense=True, logits="topk:10").resolved()
    assert (chosen.logits, chosen.logits_temperature) == ("topk:10", 4.0)
    with pytest.raises(UserError, match="--logits sample:16 stores an estimate"):
        ExtractConfig(teachers=["t"], preset="kd", dense=True, logits="sample:16").resolved()


def test_what_the_user_asks_for_is_kept_at_any_class_count():
    for asked in (ExtractConfig(teachers=["t"], preset="kd", logits="sample:16"),
                  ExtractConfig(teachers=["t"], preset="meal", logits="topk:10")):  # fmt: skip
        fitted = fitted_to_data(asked.resolved(), asked, 10)
        assert fitted.logits == asked.logits


def test_extract_for_kd_at_100_classes_draws_16_and_distill_reads_them_where_meal_v2_is_refused(tmp_path):
    """Through the console: a 100-class teacher, `extract --for kd` (16 classes drawn a row, so `info` says so),
    distill kd from it, and meal-v2 from it refused in one line that says what to extract instead."""
    data = "digit-pairs:100"
    teachers = tmp_path / "teachers"
    from meal_cache.engine.train import TrainConfig, train_supervised

    train_supervised(TrainConfig(arch="resnet8_w4", data=data, epochs=1, device="cpu"), teachers / "resnet8_w4.pt",
                     progress=False)  # fmt: skip
    store = tmp_path / "kd.zarr"
    made = run_console(["extract", "--teachers", "resnet8_w4", "--teacher-dir", str(teachers), "--data", data,
                        "--for", "kd", "--views", "1", "--device", "cpu", "--out", str(store), "--quiet"],
                       tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    info = CliRunner().invoke(main, ["info", str(store)])
    assert info.exit_code == 0 and "16 drawn" in info.stdout, info.stdout
    kd = run_console(["distill", "--store", str(store), "--student", "resnet8_w4", "--method", "kd", "--epochs", "1",
                      "--device", "cpu", "--out", str(tmp_path / "kd"), "--quiet"], tmp_path)  # fmt: skip
    assert kd.returncode == 0, kd.stderr
    assert torch.load(tmp_path / "kd" / "student.pt", weights_only=True)["num_classes"] == 100
    refused = run_console(["distill", "--store", str(store), "--student", "resnet8_w4", "--method", "meal-v2",
                           "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "v2"), "--quiet"],
                          tmp_path)  # fmt: skip
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "output discriminator" in lines[0], lines
