"""Multi-token answers and answer sets, scored by teacher forcing: one row per answer position.

Every engine reads the logits at one position per row (``end_pos``), so a prompt ``x`` whose answer is
``a = (a_1, ..., a_m)`` becomes rows before the engines see it: the row of ``x + a_<j`` has its answer
position at its last token and predicts ``a_j`` (teacher forcing, Williams & Zipser 1989: the model is
fed the true prefix, not its own guesses). By the chain rule ``log p(a|x) = sum_j log p(a_j | x, a_<j)``.
The corrupted row is the corrupted prompt plus the *same* prefix (lengths stay equal).

Two layouts (:func:`expand`):

* **chain** (every prompt has one correct answer ``a`` and at most one wrong answer ``b``): the rows
  ``x + a_<j -> a_j``, then ``x + b_<j -> b_j`` with sign -1, as before answer sets existed;
* **trie** (a prompt has a set ``R`` or ``R'`` of several answers): one row per distinct proper prefix
  of the answers of ``R u R'``, so a shared prefix is run once. Greater-than on a tokenizer that splits
  digits (Hanna et al. 2023 with SmolLM2 or Llama): ``R`` = the years above ``YY``, two tokens each, and
  the 100 years need 11 rows per prompt (the prompt, and the prompt plus each tens digit).

Metrics:

* ``logprob``: ``log sum_{r in R} p(r|x)`` (for one answer, ``log p(a|x)``);
* ``logprob_diff``: ``log sum_R p(r|x) - log sum_{R'} p(r'|x)``;
* ``logit_diff``: the mean over ``R`` of ``log p(r|x)`` minus the mean over ``R'`` (the single-token rule,
  mean logit of ``R`` minus mean logit of ``R'``, with the sequence's log-probability as its logit; for one
  answer each it is ``log p(a|x) - log p(b|x)``, and for one-token answers the logit difference itself);
* ``prob``: ``sum_R p(r|x)``; ``prob_diff``: ``sum_R p(r|x) - sum_{R'} p(r'|x)`` (Hanna et al.'s
  probability difference, exact for years of any number of tokens);
* ``kl``: ``-sum KL(clean || patched)`` over the prompt's rows (chain: the correct answer's positions;
  trie: every prefix row).

In the chain layout ``logprob``, ``logprob_diff``, ``logit_diff`` and ``kl`` add over rows
(:class:`TeacherForced`); every set metric (:class:`SequenceSetMetric`) combines a prompt's rows, so it
needs all of them in one pass: the engines never split a prompt's rows between passes
(:attr:`AnswerRows.split_points`). Engines average over rows, so each row's value is scaled by ``rows /
prompts`` (shared equally among a prompt's rows for a set metric): the mean over rows is the mean over
prompts of the per-prompt value. :func:`by_prompt` sums rows back into prompts (per-prompt EAP scores,
per-prompt patching values). A metric of one's own scores multi-token answers when it is a metric over
whole answers (:class:`~circuitfind.tasks.metrics.AnswerMetric`: it reads each prompt's answers'
``log p(r|x)``, :class:`AnswerSetMetric`); a metric of the logits is refused (it would see rows, not
prompts), as is IFR (:data:`REFUSED_ALGORITHMS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from circuitfind.errors import MetricError, TaskError
from circuitfind.tasks.batch import TaskBatch, prompt_origin
from circuitfind.tasks.corruptions import Corruption, CorruptionPlan, GaussianNoise, ResampleAblation, Run
from circuitfind.tasks.metrics import (
    AnswerMetric,
    Answers,
    LogitDiff,
    LogProb,
    LogProbDiff,
    Metric,
    MetricContext,
    NegKL,
    Probability,
    ProbDiff,
    extra_columns,
    get_metric,
)
from circuitfind.user_code import is_import_path

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# the per-row columns added to MetricContext.extra (a dataset column of the same name is refused)
SIGN = "answer_rows.sign"  # +1: a token of the correct answer, -1: of the counterfactual one
SCALE = "answer_rows.scale"  # rows / prompts, so the mean over rows is the mean over prompts
TOKEN = "answer_rows.token"  # j: the row predicts the answer's token j (0-based)
ROW = "answer_rows.row"  # the row's index in the AnswerRows batch (a stacked copy keeps its row's index)

# metric name -> (the exact built-in class, whether it reads the counterfactual rows)
SCORED: dict[str, tuple[type[Metric], bool]] = {
    "logprob": (LogProb, False),
    "logprob_diff": (LogProbDiff, True),
    "logit_diff": (LogitDiff, True),
    "kl": (NegKL, False),
    "prob": (Probability, False),
    "prob_diff": (ProbDiff, True),
}
# the metrics undefined for a prompt with no wrong answer (log of an empty mass, mean of an empty set)
NEEDS_WRONG = ("logprob_diff", "logit_diff")
# the metrics that add over rows in the chain layout (the others combine a prompt's rows)
ROW_SUMS = ("logprob", "logprob_diff", "logit_diff", "kl")

# a row: (prompt, answer position j, sign, prefix = the answer's first j tokens, target token)
Row = tuple[int, int, int, list[int], int]
# an answer: (prompt, correct = in R, the rows predicting its tokens, its tokens)
Answer = tuple[int, bool, list[int], list[int]]

REFUSED_ALGORITHMS = {
    "ifr": "IFR scores the routes of the clean run's predictions without a metric, so it cannot weigh the "
    "correct answer's tokens against the counterfactual rows",
}


@dataclass
class SequenceTable:
    """Where each answer's tokens are predicted: token ``j`` of answer ``s`` is predicted by row
    ``rows[s, j]`` as ``tokens[s, j]`` (``mask`` marks real entries of the padded ``[answers, L]``
    tables). ``row_prompt`` (``[rows]``) is each row's prompt and ``n_rows`` (``[prompts]``) counts each
    prompt's rows; ``members`` / ``member_mask`` (``[prompts, k]``) list each prompt's answers, correct
    ones first, and ``n_correct`` (``[prompts]``) counts the correct ones."""

    rows: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    row_prompt: torch.Tensor
    n_rows: torch.Tensor
    members: torch.Tensor
    member_mask: torch.Tensor
    n_correct: torch.Tensor

    @classmethod
    def build(cls, answers: list[Answer], row_prompt: list[int], device) -> SequenceTable:
        """From ``(prompt, correct, rows, tokens)`` per answer, in prompt order, correct answers first."""
        width = max(len(t) for _, _, _, t in answers)
        n_prompts = max(row_prompt) + 1
        rows = torch.zeros(len(answers), width, dtype=torch.long)
        tokens = torch.zeros(len(answers), width, dtype=torch.long)
        mask = torch.zeros(len(answers), width, dtype=torch.bool)
        per_prompt: list[list[int]] = [[] for _ in range(n_prompts)]
        n_correct = [0] * n_prompts
        for s, (i, correct, r, t) in enumerate(answers):
            rows[s, : len(r)], tokens[s, : len(t)], mask[s, : len(t)] = torch.tensor(r), torch.tensor(t), True
            per_prompt[i].append(s)
            n_correct[i] += correct
        members = torch.zeros(n_prompts, max(len(m) for m in per_prompt), dtype=torch.long)
        member_mask = torch.zeros_like(members, dtype=torch.bool)
        for i, m in enumerate(per_prompt):
            members[i, : len(m)], member_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long), True
        row_of = torch.tensor(row_prompt)
        return cls(
            rows.to(device),
            tokens.to(device),
            mask.to(device),
            row_of.to(device),
            torch.bincount(row_of, minlength=n_prompts).to(device),
            members.to(device),
            member_mask.to(device),
            torch.tensor(n_correct, device=device),
        )

    def to(self, device) -> SequenceTable:
        if self.rows.device == torch.device(device):
            return self
        return SequenceTable(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prompts, k]`` masks of each prompt's correct and wrong answers among its :attr:`members`."""
        rank = torch.arange(self.members.shape[1], device=self.members.device)[None, :]
        correct = self.member_mask & (rank < self.n_correct[:, None])
        return correct, self.member_mask & ~correct


@dataclass
class Passes:
    """The teacher-forced rows of one metric call, matched to the prompts they belong to.

    The stacked rows of a call (candidates x rows, noise samples x rows, a chunk of prompts) carry
    their row's index (:data:`ROW`); the ``k``-th stacked copy of a row is copy ``k`` (``copy``,
    ``[calls rows]``), and ``where[k, r]`` is the position of copy ``k`` of row ``r`` (-1: absent).
    ``present[k, i]``: copy ``k`` holds every row of prompt ``i``."""

    copy: torch.Tensor
    row: torch.Tensor
    where: torch.Tensor
    present: torch.Tensor

    @classmethod
    def of(cls, ctx: MetricContext, table: SequenceTable, device) -> Passes:
        row = ctx.extra[ROW].to(device)
        n, n_rows = row.shape[0], table.row_prompt.shape[0]
        order = torch.argsort(row, stable=True)
        ranked = row[order]
        copy = torch.empty_like(row)
        copy[order] = torch.arange(n, device=device) - torch.searchsorted(ranked, ranked)
        n_copies = int(copy.max()) + 1
        where = torch.full((n_copies, n_rows), -1, dtype=torch.long, device=device)
        where[copy, row] = torch.arange(n, device=device)
        n_prompts = table.members.shape[0]
        held = torch.zeros(n_copies, n_prompts, dtype=torch.long, device=device)
        held.index_add_(1, table.row_prompt, (where >= 0).long())
        split = (held > 0) & (held < table.n_rows)
        if split.any():
            i = int(split.nonzero()[0, 1])
            raise MetricError(
                f"prompt {i}'s teacher-forced rows were split between passes ({int(held[split][0])} of "
                f"{int(table.n_rows[i])} in one): a set metric needs all of a prompt's rows at once"
            )
        return cls(copy, row, where, held == table.n_rows)

    def answer_logprobs(self, logprobs: torch.Tensor, table: SequenceTable) -> torch.Tensor:
        """``[copies, answers]``: each answer's teacher-forced ``log p(answer | prompt)`` in each copy
        (meaningless where its prompt is not :attr:`present`)."""
        at = self.where[:, table.rows].clamp(min=0)  # [copies, S, L]
        token = logprobs[at, table.tokens.expand_as(at)]
        return token.masked_fill(~table.mask, 0.0).sum(-1)

    def answer_greedy(self, top: torch.Tensor, table: SequenceTable) -> torch.Tensor:
        """``[copies, answers]``: every token of the answer is the top token after its true prefix."""
        at = self.where[:, table.rows].clamp(min=0)
        return ((top[at] == table.tokens) | ~table.mask).all(-1)


@dataclass
class AnswerRows(TaskBatch):
    """A :class:`TaskBatch` of teacher-forced rows (see the module docstring).

    ``source`` is the batch of prompts; ``prompt_index``, ``token_index`` and ``sign`` (``[rows]``) say
    which prompt, which answer position and which answer (+1 correct, -1 counterfactual; +1 for every
    row of the trie layout) each row is; ``prefixes`` are the answer tokens each row appends to its
    prompt; ``sequences`` says which row predicts each answer token. ``prompts`` holds each row's
    :class:`~circuitfind.tasks.batch.Prompt` (repeated), so ``extra`` columns stay aligned."""

    source: TaskBatch | None = None
    prompt_index: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    sign: torch.Tensor | None = None
    prefixes: list[list[int]] | None = None
    pad_id: int = 0
    layout: str = "chain"
    sequences: SequenceTable | None = None

    @property
    def n_prompts(self) -> int:
        assert self.source is not None
        return self.source.size

    @property
    def split_points(self) -> list[int]:
        """The row indices where a pass over a slice of the rows may start: the first row of each
        prompt, so no pass splits a prompt's rows (a set metric combines them)."""
        assert self.prompt_index is not None
        index = self.prompt_index.tolist()
        return [r for r in range(len(index)) if r == 0 or index[r] != index[r - 1]]

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
        and the :data:`SIGN`, :data:`SCALE`, :data:`TOKEN` and :data:`ROW` columns that the metrics read."""
        assert self.sign is not None and self.token_index is not None and self.prompt_index is not None
        ctx = super().metric_context()
        clash = sorted({SIGN, SCALE, TOKEN, ROW} & set(ctx.extra))
        if clash:
            raise TaskError(f"task {self.task.name!r}: column {clash[0]!r} is reserved for multi-token answers")
        ctx.extra[SIGN] = self.sign.float()
        ctx.extra[SCALE] = torch.full_like(ctx.extra[SIGN], self.size / self.n_prompts)
        ctx.extra[TOKEN] = self.token_index
        ctx.extra[ROW] = torch.arange(self.size, device=self.sign.device)
        ctx.prompt_index = self.prompt_index
        return ctx


def _chain_rows(batch: TaskBatch) -> tuple[list[Row], list[Answer]]:
    """The chain layout's rows ``(prompt, token index, sign, prefix, target)`` and answers."""
    assert batch.answer_sequences is not None and batch.counter_sequences is not None
    rows: list[Row] = []
    answers: list[Answer] = []
    for i, (correct, wrong) in enumerate(zip(batch.answer_sequences, batch.counter_sequences, strict=True)):
        for sign, seqs in ((1, correct), (-1, wrong)):
            for seq in seqs:
                answers.append((i, sign > 0, list(range(len(rows), len(rows) + len(seq))), seq))
                rows.extend((i, j, sign, seq[:j], t) for j, t in enumerate(seq))
    return rows, answers


def _trie_rows(batch: TaskBatch) -> tuple[list[Row], list[Answer]]:
    """The trie layout's rows (one per distinct proper prefix of a prompt's answers) and answers."""
    assert batch.answer_sequences is not None and batch.counter_sequences is not None
    rows: list[Row] = []
    answers: list[Answer] = []
    for i, (correct, wrong) in enumerate(zip(batch.answer_sequences, batch.counter_sequences, strict=True)):
        prefix_row: dict[tuple[int, ...], int] = {}
        for correct_side, seqs in ((True, correct), (False, wrong)):
            for seq in map(tuple, seqs):
                at = []
                for j, t in enumerate(seq):
                    if seq[:j] not in prefix_row:
                        prefix_row[seq[:j]] = len(rows)
                        rows.append((i, j, 1, list(seq[:j]), t))
                    at.append(prefix_row[seq[:j]])
                answers.append((i, correct_side, at, list(seq)))
    return rows, answers


def _check_sequences(batch: TaskBatch) -> None:
    """Refuse the same answer tokens twice in a prompt's ``R u R'`` (in both sets, the metrics' comparison
    cancels), and an answer that begins another of its own set: ``p(" Mary")`` already holds the mass of
    ``" Mary and"``, so a set holding both would count it twice (a mass above 1). A correct answer may
    begin a wrong one (their difference is well defined)."""
    assert batch.answer_sequences is not None and batch.counter_sequences is not None
    for i, sides in enumerate(zip(batch.answer_sequences, batch.counter_sequences, strict=True)):
        where = prompt_origin(batch.task.name, i, batch.prompts[i])
        seqs = [tuple(s) for side in sides for s in side]
        if len(set(seqs)) < len(seqs):
            twice = next(s for j, s in enumerate(seqs) if s in seqs[:j])
            raise TaskError(
                f"{where}: two answers are the same tokens {list(twice)}; each answer must be once in R u R'"
            )
        for name, side in zip(("correct", "wrong"), sides, strict=True):
            known = {tuple(s) for s in side}
            for s in map(tuple, side):
                head = next((s[:j] for j in range(1, len(s)) if s[:j] in known), None)
                if head is not None:
                    raise TaskError(
                        f"{where}: {name} answer tokens {list(head)} begin {name} answer {list(s)}: the shorter "
                        "answer's probability already holds the longer one's, so a set cannot hold both"
                    )


def expand(model: TransformerBridge, batch: TaskBatch) -> AnswerRows:
    """The teacher-forced rows of a multi-token batch (``batch.answer_sequences`` set), in prompt order:
    the chain layout when every prompt has one correct and at most one wrong answer, else the trie
    layout (module docstring)."""
    if batch.answer_sequences is None:
        raise ValueError("expand needs a batch with multi-token answers (answer_tokens: multi)")
    if batch.counter_sequences is None:
        batch = dataclasses.replace(batch, counter_sequences=[[] for _ in batch.answer_sequences])
    assert batch.counter_sequences is not None
    chain = all(
        len(a) == 1 and len(b) <= 1 for a, b in zip(batch.answer_sequences, batch.counter_sequences, strict=True)
    )
    _check_sequences(batch)
    rows, answers = (_chain_rows if chain else _trie_rows)(batch)
    device = batch.clean_tokens.device
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
        layout="chain" if chain else "trie",
        sequences=SequenceTable.build(answers, [r[0] for r in rows], device),
    )
    out.clean_tokens = out.rows_of(batch.clean_tokens)
    out.corrupted_tokens = {v: out.rows_of(t) for v, t in batch.corrupted_tokens.items()}
    return out


class TeacherForced(Metric):
    """A metric that adds over rows (:data:`ROW_SUMS`): each row's token score times its sign and
    :data:`SCALE`, so the mean over rows is the mean over prompts of the whole answer's score."""

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


def whole_answers(logits: torch.Tensor, ctx: MetricContext, table: SequenceTable) -> tuple[torch.Tensor, Passes]:
    """``[copies, prompts, k]``: each prompt's answers' teacher-forced ``log p(r|x)`` (in the order of
    :attr:`SequenceTable.members`) in each stacked copy of the call's rows, and the call's :class:`Passes`."""
    passes = Passes.of(ctx, table, logits.device)
    return passes.answer_logprobs(logits.log_softmax(-1), table)[:, table.members], passes


def set_value(name: str, answer: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Metric ``name``'s rule (module docstring) over :func:`whole_answers` and the sides' masks."""

    def log_mass(side: torch.Tensor) -> torch.Tensor:
        return answer.masked_fill(~side, -torch.inf).logsumexp(-1)

    def mass(side: torch.Tensor) -> torch.Tensor:
        return (answer.exp() * side).sum(-1)

    def mean(side: torch.Tensor) -> torch.Tensor:
        return (answer * side).sum(-1) / side.sum(-1).clamp(min=1)

    rules = {
        "logprob": lambda: log_mass(correct),
        "logprob_diff": lambda: log_mass(correct) - log_mass(wrong),
        "logit_diff": lambda: mean(correct) - mean(wrong),
        "prob": lambda: mass(correct),
        "prob_diff": lambda: mass(correct) - mass(wrong),
    }
    return rules[name]()


class SequenceSetMetric(Metric):
    """A built-in metric over whole answers (module docstring: ``prob``, ``prob_diff``, and any metric of
    the trie layout but ``kl``): each prompt's value from its answers' teacher-forced log-probabilities,
    shared equally among its rows and scaled by :data:`SCALE`."""

    def __init__(self, inner: Metric, table: SequenceTable):
        self.inner = inner
        self.name = inner.name
        self.table = table

    def prompt_values(self, logits: torch.Tensor, ctx: MetricContext) -> tuple[torch.Tensor, Passes]:
        """``[copies, prompts]`` values of the call's rows (meaningless where a prompt is absent)."""
        table = self.table.to(logits.device)
        answer, passes = whole_answers(logits, ctx, table)
        return set_value(self.name, answer, *table.sides()), passes

    def score(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        values, passes = self.prompt_values(logits, ctx)
        table = self.table.to(logits.device)
        prompt = table.row_prompt[passes.row]
        return values[passes.copy, prompt] * ctx.extra[SCALE].to(logits.device) / table.n_rows[prompt]


def check_metric(task: str, metric: str | Metric) -> None:
    """Refuse a metric that cannot score a multi-token answer, naming the task and the metric: a metric
    over whole answers (:class:`~circuitfind.tasks.metrics.AnswerMetric`, also by import path) can."""
    if isinstance(metric, str) and is_import_path(metric):
        metric = get_metric(metric)
    if isinstance(metric, AnswerMetric):
        return
    name = metric if isinstance(metric, str) else metric.name
    known = SCORED.get(name)
    if known is None or (isinstance(metric, Metric) and type(metric) is not known[0]):
        raise TaskError(
            f"task {task!r} has multi-token answers (answer_tokens: multi), scored by their teacher-forced "
            f"log-probability: metric {name!r} cannot score them; use one of {', '.join(SCORED)}, or a metric "
            "over whole answers (circuitfind.tasks.metrics.answer_metric: per-prompt answer log-probabilities)"
        )


class AnswerSetMetric(SequenceSetMetric):
    """A metric of the user's over whole answers (:class:`~circuitfind.tasks.metrics.AnswerMetric`) on the
    rows: each prompt's answers' teacher-forced ``log p(r|x)`` (:func:`whole_answers`) and the prompts'
    dataset columns (``extra``, per prompt) go to its ``score_answers``; the value is shared among the
    prompt's rows as a built-in set metric's is."""

    def __init__(self, inner: AnswerMetric, table: SequenceTable, extra: dict):
        super().__init__(inner, table)
        self.answer_metric = inner
        self.extra = extra

    def prompt_values(self, logits: torch.Tensor, ctx: MetricContext) -> tuple[torch.Tensor, Passes]:
        table = self.table.to(logits.device)
        answer, passes = whole_answers(logits, ctx, table)
        copies, prompts, k = answer.shape
        correct, wrong = table.sides()
        extra = {
            c: v.to(logits.device).repeat(copies) if isinstance(v, torch.Tensor) else list(v) * copies
            for c, v in self.extra.items()
        }
        found = Answers(answer.reshape(copies * prompts, k), correct.repeat(copies, 1), wrong.repeat(copies, 1), extra)
        values = self.answer_metric.score_answers(found)
        if not isinstance(values, torch.Tensor) or values.shape != (copies * prompts,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise MetricError(
                f"metric {self.name!r} must return one value per prompt ({copies * prompts},), got {shape}"
            )
        return values.reshape(copies, prompts), passes


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


def wrap(metric: Metric, rows: AnswerRows) -> Metric:
    """``metric`` scored over ``rows`` (refused when it cannot be, or when it needs a counterfactual answer
    that a prompt lacks): :class:`TeacherForced` where it adds over rows, else :class:`SequenceSetMetric`."""
    if isinstance(metric, (TeacherForced, SequenceSetMetric)):
        return metric
    check_metric(rows.task.name, metric)
    assert rows.source is not None and rows.sequences is not None
    if isinstance(metric, AnswerMetric):
        device = rows.sequences.rows.device
        return AnswerSetMetric(
            metric, rows.sequences, extra_columns([dict(p.extra) for p in rows.source.prompts], device)
        )
    if metric.name in NEEDS_WRONG:
        missing = rows.sequences.n_correct == rows.sequences.member_mask.sum(-1)
        if missing.any():
            i = int(missing.nonzero()[0])
            raise TaskError(
                f"task {rows.task.name!r}, prompt {i} ({rows.source.prompts[i].text!r}) has no counterfactual "
                f"answer, which metric {metric.name!r} needs; give one or use logprob"
            )
    if metric.name == "kl" or (rows.layout == "chain" and metric.name in ROW_SUMS):
        return TeacherForced(metric)
    return SequenceSetMetric(metric, rows.sequences)


def corruption_plan(corruption: Corruption, model: TransformerBridge, rows: AnswerRows) -> CorruptionPlan:
    """The corruption's plan over the rows. Resample ablation pairs *prompts* (of equal token length), and
    each row's corrupted input is its partner's prompt plus the row's own answer prefix, so a row never
    borrows another answer's tokens. Gaussian noise is drawn per prompt (as for a single-token batch
    of the prompts) and every row of a prompt takes its prompt's draw, so a whole answer's probability
    is that of one noised input. The other corruptions work on the rows as they are."""
    assert rows.source is not None and rows.prompt_index is not None
    if isinstance(corruption, GaussianNoise):
        drawn = corruption.noise(model, rows.source)  # [samples * prompts, source pos, d_model]
        n = rows.n_prompts
        copy = torch.arange(corruption.samples, device=drawn.device)[:, None] * n
        pick = (copy + rows.prompt_index.to(drawn.device)[None, :]).flatten()
        noise = drawn.new_zeros(len(pick), rows.n_pos, drawn.shape[-1])
        noise[:, : drawn.shape[1]] = drawn[pick]  # zero on the answer prefix: no key token there
        return corruption.plan(model, rows, noise)
    if not isinstance(corruption, ResampleAblation):
        return corruption.plan(model, rows)
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
    """Per prompt (``[prompts]``), by the rules of the module docstring: ``logit_diff`` (mean ``log p`` of
    ``R`` minus that of ``R'``; 0 where a prompt has no wrong answer) and ``prob_diff``; ``best_answer`` /
    ``best_counter``: the largest ``log p(r|x)`` on each side (``-inf``: no wrong answer); ``greedy``:
    every token of some correct answer is the top token after its true prefix (greedy decoding gives
    that answer). Stacked copies of the rows (noise samples) are averaged (``greedy``: the fraction)."""

    logit_diff: torch.Tensor
    prob_diff: torch.Tensor
    best_answer: torch.Tensor
    best_counter: torch.Tensor
    greedy: torch.Tensor


def answer_scores(logits: torch.Tensor, ctx: MetricContext, rows: AnswerRows) -> AnswerScores:
    """:class:`AnswerScores` from the logits at each row's answer position (``[rows, vocab]``) and the rows'
    metric context (a setup's ``ctx``, or :meth:`AnswerRows.metric_context`); every prompt's rows must be
    present."""
    if rows.sequences is None or ROW not in ctx.extra:
        raise ValueError("answer_scores needs the metric context of teacher-forced rows")
    table = rows.sequences.to(logits.device)
    logits = logits.float()
    answer, passes = whole_answers(logits, ctx, table)
    if not passes.present.all():
        raise ValueError("answer_scores needs every prompt's rows")
    greedy = passes.answer_greedy(logits.argmax(-1), table)[:, table.members]
    correct, wrong = table.sides()
    return AnswerScores(
        torch.where(wrong.any(-1), set_value("logit_diff", answer, correct, wrong), 0.0).mean(0),
        set_value("prob_diff", answer, correct, wrong).mean(0),
        answer.masked_fill(~correct, -torch.inf).amax(-1).mean(0),
        answer.masked_fill(~wrong, -torch.inf).amax(-1).mean(0),
        (greedy & correct).any(-1).float().mean(0),
    )
