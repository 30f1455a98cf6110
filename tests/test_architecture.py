"""The house's shape, read from the source (ast over src/nmsparse, nothing imported): the
library never imports the application (``nmsparse.app``), the application reaches the library
only through its public modules (not the engine's insides, not private modules), the engine
reaches only down (patterns, methods and a few leaves), and the import graph has no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import nmsparse

PACKAGE = Path(nmsparse.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The nmsparse modules ``path`` imports: every import counts (module level, inside
    functions, under ``TYPE_CHECKING``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nmsparse")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nmsparse":
                return
            for alias in node.names:  # `from . import step_hooks` imports a module
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) for name, path in paths.items()}


GRAPH = _graph()
APP = "nmsparse.app"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    assert "nmsparse.engine.make_sparse" in GRAPH["nmsparse"]
    assert "nmsparse.engine.selection" in GRAPH["nmsparse.engine.make_sparse"]
    assert "nmsparse.patterns.nm" in GRAPH["nmsparse.patterns.parse"]
    assert "nmsparse.app.train.trainer" in GRAPH["nmsparse.app.cli.main"]


def test_the_library_never_imports_the_application():
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if not _in(m, APP)
                   and m != "nmsparse.__main__" for t in targets if _in(t, APP))
    assert not wrong, "\n".join(wrong)


def _private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split(".")[1:])


def test_the_application_uses_only_the_public_library():
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _in(m, APP)
                   for t in targets if not _in(t, APP)
                   and (_in(t, "nmsparse.engine") or _private(t)))
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(GRAPH[node]):
            if _in(node, target):  # a module reads its own package's __init__: not a circle
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


# What the engine stands on. Everything else (lora, hf, oneshot, export, ...) is built on the
# engine, so the engine must not reach up to it, even without a circle.
BELOW_THE_ENGINE = ("nmsparse.patterns", "nmsparse.methods", "nmsparse.tables",
                    "nmsparse.registry", "nmsparse.atomic", "nmsparse.machine",
                    "nmsparse.kernels.cpu")  # the native libraries: the mask pass lives there


def test_the_engine_reaches_only_down():
    engine = "nmsparse.engine"
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _in(m, engine)
                   for t in targets if not _in(t, engine)
                   and not any(_in(t, below) for below in BELOW_THE_ENGINE))
    assert not wrong, "\n".join(wrong)


def test_what_the_engine_stands_on_never_imports_the_engine():
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items()
                   if any(_in(m, below) for below in BELOW_THE_ENGINE)
                   and not _in(m, "nmsparse.methods")  # methods use the engine's leaves
                   for t in targets if _in(t, "nmsparse.engine"))
    assert not wrong, "\n".join(wrong)
