"""Finding code by name: a package's names imported on first use (PEP 562), and plug-ins declared under an
entry-point group, gathered with the built-in ones by name. Imports only the standard library and
:mod:`meal_cache.errors`, so every layer may use it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from meal_cache.errors import UserError

Found = TypeVar("Found")


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``'s ``__init__``, which offers each submodule's
    names (``exports``: submodule -> names) and imports a submodule only when one of its names is first asked for."""
    module_of = {name: module for module, names in exports.items() for name in names}
    offered = sorted(module_of)

    def get(name: str) -> object:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def listing() -> list[str]:
        return sorted({*vars(sys.modules[package]), *offered})

    return offered, get, listing


def plugins(group: str, kind: str, what: str, accepts: Callable[[object], bool],
            name_of: Callable[[Found], str]) -> list[Found]:  # fmt: skip
    """The objects the installed packages declare under the entry-point group ``group``: each one loaded, of the
    right type (``accepts``; else "is not ``what``") and called by its entry point's name. A broken plug-in is one
    error naming it (``kind``: "method", "dataset"), not a traceback from deep inside importlib."""
    # Imported here: importlib.metadata costs tens of milliseconds, and every package's __init__ imports this module.
    from importlib.metadata import entry_points

    found = []
    for point in entry_points(group=group):
        try:
            loaded = point.load()
        except Exception as err:
            raise UserError(f"the {kind} plug-in '{point.name}' ({point.value}) does not load: {err}") from err
        if not accepts(loaded):
            raise UserError(f"the {kind} plug-in '{point.name}' ({point.value}) is not {what}")
        if name_of(loaded) != point.name:
            raise UserError(f"the {kind} plug-in '{point.name}' ({point.value}) calls itself '{name_of(loaded)}'")
        found.append(loaded)
    return found


def by_name(items: Iterable[Found], kinds: str, name_of: Callable[[Found], str],
            origin: Callable[[Found], str]) -> dict[str, Found]:  # fmt: skip
    """``items`` by name, in order; two different ones of one name are refused, naming where each comes from
    (``kinds``: "methods", "dataset sources")."""
    named: dict[str, Found] = {}
    for item in items:
        name = name_of(item)
        if name in named and named[name] is not item:
            raise UserError(f"two {kinds} are called '{name}': {origin(named[name])} and {origin(item)}")
        named[name] = item
    return named
