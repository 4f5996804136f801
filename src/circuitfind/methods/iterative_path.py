"""Iterative path patching (Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect
Object Identification in GPT-2 small"): from the logits backwards through the q/k/v inputs of the
heads found at each step, each level kept by the ``k``-SD detection rule, or (where that rule cannot
fire: few heads, one per layer) by a count or an absolute size per receiver
(``--path-top-k``, ``--path-threshold``; :func:`circuitfind.patching.select`)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from circuitfind import patching as P
from circuitfind.checks import positive_int
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods.base import Direction, Found, Method, MethodOptions
from circuitfind.names import LOGITS, head_name


def iterative_path_patching(
    setup: P.PatchingSetup,
    depth: int = 2,
    k: float = 2.0,
    positions: str | None = "end",
    direction: P.Direction = "noise",
    kv_positions: str | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
) -> Circuit:
    """Path patching from the logits backwards (Wang et al. 2022), as an edge circuit.

    Level 1 patches the path from every head to the logits and keeps the heads passing the
    detection rule (:func:`circuitfind.patching.detect`, ``k`` SD). Each further level patches,
    for each head found, the paths from every earlier head into its q, k and v inputs separately,
    and keeps the senders passing the rule, up to ``depth`` levels. Query inputs (and the logits) are
    patched at ``positions`` (the answer position by default); key and value inputs, which are read
    at source positions, at ``kv_positions`` (every position by default). With ``top_k`` or
    ``threshold`` each receiver keeps its senders by that rule instead (:func:`circuitfind.patching.select`).
    """
    positive_int("depth", depth)
    P.check_k(k)
    graph = ModelGraph.from_model(setup.model)
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    sign = P.effect_sign(direction)
    group = setup.n_heads // graph.n_kv_heads
    lookup = graph.edge_lookup

    # the k-SD rule needs two scores to compare; a count or a size judges a single sender too
    fewest = 2 if top_k is None and threshold is None else 1

    def mark(result: P.PatchResult, receiver: str) -> list[tuple[int, ...]]:
        finite = torch.isfinite(result.values)
        if finite.sum() < fewest:
            return []
        hits = P.select(result.effect, k=k, sign=sign, top_k=top_k, threshold=threshold)
        for l, h in hits:
            e = lookup[(head_name(l, h), receiver)]
            keep[e] = True
            scores[e] = result.effect[l, h]
        return hits

    frontier = mark(P.path_patch(setup, P.LOGITS, positions, direction), LOGITS)
    seen = set(frontier)
    for _ in range(depth - 1):
        nxt = []
        for layer, head in frontier:
            senders = [(l, h) for l in range(layer) for h in range(setup.n_heads)]
            if len(senders) < fewest:
                continue
            for kind in ("q", "k", "v"):
                index = head if kind == "q" else head // group  # k/v inputs are per key/value head
                where = positions if kind == "q" else kv_positions
                res = P.path_patch(setup, [P.PathReceiver(layer, index, kind)], where, direction, senders=senders)
                nxt += mark(res, graph.receiver_name(layer, head, kind))
        frontier = [x for x in dict.fromkeys(nxt) if x not in seen]
        seen.update(frontier)
    settings = {
        "algorithm": "path_patching",
        "corruption": setup.plan.name,
        "metric": setup.metric.name,
        "direction": direction,
        "depth": depth,
        "k": k,
        "top_k": top_k,
        "threshold": threshold,
        "positions": positions,
        "kv_positions": kv_positions,
        "n_prompts": setup.batch.size,
        "task": setup.batch.task.name,
        "d_model": setup.model.cfg.d_model,
    }
    return Circuit(graph, keep, scores, settings)


class PathPatchingOptions(MethodOptions):
    path_depth: int = Field(
        2, ge=1, le=100, strict=True, description="path patching levels", json_schema_extra={"aliases": ["--depth"]}
    )
    path_k: float = Field(1.0, gt=0, allow_inf_nan=False, description="path patching detection rule in SDs")
    path_top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="path patching: keep this many senders of the largest effects per receiver, "
        "instead of the k-SD rule",
    )
    path_threshold: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="path patching: keep the senders whose effect is at least this (metric units), "
        "instead of the k-SD rule",
    )


class PathPatching(Method):
    name = "path_patching"
    paper = (
        "Wang et al. 2022, Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small"
    )
    summary = "path patching from the logits backwards, heads kept by a k-SD rule at each level"
    Options = PathPatchingOptions
    returns = "circuit"
    ranks_every_edge = False

    def find(self, setup: P.PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(
            iterative_path_patching(
                setup,
                options.path_depth,
                options.path_k,
                "end",
                direction,
                top_k=options.path_top_k,
                threshold=options.path_threshold,
            )
        )
