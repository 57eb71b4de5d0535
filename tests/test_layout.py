"""The tree's import arrows: `orch8/` never imports `supervisor/`, and no module cycles.

Read from the source (every import statement, at module level or inside a function), so
a lazy import cannot hide an arrow pointing the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("orch8", "supervisor")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES
            for path in sorted((REPO / package).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a package's own `__init__` aside)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from orch8.api import cluster` imports the module orch8.api.cluster.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(path, known) for name, path in known.items()}
    # A package's __init__ importing its own submodules is how a package exports them.
    return {name: {target for target in targets if not target.startswith(name + ".")}
            for name, targets in edges.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import one another (directly or around a loop)."""
    reach = {name: reachable(edges, name) for name in edges}
    groups = {tuple(sorted({name} | {other for other in reach[name] if name in reach[other]}))
              for name in edges if name in reach[name]}
    return sorted(list(group) for group in groups)


def test_the_library_never_imports_the_supervisor() -> None:
    wrong = {name: sorted(target for target in targets if target.startswith("supervisor"))
             for name, targets in graph().items() if name.startswith("orch8")}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_import_arrows_point_one_way() -> None:
    assert cycles(graph()) == []


def test_the_check_sees_a_cycle() -> None:
    # The test above can fail: a made-up pair importing each other is found.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
