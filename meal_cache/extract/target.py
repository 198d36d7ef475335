"""The store an extract writes, created or taken up again: its views drawn one at a time, its dataset and views
described, its layout; an existing store of other settings refused by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meal_cache.data.datasets import ImageDataset
from meal_cache.data.source import used_decode
from meal_cache.dense import whole_image
from meal_cache.errors import SettingsMismatch, UnreadableFormat, UserError, settings_difference
from meal_cache.store.create import store_exists
from meal_cache.store.growth import grows_by_teachers, grows_by_views
from meal_cache.store.origins import record_origins
from meal_cache.store.schema import StoreLayout
from meal_cache.store.teacher_store import TeacherStore, create_store, open_store
from meal_cache.views import augment

if TYPE_CHECKING:
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.nets.teachers import Teacher

# What a store records of its dataset's description (the decoder only for image files: another decoder build may
# differ by a few levels per pixel).
STORE_DATASET_KEYS = ("spec", "kind", "options", "num_classes", "classes", "image_size", "mean", "std", "recipe",
                      "source", "decoder")  # fmt: skip


class DrawnViews(Sequence):
    """A store's views, each drawn (from its own seeded generator) when asked for, so creating a store of many
    views holds one view's parameters at a time."""

    def __init__(self, count: int, draw: Callable[[int], augment.ViewParams]) -> None:
        self.count, self.draw = count, draw

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, view: int) -> augment.ViewParams:
        if not 0 <= view < self.count:
            raise IndexError(view)
        return self.draw(view)


def open_or_create(
    config: ExtractConfig,
    out: str | Path,
    dataset: ImageDataset,
    teachers: list[Teacher],
    settings: dict,
    overwrite: bool,
    device: torch.device,
) -> TeacherStore:
    """The store at ``out``: an existing one of the same settings (to resume), else a new one with its views
    drawn and its dataset and views described; an existing one of other settings is refused unless
    ``overwrite``."""
    if store_exists(out) and not overwrite:
        return _existing(config, out, dataset, teachers, settings)
    recipe = dataset.view_recipe(config.augment_options())
    split = dataset.split(config.split)
    n = len(split)
    sizes = split.source_sizes(config.workers)
    policy = augment.policy_for(config.policy, recipe.name)
    mixing = config.mixing()
    draw = _view_drawer(config, dataset, sizes)
    search = config.divergent_search()
    dense = config.dense_settings(dataset.image_size, dataset.streamed)
    if dense is not None:  # one view: the whole image, which the teachers see at the dense size
        views = DrawnViews(1, lambda view: whole_image(sizes))
    else:
        views = DrawnViews(config.views + int(config.identity_view) + config.divergent_views, draw)
    dataset_attrs = _dataset_attrs(config, dataset, split, device)
    views_info = _views_info(config, dataset, recipe, len(views), dense is not None, policy, mixing, search)
    layout = StoreLayout(config.rows_per_chunk, config.dtype, config.codec, tuple(config.features), config.keep_bits,
                         config.quantize, config.logits_choice(), config.logits_temperature,
                         None if dense is None else dense.to_json(), config.attention_p,
                         None if config.shard_chunks == 1 else config.shard_chunks)  # fmt: skip
    return create_store(
        out,
        dataset=dataset_attrs,
        labels=split.labels,
        views=views,
        views_info=views_info,
        source_sizes=sizes if dataset.streamed else None,
        divergent_pixels=None if search is None else (search.views, n, 3, dataset.image_size, dataset.image_size),
        teachers=[t.spec for t in teachers],
        layout=layout,
        settings=settings,
    )


def _view_drawer(config: ExtractConfig, dataset: ImageDataset,
                 sizes: torch.Tensor | None) -> Callable[[int], augment.ViewParams]:  # fmt: skip
    """View ``view``'s parameters of every row, drawn from the seed and the view's index alone (so a view is the
    same whichever extract draws it)."""
    recipe = dataset.view_recipe(config.augment_options())
    policy = augment.policy_for(config.policy, recipe.name)
    mixing = config.mixing()

    def draw(view: int) -> augment.ViewParams:
        # Past the augmented views: the identity view, then the divergent views, which start from the
        # un-augmented image (their crops say so, their pixels are stored).
        if view >= config.views:
            return augment.identity(sizes, recipe, policy, mixing)
        generator = augment.view_generator(config.seed, view)
        return augment.draw(recipe, sizes, generator, policy, mixing, dataset.image_size)

    return draw


def _existing(config: ExtractConfig, out: str | Path, dataset: ImageDataset, teachers: list[Teacher],
              settings: dict) -> TeacherStore:  # fmt: skip
    """The store at ``out`` to resume, or grown by the teachers or augmented views it lacks where that is the only
    difference; anything else is refused by name."""
    try:
        existing = open_store(out, mode="r+")
    except UnreadableFormat:
        raise
    except UserError as err:
        raise UserError(f"'{out}' exists and is not a meal-cache store; pass --overwrite to replace it") from err
    recorded = existing.attrs.get("settings")
    if recorded == settings:  # a resume: of a growth too, which a kill may have left unrecorded in its origins
        record_origins(existing.group, existing.teacher_names, existing.num_views)
        return existing
    added = [t.spec for t in teachers if t.spec.key not in existing.teacher_names]
    if added and grows_by_teachers(recorded, settings):
        return _grown_by_teachers(existing, out, added, settings)
    if grows_by_views(recorded, settings):
        return _grown_by_views(existing, out, config, dataset, settings)
    # Teachers and views added at once: the teachers first (over the stored views), then the views (for every
    # teacher), each step recorded in the store's settings before any unit runs, so a kill between them resumes
    # into the second.
    teachers_first = {**settings, "views": recorded.get("views")} if isinstance(recorded, dict) else None
    if (
        added
        and teachers_first is not None
        and grows_by_teachers(recorded, teachers_first)
        and grows_by_views(teachers_first, settings)
    ):
        _refuse_more_views(existing, out)
        _grown_by_teachers(existing, out, added, teachers_first)
        return _grown_by_views(existing, out, config, dataset, settings)
    difference = settings_difference(recorded, settings)
    raise SettingsMismatch(
        f"'{out}' was extracted with other settings ({difference}); "
        "pass --overwrite to replace it, or choose another --out"
    )


def _grown_by_teachers(existing: TeacherStore, out: str | Path, added: list, settings: dict) -> TeacherStore:
    if existing.divergent_views:
        raise UserError(f"'{out}' holds divergent views, searched for on its teachers' disagreement, which "
                        f"another teacher would change: extract the teachers together into a new --out (or "
                        "--overwrite)")  # fmt: skip
    existing.add_teachers(added, settings)
    record_origins(existing.group, existing.teacher_names, existing.num_views)
    return existing


def _refuse_more_views(existing: TeacherStore, out: str | Path) -> None:
    if existing.identity_view is not None or existing.divergent_views or existing.dense:
        raise UserError(f"'{out}' holds an identity, divergent or dense view after its augmented ones, which more "
                        "augmented views would move: extract the store again with every view (a new --out, or "
                        "--overwrite)")  # fmt: skip


def _grown_by_views(existing: TeacherStore, out: str | Path, config: ExtractConfig, dataset: ImageDataset,
                    settings: dict) -> TeacherStore:  # fmt: skip
    _refuse_more_views(existing, out)
    sizes = dataset.split(config.split).source_sizes(config.workers)
    draw = _view_drawer(config, dataset, sizes)
    recipe = dataset.view_recipe(config.augment_options())
    views_info = _views_info(config, dataset, recipe, config.views, False,
                             augment.policy_for(config.policy, recipe.name), config.mixing(), None)  # fmt: skip
    existing.add_views([draw(view) for view in range(existing.num_views, config.views)], settings, views_info)
    record_origins(existing.group, existing.teacher_names, existing.num_views)
    return existing


def _dataset_attrs(config: ExtractConfig, dataset: ImageDataset, split, device: torch.device) -> dict:
    """What the store records of its dataset: the description's keys, the split, its rows and fingerprint, and
    for image files which decoder made the teachers' pixels (distill's ``--decode auto`` follows it)."""
    description = dataset.describe()
    attrs = {
        **{key: description[key] for key in STORE_DATASET_KEYS if key in description},
        "split": config.split,
        "n": len(split),
        "fingerprint": description["fingerprint"][config.split],
    }
    if dataset.streamed:
        attrs["decode"] = used_decode(config.decode, device, split.files)
    return attrs


def _views_info(config: ExtractConfig, dataset: ImageDataset, recipe: augment.Recipe, count: int, dense: bool,
                policy: augment.Policy | None, mixing, search) -> dict:  # fmt: skip
    """What the store records of its views: how many, which, drawn how (recipe, policy, mixing, divergent search)
    and from which seed."""
    info = {
        "count": count,
        "augmented": 0 if dense else config.views,
        "identity": config.identity_view,
        "recipe": recipe.name,
        "seed": config.seed,
    }
    if recipe != augment.recipe_for(dataset.recipe, dataset.image_size):
        # Only where the options (or ?glyphs=1) changed the data's recipe, so other stores' attributes stay as
        # they were; a store without it was drawn with its recipe's own values (TeacherStore.view_recipe).
        info["augmentation"] = recipe.to_json()
    if policy is not None:
        info["policy"] = policy.to_json()
    if mixing is not None:
        info["mixing"] = mixing.to_json()
    if search is not None:
        info["divergent"] = search.to_json()
    return info
