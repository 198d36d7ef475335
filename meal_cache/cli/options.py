"""Options and help texts that several commands share, so each reads the same everywhere."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from meal_cache.cli.paths import check_config_file_exists
from meal_cache.errors import closest_choice

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
DATA_HELP = (
    "Dataset: digits, digit-pairs[:N] (100 classes), cifar10, cifar100, svhn, imagefolder:PATH, npz:PATH or "
    "fake[:N], optionally with "
    "?label_noise=R&noise=symmetric|pairflip&train_fraction=F&folds=K&fold=I (folds: test on fold I of a "
    "stratified K-fold re-split of all rows), glyphs=1 (never mirror: digits, letters, text; see "
    "`meal-cache datasets`)."
)


class SuggestingChoice(click.Choice):
    """click's Choice, whose refusal also names the closest choice: "'mael' is not one of 'acn', ...; did you mean
    'meal'?"."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            close = closest_choice(str(value), [str(choice) for choice in self.choices])
            if close is not None:
                err.message = f"{err.message.rstrip('.')}; did you mean '{close}'?"
            raise


class HelpOnDemand(click.Option):
    """An option whose help is written by ``help_from`` when ``--help`` is shown, for help that names a registry's
    entries: a command that only runs then imports nothing to start."""

    def __init__(self, *args, help_from: Callable[[], str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help_from = help_from

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self.help_from()
        return super().get_help_record(ctx)


class NumberPair(click.ParamType):
    """Two numbers, MIN MAX (``--scale 0.08 1``). click reads the two words after the option whatever they are, so
    ``--scale 0.5 --out x`` would take ``--out`` as MAX: refused saying what the option takes, as is a pair cut
    short at the end of the line (:meth:`usage`, which the group's error handling asks for)."""

    name = "MIN MAX"
    is_composite = True
    arity = 2

    def usage(self, option: str) -> str:
        return f"{option} takes two numbers, MIN MAX"

    def convert(self, value, param, ctx):
        try:
            return tuple(float(number) for number in value)
        except (TypeError, ValueError):
            option = param.opts[0] if param is not None else "the option"
            raise click.UsageError(f"{self.usage(option)}, got '{' '.join(map(str, value))}'", ctx) from None


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

TENSORBOARD_OPTION = click.option(
    "--tensorboard",
    is_flag=True,
    help="Also write each epoch's record (every loss, accuracy, discriminator accuracy, learning rate) as "
    "TensorBoard scalars: distill into OUT/tensorboard/, train into tensorboard/NAME/ beside the checkpoint. "
    "Needs pip install 'meal-cache[tensorboard]'. Not a setting of the run: --resume works with or without it.",
)

DECODE_OPTION = click.option(
    "--decode",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where image files' JPEGs are decoded: cpu (in the --workers processes), cuda (the workers read the "
    "bytes, the GPU decodes each batch with nvjpeg; other formats stay on the CPU) or auto (cuda on a GPU when "
    "every file is a .jpg/.jpeg, else cpu). Not recorded: it changes pixels by a few levels at most.",
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


def augmentation_options(func):
    """timm's train.py augmentation knobs, shared by train and extract; unset, each keeps the data's recipe's own
    value. Values are checked by the library (one Error: line for a bad one), so the types here are plain."""
    options = [
        click.option("--scale", type=NumberPair(), nargs=2, default=None, metavar="MIN MAX",
                     help="Random-resized crop's share of the image's area, 0 < MIN <= MAX <= 1. Default: the "
                     "data's (image folders 0.08 1, in-memory images above 64 px 0.25 1; smaller in-memory images "
                     "crop with padding, and --scale or --ratio turns that into a random-resized crop)."),
        click.option("--ratio", type=NumberPair(), nargs=2, default=None, metavar="MIN MAX",
                     help="Random-resized crop's aspect ratio (width / height), 0 < MIN <= MAX. Default: 0.75 1.333."),
        click.option("--hflip", type=float, default=None, metavar="P",
                     help="Chance a view is mirrored left-right, 0 to 1 (0: never). Default: 0.5, or 0 for digits, "
                     "SVHN, grey-scale npz and ?glyphs=1 data."),
        click.option("--vflip", type=float, default=None, metavar="P",
                     help="Chance a view is mirrored top to bottom, 0 to 1. Default: 0 (never)."),
    ]  # fmt: skip
    return _with_options(func, options)


def optimization_options(func):
    """Epochs, batch and SGD schedule, shared by train and distill (the defaults of TrainConfig/DistillConfig)."""
    options = [
        click.option("--epochs", default=30, show_default=True, type=int,
                     help="Epochs (distill's epoch e replays cached view e mod V)."),
        click.option("--batch-size", default=64, show_default=True, type=int),
        click.option("--lr", default=0.05, show_default=True, type=float, help="Peak learning rate of SGD."),
        click.option("--momentum", default=0.9, show_default=True, type=float),
        click.option("--nesterov/--no-nesterov", default=True, show_default=True,
                     help="Nesterov momentum (MEAL's reference code uses plain momentum: --preset reference turns "
                     "it off)."),
        click.option("--weight-decay", default=5e-4, show_default=True, type=float),
        click.option("--schedule", default="cosine", show_default=True,
                     type=click.Choice(["cosine", "step", "constant"]),
                     help="After the warm-up: cosine to zero, steps of 10x at 50% and 75%, or constant."),
        click.option("--warmup-epochs", default=1.0, show_default=True, type=float),
        click.option("--eval-every", default=1, show_default=True, type=int, metavar="N",
                     help="Evaluate on the test split after every N-th epoch and after the last; the other epochs' "
                     "records carry no test metrics. Recorded: --resume needs the same N."),
    ]  # fmt: skip
    return _with_options(func, options)


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options in sections (``sections``: heading -> option names, in the
    order shown); an option no section names, ``--help`` among them, is listed in the last one, so an option added
    later is shown even before it is placed."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        options = {param.name: param for param in self.get_params(ctx) if isinstance(param, click.Option)}
        placed = {name for names in self.sections.values() for name in names}
        headings = list(self.sections)
        for heading in headings:
            names = [name for name in self.sections[heading] if name in options]
            if heading == headings[-1]:
                names += [name for name in options if name not in placed]
            records = [record for name in names if (record := options[name].get_help_record(ctx)) is not None]
            if records:
                with formatter.section(heading):
                    formatter.write_dl(records)


# A --config file's value in the form its option takes on the command line, where the two differ: a pipeline
# step's tables and empty lists; any other list becomes comma-separated words, a number for a choice its word.
_CLI_FORMS: dict[str, Callable[[object], object]] = {
    "method_options": lambda table: tuple(f"{name}={json.dumps(value)}" for name, value in table.items()),
    "quantize": lambda bits: "none" if bits == 0 else str(bits),
    "discriminators": lambda names: ",".join(names) or "none",
}


def _cli_value(option: click.Parameter, value: object) -> object:
    if option.name in _CLI_FORMS:
        return _CLI_FORMS[option.name](value)
    if isinstance(value, list) and option.nargs == 1 and not option.multiple:
        return ",".join(str(item) for item in value)
    if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(option.type, click.Choice):
        return str(value)
    return value


def _read_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: the file's settings become the command's defaults (click's ``default_map``), so an
    option on the command line beats the file and the file beats the defaults; read before the other options
    (the option is eager), checked as a pipeline's step is."""
    if value is None:
        return None
    check_config_file_exists(value)
    from meal_cache.pipeline.config import load_step_file

    settings = load_step_file(value, ctx.command.name)
    options = {option.name: option for option in ctx.command.params}
    ctx.default_map = {**(ctx.default_map or {}),
                       **{name: _cli_value(options[name], item) for name, item in settings.items()}}  # fmt: skip
    return value


def config_option(example: str) -> Callable:
    """``--config FILE`` of a stage command; ``example``: two of its settings as a file writes them."""
    return click.option(
        "--config",
        default=None,
        metavar="FILE",
        is_eager=True,
        expose_value=False,
        callback=_read_config_file,
        help="A TOML file of this command's settings, named and typed as a pipeline's step takes them, at the top "
        f"level (no header), e.g. {example}. Options on the command line win over the file, the file over the "
        "defaults.",
    )
