"""Multi-token answers, scored by teacher forcing: one row per answer token.

Every engine reads the logits at one position per row (``end_pos``), so a prompt ``x`` whose answer is
``a = (a_1, ..., a_m)`` becomes ``m`` rows before the engines see it: row ``j`` is ``x + a_<j`` with its
answer position at its last token and the single answer ``a_j`` (teacher forcing, Williams & Zipser
1989: the model is fed the true prefix, not its own guesses). By the chain rule,
``log p(a|x) = sum_j log p(a_j | x, a_<j)``, so a metric summed over a prompt's rows is the
log-probability of its whole answer. The corrupted row is the corrupted prompt plus the *same* prefix
(lengths stay equal). A counterfactual answer ``b`` adds its own rows ``x + b_<j -> b_j`` with sign -1.

Metrics (:class:`TeacherForced` wraps the built-in one):

* ``logprob``: ``log p(a|x)``;
* ``logprob_diff`` and ``logit_diff``: ``log p(a|x) - log p(b|x)`` (for one-token answers the two are
  equal, the softmax normaliser cancelling, so ``logit_diff`` keeps its meaning);
* ``kl``: ``-sum_j KL(clean || patched)`` at the clean answer's positions.

Engines average over rows, so each row's value is scaled by ``rows / prompts``: the mean over rows is the
mean over prompts of the per-prompt value. :func:`by_prompt` sums rows back into prompts (per-prompt EAP
scores, per-prompt patching values). ``prob``, ``prob_diff`` and metrics by import path are refused (a
probability of a sequence is not a sum over its tokens, and a user's metric would see rows, not prompts),
as is IFR (:data:`REFUSED_ALGORITHMS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from circuitfind.corruptions import Corruption, CorruptionPlan, ResampleAblation, Run
from circuitfind.errors import TaskError
from circuitfind.metrics import LogitDiff, LogProb, LogProbDiff, Metric, MetricContext, NegKL
from circuitfind.tasks import TaskBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# the per-row columns added to MetricContext.extra (a dataset column of the same name is refused)
SIGN = "answer_rows.sign"  # +1: a token of the correct answer, -1: of the counterfactual one
SCALE = "answer_rows.scale"  # rows / prompts, so the mean over rows is the mean over prompts
TOKEN = "answer_rows.token"  # j: the row predicts the answer's token j (0-based)

# metric name -> (the exact built-in class, whether it reads the counterfactual rows)
SCORED: dict[str, tuple[type[Metric], bool]] = {
    "logprob": (LogProb, False),
    "logprob_diff": (LogProbDiff, True),
    "logit_diff": (LogitDiff, True),
    "kl": (NegKL, False),
}

REFUSED_ALGORITHMS = {
    "ifr": "IFR scores the routes of the clean run's predictions without a metric, so it cannot weigh the "
    "correct answer's tokens against the counterfactual rows",
}


@dataclass
class AnswerRows(TaskBatch):
    """A :class:`TaskBatch` of teacher-forced rows, one per answer token (see the module docstring).

    ``source`` is the batch of prompts; ``prompt_index``, ``token_index`` and ``sign`` (``[rows]``) say
    which prompt, which answer token and which answer (+1 correct, -1 counterfactual) each row is;
    ``prefixes`` are the answer tokens each row appends to its prompt. ``prompts`` holds each row's
    :class:`~circuitfind.tasks.Prompt` (repeated), so ``extra`` columns stay aligned."""

    source: TaskBatch | None = None
    prompt_index: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    sign: torch.Tensor | None = None
    prefixes: list[list[int]] | None = None
    pad_id: int = 0

    @property
    def n_prompts(self) -> int:
        assert self.source is not None
        return self.source.size

    def rows_of(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """``[rows, pos]``: each row's prompt taken from ``prompt_tokens`` (``[prompts, pos]``, the
        source's lengths) followed by that row's answer prefix, right-padded."""
        assert self.source is not None and self.prompt_index is not None and self.prefixes is not None
        lengths = (self.source.end_pos + 1).tolist()
        out = torch.full_like(self.clean_tokens, self.pad_id)
        for r, (i, prefix) in enumerate(zip(self.prompt_index.tolist(), self.prefixes, strict=True)):
            n = lengths[i]
            out[r, :n] = prompt_tokens[i, :n]
            out[r, n : n + len(prefix)] = torch.tensor(prefix, dtype=out.dtype, device=out.device)
        return out

    def metric_context(self) -> MetricContext:
        """The rows' context: each row's target token, its prompt's ``extra`` columns, its prompt index,
        and the :data:`SIGN`, :data:`SCALE` and :data:`TOKEN` columns that :class:`TeacherForced` reads."""
        assert self.sign is not None and self.token_index is not None and self.prompt_index is not None
        ctx = super().metric_context()
        clash = sorted({SIGN, SCALE, TOKEN} & set(ctx.extra))
        if clash:
            raise TaskError(f"task {self.task.name!r}: column {clash[0]!r} is reserved for multi-token answers")
        ctx.extra[SIGN] = self.sign.float()
        ctx.extra[SCALE] = torch.full_like(ctx.extra[SIGN], self.size / self.n_prompts)
        ctx.extra[TOKEN] = self.token_index
        ctx.prompt_index = self.prompt_index
        return ctx


def expand(model: TransformerBridge, batch: TaskBatch) -> AnswerRows:
    """The teacher-forced rows of a multi-token batch (``batch.answer_sequences`` set): for prompt ``i``,
    first its answer's rows then its counterfactual's, in prompt order."""
    if batch.answer_sequences is None:
        raise ValueError("expand needs a batch with multi-token answers (answer_tokens: multi)")
    counters = batch.counter_sequences or [[] for _ in batch.answer_sequences]
    device = batch.clean_tokens.device
    rows: list[tuple[int, int, int, list[int], int]] = []  # prompt, token index, sign, prefix, target
    for i, (answer, counter) in enumerate(zip(batch.answer_sequences, counters, strict=True)):
        for sign, seq in ((1, answer), (-1, counter)):
            rows.extend((i, j, sign, seq[:j], t) for j, t in enumerate(seq))
    index = torch.tensor([r[0] for r in rows], device=device)
    lengths = batch.end_pos[index] + 1 + torch.tensor([len(r[3]) for r in rows], device=device)
    n_pos = int(lengths.max())
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    targets = torch.tensor([r[4] for r in rows], device=device)
    ones = torch.ones(len(rows), 1, dtype=torch.bool, device=device)
    positions = {k: v[index] for k, v in batch.positions.items()}
    positions["end"] = lengths - 1
    spans = {}
    for name, span in batch.spans.items():
        spans[name] = torch.zeros(len(rows), n_pos, dtype=torch.bool, device=device)
        spans[name][:, : span.shape[1]] = span[index]
    out = AnswerRows(
        task=batch.task,
        prompts=[batch.prompts[r[0]] for r in rows],
        clean_tokens=torch.full((len(rows), n_pos), pad, dtype=torch.long, device=device),
        corrupted_tokens={},
        answers=targets,
        counter_answers=targets,
        end_pos=lengths - 1,
        positions=positions,
        mask=torch.arange(n_pos, device=device)[None, :] < lengths[:, None],
        spans=spans,
        answer_sets=targets[:, None],
        answer_mask=ones,
        counter_sets=targets[:, None],
        counter_mask=ones,
        source=batch,
        prompt_index=index,
        token_index=torch.tensor([r[1] for r in rows], device=device),
        sign=torch.tensor([r[2] for r in rows], device=device),
        prefixes=[r[3] for r in rows],
        pad_id=pad,
    )
    out.clean_tokens = out.rows_of(batch.clean_tokens)
    out.corrupted_tokens = {v: out.rows_of(t) for v, t in batch.corrupted_tokens.items()}
    return out


class TeacherForced(Metric):
    """A built-in metric (:data:`SCORED`) over teacher-forced rows: each row's token score times its
    sign and :data:`SCALE`, so the mean over rows is the mean over prompts of the whole answer's score."""

    def __init__(self, inner: Metric):
        self.inner = inner
        self.name = inner.name
        self.counterfactual = SCORED[inner.name][1]

    def score(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        sign, scale = ctx.extra[SIGN].to(logits.device), ctx.extra[SCALE].to(logits.device)
        if isinstance(self.inner, NegKL):
            token = self.inner.score(logits, ctx)
        else:
            token = logits.log_softmax(-1).gather(-1, ctx.answers[:, None])[:, 0]
        weight = sign if self.counterfactual else (sign > 0).to(logits.dtype)
        return weight * scale * token


def check_metric(task: str, metric: str | Metric) -> None:
    """Refuse a metric that cannot score a multi-token answer, naming the task and the metric."""
    name = metric if isinstance(metric, str) else metric.name
    known = SCORED.get(name)
    if known is None or (isinstance(metric, Metric) and type(metric) is not known[0]):
        raise TaskError(
            f"task {task!r} has multi-token answers (answer_tokens: multi), scored by their teacher-forced "
            f"log-probability: metric {name!r} cannot score them; use one of {', '.join(SCORED)}"
        )


def check_algorithm(task: str, algorithm: str) -> None:
    """Refuse an algorithm that cannot use multi-token answers, naming the task, the algorithm and why."""
    if algorithm in REFUSED_ALGORITHMS:
        raise TaskError(
            f"task {task!r} has multi-token answers (answer_tokens: multi): algorithm {algorithm!r} cannot use "
            f"them ({REFUSED_ALGORITHMS[algorithm]})"
        )


def check_grid(task: str, algorithms: Iterable[str], metrics: Iterable[str]) -> None:
    """A sweep grid's algorithms and metrics against a multi-token task, before anything runs."""
    for a in algorithms:
        check_algorithm(task, a)
    for m in metrics:
        check_metric(task, m)


def wrap(metric: Metric, rows: AnswerRows) -> TeacherForced:
    """``metric`` scored over ``rows`` (refused when it cannot be, or when it needs a counterfactual answer
    that a prompt lacks)."""
    if isinstance(metric, TeacherForced):
        return metric
    check_metric(rows.task.name, metric)
    wrapped = TeacherForced(metric)
    assert rows.source is not None and rows.sign is not None and rows.prompt_index is not None
    if wrapped.counterfactual:
        has = torch.zeros(rows.n_prompts, dtype=torch.bool, device=rows.sign.device)
        has[rows.prompt_index[rows.sign < 0]] = True
        if not has.all():
            i = int((~has).nonzero()[0])
            raise TaskError(
                f"task {rows.task.name!r}, prompt {i} ({rows.source.prompts[i].text!r}) has no counterfactual "
                f"answer, which metric {metric.name!r} needs; give one or use logprob"
            )
    return wrapped


def corruption_plan(corruption: Corruption, model: TransformerBridge, rows: AnswerRows) -> CorruptionPlan:
    """The corruption's plan over the rows. Resample ablation pairs *prompts* (of equal token length), and
    each row's corrupted input is its partner's prompt plus the row's own answer prefix, so a row never
    borrows another answer's tokens; the other corruptions work on the rows as they are."""
    if not isinstance(corruption, ResampleAblation):
        return corruption.plan(model, rows)
    assert rows.source is not None
    partner = corruption.partner(rows.source)
    return CorruptionPlan(
        name=corruption.name,
        batch=rows,
        clean=Run(rows.clean_tokens),
        corrupt=Run(rows.rows_of(rows.source.clean_tokens[partner])),
        answers=rows.answers,
        counter_answers=rows.counter_answers,
        end_pos=rows.end_pos,
        positions=rows.positions,
    )


def by_prompt(values: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """Per-row values ``[..., rows]`` summed into prompts ``[..., n_prompts]`` and undone of the row
    scale, so each column is that prompt's own value (its whole answer) and their mean is the mean over
    rows. Rows stacked by an engine (Gaussian-noise samples) are averaged into their prompt."""
    rows = values.shape[-1]
    if prompt_index.shape[0] != rows:
        raise ValueError(f"{rows} values but {prompt_index.shape[0]} row indices")
    out = torch.zeros(*values.shape[:-1], n_prompts, dtype=values.dtype, device=values.device)
    out.index_add_(-1, prompt_index.to(values.device), values)
    return out * (n_prompts / rows)


def prompt_values(values: torch.Tensor, batch: TaskBatch, ctx: MetricContext) -> torch.Tensor:
    """A setup's per-row values ``[..., rows]`` as per-prompt values: :func:`by_prompt` for teacher-forced
    rows (``ctx``: the setup's context, whose ``prompt_index`` follows every stacked row), as they are
    otherwise."""
    if not isinstance(batch, AnswerRows) or ctx.prompt_index is None:
        return values
    return by_prompt(values, ctx.prompt_index, batch.n_prompts)


@dataclass
class AnswerScores:
    """Per prompt (``[prompts]``): ``answer`` = ``log p(a|x)``, ``counter`` = ``log p(b|x)`` (``-inf`` where a
    prompt has no counterfactual answer), ``greedy``: every answer token is the top token of its row (greedy
    decoding from the prompt gives the answer). Stacked copies of the rows (noise samples) are averaged."""

    answer: torch.Tensor
    counter: torch.Tensor
    greedy: torch.Tensor


def answer_scores(logits: torch.Tensor, ctx: MetricContext, n_prompts: int) -> AnswerScores:
    """:class:`AnswerScores` from the logits at each row's answer position (``[rows, vocab]``) and the rows'
    metric context (a setup's ``ctx``, or :meth:`AnswerRows.metric_context`)."""
    if ctx.prompt_index is None or SIGN not in ctx.extra:
        raise ValueError("answer_scores needs the metric context of teacher-forced rows")
    device = logits.device
    index, sign, answers = ctx.prompt_index.to(device), ctx.extra[SIGN].to(device), ctx.answers.to(device)
    copies = logits.shape[0] / round(float(ctx.extra[SCALE][0]) * n_prompts)  # stacked copies of the rows
    logprobs = logits.float().log_softmax(-1).gather(-1, answers[:, None])[:, 0]
    correct, wrong = sign > 0, sign < 0

    def total(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_prompts, device=device).index_add_(0, index[rows], values[rows].float())

    missed = total(correct, (logits.argmax(-1) != answers).float())
    has_counter = torch.zeros(n_prompts, dtype=torch.bool, device=device)
    has_counter[index[wrong]] = True
    counter = (total(wrong, logprobs) / copies).masked_fill(~has_counter, -torch.inf)
    return AnswerScores(total(correct, logprobs) / copies, counter, missed == 0)
