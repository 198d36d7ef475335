"""The ``meal-cache`` command line: thin click wrappers over the library's functions.

This module holds the group, ``main`` (the console script); the commands live in the modules beside it, by
concern, and are attached to the group below.
"""

from __future__ import annotations

import os
import sys

import click

from meal_cache.errors import UserError


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
