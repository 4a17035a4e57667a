"""The package's imports flow one way: no import circle between its parts, no re-exports by
module ``__getattr__``.

The parts are the top-level modules and subpackages of ``circuitfind`` (``tasks``, ``graphs``,
``patching``, ``algorithms``, ``evaluation``, ``benchmark``, ``zoo``, ``models``, ``api`` ...);
an import inside ``if TYPE_CHECKING:`` is for annotations only and does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import circuitfind

PACKAGE = Path(circuitfind.__file__).parent


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


class _Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.startswith("circuitfind"):
            if node.module == "circuitfind":  # from circuitfind import zoo
                self.found += [f"circuitfind.{a.name}" for a in node.names]
            else:
                self.found.append(node.module)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [a.name for a in node.names if a.name.startswith("circuitfind")]


def _part_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module == "circuitfind.__init__" or module == "circuitfind.__main__":
            continue  # the public facade and the entry point sit on top of everything
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text()))
        for target in visitor.found:
            a, b = _part(module), _part(target)
            if a != b:
                graph.add_edge(a, b)
    return graph


def test_no_import_circle_between_the_packages_parts():
    graph = _part_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {cycles}"
    # and the documented direction holds: tasks/graphs -> patching -> algorithms -> evaluation
    # -> benchmark/cli (a part never imports a later layer; graphs never imports tasks)
    layers = [{"tasks", "graphs"}, {"patching"}, {"algorithms"}, {"evaluation"},
              {"benchmark", "cli"}]
    for i, lower in enumerate(layers):
        for upper in layers[i + 1:]:
            for a in lower:
                for b in upper:
                    assert not graph.has_edge(a, b), f"{a} imports {b}"
    assert not graph.has_edge("graphs", "tasks")


def test_no_module_getattr_reexports():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                        for n in ast.parse(p.read_text()).body)]
    assert not offenders
