"""The patching setup: a model, a batch, a corruption and a metric, with the clean and corrupted
baselines (:func:`prepare`, :class:`PatchingSetup`), and the small pieces every patching pass uses
(hook names, answer logits, metric contexts of slices and copies of the batch, the blend hook).

Directions:

* ``denoise``: run the corrupted input and patch in clean activations (does this component
  *suffice* to restore the behaviour?);
* ``noise``: run the clean input and patch in corrupted (or ablated) activations (is this
  component *necessary*?).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from circuitfind.checks import positive_int
from circuitfind.patching.memory import parse_memory
from circuitfind.progress import enabled as progress_enabled
from circuitfind.tasks import multitoken
from circuitfind.tasks.batch import TaskBatch
from circuitfind.tasks.corruptions import Corruption, CorruptionPlan, Run, get_corruption
from circuitfind.tasks.metrics import Metric, MetricContext, get_metric

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Direction = Literal["denoise", "noise"]
DIRECTIONS = ("denoise", "noise")
ENGINES = ("auto", "hooks", "functional")


def check_direction(direction: str) -> None:
    """A clear error for a direction other than ``noise`` or ``denoise``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


@dataclass
class PatchingSetup:
    """A model, a batch and a corruption/metric choice, with the clean and corrupted baselines.

    Build it with :func:`prepare`. Activations of the clean and corrupted runs are cached lazily,
    per hook, the first time a sweep needs them. ``engine`` picks how node and path patching run:
    ``auto`` (suffix passes from cached activations, :mod:`circuitfind.patching.suffix`, where the model
    and hooks allow; full forward passes of the bridge otherwise), ``hooks`` (always full forward
    passes) or ``functional`` (suffix passes or an error). ``max_memory`` bounds the working memory
    of one edge-patching pass (bytes or e.g. ``"4GB"``; ``None``: automatic, see
    :mod:`circuitfind.patching.memory`).
    """

    model: TransformerBridge
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
        if isinstance(self.batch, multitoken.AnswerRows):
            metric = multitoken.wrap(metric, self.batch)
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
        check_direction(direction)
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

            hooks = list(run.hooks) + [(n, bind_hook(save, key=n)) for n in missing]
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


def bind_hook(fn, **kw):
    """A forward hook ``(act, hook)`` that calls ``fn(act, hook, **kw)``."""

    def hook(act, hook):
        return fn(act, hook, **kw)

    return hook


def answer_logits(logits: torch.Tensor, end_pos: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's answer position: ``[n, pos, vocab]`` -> ``[n, vocab]``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, end_pos]


def prepare(
    model: TransformerBridge,
    batch: TaskBatch,
    corruption: str | Corruption = "str",
    metric: str | Metric = "logit_diff",
    max_batch: int = 256,
    progress: bool | None = None,
    engine: str = "auto",
    max_memory: int | str | None = None,
) -> PatchingSetup:
    """Run the clean and corrupted baselines of ``batch`` under a corruption and a metric.

    A batch with multi-token answers is first expanded into one teacher-forced row per answer token, and
    the metric scores the whole answer (:mod:`circuitfind.tasks.multitoken`); ``setup.batch`` is then the rows.

    ``max_batch`` (>= 1) caps the prompts per forward pass of the sweeps built on this setup;
    ``engine``: how node and path patching run; ``max_memory``: the working-memory budget of an
    edge-patching pass (see :class:`PatchingSetup`); ``progress``: its sweeps show progress on stderr
    (default: :func:`circuitfind.progress.enabled`, so a long sweep logs a line every ~10 s off a terminal).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    parse_memory(max_memory)  # a clear error now rather than in the first edge-patching pass
    positive_int("max_batch", max_batch)
    corruption = get_corruption(corruption)
    metric = get_metric(metric)
    if batch.answer_sequences is not None:  # one teacher-forced row per answer token (circuitfind.tasks.multitoken)
        batch = multitoken.expand(model, batch)
    if isinstance(batch, multitoken.AnswerRows):
        metric = multitoken.wrap(metric, batch)
        plan = multitoken.corruption_plan(corruption, model, batch)
    else:
        plan = corruption.plan(model, batch)
    with torch.no_grad():
        clean_logits = answer_logits(model.run_with_hooks(plan.clean.tokens, fwd_hooks=plan.clean.hooks), plan.end_pos)
        corrupt_logits = answer_logits(
            model.run_with_hooks(plan.corrupt.tokens, fwd_hooks=plan.corrupt.hooks), plan.end_pos
        )
    ctx = plan_context(plan, clean_logits.float().log_softmax(-1))
    clean_value = metric(clean_logits, ctx).mean().item()
    corrupt_value = metric(corrupt_logits, ctx).mean().item()
    return PatchingSetup(
        model,
        plan,
        metric,
        ctx,
        clean_value,
        corrupt_value,
        max_batch=max_batch,
        progress=progress_enabled() if progress is None else progress,
        engine=engine,
        max_memory=max_memory,
        clean_logits=clean_logits,
        corrupt_logits=corrupt_logits,
    )


def plan_context(plan: CorruptionPlan, clean_logprobs: torch.Tensor | None = None) -> MetricContext:
    """The metric context of a corruption plan's rows: the batch's answers, answer sets and extra
    columns, repeated the way the plan stacks copies of the batch (e.g. one per Gaussian-noise sample)."""
    batch = plan.batch
    if plan.size % batch.size:
        raise ValueError(
            f"corruption plan of {plan.size} rows is not a stack of copies of the {batch.size}-prompt batch"
        )
    ctx = batch.metric_context().take(torch.arange(plan.size, device=batch.answers.device) % batch.size)
    if not (torch.equal(ctx.answers, plan.answers) and torch.equal(ctx.counter_answers, plan.counter_answers)):
        raise ValueError(f"corruption {plan.name!r} reorders the batch's answers; its plan must stack copies of it")
    ctx.clean_logprobs = clean_logprobs
    return ctx


def slice_ctx(ctx: MetricContext, prompts: slice) -> MetricContext:
    """The metric context of a slice of the prompts (every per-prompt field, ``extra`` included)."""
    return ctx.take(torch.arange(ctx.answers.shape[0], device=ctx.answers.device)[prompts])


def repeat_ctx(ctx: MetricContext, n: int) -> MetricContext:
    """The metric context of ``n`` stacked copies of the batch (every per-prompt field, ``extra`` included)."""
    return ctx.take(torch.arange(ctx.answers.shape[0], device=ctx.answers.device).repeat(n))


def patch_hook(act: torch.Tensor, hook, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend ``source`` into each stacked candidate copy of the batch where ``mask`` is set."""
    n = mask.shape[0]
    view = act.reshape(n, -1, *act.shape[1:])
    if mask.dtype == torch.bool:
        out = torch.where(mask, source, view)
    else:
        out = view + mask.to(view.dtype) * (source - view)
    return out.reshape(act.shape)
