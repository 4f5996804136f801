"""A discovered circuit: a subset of a :class:`ModelGraph`'s edges, with scores and settings.

What a discovery measured travels with the circuit in its ``settings``: ``faithfulness`` (and
``faithfulness_status``, why it is ``None``) and ``curve`` (the faithfulness curve: ``fractions``,
``sizes``, ``faithfulness``, ``cpr``, ``cmd``). Graph files (GraphML, GEXF, node-link JSON, DOT) hold
the settings as one JSON graph attribute, ``settings``, and the numbers a graph tool shows as typed
graph attributes beside it: ``faithfulness``, ``faithfulness_status``, ``cpr`` and ``cmd``
(:func:`graph_attributes`). :meth:`Circuit.load` restores the settings, and fills them in from those
attributes where a file (edited by another tool) has only them.

Settings are written as strict JSON (:func:`circuitfind.circuits.graph_io.jsonable`): whatever a
method put in its settings, the file is written and reads back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from circuitfind.circuits.graph import ModelGraph, declared_shape, describe_shape, networkx_size
from circuitfind.circuits.graph_io import graph_format, jsonable, read_graph, write_graph
from circuitfind.circuits.mib import parse_mib, read_mib, write_mib
from circuitfind.circuits.neuronpedia import write_neuronpedia
from circuitfind.errors import GraphFileError
from circuitfind.names import INPUT, LOGITS, head_sort_key, is_head


@dataclass
class Circuit:
    """Edges of ``graph`` kept by a discovery algorithm.

    Attributes:
        graph: the model's edge graph.
        in_circuit: ``[n_edges]`` bool (``[n_edges, pos]`` for per-position graphs).
        scores: per-edge scores of the algorithm (same shape), or ``None``.
        settings: how it was found (algorithm, corruption, metric, direction, thresholds...).
    """

    graph: ModelGraph
    in_circuit: torch.Tensor
    scores: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.in_circuit = self.in_circuit.bool().cpu()
        if self.scores is not None:
            self.scores = self.scores.detach().float().cpu()
        expected = (self.graph.n_edges,) if self.graph.n_pos is None else (self.graph.n_edges, self.graph.n_pos)
        if tuple(self.in_circuit.shape) != expected:
            raise ValueError(f"in_circuit must have shape {expected}, got {tuple(self.in_circuit.shape)}")
        if self.scores is not None and tuple(self.scores.shape) != expected:  # one score per edge (and position)
            raise ValueError(f"scores must have shape {expected} like in_circuit, got {tuple(self.scores.shape)}")

    @property
    def n_edges(self) -> int:
        """Number of edges in the circuit (edge-position pairs for per-position graphs)."""
        return int(self.in_circuit.sum())

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(sender, receiver input)`` names of the circuit's edges."""
        keep = self.in_circuit.any(-1) if self.in_circuit.dim() == 2 else self.in_circuit
        return [e for e, k in zip(self.graph.edges, keep.tolist(), strict=True) if k]

    @property
    def nodes(self) -> set[str]:
        """Components (heads ``a{l}.{h}``, MLPs ``m{l}``, ``input``, ``logits``) touched by an edge."""
        keep = self.in_circuit.any(-1) if self.in_circuit.dim() == 2 else self.in_circuit
        out: set[str] = set()
        for i in keep.nonzero().flatten().tolist():
            sender, feeds = self.graph.edge_nodes(i)
            out.update((sender, *feeds))
        return out

    @property
    def components(self) -> set[str]:
        """:attr:`nodes` without ``input`` and ``logits``, which every non-empty circuit touches: the
        set ``circuitfind compare``'s component Jaccard is taken over."""
        return self.nodes - {INPUT, LOGITS}

    @property
    def heads(self) -> set[str]:
        return {n for n in self.nodes if is_head(n)}

    def to_networkx(self, circuit_only: bool = False) -> nx.DiGraph:
        """The circuit as a ``networkx.DiGraph``: every model edge with ``in_circuit`` and ``score``
        (what the graph files hold), or with ``circuit_only`` just the circuit's edges and the nodes
        they touch. The structural q/k/v input -> head edges are left out then: they are ACDC's
        drawing convention, not edges a discovery chose (one is ``in_circuit`` when its input is)."""
        g = self.graph.to_networkx(self.scores, self.in_circuit, **graph_attributes(self.settings))
        if not circuit_only:
            return g
        kept = [(u, v) for u, v, d in g.edges(data=True) if d["in_circuit"] and not d["structural"]]
        return g.edge_subgraph(kept).copy()

    def save(self, path: str | os.PathLike, fmt: str | None = None, d_model: int | None = None) -> Path:
        """Write the circuit as GraphML, GEXF, node-link JSON, DOT or EAP-IG / MIB JSON (by suffix:
        ``.mib.json`` for MIB), atomically; or, not to be read back, as Neuronpedia's graph JSON
        (``.neuronpedia.json`` or ``fmt="neuronpedia"``) or a layered DOT drawing (``fmt="dot-layered"``). MIB files need the model's ``d_model``: the argument, else
        ``settings["d_model"]`` (discovery records it; :mod:`circuitfind.circuits.mib`)."""
        chosen = graph_format(path, fmt)
        if chosen == "mib":
            return write_mib(self, path, d_model)
        if chosen == "neuronpedia":
            return write_neuronpedia(self.to_networkx(), path)
        return write_graph(self.to_networkx(), path, fmt)

    @classmethod
    def from_networkx(cls, g: nx.DiGraph, source: str = "graph") -> Circuit:
        """Rebuild a circuit from :meth:`to_networkx` output (e.g. read back from a file).

        The graph is untrusted: its declared shape (``n_layers``, ``n_heads``, ...) is checked and
        bounded, and must match its actual nodes and edges, before the model graph is built.

        Raises:
            GraphFileError: naming ``source`` and the problem.
        """
        try:
            shape = declared_shape(g.graph)
            n_nodes, n_all = networkx_size(**shape)
        except (KeyError, ValueError) as err:
            raise GraphFileError(f"{source}: {err}") from None
        if (g.number_of_nodes(), g.number_of_edges()) != (n_nodes, n_all):
            raise GraphFileError(
                f"{source}: the declared shape ({describe_shape(**shape)}) has {n_nodes} nodes and "
                f"{n_all} edges, the file holds {g.number_of_nodes()} nodes and "
                f"{g.number_of_edges()} edges"
            )
        graph = ModelGraph(**shape)
        try:
            keep, scores = _edge_values(g, graph)
            settings = _read_settings(g.graph)
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            raise GraphFileError(f"{source}: {err}") from None
        return cls(graph, keep, scores, settings)

    @classmethod
    def from_mib(cls, obj: dict) -> Circuit:
        """A circuit from a parsed EAP-IG / MIB graph object (:mod:`circuitfind.circuits.mib`); ``ValueError``
        naming the problem."""
        return cls(*parse_mib(obj))

    @classmethod
    def load(cls, path: str | os.PathLike, fmt: str | None = None) -> Circuit:
        """Read a circuit file (GraphML, GEXF, node-link JSON, DOT or EAP-IG / MIB JSON); raises ``GraphFileError``."""
        if graph_format(path, fmt) == "mib":
            return cls(*read_mib(path))
        return cls.from_networkx(read_graph(path, fmt), source=str(path))

    def summary(self) -> str:
        heads = sorted(self.heads, key=head_sort_key)
        return (
            f"{self.settings.get('algorithm', 'circuit')}: {self.n_edges} of {self.graph.n_edges} edges, "
            f"{len(self.nodes - {INPUT, LOGITS})} components; heads {', '.join(heads) or '(none)'}"
        )


MEASURES = ("faithfulness", "cpr", "cmd")  # typed graph attributes: floats, written when finite


def graph_attributes(settings: dict) -> dict:
    """The graph attributes a circuit file carries: ``settings`` (JSON) and, where known and finite,
    ``faithfulness``, ``cpr``, ``cmd`` (floats) and ``faithfulness_status`` (text)."""
    clean = jsonable(settings)
    attrs: dict = {"settings": json.dumps(clean, allow_nan=False)}
    curve = clean.get("curve") if isinstance(clean.get("curve"), dict) else {}
    for key, value in (
        ("faithfulness", clean.get("faithfulness")),
        ("cpr", curve.get("cpr")),
        ("cmd", curve.get("cmd")),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            attrs[key] = float(value)
    status = clean.get("faithfulness_status")
    if (
        isinstance(status, str) and status.isprintable() and len(status) <= 200
    ):  # raw text in XML: no control characters
        attrs["faithfulness_status"] = status
    return attrs


def _read_settings(attrs: dict) -> dict:
    """The settings of a graph file's attributes (see :func:`graph_attributes`): the JSON, with
    ``faithfulness``, ``faithfulness_status``, ``cpr`` and ``cmd`` filled in from the typed attributes
    where the JSON lacks them; a typed attribute that disagrees with the JSON is an error."""
    raw = attrs.get("settings", "{}")
    if not isinstance(raw, str):
        raise ValueError("graph attribute settings is not JSON text")
    settings = json.loads(raw)
    if not isinstance(settings, dict):
        raise ValueError("graph attribute settings is not a JSON object")
    curve = settings.get("curve")
    for key in (*MEASURES, "faithfulness_status"):
        if key not in attrs:
            continue
        holder = settings if key in ("faithfulness", "faithfulness_status") else None
        if holder is None:
            if curve is None:
                curve = settings["curve"] = {}
            if not isinstance(curve, dict):
                raise ValueError(f"settings curve is a {type(curve).__name__}, not an object")
            holder = curve
        if holder.get(key) is None:
            holder[key] = attrs[key]
        elif holder[key] != attrs[key]:
            raise ValueError(f"graph attribute {key} ({attrs[key]!r}) disagrees with the settings ({holder[key]!r})")
    return settings


def _edge_values(g: nx.DiGraph, graph: ModelGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """``in_circuit`` and ``score`` of every edge of ``graph`` (per position for per-position graphs)."""
    keep, scores = [], []
    per_pos = graph.n_pos is not None
    for s, r in graph.edges:
        d = g.succ.get(s, {}).get(r)
        if d is None:
            raise ValueError(f"edge {s} -> {r} of the declared shape is missing")
        if per_pos:
            keep.append(_position_list(d, "in_circuit_pos", bool, graph.n_pos, s, r))
            scores.append(
                _position_list(d, "score_pos", float, graph.n_pos, s, r) if "score_pos" in d else [0.0] * graph.n_pos
            )
        else:
            for key, typ in (("in_circuit", bool), ("score", float)):
                if not _is(d.get(key), typ):
                    raise ValueError(f"edge {s} -> {r}: attribute {key} missing or not a {typ.__name__}")
            keep.append(d["in_circuit"])
            scores.append(d["score"])
    return torch.tensor(keep, dtype=torch.bool), torch.tensor(scores, dtype=torch.float32)


def _position_list(d: dict, key: str, typ: type, n_pos: int, s: str, r: str) -> list:
    """A per-position attribute: a JSON list of ``n_pos`` values of ``typ``."""
    try:
        values = json.loads(d[key]) if isinstance(d.get(key), str) else None
    except ValueError:
        values = None
    if not (isinstance(values, list) and len(values) == n_pos and all(_is(v, typ) for v in values)):
        raise ValueError(f"edge {s} -> {r}: attribute {key} is not a JSON list of {n_pos} {typ.__name__} values")
    return values


def _is(value, typ: type) -> bool:
    """``value`` is a bool (``typ`` bool) or a real number that is not a bool (``typ`` float)."""
    if typ is bool:
        return isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)
