"""The ``meal-cache`` command line: thin click wrappers over the library's functions.

This module holds the group, ``main`` (the console script); the commands live in the modules beside it, by
concern, and are attached to the group below.
"""

from __future__ import annotations

import os
import sys

import click

from meal_cache.errors import UserError

# What a command interrupted by Ctrl-C says about picking up where it stopped.
RESUME_HINTS = {
    "extract": "run the same command again to resume: the chunks already written are kept",
    "train": "run the same command with --resume to continue from the last finished epoch",
    "distill": "run the same command with --resume to continue from the last finished epoch",
    "run": "run the same command again: the steps already done are skipped",
}
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT


class Interrupted(Exception):
    """Ctrl-C during a command, carrying the command's name so the hint can name how to resume it."""

    def __init__(self, command: str | None) -> None:
        super().__init__(command)
        self.command = command


def close_progress_bars() -> None:
    """Close the progress bars a failure left open, so the message that follows starts a line of its own instead
    of being glued to a half-drawn bar: a terminal sees the bar erased; a log file, where the bar's carriage
    returns do not erase anything, gets a line break after it."""
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    if bars and not sys.stderr.isatty():
        sys.stderr.write("\n")


def _in_the_options_words(command: click.Command | None, err: click.BadOptionUsage) -> click.UsageError:
    """click's "Option '--scale' requires 2 arguments." in the words of the option's type where it has some
    (:class:`~meal_cache.cli.options.NumberPair`: "--scale takes two numbers, MIN MAX"), else as click put it."""
    for param in getattr(command, "params", ()):
        if err.option_name in param.opts and hasattr(param.type, "usage"):
            return click.UsageError(param.type.usage(err.option_name))
    return err


class MealCacheGroup(click.Group):
    """Turns a user's mistake into one ``Error:`` line and exit status 2, never a traceback: the library's
    UserError, and click's own usage errors (which click would print under a usage banner). Ctrl-C ends with one
    line saying how to resume the interrupted command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise click.UsageError(str(err)) from err
        except click.BadOptionUsage as err:
            raise _in_the_options_words(self.get_command(ctx, ctx.invoked_subcommand or ""), err) from None
        except KeyboardInterrupt:
            raise Interrupted(ctx.invoked_subcommand) from None

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except (Interrupted, click.exceptions.Abort) as err:
            close_progress_bars()
            hint = RESUME_HINTS.get(getattr(err, "command", None) or "")
            click.echo("Interrupted." + (f" {hint[0].upper()}{hint[1:]}." if hint else ""), err=True)
            sys.exit(INTERRUPTED_STATUS)
        except click.ClickException as err:
            close_progress_bars()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Under torchrun: one line from rank 0, not one per rank, and the same exit status on every rank.
                from meal_cache.engine.distributed import exit_with_user_error

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
      meal-cache extract --teachers resnet,densenet --data digits          (writes feats.zarr)
      meal-cache distill --store feats.zarr --student resnet8_w4 --method kd   (writes runs/feats-kd/)
      meal-cache evaluate runs/feats-kd/student.pt

    `meal-cache models` and `meal-cache datasets` list the names these commands accept.
    """


# The command modules import only cli.options, never this module, so they can be imported after main: no circle.
from meal_cache.cli import distill, extract, listing, run, store, train  # noqa: E402

# Registration order is that of the former single module; `meal-cache --help` lists them sorted by name anyway.
for _command in (
    train.train,
    train.evaluate,
    extract.extract,
    distill.distill,
    store.info,
    store.verify,
    run.run,
    run.report,
    store.inspect,
    listing.models,
    listing.datasets,
    listing.methods,
):
    main.add_command(_command)
del _command
