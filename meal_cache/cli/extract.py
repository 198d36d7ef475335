"""extract: the teachers once over V replayable views, into the Zarr teacher cache."""

from __future__ import annotations

import click

from meal_cache.cli.options import (
    DATA_HELP,
    DECODE_OPTION,
    DEVICE_HELP,
    HelpOnDemand,
    SectionedCommand,
    augmentation_options,
    config_option,
    data_options,
)
from meal_cache.cli.paths import existing_data
from meal_cache.errors import UserError


def parse_sizes(text: str) -> list[int]:
    """``--dense-sizes 256`` or ``256,448`` as whole numbers of pixels."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as err:
        raise UserError(f"--dense-sizes takes pixels as PX or PX,PX (for example 256,448), got {text!r}") from err


def _logits_help() -> str:
    from meal_cache.store.logits import logits_encodings

    return (
        "Lossy: the logits in a compact encoding, "
        + "; ".join(f"{name}:K {encoding.help}" for name, encoding in logits_encodings().items())
        + " (every float16 logit: 2 bytes a class). Default: all (every logit), or the --for method's encoding "
        "where it takes fewer bytes (`meal-cache methods` says which); all keeps every logit there."
    )


# extract --help's sections: option names by heading, in the order shown (the last takes any option not named).
EXTRACT_SECTIONS = {
    "Stage basics": ("config", "teachers", "teacher_dir", "out", "overwrite", "views", "identity_view", "seed",
                     "device"),
    "What is stored": ("preset", "features", "blocks", "grid", "attention_p", "logits", "logits_temperature"),
    "Fewer bytes": ("dtype", "codec", "keep_bits", "quantize", "project", "projection"),
    "Views": ("scale", "ratio", "hflip", "vflip", "policy", "mixup", "cutmix", "mix_prob", "mix_switch_prob"),
    "Data": ("data", "data_root", "download", "image_size", "workers", "decode", "split"),
    "Advanced": ("divergent_views", "divergent_eps", "divergent_steps", "dense", "dense_sizes", "dense_grid",
                 "batch_size", "rows_per_chunk", "shard_chunks", "quiet"),
}  # fmt: skip


@click.command(cls=SectionedCommand, sections=EXTRACT_SECTIONS)
@config_option('teachers = ["resnet", "densenet"] and views = 8')
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
    callback=existing_data,
    is_eager=True,
    help=DATA_HELP,
)
@data_options
@DECODE_OPTION
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
    "fresh augmentation every epoch (docs/decisions.md, the views curve); run pipelines/digits-views.toml's "
    "protocol on your data before spending bytes on more.",
)
@click.option("--identity-view", is_flag=True, help="Also cache the un-augmented view (for evaluation and inspect).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the views' augmentation parameters.")
@augmentation_options
@click.option(
    "--policy",
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
    help="Divergent views: add K views a row made by a PGD search (gradient ascent) on the fixed teachers' "
    "disagreement (Jensen-Shannon at T=1) from the un-augmented image, within --divergent-eps; their uint8 pixels "
    "are stored beside the teachers' outputs on them, and distill mixes them in (--divergent-ratio). Needs two "
    "teachers.",
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
    "--dense",
    is_flag=True,
    default=False,
    help="A dense store: each teacher runs once per image, on the whole image, and the store keeps its logit map "
    "(the classifier at each position of its last block, ReLabel's rule) and its blocks on a --dense-grid grid; "
    "distill then draws a fresh crop and flip per row and epoch and derives that crop's targets by RoIAlign over "
    "the maps: unlimited views for one teacher pass. Logits and pooled blocks only (kd, meal, meal-v2, fitnet, "
    "dkd); no --mixup/--cutmix, --policy or divergent views. --views is not used. docs/design.md, 'Dense stores'.",
)
@click.option(
    "--dense-sizes",
    default=None,
    metavar="PX[,PX]",
    help="With --dense: the size(s) the teacher sees the whole image at, squashed to a square; a second size runs "
    "the same pixels resampled and averages the maps (a second scale). Default: the data's own size for in-memory "
    "data, 256 for image folders at 224 px.",
)
@click.option(
    "--dense-grid",
    default=4,
    show_default=True,
    type=int,
    metavar="G",
    help="With --dense: each block's whole-image output is stored average-pooled to G x G (or its own size where "
    "smaller); a crop's block target is its box of that grid.",
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
    help="What to store per block, comma-separated: blocks (pooled channels, what meal reads by default), maps "
    "(the signed channel-mean map, MEAL's reference representation, what afd reads), attention (the channel mean "
    "of |A|^p, AT's attention map, what at reads).",
)
@click.option(
    "--attention-p",
    type=float,
    default=None,
    metavar="P",
    help="The power p of the stored attention maps, the mean over channels of |A|^p (with --features attention "
    "or --for at). Default: 2, the paper's.",
)
@click.option(
    "--for",
    "preset",
    default=None,
    help="Store only what one method reads (`meal-cache methods` says what each reads; meal: logits + the last 3 "
    "blocks' pooled channels, 8-bit unless --quantize none; at: logits + the last 3 blocks' attention maps, "
    "8-bit), or all (the default layout, as without --for). Replaces --features and --blocks.",
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
    help="Lossy: store blocks, maps and attention maps as 8-bit codes, each row scaled to its own range (logits "
    "stay as --dtype). Default: lossless, except 8 with --for meal, fitnet and at; 'none' keeps them lossless.",
)
@click.option("--logits", cls=HelpOnDemand, help_from=_logits_help, default=None, metavar="all|NAME:K")
@click.option(
    "--logits-temperature",
    type=float,
    default=None,
    metavar="T",
    help="The temperature compact --logits are made at (topk is exact at it, sample draws at it): distill's "
    "--temperature (sampled stores refuse another one). Default: 4, the soft labels' default.",
)
@click.option(
    "--project",
    type=int,
    default=None,
    metavar="D",
    help="Lossy: store each pooled block wider than D channels as D numbers, its channels times a matrix with "
    "orthogonal columns (--projection; the matrix is stored with the blocks). distill's adapters map the "
    "student to D; `info --fidelity` reports the share of variance kept and the distance error. "
    "Default: every channel.",
)
@click.option(
    "--projection",
    type=click.Choice(["pca", "random"]),
    default="pca",
    show_default=True,
    help="--project's matrix: pca, each block's top D principal directions fitted on the first rows of view 1 "
    "(keeps the most variance); random, a seeded random orthogonal matrix scaled to keep distances in "
    "expectation, whatever the data.",
)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option(
    "--rows-per-chunk",
    default=512,
    show_default=True,
    type=int,
    help="Rows in one Zarr chunk (the unit of writing and of resuming).",
)
@click.option(
    "--shard-chunks",
    default=1,
    show_default=True,
    type=int,
    metavar="K",
    help="Zarr sharding: K chunks of rows of a view in one object (K times fewer objects for object storage); a "
    "shard is then the unit of writing and of resuming. 1: one object a chunk.",
)
@click.option("--teacher-dir", default="teachers", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--out",
    default="feats.zarr",
    show_default=True,
    type=click.Path(),
    help="The store to write (a store of other settings there is refused unless --overwrite).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store extracted with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract(teachers: str, grid: str, features: str, out: str, overwrite: bool, quiet: bool, dense_sizes: str | None,
            **settings) -> None:  # fmt: skip
    """Run every teacher once over V replayable views and write the Zarr teacher cache.

    Each teacher sees exactly the images distill will replay (the views' crop and flip parameters are stored),
    in eval mode. Per teacher, view and chunk of rows the store keeps the logits, every block's pooled output
    and its channel-mean map. An interrupted extract, run again with the same arguments, resumes.
    """
    from meal_cache.engine.distributed import is_main_process
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract as run_extract
    from meal_cache.store.describe import describe_store

    config = ExtractConfig(
        teachers=[t.strip() for t in teachers.split(",") if t.strip()],
        grid=int(grid),
        features=[f.strip() for f in features.split(",") if f.strip()],
        dense_sizes=None if dense_sizes is None else parse_sizes(dense_sizes),
        **settings,
    )
    store = run_extract(config, out, overwrite=overwrite, progress=not quiet)
    if is_main_process():
        click.echo(describe_store(store))
