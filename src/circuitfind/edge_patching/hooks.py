"""The hooks edge-patching engine: the ``TransformerBridge`` with the corrections as forward hooks.

It serves every architecture, gradients (EAP, EAP-IG), per-prompt and per-position masks, and the
mask-free attribution pass (:meth:`HooksEngine.attribution`). :meth:`HooksEngine.hooks` builds the
sender hooks (which keep ``source - current`` per sender) and the receiver hooks (which add their
corrections); see :mod:`circuitfind.edge_patching` for the formula and the mask convention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from circuitfind.edge_patching.engine import Patcher
from circuitfind.edge_patching.prefix import PrefixCache
from circuitfind.names import hook_name, parse_hook
from circuitfind.patching.setup import answer_logits

Hook = tuple[str | Callable, Callable]  # (hook name or name filter, hook function), as run_with_hooks takes them


class HooksEngine:
    """The ``hooks`` engine of an :class:`EdgePatcher` (see :class:`circuitfind.edge_patching.Engine`)."""

    name = "hooks"

    def __init__(self, patcher: Patcher):
        self.patcher = patcher
        self.setup, self.graph, self.model, self.direction = (
            patcher.setup,
            patcher.graph,
            patcher.model,
            patcher.direction,
        )
        self.sources, self.sender_hooks = patcher.sources, patcher.sender_hooks
        self._prefixes: PrefixCache[tuple[torch.Tensor, torch.Tensor]] = PrefixCache()
        L = self.graph.n_layers
        # Receiver groups: (hook, receiver indices, upstream sender count, per-head?, slice of the
        # indices this hook takes). A layer's q, k and v inputs read the same senders, so their
        # corrections come from one matmul (one pass over the sender differences), split per hook.
        self.groups: list = []
        for layer in range(L):
            if self.graph.split_qkv:
                parts = {k: self.graph.receiver_slices(layer, k) for k in ("q", "k", "v")}
                idx = parts["q"] + parts["k"] + parts["v"]
                bounds = {"q": (0, len(parts["q"]))}
                bounds["k"] = (bounds["q"][1], bounds["q"][1] + len(parts["k"]))
                bounds["v"] = (bounds["k"][1], len(idx))
            else:
                idx = self.graph.receiver_slices(layer, "qkv")
                bounds = {k: (0, len(idx)) for k in ("q", "k", "v")}
            up = self.graph.upstream(self.graph.receivers[idx[0]])
            shared = torch.tensor(idx)  # one object per layer: the three hooks share its corrections
            for kind in ("q", "k", "v"):
                self.groups.append((hook_name(layer, f"{kind}_input"), shared, up, True, bounds[kind]))
            idx = self.graph.receiver_slices(layer, "mlp")
            self.groups.append(
                (
                    hook_name(layer, "mlp_in"),
                    torch.tensor(idx),
                    self.graph.upstream(self.graph.receivers[idx[0]]),
                    False,
                    (0, 1),
                )
            )
        self.groups.append(
            (
                hook_name(L - 1, "resid_post"),
                torch.tensor([len(self.graph.receivers) - 1]),
                len(self.graph.senders),
                False,
                (0, 1),
            )
        )

    def hooks(
        self,
        dense: torch.Tensor,
        n: int,
        fixed_diff: bool,
        per_prompt: bool = False,
        prefix: torch.Tensor | None = None,
        prompts: slice | None = None,
    ) -> tuple[list[Hook], dict]:
        """Forward hooks for ``n`` stacked candidates with dense keep-masks ``[n, S, R(, pos)]``
        (per-prompt masks: ``[n, S, R, prompts]``) on the prompts ``prompts`` (default: all).

        Sender differences are laid out sender-major, ``[n, senders, batch, pos, d_model]``, so a
        receiver's correction is one batched matmul over its upstream senders. Without autograd
        they are written into one preallocated buffer; with autograd they are concatenated.
        ``prefix`` holds the differences of the senders below a start layer (shared by all
        candidates). Returns the hooks and their state (``state["buffer"]`` after the forward).
        """
        prompts = prompts or slice(0, self.setup.size)
        B = prompts.stop - prompts.start
        sources = {name: t[prompts] for name, t in self.sources.items()}
        base = {name: t[prompts] for name, t in self.patcher.base_outputs().items()} if fixed_diff else None
        per_pos = dense.dim() == 4 and not per_prompt
        S = len(self.graph.senders)
        state: dict = {"count": 0, "parts": [], "buffer": None, "cat": None}
        if prefix is not None:
            state["buffer"] = prefix.new_empty(n, S, *prefix.shape[2:])
            state["buffer"][:, : prefix.shape[1]] = prefix
            state["count"] = prefix.shape[1]

        def store(act, hook, name, grouped):
            view = act.reshape(n, B, *act.shape[1:])
            diff = sources[name] - (base[name] if fixed_diff else view)
            if diff.dim() < view.dim():
                diff = diff.unsqueeze(0).expand_as(view)
            diff = diff.permute(0, 3, 1, 2, 4) if grouped else diff.unsqueeze(1)  # [n, g, B, pos, d]
            k, g = state["count"], diff.shape[1]
            if torch.is_grad_enabled() and prefix is None:
                state["parts"].append(diff)
                state["cat"] = None
            else:
                if state["buffer"] is None:
                    state["buffer"] = act.new_empty(n, S, *diff.shape[2:])
                state["buffer"][:, k : k + g].copy_(diff)
            state["count"] = k + g

        def sent_diffs(up: int) -> torch.Tensor:
            assert state["count"] == up, "sender and receiver hooks fired out of order"
            if state["buffer"] is not None:
                return state["buffer"][:, :up]
            if state["cat"] is None:
                state["cat"] = torch.cat(state["parts"], dim=1)
            return state["cat"]

        corrections: dict[int, torch.Tensor] = {}  # id of a receiver group -> its corrections

        def correct(act, hook, idx, up, per_head, bounds):
            key = id(idx)
            if key not in corrections:
                patched = (1.0 - dense[:, :up, idx.to(dense.device)]).to(act.dtype)  # [n, up, R(, pos)]
                diffs = sent_diffs(up)  # [n, up, B, pos, d]
                if per_prompt:
                    corr = torch.einsum("csrb,csbtd->cbtrd", patched, diffs)
                elif per_pos:
                    corr = torch.einsum("csrt,csbtd->cbtrd", patched, diffs)
                else:
                    R = patched.shape[2]
                    corr = torch.bmm(patched.transpose(1, 2), diffs.reshape(n, up, -1)).reshape(n, R, *diffs.shape[2:])
                    corr = corr.permute(0, 2, 3, 1, 4)  # [n, B, pos, R, d]
                corrections[key] = corr
            corr = corrections[key][:, :, :, bounds[0] : bounds[1]]
            if per_head:
                return (act.reshape(n, B, *act.shape[1:]) + corr).reshape(act.shape)
            return (act.reshape(n, B, *act.shape[1:]) + corr[:, :, :, 0]).reshape(act.shape)

        hooks: list[Hook] = []
        names = iter(self.sender_hooks)
        first = next(names)
        hooks.append((first, lambda a, hook, _n=first: store(a, hook, _n, False)))
        for name in names:
            grouped = parse_hook(name)[1] == "result"  # per-head outputs
            hooks.append((name, lambda a, hook, _n=name, _g=grouped: store(a, hook, _n, _g)))
        for hname, idx, up, per_head, bounds in self.groups:
            hooks.append(
                (hname, lambda a, hook, _i=idx, _u=up, _p=per_head, _b=bounds: correct(a, hook, _i, _u, _p, _b))
            )
        return hooks, state

    def _prefix(self, keep: torch.Tensor, first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream entering ``first_layer`` and the sender differences below it, for one mask
        set (``[1, n_edges]``), cached by the masks of the edges below ``first_layer``."""
        below = self.graph.edge_index[1] < self._receivers_below(first_layer)

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            base = self.setup.base_run(self.direction)
            hooks, state = self.hooks(self.graph.dense(keep.float()), 1, fixed_diff=False)
            with torch.no_grad():  # runs only the blocks below `first_layer`
                resid = self.model.run_with_hooks(
                    base.tokens, fwd_hooks=list(base.hooks) + hooks, stop_at_layer=first_layer
                )
            return resid.detach(), state["buffer"][:, : self.graph.senders_before(first_layer)].clone()

        return self._prefixes.get(first_layer, keep[0, below.to(keep.device)], compute)

    def _receivers_below(self, layer: int) -> int:
        return sum(r.layer < layer for r in self.graph.receivers)

    def logits(
        self,
        keep: torch.Tensor,
        prompts: slice,
        first_receiver: int = 0,
        *,
        fixed_diff: bool = False,
        extra_hooks: list[Hook] | None = None,
        per_prompt: bool = False,
    ) -> torch.Tensor:
        """Answer-position logits of one pass (keep-masks ``keep`` on ``prompts``) through the bridge's
        forward hooks (see :meth:`EdgePatcher.run` for the options)."""
        n = keep.shape[0]
        base = self.setup.base_run(self.direction)
        whole = prompts.start == 0 and prompts.stop == self.setup.size
        first_layer = min(self.graph.receivers[first_receiver].layer, self.graph.n_layers - 1) if first_receiver else 0
        if first_layer and not whole:
            raise ValueError("the hooks engine starts at a receiver on the whole batch only")
        prefix = self._prefix(keep[:1], first_layer) if first_layer else None
        dense = self.graph.dense(keep)
        dense = dense[..., prompts] if per_prompt else dense
        hooks, _ = self.hooks(dense, n, fixed_diff, per_prompt, None if prefix is None else prefix[1], prompts)
        with torch.set_grad_enabled(keep.requires_grad):
            if prefix is not None:  # embedding-stage and lower-layer hooks are skipped by the bridge
                logits = self.model.run_with_hooks(
                    prefix[0].repeat(n, 1, 1), start_at_layer=first_layer, fwd_hooks=hooks
                )
            elif whole:
                hooks = list(base.hooks) + list(extra_hooks or []) + hooks
                logits = self.model.run_with_hooks(base.tokens.repeat(n, 1), fwd_hooks=hooks)
            else:  # the embedding stage (and its hooks) on the whole batch, the blocks on these prompts
                resid = self.embedding_stage(n, extra_hooks)
                resid = resid.reshape(n, self.setup.size, *resid.shape[1:])[:, prompts].flatten(0, 1)
                logits = self.model.run_with_hooks(resid, start_at_layer=0, fwd_hooks=hooks)
            return answer_logits(logits, self.setup.plan.end_pos[prompts].repeat(n))

    def embedding_stage(self, n: int, extra_hooks) -> torch.Tensor:
        """The residual stream entering block 0 for ``n`` stacked copies of the batch, with the base
        run's hooks and ``extra_hooks`` (embedding-stage hooks that see the whole stacked batch)."""
        base = self.setup.base_run(self.direction)
        with torch.no_grad():
            return self.model.run_with_hooks(
                base.tokens.repeat(n, 1), fwd_hooks=list(base.hooks) + list(extra_hooks or []), stop_at_layer=0
            )

    def attribution(
        self,
        *,
        fixed_diff: bool = False,
        extra_hooks: list[Hook] | None = None,
        n: int = 1,
        per_prompt: bool = False,
        prompts: slice | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Edge attributions of one pass: ``-d metric / d mask`` at masks that keep every edge.

        That gradient is, for each edge, the dot product of the sender's difference
        ``source - output`` with the gradient of the metric at the receiver's input (the corrections
        vanish when every edge is kept), so this pass needs no masks: it runs the base run
        (``n`` stacked copies, with ``extra_hooks``), keeps the senders' differences (or, with
        ``fixed_diff``, takes ``source - base run``), and the receivers' inputs add their gradient's
        dot products into the scores as the backward reaches them. Same result as the mask
        gradient of :meth:`run`, in less time and memory (no corrections, nothing of the
        differences kept for autograd). Graphs without per-position edges only.

        Args:
            n: stacked copies of the batch (EAP-IG's steps); their attributions add up.
            per_prompt: one column per prompt.
            prompts: this pass's prompts (default: all).
            scale: factor of the summed metric (``1 / batch`` for the gradient of the mean).

        Returns ``[n_edges]``, or ``[n_edges, prompts]`` with ``per_prompt``.
        """
        if self.graph.n_pos is not None:
            raise ValueError("attribution needs a graph without per-position edges (use run with differentiable masks)")
        prompts = prompts or slice(0, self.setup.size)
        b, T = prompts.stop - prompts.start, self.setup.n_pos
        S, R = len(self.graph.senders), len(self.graph.receivers)
        sources = {name: t[prompts] for name, t in self.sources.items()}
        first = self.sender_hooks[0]
        if fixed_diff:  # [1, b, S, T, d], prompt-major: a receiver's dot products are one batched matmul
            base = self.patcher.base_outputs()
            parts = [
                (sources[name] - base[name][prompts]).reshape(b, T, -1, sources[name].shape[-1])
                for name in self.sender_hooks
            ]
            diffs = torch.cat(parts, dim=2).permute(0, 2, 1, 3).contiguous()[None]
        else:
            diffs = None
        scores = torch.zeros(b, S, R, device=self.setup.plan.clean.tokens.device)  # float32
        state = {"count": 0}

        def store(act, hook, name):
            nonlocal diffs
            view = act.reshape(n, b, T, -1, act.shape[-1])  # [n, b, T, g, d]
            if not fixed_diff:
                if diffs is None:
                    diffs = act.new_empty(n, b, S, T, act.shape[-1])
                k, g = state["count"], view.shape[3]
                diffs[:, :, k : k + g].copy_(
                    (sources[name].reshape(b, T, g, -1) - view.detach()).permute(0, 1, 3, 2, 4)
                )
                state["count"] = k + g
            return act.detach().requires_grad_(True) if name == first else act  # the leaf autograd starts from

        def accumulate(grad, rows, up):
            gr = grad.reshape(n, b, T, -1, grad.shape[-1])  # [n, b, T, r, d]
            if diffs.shape[0] == 1 and n > 1:  # fixed differences: add the copies' gradients first
                gr = gr.sum(0, keepdim=True)
            m = gr.shape[0]
            d = diffs[:, :, :up].reshape(m * b, up, -1)  # [m * b, up, T * d]
            gr = gr.permute(0, 1, 3, 2, 4).reshape(m * b, gr.shape[3], -1).transpose(1, 2)  # [m * b, T * d, r]
            contrib = torch.bmm(d, gr).reshape(m, b, up, -1).sum(0)
            scores[:, :up, rows] += contrib.float()

        def receive(act, hook, rows, up):
            # a new tensor (a view): its gradient is the receiver's alone, not the residual stream's
            # when the hook point hands over the residual stream itself (hook_mlp_in)
            out = act.view_as(act)
            if out.requires_grad:
                out.register_hook(lambda grad: accumulate(grad, rows, up))
            return out

        hooks: list[Hook] = [(name, lambda a, hook, _n=name: store(a, hook, _n)) for name in self.sender_hooks]
        for hname, idx, up, _, bounds in self.groups:
            rows = idx[bounds[0] : bounds[1]].to(scores.device)
            hooks.append((hname, lambda a, hook, _r=rows, _u=up: receive(a, hook, _r, _u)))
        base_run = self.setup.base_run(self.direction)
        with torch.enable_grad():
            if (prompts.start, prompts.stop) == (0, self.setup.size):
                hooks = list(base_run.hooks) + list(extra_hooks or []) + hooks
                logits = self.model.run_with_hooks(base_run.tokens.repeat(n, 1), fwd_hooks=hooks)
            else:
                if not self.patcher.embedding_stage_only(extra_hooks):
                    raise ValueError(
                        "a pass over part of the prompts needs base-run and extra hooks on the embedding stage only"
                    )
                resid = self.embedding_stage(n, extra_hooks)
                resid = resid.reshape(n, self.setup.size, *resid.shape[1:])[:, prompts].flatten(0, 1)
                logits = self.model.run_with_hooks(resid, start_at_layer=0, fwd_hooks=hooks)
            answer = answer_logits(logits, self.setup.plan.end_pos[prompts].repeat(n))
            (self.patcher.score(answer, prompts).sum() * scale).backward()
        s_idx, r_idx = (i.to(scores.device) for i in self.graph.edge_index)
        edges = scores[:, s_idx, r_idx]  # [b, n_edges]
        return edges.T if per_prompt else edges.sum(0)
