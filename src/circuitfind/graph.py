"""Circuits as networkx graphs.

A node-level circuit is a ``networkx.DiGraph`` over the model's attention heads (``a{layer}.{head}``)
and MLPs (``m{layer}``) plus ``input`` and ``logits``; nodes carry ``layer``, ``head``, ``kind``,
``score`` and ``in_circuit``. Edges connect each component to every later one (the residual stream
lets any earlier component write to any later one).
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import torch

from circuitfind.io import write_bytes


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def node_graph(n_layers: int, n_heads: int, head_scores: torch.Tensor | None = None, circuit: set[str] | None = None, **graph_attrs) -> nx.DiGraph:
    """The residual-stream DAG of heads and MLPs, annotated with scores and circuit membership."""
    g = nx.DiGraph(**{k: str(v) for k, v in graph_attrs.items()})
    circuit = set(circuit or ())
    g.add_node("input", kind="input", layer=-1, head=-1, score=0.0, in_circuit=True)
    order = ["input"]
    for layer in range(n_layers):
        heads = [head_name(layer, h) for h in range(n_heads)]
        for h, name in enumerate(heads):
            score = float(head_scores[layer, h]) if head_scores is not None else 0.0
            g.add_node(name, kind="head", layer=layer, head=h, score=score, in_circuit=name in circuit)
        g.add_node(mlp_name(layer), kind="mlp", layer=layer, head=-1, score=0.0, in_circuit=mlp_name(layer) in circuit)
        order.append(heads)
        order.append([mlp_name(layer)])
    g.add_node("logits", kind="logits", layer=n_layers, head=-1, score=0.0, in_circuit=True)
    order.append(["logits"])
    flat = [["input"]] + order[1:]
    for i, senders in enumerate(flat):
        for later in flat[i + 1 :]:
            for s in senders:
                for r in later:
                    g.add_edge(s, r, in_circuit=g.nodes[s]["in_circuit"] and g.nodes[r]["in_circuit"])
    return g


def write_graphml(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write GraphML atomically."""
    data = "\n".join(nx.generate_graphml(graph)).encode("utf-8")
    return write_bytes(path, data)
