from __future__ import annotations

import pytest
import torch

from meal_cache.errors import UserError
from meal_cache.nets.models import create_model, model_names
from meal_cache.nets.taps import BlockTap, block_shapes

# (name, image size, expected blocks and their channels)
CASES = [
    ("resnet8", 16, {"layer1": 16, "layer2": 32, "layer3": 64}),
    ("resnet8_w8", 16, {"layer1": 8, "layer2": 16, "layer3": 32}),
    ("resnet20", 16, {"layer1": 16, "layer2": 32, "layer3": 64}),
    ("wrn16_2", 16, {"layer1": 32, "layer2": 64, "layer3": 128}),
    ("densenet_k12", 16, {"features.denseblock1": 72, "features.denseblock2": 84, "features.denseblock3": 90}),
    ("resnet18", 32, {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}),
    ("resnet34", 32, {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}),
    ("resnet50", 32, {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}),
    (
        "densenet121",
        32,
        {
            "features.denseblock1": 256,
            "features.denseblock2": 512,
            "features.denseblock3": 1024,
            "features.denseblock4": 1024,
        },
    ),
    (
        "vgg11_bn",
        32,
        {
            "features.2": 64,
            "features.6": 128,
            "features.13": 256,
            "features.20": 512,
            "features.27": 512,
            "features.28": 512,
        },
    ),
    ("mobilenet_v2", 32, None),
    ("wide_resnet50_2", 32, {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}),
]


@pytest.mark.parametrize("name, size, expected", CASES, ids=[c[0] for c in CASES])
def test_every_architecture_builds_and_its_blocks_are_hooked(name, size, expected):
    model = create_model(name, num_classes=7, image_size=size).eval()
    with BlockTap(model) as tap, torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    assert list(tap.outputs) == list(model.block_names)
    if expected is not None:
        assert {name: out.shape[1] for name, out in tap.outputs.items()} == expected
    # Blocks are stages: strictly decreasing resolution, the first at full size for the small-input stem.
    sides = [out.shape[-1] for out in tap.outputs.values()]
    assert sides[0] == size and all(a > b for a, b in zip(sides, sides[1:], strict=False))
    assert len(sides) >= 3


def test_small_input_stem_keeps_resolution_and_large_input_does_not():
    small = create_model("resnet18", 10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert block_shapes(small, 32)["layer1"] == (64, 32, 32)
    large = create_model("resnet18", 10, image_size=128)
    assert large.conv1.stride == (2, 2) and block_shapes(large, 128)["layer1"] == (64, 32, 32)


def test_vgg_at_16px_keeps_only_the_pools_it_can():
    model = create_model("vgg16_bn", 10, image_size=16)
    shapes = block_shapes(model, 16)
    assert [s[-1] for s in shapes.values()] == [16, 8, 4, 2, 1]


def test_any_torchvision_classifier_by_name_infers_blocks():
    model = create_model("shufflenet_v2_x0_5", 5, image_size=64)
    assert "stage2" in model.block_names and "conv5" in model.block_names


def test_block_tap_removes_its_hooks():
    model = create_model("resnet8", 10, 16)
    with BlockTap(model) as tap:
        model(torch.randn(1, 3, 16, 16))
    tap.outputs.clear()
    model(torch.randn(1, 3, 16, 16))
    assert tap.outputs == {}


def test_unknown_names_are_user_errors():
    with pytest.raises(
        UserError, match="unknown architecture 'resnet9000'; did you mean .*resnet.*`meal-cache models`"
    ):
        create_model("resnet9000", 10)
    with pytest.raises(UserError, match="unknown architecture 'qqq'; `meal-cache models` lists all"):
        create_model("qqq", 10)
    with pytest.raises(UserError, match="unknown weights for resnet18 'NOPE'.*IMAGENET1K_V1"):
        create_model("resnet18:NOPE", 10)
    with pytest.raises(UserError, match="no pretrained weights"):
        create_model("resnet8:IMAGENET1K_V1", 10)
    assert {
        "resnet18",
        "resnet34",
        "resnet50",
        "densenet121",
        "vgg11_bn",
        "vgg16_bn",
        "mobilenet_v2",
        "wide_resnet50_2",
        "resnet8",
        "densenet_k12",
        "wrn28_10",
    } <= set(model_names())


def test_pretrained_head_is_replaced_for_new_classes(monkeypatch):
    """ARCH:WEIGHTS builds with torchvision's weights (stubbed: no download in tests) and a new head."""
    import torchvision

    real_get_model = torchvision.models.get_model
    seen = {}

    def offline_get_model(name, weights=None, **kwargs):
        seen["weights"] = weights
        return real_get_model(name, weights=None, **kwargs)

    from meal_cache.nets import torchvision_weights

    monkeypatch.setattr(torchvision.models, "get_model", offline_get_model)
    monkeypatch.setattr(torchvision_weights, "_download", lambda *args: None)  # the cache is filled elsewhere
    model = create_model("resnet18:IMAGENET1K_V1", num_classes=10, image_size=32)
    assert seen["weights"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert model.fc.out_features == 10
    # The pretrained 7x7 stem keeps its kernel (so its weights stay valid) and loses its stride.
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (1, 1)
