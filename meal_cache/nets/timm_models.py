"""timm models as meal-cache architectures: ``timm:NAME`` (untrained), ``timm:NAME:pretrained``, ``timm:NAME.TAG``
and ``timm:hf-hub:ORG/NAME`` (timm's pretrained weights; need internet once, then the Hugging Face cache; offline,
HF_HUB_OFFLINE=1 makes a miss fail at once), and ``timm:NAME:file=PATH`` (a local timm checkpoint, read with
``weights_only=True``).

A timm network is wrapped in :class:`TimmNet`, whose forward is the model's own API: ``forward_intermediates``
(NCHW maps of the chosen stages, a ViT's token maps included) and then ``forward_head`` on its final features, so
the logits are the model's own forward's. Each chosen intermediate passes through an identity module
(``taps.NAME``), which is where :class:`~meal_cache.nets.taps.BlockTap`'s forward hooks find it: to the rest of
meal-cache a ViT's token map or a ConvNeXt's stage is a block like a ResNet's layer. A model without
``forward_intermediates`` is hooked on the modules its ``feature_info`` names instead (``net.MODULE``), if those
give NCHW maps. timm is imported only when a timm name is used (it adds about half a second).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meal_cache.errors import UserError, unknown_choice
from meal_cache.nets.taps import block_shapes

PREFIX = "timm:"
PRETRAINED = ":pretrained"
HF_HUB = "hf-hub:"
FILE = ":file="
LISTING = "meal-cache models 'timm:PATTERN'"
# A model whose stages all share one resolution (a ViT's blocks) gives this many evenly spaced blocks, the last
# one included: as many as a ResNet has stages.
ISOTROPIC_BLOCKS = 4


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def weights_file(name: str) -> str | None:
    """The PATH of ``timm:NAME:file=PATH``, else None."""
    return name.partition(FILE)[2] or None


def parse_name(name: str) -> tuple[str, bool]:
    """``timm:...`` -> (the name timm's create_model takes, whether timm's pretrained weights are fetched).

    ``NAME.TAG`` and ``hf-hub:...`` name weights, so they are pretrained without the ``:pretrained`` suffix; a
    ``:file=PATH`` (:func:`weights_file`) is not part of the name, and its weights are never fetched."""
    rest, _, path = name[len(PREFIX) :].partition(FILE)
    if path:
        return rest, False
    pretrained = rest.endswith(PRETRAINED)
    if pretrained:
        rest = rest[: -len(PRETRAINED)]
    pretrained = pretrained or rest.startswith(HF_HUB) or "." in rest
    return rest, pretrained


def split_name(name: str) -> tuple[str, str | None]:
    """What :func:`~meal_cache.nets.models.split_weights` gives for a timm name: the architecture without
    ``:pretrained`` or ``:file=PATH``, and ``"pretrained"``, ``"file=PATH"`` or None."""
    model_name, pretrained = parse_name(name)
    path = weights_file(name)
    return PREFIX + model_name, (f"file={path}" if path else "pretrained" if pretrained else None)


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a dependency; a broken install still gets one line
        raise UserError(f"timm names need the timm package ({err}); pip install 'timm==1.0.*'") from err
    return timm


def timm_model_names(pattern: str = "*") -> list[str]:
    """timm's architectures matching a shell ``pattern`` (``vit_*``), without the ``timm:`` prefix."""
    return _timm().list_models(pattern)


def is_known(arch: str) -> bool:
    """Whether ``timm:NAME`` (or ``timm:NAME.TAG``) is in timm's registry; hub names are taken on trust (their
    config is on the hub)."""
    model_name = parse_name(arch)[0]
    if model_name.startswith(HF_HUB):
        return len(model_name) > len(HF_HUB)
    name, _, tag = model_name.partition(".")
    timm = _timm()
    return name in timm.list_models() and (not tag or model_name in timm.list_pretrained(model_name))


def check_known(arch: str) -> None:
    """:func:`is_known`, raising the error of an unknown ``timm:NAME`` (or tag) with the closest names."""
    _check_known(parse_name(arch)[0])


def _check_known(model_name: str) -> None:
    """An unknown architecture or pretrained tag is one error with the closest names, before anything is built."""
    if model_name.startswith(HF_HUB):
        return  # the hub holds the config; it is read when the model is built
    timm = _timm()
    arch, _, tag = model_name.partition(".")
    if arch not in timm.list_models():
        raise unknown_choice("timm model", PREFIX + arch, [PREFIX + n for n in timm.list_models()], listing=LISTING)
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise unknown_choice(f"pretrained tag for timm:{arch}", tag, tags)


def _is_download_error(err: BaseException) -> bool:
    # The hub's errors are OSErrors (a missing network included: LocalEntryNotFoundError); httpx's are not.
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in {"httpx", "httpx2", "huggingface_hub"}


def _build(model_name: str, pretrained: bool, num_classes: int | None, image_size: int, **extra: Any) -> nn.Module:
    """timm's create_model for ``num_classes`` (None: the pretrained head's) and, where the model takes one (ViTs,
    Swin), ``img_size``; ``extra`` goes to create_model as it is."""
    timm = _timm()
    kwargs: dict[str, Any] = {"pretrained": pretrained, **extra}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        try:
            return timm.create_model(model_name, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # CNNs take any size as they are and refuse the keyword.
            return timm.create_model(model_name, **kwargs)
    except Exception as err:
        if not _is_download_error(err):
            raise
        raise UserError(_unreachable(model_name, err)) from err


def _unreachable(model_name: str, err: BaseException) -> str:
    """The line for weights the hub cannot give: where they are looked for, and the two ways round a network."""
    from huggingface_hub import constants

    # The hub's messages are paragraphs; their first sentence says what went wrong.
    reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    cache = f"the Hugging Face cache '{constants.HF_HUB_CACHE}' (HF_HOME/hub)"
    if constants.HF_HUB_OFFLINE:
        where = f"HF_HUB_OFFLINE is set, so they are read only from {cache}, which lacks them"
    else:
        where = f"they need internet once, then {cache} serves them (offline, set HF_HUB_OFFLINE=1 to fail at once)"
    arch = "ARCH" if model_name.startswith(HF_HUB) else model_name.partition(".")[0]
    return (f"could not download timm's weights or config for '{PREFIX}{model_name}' ({type(err).__name__}: "
            f"{reason}); {where}: copy them there from a machine that has them, or pass "
            f"{PREFIX}{arch}:file=/path/to/weights (a .pth or .safetensors timm checkpoint)")  # fmt: skip


def _build_from_file(model_name: str, path: Path, image_size: int) -> nn.Module:
    """timm's ``model_name`` with the weights of a local checkpoint (``weights_only=True``, or safetensors), its
    head as the checkpoint has it; timm's own loading adapts them (a ViT's position embedding to ``image_size``)."""
    if not path.is_file():
        raise UserError(f"weights file '{path}' for {PREFIX}{model_name} does not exist ({PREFIX}NAME:file=PATH "
                        "reads a timm checkpoint: a state dict in a .pth or .safetensors file)")  # fmt: skip
    timm = _timm()
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # torch and safetensors raise several types for foreign or corrupt files
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"weights file '{path}' is not a readable timm checkpoint ({type(err).__name__}: "
                        f"{reason})") from err  # fmt: skip
    cfg = timm.models.get_pretrained_cfg(model_name)
    heads = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
    sizes = [int(state[f"{h}.weight"].shape[0]) for h in heads if f"{h}.weight" in state]
    num_classes = sizes[0] if sizes else cfg.num_classes
    overlay = {"state_dict": state, "num_classes": num_classes}
    try:
        return _build(model_name, True, num_classes, image_size, pretrained_cfg_overlay=overlay)
    except RuntimeError as err:  # torch's load_state_dict: names or shapes of another model
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(f"weights file '{path}' is not a checkpoint of {PREFIX}{model_name} "
                        f"({' '.join(lines[:2])[:300]})") from err  # fmt: skip


def _check_patch_size(net: nn.Module, name: str, image_size: int) -> None:
    """A ViT cuts images into patches; a size the patch does not divide would silently lose its last pixels."""
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if any(image_size % p for p in patch) or image_size < max(patch):
        raise UserError(
            f"'{name}' cuts images into {patch[0]}x{patch[1]} px patches, which do not divide {image_size} px; "
            f"set --image-size to a multiple of {patch[0]}"
        )


def _feature_entries(net: nn.Module) -> list[dict]:
    info = getattr(net, "feature_info", None)
    if info is None:
        return []
    return list(info.info) if hasattr(info, "info") else list(info)


def choose_stages(reductions: list[int]) -> list[int]:
    """Which of a model's stages are its blocks, by their strides (``feature_info``'s ``reduction``).

    One shared stride (a ViT's or a Mixer's blocks): :data:`ISOTROPIC_BLOCKS` evenly spaced ones, ending with the
    last. Otherwise the stages at stride 4 and more, the last of each stride: the stem's stride-2 output is left out,
    as torchvision's ResNet blocks (``layer1..4``) leave it out; it is also the largest map."""
    count = len(reductions)
    if len(set(reductions)) == 1:
        return sorted({round(count * (k + 1) / ISOTROPIC_BLOCKS) - 1 for k in range(ISOTROPIC_BLOCKS)} - {-1})
    kept = [i for i, r in enumerate(reductions) if r >= 4] or list(range(count))
    last = {reductions[i]: i for i in kept}  # later stages overwrite earlier ones of the same stride
    return sorted(last.values())


def _tap_key(module_name: str) -> str:
    # ModuleDict keys cannot hold dots; the key keeps timm's module name readable (stages.3 -> stages_3).
    return module_name.replace(".", "_")


class TimmNet(nn.Module):
    """A timm network whose forward is ``forward_intermediates`` then ``forward_head`` (or the plain forward, for
    a model hooked through ``feature_info``), with each chosen stage passed through an identity tap."""

    def __init__(self, net: nn.Module, indices: list[int] | None, tap_names: list[str]) -> None:
        super().__init__()
        self.net = net
        self.indices = indices
        self.taps = nn.ModuleDict({key: nn.Identity() for key in tap_names})
        # What the head reads, through an identity a dense store's hook can spread into one map per position.
        self.head_input = nn.Identity()
        self.dense_tap = "head_input" if indices is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            return self.net(x)
        # One pass gives both (intermediates_only=False): the final features for the head and the stages' maps.
        final, intermediates = self.net.forward_intermediates(x, indices=self.indices, output_fmt="NCHW")
        for tap, value in zip(self.taps.values(), intermediates, strict=True):
            tap(value)  # the identity's forward hook is the block tap
        return self.net.forward_head(self.head_input(final))


def _all_intermediates(net: nn.Module, name: str, image_size: int) -> list[torch.Tensor]:
    """Every stage's NCHW map for one zero image, or one error naming the size the model cannot take."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            device = next(net.parameters()).device
            return net.forward_intermediates(
                torch.zeros(1, 3, image_size, image_size, device=device), intermediates_only=True, output_fmt="NCHW"
            )
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"'{name}' has no features at {image_size} px ({reason}); "
                        f"try a larger --image-size") from err  # fmt: skip
    finally:
        net.train(was_training)


def _wrap(net: nn.Module, name: str, image_size: int) -> TimmNet:
    entries = _feature_entries(net)
    if hasattr(net, "forward_intermediates"):
        maps = _all_intermediates(net, name, image_size)
        if len(entries) == len(maps):
            reductions = [int(e["reduction"]) for e in entries]
            names = [_tap_key(e["module"]) for e in entries]
        else:  # feature_info does not describe the intermediates: strides from the maps themselves
            reductions = [max(1, image_size // m.shape[-1]) for m in maps]
            names = [f"stage{i}" for i in range(len(maps))]
        if not maps or any(m.ndim != 4 or 0 in m.shape for m in maps):
            raise UserError(f"'{name}' has no features at {image_size} px; try a larger --image-size")
        indices = choose_stages(reductions)
        model = TimmNet(net, indices, [names[i] for i in indices])
        model.block_names = tuple(f"taps.{names[i]}" for i in indices)
        return model
    if not entries:
        raise UserError(f"'{name}' has neither forward_intermediates nor feature_info: meal-cache cannot take blocks")
    if any(e.get("fmt", "NCHW") != "NCHW" for e in entries):
        raise UserError(f"'{name}' has no forward_intermediates and its feature_info maps are not NCHW")
    indices = choose_stages([int(e["reduction"]) for e in entries])
    model = TimmNet(net, None, [])
    model.block_names = tuple(f"net.{entries[i]['module']}" for i in indices)
    return model


def pretrained_input(net: nn.Module) -> dict:
    """The input a pretrained timm model expects (its pretrained config): normalisation, native size, resampling,
    crop and where the weights come from; recorded in checkpoints and stores beside the input meal-cache uses."""
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    recorded = {key: cfg[key] for key in ("mean", "std", "input_size", "interpolation", "crop_pct") if key in cfg}
    recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items()}
    for key in ("architecture", "tag", "hf_hub_id", "num_classes"):
        if cfg.get(key) is not None:
            recorded[key] = cfg[key]
    return recorded


def pretrained_classes(net: nn.Module, num_classes: int) -> list[str]:
    """The class names of a pretrained head (ImageNet's descriptions where timm knows the subset), else numbers."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(net)
        if subset:
            names = list(ImageNetInfo(subset).label_descriptions())
            if len(names) == num_classes:
                return names
    except Exception:  # noqa: BLE001 - class names are a courtesy; numbers serve as well
        pass
    return [str(i) for i in range(num_classes)]


def create_timm_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build ``timm:...`` for ``num_classes`` and ``image_size`` px inputs, with ``block_names`` and, when
    pretrained, ``pretrained_input`` (:func:`pretrained_input`) and ``pretrained_classes`` (its head's classes)."""
    model_name, pretrained = parse_name(name)
    path = weights_file(name)
    if not model_name:
        raise UserError(f"'{name}' names no timm model; `{LISTING}` lists them")
    _check_known(model_name)
    weighted = pretrained or path is not None
    if weighted:
        net = (_build_from_file(model_name, Path(path).expanduser(), image_size) if path is not None
               else _build(model_name, True, None, image_size))  # fmt: skip
        # The pretrained head as it is, so its classes are known (a teacher used unchanged must have the
        # dataset's); replaced by a new head for the dataset's classes if they differ, as torchvision's are.
        head_classes = int(getattr(net, "num_classes", num_classes))
        info = pretrained_input(net)
        if path is not None:  # the weights are the file's, not those the config's hub id names
            info = {**{k: v for k, v in info.items() if k not in ("hf_hub_id", "tag")}, "file": path}
        classes = pretrained_classes(net, head_classes)
        if head_classes != num_classes:
            net.reset_classifier(num_classes)
    else:
        net = _build(model_name, False, num_classes, image_size)
    _check_patch_size(net, name, image_size)
    model = _wrap(net, name, image_size)
    if weighted:
        model.pretrained_input = info
        model.pretrained_classes = classes
    return model


def describe(pattern: str, image_size: int, limit: int = 50) -> list[str]:
    """Lines for ``meal-cache models 'timm:PATTERN'``: each matching timm model and its blocks at ``image_size``
    (channels x height x width), built on the meta device so no weights are allocated; names only past ``limit``."""
    names = timm_model_names(pattern)
    if not names:
        close = [PREFIX + n for n in difflib.get_close_matches(pattern.strip("*"), _timm().list_models(), n=5)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return [f"no timm model matches '{pattern}'{hint}"]
    lines = [f"timm models matching '{pattern}' ({len(names)}), blocks at {image_size} px:"]
    if len(names) > limit:
        lines.append(f"  (more than {limit}: names only; narrow the pattern for their blocks)")
        return lines + [f"  {PREFIX}{n}" for n in names]
    for model_name in names:
        try:
            with torch.device("meta"):
                model = create_timm_model(PREFIX + model_name, 10, image_size)
                shapes = block_shapes(model, image_size)
            blocks = ", ".join(f"{b} {'x'.join(map(str, shapes[b]))}" for b in model.block_names)
        except (UserError, RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError) as err:
            reason = (str(err).strip().splitlines() or [""])[0]
            blocks = f"(not at {image_size} px: {reason[:100]})"
        lines.append(f"  {PREFIX}{model_name:40s} {blocks}")
    return lines
