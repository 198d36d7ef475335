"""Dataset sources by name: the built-in ones (one module of :mod:`meal_cache.data.sources` each), then the
plug-ins', declared under the entry-point group ``meal_cache.datasets`` (``NAME = "package.module:SOURCE"``, SOURCE
a :class:`~meal_cache.data.loader.DatasetSource` called NAME)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib.metadata import entry_points

import meal_cache.data.sources as sources_package
from meal_cache.data.loader import DatasetSource
from meal_cache.errors import UserError

ENTRY_POINT_GROUP = "meal_cache.datasets"


def _builtin() -> list[DatasetSource]:
    found: list[DatasetSource] = []
    for info in sorted(pkgutil.iter_modules(sources_package.__path__), key=lambda info: info.name):
        found += importlib.import_module(f"{sources_package.__name__}.{info.name}").SOURCES
    return found


def _plugins() -> list[DatasetSource]:
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            source = point.load()
        except Exception as err:  # a broken plug-in is named, not a traceback from deep inside importlib
            raise UserError(f"the dataset plug-in '{point.name}' ({point.value}) does not load: {err}") from err
        if not isinstance(source, DatasetSource):
            raise UserError(f"the dataset plug-in '{point.name}' ({point.value}) is not a meal_cache DatasetSource")
        if source.name != point.name:
            raise UserError(f"the dataset plug-in '{point.name}' ({point.value}) calls itself '{source.name}'")
        found.append(source)
    return found


@functools.cache
def dataset_sources() -> dict[str, DatasetSource]:
    """Every dataset source by name: the built-in ones, then the plug-ins'."""
    sources: dict[str, DatasetSource] = {}
    for source in [*_builtin(), *_plugins()]:
        if source.name in sources and sources[source.name] is not source:
            raise UserError(f"two dataset sources are called '{source.name}': {sources[source.name].loader.__module__} "
                            f"and {source.loader.__module__}")  # fmt: skip
        sources[source.name] = source
    return sources
