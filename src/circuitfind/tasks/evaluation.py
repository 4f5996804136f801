"""How well a model does a task: accuracy and the clean/corrupted metric baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from circuitfind.errors import TaskError
from circuitfind.patching import answer_logits, prepare
from circuitfind.tasks import multitoken
from circuitfind.tasks.batch import TaskBatch, continuation_ids, prompt_origin
from circuitfind.tasks.metrics import get_metric

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class TaskReport:
    """Clean accuracy and set metrics, and per-corruption baselines.

    With answer sets ``R`` (correct) and ``R'`` (wrong), by the rules of :mod:`circuitfind.tasks.metrics`:
    ``accuracy`` is top-1 over the vocabulary in ``R``; ``pair_accuracy`` is the best-scoring token of
    ``R u R'`` in ``R`` (its chance level, ``pair_chance``, is the mean of ``|R| / (|R| + |R'|)``, 0.5
    for one answer each); ``logit_diff`` is mean logit of ``R`` minus that of ``R'`` and ``prob_diff``
    the mass of ``R`` minus that of ``R'`` (both 0 at chance). A single answer is the set of one, which
    gives the single-answer numbers. With multi-token answers (``teacher_forced``) see
    :func:`evaluate_multitoken`."""

    task: str
    n_prompts: int
    accuracy: float
    pair_accuracy: float
    pair_chance: float
    logit_diff: float
    prob_diff: float
    corrupted: dict[str, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)  # default corruptions the task cannot take, and why
    teacher_forced: bool = False  # multi-token answers: each answer's log p(r|x) plays its logit's part
    warnings: list[str] = field(default_factory=list)  # answers the model does not make, corruptions that help

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        whole = " (answers scored whole, by teacher forcing: log p(r|x) in place of a logit)"
        lines = [
            f"task {self.task}: {self.n_prompts} prompts{whole if self.teacher_forced else ''}",
            f"  {'accuracy (greedy in R)' if self.teacher_forced else 'accuracy (top-1 in R)':<28}{self.accuracy:.3f}",
            f"  R vs R' accuracy            {self.pair_accuracy:.3f}   (chance {self.pair_chance:.3f})",
            f"  clean logit diff R - R'     {self.logit_diff:.3f}",
            f"  clean prob diff R - R'      {self.prob_diff:.3f}",
        ]
        kl = "KL(clean||corrupt) summed over the answer rows" if self.teacher_forced else "KL(clean||corrupt)"
        for name, row in self.corrupted.items():
            lines.append(
                f"  corrupted ({name:>10}) logit diff {row['logit_diff']:.3f}   prob diff {row['prob_diff']:.3f}"
                f"   {kl} {-row['kl']:.3f}"
            )
        lines += [f"  corrupted ({name:>10}) not run: {why}" for name, why in self.skipped.items()]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _pair_accuracy(logits: torch.Tensor, batch: TaskBatch) -> tuple[float, float]:
    """Fraction of prompts whose best token of ``R u R'`` is in ``R``, and its chance level."""
    ctx = batch.metric_context()
    ids, mask = ctx.correct()
    wids, wmask = ctx.wrong()
    best_r = logits.gather(1, ids).masked_fill(~mask, -torch.inf).amax(-1)
    best_w = logits.gather(1, wids).masked_fill(~wmask, -torch.inf).amax(-1)
    n_r, n_w = mask.sum(-1).float(), wmask.sum(-1).float()
    return (best_r > best_w).float().mean().item(), (n_r / (n_r + n_w)).mean().item()


DEFAULT_CORRUPTIONS = ("str", "gn", "mean", "resample")

# A first answer token the model gives less than this probability is one it almost never predicts there
# (a missing leading space, a capital, a label read as a token id); every answer below IMPOSSIBLE is refused.
RARE = 1e-4
IMPOSSIBLE = 1e-6
# An answer whose twin with its leading space added or removed is this many times as probable is warned.
TWIN_RATIO = 100.0


def _first_tokens(batch: TaskBatch) -> list[list[int]]:
    """Per prompt, the first token of each correct answer (the token predicted at the prompt's end)."""
    if batch.answer_sequences is not None:
        return [[seq[0] for seq in seqs] for seqs in batch.answer_sequences]
    assert batch.answer_sets is not None and batch.answer_mask is not None
    return [ids[mask].tolist() for ids, mask in zip(batch.answer_sets, batch.answer_mask, strict=True)]


def answer_checks(model: TransformerBridge, batch: TaskBatch, logits: torch.Tensor | None = None) -> list[str]:
    """Warnings about answers the model does not make, from its clean next-token distribution (``logits``
    ``[batch, vocab]`` at the answer position, else one clean pass): prompts where every correct answer's
    first token has probability below :data:`RARE`, and answers that look wrongly spaced
    (:func:`_spacing_warning`). A task whose every answer, on every prompt, has
    probability below :data:`IMPOSSIBLE` is refused (:class:`TaskError`): no metric can measure it."""
    if logits is None:
        with torch.no_grad():
            logits = answer_logits(model(batch.clean_tokens), batch.end_pos).float()
    probs = logits.float().softmax(-1)
    firsts = _first_tokens(batch)
    best = torch.stack([probs[i, ids].max() for i, ids in enumerate(firsts)])
    name = batch.task.name
    worst = int(best.argmin())
    example = (
        f"{prompt_origin(name, worst, batch.prompts[worst])}: {batch.prompts[worst].answer_set[0]!r} "
        f"starts with {model.tokenizer.convert_ids_to_tokens(firsts[worst][:1])[0]!r}, p = {best[worst].item():.1e}"
    )
    if (best < IMPOSSIBLE).all():
        raise TaskError(
            f"task {name!r}: the model gives every correct answer of every prompt probability below {IMPOSSIBLE:g} "
            f"(e.g. {example}): these are not continuations it makes, so no metric can measure the behaviour. "
            "Check the answers' leading spaces, capitals and (EAP-IG CSVs) whether correct_idx is a token id"
        )
    out = []
    rare = int((best < RARE).sum())
    if rare:
        out.append(
            f"in {rare} of {batch.size} prompts the model almost never predicts the correct answers' first token "
            f"(p < {RARE:g}; e.g. {example}): is a leading space missing or extra, or a capital wrong?"
        )
    spacing = _spacing_warning(model, batch, probs)
    return out + ([spacing] if spacing else [])


def _twin(answer: str) -> str:
    """The answer with its leading space added, or removed: ``"Rome"`` <-> ``" Rome"``."""
    return answer[1:] if answer[:1] == " " else " " + answer


def _spacing_warning(model: TransformerBridge, batch: TaskBatch, probs: torch.Tensor) -> str | None:
    """One warning naming how many correct answers look wrongly spaced, with the first as its example: the
    model gives the answer with its leading space added or removed (its twin) a first token at least
    :data:`TWIN_RATIO` times as probable (``"Rome"`` p = 8e-4 against ``" Rome"`` 0.48 on SmolLM2), or the
    answer is several tokens while its space-prefixed twin is one."""
    name, flagged, example = batch.task.name, 0, None
    for i, prompt in enumerate(batch.prompts):
        for answer in prompt.answer_set:
            twin = _twin(answer)
            try:
                ids, twin_ids = continuation_ids(model, prompt.text, answer), continuation_ids(model, prompt.text, twin)
            except TaskError:
                continue
            p, q = probs[i, ids[0]].item(), probs[i, twin_ids[0]].item()
            what = "missing" if twin[:1] == " " else "extra"
            if q >= TWIN_RATIO * max(p, 1e-30):
                why = f"{answer!r} starts with p = {p:.1e} where {twin!r} starts with p = {q:.2g}"
            elif what == "missing" and len(ids) > 1 and len(twin_ids) == 1:
                why = f"answer {answer!r} is {len(ids)} tokens but {twin!r} is one"
            else:
                continue
            flagged += 1
            if example is None:
                example = f"{prompt_origin(name, i, prompt)}: {why}: is the leading space {what}?"
    if example is None:
        return None
    return f"{flagged} correct answer(s) look wrongly spaced; e.g. {example}"


def _unsupported(batch: TaskBatch) -> dict[str, str]:
    """The default corruptions this task cannot take, and why: a dataset without key tokens (every MIB
    file) has no Gaussian-noise positions, one without corrupted prompts no STR."""
    out = {}
    if not batch.task.str_variants:
        out["str"] = "the task has no corrupted prompts"
    if not batch.task.key_tokens:
        out["gn"] = "the task has no key tokens"
    return out


def evaluate(model: TransformerBridge, batch: TaskBatch, corruptions: tuple[str, ...] | None = None) -> TaskReport:
    """Accuracy and set metrics of ``model`` on ``batch``, and the logit / probability difference and KL
    under each corruption (by default those of :data:`DEFAULT_CORRUPTIONS` the task can take; the others
    are listed in ``skipped``, so a keyless dataset is evaluated, not refused; multi-token answers:
    :func:`evaluate_multitoken`)."""
    skipped: dict[str, str] = {}
    if corruptions is None:
        skipped = _unsupported(batch)
        corruptions = tuple(c for c in DEFAULT_CORRUPTIONS if c not in skipped)
    if batch.answer_sequences is not None:
        report = evaluate_multitoken(model, batch, corruptions, skipped)
        report.warnings = answer_checks(model, batch) + _helping_corruptions(report)
        return report
    with torch.no_grad():
        logits = answer_logits(model(batch.clean_tokens), batch.end_pos).float()  # metrics in float32
    warnings = answer_checks(model, batch, logits)
    ctx = batch.metric_context()
    ids, mask = ctx.correct()
    top = logits.argmax(-1)
    accuracy = ((ids == top[:, None]) & mask).any(-1).float().mean().item()
    pair_accuracy, pair_chance = _pair_accuracy(logits, batch)
    diff = get_metric("logit_diff")(logits, ctx).mean().item()
    prob_diff = get_metric("prob_diff")(logits, ctx).mean().item()
    corrupted = {}
    for name in corruptions:
        setup = prepare(model, batch, name, "logit_diff")
        corrupted[name] = {
            "logit_diff": setup.corrupt_value,
            "prob_diff": setup.baselines("prob_diff")[1],
            "kl": setup.baselines("kl")[1],
        }
    report = TaskReport(
        batch.task.name, batch.size, accuracy, pair_accuracy, pair_chance, diff, prob_diff, corrupted, skipped
    )
    report.warnings = warnings + _helping_corruptions(report)
    return report


def _helping_corruptions(report: TaskReport) -> list[str]:
    """A corruption under which the task scores higher than clean: the corruption does not remove the
    behaviour, or the answers are not what the model does (a label read as a token id)."""
    return [
        f"the corrupted run ({name}) scores higher than the clean run (logit diff {row['logit_diff']:.3f} > "
        f"{report.logit_diff:.3f}): the corruption does not remove the behaviour, or the answers are not what the "
        "model predicts"
        for name, row in report.corrupted.items()
        if row["logit_diff"] > report.logit_diff
    ]


def evaluate_multitoken(
    model: TransformerBridge,
    batch: TaskBatch,
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS,
    skipped: dict[str, str] | None = None,
) -> TaskReport:
    """:func:`evaluate` for multi-token answers and answer sets, scored by teacher forcing
    (:mod:`circuitfind.tasks.multitoken`), each number by the single-token rule with ``log p(r|x)`` of the whole
    answer in place of a token's logit: ``accuracy`` is greedy decoding giving a correct answer (every
    token of one answer of ``R`` the top token after its true prefix); ``pair_accuracy``: the most
    probable answer of ``R u R'`` is in ``R`` (chance ``|R| / (|R| + |R'|)``); ``logit_diff`` is the mean
    ``log p(r|x)`` over ``R`` minus that over ``R'`` (``log p(a|x) - log p(b|x)`` for one answer each) and
    ``prob_diff`` ``sum_R p(r|x) - sum_{R'} p(r'|x)``; a prompt with no wrong answer counts ``R'`` as
    impossible in the pair accuracy (chance 1) and as ``R`` in the log difference (0)."""
    rows = multitoken.expand(model, batch)
    with torch.no_grad():
        logits = answer_logits(model(rows.clean_tokens), rows.end_pos).float()
    clean = multitoken.answer_scores(logits, rows.metric_context(), rows)
    assert rows.sequences is not None
    correct, wrong = rows.sequences.sides()
    n_r, n_w = correct.sum(-1).float(), wrong.sum(-1).float()
    corrupted = {}
    for name in corruptions:
        setup = prepare(model, batch, name, "logprob")
        assert setup.corrupt_logits is not None and isinstance(setup.batch, multitoken.AnswerRows)
        scores = multitoken.answer_scores(setup.corrupt_logits, setup.ctx, setup.batch)
        corrupted[name] = {
            "logit_diff": scores.logit_diff.mean().item(),
            "prob_diff": scores.prob_diff.mean().item(),
            "kl": setup.baselines("kl")[1],
        }
    return TaskReport(
        batch.task.name,
        batch.size,
        clean.greedy.mean().item(),
        (clean.best_answer > clean.best_counter).float().mean().item(),
        (n_r / (n_r + n_w)).mean().item(),
        clean.logit_diff.mean().item(),
        clean.prob_diff.mean().item(),
        corrupted,
        skipped or {},
        teacher_forced=True,
    )
