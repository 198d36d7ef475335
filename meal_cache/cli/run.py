"""run and report: a whole pipeline, and its report."""

from __future__ import annotations

import click

from meal_cache.cli.options import DEVICE_HELP


@click.command()
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False))
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

    PIPELINE is a pipeline file, or the name of one that ships with meal-cache (`meal-cache run digits`; an
    unknown name lists them).

    A step is skipped when its outputs exist and neither its settings nor its inputs changed, so running the
    same file again only rebuilds the report. A pipeline marked `gpu = true` is refused without a CUDA GPU
    unless --allow-cpu is given.
    """
    from meal_cache.pipeline.config import resolve_pipeline
    from meal_cache.pipeline.run import load_pipeline, run_pipeline

    run_dir = run_pipeline(load_pipeline(resolve_pipeline(pipeline_file)), runs, device=device, progress=not quiet,
                           allow_cpu=allow_cpu)  # fmt: skip
    click.echo(f"report: {run_dir / 'report.md'}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> None:
    """Evaluate a pipeline run and write results.json, report.md and the PNG plots into it."""
    from meal_cache.pipeline.report import write_report

    click.echo(f"report: {write_report(run_dir)}")
