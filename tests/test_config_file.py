"""Issue 38: `distill --config FILE` (and extract's, train's), one step's settings as a pipeline names and types
them; the presets as such files; `--help` in sections."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

import meal_cache.distill.config as distill_config
from meal_cache.cli import main

# The presets as meal_cache/distill/config.py defined them before they moved into meal_cache/presets/*.toml: the
# files must give every run these settings.
PRESETS_BEFORE_FILES = {  # MEAL's and the game's knobs are the methods' options
    "reference": distill_config.Preset(
        {"method": "meal", "soft_loss": "soft-ce", "temperature": 1.0, "teacher_selection": "random",
         "hard_weight": 0.0, "nesterov": False, "divergent_ratio": 0.0,
         "method_options": {"representation": "maps", "adv_weight": 1.0, "adv_game": "joint",
                            "disc_form": "reference", "disc_lr": lambda config: config.lr / 100}},
        path=None),
    "afd-paper": distill_config.Preset(
        {"method": "afd", "soft_weight": 0.0, "hard_weight": 1.0, "divergent_ratio": 0.0,
         "method_options": {"mutual": 1.0, "mutual_from": "predecessor", "teacher_adv": 0.0,
                            "adv_update": "separate", "adv_loss": "ls", "adv_weight": 1.0}},
        path=None),
}  # fmt: skip
ONE_EPOCH = ["--student", "resnet8_w4", "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--quiet"]


def _distill(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["distill", *args])
    assert result.exit_code == 0, (result.output, result.exc_info)


@pytest.mark.parametrize("preset", ["reference", "afd-paper"])
def test_a_preset_read_from_its_file_records_the_config_json_of_the_preset_defined_in_code(
    preset, small_store, tmp_path, monkeypatch
):
    """`distill --preset NAME` behaves as before the presets were files: the same config.json, byte for byte (at
    --lr 0.1, so the reference's discriminator rate, a hundredth of --lr, is one the file computes)."""
    args = ["--store", str(small_store[0]), *ONE_EPOCH, "--lr", "0.1", "--preset", preset]
    _distill([*args, "--out", str(tmp_path / "files")])
    monkeypatch.setattr(distill_config, "PRESETS", PRESETS_BEFORE_FILES)
    _distill([*args, "--out", str(tmp_path / "code")])
    recorded = (tmp_path / "files" / "config.json").read_bytes()
    assert recorded == (tmp_path / "code" / "config.json").read_bytes()
    assert f'"preset": "{preset}"' in recorded.decode()


def test_a_config_file_is_what_its_options_are_and_the_command_line_wins(small_store, tmp_path):
    """A file's settings are the options they name (lists and tables in the pipeline's types), given as the
    command line gives them (dkd's own hard weight does not replace the file's 0); an option on the command line
    beats the file; the run records the same config.json as the options all on the command line."""
    config = tmp_path / "dkd.toml"
    config.write_text(f'store = "{small_store[0]}"\nmethod = "dkd"\nlr = 0.1\nhard_weight = 0.0\nsoft_weight = 2.0\n'
                      'temperature = 2\nteacher_selection = "mean"\n[method_options]\nbeta = 4\n')  # fmt: skip
    _distill(["--config", str(config), *ONE_EPOCH, "--lr", "0.2", "--out", str(tmp_path / "file")])
    _distill(["--store", str(small_store[0]), "--method", "dkd", "--hard-weight", "0", "--soft-weight", "2",
              "--temperature", "2", "--teacher-selection", "mean", "--method-option", "beta=4", *ONE_EPOCH,
              "--lr", "0.2", "--out", str(tmp_path / "flags")])  # fmt: skip
    recorded = (tmp_path / "file" / "config.json").read_text()
    assert recorded == (tmp_path / "flags" / "config.json").read_text()
    for setting in ('"lr": 0.2', '"hard_weight": 0.0', '"temperature": 2.0', '"beta": 4', '"method": "dkd"'):
        assert setting in recorded


def _captured(monkeypatch, module, name: str, args: list[str]):
    """The config a command hands the library (the library call itself stopped there)."""
    seen = []

    def capture(config, *rest, **kwargs):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(module, name, capture)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and len(seen) == 1, (result.output, result.exc_info)
    return seen[0]


@pytest.mark.parametrize(
    "command, file, flags",
    [
        ("extract",
         'teachers = ["resnet8_w4", "densenet_k12"]\nviews = 2\ngrid = 2\nfeatures = ["blocks"]\nquantize = 0\n'
         'scale = [0.5, 1.0]\nidentity_view = true\ndense_sizes = [16, 24]\n',
         ["--teachers", "resnet8_w4,densenet_k12", "--views", "2", "--grid", "2", "--features", "blocks",
          "--quantize", "none", "--scale", "0.5", "1.0", "--identity-view", "--dense-sizes", "16,24"]),
        ("train", 'arch = "resnet8_w4"\nepochs = 2\nnesterov = false\nratio = [0.5, 2]\nlabel_smoothing = 0.1\n',
         ["--arch", "resnet8_w4", "--epochs", "2", "--no-nesterov", "--ratio", "0.5", "2",
          "--label-smoothing", "0.1"]),
    ],
)  # fmt: skip
def test_extract_and_train_take_a_config_file_as_their_options(command, file, flags, tmp_path, monkeypatch):
    """A file's lists, pairs, flags and numbers for a choice (grid = 2, quantize = 0) reach the library as the same
    options on the command line do."""
    import meal_cache.engine.train as train_module
    import meal_cache.extract.run as extract_module

    module, name = {"extract": (extract_module, "extract"), "train": (train_module, "train_supervised")}[command]
    (tmp_path / "step.toml").write_text(file)
    tail = ["--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    from_file = _captured(monkeypatch, module, name, [command, "--config", str(tmp_path / "step.toml"), *tail])
    from_flags = _captured(monkeypatch, module, name, [command, *flags, *tail])
    assert from_file == from_flags


def test_every_setting_a_file_takes_is_an_option_of_its_command():
    """A key of a command's config file is one of its options (the file becomes the options' defaults)."""
    from meal_cache.cli import distill, extract, train
    from meal_cache.pipeline.config import step_setting_types

    for command in (distill.distill, extract.extract, train.train):
        options = {param.name for param in command.params}
        assert set(step_setting_types(command.name)) <= options, command.name


def test_a_bad_config_file_is_one_error_line_naming_the_file(tmp_path):
    """A missing file (through the console script), a TOML syntax error (its line), an unknown key (the one
    likely meant), a wrong type, a [distill] header: one Error: line naming the file."""
    from console import one_error_line, one_error_line_in_process, run_console

    missing = tmp_path / "missing.toml"
    line = one_error_line(run_console(["distill", "--config", str(missing), "--out", str(tmp_path / "run")], tmp_path))
    assert line == f"Error: --config file not found: '{missing}'"
    cases = {
        "syntax": ("epochs = 3\nlr = \n", r"'{}' is not valid TOML: Invalid value \(at line 2, column 6\)"),
        "unknown": ("epoch = 3\n", r"{}: unknown setting\(s\) epoch; .*did you mean epochs\?"),
        "type": ('epochs = "ten"\n', r"{}: epochs takes int, got 'ten'$"),
        "list": ("block_weights = 0.1\n", r"{}: block_weights takes list\[float\], got 0.1$"),
        "header": ("[distill]\nepochs = 3\n", r"{}: write the settings at the top level .* without the \[distill\]"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        line = one_error_line_in_process(["distill", "--config", str(path), "--out", str(tmp_path / "run")])
        assert re.search(expected.format(re.escape(str(path))), line), (name, line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command, headings",
    [
        ("distill", ["Stage basics", "Method", "MEAL (blocks and discriminators)", "Schedule", "Data", "Advanced"]),
        ("extract", ["Stage basics", "What is stored", "Fewer bytes", "Views", "Data", "Advanced"]),
        ("train", ["Stage basics", "Schedule", "Augmentation", "Data", "Advanced"]),
    ],
)
def test_help_lists_every_option_once_under_its_sections(command, headings):
    """Each section's heading, in order, and every option's help record (its flags and text as click writes them
    in one list) exactly once; only the grouping and order differ from click's own list."""
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = [line[:-1] for line in result.output.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert shown == headings
    flat = "".join(result.output.split())  # click may wrap a line at any space or after a hyphen
    cmd = main.commands[command]
    with click.Context(cmd, info_name=command) as ctx:
        records = [param.get_help_record(ctx) for param in cmd.get_params(ctx)]
    assert len(records) > 20
    for flags, text in records:
        assert flat.count("".join(f"{flags}{text}".split())) == 1, flags
