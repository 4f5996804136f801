"""Edge pruning: circuit discovery by optimising hard-concrete edge masks (Bhaskar et al. 2024).

Bhaskar, Wettig, Friedman & Chen, "Finding Transformer Circuits with Edge Pruning" (NeurIPS 2024):
each edge gets a learned mask ``z`` in [0, 1]; an edge with ``z = 1`` carries the clean run's value, one
with ``z = 0`` the corrupted run's. The masks are optimised for faithfulness plus a sparsity
constraint driven by a Lagrangian, then binarised. The masks are hard-concrete (L0) variables
(Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization"):

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (zeta - gamma) + gamma, 0, 1),
    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)),

with the paper's constants ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``. The expected fraction of
edges kept is the mean of ``P(z != 0)``; with a target fraction ``t`` the loss is

    loss = |1 - faithfulness(z)| + lambda_1 (kept - t) + lambda_2 (kept - t)^2

minimised over ``log_alpha`` and maximised over the multipliers ``lambda`` (gradient ascent), with
``t`` moved linearly from 1 (every edge) to the target over the first half of the steps (the paper's
sparsity warm-up).

Reaching the target within a few hundred steps (the paper trains for thousands): with the excess
``kept - t`` the multipliers' force on each ``log_alpha`` is ``lambda * P'(log_alpha) / n_edges``, so at
a small target (5 of 262 edges on toy-ioi) 200 steps ended at 14-19 expected edges and the top 5 was a
cut of that larger solution. Edge pruning therefore writes the same constraint relative to its target,
``excess = kept / t - 1`` (its force scaled by ``1 / t``; on toy-ioi after 200 steps: 3.9, 8.8 and 19.9
expected edges at k = 5, 10, 20; faithfulness at k = 10 0.575 against 0.454). It is an option
(``relative=True``), not the default: with it the known-suppress and known-backup models' top k is no
longer exactly their true circuit (AUROC 0.994 and 0.998 instead of 1.0). Every run then shifts the
final ``log_alpha`` by one constant so that the expected count is exactly ``k``
(:func:`project_to_target`; this keeps the ranking, so the circuit is unchanged). Both are this
package's choices, not the paper's; UGS keeps the plain excess and no shift.

Choices where the paper leaves the detail to its code or to the task:
* Faithfulness: the paper minimises KL(full model || circuit). Here the loss is ``|1 - f|`` with
  ``f = (metric(circuit) - corrupt) / (clean - corrupt)`` of the setup's metric: under the ``kl``
  metric ``1 - f`` is KL(clean || circuit) / KL(clean || corrupted), the paper's loss up to a constant;
  under other metrics it is MIB's CMD integrand, so overshooting the clean value is penalised too.
* The target is an edge count ``k`` (``top_k``), and the circuit is the ``k`` edges with the largest
  keep probability ``P(z != 0)``, so its size is exactly ``k``; those probabilities are the scores (a
  ranking of every edge, hence a faithfulness curve, CPR and CMD).
* One mask sample per step, shared by the prompts; Adam on ``log_alpha`` and the multipliers;
  ``log_alpha`` starts at 3 (every edge kept with probability ~0.98). Deterministic for a seed: the
  uniform noise comes from its own seeded generator.
* Denoising (base = corrupted run): the circuit's edges are patched to clean values, so the keep-masks
  passed to the patcher are ``1 - z`` (the convention of :func:`circuitfind.methods.discover.circuit_masks`).

Passes follow the patcher's memory budget (``setup.max_memory``): when the prompts do not fit in one
pass, a no-gradient pass first gives the sign of ``1 - f`` and each pass then runs its own backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from circuitfind.checks import finite_number, positive_int
from circuitfind.edge_patching import EdgePatcher
from circuitfind.progress import bar as progress_bar
from circuitfind.tasks.metrics import normalise

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # Louizos et al. 2018, as in Bhaskar et al. 2024
INIT_LOG_ALPHA = 3.0
LAMBDA_LR = 1.0  # the multipliers' step size: they must outgrow the faithfulness term to bind


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """A hard-concrete sample ``z`` in [0, 1] for uniform noise ``u`` (``None``: the deterministic
    mask at ``u = 1/2``, ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``). A large
    ``|log_alpha|`` gives exactly 0 or 1."""
    if u is None:
        s = torch.sigmoid(log_alpha)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0)`` of each hard-concrete mask (the expected L0 norm, per edge)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


@dataclass
class PruningTrace:
    """What the optimisation did, step by step: the loss, the faithfulness of the sampled masks (their
    mean) and the expected fraction of edges kept (against the target of that step)."""

    loss: list[float]
    faithfulness: list[float]
    kept: list[float]
    target: list[float]


def check_target(patcher: EdgePatcher, k: int, steps: int, lr: float) -> int:
    """The number of edges after checking ``k`` (1 to that number), ``steps`` and ``lr``."""
    n_total = patcher.ones().numel()
    if positive_int("k", k) > n_total:
        raise ValueError(f"k must be in 1..{n_total} (the number of edges), got {k}")
    positive_int("steps", steps)
    finite_number("lr", lr, positive=True)
    return n_total


def faithfulness_backward(patcher: EdgePatcher, z: torch.Tensor, passes: list[tuple[slice, slice]]) -> list[float]:
    """Backpropagate the mean of ``|1 - faithfulness|`` over the sampled masks ``z``
    ``[samples, *edge mask]`` (1 = in the circuit) and return each sample's faithfulness.

    Denoising, the keep-masks are ``1 - z``. Within the memory budget (one pass) the loss is one
    backward; otherwise a no-gradient pass first gives the sign of each ``1 - f`` and every pass runs
    its own backward (``d|1 - f| = -sign(1 - f) * df``, 0 at ``f = 1`` as autograd's ``abs``), so autograd
    holds one pass at a time."""
    setup = patcher.setup
    clean, corrupt, B = setup.clean_value, setup.corrupt_value, setup.size
    gap, n = clean - corrupt, z.shape[0]
    masks = z if patcher.direction == "noise" else 1.0 - z
    if len(passes) > 1:
        with torch.no_grad():
            faith = [float(normalise(v, clean, corrupt)) for v in patcher.value(masks.detach()).tolist()]
        # torch.sign, not copysign: at f = 1 (|1 - f| at its kink; every sampled mask 1 under kl, whose clean
        # value is exactly 0) the one-pass loss's gradient is 0, and the passes must give the same step
        sign = torch.tensor([1.0 - f for f in faith], device=z.device).sign()
        for candidates, prompts in passes:
            part = patcher.run(masks[candidates], prompts=prompts).sum(-1) / B
            ((-sign[candidates] * part / gap).sum() / n).backward(retain_graph=True)
        return faith
    faith_t = (patcher.value(masks) - corrupt) / gap
    ((1.0 - faith_t).abs().sum() / n).backward(retain_graph=True)
    return [float(f) for f in faith_t.detach()]


def project_to_target(
    params: torch.Tensor, probability: Callable[[torch.Tensor], torch.Tensor], target: float
) -> torch.Tensor:
    """``params`` shifted by the one constant ``c`` that makes the expected kept fraction
    ``mean(probability(params + c))`` equal ``target``: every edge's parameter moved alike, so the
    ranking of edges (the scores' order, hence the top-k circuit) is unchanged. ``probability`` must
    increase with its argument (the keep probabilities do); ``c`` is found by bisection in float64."""
    with torch.no_grad():
        flat = params.detach().double().flatten()
        reach = float(flat.max() - flat.min()) + 60.0  # beyond it every probability is ~0 (or ~1)
        lo, hi = -reach, reach
        for _ in range(80):
            mid = (lo + hi) / 2
            if float(probability(flat + mid).mean()) > target:
                hi = mid
            else:
                lo = mid
        return params + (lo + hi) / 2


def optimise_masks(
    patcher: EdgePatcher,
    k: int,
    init: float,
    mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probability: Callable[[torch.Tensor], torch.Tensor],
    *,
    samples: int,
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool | None,
    relative: bool = False,
    project: bool = False,
) -> tuple[torch.Tensor, PruningTrace]:
    """The optimisation shared by the mask methods (edge pruning, :mod:`circuitfind.methods.ugs`): one parameter
    per edge, starting at ``init``, learned by Adam for ``steps`` steps against ``mean |1 - faithfulness|``
    of the masks ``mask(params, u)`` for ``samples`` uniform draws ``u`` per step (``[samples, *edge
    mask]``, from a CPU generator seeded by ``seed``), plus the Lagrangian ``lambda_1 (kept - t) +
    lambda_2 (kept - t)^2`` on the expected kept fraction (the mean of ``probability(params)``), the
    multipliers maximised, ``t`` moved from 1 to ``k / n_edges`` over the first half of the steps. One
    progress bar step per step (loss, faithfulness, edges kept). Checks ``k``, ``steps`` and ``lr``;
    returns each edge's final ``probability`` (on the CPU, shaped like one edge mask) and the trace.

    ``relative``: the constraint is written ``kept / t - 1 <= 0`` (the same constraint, its multipliers'
    force scaled by ``1 / t``), so that a small target binds within the steps. ``project``: the final
    parameters are shifted by one constant so that the expected kept count is exactly ``k``
    (:func:`project_to_target`; the ranking, hence the circuit, is unchanged)."""
    n_total = check_target(patcher, k, steps, lr)
    device = patcher.setup.plan.clean.tokens.device
    shape = patcher.ones().shape[1:]
    params = torch.full(shape, init, device=device, requires_grad=True)
    target = k / n_total
    lambdas = torch.zeros(2, device=params.device, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)
    opt_lambda = torch.optim.Adam([lambdas], lr=LAMBDA_LR, maximize=True)
    noise = torch.Generator(device="cpu").manual_seed(seed)
    warmup = max(1, steps // 2)
    trace = PruningTrace([], [], [], [])
    show = patcher.setup.progress if progress is None else progress
    bar = progress_bar(range(steps), show=show, desc=desc, unit="step")
    passes: list[tuple[slice, slice]] | None = None
    for step in bar:
        t = 1.0 - (1.0 - target) * min(1.0, (step + 1) / warmup)
        u = torch.rand((samples, *shape), generator=noise).clamp(1e-6, 1 - 1e-6).to(device)
        z = mask(params, u)
        if passes is None:
            passes = patcher.passes(z.shape[0], "grad")
        opt.zero_grad()
        opt_lambda.zero_grad()
        faith = faithfulness_backward(patcher, z, passes)
        fraction = probability(params).mean()
        excess = (fraction - t) / t if relative else fraction - t
        penalty = lambdas[0] * excess + lambdas[1] * excess**2
        penalty.backward()
        opt.step()
        opt_lambda.step()
        trace.loss.append(sum(abs(1.0 - f) for f in faith) / len(faith) + float(penalty.detach()))
        trace.faithfulness.append(sum(faith) / len(faith))
        trace.kept.append(float(fraction.detach()))
        trace.target.append(t)
        bar.set_postfix(
            loss=f"{trace.loss[-1]:.3f}", faith=f"{trace.faithfulness[-1]:.3f}", kept=f"{trace.kept[-1] * n_total:.0f}"
        )
    final = params.detach()
    if project:
        final = project_to_target(final, probability, target)
    return probability(final).cpu(), trace


def edge_pruning(
    patcher: EdgePatcher,
    k: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool | None = None,
    relative: bool = False,
) -> tuple[torch.Tensor, PruningTrace]:
    """Optimise hard-concrete edge masks towards ``k`` kept edges (1 to the number of edges);
    returns each edge's keep probability (the scores, shaped like one edge mask, shifted to exactly
    ``k`` expected edges) and the trace. ``relative``: the constraint relative to its target (see the
    module docstring; off by default, as it loses known-suppress's and known-backup's exact recovery).
    :func:`circuitfind.methods.discover.edge_pruning_circuit` makes the circuit."""
    return optimise_masks(
        patcher,
        k,
        INIT_LOG_ALPHA,
        hard_concrete,
        keep_probability,
        samples=1,
        steps=steps,
        lr=lr,
        seed=seed,
        desc="edge pruning",
        progress=progress,
        relative=relative,
        project=True,
    )
