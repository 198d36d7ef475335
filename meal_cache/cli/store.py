"""info, verify and inspect: what a teacher cache holds, whether it is sound, what its teachers say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from meal_cache.cli.paths import existing_store


@click.command()
@click.argument("store", type=click.Path(), callback=existing_store, is_eager=True)
@click.option(
    "--fidelity",
    "reference",
    default=None,
    callback=existing_store,
    is_eager=True,
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
    from meal_cache.store.describe import describe_store
    from meal_cache.store.teacher_store import open_store

    click.echo(describe_store(open_store(store)))
    if reference is not None:
        from meal_cache.fidelity import describe_fidelity, store_fidelity

        click.echo(describe_fidelity(store_fidelity(store, reference)))


@click.command()
@click.argument("store", type=click.Path(), callback=existing_store, is_eager=True)
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
    from meal_cache.engine.progress import progress_bar
    from meal_cache.store.teacher_store import open_store
    from meal_cache.store.verify import repair_store, verify_store

    report = verify_store(open_store(store), progress=None if quiet else progress_bar)
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


@click.command()
@click.argument("store", type=click.Path(), callback=existing_store, is_eager=True)
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
    help="Write every suspect label to this CSV file (row, file where the data has files, label and the "
    "teachers' class with their names, confidence). Default: nothing is written.",
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
    if csv_out:
        write_suspects_csv(result, csv_out)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(describe_inspection(result))
    if csv_out:
        click.echo(f"suspects -> {csv_out}")
