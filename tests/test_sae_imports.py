"""The sae package's import structure, read with ast (nothing is imported): acyclic, and independent of the apps.

Every import statement counts, at module level or inside a function. The graph has one node per module
of sae/ and an edge for each sae-internal import; `from sae.x import y` points at sae.x.y when that is a
module, else at sae.x.
"""

from __future__ import annotations

import ast

import pytest
from conftest import find_cycle, imported_names, nested_nodes, package_modules

APPS = ("experiments", "dashboard", "activations")
LAYER_BELOW = {("sae.api", "activations.reader"), ("sae.pretrained", "activations.storage"),
               ("sae.devices", "activations"), ("sae.devices", "activations.devices")}
"""(module, imported) pairs of sae reaching outside the package: only downward, to the cache reader, when
build_trainer is given a cache path, to the cache root where converted pretrained SAEs are kept, and to the one
parser of device names."""
LOCAL_IMPORTS_ALLOWED: set[tuple[str, str]] = set()
"""(module, imported) pairs allowed inside a function: none."""


MODULES = package_modules("sae")


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imports_of(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function or class) for every import statement of `module`; `from a import b`
    counts as a.b when that is an sae module, else as a."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    inside = nested_nodes(tree)
    found, bases = [], set()
    for name, node in imported_names(tree, module, is_package(module)):
        if isinstance(node, ast.ImportFrom):
            if id(node) not in bases:  # the statement's own base comes first; each imported name stands for it
                bases.add(id(node))
                if all(alias.name == "*" for alias in node.names):
                    found.append((name, id(node) in inside))
                continue
            if name not in MODULES:
                name = name.rpartition(".")[0]
        found.append((name, id(node) in inside))
    return found


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for imported, _ in imports_of(module):
            if imported == "sae" or imported.startswith("sae."):
                target = imported
                while target not in MODULES:  # `import sae.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                if target != module:
                    graph[module].add(target)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_walk_sees_the_whole_package():
    assert {"sae", "sae.base", "sae.io", "sae.api", "sae.training", "sae.training.trainer"} <= set(MODULES)
    graph = internal_graph()
    assert "sae.io" in graph["sae.base"] and "sae.registry" in graph["sae.loading"]
    assert "sae.training.trainer" in graph["sae.api"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_sae_imports_are_acyclic():
    cycle = find_cycle(internal_graph())
    assert cycle is None, "import cycle in sae: " + " -> ".join(cycle or [])


def test_saving_does_not_reach_back_to_the_sae_class():
    """SAE.save delegates to sae.io, which must not (even indirectly) import sae.base or the registry."""
    assert not {"sae.base", "sae.registry", "sae.loading"} & reachable(internal_graph(), "sae.io")


@pytest.mark.parametrize("package", sorted(m for m in MODULES if is_package(m) and m != "sae"))
def test_subpackage_init_files_import_nothing_from_sae(package):
    """Importing sae.training.x runs sae/training/__init__.py first: an sae import there could close a cycle."""
    assert not [name for name, _ in imports_of(package) if name == "sae" or name.startswith("sae.")]


def test_no_module_imports_the_sae_package_itself():
    offenders = [m for m in MODULES if m != "sae" and any(name == "sae" for name, _ in imports_of(m))]
    assert not offenders, f"{offenders} import the sae package (its __init__ imports every module)"


def test_sae_does_not_import_the_applications():
    found = {
        (module, name)
        for module in MODULES
        for name, _ in imports_of(module)
        if name.split(".")[0] in APPS
    }
    assert found <= LAYER_BELOW, f"sae imports {sorted(found - LAYER_BELOW)}"


def test_imports_sit_at_the_top_of_each_module():
    local = {(module, name) for module in MODULES for name, inside in imports_of(module) if inside}
    assert local <= LOCAL_IMPORTS_ALLOWED, f"function-level imports: {sorted(local - LOCAL_IMPORTS_ALLOWED)}"
