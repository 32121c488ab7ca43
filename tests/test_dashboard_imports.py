"""The dashboard's import graph, read with `ast` (nothing is imported to build it): dashboard-internal imports,
top-level and function-level, form no circle; no module imports a page module (only st.navigation runs pages,
from their files); nothing imports the CLI; and no import hides inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import find_cycle, imported_names, package_modules

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"
PAGES_PACKAGE = "dashboard.views"
FUNCTION_LOCAL_ALLOWED: set[tuple[str, str]] = set()
"""(module, imported name) pairs allowed inside a function: none (none is worth it at start-up)."""


def dashboard_modules() -> dict[str, Path]:
    return package_modules("dashboard")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dashboard modules it imports (a name that is not a dashboard module is left out)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {target for target, _ in imported_names(tree, name, path.name == "__init__.py")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def is_page(module: str) -> bool:
    return module.startswith(PAGES_PACKAGE + ".")


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = dashboard_modules()
    assert {"dashboard.app", "dashboard.navigation", "dashboard.data"} <= set(found)
    return found


def test_the_cycle_finder_finds_circles_and_passes_trees():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond is no circle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_imports_inside_functions_and_relative_imports_are_seen():
    tree = ast.parse("from . import figures\n"
                     "def f():\n    from dashboard.views import steering\n    import importlib\n"
                     "    importlib.import_module('dashboard.views.overview')\n")
    names = {name for name, _ in imported_names(tree, "dashboard.data", is_package=False)}
    assert {"dashboard.figures", "dashboard.views.steering", "dashboard.views.overview"} <= names


def test_the_dashboard_imports_form_no_circle(modules):
    graph = import_graph(modules)
    assert graph["dashboard.app"] == {"dashboard.navigation"}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_no_module_imports_a_page_module(modules):
    pages = {m for m in modules if is_page(m)}
    assert pages, "no page module found under dashboard/views/"
    wrong = {(src, dst) for src, dsts in import_graph(modules).items() for dst in dsts if is_page(dst)}
    assert not wrong, f"page modules are run by st.navigation, never imported: {sorted(wrong)}"


def test_the_page_table_names_every_page_file(modules):
    tree = ast.parse(modules["dashboard.navigation"].read_text())
    table = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", "") == "PAGE_TABLE")
    files = {file for file, _title in ast.literal_eval(table).values()}
    pages = {m.rpartition(".")[2] + ".py" for m in modules if is_page(m)}
    assert files == pages
    for module in pages:  # st.navigation runs a page file as __main__: it must render then
        source = (DASHBOARD / "views" / module).read_text()
        assert 'if __name__ == "__main__":' in source and source.rstrip().endswith("render()"), module


def test_nothing_in_the_dashboard_imports_the_cli(modules):
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for target, node in imported_names(tree, name, path.name == "__init__.py"):
            assert not (target == "experiments.cli" or target.startswith("experiments.cli.")), \
                f"{path}:{node.lineno} imports {target}: the CLI imports the dashboard, not the other way round"


def test_no_import_inside_a_function(modules):
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    what = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    assert (name, what) in FUNCTION_LOCAL_ALLOWED, \
                        f"{path}:{node.lineno} imports {what} inside {getattr(func, 'name', 'a lambda')}"
