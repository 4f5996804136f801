"""The model's computational graph, and circuits as networkx graphs.

Nodes are the input embedding (``input``), every attention head (``a{layer}.{head}``), every MLP
(``m{layer}``) and the ``logits``. A sender writes to the residual stream; a receiver reads it:
each head reads through three separate inputs ``a{l}.{h}<q>``, ``<k>``, ``<v>`` (or one, with
``split_qkv=False``), each MLP and the logits through one. An edge joins a sender to every
receiver downstream of it in the residual stream.

:class:`ModelGraph` holds that structure as index tensors for the edge-patching engine (edges in a
fixed order, ``edges[i] = (sender, receiver)``). :meth:`ModelGraph.to_networkx` gives the
``networkx.DiGraph`` (ACDC's convention: q/k/v input nodes feed their head through structural
edges). Its file formats (GraphML, GEXF, node-link JSON, DOT; the hardening of untrusted files) are
in :mod:`circuitfind.circuits.graph_io`, the EAP-IG / MIB circuit JSON in :mod:`circuitfind.circuits.mib`.
Graph sizes are bounded before anything is allocated (:func:`check_shape`, :data:`MAX_EDGES`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch

from circuitfind.checks import positive_int
from circuitfind.names import INPUT, LOGITS, QKV, head_name, kv_group_name, mlp_name, receiver_node

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Bounds on any graph, checked by arithmetic before its edges are built. For scale: toy-ioi has 262
# edges, GPT-2 small 32,491, SmolLM2-135M 70,651, Llama-2-7B about 1.6 million, Llama-3-70B 16.6 million.
MAX_EDGES = 20_000_000
MAX_EDGE_POSITIONS = 100_000_000  # edges x positions of a per-position graph


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
    values = {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads,
        "split_qkv": split_qkv,
        "n_pos": n_pos,
    }
    return ", ".join(f"{k}={_short_repr(v)}" for k, v in values.items())


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_shape(
    n_layers: int, n_heads: int, split_qkv: bool = True, n_pos: int | None = None, n_kv_heads: int | None = None
) -> int:
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
        raise ValueError(
            "merged q/k/v receivers need one k/v input per head; use split_qkv=True for grouped-query attention"
        )
    shape = describe_shape(n_layers, n_heads, split_qkv, n_pos, n_kv_heads)
    if n_layers > MAX_EDGES or n_heads > MAX_EDGES:  # keeps the arithmetic below on small numbers
        raise ValueError(f"graph too large: {shape} (at most {MAX_EDGES} edges, circuitfind.circuits.graph.MAX_EDGES)")
    edges = edge_count(n_layers, n_heads, split_qkv, kv)
    if edges > MAX_EDGES:
        raise ValueError(
            f"graph too large: {shape} has {edges} edges (at most {MAX_EDGES}, circuitfind.circuits.graph.MAX_EDGES)"
        )
    if n_pos is not None and edges * n_pos > MAX_EDGE_POSITIONS:
        raise ValueError(
            f"graph too large: {shape} has {edges} edges x n_pos={n_pos} positions "
            f"(at most {MAX_EDGE_POSITIONS}, circuitfind.circuits.graph.MAX_EDGE_POSITIONS)"
        )
    return edges


def networkx_size(
    n_layers: int, n_heads: int, split_qkv: bool = True, n_pos: int | None = None, n_kv_heads: int | None = None
) -> tuple[int, int]:
    """Nodes and edges of :meth:`ModelGraph.to_networkx` of this shape, by arithmetic (checked first).

    Graph files are checked against these counts (while they are read, and again before the model
    graph is built), so a file cannot make the reader build more than its declared shape holds.
    """
    edges = check_shape(n_layers, n_heads, split_qkv, n_pos, n_kv_heads)
    kv = n_kv_heads or n_heads
    # q/k/v input nodes (one q per head, k/v per key/value head) and their structural edges to heads
    input_nodes, structural = (n_layers * (n_heads + 2 * kv), 3 * n_layers * n_heads) if split_qkv else (0, 0)
    return 2 + n_layers * (n_heads + 1) + input_nodes, edges + structural


def declared_shape(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The shape a graph file declares in its graph attributes (as :meth:`ModelGraph.to_networkx`
    writes them): ``n_layers``, ``n_heads``, ``split_qkv``, ``n_pos`` (-1: none), ``n_kv_heads``.
    ``ValueError`` when one is missing; the values are checked by :func:`check_shape`."""
    missing = [k for k in ("n_layers", "n_heads", "split_qkv") if k not in attrs]
    if missing:
        raise ValueError(f"graph attribute {', '.join(missing)} missing: not a circuit written by circuitfind")
    n_pos = attrs.get("n_pos", -1)
    return {
        "n_layers": attrs["n_layers"],
        "n_heads": attrs["n_heads"],
        "split_qkv": attrs["split_qkv"],
        "n_pos": None if n_pos in (-1, None) else n_pos,
        "n_kv_heads": attrs.get("n_kv_heads"),
    }


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
    def from_model(cls, model: TransformerBridge, split_qkv: bool = True, n_pos: int | None = None) -> ModelGraph:
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
        s_idx: list[int] = []
        r_idx: list[int] = []
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
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "split_qkv": self.split_qkv,
            "n_pos": self.n_pos,
        }

    @cached_property
    def edges(self) -> list[tuple[str, str]]:
        s_idx, r_idx = self.edge_index
        return [(self.senders[s], self.receivers[r].name) for s, r in zip(s_idx.tolist(), r_idx.tolist(), strict=True)]

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
    def to_networkx(
        self, scores: torch.Tensor | None = None, in_circuit: torch.Tensor | None = None, **graph_attrs
    ) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph`` with ``layer``, ``head``, ``kind``, ``score``, ``in_circuit``.

        With ``n_pos`` set, edge attributes ``score`` and ``in_circuit`` are summed / any-ed over
        positions and per-position values are kept as ``score_pos`` (a JSON list).
        """
        g = nx.DiGraph()
        g.graph.update(
            {
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "split_qkv": self.split_qkv,
                "n_pos": -1 if self.n_pos is None else self.n_pos,
                "n_kv_heads": self.n_kv_heads,
            }
        )
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
        for receiver in self.receivers:
            if receiver.kind in QKV:
                g.add_node(
                    receiver.name,
                    layer=receiver.layer,
                    head=receiver.head,
                    kind=f"input_{receiver.kind}",
                    score=0.0,
                    in_circuit=False,
                )
        for i, (s, r) in enumerate(self.edges):
            attrs: dict[str, float | bool | str] = {
                "score": float(flat_score[i]),
                "in_circuit": bool(flat_keep[i]),
                "structural": False,
            }
            if per_pos:
                attrs["score_pos"] = json.dumps([float(x) for x in edge_scores[i]])
            if keep.dim() == 2:
                attrs["in_circuit_pos"] = json.dumps([bool(x) for x in keep[i]])
            g.add_edge(s, r, **attrs)
        for receiver in self.receivers:  # q/k/v input nodes feed their head (every head of a GQA group)
            if receiver.kind in QKV:
                used = any(d["in_circuit"] for _, _, d in g.in_edges(receiver.name, data=True))
                for head in receiver.feeds:
                    g.add_edge(receiver.name, head, score=0.0, in_circuit=used, structural=True)
        _mark_nodes(g)
        return g


def _mark_nodes(g: nx.DiGraph) -> None:
    """A node is in the circuit if an in-circuit edge touches it."""
    for u, v, d in g.edges(data=True):
        if d["in_circuit"]:
            g.nodes[u]["in_circuit"] = g.nodes[v]["in_circuit"] = True
