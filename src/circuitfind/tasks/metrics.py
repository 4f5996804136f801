"""Patching metrics, each a per-prompt score where higher means "more like the clean run".

Each prompt has a set of correct answers ``R`` and a set of wrong (counterfactual) answers ``R'``
(one token each; a single answer is the set of one, which gives exactly the single-answer numbers):

* ``prob``: probability mass of the correct set, ``sum_{r in R} p(r)``.
* ``logprob``: log of that mass, ``log sum_{r in R} p(r)``.
* ``logit_diff``: mean logit of the correct set minus mean logit of the wrong set (Wang et al. 2022's
  logit difference for one answer each).
* ``logprob_diff``: log mass of the correct set minus log mass of the wrong set; for one answer each it
  equals ``logit_diff`` (the softmax normaliser cancels). With multi-token answers it is the
  teacher-forced ``log p(a|x) - log p(b|x)`` (:mod:`circuitfind.tasks.multitoken`).
* ``prob_diff``: mass of the correct set minus mass of the wrong set (Hanna et al. 2023's probability
  difference for greater-than: years > YY minus years <= YY).
* ``kl``: score ``-KL(clean || patched)`` over the next-token distribution, so the effect of a patch
  ``score(patched) - score(corrupt)`` is ``KL(cl||corr) - KL(cl||patched)``.
* any callable ``fn(logits_at_answer, context) -> [batch]`` wrapped in :class:`CallableMetric`, also
  given by import path ``package.module:function`` (a function or a :class:`Metric` subclass).
* a metric over whole answers (:class:`AnswerMetric`, or a function under :func:`answer_metric`):
  ``fn(answers) -> [prompts]`` from each prompt's answer log-probabilities (:class:`Answers`); the only
  kind of metric of one's own that scores multi-token answers.

Every metric is reduced by the mean over prompts, and normalised as
``(patched - corrupt) / (clean - corrupt)`` (1 = clean behaviour, 0 = corrupted behaviour).
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from circuitfind.errors import MetricError
from circuitfind.user_code import import_object, is_import_path, source_fingerprint


def pad_answer_sets(sets: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, k]`` ids (0-padded) and the mask of real entries."""
    k = max(1, max((len(s) for s in sets), default=1))
    ids = torch.zeros(len(sets), k, dtype=torch.long, device=device)
    mask = torch.zeros(len(sets), k, dtype=torch.bool, device=device)
    for i, s in enumerate(sets):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, : len(s)] = True
    return ids, mask


@dataclass
class MetricContext:
    """What a metric needs besides the logits, one row per row of the logits.

    ``answers`` / ``counter_answers``: ``[batch]`` first correct / wrong answer id. ``answer_sets`` /
    ``counter_sets``: ``[batch, k]`` ids of every answer, padded, with ``answer_mask`` /
    ``counter_mask`` (``None``: the set of the one answer). ``extra``: per-prompt dataset columns
    (numbers as ``[batch]`` tensors, anything else as lists); ``prompt_index``: ``[batch]`` index of
    each row's prompt in the task batch. Engines that stack candidates, noise samples or chunks on
    the batch axis build the context with :meth:`take`, so every field stays aligned with the logits.
    """

    answers: torch.Tensor  # [batch]
    counter_answers: torch.Tensor  # [batch]
    clean_logprobs: torch.Tensor | None = None  # [batch, vocab] at the answer position
    answer_sets: torch.Tensor | None = None  # [batch, k]
    answer_mask: torch.Tensor | None = None
    counter_sets: torch.Tensor | None = None  # [batch, k']
    counter_mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # column -> [batch] tensor or list
    prompt_index: torch.Tensor | None = None  # [batch]

    @classmethod
    def from_sets(
        cls,
        answer_sets: list[list[int]],
        counter_sets: list[list[int]],
        extra: list[Mapping[str, Any]] | None = None,
        device=None,
    ) -> MetricContext:
        """A context from per-prompt answer id lists and per-prompt ``extra`` rows."""
        ids, mask = pad_answer_sets(answer_sets, device)
        cids, cmask = pad_answer_sets(counter_sets, device)
        first = ids[:, 0]
        counter_first = torch.where(cmask[:, 0], cids[:, 0], first)
        return cls(
            first,
            counter_first,
            answer_sets=ids,
            answer_mask=mask,
            counter_sets=cids,
            counter_mask=cmask,
            extra=extra_columns(extra or [{} for _ in answer_sets], device),
            prompt_index=torch.arange(len(answer_sets), device=device),
        )

    def take(self, rows: torch.Tensor) -> MetricContext:
        """The context of the rows ``rows`` (``[n]`` indices into this context's batch)."""
        rows = rows.to(self.answers.device)

        def pick(t):
            return None if t is None else t[rows]

        extra = {
            k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows.tolist()] for k, v in self.extra.items()
        }
        return MetricContext(
            self.answers[rows],
            self.counter_answers[rows],
            pick(self.clean_logprobs),
            pick(self.answer_sets),
            pick(self.answer_mask),
            pick(self.counter_sets),
            pick(self.counter_mask),
            extra,
            pick(self.prompt_index),
        )

    def correct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, k]`` correct answer ids and mask."""
        if self.answer_sets is None or self.answer_mask is None:
            return self.answers[:, None], torch.ones_like(self.answers[:, None], dtype=torch.bool)
        return self.answer_sets, self.answer_mask

    def wrong(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, k]`` wrong answer ids and mask."""
        if self.counter_sets is None or self.counter_mask is None:
            return self.counter_answers[:, None], torch.ones_like(self.counter_answers[:, None], dtype=torch.bool)
        return self.counter_sets, self.counter_mask


def extra_columns(rows: list[Mapping[str, Any]], device=None) -> dict[str, Any]:
    """Per-prompt ``extra`` rows as columns: all-number columns as tensors, others as lists."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, Any] = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and all(-(2**63) <= v < 2**63 for v in values if isinstance(v, int)):  # int64, else a list
            out[k] = torch.tensor(values, device=device)
        else:
            out[k] = values
    return out


# How long a user's metric's first call may take (CIRCUITFIND_METRIC_TIMEOUT seconds): a metric that
# sleeps or loops forever hung `discover` with no output.
METRIC_TIMEOUT_S = 30.0


def metric_timeout() -> float:
    """The first call's limit in seconds: ``CIRCUITFIND_METRIC_TIMEOUT`` or :data:`METRIC_TIMEOUT_S`."""
    raw = os.environ.get("CIRCUITFIND_METRIC_TIMEOUT")
    if raw is None:
        return METRIC_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise MetricError(f"CIRCUITFIND_METRIC_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


class Metric:
    """A per-prompt score of the logits at the answer position (``[batch, vocab]`` -> ``[batch]``).

    A user's metric (``user_code``: by import path or a callable) is guarded: its first call runs
    under a time limit (:func:`metric_timeout`), and ``sys.exit()`` in it is an error, not an exit."""

    name = "metric"
    user_code = False
    _checked = False

    def score(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        try:
            if self.user_code and not self._checked:
                values = self._first_call(logits.float(), ctx)
                self._checked = True
            else:
                values = self.score(logits.float(), ctx)
        except SystemExit as exc:  # the user's code must not end the command (it exited 0, writing nothing)
            raise MetricError(f"metric {self.name!r} called sys.exit({exc.code!r}); a metric returns scores") from None
        if not isinstance(values, torch.Tensor) or values.shape != logits.shape[:1]:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise MetricError(
                f"metric {self.name!r} must return one value per prompt {tuple(logits.shape[:1])}, got {shape}"
            )
        if not values.is_floating_point():  # argmax gives int64: the mean over prompts and gradients need floats
            raise MetricError(
                f"metric {self.name!r} returned {str(values.dtype).removeprefix('torch.')} values; a metric returns "
                f"floating-point scores (e.g. a log-probability, not an argmax or a count)"
            )
        if not torch.isfinite(values).all():
            where = (~torch.isfinite(values)).nonzero().flatten()
            # A pass may batch candidates x prompts, so a row is not always a prompt index.
            raise MetricError(
                f"metric {self.name!r} returned NaN or inf in {len(where)} of {len(values)} rows (first "
                f"{where[:5].tolist()}; a row is a prompt, or one candidate's prompt in a batched pass); check the "
                "model output and the metric"
            )
        if logits.requires_grad and torch.is_grad_enabled() and not values.requires_grad:
            raise MetricError(
                f"metric {self.name!r} has no gradient with respect to the logits; gradient methods "
                "(eap, eap_ig) need a differentiable metric (no argmax, .item() or detach)"
            )
        return values

    def _first_call(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        """``score`` on a worker thread, waited for :func:`metric_timeout` seconds (grad and inference
        modes are per thread, so the caller's are carried over). A metric that never returns is left on
        its daemon thread: it cannot be stopped from outside, but it no longer holds the command."""
        limit = metric_timeout()
        box: dict[str, Any] = {}
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run() -> None:
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    box["out"] = self.score(logits, ctx)
            except BaseException as exc:  # handed to the caller's thread
                box["err"] = exc

        worker = threading.Thread(target=run, name=f"metric {self.name}", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            raise MetricError(
                f"metric {self.name!r} did not return within {limit:g} s on its first call "
                f"(CIRCUITFIND_METRIC_TIMEOUT sets the limit)"
            )
        if "err" in box:
            raise box["err"]
        return box["out"]

    def __repr__(self) -> str:
        return self.name


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids)


def _mass(probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (_gather(probs, ids) * mask).sum(-1)


def _set_mean(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, what: str) -> torch.Tensor:
    counts = mask.sum(-1)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten()[:5].tolist()
        raise MetricError(f"prompts {rows} have no {what} answers; this metric needs at least one")
    picked = _gather(logits, ids).masked_fill(~mask, 0.0)
    if mask.shape[-1] == 1:
        return picked[:, 0]  # one answer: exactly its logit
    return picked.sum(-1) / counts


class Probability(Metric):
    """Probability mass of the correct answer set."""

    name = "prob"

    def score(self, logits, ctx):
        ids, mask = ctx.correct()
        return _mass(logits.softmax(-1), ids, mask)


class LogProb(Metric):
    """Log of the probability mass of the correct answer set."""

    name = "logprob"

    def score(self, logits, ctx):
        ids, mask = ctx.correct()
        return _gather(logits.log_softmax(-1), ids).masked_fill(~mask, -math.inf).logsumexp(-1)


class LogitDiff(Metric):
    """Mean logit of the correct set minus mean logit of the wrong set."""

    name = "logit_diff"

    def score(self, logits, ctx):
        return _set_mean(logits, *ctx.correct(), "correct") - _set_mean(logits, *ctx.wrong(), "wrong")


class LogProbDiff(Metric):
    """Log mass of the correct set minus log mass of the wrong set (``logit_diff`` for one answer each)."""

    name = "logprob_diff"

    def score(self, logits, ctx):
        logprobs = logits.log_softmax(-1)
        correct, wrong = ctx.correct(), ctx.wrong()
        for what, (_, mask) in (("correct", correct), ("wrong", wrong)):
            if not mask.any(-1).all():
                rows = (~mask.any(-1)).nonzero().flatten()[:5].tolist()
                raise MetricError(f"prompts {rows} have no {what} answers; this metric needs at least one")
        return _log_mass(logprobs, *correct) - _log_mass(logprobs, *wrong)


def _log_mass(logprobs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _gather(logprobs, ids).masked_fill(~mask, -math.inf).logsumexp(-1)


class ProbDiff(Metric):
    """Probability mass of the correct set minus mass of the wrong set (Hanna et al. 2023)."""

    name = "prob_diff"

    def score(self, logits, ctx):
        probs = logits.softmax(-1)
        return _mass(probs, *ctx.correct()) - _mass(probs, *ctx.wrong())


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

    user_code = True

    def __init__(self, fn: Callable[[torch.Tensor, MetricContext], torch.Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def score(self, logits, ctx):
        try:
            out = self.fn(logits, ctx)
        except MetricError:
            raise
        except (Exception, SystemExit) as exc:  # the user's function, named in one line rather than a traceback
            if isinstance(exc, SystemExit):
                raise MetricError(
                    f"metric {self.name!r} called sys.exit({exc.code!r}); a metric returns scores"
                ) from None
            raise MetricError(f"metric {self.name!r} raised {type(exc).__name__}: {exc}") from None
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out, device=logits.device)


METRICS: dict[str, type[Metric]] = {m.name: m for m in (Probability, LogProb, LogitDiff, LogProbDiff, ProbDiff, NegKL)}


@dataclass
class Answers:
    """What a metric over whole answers (:class:`AnswerMetric`) reads, one row per prompt.

    ``logprobs`` ``[n, k]``: ``log p(r|x)`` of each of the prompt's answers, the whole answer's
    teacher-forced log-probability for multi-token answers (``sum_j log p(r_j | x, r_<j)``, as EAP-IG
    users compute per-prompt answer log-probabilities) and the token's log-probability for one-token
    answers; ``correct`` / ``wrong`` ``[n, k]``: which entries are answers of ``R`` / of ``R'`` (the
    others are padding, with meaningless values); ``extra``: the prompts' dataset columns (numbers as
    ``[n]`` tensors)."""

    logprobs: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class AnswerMetric(Metric):
    """A metric over whole answers: :meth:`score_answers` maps :class:`Answers` to one value per prompt.
    It scores one-token and multi-token answers alike (multi-token answers by teacher forcing,
    :mod:`circuitfind.tasks.multitoken`), where a metric of the logits sees one answer position only.
    Write one by subclassing, or with :func:`answer_metric` on a function; give it by import path."""

    name = "answer_metric"

    def score_answers(self, answers: Answers) -> torch.Tensor:
        raise NotImplementedError

    def score(self, logits, ctx):
        """One-token answers: each answer's log-probability at the answer position."""
        ids, mask = ctx.correct()
        wids, wmask = ctx.wrong()
        logprobs = logits.log_softmax(-1)
        answers = Answers(
            torch.cat([logprobs.gather(-1, ids), logprobs.gather(-1, wids)], -1),
            torch.cat([mask, torch.zeros_like(wmask)], -1),
            torch.cat([torch.zeros_like(mask), wmask], -1),
            ctx.extra,
        )
        return self.score_answers(answers)


class _FunctionAnswerMetric(AnswerMetric):
    def __init__(self, fn: Callable[[Answers], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "answer_metric")

    def score_answers(self, answers: Answers) -> torch.Tensor:
        try:
            out = self.fn(answers)
        except MetricError:
            raise
        except Exception as exc:  # the user's function, named in one line rather than a traceback
            raise MetricError(f"metric {self.name!r} raised {type(exc).__name__}: {exc}") from None
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out, device=answers.logprobs.device)


def answer_metric(fn: Callable[[Answers], torch.Tensor]) -> AnswerMetric:
    """``fn(answers: Answers) -> [n]`` as a metric over whole answers (a decorator)::

    @answer_metric
    def greater_prob(a):  # Hanna et al.'s probability difference, answers of any length
        p = a.logprobs.exp()
        return (p * a.correct).sum(-1) - (p * a.wrong).sum(-1)
    """
    return _FunctionAnswerMetric(fn)


def _import(spec: str) -> Any:
    return import_object(spec, "metric", MetricError)


def get_metric(spec: str | Metric | type[Metric] | Callable[[torch.Tensor, MetricContext], torch.Tensor]) -> Metric:
    """A metric from its name (``prob``, ``logprob``, ``logit_diff``, ``logprob_diff``, ``prob_diff``, ``kl``), an import
    path ``package.module:function`` (a function ``fn(logits, ctx) -> [batch]`` or a :class:`Metric`
    subclass), or a callable."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, type) and issubclass(spec, Metric):
        return spec()
    if callable(spec) and not isinstance(spec, type):
        return CallableMetric(spec)
    if isinstance(spec, str) and is_import_path(spec):
        obj = _import(spec)
        if isinstance(obj, type) and issubclass(obj, Metric):
            metric = obj()
            metric.name = spec
            metric.user_code = True
            return metric
        if isinstance(obj, Metric):
            if isinstance(obj, _FunctionAnswerMetric):
                obj.name = spec  # the setting names what ran, as for a function
            return obj
        if not callable(obj):
            raise MetricError(f"metric {spec!r} is a {type(obj).__name__}, not a function or a Metric subclass")
        return CallableMetric(obj, name=spec)
    if spec not in METRICS:
        raise ValueError(
            f"unknown metric {spec!r}; choose from {sorted(METRICS)}, give package.module:function, or pass a callable"
        )
    return METRICS[spec]()


def metric_fingerprint(spec: str) -> str | None:
    """A hash of an import-path metric's source (its module and the user's modules it imports,
    :func:`circuitfind.user_code.source_fingerprint`), for cache keys; ``None`` for built-in metrics
    (the package's code fingerprint covers them)."""
    if not is_import_path(spec):
        return None
    obj = _import(spec)
    module = inspect.getmodule(getattr(obj, "fn", obj))  # a function under answer_metric: the function's module
    return source_fingerprint(module.__name__ if module is not None else spec.split(":")[0])


def normalise(value, clean: float, corrupt: float):
    """``(value - corrupt) / (clean - corrupt)``: 1 = clean behaviour, 0 = corrupted."""
    gap = clean - corrupt
    if not math.isfinite(gap) or abs(gap) < 1e-8:
        raise MetricError(
            f"clean ({clean:.4g}) and corrupted ({corrupt:.4g}) metric values are equal: the "
            "corruption does not change the behaviour, so effects cannot be normalised"
        )
    return (value - corrupt) / gap
