"""Where a store's teachers and views came from: the extracts that added them (its creation, then each growth by
teachers or views), each with its ordinal, UTC time and meal-cache version. Imports nothing of the store.

The record is the attributes of a group of its own, ``origins/``, not of the store's root: the root's attributes
are then a function of the settings alone, so a grown store and one extracted at once still have the same root
attributes and arrays, and differ in this record only (docs/store-format.md)."""

from __future__ import annotations

import datetime
import importlib.metadata
from collections.abc import Sequence

import zarr

ORIGINS = "origins"


def _version() -> str:
    try:
        return importlib.metadata.version("meal-cache")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _entry(ordinal: int, teachers: list[str], views: tuple[int, int] | None) -> dict:
    at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"extract": ordinal, "at": at, "version": _version(), "teachers": teachers,
            "views": None if views is None else list(views)}  # fmt: skip


def create_origins(group: zarr.Group, teachers: Sequence[str], views: int) -> None:
    """A new store's record: extract 1 added ``teachers`` and views ``0`` to ``views - 1``."""
    group.create_group(ORIGINS).attrs.update({"extracts": [_entry(1, list(teachers), (0, views))]})


def read_origins(group: zarr.Group) -> list[dict] | None:
    """The extracts that added the store's teachers and views, in order; None for a store made before meal-cache
    kept the record."""
    if ORIGINS not in group:
        return None
    return list(group[ORIGINS].attrs.get("extracts", []))


def record_origins(group: zarr.Group, teachers: Sequence[str], views: int) -> None:
    """One more extract's entry naming those of ``teachers`` and of the first ``views`` views that no entry names
    yet, if any: called after a growth has been recorded in the store's settings, and again when an extract takes
    a store up, so a growth killed between the two is still recorded (by the extract that resumes it, at its
    time). A store without the record (made before meal-cache kept one) stays without: what added its first
    teachers and views is not known."""
    extracts = read_origins(group)
    if extracts is None:
        return
    named = {key for entry in extracts for key in entry["teachers"]}
    covered = max((entry["views"][1] for entry in extracts if entry["views"] is not None), default=0)
    added = [key for key in teachers if key not in named]
    more = (covered, views) if views > covered else None
    if added or more is not None:
        group[ORIGINS].attrs.update({"extracts": [*extracts, _entry(len(extracts) + 1, added, more)]})
