"""The command line and the library agree: every option of train, extract and distill has its config field's default,
and every choice the CLI offers is the library's registry, so a run from the CLI and one from Python with the
same config are the same run."""

from __future__ import annotations

import dataclasses

import pytest

from meal_cache import losses
from meal_cache.cli import main
from meal_cache.data.source import DECODE_CHOICES
from meal_cache.distill import REPRESENTATIONS, SELECTIONS, DistillConfig, available_methods
from meal_cache.distill.methods.base import SOFT_TERMS
from meal_cache.engine.loop import SCHEDULES
from meal_cache.engine.train import TrainConfig
from meal_cache.extract.config import ExtractConfig
from meal_cache.store import DTYPES

CONFIGS = {"train": TrainConfig, "extract": ExtractConfig, "distill": DistillConfig}
# Options the CLI takes as text that the config holds parsed.
PARSED = {
    ("extract", "grid"): int,
    ("extract", "features"): lambda text: text.split(","),
    ("distill", "block_weights"): lambda text: [float(w) for w in text.split(",")],
    ("distill", "teachers"): lambda text: [t for t in text.split(",") if t],
    ("distill", "method_options"): dict,  # NAME=VALUE pairs, none by default
}
# Options whose config field is filled in elsewhere (required arguments, or defaults the CLI resolves itself).
CLI_ONLY = {"out", "resume", "overwrite", "quiet", "teachers", "arch", "store", "student", "download", "data",
            "data_root", "identity_view", "online", "fresh_views", "refine_labels"}  # fmt: skip
CHOICES = {
    "schedule": SCHEDULES,
    "method": tuple(available_methods()),
    "teacher_selection": SELECTIONS,
    "representation": REPRESENTATIONS,
    "block_loss": tuple(losses.SIMILARITY),
    "soft_loss": tuple(SOFT_TERMS),
    "adv_loss": tuple(losses.ADVERSARIAL),
    "dtype": DTYPES,
    "decode": DECODE_CHOICES,
}


def _defaults(config_class) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config_class)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}  # fmt: skip


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_equal_the_config_defaults(command):
    defaults = _defaults(CONFIGS[command])
    checked = 0
    for param in main.commands[command].params:
        if param.name not in defaults or (param.name in CLI_ONLY and (command, param.name) not in PARSED):
            continue
        value = param.default
        if (command, param.name) in PARSED and value is not None:
            value = PARSED[(command, param.name)](value)
        assert value == defaults[param.name], f"{command} --{param.name.replace('_', '-')}"
        checked += 1
    assert checked >= 10, checked


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_choices_are_the_library_registries(command):
    checked = 0
    for param in main.commands[command].params:
        if param.name in CHOICES:
            assert getattr(param.type, "choices", None) is not None, f"{command} --{param.name} is not a choice"
            assert sorted(param.type.choices) == sorted(CHOICES[param.name]), f"{command} --{param.name}"
            checked += 1
    assert checked >= {"train": 1, "extract": 1, "distill": 7}[command], checked
