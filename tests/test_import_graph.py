"""The package's import graph, read statically (``ast`` over ``src/nmsparse``): no module
imports itself back through others (every import counts: module level, inside functions and
under ``TYPE_CHECKING``), and the library never imports the application (``cli``, ``train``,
``data``, ``models``, ``lottery``: they use the library, not the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

import nmsparse

ROOT = Path(nmsparse.__file__).parent
APPLICATION = ("cli", "train", "data", "models", "lottery", "__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in ROOT.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The nmsparse modules ``name`` imports (``from pkg import sub`` is the submodule)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1] + [node.module or ""])
                    if node.level else node.module or "").rstrip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES
                          else base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_application(name: str) -> bool:
    return name.split(".")[1:2] and name.split(".")[1] in APPLICATION


def _cycle() -> list[str] | None:
    """One import cycle, as a path ``a -> b -> ... -> a``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for other in sorted(GRAPH[name]):
            # a package's __init__ importing its own submodules is how packages load
            if name == other.rpartition(".")[0] or other == name.rpartition(".")[0]:
                continue
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_graph_is_read():
    assert "nmsparse.make_sparse" in GRAPH["nmsparse"]
    assert "nmsparse.selection" in GRAPH["nmsparse.make_sparse"]
    assert "nmsparse.patterns.nm" in GRAPH["nmsparse.patterns.parse"]


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_application():
    wrong = sorted(f"{name} -> {other}" for name, imported in GRAPH.items()
                   if not _is_application(name) and name != "nmsparse"
                   for other in imported if _is_application(other))
    assert not wrong, "library modules importing application modules: " + ", ".join(wrong)
