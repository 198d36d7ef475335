"""train and evaluate: a network with cross-entropy, and a checkpoint's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meal_cache.cli.options import (
    DATA_HELP,
    DECODE_OPTION,
    DEVICE_HELP,
    TENSORBOARD_OPTION,
    SectionedCommand,
    augmentation_options,
    config_option,
    data_options,
    optimization_options,
)
from meal_cache.cli.paths import existing_checkpoint, existing_data, existing_store

# train --help's sections: option names by heading, in the order shown (the last takes any option not named).
TRAIN_SECTIONS = {
    "Stage basics": ("config", "arch", "out", "resume", "overwrite", "seed", "device"),
    "Schedule": ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs",
                 "eval_every", "label_smoothing"),
    "Augmentation": ("scale", "ratio", "hflip", "vflip"),
    "Data": ("data", "data_root", "download", "image_size", "workers", "decode"),
    "Advanced": ("quiet", "tensorboard"),
}  # fmt: skip


@click.command(cls=SectionedCommand, sections=TRAIN_SECTIONS)
@config_option('arch = "resnet20" and epochs = 15')
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
    callback=existing_data,
    is_eager=True,
    help=DATA_HELP,
)
@data_options
@DECODE_OPTION
@optimization_options
@click.option("--label-smoothing", default=0.0, show_default=True, type=float)
@augmentation_options
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write, e.g. teachers/resnet.pt."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from --out; a finished one is left as it is.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@TENSORBOARD_OPTION
def train(out: str, resume: bool, overwrite: bool, quiet: bool, tensorboard: bool, **settings) -> None:
    """Train a network with cross-entropy: a teacher, or the student-alone baseline.

    Random crop with padding (and flip for natural images; random-resized crops for image folders; --scale,
    --ratio, --hflip and --vflip change them, as timm's train.py names them), SGD with Nesterov momentum
    (--no-nesterov: plain), warm-up then the schedule, evaluation on the test split after every epoch. The
    checkpoint records the architecture, classes, input size and normalisation, the data's fingerprint, the test
    accuracy and the full config; it loads with torch.load(weights_only=True).
    """
    from meal_cache.engine.loop import check_tensorboard
    from meal_cache.engine.train import TrainConfig, train_supervised

    if tensorboard:
        check_tensorboard()  # before anything is written
    payload = train_supervised(TrainConfig(**settings), out, resume=resume, overwrite=overwrite, progress=not quiet,
                               tensorboard=tensorboard)  # fmt: skip
    test = payload["metrics"]["test"]
    click.echo(
        f"{settings['arch']} on {settings['data']}: test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%  -> {out}"
    )


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False), callback=existing_checkpoint, is_eager=True)
@click.option(
    "--data",
    default=None,
    callback=existing_data,
    is_eager=True,
    help="Dataset to evaluate on (default: the one the checkpoint was trained on).",
)
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
    "--teachers",
    default="",
    help="Comma-separated teachers, named as extract names them (a .pt path, NAME for TEACHER_DIR/NAME.pt, or "
    "ARCH:WEIGHTS): adds fidelity and KL to their ensemble.",
)
@click.option("--teacher-dir", default="teachers", show_default=True, help="Where --teachers' NAMEs are.")
@click.option(
    "--store",
    default=None,
    type=click.Path(),
    callback=existing_store,
    is_eager=True,
    help="Instead of --teachers: a teacher cache of the evaluated split with an identity view (extract --split "
    "test --views 0 --identity-view) whose cached logits give the ensemble.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
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
    teacher_dir: str,
    store: str | None,
    quiet: bool,
) -> None:
    """Top-1, top-5, negative log-likelihood and calibration error (ECE) of a checkpoint, and with --teachers (or
    --store) its fidelity to the teachers' ensemble and KL divergence from it; printed and written as JSON."""
    from meal_cache.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint, data=data, data_root=data_root, download=download, image_size=image_size, split=split,
        device=device, teachers=[t.strip() for t in teachers.split(",") if t.strip()], store=store, workers=workers,
        progress=not quiet, teacher_dir=teacher_dir,
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
