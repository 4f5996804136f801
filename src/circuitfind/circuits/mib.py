"""The circuit graph JSON of EAP-IG and the MIB circuit-localization track, read and written.

A file is one JSON object::

    {"cfg":   {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 16, ...},
     "nodes": {"input": {"in_graph": true}, "a0.h1": {"in_graph": false}, "m0": {...}, "logits": {...}},
     "edges": {"input->a0.h1<q>": {"score": 0.5, "in_graph": true}, "a0.h1->m0": {...}, ...}}

Names differ from circuitfind's only in the head's ``h`` (``a1.h2`` for ``a1.2``, ``a1.h2<q>`` for
``a1.2<q>``); the edge set is the same as :class:`~circuitfind.circuits.graph.ModelGraph`'s with split q/k/v
(``parallel_attn_mlp: false``). Where the two graphs differ, the mapping is:

* **Grouped-query attention.** EAP-IG has k/v inputs per *query* head; circuitfind one per key/value
  group (``a1.g0<k>``). Writing, a group's k (v) edge becomes the k (v) edge of every query head of
  the group, each with the group edge's score and ``in_graph`` (copies, not shares: MIB ranks edges
  by ``|score|``, and patching a group's input moves every head of the group). Reading, the per-head
  edges of one group merge: ``in_graph`` if any of them is, score their mean (so a file this module
  wrote reads back exactly). The group size comes from ``cfg["n_key_value_heads"]`` (TransformerLens's
  name), written for GQA models; a file without it has one k/v per head.
* **Merged q/k/v** (``split_qkv=False``) has no EAP-IG equivalent: a merged edge into head ``a1.2``
  is written as its three q, k and v edges with the same score and ``in_graph``. Files always read
  back with split q/k/v.
* **Per-position graphs** are written summed over positions (scores) and any-ed (``in_graph``), as
  :meth:`~circuitfind.circuits.graph.ModelGraph.to_networkx` does; the file has no positions.
* **Parallel attention and MLP** (``parallel_attn_mlp: true``, GPT-J / Pythia) has no circuitfind
  graph: such files are refused.

The cfg must hold ``d_model`` (EAP-IG allocates neuron tensors from it when it reads a file):
:func:`write_mib` takes it from the argument or from ``circuit.settings["d_model"]``. circuitfind's
settings travel in ``cfg["circuitfind_settings"]`` (EAP-IG keeps unknown cfg keys as they are).
Node ``in_graph`` is derived from the edges when writing (``logits`` always in) and not used when
reading: the circuit is its edges. Node and neuron scores are EAP-IG's own (``NaN`` = not scored)
and are checked for type only; a neuron-level circuit (a node with some neurons out) is refused.

Files are untrusted: size-bounded like every graph file, every edge of the declared shape must be
present with a finite score and a boolean ``in_graph``, and every problem is one
:class:`~circuitfind.errors.GraphFileError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from circuitfind.circuits.graph import ModelGraph, check_shape, describe_shape, edge_count
from circuitfind.circuits.graph_io import one_line, read_limited
from circuitfind.errors import GraphFileError
from circuitfind.io import write_text
from circuitfind.names import INPUT, LOGITS, QKV, head_name, is_head, mlp_name, parse_node

SUFFIX = ".mib.json"


class CircuitParts(NamedTuple):
    """What a MIB file holds, as :class:`~circuitfind.circuits.circuit.Circuit`'s arguments (this module sits
    below ``circuit``, which builds circuits from it)."""

    graph: ModelGraph
    in_circuit: torch.Tensor
    scores: torch.Tensor
    settings: dict


class EdgeSubset(Protocol):
    """What writing a MIB file reads from a circuit: a :class:`~circuitfind.circuits.circuit.Circuit` or a
    :class:`CircuitParts` (structural, so the file format never depends on ``circuit``)."""

    @property
    def graph(self) -> ModelGraph: ...
    @property
    def in_circuit(self) -> torch.Tensor: ...
    @property
    def scores(self) -> torch.Tensor | None: ...
    @property
    def settings(self) -> dict: ...


SETTINGS_KEY = "circuitfind_settings"


def mib_node(name: str) -> str:
    """circuitfind's component name in EAP-IG's naming: ``a1.2`` -> ``a1.h2``; others unchanged."""
    if is_head(name):
        node = parse_node(name)
        return f"a{node.layer}.h{node.index}"
    return name


def mib_edge_names(graph: ModelGraph) -> list[list[str]]:
    """For each edge of ``graph`` (in its order), the EAP-IG edge names it stands for."""
    names = []
    s_idx, r_idx = graph.edge_index
    for s, r in zip(s_idx.tolist(), r_idx.tolist(), strict=True):
        parent, receiver = mib_node(graph.senders[s]), graph.receivers[r]
        if receiver.kind in QKV:  # one per head of a GQA group, else one
            names.append([f"{parent}->{mib_node(head)}<{receiver.kind}>" for head in receiver.feeds])
        elif receiver.kind == "qkv":  # merged input: its three split edges
            names.append([f"{parent}->{mib_node(receiver.node)}<{kind}>" for kind in QKV])
        else:
            names.append([f"{parent}->{receiver.name}"])
    return names


def to_mib(circuit: EdgeSubset, d_model: int | None = None) -> dict:
    """The circuit as an EAP-IG / MIB graph object (see the module docstring for the mapping)."""
    graph = circuit.graph
    d_model = d_model if d_model is not None else circuit.settings.get("d_model")
    if not (isinstance(d_model, int) and not isinstance(d_model, bool) and d_model > 0):
        raise ValueError(
            "an EAP-IG / MIB graph file needs the model's d_model (EAP-IG reads it): "
            "pass it (Circuit.save(..., d_model=N) or mib.write_mib(..., d_model=N); circuitfind export --d-model N)"
        )
    keep = circuit.in_circuit.any(-1) if circuit.in_circuit.dim() == 2 else circuit.in_circuit
    scores = torch.zeros(graph.n_edges) if circuit.scores is None else circuit.scores
    scores = scores.sum(-1) if scores.dim() == 2 else scores
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": False, "d_model": d_model}
    if graph.n_kv_heads != graph.n_heads:
        cfg["n_key_value_heads"] = graph.n_kv_heads
    cfg[SETTINGS_KEY] = json.loads(json.dumps({**circuit.settings, "d_model": d_model}, default=str))
    edges = {}
    for names, score, in_graph in zip(mib_edge_names(graph), scores.tolist(), keep.tolist(), strict=True):
        for name in names:
            edges[name] = {"score": score, "in_graph": in_graph}
    in_nodes = {LOGITS}
    for i in keep.nonzero().flatten().tolist():  # the components an in-circuit edge touches
        sender, feeds = graph.edge_nodes(i)
        in_nodes.update(mib_node(n) for n in (sender, *feeds))
    nodes = {name: {"in_graph": name in in_nodes} for name in _node_names(graph.n_layers, graph.n_heads)}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_mib(circuit: EdgeSubset, path: str | os.PathLike, d_model: int | None = None) -> Path:
    """Write the circuit as an EAP-IG / MIB graph JSON file, atomically (strict JSON: no NaN)."""
    obj = to_mib(circuit, d_model)
    return write_text(path, json.dumps(obj, allow_nan=False))


def read_mib(path: str | os.PathLike) -> CircuitParts:
    """Read an EAP-IG / MIB graph JSON file as a circuit's parts (``Circuit.load`` builds the circuit);
    ``GraphFileError`` naming the file and the problem."""
    path = Path(path)
    data = read_limited(path, "mib")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise GraphFileError(f"{path}: not a valid EAP-IG / MIB graph JSON file: {one_line(err)}") from None
    try:
        return parse_mib(obj)
    except ValueError as err:
        raise GraphFileError(f"{path}: {err}") from None


def parse_mib(obj) -> CircuitParts:
    """A circuit's parts from a parsed EAP-IG / MIB graph object (``Circuit.from_mib`` builds the
    circuit); ``ValueError`` naming the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"the top level is a JSON {_json_type(obj)}, not an object with cfg, nodes and edges")
    missing = [k for k in ("cfg", "nodes", "edges") if k not in obj]
    if missing:
        raise ValueError(f"key {', '.join(map(repr, missing))} missing: not an EAP-IG / MIB graph file")
    for key in ("cfg", "nodes", "edges"):
        if not isinstance(obj[key], dict):
            raise ValueError(f"{key!r} must be an object, not a JSON {_json_type(obj[key])}")
    cfg = obj["cfg"]
    for key in ("n_layers", "n_heads"):
        if not _is_int(cfg.get(key)):
            raise ValueError(f"cfg {key!r} missing or not a whole number (got {_short(cfg.get(key))})")
    if not isinstance(cfg.get("parallel_attn_mlp"), bool):
        raise ValueError(
            f"cfg 'parallel_attn_mlp' missing or not true/false (got {_short(cfg.get('parallel_attn_mlp'))})"
        )
    if cfg["parallel_attn_mlp"]:
        raise ValueError(
            "cfg 'parallel_attn_mlp' is true (GPT-J / Pythia style blocks): circuitfind's graph has no "
            "parallel attention and MLP, so these edges cannot be mapped"
        )
    kv = cfg.get("n_key_value_heads")
    if kv is not None and not _is_int(kv):
        raise ValueError(f"cfg 'n_key_value_heads' is not a whole number (got {_short(kv)})")
    if "d_model" in cfg and not (_is_int(cfg["d_model"]) and 0 < cfg["d_model"] <= 1_000_000):
        raise ValueError(f"cfg 'd_model' must be a whole number between 1 and 1,000,000 (got {_short(cfg['d_model'])})")
    shape = {"n_layers": cfg["n_layers"], "n_heads": cfg["n_heads"], "split_qkv": True, "n_kv_heads": kv}
    check_shape(**shape)
    # Bounded before anything is built. EAP-IG names a k/v edge per query head, so the file holds the
    # edges of the shape without grouped k/v. A file far smaller than its declared shape is refused
    # here (building the graph costs time and memory in the declared size); one close to it is built
    # and checked edge by edge below, so the message names the missing or unknown edge.
    n_edges = edge_count(cfg["n_layers"], cfg["n_heads"])
    held = len(obj["edges"])
    if n_edges > 2 * held + 1000:
        raise ValueError(
            f"{held} edges, the declared shape ({describe_shape(**shape)}) has {n_edges}: refused before building it"
        )
    graph = ModelGraph(**shape)
    _check_nodes(obj["nodes"], graph)
    names = mib_edge_names(graph)
    index = {name: i for i, group in enumerate(names) for name in group}
    edges = obj["edges"]
    if len(edges) != len(index):
        absent = next((n for n in index if n not in edges), None)
        unknown = next((n for n in edges if n not in index), None)
        problem = f"edge {_short(absent)} is missing" if absent else f"unknown edge {_short(unknown)}"
        raise ValueError(
            f"{len(edges)} edges, the declared shape ({describe_shape(**shape)}) has {len(index)}: {problem}"
        )
    rows, scores, in_graph = [], [], []
    for name, value in edges.items():
        if name not in index:
            raise ValueError(f"unknown edge {_short(name)} (not an edge of {describe_shape(**shape)})")
        if not isinstance(value, dict):
            raise ValueError(f"edge {_short(name)}: not an object with score and in_graph")
        score, member = value.get("score"), value.get("in_graph")
        if not (_is_number(score) and _finite(score)):
            raise ValueError(f"edge {_short(name)}: score missing or not a finite number (got {_short(score)})")
        if not isinstance(member, bool):
            raise ValueError(f"edge {_short(name)}: in_graph missing or not true/false (got {_short(member)})")
        rows.append(index[name])
        scores.append(score)
        in_graph.append(member)
    rows_t = torch.tensor(rows)
    count = torch.zeros(graph.n_edges, dtype=torch.float64).index_add_(
        0, rows_t, torch.ones(len(rows), dtype=torch.float64)
    )
    total = torch.zeros(graph.n_edges, dtype=torch.float64).index_add_(
        0, rows_t, torch.tensor(scores, dtype=torch.float64)
    )
    keep = torch.zeros(graph.n_edges).index_add_(0, rows_t, torch.tensor(in_graph, dtype=torch.float32)) > 0
    settings = cfg.get(SETTINGS_KEY)
    settings = dict(settings) if isinstance(settings, dict) else {"source_format": "eap-ig/mib"}
    if "d_model" in cfg:
        settings["d_model"] = cfg["d_model"]
    return CircuitParts(graph, keep, (total / count).float(), settings)


def _node_names(n_layers: int, n_heads: int) -> list[str]:
    names = [INPUT]
    for layer in range(n_layers):
        names += [mib_node(head_name(layer, h)) for h in range(n_heads)] + [mlp_name(layer)]
    return names + [LOGITS]


def _check_nodes(nodes: dict, graph: ModelGraph) -> None:
    known = set(_node_names(graph.n_layers, graph.n_heads))
    for name, value in nodes.items():
        if name not in known:
            raise ValueError(f"unknown node {_short(name)} (nodes are input, a<layer>.h<head>, m<layer>, logits)")
        if not isinstance(value, dict) or not isinstance(value.get("in_graph"), bool):
            raise ValueError(f"node {_short(name)}: not an object with in_graph true/false")
        if "score" in value and not (_is_number(value["score"]) or value["score"] is None):
            raise ValueError(f"node {_short(name)}: score is not a number (got {_short(value['score'])})")
        neurons = value.get("neurons")
        if neurons is not None:
            if not (isinstance(neurons, list) and all(isinstance(x, bool) for x in neurons)):
                raise ValueError(f"node {_short(name)}: neurons is not a list of true/false")
            if not all(neurons):
                raise ValueError(
                    f"node {_short(name)}: some neurons are out of the circuit; circuitfind reads "
                    f"edge-level circuits only, not neuron-level ones"
                )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    """A finite number; an integer too large for a float (JSON allows 4,000 digits) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
