"""``meal-cache info``: a store described in text, per teacher its accuracy, arrays, shapes and stored bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from meal_cache.store.keys import DIVERGENT_PIXELS, is_logits_key, split_teacher_key
from meal_cache.store.origins import read_origins
from meal_cache.store.schema import StoreLayout

if TYPE_CHECKING:
    from meal_cache.store.teacher_store import TeacherStore


def _array_label(store: TeacherStore, key: str) -> str:
    label = split_teacher_key(key)[1]
    layout = store.layout
    if layout.logits_encoding is None or not is_logits_key(key):
        return label
    kept = layout.logits_encoding.kept.format(k=layout.logits_k)
    return f"{label} ({kept} at T={layout.temperature:g}, read back dense)"


def lossy_parts(layout: StoreLayout) -> list[str]:
    """What a store's layout keeps less of than every float: mantissa bits, 8-bit codes, compact logits."""
    lossy = []
    if layout.keep_bits is not None:
        lossy.append(f"{layout.keep_bits} mantissa bits kept")
    if layout.quantize is not None:
        lossy.append(f"{' and '.join(layout.features) or 'features'} as {layout.quantize}-bit codes")
    if layout.logits_encoding is not None:
        lossy.append(layout.logits_encoding.description.format(k=layout.logits_k, temperature=layout.temperature))
    return lossy


def _lossy_description(layout: StoreLayout) -> str:
    lossy = lossy_parts(layout)
    return "lossy: " + ", ".join(lossy) if lossy else "lossless"


def _features_description(layout: StoreLayout) -> str:
    """The feature kinds, the attention maps' power said (the channel mean of |A|^p)."""
    kinds = [f"attention (mean |A|^{layout.attention_p:g} over channels)" if kind == "attention" else kind
             for kind in layout.features]  # fmt: skip
    return ", ".join(kinds) or "none (logits only)"


def _mixing_description(mixing: dict | None) -> str:
    if not mixing:
        return ""
    kinds = [f"{kind} {mixing[kind]:g}" for kind in ("mixup", "cutmix") if mixing[kind] > 0]
    switch = f", switch {mixing['switch_prob']:g}" if len(kinds) == 2 else ""
    return f" + {' / '.join(kinds)} (p {mixing['prob']:g}{switch})"


def _augmentation_description(record: dict | None) -> str:
    """The store's --scale/--ratio/--hflip/--vflip record (absent: the recipe's own values, nothing to add)."""
    if not record:
        return ""
    crop = ("padded crop" if record["crop"] == "padded" else
            "scale {:g}-{:g}, ratio {:g}-{:g}".format(*record["scale"], *record["ratio"]))  # fmt: skip
    return f" [{crop}, hflip {record['hflip']:g}, vflip {record['vflip']:g}]"


def _views_description(views: dict) -> str:
    return (
        f"views     {views['augmented']} augmented ({views['recipe']}"
        + _augmentation_description(views.get("augmentation"))
        + (f" + {views['policy']['name']}" if views.get("policy") else "")
        + _mixing_description(views.get("mixing"))
        + f", seed {views['seed']})"
        + (" + identity" if views["identity"] else "")
        + (
            f" + {views['divergent']['views']} divergent (eps {views['divergent']['eps']:g}, "
            f"{views['divergent']['steps']} steps)"
            if views.get("divergent")
            else ""
        )
    )


def _shards(layout: StoreLayout) -> str:
    """``extract --shard-chunks K``: a view's K chunks of rows in one object, the unit of writing."""
    if layout.shard_chunks is None:
        return ""
    return f", sharded: {layout.shard_chunks} chunks ({layout.rows_per_unit} rows) an object"


def _when(entry: dict) -> str:
    """An extract of the origins record as info names it: ``extract N (2026-12-07 21:30 UTC)``."""
    return f"extract {entry['extract']} ({entry['at'][:16].replace('T', ' ')} UTC)"


def _view_range(views: list[int]) -> str:
    start, stop = views
    return f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"


def _views_named(views: list[int]) -> str:
    return f"view{'s' if views[1] - views[0] > 1 else ''} {_view_range(views)}"


def _origins_lines(extracts: list[dict] | None) -> list[str]:
    """Each extract that added teachers or views, in order, with what it added; views as ranges of indexes."""
    if extracts is None:
        return ["origins   not recorded (a store extracted before meal-cache kept its origins)"]
    lines = []
    for entry in extracts:
        added = []
        if entry["teachers"]:
            added.append(("teacher " if len(entry["teachers"]) == 1 else "teachers ") + ", ".join(entry["teachers"]))
        if entry["views"] is not None:
            added.append(_views_named(entry["views"]))
        label = "origins" if not lines else ""
        lines.append(f"{label:9s} {_when(entry)}, meal-cache {entry['version']}: {'; '.join(added)}")
    return lines


def _views_origins(extracts: list[dict] | None) -> list[str]:
    """Below the views line of a grown store: each range of views with the extract that added it."""
    if not extracts or len(extracts) == 1:  # one extract made it all: the origins line says so once
        return []
    ranges = [f"{_views_named(e['views'])} added by {_when(e)}" for e in extracts if e["views"] is not None]
    return [f"          {'; '.join(ranges)}"] if ranges else []


def _sizes(sizes: list[int]) -> str:
    return " and ".join(f"{s} px" for s in sizes)


def describe_store(store: TeacherStore) -> str:
    """A readable summary: dataset, views, and per teacher its accuracy, blocks, shapes and stored bytes."""
    attrs = store.attrs
    data, views, layout = attrs["dataset"], attrs["views"], store.layout
    views_line = _views_description(views)
    extracts = read_origins(store.group)
    if layout.dense is not None:
        grid = layout.dense["grid"]
        views_line = (f"views     dense: any {views['recipe']} crop"
                      + _augmentation_description(views.get("augmentation"))
                      + f", drawn by distill; teachers saw each whole image at {_sizes(layout.dense['sizes'])}, "
                      f"blocks kept at up to {grid}x{grid}")  # fmt: skip
    lines = [
        f"store     {store.location}  ({'complete' if store.complete else 'INCOMPLETE: run the extract again'})",
        f"dataset   {data['spec']} [{data['split']}]  {data['n']} rows, {data['num_classes']} classes, "
        f"{data['image_size']} px, fingerprint {data['fingerprint'][:12]}",
        views_line,
        *_views_origins(extracts),
        f"layout    {layout.dtype}, codec {layout.codec}, {layout.rows_per_chunk} rows a chunk{_shards(layout)}, "
        f"features {_features_description(layout)}, {_lossy_description(layout)}",
        *_origins_lines(extracts),
        "",
    ]
    grown = extracts is not None and len(extracts) > 1
    added_by = {key: entry for entry in extracts for key in entry["teachers"]} if grown else {}
    sizes = store.sizes()
    total_stored = total_raw32 = 0
    for key in store.teacher_names:
        teacher = store.teacher(key)
        accuracy = teacher.get("accuracy")
        if accuracy:
            augmented = accuracy[: views["augmented"]] or accuracy[:1]
            # A sampled store keeps draws, not the logits: its top-1 is the most-drawn class's.
            top1 = "top-1" if layout.logits_encoding is None else layout.logits_encoding.top1
            acc_text = f"{top1} {np.mean(augmented):.2f}% on augmented views"
            if layout.dense is not None:
                acc_text = f"{top1} {accuracy[0]:.2f}% on whole images (the logit maps' means)"
            if views["identity"]:
                acc_text += f", {accuracy[store.identity_view]:.2f}% on the identity view"
            if store.divergent_views:
                divergent = [accuracy[v] for v in store.divergent_views]
                acc_text += f", {np.mean(divergent):.2f}% on divergent views"
        else:
            acc_text = "accuracy not yet recorded"
        done = store.progress(key)
        unit = "chunks" if layout.shard_chunks is None else "shards"
        lines.append(f"teacher {key}  ({teacher['arch']}, from {teacher['source']})  {acc_text}  "
                     f"[{int(done.sum())}/{done.size} {unit}]"
                     + (f"  added by {_when(added_by[key])}" if key in added_by else ""))  # fmt: skip
        lines.append(f"  {'array':40s} {'shape':>22s} {'stored':>10s} {'vs f32':>7s}")
        for array_key in store.feature_keys(key):
            size = sizes[array_key]
            total_stored += size["stored"]
            total_raw32 += size["raw_float32"]
            shape = "x".join(str(s) for s in store.logical_shape(array_key))
            ratio = size["raw_float32"] / max(1, size["stored"])
            lines.append(
                f"  {_array_label(store, array_key):40s} {shape:>22s} {_human(size['stored']):>10s} {ratio:6.1f}x"
            )
        lines.append("")
    per_row = total_stored / max(1, store.n * store.num_views)
    unit = "per image, every crop" if layout.dense is not None else "per sample per view"
    lines.append(
        f"total     {_human(total_stored)} stored, {_human(total_raw32)} as float32 "
        f"({total_raw32 / max(1, total_stored):.1f}x smaller); {per_row:.0f} bytes {unit}"
    )
    if DIVERGENT_PIXELS in store.group:  # beside the teachers' outputs: the divergent views' own pixels
        pixels = store.group[DIVERGENT_PIXELS]
        lines.append(f"divergent pixels {_human(store.stored_bytes(DIVERGENT_PIXELS))} stored "
                     f"({'x'.join(map(str, pixels.shape))} uint8, {_human(pixels.nbytes)} raw)")  # fmt: skip
    return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
