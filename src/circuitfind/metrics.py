"""Patching metrics, each a per-prompt score where higher means "more like the clean run".

* ``prob``: probability of the answer ``r``.
* ``logprob``: log probability of ``r``.
* ``logit_diff``: logit of ``r`` minus logit of the counterfactual ``r'``.
* ``kl``: score ``-KL(clean || patched)`` over the next-token distribution, so the effect of a patch
  ``score(patched) - score(corrupt)`` is ``KL(cl||corr) - KL(cl||patched)``.
* any callable ``fn(logits_at_answer, context) -> [batch]`` wrapped in :class:`CallableMetric`.

Every metric is reduced by the mean over prompts, and normalised as
``(patched - corrupt) / (clean - corrupt)`` (1 = clean behaviour, 0 = corrupted behaviour).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from circuitfind.errors import MetricError


@dataclass
class MetricContext:
    """What a metric needs besides the logits: answers and the clean run's log-probabilities."""

    answers: torch.Tensor  # [batch]
    counter_answers: torch.Tensor  # [batch]
    clean_logprobs: torch.Tensor | None = None  # [batch, vocab] at the answer position


class Metric:
    """A per-prompt score of the logits at the answer position (``[batch, vocab]`` -> ``[batch]``)."""

    name = "metric"

    def score(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        values = self.score(logits.float(), ctx)
        if values.shape != logits.shape[:1]:
            raise MetricError(
                f"metric {self.name!r} must return one value per prompt {tuple(logits.shape[:1])}, got {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all():
            bad = (~torch.isfinite(values)).nonzero().flatten()[:5].tolist()
            raise MetricError(
                f"metric {self.name!r} returned NaN or inf (prompts {bad}); check the model output and the metric"
            )
        return values

    def __repr__(self) -> str:
        return self.name


def _pick(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids[:, None])[:, 0]


class Probability(Metric):
    name = "prob"

    def score(self, logits, ctx):
        return _pick(logits.softmax(-1), ctx.answers)


class LogProb(Metric):
    name = "logprob"

    def score(self, logits, ctx):
        return _pick(logits.log_softmax(-1), ctx.answers)


class LogitDiff(Metric):
    name = "logit_diff"

    def score(self, logits, ctx):
        return _pick(logits, ctx.answers) - _pick(logits, ctx.counter_answers)


class NegKL(Metric):
    """``-KL(clean || patched)``: 0 on the clean run, negative elsewhere."""

    name = "kl"

    def score(self, logits, ctx):
        if ctx.clean_logprobs is None:
            raise MetricError("the kl metric needs the clean run's log-probabilities in its context")
        clean = ctx.clean_logprobs.float()
        patched = logits.log_softmax(-1)
        return -(clean.exp() * (clean - patched)).sum(-1)


class CallableMetric(Metric):
    """Wrap ``fn(logits [batch, vocab], ctx) -> [batch]`` as a metric."""

    def __init__(self, fn: Callable[[torch.Tensor, MetricContext], torch.Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def score(self, logits, ctx):
        return torch.as_tensor(self.fn(logits, ctx), device=logits.device)


METRICS: dict[str, type[Metric]] = {m.name: m for m in (Probability, LogProb, LogitDiff, NegKL)}


def get_metric(spec: str | Metric | Callable) -> Metric:
    """A metric from its name (``prob``, ``logprob``, ``logit_diff``, ``kl``) or a callable."""
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return CallableMetric(spec)
    if spec not in METRICS:
        raise ValueError(f"unknown metric {spec!r}; choose from {sorted(METRICS)} or pass a callable")
    return METRICS[spec]()


def normalise(value, clean: float, corrupt: float):
    """``(value - corrupt) / (clean - corrupt)``: 1 = clean behaviour, 0 = corrupted."""
    gap = clean - corrupt
    if not math.isfinite(gap) or abs(gap) < 1e-8:
        raise MetricError(
            f"clean ({clean:.4g}) and corrupted ({corrupt:.4g}) metric values are equal: the "
            "corruption does not change the behaviour, so effects cannot be normalised"
        )
    return (value - corrupt) / gap
