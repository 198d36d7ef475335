"""Where distillation methods are found: every module of :mod:`meal_cache.distill.methods` (a method is one file
there), and every entry point of the group ``meal_cache.methods`` that a package installs (a method of your own,
``NAME = "package.module:ClassName"``), so no file of meal-cache changes to add one."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points

import meal_cache.distill.methods as methods_package
from meal_cache.distill.methods.base import Method
from meal_cache.errors import UserError, unknown_choice

ENTRY_POINT_GROUP = "meal_cache.methods"


def _builtin() -> list[type[Method]]:
    found = []
    for info in pkgutil.iter_modules(methods_package.__path__):
        module = importlib.import_module(f"{methods_package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and cls.name:
                found.append(cls)
    return found


def _plugins() -> list[type[Method]]:
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = point.load()
        except Exception as err:  # a broken plug-in is named, not a traceback from deep inside importlib
            raise UserError(f"the method plug-in '{point.name}' ({point.value}) does not load: {err}") from err
        if not (inspect.isclass(cls) and issubclass(cls, Method)):
            raise UserError(f"the method plug-in '{point.name}' ({point.value}) is not a meal_cache Method class")
        if cls.name != point.name:
            raise UserError(f"the method plug-in '{point.name}' ({point.value}) calls itself '{cls.name}'")
        found.append(cls)
    return found


@functools.cache
def available_methods() -> dict[str, type[Method]]:
    """Every method by name: the built-in ones in the order of their modules, then the plug-ins'."""
    methods: dict[str, type[Method]] = {}
    for cls in [*_builtin(), *_plugins()]:
        if cls.name in methods and methods[cls.name] is not cls:
            raise UserError(f"two methods are called '{cls.name}': {methods[cls.name].__module__} and {cls.__module__}")
        methods[cls.name] = cls
    return methods


def method_class(name: str) -> type[Method]:
    """The method called ``name``; an unknown name is one error listing them."""
    methods = available_methods()
    if name not in methods:
        raise unknown_choice("method", name, list(methods))
    return methods[name]
