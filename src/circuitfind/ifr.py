"""Information flow routes (Ferrando & Voita 2024, "Information Flow Routes: Automatically
Interpreting Language Models at Scale"): edge importances from one clean forward pass.

The paper decomposes a component's input ``x`` into the contributions ``c_1..c_n`` that add up to
it and scores each by its L1 proximity to the sum, normalised over the contributions::

    prox(c_j, x) = max(-||x - c_j||_1 + ||x||_1, 0),    importance(c_j, x) = prox(c_j, x) / sum_k prox(c_k, x)

No gradient and no corrupted run are involved: the method is corruption-free.

On :class:`~circuitfind.graph.ModelGraph` a receiver's input is the sum of its senders' outputs (the
input embedding, each head's ``hook_result``, each ``hook_mlp_out``, all below the receiver), read
before its LayerNorm. Choices (details the paper leaves to its route graph):

* ``x`` is that sum. Attention output biases, which no edge carries, are left out, so the
  contributions add up to ``x`` exactly.
* The heads' q, k and v receivers of one layer read the same residual stream, so they get the same
  importances.
* A position-free edge's score is the importance averaged over prompts and over positions up to the
  answer position (later positions cannot reach the metric); into the logits, at the answer position
  only. Per-position graphs get one score per position (averaged over prompts).
"""

from __future__ import annotations

import torch

from circuitfind.graph import ModelGraph
from circuitfind.names import hook_name
from circuitfind.patching.setup import PatchingSetup


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
    """IFR edge importances ``[n_edges]`` (``[n_edges, pos]`` for per-position graphs), each in [0, 1],
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
