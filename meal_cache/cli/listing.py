"""models, datasets and methods: the names `--arch`, `--data` and `--method` accept."""

from __future__ import annotations

import click

# Above this many matches, a pattern lists the rest by name (each listed network is built, on the meta device).
MAX_DESCRIBED = 30


@click.command()
@click.argument("pattern", required=False)
@click.option("--image-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="The input size at which the blocks are shown.")  # fmt: skip
def models(pattern: str | None, image_size: int) -> None:
    """List the architectures `--arch` accepts, meal-cache's with their blocks (channels x height x width at
    --image-size: what extract stores and distill matches). PATTERN ('resnet1*', or 'timm:vit_tiny*' for timm's
    only) lists the matching names with their blocks."""
    import fnmatch

    from meal_cache.nets.models import FAMILIES, MODELS, block_summary, model_names, torchvision_model_names
    from meal_cache.nets.timm_models import PREFIX, describe

    if pattern:
        matches = [] if pattern.startswith(PREFIX) else fnmatch.filter(model_names(), pattern)
        if not pattern.startswith(PREFIX):
            click.echo(f"meal-cache and torchvision networks matching '{pattern}', blocks at {image_size} px:"
                       + ("" if matches else " none"))  # fmt: skip
            for name in matches[:MAX_DESCRIBED]:
                click.echo(f"  {name:16s} {block_summary(name, image_size)}")
            if len(matches) > MAX_DESCRIBED:
                click.echo(f"  (and {', '.join(matches[MAX_DESCRIBED:])}: narrow the pattern for their blocks)")
        timm_lines = describe(pattern.removeprefix(PREFIX), image_size)
        # A plain pattern that named meal-cache or torchvision networks needs no "no timm model matches" line.
        if pattern.startswith(PREFIX) or not matches or not timm_lines[0].startswith("no timm model matches"):
            click.echo("\n".join(timm_lines))
        return
    click.echo(f"meal-cache networks (cheap on a CPU), blocks at {image_size} px:")
    for name, entry in sorted(MODELS.items()):
        click.echo(f"  {name:16s} {entry.help}\n  {'':16s}   {block_summary(name, image_size)}")
    click.echo("torchvision classifiers (small-input stem at <= 64 px; ARCH:WEIGHTS for pretrained; "
               "`meal-cache models 'PATTERN'` shows their blocks):")  # fmt: skip
    names = torchvision_model_names()
    for start in range(0, len(names), 6):
        click.echo("  " + "  ".join(names[start : start + 6]))
    for prefix, family in FAMILIES.items():
        click.echo(f"{prefix}: {family.help}; `meal-cache models '{prefix}:PATTERN'` lists them with their blocks")


@click.command()
def datasets() -> None:
    """List the datasets `--data` accepts."""
    from meal_cache.data.registry import dataset_sources

    for name, source in sorted(dataset_sources().items()):
        click.echo(f"  {name:12s} {source.help}")
    click.echo(
        "Options after '?', joined by '&' (applied in this order; test labels always stay clean):\n"
        "  folds=K&fold=I      pool train and test, test on stratified fold I of K (fold_seed=S, default 0)\n"
        "  train_fraction=F    keep a stratified, seeded fraction F of the training rows\n"
        "  label_noise=R       change a fraction R of the training labels (seeded) ...\n"
        "  noise=symmetric     ... to a uniformly drawn other class, or noise=pairflip: class c to c+1\n"
        "  noise_seed=S, fraction_seed=S   the seeds of those draws (default 0)\n"
        "  glyphs=1            glyph-like images (digits, letters, text): views never flip unless --hflip/--vflip "
        "say so\n"
        "e.g. --data 'digits?label_noise=0.4&noise=symmetric'"
    )


@click.command()
def methods() -> None:
    """List the distillation methods (plug-ins included): what each reads from a store (`extract --for NAME`),
    the settings it fills in, and its own options (`distill --method-option NAME=VALUE`) with their defaults."""
    import dataclasses

    from meal_cache.distill import available_methods

    for name, cls in available_methods().items():
        click.echo(f"{name}: {cls.help}")
        click.echo(f"    reads: {cls.store_needs.help} (extract --for {name})")
        fills = {**cls.settings, "teacher_selection": cls.selection, "temperature": cls.temperature}
        click.echo("    defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in fills.items()))
        options = [f"{f.name}={f.default if f.default_factory is dataclasses.MISSING else f.default_factory()}"
                   for f in dataclasses.fields(cls.Options)]  # fmt: skip
        if options:
            click.echo(f"    options: {', '.join(options)}")
        if cls.__module__.split(".")[0] != "meal_cache":
            click.echo(f"    from: {cls.__module__} (plug-in)")
