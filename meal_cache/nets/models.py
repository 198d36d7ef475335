"""Architecture registry in the style of timm's ``create_model``.

Every model :func:`create_model` returns carries ``model.block_names``: the dotted names of the modules whose
outputs are its *blocks*, the stage outputs MEAL compares between student and teacher (the ResNet layers, the
DenseNet dense blocks, the last module at each resolution elsewhere). :class:`~meal_cache.nets.taps.BlockTap` collects
those outputs during an ordinary forward pass; no forward is ever rewritten.

Names:
- small CIFAR-style networks cheap enough for a 2-core CPU: ``resnet8`` ... ``resnet110`` (3 stages of
  torchvision BasicBlocks, widths 16-32-64), narrow/wide variants such as ``resnet8_w8``, wide ResNets
  ``wrn16_2`` ... ``wrn28_10``, and ``densenet_k12`` (torchvision DenseNet, growth 12, blocks 4-4-4);
- every torchvision classification model by name (``resnet18``, ``densenet121``, ``vgg16_bn``, ...), with a
  small-input stem for images of 64 px or less (3x3 stride-1 stem, no max-pool);
- ``ARCH:WEIGHTS`` loads torchvision's pretrained weights (``resnet50:IMAGENET1K_V2``; needs internet once, or the
  file copied into torch.hub's cache), ``ARCH:/path/to/weights.pth`` a local state dict
  (:mod:`meal_cache.nets.torchvision_weights`);
- a family prefix hands the name to another library's registry (:data:`FAMILIES`): ``timm:NAME`` is any timm
  model, ViTs included, with blocks from its ``forward_intermediates`` (:mod:`meal_cache.nets.timm_models`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from meal_cache.errors import UserError, unknown_choice
from meal_cache.nets import timm_models
from meal_cache.nets.taps import block_shapes, infer_blocks
from meal_cache.nets.torchvision_weights import load_weights

SMALL_INPUT_MAX = 64


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[int], nn.Module]  # num_classes -> model
    blocks: tuple[str, ...] | None  # None: inferred as the last module at each resolution
    help: str


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2): a 3x3 stem and three stages of n torchvision BasicBlocks."""

    def __init__(self, blocks_per_stage: int, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        self.layer1 = self._stage(width, blocks_per_stage, stride=1)
        self.layer2 = self._stage(width * 2, blocks_per_stage, stride=2)
        self.layer3 = self._stage(width * 4, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 4, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for index in range(count):
            block_stride = stride if index == 0 else 1
            downsample = None
            if block_stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, stride=block_stride, bias=False), nn.BatchNorm2d(planes)
                )
            layers.append(BasicBlock(self.inplanes, planes, block_stride, downsample))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, width: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet((depth - 2) // 6, width, num_classes)


def _wide_resnet(depth: int, widen: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet((depth - 4) // 6, 16 * widen, num_classes)


def _small_densenet(num_classes: int) -> nn.Module:
    return torchvision.models.DenseNet(
        growth_rate=12, block_config=(4, 4, 4), num_init_features=24, num_classes=num_classes
    )


_CIFAR_BLOCKS = ("layer1", "layer2", "layer3")


def _builtin_entries() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for depth in (8, 14, 20, 32, 44, 56, 110):
        entries[f"resnet{depth}"] = ModelEntry(
            _cifar_resnet(depth, 16), _CIFAR_BLOCKS, f"CIFAR ResNet-{depth}, widths 16-32-64"
        )
    for depth, width in ((8, 4), (8, 8), (14, 8), (20, 8), (8, 32), (20, 32)):
        entries[f"resnet{depth}_w{width}"] = ModelEntry(
            _cifar_resnet(depth, width), _CIFAR_BLOCKS, f"CIFAR ResNet-{depth}, widths {width}-{2 * width}-{4 * width}"
        )
    for depth, widen in ((16, 1), (16, 2), (16, 4), (16, 8), (28, 10), (40, 2)):
        entries[f"wrn{depth}_{widen}"] = ModelEntry(
            _wide_resnet(depth, widen), _CIFAR_BLOCKS, f"wide ResNet-{depth}-{widen} (post-activation blocks)"
        )
    entries["densenet_k12"] = ModelEntry(
        _small_densenet,
        ("features.denseblock1", "features.denseblock2", "features.denseblock3"),
        "small DenseNet: growth 12, blocks 4-4-4, 24 initial features",
    )
    return entries


MODELS: dict[str, ModelEntry] = _builtin_entries()


@dataclass(frozen=True)
class ModelFamily:
    """Architectures named ``PREFIX:...`` and built by another library's own registry."""

    create: Callable[[str, int, int], nn.Module]  # (name, num_classes, image_size) -> model with block_names
    split: Callable[[str], tuple[str, str | None]]  # name -> (architecture, weights or None)
    known: Callable[[str], bool]  # whether an architecture (as split gives it) exists, without building it
    check: Callable[[str], None]  # the same, raising the family's UserError (with the closest names) if not
    help: str


FAMILIES: dict[str, ModelFamily] = {
    "timm": ModelFamily(
        timm_models.create_timm_model,
        timm_models.split_name,
        timm_models.is_known,
        timm_models.check_known,
        "any timm model, ViTs included: timm:NAME (untrained), timm:NAME:pretrained, timm:NAME.TAG, "
        "timm:hf-hub:ORG/NAME; blocks from forward_intermediates",
    )
}


def family_of(name: str) -> ModelFamily | None:
    """The family a ``PREFIX:...`` name belongs to, or None (a meal-cache or torchvision name)."""
    prefix, colon, _ = name.partition(":")
    return FAMILIES.get(prefix) if colon else None


def torchvision_model_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """The names create_model accepts without a family prefix: the built-in small networks and torchvision's
    classifiers (a family's names, ``timm:...``, are checked by :func:`is_model_name`)."""
    return sorted(set(MODELS) | set(torchvision_model_names()))


def is_model_name(arch: str) -> bool:
    """Whether ``arch`` (without weights, as :func:`split_weights` gives it) names an architecture, without
    building it."""
    family = family_of(arch)
    return family.known(arch) if family is not None else arch in MODELS or arch in torchvision_model_names()


def check_model_name(arch: str) -> None:
    """Raise the UserError of an unknown ``arch`` (as :func:`split_weights` gives it), naming the closest names
    of its own family, without building it."""
    family = family_of(arch)
    if family is not None:
        family.check(arch)
    elif not is_model_name(arch):
        raise unknown_choice("architecture", arch, model_names(), listing="meal-cache models")


def _replace_stem_conv(conv: nn.Conv2d, pretrained: bool) -> nn.Conv2d:
    if pretrained:
        # Pretrained weights keep their kernel; only the stride goes, so the weights stay valid.
        conv.stride = (1, 1)
        return conv
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


def adapt_to_small_input(model: nn.Module, image_size: int, pretrained: bool) -> nn.Module:
    """Give a torchvision network a stem for small images (<= 64 px): a 3x3 stride-1 first convolution and
    no stem max-pool, so a 16 or 32 px image is not reduced to 1 px before the last stage."""
    from torchvision.models import VGG, DenseNet, MobileNetV2, ResNet

    if image_size > SMALL_INPUT_MAX:
        return model
    if isinstance(model, ResNet):
        model.conv1 = _replace_stem_conv(model.conv1, pretrained)
        model.maxpool = nn.Identity()
    elif isinstance(model, DenseNet):
        model.features.conv0 = _replace_stem_conv(model.features.conv0, pretrained)
        model.features.pool0 = nn.Identity()
    elif isinstance(model, MobileNetV2):
        model.features[0][0].stride = (1, 1)
    elif isinstance(model, VGG):
        # Five 2x2 max-pools would take a 16 px image below 1 px: keep only as many as the size allows.
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        keep = int(math.log2(image_size))
        for index in pools[keep:]:
            model.features[index] = nn.Identity()
        if not pretrained:
            # The CIFAR VGG head: global pooling and one linear layer instead of 7x7x512 -> 4096 -> 4096.
            out_features = model.classifier[-1].out_features
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Linear(model.classifier[0].in_features // 49, out_features)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Point the last linear layer at ``num_classes`` (pretrained weights come with 1000 classes)."""
    name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name, last = module_name, module
    if last is None or last.out_features == num_classes:
        return
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(last.in_features, num_classes))


def split_weights(name: str) -> tuple[str, str | None]:
    """``ARCH:WEIGHTS`` -> (ARCH, WEIGHTS or None); a family's names split by the family's own rule
    (``timm:NAME:pretrained`` -> (``timm:NAME``, ``pretrained``))."""
    family = family_of(name)
    if family is not None:
        return family.split(name)
    arch, _, weights = name.partition(":")
    return arch, (weights or None)


def create_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """Build ``name`` (optionally ``ARCH:WEIGHTS``) for ``num_classes`` classes and ``image_size`` px inputs.

    The returned module has ``block_names``, the dotted names of its block modules.
    """
    family = family_of(name)
    if family is not None:
        return family.create(name, num_classes, image_size)
    arch, weights = split_weights(name)
    if arch in MODELS:
        if weights:
            raise UserError(f"'{arch}' is a meal-cache network and has no pretrained weights ('{weights}')")
        entry = MODELS[arch]
        model = entry.build(num_classes)
        model = adapt_to_small_input(model, image_size, pretrained=False)
        blocks = entry.blocks
    elif arch in torchvision_model_names():
        if weights:
            model, info = load_weights(arch, weights)
            # The head's own classes and normalisation, which a teacher used as it is needs (teachers.py).
            model.torchvision_weights = info
            _replace_head(model, num_classes)
        else:
            model = torchvision.models.get_model(arch, num_classes=num_classes)
        model = adapt_to_small_input(model, image_size, pretrained=weights is not None)
        blocks = _TORCHVISION_BLOCKS.get(type(model).__name__)
    else:
        raise unknown_choice("architecture", arch, model_names(), listing="meal-cache models")
    try:
        model.block_names = blocks or infer_blocks(model, image_size)
    except RuntimeError as err:
        raise UserError(f"'{arch}' cannot take {image_size} px images ({err}); try a larger --image-size") from err
    return model


_TORCHVISION_BLOCKS = {
    "ResNet": ("layer1", "layer2", "layer3", "layer4"),
    "DenseNet": ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"),
}


# What a listing reports for an architecture that cannot be built at the asked size (timm's listing catches the same).
_LISTING_ERRORS = (UserError, RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError)


def block_summary(name: str, image_size: int) -> str:
    """``layer1 16x32x32, layer2 32x16x16, ...``: each block of ``name`` and its output (channels x height x
    width) for ``image_size`` px inputs, built on the meta device so no weights are allocated; or why not."""
    try:
        with torch.device("meta"):
            model = create_model(name, 10, image_size)
            shapes = block_shapes(model, image_size)
    except _LISTING_ERRORS as err:
        return f"(not at {image_size} px: {(str(err).strip().splitlines() or [''])[0][:100]})"
    return ", ".join(f"{block} {'x'.join(map(str, shapes[block]))}" for block in model.block_names)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
