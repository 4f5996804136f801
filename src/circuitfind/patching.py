"""Node activation patching and path patching, batched over prompts and over candidate patches.

Directions:

* ``denoise``: run the corrupted input and patch in clean activations (does this component
  *suffice* to restore the behaviour?);
* ``noise``: run the clean input and patch in corrupted (or ablated) activations (is this
  component *necessary*?).

All sweeps go through :func:`run_patched`: a set of candidate patches is given as one mask per
hook, ``[candidates, batch or 1, *activation dims]``; candidates are stacked along the batch and
evaluated in as few forward passes as ``max_batch`` allows, with no Python loop over prompts or
candidates inside a chunk. On GPT-2 and Llama-style models each candidate runs only the part of
the model its patch can change, from the unpatched run's cached activations
(:mod:`circuitfind.suffix`); elsewhere, or with ``engine="hooks"``, through full forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from circuitfind.checks import finite_number, positive_int
from circuitfind.corruptions import Corruption, CorruptionPlan, Run, get_corruption
from circuitfind.errors import ImpossibleSignError
from circuitfind.memory import parse_memory
from circuitfind.metrics import Metric, MetricContext, get_metric, normalise
from circuitfind.tasks import TaskBatch

Direction = Literal["denoise", "noise"]
DIRECTIONS = ("denoise", "noise")
ENGINES = ("auto", "hooks", "functional")
EMBEDDING_STAGE = ("hook_embed", "hook_pos_embed")  # hooks below block 0: their effect is in its residual input
BLOCK_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}


def hook_name(layer: int, what: str) -> str:
    """TransformerLens hook names: ``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post``, ``z``, ``q_input``, ``mlp_in``, ..."""
    if what in BLOCK_HOOKS:
        return f"blocks.{layer}.{BLOCK_HOOKS[what]}"
    if what in ("z", "result", "pattern"):
        return f"blocks.{layer}.attn.hook_{what}"
    if what in ("q_input", "k_input", "v_input", "mlp_in"):
        return f"blocks.{layer}.hook_{what}"
    raise ValueError(f"unknown activation {what!r}")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def check_k(k: float) -> float:
    """The detection rule's threshold ``k`` (in SDs): a finite number > 0 (NaN would find nothing)."""
    return finite_number("k", k, positive=True)


@dataclass
class PatchingSetup:
    """A model, a batch and a corruption/metric choice, with the clean and corrupted baselines.

    Build it with :func:`prepare`. Activations of the clean and corrupted runs are cached lazily,
    per hook, the first time a sweep needs them. ``engine`` picks how node and path patching run:
    ``auto`` (suffix passes from cached activations, :mod:`circuitfind.suffix`, where the model
    and hooks allow; full forward passes of the bridge otherwise), ``hooks`` (always full forward
    passes) or ``functional`` (suffix passes or an error). ``max_memory`` bounds the working memory
    of one edge-patching pass (bytes or e.g. ``"4GB"``; ``None``: automatic, see
    :mod:`circuitfind.memory`).
    """

    model: object
    plan: CorruptionPlan
    metric: Metric
    ctx: MetricContext
    clean_value: float
    corrupt_value: float
    max_batch: int = 256
    progress: bool = False
    engine: str = "auto"
    max_memory: int | str | None = None
    clean_logits: torch.Tensor | None = field(default=None, repr=False)  # [batch, vocab] at the answer
    corrupt_logits: torch.Tensor | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def baselines(self, metric: str | Metric) -> tuple[float, float]:
        """Clean and corrupted values of another metric, from the baselines' logits (no new forward)."""
        metric = get_metric(metric)
        return (metric(self.clean_logits, self.ctx).mean().item(), metric(self.corrupt_logits, self.ctx).mean().item())

    @property
    def batch(self) -> TaskBatch:
        return self.plan.batch

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def n_pos(self) -> int:
        return self.plan.clean.tokens.shape[1]

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (activations and sender differences use it)."""
        return next(self.model.parameters()).dtype

    @property
    def n_heads(self) -> int:
        return self.model.cfg.n_heads

    def base_run(self, direction: Direction) -> Run:
        """The run that gets patched: corrupted for denoising, clean for noising."""
        _check_direction(direction)
        return self.plan.corrupt if direction == "denoise" else self.plan.clean

    def base_value(self, direction: Direction) -> float:
        return self.corrupt_value if direction == "denoise" else self.clean_value

    def activations(self, which: Literal["clean", "corrupt"], names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Cached activations of the clean or corrupted run at the given hooks."""
        run = self.plan.clean if which == "clean" else self.plan.corrupt
        missing = [n for n in dict.fromkeys(names) if (which, n) not in self._cache]
        if missing:
            store: dict[str, torch.Tensor] = {}

            def save(act, hook, key):
                store[key] = act.detach().clone()

            hooks = list(run.hooks) + [(n, _bind(save, key=n)) for n in missing]
            with torch.no_grad():
                self.model.run_with_hooks(run.tokens, fwd_hooks=hooks)
            for n in missing:
                self._cache[(which, n)] = store[n]
        return {n: self._cache[(which, n)] for n in names}

    def base_activations(self, direction: Direction, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activations of the unpatched base run: the clean run (noise), the corrupted run (denoise)."""
        return self.activations("clean" if direction == "noise" else "corrupt", names)

    def sources(self, direction: Direction, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activations patched into the base run: clean ones (denoise), corrupted/ablated ones (noise)."""
        names = list(names)
        if direction == "denoise":
            return self.activations("clean", names)
        if self.plan.ablate is not None:
            return {n: self.plan.ablate(a) for n, a in self.activations("clean", names).items()}
        return self.activations("corrupt", names)

    def position_mask(self, positions: str | Sequence[str] | None) -> torch.Tensor:
        """``[batch, pos]`` float mask of the named key positions (``None``: every position)."""
        if positions is None:
            return torch.ones(self.size, self.n_pos, device=self.plan.clean.tokens.device)
        names = [positions] if isinstance(positions, str) else list(positions)
        out = torch.zeros(self.size, self.n_pos, device=self.plan.clean.tokens.device)
        rows = torch.arange(self.size, device=out.device)
        for name in names:
            if name not in self.plan.positions:
                raise ValueError(f"unknown position {name!r}; this task has {sorted(self.plan.positions)}")
            out[rows, self.plan.positions[name]] = 1.0
        return out


def _bind(fn, **kw):
    def hook(act, hook):
        return fn(act, hook, **kw)

    return hook


def answer_logits(logits: torch.Tensor, end_pos: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's answer position: ``[n, pos, vocab]`` -> ``[n, vocab]``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, end_pos]


def prepare(
    model,
    batch: TaskBatch,
    corruption: str | Corruption = "str",
    metric: str | Metric = "logit_diff",
    max_batch: int = 256,
    progress: bool = False,
    engine: str = "auto",
    max_memory: int | str | None = None,
) -> PatchingSetup:
    """Run the clean and corrupted baselines of ``batch`` under a corruption and a metric.

    ``max_batch`` (>= 1) caps the prompts per forward pass of the sweeps built on this setup;
    ``engine``: how node and path patching run; ``max_memory``: the working-memory budget of an
    edge-patching pass (see :class:`PatchingSetup`).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    parse_memory(max_memory)  # a clear error now rather than in the first edge-patching pass
    positive_int("max_batch", max_batch)
    corruption = get_corruption(corruption)
    metric = get_metric(metric)
    plan = corruption.plan(model, batch)
    with torch.no_grad():
        clean_logits = answer_logits(model.run_with_hooks(plan.clean.tokens, fwd_hooks=plan.clean.hooks), plan.end_pos)
        corrupt_logits = answer_logits(model.run_with_hooks(plan.corrupt.tokens, fwd_hooks=plan.corrupt.hooks), plan.end_pos)
    ctx = MetricContext(plan.answers, plan.counter_answers, clean_logits.float().log_softmax(-1))
    clean_value = metric(clean_logits, ctx).mean().item()
    corrupt_value = metric(corrupt_logits, ctx).mean().item()
    return PatchingSetup(model, plan, metric, ctx, clean_value, corrupt_value, max_batch=max_batch, progress=progress,
                         engine=engine, max_memory=max_memory, clean_logits=clean_logits, corrupt_logits=corrupt_logits)


def _slice_ctx(ctx: MetricContext, prompts: slice) -> MetricContext:
    """The metric context of a slice of the prompts."""
    lp = ctx.clean_logprobs
    return MetricContext(ctx.answers[prompts], ctx.counter_answers[prompts], None if lp is None else lp[prompts])


def _repeat_ctx(ctx: MetricContext, n: int) -> MetricContext:
    lp = ctx.clean_logprobs
    return MetricContext(ctx.answers.repeat(n), ctx.counter_answers.repeat(n), None if lp is None else lp.repeat(n, 1))


def _patch_hook(act: torch.Tensor, hook, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend ``source`` into each stacked candidate copy of the batch where ``mask`` is set."""
    n = mask.shape[0]
    view = act.reshape(n, -1, *act.shape[1:])
    if mask.dtype == torch.bool:
        out = torch.where(mask, source, view)
    else:
        out = view + mask.to(view.dtype) * (source - view)
    return out.reshape(act.shape)


def _use_suffix(setup: PatchingSetup, direction: Direction, names=(), receivers=()) -> bool:
    """Whether suffix passes (:mod:`circuitfind.suffix`) serve this sweep under the setup's engine."""
    from circuitfind import suffix

    usable = suffix.supports(setup, direction, names, receivers)
    if setup.engine == "functional" and not usable:
        from circuitfind.functional import UnsupportedModelError

        raise UnsupportedModelError("suffix passes need a GPT-2 or Llama-style model, block/head hooks and "
                                    "base-run hooks on the embedding stage only")
    return usable


def run_patched(
    setup: PatchingSetup,
    direction: Direction,
    masks: dict[str, torch.Tensor],
    sources: dict[str, torch.Tensor] | None = None,
    desc: str | None = None,
) -> torch.Tensor:
    """Per-prompt metric values ``[candidates, batch]`` of candidate patches.

    Args:
        masks: hook name -> ``[candidates, batch or 1, *activation dims (each full or 1)]``; bool
            or float (float blends ``base + m * (source - base)``).
        sources: hook name -> ``[batch, *activation dims]`` patched-in values; by default the
            other run's activations for ``direction`` (see :meth:`PatchingSetup.sources`).
    """
    _check_direction(direction)
    if not masks:
        raise ValueError("no hooks to patch: masks is empty")
    n_cand = {m.shape[0] for m in masks.values()}
    if len(n_cand) != 1:
        raise ValueError(f"every mask needs the same number of candidates, got {sorted(n_cand)}")
    n_cand = n_cand.pop()
    sources = sources if sources is not None else setup.sources(direction, masks)
    chunk = max(1, setup.max_batch // setup.size)
    if _use_suffix(setup, direction, names=list(masks)):
        from circuitfind.suffix import SuffixForward

        with tqdm(total=n_cand, desc=desc or "patching", disable=not setup.progress, leave=False) as bar:
            return SuffixForward(setup, direction).run(masks, sources, chunk, progress=bar)
    base = setup.base_run(direction)
    out = []
    starts = range(0, n_cand, chunk)
    for start in tqdm(starts, desc=desc or "patching", disable=not setup.progress or len(starts) < 2, leave=False):
        stop = min(start + chunk, n_cand)
        n = stop - start
        hooks = list(base.hooks)
        for name, mask in masks.items():
            part = mask[start:stop]
            if part.dtype == torch.bool and not part.any():
                continue
            hooks.append((name, _bind(_patch_hook, source=sources[name], mask=part)))
        with torch.no_grad():
            logits = setup.model.run_with_hooks(base.tokens.repeat(n, 1), fwd_hooks=hooks)
        answer = answer_logits(logits, setup.plan.end_pos.repeat(n))
        out.append(setup.metric(answer, _repeat_ctx(setup.ctx, n)).reshape(n, setup.size))
    return torch.cat(out)


@dataclass
class PatchResult:
    """Metric values of a patching sweep, with the baselines needed to read them.

    ``values`` is the mean over prompts (shape ``axes``), ``per_prompt`` keeps the prompt axis last.
    For GN the prompt axis counts every noise sample.
    """

    values: torch.Tensor
    per_prompt: torch.Tensor
    axes: tuple[str, ...]
    metric: str
    corruption: str
    direction: str
    clean: float
    corrupt: float
    kind: str = ""

    @property
    def base(self) -> float:
        """The unpatched value of the patched run (corrupt for denoising, clean for noising)."""
        return self.corrupt if self.direction == "denoise" else self.clean

    @property
    def normalised(self) -> torch.Tensor:
        """``(patched - corrupt) / (clean - corrupt)``."""
        return normalise(self.values, self.clean, self.corrupt)

    @property
    def effect(self) -> torch.Tensor:
        """``patched - base``: positive when the patch moves the metric up."""
        return self.values - self.base

    def as_dict(self) -> dict:
        return {
            "kind": self.kind, "axes": list(self.axes), "metric": self.metric, "corruption": self.corruption,
            "direction": self.direction, "clean": self.clean, "corrupt": self.corrupt,
            "values": self.values.tolist(),
        }


def _result(setup: PatchingSetup, direction: str, per_prompt: torch.Tensor, shape: Sequence[int], axes, kind) -> PatchResult:
    per_prompt = per_prompt.reshape(*shape, setup.size).cpu()
    return PatchResult(
        per_prompt.mean(-1), per_prompt, tuple(axes), setup.metric.name, setup.plan.name, direction,
        setup.clean_value, setup.corrupt_value, kind,
    )


def _one_hot_masks(setup: PatchingSetup, what: str, act_shape: Sequence[int], grid: Sequence[int], place) -> dict[str, torch.Tensor]:
    """Masks with one candidate per cell of ``grid`` (the first grid axis is the layer)."""
    device = setup.plan.clean.tokens.device
    n_cand = int(torch.tensor(grid).prod())
    masks = {}
    cells = torch.arange(n_cand).reshape(*grid)
    for layer in range(grid[0]):
        mask = torch.zeros(n_cand, 1, *act_shape, dtype=torch.bool, device=device)
        for cand in cells[layer].flatten().tolist():
            idx = torch.unravel_index(torch.tensor(cand), tuple(grid))
            place(mask[cand, 0], *[int(i) for i in idx[1:]])
        masks[hook_name(layer, what)] = mask
    return masks


def patch_block(setup: PatchingSetup, component: str = "resid_pre", direction: Direction = "denoise") -> PatchResult:
    """Patch ``resid_pre``, ``attn_out``, ``mlp_out`` or ``resid_post`` at each layer x position.

    Returns values of shape ``[layer, pos]``.
    """
    if component not in BLOCK_HOOKS:
        raise ValueError(f"component must be one of {sorted(BLOCK_HOOKS)}, got {component!r}")
    L, T = setup.n_layers, setup.n_pos
    masks = _one_hot_masks(setup, component, (T, 1), (L, T), lambda m, p: m.__setitem__(p, True))
    values = run_patched(setup, direction, masks, desc=f"{component} patching")
    return _result(setup, direction, values, (L, T), ("layer", "pos"), component)


def patch_heads(setup: PatchingSetup, direction: Direction = "denoise", by_position: bool = False) -> PatchResult:
    """Patch each attention head's output (``hook_z``), over all positions or one position at a time.

    Returns ``[layer, head]``, or ``[layer, pos, head]`` with ``by_position``.
    """
    L, H, T = setup.n_layers, setup.n_heads, setup.n_pos
    if by_position:
        grid, axes = (L, T, H), ("layer", "pos", "head")
        masks = _one_hot_masks(setup, "z", (T, H, 1), grid, lambda m, p, h: m.__setitem__((p, h), True))
    else:
        grid, axes = (L, H), ("layer", "head")
        masks = _one_hot_masks(setup, "z", (1, H, 1), grid, lambda m, h: m.__setitem__((0, h), True))
    values = run_patched(setup, direction, masks, desc="head patching")
    return _result(setup, direction, values, grid, axes, "heads_by_pos" if by_position else "heads")


def window_layers(center: int, window: int, n_layers: int) -> range:
    """Layers of a sliding window of ``window`` layers centred on ``center``, clipped at the ends."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lo = max(0, center - (window - 1) // 2)
    hi = min(n_layers, center + window // 2 + 1)
    return range(lo, hi)


def patch_mlp_windows(
    setup: PatchingSetup,
    window: int = 1,
    direction: Direction = "denoise",
    positions: str | Sequence[str] | None = None,
) -> PatchResult:
    """Patch the MLP outputs of a sliding window of layers centred on each layer (Meng et al.).

    ``positions`` names key tokens to patch at (e.g. the subject's last token); ``None`` patches
    every position. Returns ``[layer]`` (the window centre).
    """
    L = setup.n_layers
    pos = setup.position_mask(positions)[None, :, :, None]  # [1, batch, pos, 1]
    inside = torch.zeros(L, L, device=pos.device)
    for center in range(L):
        inside[center, list(window_layers(center, window, L))] = 1.0
    masks = {hook_name(j, "mlp_out"): (inside[:, j, None, None, None] * pos) for j in range(L)}
    values = run_patched(setup, direction, masks, desc=f"MLP window {window}")
    result = _result(setup, direction, values, (L,), ("layer",), f"mlp_window_{window}")
    return result


def window_sum_baseline(single_layer: PatchResult, window: int) -> PatchResult:
    """The summation baseline: each window's effect as the sum of its single-layer effects.

    ``single_layer`` must be :func:`patch_mlp_windows` with ``window=1``.
    """
    if single_layer.axes != ("layer",):
        raise ValueError("window_sum_baseline needs a single-layer MLP sweep (axes ('layer',))")
    L = single_layer.values.shape[0]
    effect = single_layer.per_prompt - single_layer.base
    summed = torch.stack([effect[list(window_layers(c, window, L))].sum(0) for c in range(L)]) + single_layer.base
    return PatchResult(
        summed.mean(-1), summed, single_layer.axes, single_layer.metric, single_layer.corruption,
        single_layer.direction, single_layer.clean, single_layer.corrupt, f"mlp_window_sum_{window}",
    )


@dataclass(frozen=True)
class Receiver:
    """A path-patching receiver: one head's ``q``, ``k`` or ``v`` input.

    For grouped-query attention, ``head`` of a ``k`` or ``v`` receiver is the key/value head index.
    """

    layer: int
    head: int
    input: Literal["q", "k", "v"]


LOGITS = "logits"


def path_patch(
    setup: PatchingSetup,
    receivers: Sequence[Receiver] | str = LOGITS,
    positions: str | Sequence[str] | None = "end",
    direction: Direction = "noise",
    senders: Sequence[tuple[int, int]] | None = None,
) -> PatchResult:
    """Path patching (Wang et al. 2022) from each sender head to a receiver set.

    For each sender head: (1) run the base input with every head's output frozen to the base run
    except the sender, which takes the other run's value (MLPs recompute); record the receivers'
    inputs; (2) run the base input again, patching only those receiver inputs (at ``positions``)
    with the recorded values, and measure the metric. Receivers are q/k/v inputs of given heads, or
    ``"logits"``: the final residual stream.

    Returns ``[layer, head]`` over senders (senders outside ``senders`` are NaN).
    """
    _check_direction(direction)
    L, H, B = setup.n_layers, setup.n_heads, setup.size
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    senders = list(senders) if senders is not None else all_heads
    if not senders:
        raise ValueError("path_patch needs at least one sender head")
    if receivers != LOGITS:
        receivers = list(receivers)
        if not receivers:
            raise ValueError("path_patch needs at least one receiver (or 'logits')")
        kv = getattr(setup.model.cfg, "n_key_value_heads", None) or H
        for r in receivers:
            n = H if r.input == "q" else kv  # k/v inputs are per key/value head (grouped-query attention)
            if r.input not in ("q", "k", "v") or not (0 <= r.layer < L and 0 <= r.head < n):
                raise ValueError(f"invalid receiver {r}: layer must be < {L}, head < {n} for {r.input} inputs")
    if receivers == LOGITS:
        recv_hooks = {hook_name(L - 1, "resid_post"): None}
    else:
        recv_hooks = {}
        for r in receivers:
            name = hook_name(r.layer, f"{r.input}_input")
            recv_hooks.setdefault(name, torch.zeros(H if r.input == "q" else kv, dtype=torch.bool))[r.head] = True
    pos = setup.position_mask(positions)  # [batch, pos]
    chunk = max(1, setup.max_batch // B)
    if _use_suffix(setup, direction, receivers=list(recv_hooks)):
        from circuitfind.suffix import SuffixForward

        with tqdm(total=len(senders), desc="path patching", disable=not setup.progress, leave=False) as bar:
            per_sender = SuffixForward(setup, direction).path_values(senders, recv_hooks, pos, chunk, bar).cpu()
    else:
        per_sender = _path_patch_hooks(setup, direction, senders, recv_hooks, pos, chunk)
    grid = torch.full((L, H, B), float("nan"))
    for (l, h), row in zip(senders, per_sender):
        grid[l, h] = row
    return PatchResult(
        grid.mean(-1), grid, ("layer", "head"), setup.metric.name, setup.plan.name, direction,
        setup.clean_value, setup.corrupt_value, "path",
    )


def _path_patch_hooks(setup: PatchingSetup, direction: Direction, senders: Sequence[tuple[int, int]],
                      recv_hooks: dict[str, torch.Tensor | None], pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Path patching with two full forward passes of the bridge per chunk of senders:
    per-prompt values ``[senders, batch]`` (see :func:`path_patch`)."""
    L, H, B = setup.n_layers, setup.n_heads, setup.size
    z_names = [hook_name(l, "z") for l in range(L)]
    base_z = setup.base_activations(direction, z_names)
    src_z = setup.sources(direction, z_names)
    base = setup.base_run(direction)
    values = []
    for start in tqdm(range(0, len(senders), chunk), desc="path patching", disable=not setup.progress, leave=False):
        group = senders[start : start + chunk]
        n = len(group)
        sender_mask = torch.zeros(L, n, 1, 1, H, 1, dtype=torch.bool, device=pos.device)
        for i, (l, h) in enumerate(group):
            sender_mask[l, i, 0, 0, h] = True
        recorded: dict[str, torch.Tensor] = {}

        def freeze(act, hook, layer):
            view = act.reshape(n, B, *act.shape[1:])
            out = torch.where(sender_mask[layer], src_z[z_names[layer]], base_z[z_names[layer]])
            return out.expand_as(view).reshape(act.shape)

        def record(act, hook, key):
            recorded[key] = act.detach().clone()

        hooks = list(base.hooks)
        hooks += [(z_names[l], _bind(freeze, layer=l)) for l in range(L)]
        hooks += [(name, _bind(record, key=name)) for name in recv_hooks]
        tokens = base.tokens.repeat(n, 1)
        with torch.no_grad():
            setup.model.run_with_hooks(tokens, fwd_hooks=hooks)
            patch_hooks = list(base.hooks)
            for name, heads in recv_hooks.items():
                shape = recorded[name].shape  # [n*B, pos, (head,) d]
                if heads is None:
                    mask = pos[None, :, :, None].bool()
                else:
                    mask = pos[None, :, :, None, None].bool() & heads.to(pos.device)[None, None, None, :, None]
                src = recorded[name].reshape(n, B, *shape[1:])
                patch_hooks.append((name, _bind(_patch_hook_full, source=src, mask=mask)))
            logits = setup.model.run_with_hooks(tokens, fwd_hooks=patch_hooks)
        answer = answer_logits(logits, setup.plan.end_pos.repeat(n))
        values.append(setup.metric(answer, _repeat_ctx(setup.ctx, n)).reshape(n, B))
    return torch.cat(values).cpu()


def _patch_hook_full(act: torch.Tensor, hook, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Like the candidate patch hook, but ``source`` already has one copy per candidate."""
    view = act.reshape(*source.shape)
    return torch.where(mask, source, view).reshape(act.shape)


def impossible_sign(metric: str, direction: str, sign: str) -> str | None:
    """Why effects (``patched - base``) of ``sign`` cannot occur under ``metric`` and ``direction``,
    or ``None`` when they can. The ``kl`` metric scores ``-KL(clean || patched) <= 0``, which is 0 on
    the clean run: noising starts from the clean run, so no patch can raise the score."""
    if metric == "kl" and direction == "noise" and sign == "positive":
        return ("positive effects cannot occur when noising with the kl metric: the score -KL(clean || patched) "
                "is at most 0, its value on the clean (unpatched) run, so every noising effect is <= 0; "
                "use sign='negative', or denoise, or another metric to find components that push the answer down")
    return None


def detect(scores: torch.Tensor, k: float = 2.0, sign: Literal["positive", "negative", "both"] = "positive", *,
           metric: str | None = None, direction: str | None = None) -> list[tuple[int, ...]]:
    """Components whose score is at least ``k`` standard deviations from the mean.

    ``sign="positive"`` keeps scores >= mean + k*sd, ``"negative"`` those <= mean - k*sd (e.g. noising
    effects, which are negative for important components), ``"both"`` either. NaNs are ignored.
    Returns index tuples sorted by decreasing distance from the mean. ``k`` must be finite and > 0.
    Given the ``metric`` name and ``direction`` of the effects, a sign that the setting cannot
    produce raises :class:`~circuitfind.errors.ImpossibleSignError` (:func:`impossible_sign`)
    instead of returning an empty or meaningless list.
    """
    check_k(k)
    if metric is not None and direction is not None and (reason := impossible_sign(metric, direction, sign)):
        raise ImpossibleSignError(reason)
    flat = scores.flatten().float()
    ok = torch.isfinite(flat)
    if ok.sum() < 2:
        raise ValueError("detect needs at least two finite scores")
    mean, sd = flat[ok].mean(), flat[ok].std()
    z = (flat - mean) / sd if sd > 0 else torch.zeros_like(flat)
    z = torch.where(ok, z, torch.zeros_like(z))
    if sign == "positive":
        hit, order = z >= k, -z
    elif sign == "negative":
        hit, order = z <= -k, z
    elif sign == "both":
        hit, order = z.abs() >= k, -z.abs()
    else:
        raise ValueError(f"sign must be 'positive', 'negative' or 'both', got {sign!r}")
    idx = [i for i in order.argsort().tolist() if hit[i]]
    return [tuple(int(j) for j in torch.unravel_index(torch.tensor(i), scores.shape)) for i in idx]
