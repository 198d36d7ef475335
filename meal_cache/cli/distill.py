"""distill: a student (and MEAL's discriminators) from a teacher cache alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from meal_cache.cli.options import (
    DECODE_OPTION,
    DEVICE_HELP,
    TENSORBOARD_OPTION,
    WORKERS_OPTION,
    SectionedCommand,
    SuggestingChoice,
    config_option,
    optimization_options,
)
from meal_cache.cli.paths import check_store_exists


def _discriminator_names(value: str) -> list[str]:
    from meal_cache.distill import parse_discriminators

    if not value.replace(",", "").strip():  # "" would otherwise read as no discriminators
        raise click.BadParameter("name blocks, output, both (blocks,output) or none")
    return parse_discriminators(value)


class RegistryChoice(SuggestingChoice):
    """A choice among a registry's names (``--method``: the methods, plug-ins included; ``--preset``: the presets),
    read when first asked for, so that commands which never look at them do not import torch to start."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self.names = names
        super().__init__([])

    @property
    def choices(self) -> list[str]:
        return self.names()

    @choices.setter
    def choices(self, _value) -> None:
        pass

    def convert(self, value, param, ctx):
        # The option's own default is a built-in name: taken without reading the registry (which imports torch),
        # so a command given no --method checks its paths and options first.
        if param is not None and value == param.default:
            return value
        return super().convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        # Shown in --help instead of the names, which only importing the methods (and torch) could list.
        return "NAME"


def _method_names() -> list[str]:
    from meal_cache.distill import available_methods

    return list(available_methods())


def _preset_names() -> list[str]:
    from meal_cache.distill.config import PRESETS

    return list(PRESETS)


def _method_options(pairs: tuple[str, ...]) -> dict[str, object]:
    """``--method-option NAME=VALUE`` pairs as a dict; a value that reads as JSON (a number, true) is that."""
    options: dict[str, object] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"takes NAME=VALUE, got '{pair}'", param_hint="--method-option")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[name.strip()] = value
    return options


def _peers(value: str | None) -> int | list[str] | None:
    """``--peers``: a count, or the peers' architectures (checked with the rest of the settings)."""
    if value is None:
        return None
    text = value.strip()
    if text.lstrip("+-").isdigit():
        return int(text)
    return [name.strip() for name in text.split(",") if name.strip()] or text


# Where a run goes when --out is not given: RUNS_FOLDER/STORE-METHOD, e.g. runs/feats-kd for feats.zarr and kd.
RUNS_FOLDER = "runs"
STORE_SUFFIX = ".zarr"


def default_run_folder(store: str, method: str) -> Path:
    """The run folder of ``distill`` without ``--out``: ``runs/STORE-METHOD``, STORE the store's last path component
    less ``.zarr`` (``feats.zarr`` and ``s3://bucket/feats.zarr`` both give ``runs/feats-METHOD``). Never reused
    silently: a folder that holds a run is refused unless --resume or --overwrite is given."""
    name = store.rstrip("/").rsplit("/", 1)[-1].removesuffix(STORE_SUFFIX) or "store"
    return Path(RUNS_FOLDER) / f"{name}-{method}"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got '{text}'") from err


# distill --help's sections: option names by heading, in the order shown (the last takes any option not named).
DISTILL_SECTIONS = {
    "Stage basics": ("config", "store", "student", "method", "preset", "out", "resume", "overwrite", "seed", "device"),
    "Method": ("method_options", "peers", "teacher_selection", "soft_loss", "temperature", "soft_weight",
               "hard_weight", "refine_labels", "refine_confidence"),
    "MEAL (blocks and discriminators)": ("representation", "block_loss", "block_weights", "match_blocks",
                                         "adv_weight", "adv_loss", "disc_lr", "discriminators", "adv_game",
                                         "disc_form"),
    "Schedule": ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs",
                 "eval_every"),
    "Data": ("data", "data_root", "download", "workers", "decode", "crops_per_image", "divergent_ratio",
             "max_memory"),
    "Advanced": ("online", "fresh_views", "teachers", "teacher_dir", "grad_norm_every", "quiet", "tensorboard"),
}  # fmt: skip


@click.command(cls=SectionedCommand, sections=DISTILL_SECTIONS)
@config_option('store = "feats.zarr" and block_weights = [0.1, 0.05]')
@click.option(
    "--store",
    required=True,
    type=click.Path(),
    help="The teacher cache written by `meal-cache extract`.",
)
@click.option(
    "--student",
    default=None,
    help="Student architecture (see `meal-cache models`); with --peers ARCH,... the first one where not given.",
)
@click.option(
    "--method",
    default="meal",
    show_default=True,
    type=RegistryChoice(_method_names),
    help="The distillation method, built in or a plug-in's: `meal-cache methods` lists each with what it reads "
    "from a store and its options.",
)
@click.option(
    "--peers",
    default=None,
    callback=lambda ctx, param, value: _peers(value),
    metavar="N|ARCH,ARCH,...",
    help="With --method afd or acn: train N students of --student together (afd: 1 by default, acn: 2), each "
    "initialised from its own seed, or one student of each architecture listed (peer 0, the student, first; e.g. "
    "resnet8_w4,resnet20). "
    "Writes peer0.pt .. peerN-1.pt (student.pt is peer0).",
)
@click.option(
    "--method-option",
    "method_options",
    multiple=True,
    default=(),
    metavar="NAME=VALUE",
    callback=lambda ctx, param, value: _method_options(value),
    help="One of the method's own options (repeat for more), e.g. --method dkd --method-option beta=8; "
    "`meal-cache methods` lists each method's options and defaults.",
)
@optimization_options
@click.option(
    "--teacher-selection",
    type=click.Choice(["random", "mean", "all"]),
    default=None,
    help="random: one teacher a step (MEAL); mean: the ensemble's average; all: every teacher's losses. "
    "Default: the method's.",
)
@click.option(
    "--representation",
    default=None,
    type=click.Choice(["maps", "blocks"]),
    help="meal: blocks: pooled channels through learned adapters (the default, the ablation's choice: "
    "docs/results.md); maps: channel-mean maps (MEAL's reference, no adapters; the default for a store that holds "
    "only maps). Each option of this section is the method's option of its name (--method-option "
    "representation=maps), read by the methods that have it (`meal-cache methods`).",
)
@click.option(
    "--block-loss",
    type=click.Choice(["soft-ce", "l1", "l2", "cosine"]),
    default=None,
    help="meal: similarity per block (default soft-ce for maps, l2 for blocks).",
)
@click.option(
    "--block-weights",
    default=None,
    metavar="W,W,...",
    help="meal: weights of the matched blocks from the last backwards; their count caps the blocks matched. "
    "Default: 0.1,0.05,0.01.",
)
@click.option("--match-blocks", type=int, default=None, help="meal: match at most this many blocks from the end.")
@click.option(
    "--soft-loss",
    type=click.Choice(["kl", "soft-ce", "dkd"]),
    default=None,
    help="Soft-label loss on logits: kl, soft-ce, or dkd (DKD's target and non-target parts, weighted by "
    "--method-option alpha, beta and warmup; kd, meal, meal-v2 and dkd take it). Default: the method's.",
)
@click.option("--temperature", type=float, default=None, help="Softening temperature (default: the method's).")
@click.option("--soft-weight", default=1.0, show_default=True, type=float)
@click.option(
    "--hard-weight",
    default=0.0,
    show_default=True,
    type=float,
    help="Cross-entropy on labels (MEAL: 0). A method whose paper trains with it fills in its own weight where you "
    "leave this at 0 (`meal-cache methods`).",
)
@click.option(
    "--adv-weight",
    default=None,
    type=float,
    help="Weight of each adversarial loss (meal, meal-v2, kd, afd). Default: 0.1.",
)
@click.option(
    "--adv-loss",
    default=None,
    type=click.Choice(["bce", "ls"]),
    help="The adversarial loss: bce, or ls (least squares). Default: bce.",
)
@click.option(
    "--disc-lr",
    default=None,
    type=float,
    help="Learning rate of the discriminators (Adam; with --adv-game joint, their "
    "part of the student's SGD, at --disc-lr / --lr of its scheduled rate). Default: 2e-4.",
)
@click.option(
    "--discriminators",
    default=None,
    callback=lambda ctx, param, value: None if value is None else _discriminator_names(value),
    help="Which discriminators train: blocks,output (meal's), blocks, output (meal-v2's) or none. Default: the "
    "method's.",
)
@click.option(
    "--adv-game",
    default=None,
    type=click.Choice(["adversarial", "joint"]),
    help="adversarial (the default): the discriminators take their own step, then the student learns to fool them; "
    "joint: MEAL's reference code, their loss added to the student's on one optimiser (at --disc-lr / --lr of its "
    "rate).",
)
@click.option(
    "--disc-form",
    default=None,
    type=click.Choice(["meal-cache", "reference"]),
    help="meal's family: meal-cache (the default): one discriminator per teacher and block (conv or MLP, one "
    "score), softened probabilities to the output one; reference: MEAL's reference code, one per layer shared by "
    "the teachers (1x1-conv stack, 2-way output), raw logits to the output one.",
)
@click.option(
    "--preset",
    default=None,
    type=RegistryChoice(_preset_names),
    help="A paper's own settings; options you set yourself win. reference: MEAL's reference code (T=1 soft-ce, "
    "random teacher, one joint discriminator per layer shared by the teachers, its 1x1-conv shape, raw logits, "
    "adversarial weight 1, discriminators at --lr / 100, no divergent batches); afd-paper: AFD's paper (--method "
    "afd: peers only, no teacher terms, CE 1, least-squares GAN, KL from the predecessor, separate adversarial "
    "step).",
)
@click.option("--data", default=None, help="Override the store's dataset (must match its fingerprint).")
@click.option("--data-root", default=None, help="Where the store's dataset lives (default: as recorded).")
@click.option("--download", is_flag=True)
@WORKERS_OPTION
@DECODE_OPTION
@click.option("--online", is_flag=True, help="Reference: run the teachers in the loop on the same replayed images.")
@click.option(
    "--fresh-views",
    is_flag=True,
    help="With --online: a new augmentation of every image each epoch (the store's recipe) instead of "
    "replaying the stored views; the reference the cached-views curve is measured against.",
)
@click.option("--teachers", default="", help="With --online: the teachers, as given to extract.")
@click.option("--teacher-dir", default="teachers", show_default=True, help="With --online: where they are.")
@click.option(
    "--refine-labels",
    is_flag=True,
    help="Replace the hard labels of suspect rows (see `meal-cache inspect`) by the teachers' ensemble's; "
    "matters where hard labels are used (--hard-weight > 0).",
)
@click.option(
    "--refine-confidence",
    default=0.5,
    show_default=True,
    type=float,
    help="With --refine-labels: the ensemble probability of another class that makes a row suspect.",
)
@click.option(
    "--crops-per-image",
    default=1,
    show_default=True,
    type=int,
    help="FKD's multi-crop: each batch holds K cached views of batch-size / K images, so an image file is decoded "
    "once for K crops (an epoch is then K views of every image). Needs K <= the store's views.",
)
@click.option(
    "--grad-norm-every",
    default=0,
    show_default=True,
    type=int,
    help="Every N steps, log the gradient norm each loss family (soft, hard, sim, adv, a method's own) sends "
    "into the student (grad/FAMILY in metrics.jsonl); one extra backward pass per family on those steps. 0: never.",
)
@click.option(
    "--divergent-ratio",
    default=None,
    type=float,
    help="Batches of the store's divergent views (extract --divergent-views) per natural batch, spread through "
    "each epoch; epoch e takes divergent view e mod K. Default: 0.25 where the store has them, else none.",
)
@click.option(
    "--max-memory",
    default=None,
    help="Memory for cached targets, e.g. 4GB. Two whole views are held when they fit (the current one "
    "and the next, prefetched); otherwise whole chunks stream through a shuffle buffer.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Run directory. Default: runs/STORE-METHOD (runs/feats-meal for feats.zarr and --method meal).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@TENSORBOARD_OPTION
def distill(block_weights: str | None, teachers: str, out: str | None, resume: bool, overwrite: bool, quiet: bool,
            tensorboard: bool, **settings) -> None:  # fmt: skip
    """Train a student (and MEAL's discriminators) from a teacher cache alone.

    The images come from the dataset the store records, replayed with the stored augmentation of view
    e mod V in epoch e; the teachers' outputs come from the store, never from their checkpoints. Writes
    config.json, metrics.jsonl (every named loss per epoch), last.pt (for --resume) and student.pt
    (for `meal-cache evaluate`) under --out (default runs/STORE-METHOD); with --tensorboard, metrics.jsonl's
    numbers also in tensorboard/.
    """
    if settings["student"] is None:
        if not isinstance(settings["peers"], list):
            raise click.UsageError("Missing option '--student': the student's architecture, e.g. --student "
                                   "resnet8_w4 (`meal-cache models` lists them)")  # fmt: skip
        settings["student"] = settings["peers"][0]
    # After the options click checks (a missing --student, a mistyped --method), before torch is imported.
    check_store_exists(settings["store"])
    from meal_cache.distill import DistillConfig
    from meal_cache.distill import distill as run_distill
    from meal_cache.engine.distributed import is_main_process
    from meal_cache.engine.loop import check_tensorboard

    context = click.get_current_context()
    given = tuple(name for name in settings if context.get_parameter_source(name) != ParameterSource.DEFAULT)
    config = DistillConfig(given=given, block_weights=None if block_weights is None else _floats(block_weights),
                           teachers=[t.strip() for t in teachers.split(",") if t.strip()], **settings)  # fmt: skip
    if tensorboard:
        check_tensorboard()  # before anything is written
    if out is None:
        out = str(default_run_folder(settings["store"], settings["method"]))
        if is_main_process():
            click.echo(f"run folder: {out} (no --out given)")
    summary = run_distill(config, out, resume=resume, overwrite=overwrite, progress=not quiet,
                          tensorboard=tensorboard)  # fmt: skip
    if not is_main_process():
        return
    test = summary["test"]
    click.echo(f"{settings['method']} student {settings['student']}: test top-1 {test['top1']:.2f}%  "
               f"NLL {test['nll']:.4f}  -> {out}/student.pt")  # fmt: skip
