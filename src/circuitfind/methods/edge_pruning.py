"""Edge pruning (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge Pruning"): hard-concrete
edge masks optimised for faithfulness under a Lagrangian edge-count target; the optimisation is in
:mod:`circuitfind.methods.pruning`, which UGS shares."""

from __future__ import annotations

from typing import Any

from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.base import Direction, Found, Method, PruneSteps, TopK
from circuitfind.methods.pruning import edge_pruning
from circuitfind.methods.selection import check_top_k, select_top_k, settings_of
from circuitfind.patching.setup import PatchingSetup


def edge_pruning_circuit(patcher: EdgePatcher, k: int, steps: int = 200, seed: int = 0) -> Circuit:
    """The ``k`` edges with the largest keep probability after :func:`circuitfind.methods.pruning.edge_pruning`
    (hard-concrete masks, ``steps`` optimisation steps, noise seeded by ``seed``)."""
    check_top_k(k, patcher.graph)
    scores, trace = edge_pruning(patcher, k, steps=steps, seed=seed)
    settings = settings_of(
        patcher, "edge_pruning", k=k, steps=steps, seed=seed, final_faithfulness=trace.faithfulness[-1]
    )
    return select_top_k(patcher.graph, scores, k, settings)


class MaskOptions(TopK, PruneSteps):
    pass


class EdgePruning(Method):
    name = "edge_pruning"
    paper = "Bhaskar et al. 2024, Finding Transformer Circuits with Edge Pruning"
    summary = "hard-concrete edge masks optimised for faithfulness under an edge-count target"
    Options = MaskOptions
    gradients = True
    score = "estimated"

    def find(self, setup: PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        patcher = EdgePatcher(setup, direction=direction)
        return Found(edge_pruning_circuit(patcher, options.top_k, options.prune_steps))
