"""The house's layering, read from the source: who may import whom, and no import cycle anywhere.

Every import counts, the ones inside functions too (they run, later); only
``if TYPE_CHECKING:`` blocks are left out (they never run). ``from pkg
import name`` where ``pkg.name`` is a module is an arrow to that module.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("workspace_common", "pilot", "service_adapter", "admin_tools")


def _modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(TOP, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, TOP)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: str, known: dict[str, str]) -> set[str]:
    """What ``module`` imports: known modules by their full names, anything else by its top-level name."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    resolved = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        resolved.add(".".join(parts) if parts else name.split(".")[0])
    resolved.discard(module)
    return resolved


MODULES = _modules()
IMPORTS = {module: _imported(module, path, MODULES) for module, path in MODULES.items()}


def _arrows(source: str, target: str) -> list[str]:
    return sorted(f"{module} -> {name}" for module, names in IMPORTS.items() if module.split(".")[0] == source
                  for name in names if name.split(".")[0] == target)


def test_the_shared_floor_imports_the_standard_library_and_itself_only():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    outside = sorted(f"{module} -> {name}" for module, names in IMPORTS.items()
                     if module.split(".")[0] == "workspace_common"
                     for name in names if name.split(".")[0] not in stdlib | {"workspace_common"})
    assert outside == []


@pytest.mark.parametrize("source, target", [
    ("service_adapter", "pilot"), ("service_adapter", "admin_tools"), ("pilot", "service_adapter"),
    ("pilot", "admin_tools"), ("workspace_common", "pilot"), ("workspace_common", "service_adapter"),
])
def test_no_arrow_between_the_two_sides_except_through_the_shared_floor(source, target):
    assert _arrows(source, target) == []


def test_the_product_imports_no_test_or_bench_module():
    assert [arrow for package in PACKAGES for other in ("tests", "bench") for arrow in _arrows(package, other)] == []


def test_the_memory_layer_imports_no_vm_vm_job_or_network_module():
    layers = ("pilot.vm", "pilot.vmjob", "pilot.net", "pilot.recovery", "pilot.lifecycle")
    upward = sorted(f"{module} -> {name}" for module, names in IMPORTS.items() if module.startswith("pilot.node")
                    for name in names if name.startswith(layers))
    assert upward == []


def test_no_import_cycle_anywhere():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for name in IMPORTS[module]:
            if name not in IMPORTS:
                continue
            if name not in index:
                connect(name)
                low[module] = min(low[module], low[name])
            elif name in on_stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            component = []
            while True:
                name = stack.pop()
                on_stack.discard(name)
                component.append(name)
                if name == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(IMPORTS)))
    try:
        for module in IMPORTS:
            if module not in index:
                connect(module)
    finally:
        sys.setrecursionlimit(limit)
    assert cycles == []


def test_tests_and_benchmarks_import_support_never_a_test_module_or_conftest():
    found = []
    for folder in ("tests", "bench"):
        for directory, _, files in os.walk(os.path.join(TOP, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
                for node in ast.walk(tree):
                    modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    found += [f"{os.path.relpath(path, TOP)} -> {module}" for module in modules
                              if module.startswith("tests.test_") or module == "tests.conftest"]
    assert found == []


#: The most lines a product module may have: past it a module is doing more than one job (issue 35).
MAX_MODULE_LINES = 400


def test_no_product_module_is_over_400_lines():
    long = []
    for package in ("pilot", "service_adapter", "admin_tools", "workspace_common"):
        for directory, _, files in os.walk(os.path.join(TOP, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8") as handle:
                        count = sum(1 for _ in handle)
                    if count > MAX_MODULE_LINES:
                        long.append(f"{os.path.relpath(path, TOP)}: {count}")
    assert long == []
