"""ACDC, automatic circuit discovery (Conmy et al. 2023, "Towards Automated Circuit Discovery for
Mechanistic Interpretability"): visit receivers in reverse topological order and drop each incoming
edge whose removal moves the metric by less than ``tau``; candidates are evaluated in speculative
batches, with the same result as one edge per forward pass."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from circuitfind.checks import finite_number, positive_int
from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.base import Direction, Found, Method, MethodOptions
from circuitfind.methods.selection import settings_of
from circuitfind.names import LOGITS
from circuitfind.patching.setup import PatchingSetup
from circuitfind.progress import bar as progress_bar


def acdc(
    patcher: EdgePatcher,
    tau: float,
    candidates: int | None = None,
    reuse_prefix: bool = True,
    progress: bool | None = None,
    max_passes: int | None = None,
) -> Circuit:
    """ACDC: prune edges whose removal changes the objective by less than ``tau``.

    The objective is the distance from the full model, ``d(S) = base - metric(S)`` (for the ``kl``
    metric, ``KL(clean || circuit)``). Receivers are visited from the logits backwards, each one's
    incoming edges from the latest sender to the earliest; an edge is removed when
    ``d(S without e) - d(S) < tau``. A receiver whose component has no remaining outgoing edge is
    cut off without evaluation (its input cannot change the output).

    Batching: a forward pass evaluates the next ``m`` edges speculatively, candidate ``j`` removing
    edges ``1..j`` (removal is the common outcome). Decisions are read in order; at the first edge
    that is kept, the later candidates are stale and the next batch starts after it. The result is
    the one-edge-at-a-time result. ``m`` adapts: it doubles after a batch of removals and drops to 1
    after a kept edge, so little work is thrown away. ``candidates`` caps it (default:
    ``max_batch // prompts``, and what one pass fits in the memory budget; 1 evaluates one edge per
    forward pass). With ``reuse_prefix``
    candidates are evaluated against the current circuit (:meth:`EdgePatcher.incremental`): on the
    functional engine only the components the removed edges reach are recomputed, on the hooks
    engine the layers below the receiver run once and are cached.

    ``max_passes`` stops the search after that many forward passes (benchmarks): the edges not yet
    visited stay in the circuit and ``settings`` gets ``complete: False``.

    Returns the circuit; ``scores`` holds each evaluated edge's objective change (0 if skipped).
    ``tau`` must be finite and >= 0 (a negative or NaN ``tau`` would keep every edge).
    """
    tau = finite_number("tau", tau, minimum=0.0)
    if candidates is not None:
        positive_int("candidates", candidates)
    graph = patcher.graph
    if graph.n_pos is not None:
        raise ValueError("acdc works on graphs without per-position edges")
    setup = patcher.setup
    E = graph.n_edges
    device = setup.plan.clean.tokens.device
    keep = torch.ones(E, dtype=torch.bool, device=device)
    scores = torch.zeros(E)
    s_idx, r_idx = graph.edge_index
    sender_of = {name: i for i, name in enumerate(graph.senders)}
    outgoing = [(s_idx == i).nonzero().flatten().to(device) for i in range(len(graph.senders))]
    search = patcher.incremental() if reuse_prefix else None
    evaluate = search.values if search else patcher.value
    current = evaluate(keep[None].float()).item()
    cap = candidates or max(1, setup.max_batch // setup.size)
    cap = min(cap, search.max_candidates) if search else cap  # one incremental pass within the memory budget
    chunk, n_forward, n_evaluated = 1, 1, 1
    show = setup.progress if progress is None else progress
    complete = True
    # the counters are in the first line drawn, so even a search shorter than tqdm's refresh interval shows them
    edges_bar = progress_bar(show=show, desc="ACDC edges", total=E, unit="edge", postfix=dict(evaluated=1, kept=E))
    for r in reversed(range(len(graph.receivers))):
        receiver = graph.receivers[r]
        incoming = (r_idx == r).nonzero().flatten().flip(0).tolist()  # latest sender first
        edges_bar.set_postfix(evaluated=n_evaluated, kept=int(keep.sum()), refresh=False)
        edges_bar.update(len(incoming))  # visited (evaluated or cut off); the bar's remainder is what is left
        if receiver.node != LOGITS and not any(keep[outgoing[sender_of[node]]].any() for node in receiver.feeds):
            keep[incoming] = False  # the component it feeds reaches nothing any more
            continue
        i = 0
        while i < len(incoming):
            if max_passes is not None and n_forward >= max_passes:
                complete = False
                break
            batch = incoming[i : i + chunk]
            masks = keep[None].repeat(len(batch), 1).float()
            for j in range(len(batch)):
                masks[j, batch[: j + 1]] = 0.0
            values = evaluate(masks).tolist()
            n_forward, n_evaluated = n_forward + 1, n_evaluated + len(batch)
            consumed, adopted = len(batch), -1
            for j, e in enumerate(batch):
                change = current - values[j]  # d(S - e) - d(S)
                scores[e] = change
                if change < tau:
                    keep[e] = False
                    current, adopted = values[j], j
                else:
                    consumed = j + 1
                    break
            if search and adopted >= 0:
                search.adopt(adopted)
            chunk = min(2 * chunk, cap) if consumed == len(batch) else 1
            i += consumed
        if not complete:
            break
    edges_bar.close()
    settings = settings_of(
        patcher,
        "acdc",
        tau=tau,
        forward_passes=n_forward,
        candidates_evaluated=n_evaluated,
        engine=patcher.engine,
        **({} if complete else {"complete": False}),
    )
    return Circuit(graph, keep.cpu(), scores, settings)


class ACDCOptions(MethodOptions):
    acdc_tau: float = Field(
        0.02,
        ge=0,
        allow_inf_nan=False,
        description="ACDC threshold: an edge is removed when removing it moves the metric by less than this",
        json_schema_extra={"aliases": ["--tau"]},
    )


class ACDC(Method):
    name = "acdc"
    paper = "Conmy et al. 2023, Towards Automated Circuit Discovery for Mechanistic Interpretability"
    summary = "greedy pruning of edges whose removal moves the metric by less than tau"
    Options = ACDCOptions
    directions = ("noise",)  # it prunes from the full (clean) model
    returns = "both"
    # Conmy et al. prune by the KL divergence to the clean run on most tasks; ACDC patches exactly (no
    # gradient), so KL's vanishing gradient at the clean run does not touch it.
    default_metric = "kl"

    def find(self, setup: PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(acdc(EdgePatcher(setup, direction=direction), options.acdc_tau))
