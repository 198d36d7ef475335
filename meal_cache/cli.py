"""The ``meal-cache`` command line: thin click wrappers over the library's functions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from meal_cache.errors import UserError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
DATA_HELP = (
    "Dataset: digits, cifar10, cifar100, svhn, imagefolder:PATH, npz:PATH or fake[:N], optionally with "
    "?label_noise=R&noise=symmetric|pairflip&train_fraction=F&folds=K&fold=I (folds: test on fold I of a "
    "stratified K-fold re-split of all rows; see `meal-cache datasets`)."
)


class MealCacheGroup(click.Group):
    """Turns a user's mistake into one ``Error:`` line and exit status 2, never a traceback: the library's
    UserError, and click's own usage errors (which click would print under a usage banner)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise click.UsageError(str(err)) from err

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as err:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Under torchrun: one line from rank 0, not one per rank, and the same exit status on every rank.
                from meal_cache.distributed import exit_with_user_error

                exit_with_user_error(err.format_message(), err.exit_code)
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=MealCacheGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="meal-cache")
def main() -> None:
    """Distil an ensemble of teachers into one student through an offline teacher cache (MEAL).

    \b
    A typical run, offline on the built-in digits data:
      meal-cache train --arch resnet20 --data digits --epochs 15 --out teachers/resnet.pt
      meal-cache train --arch densenet_k12 --data digits --epochs 15 --out teachers/densenet.pt
      meal-cache evaluate teachers/resnet.pt

    `meal-cache models` and `meal-cache datasets` list the names these commands accept.
    """


def _with_options(func, options: list):
    """Apply click options so they appear in --help in the order listed."""
    for option in reversed(options):
        func = option(func)
    return func


WORKERS_OPTION = click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes that read and decode image files (imagefolder), 0 for none; default: the cores less one, "
    "at most 8. In-memory datasets do not use them.",
)


def data_options(func):
    """The options that name and locate a dataset, shared by every command that loads one."""
    options = [
        click.option(
            "--data-root",
            default="data",
            show_default=True,
            type=click.Path(file_okay=False),
            help="Where torchvision datasets (cifar10, cifar100, svhn) live or are downloaded to.",
        ),
        click.option("--download", is_flag=True, help="Download a torchvision dataset that is missing (internet)."),
        click.option(
            "--image-size",
            type=int,
            default=None,
            help="Resize images to this square size (default: the dataset's own; digits 16 px, a streamed "
            "imagefolder 224 px, one with ?in_memory=1 32 px).",
        ),
        WORKERS_OPTION,
    ]
    return _with_options(func, options)


def optimization_options(func):
    """Epochs, batch and SGD schedule, shared by train and distill (the defaults of TrainConfig/DistillConfig)."""
    options = [
        click.option("--epochs", default=30, show_default=True, type=int,
                     help="Epochs (distill's epoch e replays cached view e mod V)."),
        click.option("--batch-size", default=64, show_default=True, type=int),
        click.option("--lr", default=0.05, show_default=True, type=float, help="Peak learning rate of SGD."),
        click.option("--momentum", default=0.9, show_default=True, type=float),
        click.option("--weight-decay", default=5e-4, show_default=True, type=float),
        click.option("--schedule", default="cosine", show_default=True,
                     type=click.Choice(["cosine", "step", "constant"]),
                     help="After the warm-up: cosine to zero, steps of 10x at 50% and 75%, or constant."),
        click.option("--warmup-epochs", default=1.0, show_default=True, type=float),
    ]  # fmt: skip
    return _with_options(func, options)


@main.command()
@click.option(
    "--arch",
    required=True,
    help="Architecture (see `meal-cache models`), or ARCH:WEIGHTS for "
    "torchvision pretrained weights, e.g. resnet50:IMAGENET1K_V2.",
)
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help=DATA_HELP,
)
@data_options
@optimization_options
@click.option("--label-smoothing", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write, e.g. teachers/resnet.pt."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from --out; a finished one is left as it is.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(out: str, resume: bool, overwrite: bool, quiet: bool, **settings) -> None:
    """Train a network with cross-entropy: a teacher, or the student-alone baseline.

    Random crop with padding (and flip for natural images), SGD with Nesterov momentum, warm-up then the
    schedule, evaluation on the test split after every epoch. The checkpoint records the architecture,
    classes, input size and normalisation, the data's fingerprint, the test accuracy and the full config;
    it loads with torch.load(weights_only=True).
    """
    from meal_cache.train import TrainConfig, train_supervised

    payload = train_supervised(TrainConfig(**settings), out, resume=resume, overwrite=overwrite, progress=not quiet)
    test = payload["metrics"]["test"]
    click.echo(
        f"{settings['arch']} on {settings['data']}: test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%  -> {out}"
    )


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", default=None, help="Dataset to evaluate on (default: the one the checkpoint was trained on).")
@data_options
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the metrics (default: CHECKPOINT with .eval.json).",
)
@click.option(
    "--teachers", default="", help="Comma-separated teacher checkpoints: adds fidelity and KL to their ensemble."
)
@click.option(
    "--store",
    default=None,
    type=click.Path(),
    help="Instead of --teachers: a teacher cache of the evaluated split with an identity view (extract --split "
    "test --views 0 --identity-view) whose cached logits give the ensemble.",
)
def evaluate(
    checkpoint: str,
    data: str | None,
    data_root: str,
    download: bool,
    image_size: int | None,
    workers: int | None,
    split: str,
    device: str,
    json_out: str | None,
    teachers: str,
    store: str | None,
) -> None:
    """Top-1, top-5, negative log-likelihood and calibration error (ECE) of a checkpoint, and with --teachers (or
    --store) its fidelity to the teachers' ensemble and KL divergence from it; printed and written as JSON."""
    from meal_cache.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint, data=data, data_root=data_root, download=download, image_size=image_size, split=split,
        device=device, teachers=[t.strip() for t in teachers.split(",") if t.strip()], store=store, workers=workers,
    )  # fmt: skip
    path = Path(json_out) if json_out else Path(checkpoint).with_suffix(".eval.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    metrics = result["metrics"]
    extra = (f"  fidelity {metrics['fidelity']:.2f}%  KL {metrics['kl_to_ensemble']:.4f}"
             if "fidelity" in metrics else "")  # fmt: skip
    click.echo(
        f"{result['arch']} on {result['data']} ({split}, {metrics['n']} images): top-1 {metrics['top1']:.2f}%"
        f"  top-5 {metrics['top5']:.2f}%  NLL {metrics['nll']:.4f}  ECE {metrics['ece']:.2f}%{extra}  -> {path}"
    )


@main.command()
@click.option(
    "--teachers",
    required=True,
    help="Comma-separated teachers: NAME for TEACHER_DIR/NAME.pt (from `meal-cache train`), a path to a "
    ".pt checkpoint, or ARCH:WEIGHTS for torchvision pretrained weights.",
)
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help=DATA_HELP,
)
@data_options
@click.option(
    "--split",
    default="train",
    show_default=True,
    type=click.Choice(["train", "test"]),
    help="Which split to cache (distill trains on the train split).",
)
@click.option(
    "--views",
    default=4,
    show_default=True,
    type=int,
    help="Augmented views to cache; distill's epoch e replays view e mod V. On digits 1 to 16 views all matched "
    "fresh augmentation every epoch (docs/design.md, the views curve); run pipelines/digits-views.toml's "
    "protocol on your data before spending bytes on more.",
)
@click.option("--identity-view", is_flag=True, help="Also cache the un-augmented view (for evaluation and inspect).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the views' augmentation parameters.")
@click.option(
    "--recipe",
    default="crop",
    show_default=True,
    help="What each view draws after the dataset's crop (and flip): crop (nothing more), randaugment "
    "(torchvision's RandAugment: 2 ops a row at magnitude 9 of 31) or trivialaugment (TrivialAugmentWide: one op, "
    "any magnitude); each row's ops and magnitudes are stored, and distill replays them. Digits draw glyph-safe "
    "ops only (docs/design.md).",
)
@click.option(
    "--mixup",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Mix each view's rows with Mixup, lambda ~ Beta(ALPHA, ALPHA) (timm uses 0.8); 0: no Mixup. Each row's "
    "partner and lambda are stored; the teachers see the mixed image, and distill rebuilds it and mixes the "
    "hard labels with the same lambda.",
)
@click.option(
    "--cutmix",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Paste a box of a partner row (CutMix, lambda ~ Beta(ALPHA, ALPHA), timm uses 1.0); 0: no CutMix. The "
    "box is stored with the partner.",
)
@click.option(
    "--mix-prob",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="The share of (view, row)s mixed, with --mixup or --cutmix.",
)
@click.option(
    "--mix-switch-prob",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="With both --mixup and --cutmix: the chance a mixed row takes CutMix rather than Mixup (timm's switch_prob).",
)
@click.option(
    "--divergent-views",
    default=0,
    show_default=True,
    type=int,
    help="ACN's divergent examples: add K views a row made by gradient ascent on the teachers' disagreement "
    "(Jensen-Shannon at T=1) from the un-augmented image, within --divergent-eps; their uint8 pixels are stored "
    "beside the teachers' outputs on them, and distill mixes them in (--divergent-ratio). Needs two teachers.",
)
@click.option(
    "--divergent-eps",
    default=0.03,
    show_default=True,
    type=float,
    help="The divergent views' L-infinity bound, a fraction of the pixel range in [0, 1] (8/255 = 0.031).",
)
@click.option(
    "--divergent-steps",
    default=5,
    show_default=True,
    type=int,
    help="Signed-gradient steps of the search, each 2.5 x eps / steps (PGD's rule), from a seeded random start.",
)
@click.option(
    "--grid",
    default=1,
    show_default=True,
    type=click.Choice(["1", "2", "4"]),
    help="Pool each block's output to a g x g grid of channel vectors (1 = global average).",
)
@click.option(
    "--blocks",
    default="all",
    show_default=True,
    help="Which blocks: all, K (the last K of each teacher), or comma-separated block names.",
)
@click.option(
    "--features",
    default="blocks,maps",
    show_default=True,
    help="What to store per block: blocks (pooled channels, what meal reads by default), maps (channel-mean "
    "map, MEAL's reference representation), or both.",
)
@click.option(
    "--for",
    "preset",
    default=None,
    help="Store only what one method reads: meal (logits + the last 3 blocks' pooled channels, 8-bit unless "
    "--quantize none), kd or meal-v2 (logits only), all (everything, as without --for). Replaces --features and "
    "--blocks.",
)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--codec", default="zstd:3", show_default=True, help="zstd[:LEVEL], blosc[:LEVEL] or none.")
@click.option(
    "--keep-bits",
    type=int,
    default=None,
    help="Lossy: keep this many mantissa bits of every teacher output (bit rounding; float16 has 10). "
    "Default: lossless.",
)
@click.option(
    "--quantize",
    type=click.Choice(["8", "none"]),
    default=None,
    callback=lambda ctx, param, value: None if value is None else 0 if value == "none" else int(value),
    help="Lossy: store blocks and maps as 8-bit codes, each row scaled to its own range (logits stay as "
    "--dtype). Default: lossless, except 8 with --for meal; 'none' keeps meal's blocks lossless.",
)
@click.option(
    "--logits-topk",
    type=int,
    default=None,
    help="Lossy: keep each row's K largest logits (int16 classes, --dtype values) and the log-sum-exp of all; "
    "read back with the rest of the probability spread evenly over the other classes (FKD, TinyViT). "
    "Default: every logit.",
)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option(
    "--rows-per-chunk",
    default=512,
    show_default=True,
    type=int,
    help="Rows in one Zarr chunk (the unit of writing and of resuming).",
)
@click.option("--teacher-dir", default="teachers", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--out", required=True, type=click.Path(), help="The store to write, e.g. feats.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store extracted with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract(teachers: str, grid: str, features: str, out: str, overwrite: bool, quiet: bool, **settings) -> None:
    """Run every teacher once over V replayable views and write the Zarr teacher cache.

    Each teacher sees exactly the images distill will replay (the views' crop and flip parameters are stored),
    in eval mode. Per teacher, view and chunk of rows the store keeps the logits, every block's pooled output
    and its channel-mean map. An interrupted extract, run again with the same arguments, resumes.
    """
    from meal_cache.distributed import is_main_process
    from meal_cache.extract import ExtractConfig
    from meal_cache.extract import extract as run_extract
    from meal_cache.store import describe_store

    config = ExtractConfig(
        teachers=[t.strip() for t in teachers.split(",") if t.strip()],
        grid=int(grid),
        features=[f.strip() for f in features.split(",") if f.strip()],
        **settings,
    )
    store = run_extract(config, out, overwrite=overwrite, progress=not quiet)
    if is_main_process():
        click.echo(describe_store(store))


def _discriminator_names(value: str) -> list[str]:
    from meal_cache.distill import parse_discriminators

    if not value.replace(",", "").strip():  # "" would otherwise read as no discriminators
        raise click.BadParameter("name blocks, output, both (blocks,output) or none")
    return parse_discriminators(value)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got '{text}'") from err


@main.command()
@click.option("--store", required=True, type=click.Path(), help="The teacher cache written by `meal-cache extract`.")
@click.option("--student", required=True, help="Student architecture (see `meal-cache models`).")
@click.option(
    "--method",
    default="meal",
    show_default=True,
    type=click.Choice(["meal", "kd", "meal-v2", "afd"]),
    help="meal: block similarity + discriminators per block and on the output; kd: Hinton KD from the "
    "ensemble mean; meal-v2: ensemble soft labels + an output discriminator; afd: --peers students trained "
    "together, conv discriminators on their last feature maps (AFD).",
)
@click.option(
    "--peers",
    type=int,
    default=None,
    help="With --method afd: train N students of --student together (default 1), each initialised from its own "
    "seed; student i's discriminator learns from student i-1 (mod N), all learn from each other's logits and "
    "from the teachers' maps and soft labels. Writes peer0.pt .. peerN-1.pt (student.pt is peer0).",
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
    help="blocks: pooled channels through learned adapters (the default, the ablation's choice: docs/design.md); "
    "maps: channel-mean maps (MEAL's reference, no adapters; the default for a store that holds only maps).",
)
@click.option(
    "--block-loss",
    type=click.Choice(["soft-ce", "l1", "l2", "cosine"]),
    default=None,
    help="Similarity per block (default soft-ce for maps, l2 for blocks).",
)
@click.option(
    "--block-weights",
    default="0.1,0.05,0.01",
    show_default=True,
    help="Weights of the matched blocks from the last backwards; their count caps the blocks matched.",
)
@click.option("--match-blocks", type=int, default=None, help="Match at most this many blocks from the end.")
@click.option("--soft-loss", type=click.Choice(["kl", "soft-ce"]), default=None, help="Soft-label loss on logits.")
@click.option("--temperature", type=float, default=None, help="Softening temperature (default: the method's).")
@click.option("--soft-weight", default=1.0, show_default=True, type=float)
@click.option("--hard-weight", default=0.0, show_default=True, type=float, help="Cross-entropy on labels (MEAL: 0).")
@click.option("--adv-weight", default=0.1, show_default=True, type=float, help="Weight of each adversarial loss.")
@click.option("--adv-loss", default="bce", show_default=True, type=click.Choice(["bce", "ls"]))
@click.option(
    "--disc-lr",
    default=2e-4,
    show_default=True,
    type=float,
    help="Learning rate of the discriminators (Adam; with --adv-game joint, their "
    "part of the student's SGD, at --disc-lr / --lr of its scheduled rate).",
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
    default="adversarial",
    show_default=True,
    type=click.Choice(["adversarial", "joint"]),
    help="adversarial: the discriminators take their own step, then the student learns to fool them; joint: "
    "MEAL's reference code, their loss added to the student's on one optimiser (at --disc-lr / --lr of its rate).",
)
@click.option(
    "--preset",
    default=None,
    type=click.Choice(["reference"]),
    help="reference: MEAL's reference code (T=1 soft-ce, random teacher, joint discriminators, adversarial "
    "weight 1, --disc-lr 5e-4); options you set yourself win.",
)
@click.option("--data", default=None, help="Override the store's dataset (must match its fingerprint).")
@click.option("--data-root", default=None, help="Where the store's dataset lives (default: as recorded).")
@click.option("--download", is_flag=True)
@WORKERS_OPTION
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
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory, e.g. runs/meal.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def distill(block_weights: str, teachers: str, out: str, resume: bool, overwrite: bool, quiet: bool,
            **settings) -> None:  # fmt: skip
    """Train a student (and MEAL's discriminators) from a teacher cache alone.

    The images come from the dataset the store records, replayed with the stored augmentation of view
    e mod V in epoch e; the teachers' outputs come from the store, never from their checkpoints. Writes
    config.json, metrics.jsonl (every named loss per epoch), last.pt (for --resume) and student.pt
    (for `meal-cache evaluate`) under --out.
    """
    from meal_cache.distill import DistillConfig
    from meal_cache.distill import distill as run_distill
    from meal_cache.distributed import is_main_process

    config = DistillConfig(block_weights=_floats(block_weights),
                           teachers=[t.strip() for t in teachers.split(",") if t.strip()], **settings)  # fmt: skip
    summary = run_distill(config, out, resume=resume, overwrite=overwrite, progress=not quiet)
    if not is_main_process():
        return
    test = summary["test"]
    click.echo(f"{settings['method']} student {settings['student']}: test top-1 {test['top1']:.2f}%  "
               f"NLL {test['nll']:.4f}  -> {out}/student.pt")  # fmt: skip


@main.command()
@click.argument("store", type=click.Path())
@click.option(
    "--fidelity",
    "reference",
    default=None,
    metavar="REFERENCE_STORE",
    help="Also compare this (lossy) store's targets with a lossless store of the same teachers, rows and views: "
    "KL of the soft targets at T=1 and T=4, top-1 agreement, relative L2 error of blocks and maps, change in the "
    "soft-ce block loss. No training, so no seed noise.",
)
def info(store: str, reference: str | None) -> None:
    """Summarise a teacher cache: teachers, accuracy, blocks, shapes, stored bytes and compression.

    With --fidelity REFERENCE_STORE, also how faithfully it reproduces the reference store's targets (e.g. a
    --keep-bits 4 or --quantize 8 store against a float16 one extracted with the same teachers and --seed).
    """
    from meal_cache.store import describe_store, open_store

    click.echo(describe_store(open_store(store)))
    if reference is not None:
        from meal_cache.fidelity import describe_fidelity, store_fidelity

        click.echo(describe_fidelity(store_fidelity(store, reference)))


@main.command()
@click.argument("store", type=click.Path())
@click.option(
    "--repair",
    is_flag=True,
    help="Mark the damaged teacher chunks not done (and the store incomplete), so that running the same "
    "`meal-cache extract` command again re-extracts exactly those.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store: str, repair: bool, quiet: bool) -> None:
    """Check every chunk of a teacher cache: present, and matching its CRC-32C checksum.

    Lists each corrupt or missing chunk by array and chunk index. Exit status 0 when the store is sound,
    1 when something is damaged (with or without --repair: a repaired store still needs the extract run).
    `meal-cache distill` makes the same check on the arrays it reads and refuses a damaged store.
    """
    from meal_cache.store import open_store, repair_store, verify_store

    report = verify_store(open_store(store), progress=not quiet)
    for problem in report.problems:
        click.echo(str(problem))
    pending = f"; {report.chunks_pending} not extracted yet (incomplete store)" if report.chunks_pending else ""
    click.echo(f"{report.chunks_checked} chunks checked, {len(report.problems)} damaged{pending}")
    if report.ok:
        return
    if repair:
        count = repair_store(open_store(store, mode="r+"), report)
        click.echo(f"marked {count} chunk(s) for re-extraction: run the same `meal-cache extract` command to redo them")
    sys.exit(1)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option(
    "--runs",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where run directories go: RUNS/<pipeline name>/.",
)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--allow-cpu",
    is_flag=True,
    help="Run a pipeline marked `gpu = true` (sized for a GPU: cifar10, cifar100, imagenet) on the CPU anyway.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(pipeline_file: str, runs: str, device: str, allow_cpu: bool, quiet: bool) -> None:
    """Run a whole pipeline (teachers, store, students over seeds, report), skipping up-to-date steps.

    A step is skipped when its outputs exist and neither its settings nor its inputs changed, so running the
    same file again only rebuilds the report. A pipeline marked `gpu = true` is refused without a CUDA GPU
    unless --allow-cpu is given.
    """
    from meal_cache.pipeline import load_pipeline, run_pipeline

    run_dir = run_pipeline(load_pipeline(pipeline_file), runs, device=device, progress=not quiet,
                           allow_cpu=allow_cpu)  # fmt: skip
    click.echo(f"report: {run_dir / 'report.md'}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> None:
    """Evaluate a pipeline run and write results.json, report.md and the PNG plots into it."""
    from meal_cache.report import write_report

    click.echo(f"report: {write_report(run_dir)}")


@main.command()
@click.argument("store", type=click.Path())
@click.option(
    "--confidence",
    default=0.5,
    show_default=True,
    type=float,
    help="Flag a row when the ensemble (averaged over all views) gives another class at least this probability.",
)
@click.option(
    "--csv",
    "csv_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the suspect labels (default: STORE's folder, suspects.csv).",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write everything as JSON."
)
@click.option("--scheduler", default="threads", show_default=True, type=click.Choice(["threads", "distributed"]))
@click.option("--address", default=None, help="A dask.distributed scheduler (default: a local cluster).")
def inspect(store: str, confidence: float, csv_out: str | None, json_out: str | None, scheduler: str,
            address: str | None) -> None:  # fmt: skip
    """Teachers and their ensemble, per view and per class, their agreement, and suspect labels (dask)."""
    from meal_cache.analysis import describe_inspection, inspect_store, write_suspects_csv

    result = inspect_store(store, confidence, scheduler, address)
    target = Path(csv_out) if csv_out else Path(store).resolve().parent / "suspects.csv"
    write_suspects_csv(result, target)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(describe_inspection(result))
    click.echo(f"suspects -> {target}")


@main.command()
@click.argument("pattern", required=False)
@click.option("--image-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="The input size at which timm models' blocks are shown.")  # fmt: skip
def models(pattern: str | None, image_size: int) -> None:
    """List the architectures `--arch` accepts, with their blocks. PATTERN ('resnet1*', or 'timm:vit_tiny*' for
    timm's only) lists the matching names, and timm's with their blocks (channels x height x width) at
    --image-size."""
    import fnmatch

    from meal_cache.models import FAMILIES, MODELS, model_names, torchvision_model_names
    from meal_cache.timm_models import PREFIX, describe

    if pattern:
        if not pattern.startswith(PREFIX):
            matches = fnmatch.filter(model_names(), pattern)
            click.echo(f"meal-cache and torchvision networks matching '{pattern}': {', '.join(matches) or 'none'}")
        click.echo("\n".join(describe(pattern.removeprefix(PREFIX), image_size)))
        return
    click.echo("meal-cache networks (cheap on a CPU):")
    for name, entry in sorted(MODELS.items()):
        click.echo(f"  {name:16s} {entry.help}")
    click.echo("torchvision classifiers (small-input stem at <= 64 px; ARCH:WEIGHTS for pretrained):")
    names = torchvision_model_names()
    for start in range(0, len(names), 6):
        click.echo("  " + "  ".join(names[start : start + 6]))
    for prefix, family in FAMILIES.items():
        click.echo(f"{prefix}: {family.help}; `meal-cache models '{prefix}:PATTERN'` lists them with their blocks")


@main.command()
def datasets() -> None:
    """List the datasets `--data` accepts."""
    from meal_cache.data import DATASETS

    for name, entry in sorted(DATASETS.items()):
        click.echo(f"  {name:12s} {entry.help}")
    click.echo(
        "Options after '?', joined by '&' (applied in this order; test labels always stay clean):\n"
        "  folds=K&fold=I      pool train and test, test on stratified fold I of K (fold_seed=S, default 0)\n"
        "  train_fraction=F    keep a stratified, seeded fraction F of the training rows\n"
        "  label_noise=R       change a fraction R of the training labels (seeded) ...\n"
        "  noise=symmetric     ... to a uniformly drawn other class, or noise=pairflip: class c to c+1\n"
        "  noise_seed=S, fraction_seed=S   the seeds of those draws (default 0)\n"
        "e.g. --data 'digits?label_noise=0.4&noise=symmetric'"
    )


if __name__ == "__main__":
    main()
