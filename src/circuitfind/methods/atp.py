"""Attribution patching of attention heads and MLPs: AtP and AtP* (Kramár, Lieberum, Shah & Nanda 2024,
"AtP*: An efficient and scalable method for localizing LLM behaviour to components", arXiv 2403.00745).

The nodes are those of exact node patching: each head's output ``hook_z`` at every position
(:func:`circuitfind.patching.patch_heads`) and each MLP's output ``hook_mlp_out`` at every position
(:func:`circuitfind.patching.patch_mlp_windows`, ``window=1``). The estimates are in its units:
``patched - base`` of the metric, the mean over prompts, ``[layer, head]`` and ``[layer]``
(:func:`atp_estimates`). An MLP's estimate is made as a head's: the first-order term below, and for
``atp_star`` the QK fix at the later heads it writes into and GradDrop.

* ``atp`` (attribution patching, Nanda 2022; the paper's eq. 4): the first-order estimate
  ``(z_source - z_base) . dM/dz`` at the base run, for every head from one forward and backward pass.
* ``atp_star``: the paper's two fixes.

  **QK fix** (the paper's sec. 3.1.1, eqs. 7-10): a linearised softmax misses effects that flip a
  saturated attention pattern (its gradient there is ~0). The paper's nodes are per-position queries,
  keys and values, and the fix recomputes the node's own head's softmax exactly, linear after the
  pattern. A head's *output* already carries its own softmax exactly (``z_source`` is the source
  run's output), so here the fix is applied where a head output's effect meets a softmax: the queries
  and keys of every later head it writes into. For node ``n`` (layer ``l``) and each later head ``B``,
  ``B``'s pattern is recomputed exactly from its residual input plus ``n``'s direct write
  ``(z_source - z_base) W_O``, and ``(A_B' - A_B) . dM/dA_B`` replaces the linear term of that path,
  ``(n's write) . dM/d(B's q and k inputs)``. What this chooses where the paper is open: only the
  direct path from ``n`` into ``B``'s queries and keys is recomputed (paths through components in
  between stay linear), queries and keys of every position change together, and every head of a
  grouped key/value group reads the recomputed keys.

  **GradDrop** (sec. 3.1.2, eq. 11): cancelling direct and indirect effects give false negatives, so
  the estimate is recomputed ``L`` times, each with the gradient through one layer's residual-stream
  contributions (its ``attn_out`` and ``mlp_out``) zeroed, and ``|c|`` is averaged as
  ``1/(L-1) sum_l |c_l|`` (the term of the node's own layer is 0, hence ``L - 1``). The paper takes
  ``|.|`` per prompt pair; here it is taken of the mean over prompts, the quantity exact node patching
  reports, and the estimate keeps the sign of the QK-fixed estimate. A one-layer model has no other
  layer to drop: there GradDrop is skipped.

``atp_star`` needs the hook-free components of :mod:`circuitfind.models.tensor_forward` (GPT-2 and
Llama-style models); ``atp`` runs on any bridge. :func:`compare_with_exact` lists the estimate's
false negatives against exact node patching, as the paper's evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from circuitfind.checks import positive_int
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods.base import Found, Method, TopK
from circuitfind.methods.node import circuit_edges, heads_circuit
from circuitfind.models import tensor_forward
from circuitfind.names import head_name, hook_name, mlp_name
from circuitfind.patching import memory
from circuitfind.patching.node_patching import patch_heads
from circuitfind.patching.setup import Direction, PatchingSetup, answer_logits, check_direction, repeat_ctx

VARIANTS = ("atp", "atp_star")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def atp_scores(
    setup: PatchingSetup, direction: Direction = "noise", variant: str = "atp", grad_drop: bool = True
) -> torch.Tensor:
    """Estimated effect of patching each head's output, ``[layer, head]``, in the units of
    :attr:`circuitfind.patching.PatchResult.effect` (``patched - base``, mean over prompts).

    ``variant``: ``atp`` (first order) or ``atp_star`` (QK fix, and GradDrop unless ``grad_drop`` is
    off); see the module docstring."""
    return atp_estimates(setup, direction, variant, grad_drop)[0]


def atp_estimates(
    setup: PatchingSetup, direction: Direction = "noise", variant: str = "atp", grad_drop: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated effects of patching each head's output ``[layer, head]`` and each MLP's output
    ``[layer]`` (``hook_mlp_out`` at every position, the node of :func:`circuitfind.patching.patch_mlp_windows`
    with ``window=1``), from the same passes. An MLP node is estimated as a head is (the paper's nodes
    include MLP neurons; here the MLP's whole output is one node): ``(out_source - out_base) . dM/d out``
    for ``atp``; for ``atp_star`` with the QK fix at the later heads it writes into, and GradDrop."""
    check_direction(direction)
    check_variant(variant)
    star = variant == "atp_star"
    fm = tensor_forward.TensorModel(setup.model) if star else None  # a clear error for other architectures
    L = setup.n_layers
    z_names = [hook_name(l, "z") for l in range(L)]
    mlp_names = [hook_name(l, "mlp_out") for l in range(L)]
    base = setup.base_activations(direction, z_names + mlp_names)
    source = setup.sources(direction, z_names + mlp_names)
    diff = [(source[n] - base[n]).float() for n in z_names]  # [B, T, H, e]
    mlp_diff = [(source[n] - base[n]).float() for n in mlp_names]  # [B, T, d]
    versions = L + 1 if star and grad_drop and L > 1 else 1  # 0: every gradient; 1 + l: layer l's dropped
    grads = _gradients(setup, direction, versions, star)
    atp = torch.stack([torch.einsum("bthe,vbthe->vhb", diff[l], grads["z"][l]) for l in range(L)], 1)  # [V, L, H, B]
    mlp = torch.stack(
        [torch.einsum("btd,vbtd->vb", mlp_diff[l], grads["mlp_out"][l]) for l in range(L)], 1
    )  # [V, L, B]
    if star:
        assert fm is not None
        head_fix, mlp_fix = _qk_fix(setup, direction, fm, diff, mlp_diff, grads)
        atp, mlp = atp + head_fix, mlp + mlp_fix
    return _combine(atp.mean(-1), L), _combine(mlp.mean(-1), L)


def _combine(est: torch.Tensor, L: int) -> torch.Tensor:
    """The estimate from its versions ``[V, ...]``: version 0 alone, or GradDrop's
    ``1/(L-1) sum_l |c_l|`` with the sign of version 0."""
    if est.shape[0] == 1:
        return est[0].cpu()
    magnitude = est[1:].abs().sum(0) / (L - 1)
    return (torch.where(est[0] < 0, -1.0, 1.0) * magnitude).cpu()


def atp_mlp_by_position(setup: PatchingSetup, direction: Direction = "noise") -> torch.Tensor:
    """AtP's first-order estimate of patching each MLP's output at one position, ``[layer, pos]``: the
    units and cells of :func:`circuitfind.patching.patch_block` ``(setup, "mlp_out")``; summed over
    positions it is :func:`atp_estimates`' MLP estimate (first order is linear in the patch)."""
    check_direction(direction)
    L = setup.n_layers
    names = [hook_name(l, "mlp_out") for l in range(L)]
    base = setup.base_activations(direction, names)
    source = setup.sources(direction, names)
    grads = _gradients(setup, direction, 1, False)["mlp_out"]
    return torch.stack(
        [torch.einsum("btd,btd->bt", (source[n] - base[n]).float(), grads[l][0]).mean(0) for l, n in enumerate(names)]
    ).cpu()


def _gradients(setup: PatchingSetup, direction: Direction, versions: int, star: bool) -> dict[str, list[torch.Tensor]]:
    """Gradients of the metric at the base run, per prompt (their sum is taken; rows do not interact):
    ``z`` and ``mlp_out`` for every layer and, for the QK fix, ``pattern``, ``q_input`` and ``k_input``; each as
    ``[versions, B, ...]``. Version ``1 + l`` zeroes the gradient through layer ``l``'s ``attn_out``
    and ``mlp_out`` (GradDrop). Versions are stacked along the batch, as many per pass as
    ``max_batch`` allows."""
    kinds = ("z", "mlp_out", "pattern", "q_input", "k_input") if star else ("z", "mlp_out")
    per_pass = max(1, setup.max_batch // setup.size)
    parts = [
        _gradient_pass(setup, direction, kinds, range(start, min(start + per_pass, versions)), versions > 1)
        for start in range(0, versions, per_pass)
    ]
    return {k: [torch.cat([p[k][l] for p in parts]) for l in range(setup.n_layers)] for k in kinds}


def _gradient_pass(
    setup: PatchingSetup, direction: Direction, kinds: tuple[str, ...], versions: range, drops: bool
) -> dict[str, list[torch.Tensor]]:
    """One forward and backward pass of :func:`_gradients` over the stacked ``versions``."""
    L, B, n = setup.n_layers, setup.size, len(versions)
    run = setup.base_run(direction)
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def capture(act, hook, key):
        captured[key] = act
        return act

    def drop(act, hook, layer):  # version 1 + layer: no gradient through this layer's outputs
        if layer + 1 not in versions:
            return act
        view = act.reshape(n, B, *act.shape[1:])
        i = versions.index(layer + 1)
        return torch.cat([view[:i], view[i : i + 1].detach(), view[i + 1 :]]).reshape(act.shape)

    order = [(kind, l) for l in range(L) for kind in kinds]
    hooks = list(run.hooks) + [(hook_name(0, "resid_pre"), leaf)]
    hooks += [(hook_name(l, kind), lambda a, hook, _k=(kind, l): capture(a, hook, _k)) for kind, l in order]
    if drops:
        for l in range(L):
            hooks += [(hook_name(l, w), lambda a, hook, _l=l: drop(a, hook, _l)) for w in ("attn_out", "mlp_out")]
    with torch.enable_grad():
        logits = setup.model.run_with_hooks(run.tokens.repeat(n, 1), fwd_hooks=hooks)
        values = setup.metric(answer_logits(logits, setup.plan.end_pos.repeat(n)), repeat_ctx(setup.ctx, n))
        if len(captured) != len(order):
            raise RuntimeError(f"expected {len(order)} hooked activations, the forward pass gave {len(captured)}")
        acts = [captured[key] for key in order]
        got = torch.autograd.grad(values.sum(), acts, allow_unused=True)
    out: dict[str, list[torch.Tensor]] = {k: [torch.empty(0)] * L for k in kinds}
    for (kind, l), act, g in zip(order, acts, got, strict=True):
        g = torch.zeros_like(act) if g is None else g
        out[kind][l] = g.detach().float().reshape(n, B, *act.shape[1:])
    return out


def _qk_fix(
    setup: PatchingSetup,
    direction: Direction,
    fm: tensor_forward.TensorModel,
    diff: list[torch.Tensor],
    mlp_diff: list[torch.Tensor],
    grads: dict[str, list[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The QK fix's corrections, heads ``[V, L, H, B]`` and MLPs ``[V, L, B]``: for each head (MLP) and
    each later head it writes into, the exactly recomputed pattern's first-order effect minus the
    linear term of that path."""
    L, H = setup.n_layers, setup.n_heads
    V, B = grads["z"][0].shape[:2]
    writes = [torch.einsum("bthe,hed->hbtd", diff[l], fm.layers[l].W_O.float()) for l in range(L)]  # [H, B, T, d]
    mlp_writes = [m[None] for m in mlp_diff]  # [1, B, T, d]: an MLP writes its output difference
    resid = setup.base_activations(direction, [hook_name(l, "resid_pre") for l in range(L)])
    fix = torch.zeros(V, L, H, B, device=writes[0].device)
    mlp_fix = torch.zeros(V, L, B, device=writes[0].device)
    # linear term: a write at layer l meets the q/k inputs of every head of every later layer
    qk = [grads["q_input"][l].sum(3) + grads["k_input"][l].sum(3) for l in range(L)]  # [V, B, T, d]
    later = torch.zeros_like(qk[0])
    for l in reversed(range(L)):
        fix[:, l] -= torch.einsum("hbtd,vbtd->vhb", writes[l], later)
        mlp_fix[:, l] -= torch.einsum("btd,vbtd->vb", mlp_diff[l], later)
        later = later + qk[l]
    d_model, T = writes[0].shape[-1], writes[0].shape[2]
    rows = memory.rows_per_pass(memory.budget(setup.max_memory, writes[0].device), 16 * T * d_model * 4, 1 << 30)
    for lb in range(1, L):  # exact patterns of the heads of layer lb, for every earlier head's and MLP's write
        x = resid[hook_name(lb, "resid_pre")]
        dtype = x.dtype
        with torch.no_grad():
            q, k, _ = fm.qkv(lb, x)
            before = fm.pattern(lb, q, k)  # [B, H, T, T]
            g = grads["pattern"][lb]  # [V, B, H, T, T]
            for senders, target in (
                (torch.cat(writes[:lb]), fix.view(V, L * H, B)),  # heads (l, h) with l < lb, in order
                (torch.cat(mlp_writes[:lb]), mlp_fix),  # MLPs of the layers below lb
            ):
                per = max(1, rows // B)
                for s in range(0, senders.shape[0], per):
                    part = senders[s : s + per]
                    q, k, _ = fm.qkv(lb, (x[None] + part.to(dtype)).flatten(0, 1))
                    after = fm.pattern(lb, q, k).reshape(part.shape[0], B, H, T, T)
                    target[:, s : s + part.shape[0]] += torch.einsum("nbhts,vbhts->vnb", after - before, g)  # [V, n, B]
    return fix, mlp_fix


# -- against exact node patching ----------------------------------------------------------


@dataclass
class Miss:
    """A false negative: a head whose exact effect is large but whose estimate ranks it low."""

    head: str
    exact: float
    estimate: float
    exact_rank: int  # 1 = the largest |exact effect|
    estimate_rank: int


@dataclass
class Comparison:
    """AtP estimates against exact node patching (``[layer, head]`` each).

    ``significant``: heads with ``|exact| >= threshold * max |exact|``; a head among them is a miss
    when the estimate ranks it (by ``|estimate|``) below the number of significant heads, so that
    keeping that many heads by the estimate drops it. ``cost``: heads to verify in the estimate's
    order before every significant one is found (the paper's cost of verification)."""

    variant: str
    exact: torch.Tensor
    estimate: torch.Tensor
    threshold: float
    significant: list[str]
    misses: list[Miss]
    cost: int
    max_error: float  # max |estimate - exact| over heads

    def lines(self) -> list[str]:
        """The report: one line of totals, then one per miss."""
        head = (
            f"{self.variant}: {len(self.misses)} of {len(self.significant)} heads with |effect| >= "
            f"{self.threshold:g} x max missed; {self.cost} heads to verify to find them all; "
            f"max |error| {self.max_error:.4g}"
        )
        return [head] + [
            f"  missed {m.head}: exact {m.exact:+.4g} (rank {m.exact_rank}), estimate {m.estimate:+.4g} "
            f"(rank {m.estimate_rank})"
            for m in self.misses
        ]


def compare(estimate: torch.Tensor, exact: torch.Tensor, threshold: float = 0.1, variant: str = "") -> Comparison:
    """Compare an estimate of head effects with the exact ones (both ``[layer, head]``)."""
    if estimate.shape != exact.shape or estimate.dim() != 2:
        raise ValueError(
            f"estimate and exact must be the same [layer, head] shape, got {estimate.shape}, {exact.shape}"
        )
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    H = exact.shape[1]
    ex, est = exact.flatten().float(), estimate.flatten().float()
    rank_exact = _ranks(ex.abs())
    rank_est = _ranks(est.abs())
    big = (ex.abs() >= threshold * ex.abs().max()) & (ex.abs() > 0)
    n = int(big.sum())
    sig = [int(i) for i in big.nonzero().flatten()]
    misses = [
        Miss(head_name(i // H, i % H), float(ex[i]), float(est[i]), int(rank_exact[i]), int(rank_est[i]))
        for i in sorted(sig, key=lambda i: int(rank_exact[i]))
        if rank_est[i] > n
    ]
    cost = max((int(rank_est[i]) for i in sig), default=0)
    return Comparison(
        variant,
        exact,
        estimate,
        threshold,
        [head_name(i // H, i % H) for i in sig],
        misses,
        cost,
        float((est - ex).abs().max()),
    )


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based rank of each value, largest first (ties in index order)."""
    order = values.argsort(descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(values) + 1)
    return ranks


def compare_with_exact(
    setup: PatchingSetup,
    direction: Direction = "noise",
    variants: tuple[str, ...] = VARIANTS,
    threshold: float = 0.1,
) -> list[Comparison]:
    """Exact node patching of every head, and each variant's estimate compared with it."""
    for v in variants:
        check_variant(v)
    exact = patch_heads(setup, direction).effect
    return [compare(atp_scores(setup, direction, v), exact, threshold, v) for v in variants]


def atp_circuit(setup: PatchingSetup, direction: Direction = "noise", variant: str = "atp", top_k: int = 20) -> Circuit:
    """Heads and MLPs ranked by ``|AtP estimate|`` (:func:`atp_estimates`, ``variant`` ``atp`` or
    ``atp_star``) as a node circuit like :func:`node_circuit`'s: the longest prefix of the ranking
    whose circuit has at most ``top_k`` edges (at least the first component), so ``--top-k`` bounds
    the circuit's size as it does for the edge methods. Edge scores are the components' estimates
    (heads and MLPs are in the same units, the metric's change when the component is patched)."""
    positive_int("top_k", top_k)
    effect, mlp_effect = atp_estimates(setup, direction, variant)
    graph = ModelGraph.from_model(setup.model)
    H = setup.n_heads
    ranked = torch.cat([effect.flatten(), mlp_effect])
    order = ranked.abs().argsort(descending=True, stable=True).tolist()
    names = [head_name(i // H, i % H) if i < effect.numel() else mlp_name(i - effect.numel()) for i in order]
    found: set[str] = set()
    for name in names:
        if found and circuit_edges(graph, found | {name}) > top_k:
            break
        found.add(name)
    return heads_circuit(
        setup, found, effect, {"algorithm": variant, "direction": direction, "k": top_k}, mlp_effect=mlp_effect
    )


class AtP(Method):
    name = "atp"
    paper = "Kramár et al. 2024, AtP*: An efficient and scalable method for localizing LLM behaviour to components"
    summary = "attribution patching of heads and MLPs: first-order estimates of node patching, as a node circuit"
    Options = TopK
    gradients = True
    score = "estimated"
    returns = "circuit"
    ranks_every_edge = False

    def find(self, setup: PatchingSetup, direction: Direction, options: Any, per_prompt: bool = False) -> Found:
        return Found(atp_circuit(setup, direction, self.name, options.top_k))


class AtPStar(AtP):
    name = "atp_star"
    summary = "AtP* of heads and MLPs (the QK fix at later heads' queries and keys, GradDrop), as a node circuit"
