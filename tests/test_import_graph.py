"""The import graph of ``meal_cache/``, read from the source with ``ast`` (nothing imported): every
``meal_cache.*`` import counts, type-only (``TYPE_CHECKING``) and function-local ones included, since a circle
of any of them is two modules that cannot be understood, moved or tested apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "meal_cache"
STORE = "meal_cache.store"
# The stages that build on the store, which it must never import (prefixes of module names).
STORE_MAY_NOT_IMPORT = ("meal_cache.nets", "meal_cache.extract", "meal_cache.distill", "meal_cache.engine",
                        "meal_cache.pipeline", "meal_cache.cli")  # fmt: skip
# What each stage package may import of the others (its docstring says the same): the packages build on each other
# in this order, so no circle can run between two of them. Top-level modules are named as they are.
MAY_IMPORT: dict[str, set[str]] = {
    "views": {"errors", "registry"},
    "data": {"errors", "registry", "remote", "views"},
    "store": {"errors", "registry", "remote", "views"},
    "nets": {"errors", "registry", "remote", "runtime", "projection", "data", "views", "store"},
    "engine": {"errors", "registry", "remote", "runtime", "losses", "data", "views", "nets", "store"},
    "extract": {"errors", "registry", "remote", "runtime", "dense", "projection", "data", "views", "nets", "store",
                "engine", "distill"},
    "distill": {"meal_cache", "errors", "registry", "remote", "runtime", "losses", "dense", "projection", "analysis",
                "data", "views", "nets", "store", "engine"},
    "pipeline": {"errors", "registry", "remote", "runtime", "analysis", "data", "views", "nets", "store", "engine",
                 "extract", "distill"},
}  # fmt: skip
# The flat modules the top level may hold beside the stage packages (issue 38: at most 12).
MOST_FLAT_MODULES = 12


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lazy_table(tree: ast.Module, package: str) -> dict[str, str]:
    """A package ``__init__``'s lazily re-exported names and the module that defines each: its ``_EXPORTS``
    (submodule -> names, as :mod:`meal_cache.registry.lazy_exports` takes them)."""
    table: dict[str, str] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       else None)  # fmt: skip
        if not isinstance(target, ast.Name) or node.value is None:
            continue
        if target.id == "_EXPORTS":
            for submodule, names in ast.literal_eval(node.value).items():
                twice = sorted(set(names) & set(table))
                if twice:
                    raise ValueError(f"{package}'s _EXPORTS names {twice} under two modules")
                table |= {name: f"{package}.{submodule}" for name in names}
    return table


def parse_package(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(path, root): (path, ast.parse(path.read_text(), str(path))) for path in sorted(root.rglob("*.py"))
    }


def raw_imports(module: str, path: Path, tree: ast.Module) -> list[tuple[str, str | None]]:
    """Every ``(module, name)`` a module imports (name None for ``import module``), relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found += [(base, alias.name) for alias in node.names]
    return found


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports. ``from P import X`` is an edge to the
    submodule ``P.X`` when there is one, else to the module ``P``'s lazy table names for X, else to ``P`` itself.
    A submodule's implicit import of its parent package is not counted."""
    trees = parse_package(root)
    tables = {name: lazy_table(tree, name) for name, (path, tree) in trees.items() if path.name == "__init__.py"}

    def target(module: str, name: str | None) -> str | None:
        if name is not None and f"{module}.{name}" in trees:
            return f"{module}.{name}"
        if name is not None and name in tables.get(module, {}):
            return tables[module][name]
        return module if module in trees else None

    graph: dict[str, set[str]] = {}
    for module, (path, tree) in trees.items():
        edges = {target(base, name) for base, name in raw_imports(module, path, tree)}
        graph[module] = {edge for edge in edges if edge is not None and edge != module}
    return graph


def imports_through_init(package: str, root: Path = PACKAGE_ROOT) -> dict[str, list[str]]:
    """The package's own modules that import a name from its ``__init__`` (not a submodule of it), and the names."""
    trees = parse_package(root)
    found: dict[str, list[str]] = {}
    for module, (path, tree) in trees.items():
        if module.startswith(f"{package}."):
            names = [str(name) for base, name in raw_imports(module, path, tree)
                     if base == package and f"{package}.{name}" not in trees]  # fmt: skip
            if names:
                found[module] = names
    return found


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected sets of two or more modules (Tarjan's algorithm): every circle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_a_tiny_graph_finds_its_circle_through_a_relative_import_and_a_lazy_name(tmp_path):
    """The graph code itself on a made-up package: ``b`` reaches ``a`` through the package's lazy table (an
    import through the package's ``__init__``) and ``a`` reaches ``b`` by a relative, type-only import; ``c`` only
    imports."""
    package = tmp_path / "meal_cache"
    (package / "pkg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pkg" / "__init__.py").write_text('_EXPORTS = {"a": ("A",)}\n')
    (package / "pkg" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "pkg" / "b.py").write_text("from meal_cache.pkg import A\n")
    (package / "pkg" / "c.py").write_text("import meal_cache.pkg.a\nfrom meal_cache import pkg\n")
    graph = import_graph(package)
    assert graph["meal_cache.pkg.b"] == {"meal_cache.pkg.a"}
    assert graph["meal_cache.pkg.c"] == {"meal_cache.pkg.a", "meal_cache.pkg"}
    assert circles(graph) == {frozenset({"meal_cache.pkg.a", "meal_cache.pkg.b"})}
    assert imports_through_init("meal_cache.pkg", package) == {"meal_cache.pkg.b": ["A"]}


def test_no_module_of_the_package_is_in_a_circle():
    graph = import_graph()
    assert {m for m in graph if m.startswith(f"{STORE}.")} >= {f"{STORE}.teacher_store", f"{STORE}.verify"}
    found = sorted(sorted(circle) for circle in circles(graph))
    assert not found, f"circles of imports (type-only and function-local ones count): {found}"


def test_the_store_package_imports_no_later_stage_and_never_itself():
    graph = import_graph()
    store_modules = {m: edges for m, edges in graph.items() if m.startswith(f"{STORE}.")}
    later = {m: sorted(e for e in edges if e.startswith(STORE_MAY_NOT_IMPORT)) for m, edges in store_modules.items()}
    assert not any(later.values()), later
    assert imports_through_init(STORE) == {}


@pytest.mark.parametrize(("module", "loads"), [
    ("logits", {"encodings", "logits"}),  # the encodings' modules only once one is asked for by name
    ("encodings.topk", {"encodings", "encodings.topk"}),
])  # fmt: skip
def test_importing_one_store_module_loads_only_what_it_imports(module, loads):
    """The package ``__init__`` re-exports lazily: one module imported, in a fresh interpreter, loads only what
    it imports itself (an encoding imports only the encodings' contract)."""
    code = f"import sys, {STORE}.{module}; print(sorted(m for m in sys.modules if m.startswith('meal_cache.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE_ROOT.parent).stdout.split("\n")[0]  # fmt: skip
    store_modules = {m for m in ast.literal_eval(loaded) if m == STORE or m.startswith(f"{STORE}.")}
    assert store_modules == {STORE, *(f"{STORE}.{name}" for name in loads)}


def defined_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level (classes, functions, assignments), not those it imports."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def test_every_name_the_store_offers_is_defined_in_the_module_its_table_names():
    trees = parse_package(PACKAGE_ROOT)
    table = lazy_table(trees[STORE][1], STORE)
    misplaced = sorted(name for name, module in table.items() if name not in defined_names(trees[module][1]))
    assert not misplaced, f"not defined where meal_cache.store's table says: {misplaced}"


def package_of(module: str) -> str:
    """``meal_cache.nets.models`` -> ``nets``; a top-level module is its own name, the package itself ``meal_cache``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_each_stage_package_imports_only_the_stages_below_it():
    graph = import_graph()
    beyond = {}
    for module, edges in graph.items():
        package = package_of(module)
        if package in MAY_IMPORT:
            found = {package_of(edge) for edge in edges} - {package} - MAY_IMPORT[package]
            if found:
                beyond[module] = sorted(found)
    assert not beyond, f"imports beyond the package's layer: {beyond}"


def test_the_top_level_holds_few_flat_modules():
    flat = sorted(path.stem for path in PACKAGE_ROOT.glob("*.py") if path.stem not in {"__init__", "__main__"})
    assert len(flat) <= MOST_FLAT_MODULES - 2, flat  # __init__ and __main__ count too


def test_importing_extract_loads_nothing_of_distill():
    """Stage 1 without stage 2: the extract pass, imported in a fresh interpreter, loads no distill module (the
    method registry is read only when ``--for METHOD`` asks)."""
    code = ("import sys, meal_cache.extract.run, meal_cache.extract.target; "
            "print(sorted(m for m in sys.modules if m.startswith('meal_cache.')))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE_ROOT.parent).stdout.split("\n")[0]  # fmt: skip
    modules = ast.literal_eval(loaded)
    assert "meal_cache.extract.run" in modules
    assert not [m for m in modules if m.startswith("meal_cache.distill")]
