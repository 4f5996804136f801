"""From scores to circuits: the top-``k`` edges by ``|score|`` or those above a threshold, and the
settings a circuit records (which method, setup and options found it)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from circuitfind.checks import finite_number
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.base import Direction, Found, Method, TopK
from circuitfind.tasks import multitoken


def settings_of(patcher: EdgePatcher, algorithm: str, **extra) -> dict:
    s = patcher.setup
    return {
        "algorithm": algorithm,
        "corruption": s.plan.name,
        "metric": s.metric.name,
        "direction": patcher.direction,
        "n_prompts": s.batch.size,
        "task": s.batch.task.name,
        "clean": s.clean_value,
        "corrupt": s.corrupt_value,
        "d_model": s.model.cfg.d_model,
        **extra,
    }  # d_model: EAP-IG / MIB files carry it


def check_top_k(k: int, graph: ModelGraph) -> int:
    """``k`` must be a whole number from 1 to the graph's edge count (edge-position pairs for
    per-position graphs): a larger ``k`` is an error, never silently the whole graph."""
    n = graph.n_edges * (graph.n_pos or 1)
    unit = "edges" if graph.n_pos is None else "edge-position pairs"
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n} (the graph has {n} {unit}), got {k!r}")
    return k


def select_top_k(graph: ModelGraph, scores: torch.Tensor, k: int, settings: dict | None = None) -> Circuit:
    """The ``k`` edges with the largest ``|score|`` (``k`` from 1 to the number of edges)."""
    check_top_k(k, graph)
    if scores.numel() != graph.n_edges * (graph.n_pos or 1):
        raise ValueError(f"{scores.numel()} scores for a graph of {graph.n_edges * (graph.n_pos or 1)} edges")
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.abs().flatten().cpu().topk(k).indices] = True
    return Circuit(graph, keep.reshape(scores.shape), scores, {**(settings or {}), "selection": f"top_{k}"})


def select_threshold(graph: ModelGraph, scores: torch.Tensor, tau: float, settings: dict | None = None) -> Circuit:
    """Edges with ``|score| >= tau`` (``tau`` finite, >= 0)."""
    finite_number("tau", tau, minimum=0.0)
    return Circuit(graph, scores.abs() >= tau, scores, {**(settings or {}), "selection": f"abs_score>={tau}"})


def top_k_found(
    patcher: EdgePatcher, name: str, scores_of: Callable[[bool], torch.Tensor], k: int, per_prompt: bool, **extra
) -> Found:
    """The top-``k`` circuit of a method that scores every edge; ``scores_of(per_prompt)`` gives the
    scores ``[n_edges]`` or, with ``per_prompt``, ``[n_edges, rows]`` (teacher-forced rows are summed
    back into their prompts here)."""
    setup = patcher.setup
    per_scores = multitoken.prompt_values(scores_of(True), setup.batch, setup.ctx) if per_prompt else None
    scores = per_scores.mean(-1) if per_scores is not None else scores_of(False)
    circuit = select_top_k(patcher.graph, scores, k, settings_of(patcher, name, k=k, **extra))
    return Found(circuit, per_scores)


class EdgeAttribution(Method):
    """A method that scores every edge by a gradient attribution, its circuit the top ``k`` by ``|score|``
    (EAP, EAP-IG on embeddings or on activations). Subclasses give :meth:`scores` and what a circuit
    records of their options (:meth:`recorded`)."""

    Options = TopK
    gradients = True
    score = "estimated"
    per_prompt = True

    def scores(self, patcher: EdgePatcher, options: Any, per_prompt: bool) -> torch.Tensor:
        raise NotImplementedError

    def recorded(self, options: Any) -> dict:
        return {}

    def find(self, setup: Any, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        patcher = EdgePatcher(setup, direction=direction)
        k = check_top_k(options.top_k, patcher.graph)
        scores_of = lambda per: self.scores(patcher, options, per)  # noqa: E731
        return top_k_found(patcher, self.name, scores_of, k, per_prompt, **self.recorded(options))
