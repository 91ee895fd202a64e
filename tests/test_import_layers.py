"""The import graph of `protocol/`, `tools/` and `contree/` has no cycle and no upward arrow.

Every `import` counts, wherever it stands (module level, inside a function, under TYPE_CHECKING): a
lazy or type-only import that points up still means a responsibility sits on the wrong floor.

The rules:
* `protocol` (the wire) and `contree` (the mechanics) never import `tools`, nor each other;
* inside `contree`, a module imports only from its own floor or below (`CONTREE_FLOORS`, lowest first);
* no two project modules import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "tools", "contree")

# Lowest floor first. A module's floor is that of the nearest listed package it is in; ENTRY_POINTS
# (command-line mains and the lazy `contree.rest` façade) sit on top.
CONTREE_FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves: wire models, errors, small helpers",
     ("contree", "contree.api", "contree.errors", "contree.units", "contree.timeparse", "contree.fsutil",
      "contree.openat2", "contree.layerformat")),
    ("the Backend interface", ("contree.backend",)),
    ("engine storage: layers, images, blobs, overlay mounts, the engine home", ("contree.engine.storage",)),
    ("engine runtime (sandboxes on a mounted rootfs), image import (into the store), file sync",
     ("contree.engine.runtime", "contree.oci", "contree.sync")),
    ("the engine: operations, runs, snapshots, the LocalEngine façade", ("contree.engine",)),
    ("HTTP: the REST server of any Backend, the REST client",
     ("contree.rest", "contree.client", "contree.client_transport", "contree.client_events",
      "contree.client_sandboxes")),
    ("the engine service and its client", ("contree.service",)),
    ("configuration: which Backend to open", ("contree.config",)),
]
ENTRY_POINTS = frozenset({
    "contree.engine.cli", "contree.rest", "contree.rest.serve", "contree.service.cli",
    "contree.service.__main__",
})
TOP = len(CONTREE_FLOORS)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from package import name` names the submodule when
    there is one, else the package)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(t for a in node.names if (t := known(a.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base)
                    if target:
                        targets.add(target)
        targets.discard(module)
        graph[module] = targets
    return graph


def floor(module: str) -> int:
    if module in ENTRY_POINTS:
        return TOP
    best, depth = -1, -1
    for level, (_, prefixes) in enumerate(CONTREE_FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = level, prefix.count(".")
    assert best >= 0, f"{module} is on no floor: add it to CONTREE_FLOORS"
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph(project_modules())


def test_the_graph_is_real() -> None:
    assert "contree.engine.local" in GRAPH["contree.service.server"]
    assert "contree.engine.storage.store" in GRAPH["contree.engine.snapshots"]
    assert "protocol.registry" in GRAPH["tools.app"]


def test_the_checks_catch_what_they_forbid() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("contree.engine.storage.store") < floor("contree.engine.runtime.sandbox")
    assert floor("contree.engine.runtime.sandbox") < floor("contree.engine.local")
    assert floor("contree.engine.local") < floor("contree.service.app")
    assert floor("contree.rest.serve") == floor("contree.engine.cli") == TOP


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_protocol_and_contree_never_import_tools_or_each_other() -> None:
    wrong = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if (module.startswith("protocol") and not target.startswith("protocol"))
        or (module.startswith("contree") and not target.startswith("contree"))
    ]
    assert wrong == []


def test_contree_imports_only_down_its_floors() -> None:
    upward = [
        f"{module} ({CONTREE_FLOORS[floor(module)][0] if floor(module) < TOP else 'entry point'}) -> "
        f"{target} ({CONTREE_FLOORS[floor(target)][0] if floor(target) < TOP else 'entry point'})"
        for module, targets in sorted(GRAPH.items())
        if module.startswith("contree")
        for target in sorted(targets)
        if floor(target) > floor(module)
    ]
    assert upward == []
