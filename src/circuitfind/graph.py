"""The model's computational graph, and circuits as networkx graphs.

Nodes are the input embedding (``input``), every attention head (``a{layer}.{head}``), every MLP
(``m{layer}``) and the ``logits``. A sender writes to the residual stream; a receiver reads it:
each head reads through three separate inputs ``a{l}.{h}<q>``, ``<k>``, ``<v>`` (or one, with
``split_qkv=False``), each MLP and the logits through one. An edge joins a sender to every
receiver downstream of it in the residual stream.

:class:`ModelGraph` holds that structure as index tensors for the edge-patching engine (edges in a
fixed order, ``edges[i] = (sender, receiver)``). :meth:`ModelGraph.to_networkx` gives the
``networkx.DiGraph`` (ACDC's convention: q/k/v input nodes feed their head through structural
edges), and :func:`write_graph` / :func:`read_graph` move it through GraphML, GEXF, node-link JSON
and DOT without loss.

Files are untrusted input: :func:`read_graph` bounds the file size, parses XML with ``defusedxml``
(no DTDs, so no entity expansion or external entities), checks DOT nesting before pydot sees it,
and reports every problem as one :class:`~circuitfind.errors.GraphFileError` naming the file.
Graph sizes are bounded before anything is allocated (:func:`check_shape`, :data:`MAX_EDGES`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx
import torch
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring
from networkx.readwrite.gexf import GEXFReader
from networkx.readwrite.graphml import GraphMLReader

from circuitfind.checks import positive_int
from circuitfind.errors import GraphFileError
from circuitfind.io import write_bytes, write_text

QKV = ("q", "k", "v")
INPUT, LOGITS = "input", "logits"

# Bounds on any graph, checked by arithmetic before its edges are built. For scale: toy-ioi has 262
# edges, GPT-2 small 32,491, SmolLM2-135M 70,651, Llama-2-7B about 1.6 million, Llama-3-70B 16.6 million.
MAX_EDGES = 20_000_000
MAX_EDGE_POSITIONS = 100_000_000  # edges x positions of a per-position graph


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def receiver_node(head: str, which: str) -> str:
    """Name of a head's q/k/v input node, e.g. ``a1.2<q>``."""
    return f"{head}<{which}>"


def kv_group_name(layer: int, group: int) -> str:
    """A grouped-query attention key/value group, e.g. ``a1.g0`` (its heads share k and v)."""
    return f"a{layer}.g{group}"


@dataclass(frozen=True)
class Receiver:
    """One receiver input: a head's q/k/v (or merged) input, an MLP input or the logits.

    With grouped-query attention a k or v input is shared by a group of heads: ``head`` is then the
    key/value head index and ``feeds`` lists every head of the group.
    """

    name: str  # e.g. "a1.2<q>", "a1.2" (merged qkv), "a1.g0<k>" (GQA), "m1", "logits"
    node: str  # the component it feeds (the group's first head for a GQA k/v input)
    layer: int
    kind: str  # "q", "k", "v", "qkv", "mlp", "logits"
    head: int = -1
    feeds: tuple[str, ...] = ()


def edge_count(n_layers: int, n_heads: int, split_qkv: bool = True, n_kv_heads: int | None = None) -> int:
    """Number of edges of :class:`ModelGraph` of this shape, by arithmetic (nothing is allocated).

    Layer ``l``'s attention receivers (q, k, v per head, k and v per key/value head; or one merged
    input per head) read the ``1 + l (H + 1)`` senders below it, its MLP those and the layer's heads,
    and the logits every sender.
    """
    kv = n_kv_heads or n_heads
    attention_receivers = n_heads + 2 * kv if split_qkv else n_heads
    senders_below = n_layers + (n_heads + 1) * n_layers * (n_layers - 1) // 2  # sum over layers of 1 + l (H + 1)
    return (attention_receivers + 1) * senders_below + n_layers * n_heads + 1 + n_layers * (n_heads + 1)


def describe_shape(n_layers, n_heads, split_qkv=True, n_pos=None, n_kv_heads=None) -> str:
    """A graph shape as ``n_layers=3, n_heads=4, ...`` (for messages)."""
    values = {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads or n_heads, "split_qkv": split_qkv,
              "n_pos": n_pos}
    return ", ".join(f"{k}={_short_repr(v)}" for k, v in values.items())


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_shape(n_layers: int, n_heads: int, split_qkv: bool = True, n_pos: int | None = None,
                n_kv_heads: int | None = None) -> int:
    """Check a graph shape (types, ranges, size bounds) without building it; return its edge count."""
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        positive_int(name, value)
    for name, value in (("n_kv_heads", n_kv_heads), ("n_pos", n_pos)):
        if value is not None:
            positive_int(name, value)
    if not isinstance(split_qkv, bool):
        raise ValueError(f"split_qkv must be True or False, got {_short_repr(split_qkv)}")
    kv = n_kv_heads or n_heads
    if kv > n_heads or n_heads % kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({kv})")
    if kv != n_heads and not split_qkv:
        raise ValueError("merged q/k/v receivers need one k/v input per head; use split_qkv=True "
                         "for grouped-query attention")
    shape = describe_shape(n_layers, n_heads, split_qkv, n_pos, n_kv_heads)
    if n_layers > MAX_EDGES or n_heads > MAX_EDGES:  # keeps the arithmetic below on small numbers
        raise ValueError(f"graph too large: {shape} (at most {MAX_EDGES} edges, circuitfind.graph.MAX_EDGES)")
    edges = edge_count(n_layers, n_heads, split_qkv, kv)
    if edges > MAX_EDGES:
        raise ValueError(f"graph too large: {shape} has {edges} edges (at most {MAX_EDGES}, circuitfind.graph.MAX_EDGES)")
    if n_pos is not None and edges * n_pos > MAX_EDGE_POSITIONS:
        raise ValueError(f"graph too large: {shape} has {edges} edges x n_pos={n_pos} positions "
                         f"(at most {MAX_EDGE_POSITIONS}, circuitfind.graph.MAX_EDGE_POSITIONS)")
    return edges


@dataclass
class ModelGraph:
    """Senders, receivers and edges of a transformer's residual-stream graph.

    Args:
        n_layers, n_heads: the model's shape.
        split_qkv: separate q, k and v receivers per head (default), or one merged input.
        n_pos: if given, one edge per position (edge masks gain a trailing ``pos`` axis).
        n_kv_heads: key/value heads of grouped-query attention (default: ``n_heads``); k and v
            receivers are then one per key/value head.
    """

    n_layers: int
    n_heads: int
    split_qkv: bool = True
    n_pos: int | None = None
    n_kv_heads: int | None = None
    senders: list[str] = field(init=False)
    receivers: list[Receiver] = field(init=False)

    def __post_init__(self):
        check_shape(self.n_layers, self.n_heads, self.split_qkv, self.n_pos, self.n_kv_heads)
        L, H = self.n_layers, self.n_heads
        kv = self.n_kv_heads = self.n_kv_heads or H
        self.senders = [INPUT]
        self.receivers = []
        for layer in range(L):
            heads = [head_name(layer, h) for h in range(H)]
            kinds = QKV if self.split_qkv else ("qkv",)
            for kind in kinds:  # receivers grouped by input kind, heads in order, per layer
                if kind in ("k", "v") and kv != H:
                    size = H // kv
                    for g in range(kv):
                        group = tuple(heads[g * size : (g + 1) * size])
                        name = receiver_node(kv_group_name(layer, g), kind)
                        self.receivers.append(Receiver(name, group[0], layer, kind, g, group))
                    continue
                for h, name in enumerate(heads):
                    rname = receiver_node(name, kind) if self.split_qkv else name
                    self.receivers.append(Receiver(rname, name, layer, kind, h, (name,)))
            self.senders += heads
            self.receivers.append(Receiver(mlp_name(layer), mlp_name(layer), layer, "mlp", -1, (mlp_name(layer),)))
            self.senders.append(mlp_name(layer))
        self.receivers.append(Receiver(LOGITS, LOGITS, L, "logits", -1, (LOGITS,)))

    @classmethod
    def from_model(cls, model, split_qkv: bool = True, n_pos: int | None = None) -> "ModelGraph":
        kv = getattr(model.cfg, "n_key_value_heads", None)
        return cls(model.cfg.n_layers, model.cfg.n_heads, split_qkv, n_pos, kv)

    def receiver_name(self, layer: int, head: int, kind: str) -> str:
        """The receiver reading query head ``head``'s ``kind`` input (its key/value group for GQA k/v)."""
        if kind in ("k", "v") and self.n_kv_heads != self.n_heads:
            return receiver_node(kv_group_name(layer, head // (self.n_heads // self.n_kv_heads)), kind)
        return receiver_node(head_name(layer, head), kind) if self.split_qkv else head_name(layer, head)

    # -- structure as indices ---------------------------------------------------------------
    def senders_before(self, layer: int) -> int:
        """Number of senders below ``layer``: the input, then each layer's heads and MLP."""
        return 1 + layer * (self.n_heads + 1)

    def upstream(self, receiver: Receiver) -> int:
        """Number of senders that write before ``receiver`` reads (senders are topologically ordered)."""
        if receiver.kind == "logits":
            return len(self.senders)
        if receiver.kind == "mlp":
            return self.senders_before(receiver.layer) + self.n_heads
        return self.senders_before(receiver.layer)

    @cached_property
    def edge_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sender_idx, receiver_idx)`` of every edge, ordered by receiver then sender."""
        s_idx, r_idx = [], []
        for r, receiver in enumerate(self.receivers):
            n = self.upstream(receiver)
            s_idx += range(n)
            r_idx += [r] * n
        return torch.tensor(s_idx), torch.tensor(r_idx)

    @property
    def n_edges(self) -> int:
        return len(self.edge_index[0])

    @property
    def shape(self) -> dict:
        """What makes two graphs the same: layers, heads, key/value heads, split q/k/v, positions."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "split_qkv": self.split_qkv, "n_pos": self.n_pos}

    @cached_property
    def edges(self) -> list[tuple[str, str]]:
        s_idx, r_idx = self.edge_index
        return [(self.senders[s], self.receivers[r].name) for s, r in zip(s_idx.tolist(), r_idx.tolist())]

    @cached_property
    def edge_lookup(self) -> dict[tuple[str, str], int]:
        return {e: i for i, e in enumerate(self.edges)}

    def receiver_slices(self, layer: int, kind: str) -> list[int]:
        """Receiver indices of one layer's q, k, v (or merged) inputs, in head order."""
        return [i for i, r in enumerate(self.receivers) if r.layer == layer and r.kind == kind]

    def dense(self, masks: torch.Tensor) -> torch.Tensor:
        """Flat edge masks ``[C, n_edges(, pos)]`` -> dense ``[C, senders, receivers(, pos)]``.

        Entries that are not edges are 1 (never read). Differentiable in ``masks``.
        """
        s_idx, r_idx = (i.to(masks.device) for i in self.edge_index)
        C = masks.shape[0]
        shape = (C, len(self.senders), len(self.receivers), *masks.shape[2:])
        c_idx = torch.arange(C, device=masks.device)[:, None].expand(C, self.n_edges)
        base = torch.ones(shape, dtype=masks.dtype, device=masks.device)
        return base.index_put((c_idx, s_idx.expand(C, -1), r_idx.expand(C, -1)), masks)

    def edge_nodes(self, i: int) -> tuple[str, tuple[str, ...]]:
        """Edge ``i``'s sender and the components its receiver feeds."""
        return self.edges[i][0], self.receivers[self.edge_index[1][i]].feeds

    # -- networkx ---------------------------------------------------------------------------
    def to_networkx(self, scores: torch.Tensor | None = None, in_circuit: torch.Tensor | None = None,
                    **graph_attrs) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph`` with ``layer``, ``head``, ``kind``, ``score``, ``in_circuit``.

        With ``n_pos`` set, edge attributes ``score`` and ``in_circuit`` are summed / any-ed over
        positions and per-position values are kept as ``score_pos`` (a JSON list).
        """
        g = nx.DiGraph()
        g.graph.update({"n_layers": self.n_layers, "n_heads": self.n_heads, "split_qkv": self.split_qkv,
                        "n_pos": -1 if self.n_pos is None else self.n_pos, "n_kv_heads": self.n_kv_heads})
        g.graph.update({k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in graph_attrs.items()})
        keep = torch.ones(self.n_edges, dtype=torch.bool) if in_circuit is None else in_circuit.bool().cpu()
        edge_scores = torch.zeros(self.n_edges) if scores is None else scores.detach().float().cpu()
        per_pos = edge_scores.dim() == 2
        flat_keep = keep.any(-1) if keep.dim() == 2 else keep
        flat_score = edge_scores.sum(-1) if per_pos else edge_scores
        g.add_node(INPUT, layer=-1, head=-1, kind="input", score=0.0, in_circuit=False)
        for layer in range(self.n_layers):
            for h in range(self.n_heads):
                g.add_node(head_name(layer, h), layer=layer, head=h, kind="head", score=0.0, in_circuit=False)
            g.add_node(mlp_name(layer), layer=layer, head=-1, kind="mlp", score=0.0, in_circuit=False)
        g.add_node(LOGITS, layer=self.n_layers, head=-1, kind="logits", score=0.0, in_circuit=False)
        for r in self.receivers:
            if r.kind in QKV:
                g.add_node(r.name, layer=r.layer, head=r.head, kind=f"input_{r.kind}", score=0.0, in_circuit=False)
        for i, (s, r) in enumerate(self.edges):
            attrs = {"score": float(flat_score[i]), "in_circuit": bool(flat_keep[i]), "structural": False}
            if per_pos:
                attrs["score_pos"] = json.dumps([float(x) for x in edge_scores[i]])
            if keep.dim() == 2:
                attrs["in_circuit_pos"] = json.dumps([bool(x) for x in keep[i]])
            g.add_edge(s, r, **attrs)
        for r in self.receivers:  # q/k/v input nodes feed their head (every head of a GQA group)
            if r.kind in QKV:
                used = any(d["in_circuit"] for _, _, d in g.in_edges(r.name, data=True))
                for head in r.feeds:
                    g.add_edge(r.name, head, score=0.0, in_circuit=used, structural=True)
        _mark_nodes(g)
        return g


def _mark_nodes(g: nx.DiGraph) -> None:
    """A node is in the circuit if an in-circuit edge touches it."""
    for u, v, d in g.edges(data=True):
        if d["in_circuit"]:
            g.nodes[u]["in_circuit"] = g.nodes[v]["in_circuit"] = True


# -- import / export ----------------------------------------------------------------------

FORMATS = {".graphml": "graphml", ".gexf": "gexf", ".json": "json", ".dot": "dot", ".gv": "dot"}
FORMAT_NAMES = {"graphml": "GraphML", "gexf": "GEXF", "json": "node-link JSON", "dot": "DOT"}
NODE_TYPES = {"layer": int, "head": int, "kind": str, "score": float, "in_circuit": bool}
EDGE_TYPES = {"score": float, "in_circuit": bool, "structural": bool, "score_pos": str, "in_circuit_pos": str}
GRAPH_TYPES = {"n_layers": int, "n_heads": int, "split_qkv": bool, "n_pos": int, "n_kv_heads": int}

# Limits on files read (checked before parsing). The GraphML of a full SmolLM2-135M circuit is 13 MB.
MAX_GRAPH_FILE_BYTES = 128 * 2**20
# pydot parses DOT at roughly 30-50 KB/s: larger DOT files would take minutes (use GraphML or JSON).
MAX_DOT_FILE_BYTES = 4 * 2**20
# Our DOT nests 2 deep (graph body, attribute list); pydot's recursive parser fails near 100.
MAX_DOT_NESTING = 16

# What the parsers raise on malformed input (defusedxml's refusals are ValueErrors).
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, SyntaxError, RecursionError,
                 ArithmeticError, nx.NetworkXError)
_DOT_LOCK = threading.Lock()  # pydot's parser is not thread-safe


def _format(path: Path, fmt: str | None) -> str:
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in set(FORMATS.values()):
        raise ValueError(f"unknown graph format for {path.name!r}: use one of {sorted(set(FORMATS.values()))} "
                         f"(suffixes {sorted(FORMATS)})")
    return fmt


def write_graph(graph: nx.DiGraph, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a circuit graph atomically as GraphML, GEXF, node-link JSON or DOT (by suffix)."""
    path = Path(path)
    fmt = _format(path, fmt)
    if fmt == "graphml":
        return write_bytes(path, "\n".join(nx.generate_graphml(graph)).encode())
    if fmt == "gexf":  # GEXF keeps only a graph name: carry the graph attributes in it as JSON
        copy = graph.copy()
        copy.graph = {"name": json.dumps(dict(graph.graph))}
        return write_bytes(path, "\n".join(nx.generate_gexf(copy)).encode())
    if fmt == "json":
        return write_text(path, json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
    return write_text(path, _to_dot(graph))


def read_graph(path: str | os.PathLike, fmt: str | None = None) -> nx.DiGraph:
    """Read a graph written by :func:`write_graph`, with attribute types restored.

    Raises:
        GraphFileError: the file is missing, too large, empty, binary, not valid in its format,
            hostile (XML with a DTD, deeply nested DOT), or has attributes of the wrong type.
    """
    path = Path(path)
    fmt = _format(path, fmt)
    data = _read_limited(path, fmt)
    name = FORMAT_NAMES[fmt]
    try:
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
        raise GraphFileError(f"{path}: refused: XML with a DTD or entity declarations (entities can expand "
                             f"without limit or read other files): {_one_line(err)}") from err
    except _PARSE_ERRORS as err:
        raise GraphFileError(f"{path}: not a valid {name} file: {_one_line(err)}") from err
    try:
        return _retype(g)
    except ValueError as err:
        raise GraphFileError(f"{path}: {err}") from err


def _one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line (parser messages can span lines or quote whole inputs)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_limited(path: Path, fmt: str) -> bytes:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{what}: {_short_repr(value)} is not a number")
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
        raise GraphFileError(f"{path}: brackets nested {depth} deep (more than {MAX_DOT_NESTING}): "
                             f"refused, deeply nested DOT exhausts the parser")
    with _DOT_LOCK, contextlib.redirect_stdout(io.StringIO()) as printed:  # pydot prints parse errors
        graphs = pydot.graph_from_dot_data(text)
    if not graphs:
        lines = printed.getvalue().strip().splitlines()
        raise ValueError(lines[-1] if lines else "no graph found")
    if len(graphs) != 1:
        raise ValueError(f"{len(graphs)} graphs in one file, expected one")
    (dot,) = graphs

    def clean(attrs: dict) -> dict:
        return {k: v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if isinstance(v, str) and v.startswith('"') else v
                for k, v in attrs.items()}

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
