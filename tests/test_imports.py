"""The house's floors, read from the code: every first-party import (at the top of a module or inside a function),
no import cycle between modules, imports only downward between packages, nothing imports the CLI, and
function-level imports only for the measured start-up costs of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import find_cycle, imported_names, nested_nodes, package_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("activations", "sae", "experiments", "dashboard")
FLOOR = {"activations": 0, "sae": 1, "experiments": 2, "dashboard": 3}
"""A module may import its own package and the ones below it; the CLI (experiments.cli, experiments.train) is the
top floor and may import the dashboard's launcher."""
ENTRY_POINTS = ("experiments.cli", "experiments.train")
DEFERRED = ("transformer_lens", "transformers", "datasets", "wandb")
"""Third-party packages imported inside functions on purpose: each costs seconds at start-up (docs/ARCHITECTURE.md)."""


def all_modules() -> dict[str, Path]:
    return {name: path for pkg in PACKAGES for name, path in package_modules(pkg).items()}


def imports_of(path: Path, name: str, statements_only: bool = False) -> list[tuple[str, bool]]:
    """(imported module, inside a function or class) for every import; relative imports resolved. With
    statements_only, import statements alone (not importlib.import_module calls, which load a module chosen at
    run time, such as an optional model wheel)."""
    tree = ast.parse(path.read_text())
    inside = nested_nodes(tree)
    return [(dep, id(node) in inside) for dep, node in imported_names(tree, name, path.name == "__init__.py")
            if not statements_only or isinstance(node, (ast.Import, ast.ImportFrom))]


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: {dep for dep, _ in imports_of(path, name) if dep in modules and dep != name}
            for name, path in modules.items()}


def is_entry(name: str) -> bool:
    return any(name == e or name.startswith(e + ".") for e in ENTRY_POINTS)


def test_the_import_walk_sees_the_modules_and_their_edges():
    edges = graph()
    assert {"activations.reader", "sae.api", "experiments.cli.root", "dashboard.app"} <= set(edges)
    assert "activations.format" in edges["activations.reader"] and "sae.training.trainer" in edges["sae.api"]


def test_the_cycle_search_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    edges = graph()
    # a package's __init__ re-exporting its modules is not a cycle through them: drop edges into __init__ files
    packages = {name for name, path in all_modules().items() if path.name == "__init__.py"}
    acyclic = {name: {d for d in deps if d not in packages} for name, deps in edges.items()}
    assert find_cycle(acyclic) is None, f"import cycle: {' -> '.join(find_cycle(acyclic) or [])}"


def test_imports_only_go_down_the_floors_and_nothing_imports_the_cli():
    upward, into_cli = [], []
    for name, deps in graph().items():
        for dep in deps:
            if is_entry(dep) and not is_entry(name):
                into_cli.append(f"{name} -> {dep}")
            launcher = is_entry(name) and dep == "dashboard.launch"
            if FLOOR[dep.split(".")[0]] > FLOOR[name.split(".")[0]] and not launcher:
                upward.append(f"{name} -> {dep}")
    assert not upward, f"imports going up a floor: {upward}"
    assert not into_cli, f"modules importing the CLI: {into_cli}"


def test_function_level_imports_only_defer_the_measured_heavy_packages():
    local = sorted(
        f"{name}: {dep}"
        for name, path in all_modules().items()
        for dep, inside in imports_of(path, name, statements_only=True)
        if inside and dep.split(".")[0] not in DEFERRED
    )
    assert not local, f"function-level imports of cheap modules: {local}"


def test_no_test_module_imports_another():
    """Shared helpers and fixtures live in tests/conftest.py."""
    offenders = sorted(
        f"{path.name}: {dep}"
        for path in (ROOT / "tests").glob("test_*.py")
        for dep, _ in imports_of(path, f"tests.{path.stem}")
        if dep.split(".")[-1].startswith("test_") or dep.startswith(("tests.test_", "test_"))
    )
    assert not offenders, f"test modules importing other test modules: {offenders}"
