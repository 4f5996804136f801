"""The import graph of the library has no cycle: each module builds only on modules below it.

The graph is read from the source (every ``import`` statement, module-level, inside a function or
under ``if TYPE_CHECKING:``), so neither a lazy import nor a type-only one can hide a circle: a
module that needs another's type for an annotation while that one imports it takes a
:class:`typing.Protocol` from a module below both.
"""

import ast
from pathlib import Path

import networkx as nx

import circuitfind

SRC = Path(circuitfind.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("circuitfind",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, package: str):
    """Names of the circuitfind modules an AST imports (``from a import b`` gives ``a.b`` where
    ``b`` is a module, else ``a``), ``if TYPE_CHECKING:`` blocks included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        yield from _imports(node, package)


def import_graph() -> nx.DiGraph:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}  # itself and its packages
        for name in _imports(ast.parse(path.read_text()), package):
            if name not in files:
                continue
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ first
                target = ".".join(parts[:i])
                if target in files and target not in own:
                    graph.add_edge(module, target)
    return graph


def test_the_import_graph_is_read():
    graph = import_graph()
    assert graph.has_edge("circuitfind.edge_patching.patcher", "circuitfind.patching")
    assert graph.has_edge(
        "circuitfind.models.catalogue", "circuitfind.models.zoo.known"
    )  # a function-level import counts
    assert graph.has_edge("circuitfind.models.zoo.known", "circuitfind.tasks.batch")
    assert graph.has_edge("circuitfind.circuits.graph", "circuitfind.checks")
    assert graph.has_edge(
        "circuitfind.circuits.circuit", "circuitfind.circuits.mib"
    )  # the formats sit below the circuit
    for fmt in ("circuitfind.circuits.mib", "circuitfind.circuits.graph_io"):
        assert "circuitfind.circuits.circuit" not in nx.descendants(graph, fmt)


def test_type_checking_imports_count(tmp_path):
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from circuitfind.circuits.circuit import Circuit\n"
    )
    assert "circuitfind.circuits.circuit" in set(_imports(tree, "circuitfind"))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in sorted(cycles, key=len)[:10])
    assert not any(m.startswith("circuitfind.models.zoo") for m in nx.descendants(graph, "circuitfind.models.loading"))
