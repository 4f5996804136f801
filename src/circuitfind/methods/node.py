"""Node patching as a circuit: the heads whose patched output moves the metric by ``k`` standard
deviations from the mean (Zhang & Nanda 2023's detection rule), and every edge between them, the
input and the logits.

With few heads the ``k``-SD rule cannot fire (one head per layer: ``n`` scores are at most
``(n - 1) / sqrt(n)`` SDs from their mean, and two large effects pull the mean and SD towards
themselves), so node patching also keeps heads by a count (``--node-top-k``: the largest effects in
the important direction) or an absolute size (``--node-threshold``, in the metric's units of
``patched - base``), or both (at most that many, each at least that large)
(:func:`circuitfind.patching.select`)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods.base import Direction, Found, Method, MethodOptions
from circuitfind.names import INPUT, LOGITS, head_name, is_head, mlp_name


def heads_circuit(
    setup: P.PatchingSetup,
    found: set[str],
    effect: torch.Tensor,
    settings: dict,
    mlp_effect: torch.Tensor | None = None,
) -> Circuit:
    """Every edge between the ``found`` heads (and MLPs ``m{l}``), the input and the logits; each edge
    scored by the receiving component's (or, into the logits, the sending component's) entry of
    ``effect`` ``[layer, head]`` or ``mlp_effect`` ``[layer]``."""
    graph = ModelGraph.from_model(setup.model)
    nodes = found | {INPUT, LOGITS}
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    value = {head_name(l, h): float(effect[l, h]) for l in range(setup.n_layers) for h in range(setup.n_heads)}
    if mlp_effect is not None:
        value.update({mlp_name(l): float(mlp_effect[l]) for l in range(setup.n_layers)})
    for i in range(graph.n_edges):
        s, feeds = graph.edge_nodes(i)
        r = next((f for f in feeds if f in nodes), None)
        if s in nodes and r is not None and found:
            keep[i] = True
            scores[i] = value.get(r, value.get(s, 0.0))
    common = {
        "corruption": setup.plan.name,
        "metric": setup.metric.name,
        "heads": sorted(n for n in found if is_head(n)),
        "n_prompts": setup.batch.size,
        "task": setup.batch.task.name,
        "d_model": setup.model.cfg.d_model,
    }
    if mlp_effect is not None:
        common["mlps"] = sorted(n for n in found if not is_head(n))
    return Circuit(graph, keep, scores, {**settings, **common})


def node_circuit(
    setup: P.PatchingSetup,
    direction: P.Direction = "noise",
    k: float = 2.0,
    top_k: int | None = None,
    threshold: float | None = None,
) -> Circuit:
    """Heads found by node patching (each head's output, all positions) as a circuit: every edge
    between found heads, the input and the logits. Heads are kept by the ``k``-SD rule, or by
    ``top_k`` / ``threshold`` when given (:func:`circuitfind.patching.select`). Edge scores are the
    receiving head's (or, into the logits, the sending head's) patching effect."""
    P.check_k(k)
    heads = P.patch_heads(setup, direction)
    sign = P.effect_sign(direction)
    found = {head_name(l, h) for l, h in P.select(heads.effect, k=k, sign=sign, top_k=top_k, threshold=threshold)}
    rule = {"algorithm": "node", "direction": direction, "k": k, "top_k": top_k, "threshold": threshold}
    return heads_circuit(setup, found, heads.effect, rule)


def circuit_edges(graph: ModelGraph, heads: set[str]) -> int:
    nodes = heads | {INPUT, LOGITS}
    return sum(
        1
        for i in range(graph.n_edges)
        if graph.edge_nodes(i)[0] in nodes and any(f in nodes for f in graph.edge_nodes(i)[1])
    )


class NodeOptions(MethodOptions):
    node_k: float = Field(2.0, gt=0, allow_inf_nan=False, description="node patching detection rule in SDs")
    node_top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="node patching: keep the heads of the largest effects, this many, instead of the k-SD rule",
    )
    node_threshold: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="node patching: keep the heads whose effect is at least this (metric units), "
        "instead of the k-SD rule",
    )


class NodePatching(Method):
    name = "node"
    paper = "Zhang & Nanda 2023, Towards Best Practices of Activation Patching in Language Models"
    summary = (
        "heads found by exact node patching (k-SD rule, or a top-k or threshold), joined by every edge between them"
    )
    Options = NodeOptions
    returns = "circuit"
    ranks_every_edge = False

    def find(self, setup: P.PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(node_circuit(setup, direction, options.node_k, options.node_top_k, options.node_threshold))
