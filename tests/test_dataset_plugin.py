"""A dataset source is one file: a plug-in package declares a DatasetSource under the entry-point group
``meal_cache.datasets`` and every command takes ``--data NAME`` (issue 38)."""

from __future__ import annotations

import os

import torch
from console import ROOT, run_console
from plugin_package import install_plugin

PLUGIN = '''
import torch

from meal_cache.data.loader import DIGIT_RECIPE, DatasetSource, RawDataset, Split


def _split(count, generator):
    """A bright vertical stripe at one of four places, the class; never mirrored (a mirror moves the stripe)."""
    labels = torch.arange(count) % 4
    images = torch.randint(0, 40, (count, 3, 16, 16), generator=generator, dtype=torch.uint8)
    for place in range(4):
        images[labels == place, :, :, 4 * place : 4 * place + 4] += 200
    return Split(images, labels)


def _load(arg, options):
    generator = torch.Generator().manual_seed(options.seed)
    return RawDataset(_split(96, generator), _split(32, generator), ("left", "inner-left", "inner-right", "right"),
                      DIGIT_RECIPE)


STRIPES = DatasetSource("stripes", _load, False, "a vertical stripe at one of four places (a plug-in)")
'''


def test_a_dataset_installed_by_entry_point_trains_and_is_listed(tmp_path):
    site = install_plugin(tmp_path, "stripes_data", PLUGIN, "meal_cache.datasets", 'stripes = "stripes_data:STRIPES"')
    with_plugin = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    listed = run_console(["datasets"], tmp_path, **with_plugin)
    assert "stripes      a vertical stripe at one of four places (a plug-in)" in listed.stdout
    trained = run_console(["train", "--arch", "resnet8_w4", "--data", "stripes", "--epochs", "1", "--device", "cpu",
                           "--out", str(tmp_path / "t.pt"), "--quiet"], tmp_path, **with_plugin)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "t.pt", weights_only=True)
    assert checkpoint["classes"] == ["left", "inner-left", "inner-right", "right"]
    assert checkpoint["data"]["spec"] == "stripes" and checkpoint["data"]["sizes"] == {"train": 96, "test": 32}
    # Without the plug-in on the path, the name is unknown, said in one line.
    unknown = run_console(
        ["train", "--arch", "resnet8_w4", "--data", "stripes", "--out", str(tmp_path / "u.pt")], tmp_path
    )
    assert unknown.returncode == 2 and "unknown dataset 'stripes'" in unknown.stderr
