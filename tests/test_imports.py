"""The import graph of the library has no cycle: each module builds only on modules below it.

The graph is read from the source (every ``import`` statement, module-level or inside a function,
except those under ``if TYPE_CHECKING:``), so a lazy import cannot hide a circle.
"""

import ast
from pathlib import Path

import networkx as nx

import circuitfind

SRC = Path(circuitfind.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("circuitfind",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str):
    """Names of the circuitfind modules an AST imports (``from a import b`` gives ``a.b`` where
    ``b`` is a module, else ``a``), skipping ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (name for child in node.orelse for name in _imports(ast.Module([child], []), package))
            continue
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
    assert graph.has_edge("circuitfind.catalogue", "circuitfind.zoo.known")  # a function-level import counts
    assert graph.has_edge("circuitfind.zoo.known", "circuitfind.tasks")
    assert not graph.has_edge(
        "circuitfind.edge_patching.direct", "circuitfind.edge_patching.incremental"
    )  # TYPE_CHECKING only


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in sorted(cycles, key=len)[:10])
    assert not any(m.startswith("circuitfind.zoo") for m in nx.descendants(graph, "circuitfind.models"))
