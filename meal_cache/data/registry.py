"""Dataset sources by name: the built-in ones (one module of :mod:`meal_cache.data.sources` each), then the
plug-ins', declared under the entry-point group ``meal_cache.datasets`` (``NAME = "package.module:SOURCE"``, SOURCE
a :class:`~meal_cache.data.loader.DatasetSource` called NAME)."""

from __future__ import annotations

import functools
import importlib
import pkgutil

import meal_cache.data.sources as sources_package
from meal_cache.data.loader import DatasetSource
from meal_cache.registry import by_name, plugins

ENTRY_POINT_GROUP = "meal_cache.datasets"


def _builtin() -> list[DatasetSource]:
    found: list[DatasetSource] = []
    for info in sorted(pkgutil.iter_modules(sources_package.__path__), key=lambda info: info.name):
        found += importlib.import_module(f"{sources_package.__name__}.{info.name}").SOURCES
    return found


@functools.cache
def dataset_sources() -> dict[str, DatasetSource]:
    """Every dataset source by name: the built-in ones, then the plug-ins'."""
    builtin = _builtin()
    found = plugins(ENTRY_POINT_GROUP, "dataset", "a meal_cache DatasetSource",
                    lambda loaded: isinstance(loaded, DatasetSource), lambda source: source.name)  # fmt: skip
    return by_name([*builtin, *found], "dataset sources", lambda source: source.name,
                   lambda source: source.loader.__module__)  # fmt: skip
