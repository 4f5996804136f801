"""Uniform gradient sampling (UGS): circuit discovery by learning each edge's probability of being in
the circuit (Li & Janson 2024).

Source: Li & Janson, "Optimal ablation for interpretability" (NeurIPS 2024, arXiv:2409.09951), which
proposes UGS for circuit discovery beside HardConcrete gradient sampling (HCGS, the estimator of
edge pruning, :mod:`circuitfind.methods.pruning`); MIB (Mueller et al. 2025, circuit localisation track) uses it
as its mask-optimisation baseline, scoring each edge by its learned mask value. The authors' public
description (the README of their code) says UGS "samples gradients according to a mixture of the
Uniform and Bernoulli distributions on ablation coefficients rather than a HardConcrete
distribution". Only that description and the paper's abstract could be read here, so the estimator
below is written out from it; each step is derived so that it can be checked:

* Each edge ``j`` has a parameter ``theta_j`` and is in the circuit with probability
  ``p_j = sigmoid(theta_j)``. The objective is the expected loss of a circuit drawn edge by edge,
  ``R(theta) = E_{a ~ Bernoulli(p)}[L(a)]``, under a constraint on the expected size ``sum_j p_j``.
* ``dR / dtheta_j = p_j (1 - p_j) E[L(a_j = 1) - L(a_j = 0)]
  = p_j (1 - p_j) E[integral_0^1 dL/da_j da_j]``: the difference of two discrete circuits is the
  integral of the gradient along a uniform ablation coefficient.
* So ``a_j`` is sampled from a mixture: 1 with probability ``p_j - w_j / 2``, 0 with probability
  ``1 - p_j - w_j / 2``, uniform on (0, 1) with probability ``w_j``, through one uniform draw ``u_j``:
  ``a_j = clamp((p_j - u_j) / w_j + 1/2, 0, 1)`` (mean ``p_j``). With the window
  ``w_j = p_j (1 - p_j)`` held constant, ``da_j / dtheta_j = 1`` where ``a_j`` is uniform and 0
  elsewhere (``dp_j / dtheta_j / w_j``). The autograd gradient ``dL/da_j`` is nonzero only in the
  window, which a draw hits with probability ``w_j``, and there ``a_j`` is uniform, so its
  expectation is ``w_j E[integral_0^1 dL/da_j da_j] = p_j (1 - p_j) E[L(a_j = 1) - L(a_j = 0)]``:
  the Bernoulli gradient above, the other edges drawn from their mixtures (tested against two
  patched runs per draw).

Choices where the paper's setting differs or the detail is not public:
* Ablation: the setup's corruption (an edge with ``a = 0`` carries the corrupted run's value), not the
  paper's optimal-ablation constants; MIB also runs UGS with patching (counterfactual) ablation.
* Loss and size: as in edge pruning (the shared :func:`circuitfind.methods.pruning.optimise_masks`):
  ``|1 - faithfulness|`` of each sampled circuit, averaged over ``samples`` draws per step, and a
  Lagrangian that drives the expected number of edges ``sum_j p_j`` to ``k`` (the paper sweeps a
  fixed penalty instead); the circuit is the ``k`` edges with the largest ``p_j``, which are the
  scores (a ranking of every edge, so a faithfulness curve, CPR and CMD). Dangling edges are not
  removed from the samples.
* ``theta`` starts at :data:`INIT_THETA` (``p ~ 0.95``, close to the full model); Adam; deterministic
  for a seed (the draws come from their own seeded generator). Denoising, the keep-masks are
  ``1 - a``; passes follow the memory budget, as in edge pruning.
"""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.checks import positive_int
from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.base import Direction, Found, Method
from circuitfind.methods.edge_pruning import MaskOptions
from circuitfind.methods.pruning import PruningTrace, optimise_masks
from circuitfind.methods.selection import check_top_k, select_top_k, settings_of

INIT_THETA = 3.0
MIN_WINDOW = 1e-12  # keeps (p - u) / w finite where p(1 - p) underflows


def inclusion_probability(theta: torch.Tensor) -> torch.Tensor:
    """``p = sigmoid(theta)``: each edge's probability of being in the circuit (its score)."""
    return torch.sigmoid(theta)


def ugs_mask(theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The ablation coefficients ``a = clamp((p - u) / w + 1/2, 0, 1)`` for uniform draws ``u``
    (broadcast against ``theta``), with ``p = sigmoid(theta)`` and the window ``w = p (1 - p)``
    held constant: 1, 0, or uniform on (0, 1) with probabilities ``p - w/2``, ``1 - p - w/2`` and
    ``w``, and ``da / dtheta = 1`` where ``a`` is uniform (see the module docstring)."""
    p = torch.sigmoid(theta)
    window = (p * torch.sigmoid(-theta)).detach().clamp_min(MIN_WINDOW)
    return ((p - u) / window + 0.5).clamp(0.0, 1.0)


def ugs_scores(
    patcher: EdgePatcher,
    k: int,
    *,
    steps: int = 200,
    samples: int = 4,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[torch.Tensor, PruningTrace]:
    """Learn each edge's inclusion probability by UGS towards ``k`` expected edges (1 to the number
    of edges), ``samples`` draws of the mask per step; returns the probabilities (the scores, shaped
    like one edge mask) and the trace. :func:`circuitfind.methods.discover.ugs_circuit` makes the circuit."""
    return optimise_masks(
        patcher,
        k,
        INIT_THETA,
        ugs_mask,
        inclusion_probability,
        samples=positive_int("samples", samples),
        steps=steps,
        lr=lr,
        seed=seed,
        desc="ugs",
        progress=progress,
    )


def ugs_circuit(patcher: EdgePatcher, k: int, steps: int = 200, seed: int = 0, samples: int = 4) -> Circuit:
    """The ``k`` edges with the largest inclusion probability after :func:`circuitfind.methods.ugs.ugs_scores`
    (``steps`` optimisation steps of ``samples`` mask draws each, draws seeded by ``seed``)."""
    check_top_k(k, patcher.graph)
    scores, trace = ugs_scores(patcher, k, steps=steps, samples=samples, seed=seed)
    settings = settings_of(
        patcher, "ugs", k=k, steps=steps, samples=samples, seed=seed, final_faithfulness=trace.faithfulness[-1]
    )
    return select_top_k(patcher.graph, scores, k, settings)


class UGS(Method):
    name = "ugs"
    paper = "Li & Janson 2024, Optimal ablation for interpretability (uniform gradient sampling)"
    summary = "edge inclusion probabilities learned from Bernoulli / uniform mask draws"
    Options = MaskOptions
    gradients = True
    score = "estimated"

    def find(self, setup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(ugs_circuit(EdgePatcher(setup, direction=direction), options.top_k, options.prune_steps))
