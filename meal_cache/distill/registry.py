"""Where distillation methods are found: every module of :mod:`meal_cache.distill.methods` (a method is one file
there), and every entry point of the group ``meal_cache.methods`` that a package installs (a method of your own,
``NAME = "package.module:ClassName"``), so no file of meal-cache changes to add one."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import meal_cache.distill.methods as methods_package
from meal_cache.distill.methods.base import Method
from meal_cache.errors import unknown_choice
from meal_cache.registry import by_name, plugins

ENTRY_POINT_GROUP = "meal_cache.methods"


def _builtin() -> list[type[Method]]:
    found = []
    for info in pkgutil.iter_modules(methods_package.__path__):
        module = importlib.import_module(f"{methods_package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and cls.name:
                found.append(cls)
    return found


def _is_method(loaded: object) -> bool:
    return inspect.isclass(loaded) and issubclass(loaded, Method)


@functools.cache
def available_methods() -> dict[str, type[Method]]:
    """Every method by name: the built-in ones in the order of their modules, then the plug-ins'."""
    builtin = _builtin()
    found = plugins(ENTRY_POINT_GROUP, "method", "a meal_cache Method class", _is_method, lambda cls: cls.name)
    return by_name([*builtin, *found], "methods", lambda cls: cls.name, lambda cls: cls.__module__)


def method_class(name: str) -> type[Method]:
    """The method called ``name``; an unknown name is one error listing them."""
    methods = available_methods()
    if name not in methods:
        raise unknown_choice("method", name, list(methods))
    return methods[name]
