"""README's quick start, command by command as a user copies it, on an image folder the test makes: the teachers'
torchvision weights are local files of the same architectures (nothing downloads), the folder is read at 32 px and
every schedule is one epoch; everything else (the commands, their options, the default paths they write and read)
is README's own text."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
import torchvision
from console import ROOT, ran, run_in_process
from imagefolder import make_image_folder

from meal_cache.store import open_store


def quick_start_commands() -> list[list[str]]:
    """The ``meal-cache`` lines of the first bash block under README's "Quick start" heading, split as a shell does
    (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("meal-cache ")]


def settings_file_snippet() -> tuple[str, str, list[str]]:
    """README's settings-file example: the file's name, its text (the heredoc), and the command that reads it."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(cat > (\S+) <<'EOF'\n(.*?)EOF\n(meal-cache [^\n]*))\n```", readme, re.S)
    return block.group(2), block.group(3), shlex.split(block.group(4), comments=True)


def as_here(command: list[str], data: Path, weights: dict[str, Path]) -> list[str]:
    """``command`` on this test's folder and files: DATA the made folder, ARCH:ENUM a local file of ARCH, one epoch,
    32 px where the command reads the folder."""
    changed = []
    for word in command[1:]:
        word = word.replace("imagefolder:DATA", f"imagefolder:{data}")
        arch, _, enum = word.partition(":")
        if arch in weights and enum.startswith("IMAGENET"):
            word = f"{arch}:{weights[arch]}"
        changed.append(word)
    if "--epochs" in changed:
        changed[changed.index("--epochs") + 1] = "1"
    if any(word.startswith("imagefolder:") for word in changed):
        changed += ["--image-size", "32"]
    return changed


def test_the_quick_start_is_train_extract_info_distill_evaluate():
    """What the test below runs is what README shows, in that order."""
    assert [command[1] for command in quick_start_commands()] == ["train", "train", "extract", "info", "distill",
                                                                   "evaluate"]  # fmt: skip


def test_readmes_quick_start_runs_as_written_on_a_folder_of_ones_own(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "DATA", classes=3, train=4, val=2, sizes=(40, 64))
    weights = {}
    torch.manual_seed(0)
    for arch in ("resnet50", "densenet121"):  # ImageNet's 1000-class shape, as the enum's file has
        weights[arch] = tmp_path / f"{arch}-imagenet.pth"
        torch.save(getattr(torchvision.models, arch)().state_dict(), weights[arch])
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in quick_start_commands():
        result = run_in_process(as_here(command, data, weights))
        assert result.exit_code == 0, (command, result.output[-3000:], result.exc_info)
        outputs.append(result.output)
    assert {p.name for p in (tmp_path / "teachers").iterdir()} == {"resnet.pt", "densenet.pt"}
    store = open_store(tmp_path / "feats.zarr")
    assert store.complete and set(store.teacher_names) == {"resnet", "densenet"}
    assert store.attrs["settings"]["preset"] == "meal"
    assert "teacher resnet " in outputs[3] and "teacher densenet " in outputs[3]  # info names the teachers
    assert (tmp_path / "runs" / "feats-meal" / "student.pt").is_file()
    evaluated = outputs[-1]
    assert "resnet18" in evaluated and "fidelity" in evaluated.lower(), evaluated


def test_readmes_settings_file_runs_as_written_beside_the_quick_starts_store(tmp_path, monkeypatch):
    """The kd.toml of README, on a store of the quick start's shape: the file's settings, the command line's --lr
    over them (and this test's --epochs 1 over the file's 30)."""
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    data = make_image_folder(tmp_path / "DATA", classes=3, train=4, val=2, sizes=(40, 64))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=3).state_dict(), tmp_path / "w.pth")
    extract(ExtractConfig(teachers=[f"shufflenet_v2_x0_5:{tmp_path / 'w.pth'}"], data=f"imagefolder:{data}",
                          image_size=32, views=1, device="cpu", workers=0), tmp_path / "feats.zarr",
            progress=False)  # fmt: skip
    name, text, command = settings_file_snippet()
    (tmp_path / name).write_text(text)
    ran(run_in_process([*command[1:], "--epochs", "1"]))
    config = json.loads((tmp_path / "runs" / "feats-kd" / "config.json").read_text())
    assert (config["student"], config["method"], config["temperature"]) == ("resnet18", "kd", 4.0)
    assert (config["lr"], config["epochs"]) == (0.1, 1)
