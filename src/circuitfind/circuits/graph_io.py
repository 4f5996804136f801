"""Circuit graph files: GraphML, GEXF, node-link JSON and DOT, read and written without loss.

:func:`write_graph` writes a circuit graph (:meth:`circuitfind.circuits.graph.ModelGraph.to_networkx`)
atomically in the format its suffix names; :func:`read_graph` reads it back with attribute types
restored. The EAP-IG / MIB circuit-track JSON (``.mib.json``) is a circuit-level format, in
:mod:`circuitfind.circuits.mib`; both functions hand it over there.

Files are untrusted input: :func:`read_graph` bounds the file size, parses XML with ``defusedxml``
(no DTDs, so no entity expansion or external entities), checks DOT nesting before pydot sees it,
and reports every problem as one :class:`~circuitfind.errors.GraphFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import threading
from pathlib import Path

import networkx as nx
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring
from networkx.readwrite.gexf import GEXFReader
from networkx.readwrite.graphml import GraphMLReader

from circuitfind.circuits.graph import _short_repr, declared_shape, networkx_size
from circuitfind.errors import GraphFileError
from circuitfind.io import write_bytes, write_text

FORMATS = {".graphml": "graphml", ".gexf": "gexf", ".json": "json", ".dot": "dot", ".gv": "dot"}
FORMAT_NAMES = {
    "graphml": "GraphML",
    "gexf": "GEXF",
    "json": "node-link JSON",
    "dot": "DOT",
    "mib": "EAP-IG / MIB graph JSON",
    "neuronpedia": "Neuronpedia graph JSON",
    "dot-layered": "layered DOT drawing",
}
# Formats written for other tools to show, never read back: the circuit's edges only, drawn or laid
# out for a viewer (the round-trip formats above keep every edge of the model graph).
WRITE_ONLY = ("neuronpedia", "dot-layered")
# EAP-IG / MIB circuit JSON: the suffix ``.mib.json`` (or fmt="mib"); a plain ``.json`` stays node-link JSON.
MIB_SUFFIX = ".mib.json"
NEURONPEDIA_SUFFIX = ".neuronpedia.json"
NODE_TYPES = {"layer": int, "head": int, "kind": str, "score": float, "in_circuit": bool}
EDGE_TYPES = {"score": float, "in_circuit": bool, "structural": bool, "score_pos": str, "in_circuit_pos": str}
SHAPE_TYPES = {"n_layers": int, "n_heads": int, "split_qkv": bool, "n_pos": int, "n_kv_heads": int}
# the shape, then what a discovery measured (circuitfind.circuits.circuit.graph_attributes)
GRAPH_TYPES = {
    **SHAPE_TYPES,
    "settings": str,
    "faithfulness": float,
    "faithfulness_status": str,
    "cpr": float,
    "cmd": float,
}

# Limits on files read (checked before parsing). The GraphML of a full SmolLM2-135M circuit is 13 MB.
MAX_GRAPH_FILE_BYTES = 128 * 2**20
# pydot parses DOT at roughly 30-50 KB/s: larger DOT files would take minutes (use GraphML or JSON).
MAX_DOT_FILE_BYTES = 4 * 2**20
# Our DOT nests 2 deep (graph body, attribute list); pydot's recursive parser fails near 100.
MAX_DOT_NESTING = 16

# What the parsers raise on malformed input (defusedxml's refusals are ValueErrors).
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    SyntaxError,
    RecursionError,
    ArithmeticError,
    nx.NetworkXError,
)
_DOT_LOCK = threading.Lock()  # pydot's parser is not thread-safe


def graph_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format of a graph file: ``fmt`` if given, else by suffix (``.mib.json`` before ``.json``)."""
    path = Path(path)
    if fmt is None and path.name.lower().endswith(MIB_SUFFIX):
        fmt = "mib"
    if fmt is None and path.name.lower().endswith(NEURONPEDIA_SUFFIX):
        fmt = "neuronpedia"
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in FORMAT_NAMES:
        raise ValueError(
            f"unknown graph format for {path.name!r}: use one of {sorted(FORMAT_NAMES)} "
            f"(suffixes {sorted(FORMATS) + [MIB_SUFFIX, NEURONPEDIA_SUFFIX]})"
        )
    return fmt


MAX_SETTINGS_DEPTH = 32  # deeper settings are written as a string (a reader's recursion stays bounded)
MAX_INT_DIGITS = 4000  # about; Python's JSON reader refuses integers of more than 4,300 digits


def jsonable(value, depth: int = 0):
    """``value`` as strict JSON data, so that any settings can be written and read back: NaN and
    infinite numbers become ``null``; integers too long for a JSON reader (:data:`MAX_INT_DIGITS`),
    objects JSON has no type for and nesting deeper than :data:`MAX_SETTINGS_DEPTH` become strings."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):  # bit_length: str() of a huge integer raises before it could be measured
        return value if value.bit_length() <= MAX_INT_DIGITS * 3 else _short(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and not isinstance(value, (dict, list, tuple)):  # tensors, numpy scalars
        return jsonable(value.tolist(), depth)
    if depth >= MAX_SETTINGS_DEPTH and isinstance(value, (dict, list, tuple, set, frozenset)):
        return _short(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    return _short(value)


def _short(value, limit: int = 200) -> str:
    """A value JSON cannot hold, as a bounded string (``repr`` of huge objects is cut)."""
    try:
        text = (
            repr(value)
            if not isinstance(value, int)
            else f"<integer of about {value.bit_length() * 0.30103:.0f} digits>"
        )
    except (ValueError, RecursionError):  # a self-referencing or huge object
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_graph(graph: nx.DiGraph, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a circuit graph atomically as GraphML, GEXF, node-link JSON, DOT or EAP-IG / MIB JSON (by suffix)."""
    path = Path(path)
    fmt = graph_format(path, fmt)
    if fmt in ("mib", "neuronpedia"):
        raise ValueError(f"{path.name}: {FORMAT_NAMES[fmt]} files hold circuits: write them with Circuit.save")
    if fmt == "graphml":
        return write_bytes(path, "\n".join(nx.generate_graphml(graph)).encode())
    if fmt == "gexf":  # GEXF keeps only a graph name: carry the graph attributes in it as JSON
        copy = graph.copy()
        copy.graph = {"name": json.dumps(dict(graph.graph))}
        return write_bytes(path, "\n".join(nx.generate_gexf(copy)).encode())
    if fmt == "json":
        return write_text(path, json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
    if fmt == "dot-layered":
        return write_text(path, layered_dot(graph))
    return write_text(path, _to_dot(graph))


def circuit_subgraph(graph: nx.DiGraph) -> nx.DiGraph:
    """The circuit's edges of a full circuit graph (``in_circuit``), with the structural q/k/v -> head
    edges of the receivers they use, and the nodes they touch; ``input`` and ``logits`` always."""
    kept = [(u, v) for u, v, d in graph.edges(data=True) if d.get("in_circuit")]
    sub = graph.edge_subgraph(kept).copy()
    for name in ("input", "logits"):
        if name in graph and name not in sub:
            sub.add_node(name, **graph.nodes[name])
    sub.graph.update(graph.graph)
    return sub


def settings_of(graph: nx.DiGraph) -> dict:
    """The settings a circuit graph carries (its ``settings`` attribute), or ``{}``."""
    try:
        settings = json.loads(graph.graph.get("settings", "{}"))
    except (TypeError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


# Layered drawing: colours by sign (blue: positive score, red: negative), as ACDC's and EAP-IG's drawings.
POSITIVE, NEGATIVE, STRUCTURAL = "#1f5fbf", "#c62828", "#9e9e9e"
MIN_PEN, MAX_PEN = 0.5, 6.0


def layered_dot(graph: nx.DiGraph) -> str:
    """The circuit of a full circuit graph as a layered Graphviz drawing, in the style of ACDC's and
    EAP-IG's (Conmy et al. 2023; Hanna et al. 2024): ``rankdir=BT`` with one rank per layer, the
    input at the bottom and the logits at the top, each head's q/k/v inputs in the head's rank beside
    it (a cluster), each MLP in a rank above its layer's heads; an edge's colour gives its score's sign and its
    pen width ``|score|`` (scaled to the largest). For ``dot -Tsvg``; not read back (use ``.dot``)."""
    g = circuit_subgraph(graph)
    biggest = max((abs(d.get("score", 0.0)) for _, _, d in g.edges(data=True) if not d.get("structural")), default=0.0)
    node_ids = {n: f"n{i}" for i, n in enumerate(sorted(g.nodes, key=str))}  # ids never come from names

    def label(name) -> str:
        return _dot_value(_printable(str(name)))

    def layer_of(n) -> int:
        layer = g.nodes[n].get("layer")
        return layer if isinstance(layer, int) and not isinstance(layer, bool) else -1

    title = _printable(_layered_title(graph))
    lines = [
        "digraph circuit {",
        "  graph [rankdir=BT, newrank=true, nodesep=0.25, ranksep=0.6, fontname=Helvetica, "
        f"label={_dot_value(title)}, labelloc=t];",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, fontsize=11];',
        "  edge [arrowsize=0.6];",
    ]
    kinds = {
        "input": ("#e0e0e0", "box"),
        "logits": ("#e0e0e0", "box"),
        "head": ("#fff3c4", "box"),
        "mlp": ("#d7ecd9", "box"),
        "input_q": ("#ffffff", "ellipse"),
        "input_k": ("#ffffff", "ellipse"),
        "input_v": ("#ffffff", "ellipse"),
    }
    by_rank: dict[int, list] = {}
    heads_inputs: dict = {}
    for n in g.nodes:
        kind = g.nodes[n].get("kind", "")
        if kind.startswith("input_"):
            for _, head in g.out_edges(n):
                heads_inputs.setdefault(head, []).append(n)
        # ranks: the input, then per layer its heads (with their q/k/v inputs) and its MLP, the logits last
        rank = 10**9 if kind == "logits" else -1 if kind == "input" else 2 * layer_of(n) + (kind == "mlp")
        by_rank.setdefault(rank, []).append(n)
    # a column of rank labels, chained by invisible edges: ranks stay in layer order even where no
    # circuit edge orders them (an MLP that only writes, a layer the circuit skips)
    ranks = sorted(by_rank)
    for i, rank in enumerate(ranks):
        text = "logits" if rank == 10**9 else "input" if rank == -1 else f"L{rank // 2} {'mlp' if rank % 2 else 'attn'}"
        lines.append(f'  r{i} [label={_dot_value(text)}, shape=plaintext, style=solid, fontcolor="#757575"];')
        members = "; ".join(node_ids[n] for n in sorted(by_rank[rank], key=str))
        lines.append(f"  {{ rank=same; r{i}; {members}; }}")
    lines += [f"  r{i} -> r{i + 1} [style=invis, weight=100];" for i in range(len(ranks) - 1)]
    for head, inputs in sorted(heads_inputs.items(), key=lambda x: str(x[0])):
        members = "; ".join(node_ids[n] for n in sorted([head, *inputs], key=str))
        lines.append(f"  subgraph cluster_{node_ids[head]} {{ style=invis; {members}; }}")
    for n in sorted(g.nodes, key=str):
        fill, shape = kinds.get(g.nodes[n].get("kind", ""), ("#ffffff", "box"))
        lines.append(f"  {node_ids[n]} [label={label(n)}, shape={shape}, fillcolor={_dot_value(fill)}];")
    for u, v, d in sorted(g.edges(data=True), key=lambda e: (str(e[0]), str(e[1]))):
        if d.get("structural"):
            lines.append(
                f"  {node_ids[u]} -> {node_ids[v]} [color={_dot_value(STRUCTURAL)}, style=dashed, penwidth=0.8];"
            )
            continue
        score = float(d.get("score", 0.0))
        width = MIN_PEN + (MAX_PEN - MIN_PEN) * (abs(score) / biggest if biggest > 0 else 0.0)
        color = NEGATIVE if score < 0 else POSITIVE
        lines.append(
            f"  {node_ids[u]} -> {node_ids[v]} [color={_dot_value(color)}, penwidth={width:.2f}, "
            f"tooltip={_dot_value(f'{score:+.4g}')}];"
        )
    return "\n".join(lines + ["}"]) + "\n"


def _printable(text: str, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _layered_title(graph: nx.DiGraph) -> str:
    s = settings_of(graph)
    parts = [str(s.get(k)) for k in ("algorithm", "corruption", "metric", "direction") if s.get(k) is not None]
    n = sum(1 for _, _, d in graph.edges(data=True) if d.get("in_circuit") and not d.get("structural"))
    title = f"{'/'.join(parts) or 'circuit'}: {n} edges"
    if isinstance(graph.graph.get("faithfulness"), float):
        title += f", faithfulness {graph.graph['faithfulness']:.3f}"
    return title


def read_graph(path: str | os.PathLike, fmt: str | None = None) -> nx.DiGraph:
    """Read a graph written by :func:`write_graph`, with attribute types restored.

    Raises:
        GraphFileError: the file is missing, too large, empty, binary, not valid in its format,
            hostile (XML with a DTD, deeply nested DOT), or has attributes of the wrong type.
    """
    path = Path(path)
    fmt = graph_format(path, fmt)
    if fmt == "mib":
        raise ValueError(f"{path.name}: EAP-IG / MIB files hold circuits: read them with Circuit.load")
    if fmt in WRITE_ONLY:
        raise GraphFileError(
            f"{path}: {FORMAT_NAMES[fmt]} files are written for other tools and not read back; "
            f"read the circuit from its GraphML, GEXF, node-link JSON, DOT or MIB file"
        )
    data = read_limited(path, fmt)
    name = FORMAT_NAMES[fmt]
    try:
        if fmt in ("graphml", "dot"):
            _check_counts(path, data, fmt)  # before the parser builds anything
        if fmt == "graphml":
            g = _graphml(data)
        elif fmt == "gexf":
            g = _gexf(data)
        elif fmt == "json":
            g = _node_link(data)
        else:
            g = _from_dot(data.decode("utf-8"), path)
        g = nx.DiGraph(g)
    except GraphFileError:
        raise
    except DefusedXmlException as err:
        raise GraphFileError(
            f"{path}: refused: XML with a DTD or entity declarations (entities can expand "
            f"without limit or read other files): {one_line(err)}"
        ) from err
    except _PARSE_ERRORS as err:
        raise GraphFileError(f"{path}: not a valid {name} file: {one_line(err)}") from err
    try:
        return _retype(g)
    except ValueError as err:
        raise GraphFileError(f"{path}: {err}") from err


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line (parser messages can span lines or quote whole inputs)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_limited(path: Path, fmt: str) -> bytes:
    """The file's bytes: at most the format's size limit, not empty, not binary."""
    limit = MAX_DOT_FILE_BYTES if fmt == "dot" else MAX_GRAPH_FILE_BYTES
    name = FORMAT_NAMES[fmt]
    try:
        if not path.exists():
            raise GraphFileError(f"{path}: no such file")
        if not path.is_file():
            raise GraphFileError(f"{path}: not a file")
        size = path.stat().st_size
        if size > limit:
            raise GraphFileError(f"{path}: {size} bytes is larger than the {limit}-byte limit for {name} files")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise GraphFileError(f"{path}: cannot read the file: {err.strerror or err}") from err
    if len(data) > limit:
        raise GraphFileError(f"{path}: larger than the {limit}-byte limit for {name} files")
    if not data.strip():
        raise GraphFileError(f"{path}: the file is empty")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GraphFileError(f"{path}: binary content (byte {err.start} is not UTF-8 text): not a {name} file") from err
    return data


def _declared_size(raw: dict) -> tuple[int, int] | None:
    """Nodes and edges of the shape the graph attributes ``raw`` declare, or ``None`` when they do not
    declare a valid one (then the full parse and :meth:`Circuit.from_networkx` report the problem)."""
    try:
        attrs = {k: _parse(raw[k], typ, k) for k, typ in SHAPE_TYPES.items() if k in raw}
        return networkx_size(**declared_shape(attrs))
    except (ValueError, TypeError):
        return None


_XML_ATTR = re.compile(r"""([\w.:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_GRAPHML_KEY = re.compile(rb"<key\b[^>]*>")
_GRAPHML_DATA = re.compile(rb"<data\b([^>]*)>([^<]*)</data>")
_GRAPHML_GRAPH = re.compile(rb"<graph[\s>]")
_GRAPHML_ITEM = re.compile(rb"<(node|edge)[\s/>]")
_DOT_GRAPH_ATTR = re.compile(r"\bgraph\s*\[\s*(\w+)\s*=\s*(?:\"([^\"]*)\"|([\w.+-]+))\s*\]")


_XML_SKIPPED = re.compile(rb"<!--.*?-->|<!\[CDATA\[.*?\]\]>", re.DOTALL)


def _xml_outside_skipped(data: bytes) -> bytes:
    """The XML text with comments and CDATA sections blanked (same length), so tags inside them are not read."""
    if b"<!--" not in data and b"<![CDATA[" not in data:
        return data
    return _XML_SKIPPED.sub(lambda m: b" " * len(m.group(0)), data)


def _graphml_declared(data: bytes) -> dict[str, str]:
    """The graph attributes of a GraphML file (keys declared ``for="graph"``), found without parsing
    the file: the graph's ``<data>`` may stand before its nodes (valid GraphML) or after them (as
    networkx writes it). A graph key given two different values declares no shape (None: the parse
    decides)."""
    found_graph = _GRAPHML_GRAPH.search(data)
    start = found_graph.start() if found_graph else 0
    keys = {}
    for tag in _GRAPHML_KEY.findall(data, 0, start):
        attrs = {m[0]: m[1] or m[2] for m in _XML_ATTR.findall(tag.decode("utf-8", "replace"))}
        if attrs.get("for") == "graph" and "id" in attrs and "attr.name" in attrs:
            keys[attrs["id"]] = attrs["attr.name"]
    found: dict[str, str] = {}
    if not keys:
        return found
    for attrs_text, value in _GRAPHML_DATA.findall(data, start):
        attrs = {m[0]: m[1] or m[2] for m in _XML_ATTR.findall(attrs_text.decode("utf-8", "replace"))}
        if attrs.get("key") in keys:
            name, text = keys[attrs["key"]], value.decode("utf-8", "replace").strip()
            if found.setdefault(name, text) != text:
                return {}
    return found


def _check_counts(path: Path, data: bytes, fmt: str) -> None:
    """Count the nodes and edges of a GraphML or DOT file while scanning it, and stop at the first
    one beyond its declared shape: a small declared graph cannot make the parser build millions of
    nodes (or pydot spend minutes on them). GraphML comments and CDATA are skipped, not counted.
    Files without a readable declared shape are left to the parser and to
    :meth:`Circuit.from_networkx`'s exact count."""
    if fmt == "graphml":
        data = _xml_outside_skipped(data)  # tags in comments and CDATA are not elements
        bound = _declared_size(_graphml_declared(data))
        if bound is None:
            return
        most = {b"node": bound[0], b"edge": bound[1]}
        seen = {b"node": 0, b"edge": 0}
        for match in _GRAPHML_ITEM.finditer(data):
            kind = match.group(1)
            seen[kind] += 1
            if seen[kind] > most[kind]:
                raise GraphFileError(
                    f"{path}: more than {most[kind]} <{kind.decode()}> elements: the declared shape has "
                    f"{bound[0]} nodes and {bound[1]} edges (refused at byte {match.start()} of {len(data)})"
                )
        return
    text = _DOT_QUOTED.sub('""', data.decode("utf-8"))  # arrows and semicolons inside names do not count
    raw = {}
    for m in _DOT_GRAPH_ATTR.finditer(data.decode("utf-8")):
        raw[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
    bound = _declared_size(raw)
    if bound is None:
        return
    # every edge statement holds at least one arrow; each statement (graph attribute, node, edge) ends in ';'
    for token, allowed, what in (
        ("->", bound[1], "edge arrows"),
        (";", bound[0] + bound[1] + len(raw) + 16, "statements"),
    ):
        found = text.count(token)
        if found > allowed:
            raise GraphFileError(
                f"{path}: {found} {what}, more than the {allowed} of the declared shape "
                f"({bound[0]} nodes and {bound[1]} edges): refused before parsing"
            )


def _graphml(data: bytes) -> nx.Graph:
    root = defused_fromstring(data, forbid_dtd=True)
    reader = GraphMLReader()
    graphs = root.findall(f"{{{reader.NS_GRAPHML}}}graph")
    if not graphs:
        raise ValueError("no <graph> element in the GraphML namespace")
    keys, defaults = reader.find_graphml_keys(root)
    return reader.make_graph(graphs[0], keys, defaults)


def _gexf(data: bytes) -> nx.Graph:
    root = defused_fromstring(data, forbid_dtd=True)
    reader = GEXFReader(node_type=None)
    for version in reader.versions:
        reader.set_version(version)
        element = root.find(f"{{{reader.NS_GEXF}}}graph")
        if element is not None:
            break
    else:
        raise ValueError("no <graph> element in a GEXF namespace")
    g = reader.make_graph(element)
    attrs = json.loads(g.graph.get("name") or "{}")  # write_graph keeps the graph attributes here
    if not isinstance(attrs, dict):
        raise ValueError("the graph name does not hold the graph attributes as a JSON object")
    g.graph = attrs
    for _, d in g.nodes(data=True):
        d.pop("label", None)
    for _, _, d in g.edges(data=True):
        d.pop("id", None)
    return g


def _node_link(data: bytes) -> nx.Graph:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"the top level is a JSON {type(obj).__name__}, not an object")
    for key in ("nodes", "edges"):
        if not isinstance(obj.get(key), list):
            raise ValueError(f"{key!r} must be a list")
    if not isinstance(obj.get("graph", {}), dict):
        raise ValueError("'graph' must be an object")
    bound = _declared_size(obj.get("graph", {}))
    if bound is not None:
        for key, found, most in (("nodes", len(obj["nodes"]), bound[0]), ("edges", len(obj["edges"]), bound[1])):
            if found > most:
                raise ValueError(f"{found} {key}: more than the {most} of the declared shape")
    return nx.node_link_graph(obj, directed=True, edges="edges")


def _retype(g: nx.DiGraph) -> nx.DiGraph:
    for reader_default in ("node_default", "edge_default"):
        g.graph.pop(reader_default, None)
    for n, d in g.nodes(data=True):
        for k, typ in NODE_TYPES.items():
            if k in d:
                d[k] = _parse(d[k], typ, f"node {_short_repr(n)} attribute {k}")
    for u, v, d in g.edges(data=True):
        for k, typ in EDGE_TYPES.items():
            if k in d:
                d[k] = _parse(d[k], typ, f"edge {_short_repr(u)} -> {_short_repr(v)} attribute {k}")
    for k, typ in GRAPH_TYPES.items():
        if k in g.graph:
            g.graph[k] = _parse(g.graph[k], typ, f"graph attribute {k}")
    return g


_INT_TEXT = re.compile(r"[+-]?\d{1,18}")


def _parse(value, typ, what: str):
    """``value`` (a string from DOT/GEXF, or already typed) as ``typ``, strictly: no truncation, no guessing."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip() in ("True", "true", "1", "False", "false", "0"):
            return value.strip() in ("True", "true", "1")
        raise ValueError(f"{what}: {_short_repr(value)} is not true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            return int(value)
        raise ValueError(f"{what}: {_short_repr(value)} is not a whole number")
    if typ is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an integer of thousands of digits
                number = math.inf if isinstance(value, int) else None
        if number is None:
            raise ValueError(f"{what}: {_short_repr(value)} is not a number")
        if not math.isfinite(number):  # NaN, inf, or a literal like 1e400 that overflows to inf
            raise ValueError(
                f"{what}: {_short_repr(value)} is not a finite number (NaN and infinite scores are refused)"
            )
        return number
    if not isinstance(value, str):
        raise ValueError(f"{what}: {_short_repr(value)} is not a string")
    return value


def _dot_value(v) -> str:
    text = repr(v) if isinstance(v, float) else str(v)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _to_dot(g: nx.DiGraph) -> str:
    lines = ["digraph circuit {"]
    lines += [f"  graph [{k}={_dot_value(v)}];" for k, v in g.graph.items()]
    for n, d in g.nodes(data=True):
        attrs = ", ".join(f"{k}={_dot_value(v)}" for k, v in d.items())
        lines.append(f"  {_dot_value(n)} [{attrs}];")
    for u, v, d in g.edges(data=True):
        attrs = ", ".join(f"{k}={_dot_value(x)}" for k, x in d.items())
        lines.append(f"  {_dot_value(u)} -> {_dot_value(v)} [{attrs}];")
    return "\n".join(lines + ["}"]) + "\n"


_DOT_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_DOT_BRACKETS = re.compile(r"[{}\[\]]")


def dot_nesting(text: str) -> int:
    """How deep ``{}`` and ``[]`` nest in DOT text, outside quoted strings (linear time, no recursion)."""
    depth = deepest = 0
    for match in _DOT_BRACKETS.finditer(_DOT_QUOTED.sub("", text)):
        depth += 1 if match.group() in "{[" else -1
        deepest = max(deepest, depth)
    return deepest


def _from_dot(text: str, path: Path | str = "DOT text") -> nx.DiGraph:
    import pydot

    depth = dot_nesting(text)
    if depth > MAX_DOT_NESTING:
        raise GraphFileError(
            f"{path}: brackets nested {depth} deep (more than {MAX_DOT_NESTING}): "
            f"refused, deeply nested DOT exhausts the parser"
        )
    with _DOT_LOCK, contextlib.redirect_stdout(io.StringIO()) as printed:  # pydot prints parse errors
        graphs = pydot.graph_from_dot_data(text)
    if not graphs:
        lines = printed.getvalue().strip().splitlines()
        raise ValueError(lines[-1] if lines else "no graph found")
    if len(graphs) != 1:
        raise ValueError(f"{len(graphs)} graphs in one file, expected one")
    (dot,) = graphs

    def clean(attrs: dict) -> dict:
        return {
            k: v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if isinstance(v, str) and v.startswith('"') else v
            for k, v in attrs.items()
        }

    g = nx.DiGraph()
    g.graph.update(clean(dot.get_attributes()))
    for sub in dot.get_graph_defaults() or []:
        g.graph.update(clean(sub))
    for node in dot.get_nodes():
        name = clean({"n": node.get_name()})["n"]
        if name in ("graph", "node", "edge"):
            continue
        g.add_node(name, **clean(node.get_attributes()))
    for edge in dot.get_edges():
        u, v = (clean({"n": x})["n"] for x in (edge.get_source(), edge.get_destination()))
        g.add_edge(u, v, **clean(edge.get_attributes()))
    return g
