"""Information flow routes (Ferrando & Voita 2024, "Information Flow Routes: Automatically
Interpreting Language Models at Scale"): edge importances from one clean forward pass.

The paper decomposes a component's input ``x`` into the contributions ``c_1..c_n`` that add up to
it and scores each by its L1 proximity to the sum, normalised over the contributions::

    prox(c_j, x) = max(-||x - c_j||_1 + ||x||_1, 0),    importance(c_j, x) = prox(c_j, x) / sum_k prox(c_k, x)

No gradient and no corrupted run are involved: the method is corruption-free.

On :class:`~circuitfind.circuits.graph.ModelGraph` a receiver's input is the sum of its senders' outputs (the
input embedding, each head's ``hook_result``, each ``hook_mlp_out``, all below the receiver), read
before its LayerNorm. Choices (details the paper leaves to its route graph):

* ``x`` is that sum. Attention output biases, which no edge carries, are left out, so the
  contributions add up to ``x`` exactly.
* The heads' q, k and v receivers of one layer read the same residual stream, so they get the same
  importances.
* A position-free edge's local importance is averaged over prompts and over positions up to the
  answer position (later positions cannot reach the metric); into the logits, at the answer position
  only. Per-position graphs get one per position (averaged over prompts).
* Ranking. Local importances are normalised per receiver, so they do not rank edges across the
  graph (an edge into a layer-0 input, the only one there, has importance 1). The paper extracts
  routes top-down from the prediction, keeping edges above a threshold. For a ranking,
  :func:`ifr_scores` propagates that idea: the logits have importance 1; a receiver gets its
  component's importance split evenly over the component's inputs (q, k, v: a third each); an
  edge's score is its local importance times its receiver's; a component's importance is the sum of
  its outgoing edges' scores. Importance is conserved: what reaches a component leaves through its
  inputs, and the edges into the logits sum to 1.
"""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.base import Direction, Found, Method, TopK
from circuitfind.methods.selection import check_top_k, select_top_k, settings_of
from circuitfind.names import hook_name
from circuitfind.patching.setup import PatchingSetup
from circuitfind.tasks import multitoken


def proximity_importance(contributions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Ferrando & Voita's importances ``[..., n]`` of contributions ``[..., n, d]`` to ``x`` ``[..., d]``:
    L1 proximity ``max(||x||_1 - ||x - c||_1, 0)`` normalised to sum to 1 (0 where every proximity is 0)."""
    prox = (x.abs().sum(-1, keepdim=True) - (x[..., None, :] - contributions).abs().sum(-1)).clamp(min=0)
    total = prox.sum(-1, keepdim=True)
    return torch.where(total > 0, prox / total.clamp(min=torch.finfo(prox.dtype).tiny), torch.zeros_like(prox))


def sender_outputs(setup: PatchingSetup, graph: ModelGraph) -> torch.Tensor:
    """Every sender's output in the clean run, ``[batch, pos, senders, d_model]`` in graph order."""
    names = [hook_name(0, "resid_pre")]
    for layer in range(graph.n_layers):
        names += [hook_name(layer, "result"), hook_name(layer, "mlp_out")]
    acts = setup.activations("clean", names)
    parts = [acts[names[0]][:, :, None]]
    for layer in range(graph.n_layers):
        parts += [acts[hook_name(layer, "result")], acts[hook_name(layer, "mlp_out")][:, :, None]]
    return torch.cat(parts, dim=2).float()


def ifr_scores(setup: PatchingSetup, graph: ModelGraph | None = None) -> torch.Tensor:
    """IFR edge scores ``[n_edges]`` (``[n_edges, pos]`` for per-position graphs): local importances
    (:func:`local_importances`) weighted by the importance of their receiver for the prediction, so
    that they rank edges across the graph (see the module docstring)."""
    if isinstance(setup.batch, multitoken.AnswerRows):
        multitoken.check_algorithm(setup.batch.task.name, "ifr")
    graph = graph or ModelGraph.from_model(setup.model)
    local = local_importances(setup, graph)
    weight = receiver_weights(graph, local if graph.n_pos is None else local.sum(-1))
    r_idx = graph.edge_index[1]
    return local * (weight[r_idx] if graph.n_pos is None else weight[r_idx][:, None])


def receiver_weights(graph: ModelGraph, local: torch.Tensor) -> torch.Tensor:
    """Each receiver's importance for the prediction ``[receivers]``, propagated from the logits
    (importance 1) through position-free local importances ``[n_edges]``, latest receiver first."""
    s_idx, r_idx = graph.edge_index
    inputs: dict[str, int] = {}
    for rec in graph.receivers:
        for node in rec.feeds:
            inputs[node] = inputs.get(node, 0) + 1
    node_weight = dict.fromkeys(graph.senders, 0.0)
    node_weight[graph.receivers[-1].node] = 1.0  # the logits
    weight = torch.zeros(len(graph.receivers))
    for r in reversed(range(len(graph.receivers))):
        receiver = graph.receivers[r]
        weight[r] = sum(node_weight[f] / inputs[f] for f in receiver.feeds)  # every sender below is final
        edges = (r_idx == r).nonzero().flatten()
        for s, value in zip(s_idx[edges].tolist(), (local[edges] * weight[r]).tolist(), strict=True):
            node_weight[graph.senders[s]] += value
    return weight


def local_importances(setup: PatchingSetup, graph: ModelGraph | None = None) -> torch.Tensor:
    """IFR's local edge importances ``[n_edges]`` (``[n_edges, pos]`` for per-position graphs), each
    in [0, 1] and summing to 1 over a receiver's edges: the sender's share of the receiver's input,
    from the clean run's cached activations (see the module docstring)."""
    graph = graph or ModelGraph.from_model(setup.model)
    c = sender_outputs(setup, graph)  # [B, T, S, d]
    B, T = c.shape[:2]
    end = setup.plan.end_pos.to(c.device)
    pos = torch.arange(T, device=c.device)
    upto = (pos[None] <= end[:, None]).float()  # [B, T]: positions that reach the answer
    at_end = (pos[None] == end[:, None]).float()
    s_idx, r_idx = graph.edge_index
    n_up = torch.tensor([graph.upstream(r) for r in graph.receivers])
    per_pos = graph.n_pos is not None
    scores = torch.zeros(graph.n_edges, T) if per_pos else torch.zeros(graph.n_edges)
    prefix = c.cumsum(dim=2)  # receivers read the first `upstream` senders (topological order)
    for n in n_up.unique().tolist():
        imp = proximity_importance(c[:, :, :n], prefix[:, :, n - 1]).cpu()  # [B, T, n]
        for r in (n_up == n).nonzero().flatten().tolist():
            w = (at_end if graph.receivers[r].kind == "logits" else upto).cpu()  # [B, T]
            edges = (r_idx == r).nonzero().flatten()
            if per_pos:
                value = (imp * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]  # [T, n]
                scores[edges] = value[:, s_idx[edges]].T
            else:
                value = (imp * w[..., None]).sum((0, 1)) / w.sum()
                scores[edges] = value[s_idx[edges]]
    return scores


class IFR(Method):
    name = "ifr"
    paper = "Ferrando & Voita 2024, Information Flow Routes: Automatically Interpreting Language Models at Scale"
    summary = "edge importances by L1 proximity from the clean run alone (no gradient, no corruption)"
    Options = TopK
    needs_corruption = False
    score = "none"

    def find(self, setup: PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        patcher = EdgePatcher(setup, direction=direction)
        k = check_top_k(options.top_k, patcher.graph)
        settings = settings_of(patcher, self.name, k=k, corruption_free=True)  # records and the report say so
        return Found(select_top_k(patcher.graph, ifr_scores(setup, patcher.graph), k, settings))
