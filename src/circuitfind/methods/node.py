"""Node patching as a circuit: the heads whose patched output moves the metric by ``k`` standard
deviations from the mean (Zhang & Nanda 2023's detection rule), and every edge between them, the
input and the logits."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods.base import Direction, Found, Method, MethodOptions
from circuitfind.names import INPUT, LOGITS, head_name


def heads_circuit(setup: P.PatchingSetup, found: set[str], effect: torch.Tensor, settings: dict) -> Circuit:
    """Every edge between the ``found`` heads, the input and the logits; each edge scored by the
    receiving head's (or, into the logits, the sending head's) entry of ``effect`` ``[layer, head]``."""
    graph = ModelGraph.from_model(setup.model)
    nodes = found | {INPUT, LOGITS}
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    value = {head_name(l, h): float(effect[l, h]) for l in range(setup.n_layers) for h in range(setup.n_heads)}
    for i in range(graph.n_edges):
        s, feeds = graph.edge_nodes(i)
        r = next((f for f in feeds if f in nodes), None)
        if s in nodes and r is not None and found:
            keep[i] = True
            scores[i] = value.get(r, value.get(s, 0.0))
    common = {
        "corruption": setup.plan.name,
        "metric": setup.metric.name,
        "heads": sorted(found),
        "n_prompts": setup.batch.size,
        "task": setup.batch.task.name,
        "d_model": setup.model.cfg.d_model,
    }
    return Circuit(graph, keep, scores, {**settings, **common})


def node_circuit(setup: P.PatchingSetup, direction: P.Direction = "noise", k: float = 2.0) -> Circuit:
    """Heads found by node patching (each head's output, all positions; ``k``-SD rule) as a circuit:
    every edge between found heads, the input and the logits. Edge scores are the receiving head's
    (or, into the logits, the sending head's) patching effect."""
    P.check_k(k)
    heads = P.patch_heads(setup, direction)
    sign = P.effect_sign(direction)
    found = {head_name(l, h) for l, h in P.detect(heads.effect, k=k, sign=sign)}
    return heads_circuit(setup, found, heads.effect, {"algorithm": "node", "direction": direction, "k": k})


def circuit_edges(graph: ModelGraph, heads: set[str]) -> int:
    nodes = heads | {INPUT, LOGITS}
    return sum(
        1
        for i in range(graph.n_edges)
        if graph.edge_nodes(i)[0] in nodes and any(f in nodes for f in graph.edge_nodes(i)[1])
    )


class NodeOptions(MethodOptions):
    node_k: float = Field(2.0, gt=0, allow_inf_nan=False, description="node patching detection rule in SDs")


class NodePatching(Method):
    name = "node"
    paper = "Zhang & Nanda 2023, Towards Best Practices of Activation Patching in Language Models"
    summary = "heads found by exact node patching (k-SD rule), joined by every edge between them"
    Options = NodeOptions
    returns = "circuit"
    ranks_every_edge = False

    def find(self, setup: P.PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(node_circuit(setup, direction, options.node_k))
