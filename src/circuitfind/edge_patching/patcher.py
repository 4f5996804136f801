"""The front of edge patching: :class:`EdgePatcher` checks masks, plans passes within the memory
budget, dispatches them to an engine and scores the answer logits (see :mod:`circuitfind.edge_patching`)."""

from __future__ import annotations

import torch

from circuitfind import progress
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching.direct import DirectEngine
from circuitfind.edge_patching.engine import Engine
from circuitfind.edge_patching.hooks import Hook, HooksEngine
from circuitfind.edge_patching.incremental import IncrementalSearch
from circuitfind.models import tensor_forward
from circuitfind.models.tensor_forward import UnsupportedModelError
from circuitfind.names import EMBEDDING_STAGE, hook_name
from circuitfind.patching import memory
from circuitfind.patching.setup import Direction, PatchingSetup, check_direction, repeat_ctx, slice_ctx
from circuitfind.tasks import multitoken


class EdgePatcher:
    """Evaluates edge masks on one :class:`PatchingSetup` and :class:`ModelGraph`.

    Args:
        setup: model, batch, corruption and metric (see :func:`circuitfind.patching.prepare`).
        graph: the edge graph (``ModelGraph.from_model(model)`` by default).
        direction: ``noise`` (base = clean run, patched edges carry corrupted values) or
            ``denoise`` (base = corrupted run, patched edges carry clean values).
        engine: ``auto`` (``functional`` for plain evaluations where the architecture and graph
            allow it, ``hooks`` otherwise), ``hooks`` or ``functional``.

    ``engine`` is then the chosen engine's name, ``backend`` the :class:`Engine` that runs plain
    evaluations, and ``hooks`` the hooks engine (always there: gradients, attribution, per-prompt
    and per-position masks). Masks follow the convention of :mod:`circuitfind.edge_patching`.
    """

    def __init__(
        self,
        setup: PatchingSetup,
        graph: ModelGraph | None = None,
        direction: Direction = "noise",
        engine: str = "auto",
    ):
        check_direction(direction)
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
        self.sender_hooks = [hook_name(0, "resid_pre")]  # the senders' hooks in graph order
        for layer in range(L):
            self.sender_hooks += [hook_name(layer, "result"), hook_name(layer, "mlp_out")]
        self.sources = setup.sources(direction, self.sender_hooks)
        self._base_outputs: dict[str, torch.Tensor] | None = None
        usable = tensor_forward.supports(self.model) and self.graph.n_pos is None
        if engine == "functional" and not usable:
            raise UnsupportedModelError(
                "the functional engine needs a GPT-2 or Llama-style model and a graph without per-position edges"
            )
        self.engine = "functional" if usable and engine != "hooks" else "hooks"
        self._budget: int | None = None
        self.hooks = HooksEngine(self)  # gradients, attribution and per-prompt or per-position masks
        self.backend: Engine = DirectEngine(self) if self.engine == "functional" else self.hooks  # plain evaluations

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges

    def base_outputs(self) -> dict[str, torch.Tensor]:
        """Sender outputs of the unpatched base run (for fixed-difference gradients, EAP-IG)."""
        if self._base_outputs is None:
            self._base_outputs = self.setup.base_activations(self.direction, self.sender_hooks)
        return self._base_outputs

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
            floats = (
                T * d * (4 * S + 2 * R + L * (11 * (H + 2 * KV) + 8)) + L * (layer + T * d_mlp) + 3 * T * cfg.d_vocab
            )
        else:  # differences, every layer's activations for the backward
            floats = T * d * (S + L * (2 * (H + 2 * KV) + 8)) + L * (layer + T * d_mlp) + 3 * T * cfg.d_vocab
        return floats * memory.element_size(self.setup.dtype)

    def budget(self) -> int:
        """Working-memory budget of one pass in bytes (``setup.max_memory``, or automatic: fixed
        for this patcher at first use; see :mod:`circuitfind.patching.memory`)."""
        if self._budget is None:
            self._budget = memory.budget(self.setup.max_memory, self.setup.plan.clean.tokens.device)
        return self._budget

    def embedding_stage_only(self, extra_hooks) -> bool:
        """Whether the base run's hooks and ``extra_hooks`` all act on the embedding stage, so that a
        pass may run a chunk of the prompts from the whole batch's embeddings."""
        hooks = list(self.setup.base_run(self.direction).hooks) + list(extra_hooks or [])
        return all(isinstance(name, str) and name in EMBEDDING_STAGE for name, _ in hooks)

    def _passes(self, n_candidates: int, kind: str, split_prompts: bool, prompts: slice) -> list[tuple[slice, slice]]:
        rows = memory.rows_per_pass(self.budget(), self.row_bytes(kind), self.setup.max_batch)
        starts = None
        batch = self.setup.batch
        if isinstance(batch, multitoken.AnswerRows):  # a prompt's teacher-forced rows stay together, in every copy
            copies = range(0, self.setup.size, batch.size)  # stacked copies of the rows (noise samples)
            starts = [k + r - prompts.start for k in copies for r in batch.split_points]
        plan = memory.schedule(n_candidates, prompts.stop - prompts.start, rows, split_prompts, starts)
        return [(c, slice(prompts.start + p.start, prompts.start + p.stop)) for c, p in plan]

    def passes(
        self, n_candidates: int, kind: str = "attribution", extra_hooks: list[Hook] | None = None
    ) -> list[tuple[slice, slice]]:
        """The ``(candidates, prompts)`` passes of an attribution (or ``kind``, see :meth:`row_bytes`)
        within the memory budget.

        Attribution methods run a backward per pass (:meth:`attribution`, or :meth:`run`'s
        ``prompts``) so that the memory autograd keeps is one pass's. Prompts are split only when
        the base run's hooks and ``extra_hooks`` act on the embedding stage."""
        return self._passes(n_candidates, kind, self.embedding_stage_only(extra_hooks), slice(0, self.setup.size))

    # -- runs -------------------------------------------------------------------------------
    def run(
        self,
        keep: torch.Tensor,
        *,
        fixed_diff: bool = False,
        extra_hooks: list[Hook] | None = None,
        per_prompt: bool = False,
        first_receiver: int = 0,
        desc: str | None = None,
        prompts: slice | None = None,
    ) -> torch.Tensor:
        """Per-prompt metric ``[candidates, batch]`` with each candidate's edges patched where ``mask == 0``.

        Candidates (and, when even one candidate's prompts do not fit, prompts) are split into
        passes that fit the memory budget (:meth:`budget`); the values are the same as in one pass.

        Args:
            keep: keep-masks ``[candidates, n_edges]`` (or ``[candidates, n_edges, pos]``), 1 = keep the base run's value.
            fixed_diff: use ``source - base run`` instead of ``source - current`` as the patched
                difference (the sender outputs of the unpatched base run; EAP-IG needs this).
            extra_hooks: hooks to add after the base run's own (e.g. input interpolation); they must
                accept the stacked ``[candidates * batch, ...]`` activations.
            per_prompt: masks are ``[candidates, n_edges, batch]``, one mask per prompt (the
                gradient of the summed metric then gives per-prompt attributions).
            first_receiver: a receiver index; the candidates agree on every edge into the receivers
                before it (in graph order). The forward pass below it then runs once and is cached, and
                each candidate runs only the rest (the functional engine from where the receiver
                reads; the hooks engine from its layer, via ``start_at_layer``, which with
                TransformerBridge still computes the blocks below). Not with gradients.
            prompts: evaluate only these prompts (a slice of the batch); the result is then
                ``[candidates, len(prompts)]``. Attribution methods use it to run a backward per pass.
        """
        if keep.dim() == 1:
            keep = keep[None]
        if per_prompt and self.graph.n_pos is not None:
            raise ValueError("per-prompt masks need a graph without per-position edges")
        expected = (self.n_edges,) if self.graph.n_pos is None else (self.n_edges, self.graph.n_pos)
        expected = (self.n_edges, self.setup.size) if per_prompt else expected
        if tuple(keep.shape[1:]) != expected:
            raise ValueError(
                f"edge masks must be [candidates, {', '.join(map(str, expected))}], got {tuple(keep.shape)}"
            )
        plain = not (keep.requires_grad or per_prompt or fixed_diff or extra_hooks)
        if first_receiver and not (plain and self.graph.n_pos is None):
            raise ValueError(
                "first_receiver (where a pass starts) works for plain (no-gradient, position-free) edge masks only"
            )
        prompts = prompts or slice(0, self.setup.size)
        functional_engine = plain and self.engine == "functional"
        split = functional_engine or (not first_receiver and self.embedding_stage_only(extra_hooks))
        kind = "functional" if functional_engine else "grad" if keep.requires_grad else "hooks"
        passes = self._passes(keep.shape[0], kind, split, prompts)
        pieces: dict[int, list[torch.Tensor]] = {}
        show = self.setup.progress and len(passes) > 1
        for cands, rows in progress.bar(passes, desc=desc or "edge patching", show=show, announce=False):
            part = keep[cands]
            part = part.to(torch.float32) if part.dtype == torch.bool else part
            if functional_engine:
                answer = self.backend.logits(part, rows, first_receiver)
            else:
                answer = self.hooks.logits(
                    part, rows, first_receiver, fixed_diff=fixed_diff, extra_hooks=extra_hooks, per_prompt=per_prompt
                )
            pieces.setdefault(cands.start, []).append(self.score(answer, rows))
        return torch.cat([torch.cat(parts, dim=1) for _, parts in sorted(pieces.items())])

    def score(self, answer: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Per-prompt metric ``[candidates, prompts]`` of stacked answer-position logits (of the
        prompts ``prompts``, default all)."""
        prompts = prompts or slice(0, self.setup.size)
        b = prompts.stop - prompts.start
        n = answer.shape[0] // b
        return self.setup.metric(answer, repeat_ctx(slice_ctx(self.setup.ctx, prompts), n)).reshape(n, b)

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
        """Edge attributions of one pass, ``-d metric / d mask`` at masks that keep every edge,
        without masks: see :meth:`~circuitfind.edge_patching.hooks.HooksEngine.attribution`."""
        return self.hooks.attribution(
            fixed_diff=fixed_diff, extra_hooks=extra_hooks, n=n, per_prompt=per_prompt, prompts=prompts, scale=scale
        )

    def incremental(self) -> IncrementalSearch:
        """Values of candidates relative to a reference mask set that moves with a search (ACDC)."""
        return IncrementalSearch(self)

    def value(self, keep: torch.Tensor, **kw) -> torch.Tensor:
        """Mean metric over prompts, one value per candidate ``[candidates]``."""
        return self.run(keep, **kw).mean(-1)

    def ones(self, n: int = 1, dtype=torch.float32, per_prompt: bool = False) -> torch.Tensor:
        """Masks that keep every edge."""
        shape = (n, self.n_edges) if self.graph.n_pos is None else (n, self.n_edges, self.graph.n_pos)
        shape = (n, self.n_edges, self.setup.size) if per_prompt else shape
        return torch.ones(shape, dtype=dtype, device=self.setup.plan.clean.tokens.device)
