"""The package's layering, read from the source: every `import` and `from ... import`, at
module level or inside a function (a lazy import is still an arrow), of every module under
`maestro_pipelines/`.

The libraries are what on-call runs when Dagster is down (`maestro` CLI) and what the Dagster
layer wraps; an arrow from a library up into the Dagster layer, or between libraries the wrong
way, is how "the CLI works without Dagster" and "adding a backend touches one module" stop
being true without any test failing.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = "maestro_pipelines"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The Dagster layer and everything that assembles it: no library may import these.
DAGSTER_LAYER = ("resources", "assets", "jobs", "sensors", "schedules", "cli", "definitions", "environment",
                 "dagster_support", "demo_run", "automation_cli", "failures", "partitions")
# Each library and the libraries it may import (lower layers); the shared Dagster-free modules
# (settings, errors, formatting, objectives, ...) are below them all.
LIBRARIES = {
    "crypto": set(),
    "storage": set(),
    "platform_db": set(),
    "migrations": {"platform_db"},
    "backup": {"storage", "platform_db", "crypto"},
    "ml": {"platform_db", "storage"},
    "connectors": {"platform_db"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute; `from pkg import sub` counts as `pkg.sub`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of this package it imports (names resolved to existing modules)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}

    def existing(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    return {
        name: {found for target in _imports(path) if (found := existing(target)) and found != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_libraries_never_import_dagster_or_the_dagster_layer():
    wrong = []
    for library in LIBRARIES:
        for path in (ROOT / library).rglob("*.py"):
            for target in _imports(path):
                top = target.split(".")[0]
                if top == "dagster" or top.startswith("dagster_") or (
                    top == PACKAGE and _layer(target) in DAGSTER_LAYER
                ):
                    wrong.append(f"{_module_name(path)} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_each_library_imports_only_the_layers_below_it():
    graph = _graph()
    wrong = []
    for module, targets in graph.items():
        library = _layer(module)
        if library not in LIBRARIES:
            continue
        for target in targets:
            other = _layer(target)
            if other != library and other in LIBRARIES and other not in LIBRARIES[library]:
                wrong.append(f"{module} imports {target} ({library} -> {other})")
    assert not wrong, "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_library_module_imports_itself_back_through_another():
    """An import cycle between two modules (even through a lazy import) means neither can be
    understood, tested or replaced alone: the storage URL helpers and the S3/GCS/Azure
    drivers were one. A package's `__init__` re-exporting its own modules is not a cycle."""
    graph = _graph()

    def outside_own_package(module: str, target: str) -> bool:
        return not (graph_is_package(module) and target.startswith(module + "."))

    def graph_is_package(module: str) -> bool:
        return (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()

    pruned = {m: {t for t in ts if outside_own_package(m, t)} for m, ts in graph.items() if _layer(m) in LIBRARIES}
    cycles = _cycles(pruned)
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_walk_sees_the_arrows_it_judges():
    """The scan itself: arrows known to exist are found (the CLI imports the backup library,
    definitions.py imports dagster, a lazy import inside a function counts) and a cycle is
    found where there is one, so an empty result above means no arrow, not a blind walk."""
    graph = _graph()
    assert any(_layer(target) == "backup" for target in graph["maestro_pipelines.cli"])
    assert "dagster" in {target.split(".")[0] for target in _imports(ROOT / "definitions.py")}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
