"""The package's shape, read from its source with ``ast`` (nothing is imported or run): no import cycle (imports
inside functions count), a short front door, no oversized module, no test-only code inside the package."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "decaf_ext"
MAX_FRONT_DOOR = 10  # modules directly in decaf_ext/
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks).

    ``from decaf_ext.x import y`` is an edge to ``decaf_ext.x.y`` when that is a module, else to ``decaf_ext.x``;
    relative imports are resolved against the importing module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> nx.DiGraph:
    found = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(found)
    for name, path in found.items():
        graph.add_edges_from((name, target) for target in imported(path, set(found)))
    return graph


def test_the_checker_sees_a_cycle_through_a_lazy_import(tmp_path, monkeypatch):
    package = tmp_path / "decaf_ext"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from decaf_ext.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert list(nx.simple_cycles(import_graph())) in ([["decaf_ext.a", "decaf_ext.sub.b"]],
                                                      [["decaf_ext.sub.b", "decaf_ext.a"]])


def test_no_import_cycle():
    cycles = sorted(sorted(cycle) for cycle in nx.simple_cycles(import_graph()))
    assert cycles == []


def test_front_door_is_short():
    front = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(front) <= MAX_FRONT_DOOR, front


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_short(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_every_subpackage_says_what_it_is_for():
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), init


def test_no_environment_fault_switch_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        assert "DECAF_FAULT" not in path.read_text(), path
