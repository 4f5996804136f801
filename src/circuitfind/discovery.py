"""Circuit discovery algorithms on the edge graph, each returning a :class:`Circuit`.

* :func:`acdc`: ACDC (Conmy et al. 2023): visit receivers in reverse topological order and drop
  each incoming edge whose removal moves the metric by less than ``tau``; candidates are evaluated
  in speculative batches (see below), with the same result as one edge per forward pass.
* :func:`eap`: edge attribution patching (Syed et al. 2023): the gradient of the metric with
  respect to every edge mask at once (clean and corrupted forwards + one forward/backward).
* :func:`eap_ig`: EAP with integrated gradients (Hanna et al. 2024): gradients averaged over
  ``steps`` inputs interpolated between the corrupted and clean embeddings.
* :func:`eap_ig_act`: EAP-IG on activations (MIB's variant, Mueller et al. 2025): gradients
  averaged over ``steps`` points where every sender's activation is interpolated between the
  corrupted and clean runs (the edge masks set to ``alpha``).
* :func:`circuitfind.ifr.ifr_scores`: information flow routes (Ferrando & Voita 2024): each
  sender's share of its receiver's input by L1 proximity, from the clean run alone (no gradient,
  no corruption).
* :func:`edge_pruning_circuit`: Edge Pruning (Bhaskar et al. 2024): hard-concrete edge masks
  optimised for faithfulness under a Lagrangian sparsity target (:mod:`circuitfind.pruning`).
* :func:`ugs_circuit`: uniform gradient sampling (Li & Janson 2024, MIB's other mask method): each
  edge's probability of being in the circuit, learned from Bernoulli/uniform mask draws
  (:mod:`circuitfind.ugs`), under the same target.
* :func:`atp_circuit`: attribution patching of heads, AtP and AtP* (Kramár et al. 2024,
  :mod:`circuitfind.atp`): first-order estimates of node patching's head effects, as a node circuit.
* :func:`iterative_path_patching`: IOI-style path patching (Wang et al. 2022) from the logits
  backwards through the q/k/v inputs of the heads found at each step.

Scores are signed estimates of the metric change when an edge is patched; :func:`select_top_k` and
:func:`select_threshold` rank them by magnitude. :func:`faithfulness` and
:func:`faithfulness_curve` (at the MIB benchmark's edge fractions, with CPR / CMD areas) evaluate a circuit.

The sign of a score: masks are 1 = keep the base run's value, 0 = patch in the source run's value
(:mod:`circuitfind.edge_patching`). A score is ``-d metric / d mask`` at masks that keep every edge,
i.e. the first-order change of the metric when the edge's mask goes from 1 to 0 (the edge is
patched): ``(source - base) . d metric / d receiver input``. Noising (base = clean, source =
corrupted), an important edge has a negative score; denoising, a positive one
(:func:`circuitfind.patching.effect_sign`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from circuitfind import multitoken
from circuitfind import patching as P
from circuitfind.atp import atp_scores
from circuitfind.checks import finite_number, positive_int
from circuitfind.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.edge_patching.hooks import Hook
from circuitfind.errors import CircuitfindError
from circuitfind.graph import ModelGraph
from circuitfind.ifr import ifr_scores
from circuitfind.metrics import normalise
from circuitfind.names import ALGORITHMS, INPUT, LOGITS, head_name
from circuitfind.progress import bar as progress_bar
from circuitfind.pruning import edge_pruning
from circuitfind.ugs import ugs_scores


class EmptyCircuitError(CircuitfindError, ValueError):
    """An operation needs at least one edge in the circuit."""


def _settings(patcher: EdgePatcher, algorithm: str, **extra) -> dict:
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


# -- gradient attributions ----------------------------------------------------------------


def eap(patcher: EdgePatcher, per_prompt: bool = False) -> torch.Tensor:
    """EAP scores ``[n_edges]``: first-order estimate of the metric change when each edge is patched.

    With ``per_prompt``, ``[n_edges, batch]`` scores, one column per prompt (their mean is the
    default result), for bootstrap intervals. Prompts are split into passes that fit the patcher's
    memory budget, with a backward per pass (:meth:`EdgePatcher.passes`); the gradients add up to
    the one-pass result.
    """
    B = patcher.setup.size
    if patcher.graph.n_pos is None:  # sender differences dotted with receiver gradients, a pass at a time
        parts = [
            patcher.attribution(per_prompt=per_prompt, prompts=prompts, scale=1.0 if per_prompt else 1.0 / B)
            for _, prompts in patcher.passes(1)
        ]
        return torch.cat(parts, dim=1) if per_prompt else torch.stack(parts).sum(0)
    masks = patcher.ones(per_prompt=per_prompt).requires_grad_(True)  # per-position edges: the masks' gradient
    for _, prompts in patcher.passes(1, "grad"):
        values = patcher.run(masks, per_prompt=per_prompt, prompts=prompts)  # [1, prompts]
        (values.sum() if per_prompt else values.sum() / B).backward()
    return -masks.grad[0].detach()


def eap_ig(patcher: EdgePatcher, steps: int = 5, per_prompt: bool = False) -> torch.Tensor:
    """EAP-IG scores ``[n_edges]``: ``(source - base)`` sender outputs times the receivers' gradients
    averaged over ``steps`` token-embedding interpolations ``corrupt + k/steps (clean - corrupt)``.

    With ``per_prompt``, ``[n_edges, batch]`` scores (their mean over prompts is the default)."""
    positive_int("steps", steps)
    setup = patcher.setup
    clean = setup.activations("clean", ["hook_embed"])["hook_embed"]
    corrupt = setup.activations("corrupt", ["hook_embed"])["hook_embed"]
    # A right-endpoint Riemann sum of the path integral from the corrupted (alpha = 0) to the clean
    # (alpha = 1) embeddings: alpha = k / steps for k = 1..steps. So steps=1 is the gradient at the
    # clean input, which in the noising direction (base run = clean) is EAP exactly (tested). Hanna
    # et al.'s EAP-IG code (later versions) sums k = 0..steps-1, the left endpoints: it includes the
    # corrupted input and never reaches the clean one. Both tend to the same integral as steps grows.
    alphas = torch.arange(1, steps + 1, dtype=clean.dtype, device=clean.device) / steps
    B = setup.size
    start = 0  # the first step of the current pass

    def interpolate(act, hook):
        n = act.shape[0] // B
        a = alphas[start : start + n].view(n, 1, 1, 1)
        return (corrupt + a * (clean - corrupt)).reshape(act.shape)

    hooks: list[Hook] = [("hook_embed", interpolate)]
    scale = 1.0 if per_prompt else 1.0 / B
    if patcher.graph.n_pos is None:
        total = None
        for steps_part, prompts in patcher.passes(steps, extra_hooks=hooks):  # a backward per pass (memory budget)
            start = steps_part.start
            part = patcher.attribution(
                fixed_diff=True,
                extra_hooks=hooks,
                n=steps_part.stop - steps_part.start,
                per_prompt=per_prompt,
                prompts=prompts,
                scale=scale,
            )
            if per_prompt:
                total = torch.zeros(part.shape[0], B, device=part.device) if total is None else total
                total[:, prompts] += part
            else:
                total = part if total is None else total + part
        return total / steps
    masks = patcher.ones(steps, per_prompt=per_prompt).requires_grad_(True)  # per-position edges: the masks' gradient
    for steps_part, prompts in patcher.passes(steps, "grad", extra_hooks=hooks):
        start = steps_part.start
        values = patcher.run(
            masks[steps_part], fixed_diff=True, extra_hooks=hooks, per_prompt=per_prompt, prompts=prompts
        )
        (values.sum() * scale).backward()
    return -masks.grad.mean(0).detach()


def eap_ig_act(patcher: EdgePatcher, steps: int = 5, per_prompt: bool = False) -> torch.Tensor:
    """EAP-IG on activations scores ``[n_edges]`` (MIB's "EAP-IG-activations", Mueller et al. 2025,
    "MIB: A Mechanistic Interpretability Benchmark"; IG of Sundararajan et al. 2017 taken at the
    senders' activations instead of the input embeddings).

    Every sender's activation, as its receivers read it, is interpolated between the source and base
    runs: with fixed differences (``source - base``, :meth:`EdgePatcher.run`'s ``fixed_diff``) and
    every edge mask at ``alpha``, receiver inputs are ``base + (1 - alpha) (source - base)`` per edge.
    The score is ``-d metric / d mask`` averaged over the grid ``alpha = k / steps``, ``k = 1..steps``
    (a right-endpoint Riemann sum in mask space, the same choice as :func:`eap_ig`). The grid is
    chosen so that ``steps=1`` is the gradient at masks that keep every edge, which is EAP exactly, in
    both directions (tested); it never evaluates the fully patched point ``alpha = 0``.

    With ``per_prompt``, ``[n_edges, batch]`` scores (their mean over prompts is the default)."""
    positive_int("steps", steps)
    B = patcher.setup.size
    ones = patcher.ones(steps, per_prompt=per_prompt)
    alphas = torch.arange(1, steps + 1, dtype=ones.dtype, device=ones.device) / steps
    masks = (ones * alphas.view(-1, *([1] * (ones.dim() - 1)))).requires_grad_(True)
    scale = 1.0 if per_prompt else 1.0 / B
    for steps_part, prompts in patcher.passes(steps, "grad"):  # a backward per pass (memory budget)
        values = patcher.run(masks[steps_part], fixed_diff=True, per_prompt=per_prompt, prompts=prompts)
        (values.sum() * scale).backward()
    assert masks.grad is not None
    return -masks.grad.mean(0).detach()


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


def eap_circuit(patcher: EdgePatcher, k: int, ig_steps: int | None = None) -> Circuit:
    """Top-``k`` circuit by EAP (``ig_steps=None``) or EAP-IG scores."""
    check_top_k(k, patcher.graph)
    scores = eap(patcher) if ig_steps is None else eap_ig(patcher, ig_steps)
    name = "eap" if ig_steps is None else "eap_ig"
    return select_top_k(patcher.graph, scores, k, _settings(patcher, name, k=k, ig_steps=ig_steps))


def edge_pruning_circuit(patcher: EdgePatcher, k: int, steps: int = 200, seed: int = 0) -> Circuit:
    """The ``k`` edges with the largest keep probability after :func:`circuitfind.pruning.edge_pruning`
    (hard-concrete masks, ``steps`` optimisation steps, noise seeded by ``seed``)."""
    check_top_k(k, patcher.graph)
    scores, trace = edge_pruning(patcher, k, steps=steps, seed=seed)
    settings = _settings(
        patcher, "edge_pruning", k=k, steps=steps, seed=seed, final_faithfulness=trace.faithfulness[-1]
    )
    return select_top_k(patcher.graph, scores, k, settings)


def ugs_circuit(patcher: EdgePatcher, k: int, steps: int = 200, seed: int = 0, samples: int = 4) -> Circuit:
    """The ``k`` edges with the largest inclusion probability after :func:`circuitfind.ugs.ugs_scores`
    (``steps`` optimisation steps of ``samples`` mask draws each, draws seeded by ``seed``)."""
    check_top_k(k, patcher.graph)
    scores, trace = ugs_scores(patcher, k, steps=steps, samples=samples, seed=seed)
    settings = _settings(
        patcher, "ugs", k=k, steps=steps, samples=samples, seed=seed, final_faithfulness=trace.faithfulness[-1]
    )
    return select_top_k(patcher.graph, scores, k, settings)


# -- ACDC ---------------------------------------------------------------------------------


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
    settings = _settings(
        patcher,
        "acdc",
        tau=tau,
        forward_passes=n_forward,
        candidates_evaluated=n_evaluated,
        engine=patcher.engine,
        **({} if complete else {"complete": False}),
    )
    return Circuit(graph, keep.cpu(), scores, settings)


# -- iterative path patching --------------------------------------------------------------


def iterative_path_patching(
    setup: P.PatchingSetup,
    depth: int = 2,
    k: float = 2.0,
    positions: str | None = "end",
    direction: P.Direction = "noise",
    kv_positions: str | None = None,
) -> Circuit:
    """Path patching from the logits backwards (Wang et al. 2022), as an edge circuit.

    Level 1 patches the path from every head to the logits and keeps the heads passing the
    detection rule (:func:`circuitfind.patching.detect`, ``k`` SD). Each further level patches,
    for each head found, the paths from every earlier head into its q, k and v inputs separately,
    and keeps the senders passing the rule, up to ``depth`` levels. Query inputs (and the logits) are
    patched at ``positions`` (the answer position by default); key and value inputs, which are read
    at source positions, at ``kv_positions`` (every position by default).
    """
    positive_int("depth", depth)
    P.check_k(k)
    graph = ModelGraph.from_model(setup.model)
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    sign = P.effect_sign(direction)
    group = setup.n_heads // graph.n_kv_heads
    lookup = graph.edge_lookup

    def mark(result: P.PatchResult, receiver: str) -> list[tuple[int, ...]]:
        finite = torch.isfinite(result.values)
        if finite.sum() < 2:
            return []
        hits = P.detect(result.effect, k=k, sign=sign)
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
            if len(senders) < 2:
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
        "positions": positions,
        "kv_positions": kv_positions,
        "n_prompts": setup.batch.size,
        "task": setup.batch.task.name,
        "d_model": setup.model.cfg.d_model,
    }
    return Circuit(graph, keep, scores, settings)


# -- faithfulness -------------------------------------------------------------------------


def circuit_masks(patcher: EdgePatcher, in_circuit: torch.Tensor) -> torch.Tensor:
    """Edge masks that run a circuit: its edges carry clean values, every other edge corrupted ones.

    For ``noise`` patchers (base = clean run) that keeps the circuit's edges; for ``denoise``
    patchers (base = corrupted run) it patches them.
    """
    keep = in_circuit.float() if patcher.direction == "noise" else 1.0 - in_circuit.float()
    return keep.to(patcher.setup.plan.clean.tokens.device)


def faithfulness(patcher: EdgePatcher, circuit: Circuit) -> float:
    """``(circuit - corrupt) / (clean - corrupt)``: the circuit's edges clean, every other edge corrupted."""
    if circuit.n_edges == 0:
        raise EmptyCircuitError("the circuit has no edges: faithfulness of an empty circuit is not defined here")
    value = patcher.value(circuit_masks(patcher, circuit.in_circuit)[None]).item()
    return float(normalise(value, patcher.setup.clean_value, patcher.setup.corrupt_value))


@dataclass
class FaithfulnessCurve:
    """Faithfulness of top-scoring circuits of growing size.

    ``cpr``: area under the curve over the fraction of edges kept (higher is better);
    ``cmd``: area under ``|1 - faithfulness|`` (lower is better); both trapezoids over the fractions.
    """

    fractions: list[float]
    sizes: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


# The MIB circuit-localization track's edge fractions and counts: `percentages = (.001, .002, .005,
# .01, .02, .05, .1, .2, .5, 1)` and `int(pct * n_edges)` edges (top |score|) in
# `evaluate_area_under_curve`, MIB_circuit_track/evaluation.py of the track's code (Mueller et al.
# 2025, "MIB: A Mechanistic Interpretability Benchmark"). Its areas are trapezoids over these
# fractions in some versions of that file and over log edge counts in others; ours are over the
# fractions.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def faithfulness_curve(patcher: EdgePatcher, scores: torch.Tensor, fractions=MIB_FRACTIONS) -> FaithfulnessCurve:
    """Faithfulness of the top-``|score|`` circuits at each fraction of edges (``int(fraction * n_edges)``
    edges, as MIB counts them), in one batched run."""
    fractions = sorted(set(float(f) for f in fractions))
    if not fractions or not all(0 <= f <= 1 for f in fractions):  # NaN fails both comparisons
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    flat = scores.abs().flatten().cpu()
    order = flat.argsort(descending=True)
    total = flat.numel()
    sizes = [int(f * total) for f in fractions]  # MIB's count: rounded down
    masks = torch.zeros(len(sizes), total)
    for i, n in enumerate(sizes):
        masks[i, order[:n]] = 1.0
    values = patcher.value(
        circuit_masks(patcher, masks.reshape(len(sizes), *scores.shape)),
        desc=f"faithfulness curve ({len(sizes)} points)",
    ).cpu()
    faith = normalise(values, patcher.setup.clean_value, patcher.setup.corrupt_value).tolist()
    x = torch.tensor(fractions)
    f = torch.tensor(faith)
    cpr = float(torch.trapezoid(f, x)) if len(x) > 1 else 0.0
    cmd = float(torch.trapezoid((1 - f).abs(), x)) if len(x) > 1 else 0.0
    return FaithfulnessCurve(fractions, sizes, faith, cpr, cmd)


# -- node-level circuits and one entry point ----------------------------------------------


def _heads_circuit(setup: P.PatchingSetup, found: set[str], effect: torch.Tensor, settings: dict) -> Circuit:
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
    return _heads_circuit(setup, found, heads.effect, {"algorithm": "node", "direction": direction, "k": k})


def atp_circuit(
    setup: P.PatchingSetup, direction: P.Direction = "noise", variant: str = "atp", top_k: int = 20
) -> Circuit:
    """Heads ranked by ``|AtP estimate|`` (:func:`circuitfind.atp.atp_scores`, ``variant`` ``atp`` or
    ``atp_star``) as a node circuit like :func:`node_circuit`'s: the longest prefix of the ranking
    whose circuit has at most ``top_k`` edges (at least the first head), so ``--top-k`` bounds the
    circuit's size as it does for the edge methods. Edge scores are the heads' estimates."""
    positive_int("top_k", top_k)
    effect = atp_scores(setup, direction, variant)
    graph = ModelGraph.from_model(setup.model)
    order = effect.abs().flatten().argsort(descending=True, stable=True).tolist()
    heads = [head_name(i // setup.n_heads, i % setup.n_heads) for i in order]
    found: set[str] = set()
    for name in heads:
        if found and _circuit_edges(graph, found | {name}) > top_k:
            break
        found.add(name)
    return _heads_circuit(setup, found, effect, {"algorithm": variant, "direction": direction, "k": top_k})


def _circuit_edges(graph: ModelGraph, heads: set[str]) -> int:
    nodes = heads | {INPUT, LOGITS}
    return sum(
        1
        for i in range(graph.n_edges)
        if graph.edge_nodes(i)[0] in nodes and any(f in nodes for f in graph.edge_nodes(i)[1])
    )


# Edge pruning's and UGS's step bound: 500x the default, hours on a CPU; 10**9 steps would run for years.
MAX_PRUNE_STEPS = 100_000

# the circuit is the top_k edges (AtP / AtP*: the heads whose circuit fits in top_k edges)
TOP_K = ("eap", "eap_ig", "eap_ig_act", "ifr", "edge_pruning", "ugs", "atp", "atp_star")
NOISING_ONLY = ("acdc",)  # ACDC prunes from the full (clean) model: it runs in the noising direction only
CORRUPTION_FREE = ("ifr",)  # find the circuit from the clean run alone (the corruption only measures faithfulness)
PER_PROMPT = ("eap", "eap_ig", "eap_ig_act")  # algorithms that give per-prompt edge scores
SCORED = (
    "eap",
    "eap_ig",
    "eap_ig_act",
    "ifr",
    "edge_pruning",
    "ugs",
    "acdc",
)  # algorithms whose edge scores rank every edge (a faithfulness curve applies)


def allows_direction(algorithm: str, direction: str) -> bool:
    """Whether ``algorithm`` runs in ``direction`` (ACDC in the noising direction only)."""
    return algorithm not in NOISING_ONLY or direction == "noise"


def check_options(
    algorithm: str,
    direction: str = "noise",
    *,
    acdc_tau: float = 0.02,
    top_k: int = 20,
    ig_steps: int = 5,
    path_depth: int = 2,
    path_k: float = 1.0,
    node_k: float = 2.0,
    prune_steps: int = 200,
) -> None:
    """Refuse bad :func:`discover` options before any work: an unknown algorithm or direction, and
    the numeric options the algorithm uses (``acdc_tau`` finite >= 0, ``path_k``/``node_k`` finite
    > 0, ``top_k``/``ig_steps``/``path_depth`` whole numbers >= 1). ``top_k`` is checked against the
    graph's size when the graph is known (:func:`check_top_k`); ``prune_steps`` (edge pruning, UGS) a
    whole number in 1..:data:`MAX_PRUNE_STEPS`."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {ALGORITHMS}")
    P.check_direction(direction)
    if not allows_direction(algorithm, direction):
        raise ValueError("ACDC prunes from the full (clean) model: use direction='noise'")
    if algorithm == "acdc":
        finite_number("acdc_tau", acdc_tau, minimum=0.0)
    if algorithm in TOP_K:
        positive_int("top_k", top_k)
    if algorithm in ("edge_pruning", "ugs"):
        if positive_int("prune_steps", prune_steps) > MAX_PRUNE_STEPS:
            raise ValueError(
                f"prune_steps must be at most {MAX_PRUNE_STEPS:,} (500 x the default), got {prune_steps:,}"
            )
    if algorithm in ("eap_ig", "eap_ig_act"):
        positive_int("ig_steps", ig_steps)
    if algorithm == "path_patching":
        positive_int("path_depth", path_depth)
        finite_number("path_k", path_k, positive=True)
    if algorithm == "node":
        finite_number("node_k", node_k, positive=True)


@dataclass
class Discovery:
    """The result of :func:`discover`: the circuit and how well it reproduces the model.

    ``per_prompt``: EAP/EAP-IG edge scores per prompt ``[n_edges, batch]`` (when asked for; with
    multi-token answers one column per prompt, its teacher-forced rows summed);
    ``faithfulness``: :func:`faithfulness` of the circuit in the direction it was found in (``None``
    for an empty circuit, with the reason in ``faithfulness_status``); ``curve``: the
    :func:`faithfulness_curve` of the scores for :data:`SCORED` algorithms (when asked for).
    """

    circuit: Circuit
    direction: str
    per_prompt: torch.Tensor | None = None
    faithfulness: float | None = None
    faithfulness_status: str = "ok"
    curve: FaithfulnessCurve | None = None


def discover(
    setup: P.PatchingSetup,
    algorithm: str,
    direction: P.Direction = "noise",
    *,
    acdc_tau: float = 0.02,
    top_k: int = 20,
    ig_steps: int = 5,
    path_depth: int = 2,
    path_k: float = 1.0,
    node_k: float = 2.0,
    prune_steps: int = 200,
    per_prompt: bool = False,
    curve: bool = True,
) -> Discovery:
    """Run one discovery algorithm and measure the circuit's faithfulness (and, with ``curve``,
    the faithfulness curve of its scores). With ``per_prompt``, EAP/EAP-IG also return the
    per-prompt edge scores ``[n_edges, batch]``. Options are checked first (:func:`check_options`);
    a ``top_k`` larger than the graph is an error, as in :func:`select_top_k`."""
    options: dict[str, Any] = dict(
        acdc_tau=acdc_tau,
        top_k=top_k,
        ig_steps=ig_steps,
        path_depth=path_depth,
        path_k=path_k,
        node_k=node_k,
        prune_steps=prune_steps,
    )
    check_options(algorithm, direction, **options)
    if isinstance(setup.batch, multitoken.AnswerRows):
        multitoken.check_algorithm(setup.batch.task.name, algorithm)
    with progress_bar(show=setup.progress, desc=f"{algorithm}: searching", total=2 + curve, unit="stage") as stages:
        circuit, per = _find(setup, algorithm, direction, **options, per_prompt=per_prompt)
        found = Discovery(circuit, direction, per)
        patcher = EdgePatcher(setup, circuit.graph, direction=direction)
        stages.update()
        stages.set_description(f"{algorithm}: faithfulness")
        if circuit.n_edges:
            found.faithfulness = faithfulness(patcher, circuit)
        else:
            found.faithfulness_status = "empty circuit"
        stages.update()
        if curve and algorithm in SCORED and circuit.scores is not None:
            stages.set_description(f"{algorithm}: faithfulness curve")
            found.curve = faithfulness_curve(patcher, circuit.scores)
        stages.update(stages.total - stages.n)
    return found


def _find(
    setup: P.PatchingSetup,
    algorithm: str,
    direction: P.Direction,
    *,
    acdc_tau: float,
    top_k: int,
    ig_steps: int,
    path_depth: int,
    path_k: float,
    node_k: float,
    prune_steps: int,
    per_prompt: bool,
) -> tuple[Circuit, torch.Tensor | None]:
    """The circuit of one algorithm (options checked) and, for EAP/EAP-IG with ``per_prompt``, the
    per-prompt edge scores."""
    if algorithm == "path_patching":
        return iterative_path_patching(setup, path_depth, path_k, "end", direction), None
    if algorithm == "node":
        return node_circuit(setup, direction, node_k), None
    if algorithm in ("atp", "atp_star"):
        return atp_circuit(setup, direction, algorithm, top_k), None
    if algorithm == "acdc":
        return acdc(EdgePatcher(setup, direction=direction), acdc_tau), None
    patcher = EdgePatcher(setup, direction=direction)
    if algorithm == "edge_pruning":
        return edge_pruning_circuit(patcher, top_k, prune_steps), None
    if algorithm == "ugs":
        return ugs_circuit(patcher, top_k, prune_steps), None
    k = check_top_k(top_k, patcher.graph)
    if algorithm == "ifr":  # the clean run only: a setting field says so (records, report)
        settings = _settings(patcher, algorithm, k=k, corruption_free=True)
        return select_top_k(patcher.graph, ifr_scores(setup, patcher.graph), k, settings), None
    steps = ig_steps if algorithm in ("eap_ig", "eap_ig_act") else None

    def scores_of(per: bool) -> torch.Tensor:
        if algorithm == "eap_ig_act":
            return eap_ig_act(patcher, ig_steps, per_prompt=per)
        return eap(patcher, per_prompt=per) if steps is None else eap_ig(patcher, ig_steps, per_prompt=per)

    per_scores = multitoken.prompt_values(scores_of(True), setup.batch, setup.ctx) if per_prompt else None
    scores = per_scores.mean(-1) if per_scores is not None else scores_of(False)
    circuit = select_top_k(patcher.graph, scores, k, _settings(patcher, algorithm, k=k, ig_steps=steps))
    return circuit, per_scores
