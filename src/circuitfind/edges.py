"""Edge patching: any set of patched edges evaluated in one forward pass.

During the forward pass every sender's output is kept, as the difference ``source - current``
between the activation patched in and the one this forward computed. Each receiver reads the
residual stream through its own copy (``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` /
``hook_mlp_in`` / the final ``hook_resid_post``), which is corrected by

    input_r += einsum((1 - mask[:, senders, r]), source_out - current_out)

over its upstream senders. ``mask = 1`` keeps an edge (the receiver sees the sender's value in this
run); ``mask = 0`` patches it (the receiver sees the source run's value). With the default
``noise`` direction the base run is the clean one and the source is the corrupted (or ablated) run,
so all-ones masks reproduce the clean run and all-zeros masks the corrupted run.

Masks are ``[candidates, n_edges]`` (``[candidates, n_edges, pos]`` for per-position graphs),
bool or float; float masks are differentiable (EAP). Candidates are stacked on the batch axis and
evaluated together, ``max_batch`` prompts per forward pass.

Two engines compute the same thing. ``hooks`` runs the ``TransformerBridge`` with the corrections
as forward hooks; it serves every architecture, gradients (EAP, EAP-IG), per-prompt and
per-position masks. ``functional`` (:mod:`circuitfind.functional`, GPT-2 and Llama-style models)
runs a hook-free copy of the forward pass that starts at the first receiver whose edges differ,
shares the work below it across candidates and computes the last layer at the answer position
only; the default ``auto`` uses it for plain (no-gradient) evaluations where it applies.
:meth:`EdgePatcher.incremental` serves searches that edit a few edges at a time (ACDC): on the
functional engine each candidate reruns only the components its edit reaches.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from circuitfind import functional, incremental, memory
from circuitfind.graph import ModelGraph
from circuitfind.patching import (EMBEDDING_STAGE, Direction, PatchingSetup, _check_direction, _repeat_ctx, _slice_ctx,
                                  answer_logits, hook_name)

Hook = tuple[str, Callable]


class EdgePatcher:
    """Evaluates edge masks on one :class:`PatchingSetup` and :class:`ModelGraph`.

    Args:
        setup: model, batch, corruption and metric (see :func:`circuitfind.patching.prepare`).
        graph: the edge graph (``ModelGraph.from_model(model)`` by default).
        direction: ``noise`` (base = clean run, patched edges carry corrupted values) or
            ``denoise`` (base = corrupted run, patched edges carry clean values).
        engine: ``auto`` (``functional`` for plain evaluations where the architecture and graph
            allow it, ``hooks`` otherwise), ``hooks`` or ``functional``.
    """

    def __init__(self, setup: PatchingSetup, graph: ModelGraph | None = None, direction: Direction = "noise",
                 engine: str = "auto"):
        _check_direction(direction)
        if engine not in ("auto", "hooks", "functional"):
            raise ValueError(f"engine must be 'auto', 'hooks' or 'functional', got {engine!r}")
        self.setup, self.direction = setup, direction
        self.model = setup.model
        self.graph = graph or ModelGraph.from_model(self.model)
        if self.graph.n_pos is not None and self.graph.n_pos != setup.n_pos:
            raise ValueError(f"graph has {self.graph.n_pos} positions but the batch has {setup.n_pos}")
        if (self.graph.n_layers, self.graph.n_heads) != (setup.n_layers, setup.n_heads):
            raise ValueError("graph shape does not match the model")
        L = self.graph.n_layers
        self._sender_hooks = [hook_name(0, "resid_pre")]
        for layer in range(L):
            self._sender_hooks += [hook_name(layer, "result"), hook_name(layer, "mlp_out")]
        self.sources = setup.sources(direction, self._sender_hooks)
        self._base_outputs: dict[str, torch.Tensor] | None = None
        self._prefixes: dict = {}
        usable = functional.supports(self.model) and self.graph.n_pos is None
        if engine == "functional" and not usable:
            raise functional.UnsupportedModelError(
                "the functional engine needs a GPT-2 or Llama-style model and a graph without per-position edges")
        self.engine = "functional" if usable and engine != "hooks" else "hooks"
        self._masked: dict[tuple[int, int], functional.MaskedForward] = {}  # by prompt range
        self._functional: functional.FunctionalModel | None = None
        self._budget: int | None = None
        # Receiver groups: (hook, receiver indices, upstream sender count, per-head?, slice of the
        # indices this hook takes). A layer's q, k and v inputs read the same senders, so their
        # corrections come from one matmul (one pass over the sender differences), split per hook.
        self._groups = []
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
                self._groups.append((hook_name(layer, f"{kind}_input"), shared, up, True, bounds[kind]))
            idx = self.graph.receiver_slices(layer, "mlp")
            self._groups.append((hook_name(layer, "mlp_in"), torch.tensor(idx), self.graph.upstream(self.graph.receivers[idx[0]]), False, (0, 1)))
        self._groups.append((hook_name(L - 1, "resid_post"), torch.tensor([len(self.graph.receivers) - 1]), len(self.graph.senders), False, (0, 1)))

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges

    def base_outputs(self) -> dict[str, torch.Tensor]:
        """Sender outputs of the unpatched base run (for fixed-difference gradients, EAP-IG)."""
        if self._base_outputs is None:
            self._base_outputs = self.setup.base_activations(self.direction, self._sender_hooks)
        return self._base_outputs

    def _hooks(self, dense: torch.Tensor, n: int, fixed_diff: bool, per_prompt: bool = False,
               prefix: torch.Tensor | None = None, prompts: slice | None = None) -> tuple[list[Hook], dict]:
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
        base = {name: t[prompts] for name, t in self.base_outputs().items()} if fixed_diff else None
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
        names = iter(self._sender_hooks)
        first = next(names)
        hooks.append((first, lambda a, hook, _n=first: store(a, hook, _n, False)))
        for name in names:
            grouped = name.endswith("hook_result")
            hooks.append((name, lambda a, hook, _n=name, _g=grouped: store(a, hook, _n, _g)))
        for hname, idx, up, per_head, bounds in self._groups:
            hooks.append((hname, lambda a, hook, _i=idx, _u=up, _p=per_head, _b=bounds: correct(a, hook, _i, _u, _p, _b)))
        return hooks, state

    def _prefix(self, masks: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream entering ``layer`` and the sender differences below it, for one mask set
        (``[1, n_edges]``), cached by the masks of the edges below ``layer`` (hooks engine)."""
        below = self.graph.edge_index[1] < self._receivers_below(layer)
        key = (layer, masks[0, below.to(masks.device)].cpu().numpy().tobytes())
        if key not in self._prefixes:
            base = self.setup.base_run(self.direction)
            hooks, state = self._hooks(self.graph.dense(masks.float()), 1, fixed_diff=False)
            with torch.no_grad():  # runs only the blocks below `layer`
                resid = self.model.run_with_hooks(base.tokens, fwd_hooks=list(base.hooks) + hooks, stop_at_layer=layer)
            if len(self._prefixes) > 16:
                self._prefixes.clear()
            self._prefixes[key] = (resid.detach(), state["buffer"][:, : self.graph.senders_before(layer)].clone())
        return self._prefixes[key]

    def _receivers_below(self, layer: int) -> int:
        return sum(r.layer < layer for r in self.graph.receivers)

    def masked_forward(self, prompts: slice | None = None) -> functional.MaskedForward:
        """The functional engine's pass on this setup's prompts ``prompts`` (default: all), built on
        first use and kept."""
        prompts = prompts or slice(0, self.setup.size)
        key = (prompts.start, prompts.stop)
        if key not in self._masked:
            if self._functional is None:
                self._functional = functional.FunctionalModel(self.model)
            base = {name: t[prompts] for name, t in self.base_outputs().items()}
            sources = {name: t[prompts] for name, t in self.sources.items()}
            self._masked[key] = functional.MaskedForward(self._functional, self.graph, base, sources,
                                                         self.setup.plan.end_pos[prompts], self._sender_hooks)
        return self._masked[key]

    # -- memory -----------------------------------------------------------------------------
    PASS_KINDS = ("functional", "hooks", "grad", "attribution")

    def row_bytes(self, kind: str) -> int:
        """Estimated working memory of one stacked row (one candidate on one prompt) in a pass:
        ``functional`` (the functional engine), ``hooks`` (the bridge with edge hooks), ``grad``
        (the same with differentiable masks: the backward keeps every layer's activations and the
        differences), ``attribution`` (:meth:`attribution`). The coefficients were checked against
        the peak RSS of single passes on a Llama-3.2-1B-shaped model (README)."""
        if kind not in self.PASS_KINDS:
            raise ValueError(f"kind must be one of {self.PASS_KINDS}, got {kind!r}")
        cfg, g = self.model.cfg, self.graph
        T, d, L = self.setup.n_pos, cfg.d_model, g.n_layers
        H, KV, S, R = g.n_heads, g.n_kv_heads, len(g.senders), len(g.receivers)
        d_mlp = getattr(cfg, "d_mlp", None) or 4 * d
        inputs = H + 2 * KV + 1  # one layer's q, k, v and MLP receivers
        layer = T * (3 * d_mlp + 2 * H * T)  # MLP hidden states and attention scores of one layer
        if kind == "functional":  # differences, one layer's corrections and per-head inputs, the answer's logits
            floats = T * d * (S + 3 * inputs + 4) + layer + 2 * cfg.d_vocab
        elif kind == "hooks":  # the buffer and each hook's differences, per-head inputs, logits at every position
            floats = T * d * (2 * S + 4 * inputs + 8) + layer + 3 * T * cfg.d_vocab
        elif kind == "grad":  # differences (parts, concatenation, gradient), corrections, every layer's activations
            floats = T * d * (4 * S + 2 * R + L * (11 * (H + 2 * KV) + 8)) + L * (layer + T * d_mlp) + 3 * T * cfg.d_vocab
        else:  # differences, every layer's activations for the backward
            floats = T * d * (S + L * (2 * (H + 2 * KV) + 8)) + L * (layer + T * d_mlp) + 3 * T * cfg.d_vocab
        return floats * memory.element_size(self.setup.dtype)

    def budget(self) -> int:
        """Working-memory budget of one pass in bytes (``setup.max_memory``, or automatic: fixed
        for this patcher at first use; see :mod:`circuitfind.memory`)."""
        if self._budget is None:
            self._budget = memory.budget(self.setup.max_memory, self.setup.plan.clean.tokens.device)
        return self._budget

    def _embedding_stage_only(self, extra_hooks) -> bool:
        """Whether the base run's hooks and ``extra_hooks`` all act on the embedding stage, so that a
        pass may run a chunk of the prompts from the whole batch's embeddings."""
        hooks = list(self.setup.base_run(self.direction).hooks) + list(extra_hooks or [])
        return all(isinstance(name, str) and name in EMBEDDING_STAGE for name, _ in hooks)

    def _passes(self, n_candidates: int, kind: str, split_prompts: bool, prompts: slice) -> list[tuple[slice, slice]]:
        rows = memory.rows_per_pass(self.budget(), self.row_bytes(kind), self.setup.max_batch)
        plan = memory.schedule(n_candidates, prompts.stop - prompts.start, rows, split_prompts)
        return [(c, slice(prompts.start + p.start, prompts.start + p.stop)) for c, p in plan]

    def passes(self, n_candidates: int, kind: str = "attribution", extra_hooks: list[Hook] | None = None) -> list[tuple[slice, slice]]:
        """The ``(candidates, prompts)`` passes of an attribution (or ``kind``, see :meth:`row_bytes`)
        within the memory budget.

        Attribution methods run a backward per pass (:meth:`attribution`, or :meth:`run`'s
        ``prompts``) so that the memory autograd keeps is one pass's. Prompts are split only when
        the base run's hooks and ``extra_hooks`` act on the embedding stage."""
        return self._passes(n_candidates, kind, self._embedding_stage_only(extra_hooks), slice(0, self.setup.size))

    # -- runs -------------------------------------------------------------------------------
    def run(self, masks: torch.Tensor, *, fixed_diff: bool = False, extra_hooks: list[Hook] | None = None,
            per_prompt: bool = False, start: int = 0, desc: str | None = None, prompts: slice | None = None) -> torch.Tensor:
        """Per-prompt metric ``[candidates, batch]`` with each candidate's edges patched where ``mask == 0``.

        Candidates (and, when even one candidate's prompts do not fit, prompts) are split into
        passes that fit the memory budget (:meth:`budget`); the values are the same as in one pass.

        Args:
            masks: ``[candidates, n_edges]`` (or ``[candidates, n_edges, pos]``), 1 = keep.
            fixed_diff: use ``source - base run`` instead of ``source - current`` as the patched
                difference (the sender outputs of the unpatched base run; EAP-IG needs this).
            extra_hooks: hooks to add after the base run's own (e.g. input interpolation); they must
                accept the stacked ``[candidates * batch, ...]`` activations.
            per_prompt: masks are ``[candidates, n_edges, batch]``, one mask per prompt (the
                gradient of the summed metric then gives per-prompt attributions).
            start: a receiver index; the candidates agree on every edge into the receivers before
                it (in graph order). The forward pass below it then runs once and is cached, and
                each candidate runs only the rest (the functional engine from where the receiver
                reads; the hooks engine from its layer, via ``start_at_layer``, which with
                TransformerBridge still computes the blocks below). Not with gradients.
            prompts: evaluate only these prompts (a slice of the batch); the result is then
                ``[candidates, len(prompts)]``. Attribution methods use it to run a backward per pass.
        """
        if masks.dim() == 1:
            masks = masks[None]
        if per_prompt and self.graph.n_pos is not None:
            raise ValueError("per-prompt masks need a graph without per-position edges")
        expected = (self.n_edges,) if self.graph.n_pos is None else (self.n_edges, self.graph.n_pos)
        expected = (self.n_edges, self.setup.size) if per_prompt else expected
        if tuple(masks.shape[1:]) != expected:
            raise ValueError(f"edge masks must be [candidates, {', '.join(map(str, expected))}], got {tuple(masks.shape)}")
        plain = not (masks.requires_grad or per_prompt or fixed_diff or extra_hooks)
        if start and not (plain and self.graph.n_pos is None):
            raise ValueError("start works for plain (no-gradient, position-free) edge masks only")
        prompts = prompts or slice(0, self.setup.size)
        functional_engine = plain and self.engine == "functional"
        split = functional_engine or (not start and self._embedding_stage_only(extra_hooks))
        kind = "functional" if functional_engine else "grad" if masks.requires_grad else "hooks"
        passes = self._passes(masks.shape[0], kind, split, prompts)
        pieces: dict[int, list[torch.Tensor]] = {}
        for cands, rows in tqdm(passes, desc=desc or "edge patching", disable=not self.setup.progress or len(passes) < 2, leave=False):
            part = masks[cands]
            part = part.to(torch.float32) if part.dtype == torch.bool else part
            if functional_engine:
                with torch.no_grad():
                    stage = functional.MaskedForward.stage(self.graph.receivers[start]) if start else 0
                    answer = self.masked_forward(rows).logits(1.0 - self.graph.dense(part), stage)
            else:
                answer = self._run_hooks(part, fixed_diff, extra_hooks, per_prompt, start, rows)
            pieces.setdefault(cands.start, []).append(self.score(answer, rows))
        return torch.cat([torch.cat(parts, dim=1) for _, parts in sorted(pieces.items())])

    def score(self, answer: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Per-prompt metric ``[candidates, prompts]`` of stacked answer-position logits (of the
        prompts ``prompts``, default all)."""
        prompts = prompts or slice(0, self.setup.size)
        b = prompts.stop - prompts.start
        n = answer.shape[0] // b
        return self.setup.metric(answer, _repeat_ctx(_slice_ctx(self.setup.ctx, prompts), n)).reshape(n, b)

    def _run_hooks(self, part: torch.Tensor, fixed_diff: bool, extra_hooks, per_prompt: bool, start: int,
                   prompts: slice) -> torch.Tensor:
        """Answer-position logits of one pass (candidates ``part`` on ``prompts``) through the bridge's
        forward hooks."""
        n = part.shape[0]
        base = self.setup.base_run(self.direction)
        whole = prompts.start == 0 and prompts.stop == self.setup.size
        layer = min(self.graph.receivers[start].layer, self.graph.n_layers - 1) if start else 0
        if layer and not whole:
            raise ValueError("the hooks engine starts at a receiver on the whole batch only")
        prefix = self._prefix(part[:1], layer) if layer else None
        dense = self.graph.dense(part)
        dense = dense[..., prompts] if per_prompt else dense
        hooks, _ = self._hooks(dense, n, fixed_diff, per_prompt, None if prefix is None else prefix[1], prompts)
        with torch.set_grad_enabled(part.requires_grad):
            if prefix is not None:  # embedding-stage and lower-layer hooks are skipped by the bridge
                logits = self.model.run_with_hooks(prefix[0].repeat(n, 1, 1), start_at_layer=layer, fwd_hooks=hooks)
            elif whole:
                hooks = list(base.hooks) + list(extra_hooks or []) + hooks
                logits = self.model.run_with_hooks(base.tokens.repeat(n, 1), fwd_hooks=hooks)
            else:  # the embedding stage (and its hooks) on the whole batch, the blocks on these prompts
                resid = self._embedding_stage(n, extra_hooks)
                resid = resid.reshape(n, self.setup.size, *resid.shape[1:])[:, prompts].flatten(0, 1)
                logits = self.model.run_with_hooks(resid, start_at_layer=0, fwd_hooks=hooks)
            return answer_logits(logits, self.setup.plan.end_pos[prompts].repeat(n))

    def _embedding_stage(self, n: int, extra_hooks) -> torch.Tensor:
        """The residual stream entering block 0 for ``n`` stacked copies of the batch, with the base
        run's hooks and ``extra_hooks`` (embedding-stage hooks that see the whole stacked batch)."""
        base = self.setup.base_run(self.direction)
        with torch.no_grad():
            return self.model.run_with_hooks(base.tokens.repeat(n, 1), fwd_hooks=list(base.hooks) + list(extra_hooks or []),
                                             stop_at_layer=0)

    def attribution(self, *, fixed_diff: bool = False, extra_hooks: list[Hook] | None = None, n: int = 1,
                    per_prompt: bool = False, prompts: slice | None = None, scale: float = 1.0) -> torch.Tensor:
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
        first = self._sender_hooks[0]
        if fixed_diff:  # [1, b, S, T, d], prompt-major: a receiver's dot products are one batched matmul
            base = self.base_outputs()
            parts = [(sources[name] - base[name][prompts]).reshape(b, T, -1, sources[name].shape[-1]) for name in self._sender_hooks]
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
                diffs[:, :, k : k + g].copy_((sources[name].reshape(b, T, g, -1) - view.detach()).permute(0, 1, 3, 2, 4))
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

        hooks: list[Hook] = [(name, lambda a, hook, _n=name: store(a, hook, _n)) for name in self._sender_hooks]
        for hname, idx, up, _, bounds in self._groups:
            rows = idx[bounds[0] : bounds[1]].to(scores.device)
            hooks.append((hname, lambda a, hook, _r=rows, _u=up: receive(a, hook, _r, _u)))
        base_run = self.setup.base_run(self.direction)
        with torch.enable_grad():
            if (prompts.start, prompts.stop) == (0, self.setup.size):
                hooks = list(base_run.hooks) + list(extra_hooks or []) + hooks
                logits = self.model.run_with_hooks(base_run.tokens.repeat(n, 1), fwd_hooks=hooks)
            else:
                if not self._embedding_stage_only(extra_hooks):
                    raise ValueError("a pass over part of the prompts needs base-run and extra hooks on the embedding stage only")
                resid = self._embedding_stage(n, extra_hooks)
                resid = resid.reshape(n, self.setup.size, *resid.shape[1:])[:, prompts].flatten(0, 1)
                logits = self.model.run_with_hooks(resid, start_at_layer=0, fwd_hooks=hooks)
            answer = answer_logits(logits, self.setup.plan.end_pos[prompts].repeat(n))
            (self.score(answer, prompts).sum() * scale).backward()
        s_idx, r_idx = (i.to(scores.device) for i in self.graph.edge_index)
        edges = scores[:, s_idx, r_idx]  # [b, n_edges]
        return edges.T if per_prompt else edges.sum(0)

    def incremental(self) -> "IncrementalSearch":
        """Values of candidates relative to a reference mask set that moves with a search (ACDC)."""
        return IncrementalSearch(self)

    def value(self, masks: torch.Tensor, **kw) -> torch.Tensor:
        """Mean metric over prompts, one value per candidate ``[candidates]``."""
        return self.run(masks, **kw).mean(-1)

    def ones(self, n: int = 1, dtype=torch.float32, per_prompt: bool = False) -> torch.Tensor:
        """Masks that keep every edge."""
        shape = (n, self.n_edges) if self.graph.n_pos is None else (n, self.n_edges, self.graph.n_pos)
        shape = (n, self.n_edges, self.setup.size) if per_prompt else shape
        return torch.ones(shape, dtype=dtype, device=self.setup.plan.clean.tokens.device)


class IncrementalSearch:
    """Metric values of candidate masks that differ little from a reference that moves (ACDC).

    The reference starts as every edge kept. :meth:`values` evaluates candidates, :meth:`adopt`
    makes one of them the new reference. With the functional engine only the components reached
    from the changed receivers along kept edges run (:class:`circuitfind.incremental.IncrementalForward`);
    with the hooks engine the forward pass starts at the first changed receiver's layer.

    ``max_candidates`` is how many candidates one incremental pass evaluates within the patcher's
    memory budget (every prompt, at least one candidate); :meth:`values` splits larger sets.
    """

    def __init__(self, patcher: EdgePatcher):
        self.patcher = patcher
        self.reference = patcher.ones()
        self._last: torch.Tensor | None = None
        self._kept_from = 0  # candidates of the last call from here on ran in the pass whose state is kept
        self.forward: incremental.IncrementalForward | None = None
        B = patcher.setup.size
        per_candidate = patcher.row_bytes(patcher.engine) * B
        self.max_candidates = memory.rows_per_pass(patcher.budget(), per_candidate, max(1, patcher.setup.max_batch // B))
        if patcher.engine == "functional":
            inputs = patcher.setup.base_activations(patcher.direction, incremental.IncrementalForward.hooks(patcher.graph.n_layers))
            self.forward = incremental.IncrementalForward(patcher.masked_forward(), inputs)

    def values(self, masks: torch.Tensor) -> torch.Tensor:
        """Mean metric per candidate ``[candidates]`` for ``[candidates, n_edges]`` keep-masks."""
        self._last = masks
        if self.forward is None:
            differs = (masks != self.reference).any(0)
            start = int(self.patcher.graph.edge_index[1][differs.cpu()].min()) if differs.any() else 0
            return self.patcher.value(masks, start=start)
        values = []
        with torch.no_grad():
            for part in masks.split(self.max_candidates):
                answer = self.forward.logits(1.0 - self.patcher.graph.dense(part.float()))
                values.append(self.patcher.score(answer).mean(-1))
        self._kept_from = masks.shape[0] - part.shape[0]
        return torch.cat(values)

    def adopt(self, j: int) -> None:
        """Make candidate ``j`` of the last :meth:`values` call the reference."""
        self.reference = self._last[j : j + 1].clone()
        if self.forward is None:
            return
        if j < self._kept_from:  # its pass's state is gone: run it again alone
            with torch.no_grad():
                self.forward.logits(1.0 - self.patcher.graph.dense(self.reference.float()))
            self.forward.adopt(0)
        else:
            self.forward.adopt(j - self._kept_from)
