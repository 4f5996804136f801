"""Behaviour specifications (``tasks/*.json``) turned into prompts and tokenised batches.

A task spec is data: templates, word lists and the names of its symmetric-token-replacement (STR)
variants. :func:`generate_prompts` samples :class:`Prompt` objects from it (seeded), and
:meth:`TaskBatch.build` tokenises them for one model: clean tokens, the answer ``r``, the
counterfactual answer ``r'``, each STR variant's corrupted tokens and the position of every key
token. Prompts of different lengths are right-padded; metrics read the logits at ``end_pos``.
"""

from __future__ import annotations

import json
import numbers
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitfind import datasets
from circuitfind.errors import TaskError
from circuitfind.metrics import MetricContext, extra_columns, pad_answer_sets
from circuitfind.models import model_device
from circuitfind.paths import default_tasks_dir

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# The most prompts in one batch. Every patching run holds the whole batch (and its logits) in
# memory at once, so a larger batch exhausts memory long before it finishes; checked before any
# prompt is generated.
MAX_PROMPTS = 10_000
ANSWER_TOKENS = ("single", "multi")


@dataclass(frozen=True)
class TaskSpec:
    """A behaviour specification loaded from ``tasks/<name>.json``."""

    name: str
    kind: str
    data: Mapping[str, Any]

    @property
    def str_variants(self) -> list[str]:
        return list(self.data.get("corruptions", {}).get("str_variants", {}))

    @property
    def default_str(self) -> str:
        return self.data.get("corruptions", {}).get("str", self.str_variants[0])

    @property
    def key_tokens(self) -> list[str]:
        return list(self.data.get("key_tokens", []))

    @property
    def default_model(self) -> str | None:
        return self.data.get("default_model")

    @property
    def answer_tokens(self) -> str:
        """``single`` (every answer is one token, the default) or ``multi`` (answers may be several tokens)."""
        value = self.data.get("answer_tokens", "single")
        if value not in ANSWER_TOKENS:
            raise TaskError(f"task {self.name}: answer_tokens must be one of {ANSWER_TOKENS}, got {value!r}")
        return value


@dataclass(frozen=True)
class Prompt:
    """One clean prompt, its answers and its STR-corrupted versions.

    ``key_chars`` maps a key token name (``IO``, ``S1``, ...) to the character offset where that
    word starts in ``text``; it becomes a token position when the prompt is tokenised.
    ``key_spans`` maps a multi-token key (``subject``) to its character range. A corrupted text of
    ``None`` is chosen when the batch is tokenised (it depends on the tokenizer).

    ``answer`` and ``counter_answer`` are the first answer of each side; ``answers`` and
    ``counter_answers`` hold whole answer sets where a behaviour has several correct or wrong
    continuations (empty means the set of that one answer). ``extra`` carries a dataset row's other
    columns, for metrics that need per-prompt data.
    """

    text: str
    answer: str
    counter_answer: str
    corrupted: Mapping[str, str | None]
    key_chars: Mapping[str, int]
    template: int = 0
    key_spans: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    counter_answers: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # an offset outside the text would silently become some other token's position when tokenised
        for name, at in self.key_chars.items():
            if isinstance(at, bool) or not isinstance(at, numbers.Integral) or not 0 <= at < len(self.text):
                raise TaskError(
                    f"Prompt key_chars[{name!r}] must be a character offset in 0..{len(self.text) - 1} "
                    f"of the prompt's text, got {at!r}"
                )

    @property
    def answer_set(self) -> tuple[str, ...]:
        """Every correct answer (``answers``, or just ``answer``)."""
        return self.answers or (self.answer,)

    @property
    def counter_answer_set(self) -> tuple[str, ...]:
        """Every wrong (counterfactual) answer (``counter_answers``, or just ``counter_answer``)."""
        return self.counter_answers or ((self.counter_answer,) if self.counter_answer else ())


def tasks_dir() -> Path:
    """Where task specs are looked up: ``$CIRCUITFIND_TASKS_DIR``, else the checkout's ``tasks/`` (the copy in
    the package when installed from a wheel)."""
    return Path(os.environ.get("CIRCUITFIND_TASKS_DIR") or default_tasks_dir())


def available_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.json"))


def load_task(name_or_path: str | os.PathLike) -> TaskSpec:
    """Load a task spec by name (``ioi``) or by path to a JSON file."""
    path = Path(name_or_path)
    if datasets.is_dataset_file(path):  # a .jsonl/.csv/auto-circuit file of prompt pairs, or a spec pointing at one
        return TaskSpec(**datasets.dataset_spec(path))
    if not path.is_file():
        path = tasks_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise TaskError(
            f"unknown task {str(name_or_path)!r}: no such file and not one of {available_tasks()} in {tasks_dir()}"
        )
    data = json.loads(path.read_text())
    kind = data.get("kind")
    if kind not in GENERATORS:
        raise TaskError(f"task {path.name}: kind {kind!r} is not one of {sorted(GENERATORS)}")
    return TaskSpec(name=data.get("name", path.stem), kind=kind, data=data)


# --------------------------------------------------------------------------------------------
# Prompt generators, one per task kind


def _fill(template: str, values: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """Replace ``[KEY]`` placeholders; return the text and each placeholder's character offset."""
    out, offsets, last = [], {}, 0
    for match in re.finditer(r"\[([A-Z]+)\]", template):
        out.append(template[last : match.start()])
        offsets[match.group(1)] = sum(len(s) for s in out)
        out.append(values[match.group(1)])
        last = match.end()
    out.append(template[last:])
    return "".join(out), offsets


def _ioi_prompts(spec: TaskSpec, n: int, rng: random.Random) -> list[Prompt]:
    d = spec.data
    names, templates = list(d["names"]), list(d["templates"])
    prompts = []
    for i in range(n):
        t = rng.randrange(len(templates))
        io, s, a, b, c = rng.sample(names, 5)
        place, obj = rng.choice(d["places"]), rng.choice(d["objects"])
        abba = i % 2 == 0
        x, y = (io, s) if abba else (s, io)
        base = {"PLACE": place, "OBJECT": obj}
        text, off = _fill(templates[t], {**base, "X": x, "Y": y, "S": s})
        corrupted = {
            "s2_io": _fill(templates[t], {**base, "X": x, "Y": y, "S": io})[0],
            "abc": _fill(templates[t], {**base, "X": a, "Y": b, "S": c})[0],
            "s1_io": _fill(templates[t], {**base, "X": a, "Y": b, "S": s})[0],
        }
        keys = {"IO": off["X"] if abba else off["Y"], "S1": off["Y"] if abba else off["X"], "S2": off["S"]}
        prompts.append(Prompt(text, " " + io, " " + s, corrupted, keys, t))
    return prompts


def _induction_prompts(spec: TaskSpec, n: int, rng: random.Random) -> list[Prompt]:
    d = spec.data
    vocab = list(d["vocab"])
    prompts = []
    for _ in range(n):
        length = rng.randint(d["min_length"], d["max_length"])
        seq = rng.sample(vocab, length + 1)
        prompts.append(induction_prompt(seq[:-1], seq[-1], rng.randint(1, length - 1)))
    return prompts


def induction_prompt(seq: list[str], spare: str, k: int) -> Prompt:
    """``seq`` then its first ``k`` words again: the answer is ``seq[k]``; the ``swap_next`` corruption
    puts ``spare`` (a word not in ``seq``) where the answer's first occurrence was."""
    words = seq + seq[:k]
    swapped = list(words)
    swapped[k] = spare
    starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
    keys = {"A": starts[k - 1], "B": starts[k], "A2": starts[-1]}
    return Prompt(" ".join(words), " " + seq[k], " " + spare, {"swap_next": " ".join(swapped)}, keys, len(seq))


def _factual_prompts(spec: TaskSpec, n: int, rng: random.Random) -> list[Prompt]:
    d = spec.data
    prompts = []
    for _ in range(n):
        subject, answer = rng.choice(d["facts"])
        t = rng.randrange(len(d["templates"]))
        text, off = _fill(d["templates"][t], {"SUBJECT": subject})
        start, end = off["SUBJECT"], off["SUBJECT"] + len(subject)
        last_word = start + subject.rfind(" ") + 1
        prompts.append(
            Prompt(
                text,
                " " + answer,
                "",
                {"subject_swap": None},
                {"subject_last": last_word},
                t,
                {"subject": (start, end)},
            )
        )
    return prompts


def _subject_swaps(model, spec: TaskSpec, prompts: list[Prompt]) -> list[Prompt]:
    """Fill each factual prompt's STR corruption: another subject with the same token length (in
    this tokenizer) and a different answer, whose answer becomes the counterfactual ``r'``."""
    facts = list(spec.data["facts"])

    def n_tokens(subject: str) -> int:
        return len(model.tokenizer(" " + subject, add_special_tokens=False)["input_ids"])

    lengths = {subject: n_tokens(subject) for subject, _ in facts}
    template = spec.data["templates"]
    out = []
    for p in prompts:
        if p.corrupted.get("subject_swap") is not None:
            out.append(p)
            continue
        start, end = p.key_spans["subject"]
        subject = p.text[start:end]
        partners = [(s, a) for s, a in facts if " " + a != p.answer and lengths[s] == lengths[subject]]
        if not partners:
            raise TaskError(
                f"no other subject has the token length of {subject!r} ({lengths[subject]} tokens) "
                f"for this tokenizer: add facts to {spec.name}.json"
            )
        other, other_answer = partners[hash_index(subject, len(partners))]
        corrupted = _fill(template[p.template], {"SUBJECT": other})[0]
        out.append(
            Prompt(
                p.text, p.answer, " " + other_answer, {"subject_swap": corrupted}, p.key_chars, p.template, p.key_spans
            )
        )
    return out


def hash_index(text: str, n: int) -> int:
    """A deterministic index in ``range(n)`` from a string (Python's hash() is salted per process)."""
    return sum(ord(c) * 31**i for i, c in enumerate(text)) % n


def _dataset_prompts(spec: TaskSpec, n: int, rng: random.Random) -> list[Prompt]:
    """The first ``n`` rows of a dataset file, or a sample seeded from ``rng`` (:mod:`circuitfind.datasets`)."""
    rows = datasets.read_rows(spec.data["file"], n, sample=spec.data["sample"], seed=rng.randrange(2**32))
    return [Prompt(**row.prompt_fields(spec.data["file"])) for row in rows]


GENERATORS: dict[str, Callable[[TaskSpec, int, random.Random], list[Prompt]]] = {
    "dataset": _dataset_prompts,
    "ioi": _ioi_prompts,
    "induction": _induction_prompts,
    "factual": _factual_prompts,
}


def check_prompt_count(n: int) -> int:
    """``n`` prompts must be a whole number from 1 to :data:`MAX_PROMPTS`."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TaskError(f"the number of prompts must be a whole number, got {n!r}")
    if n < 1:
        raise TaskError(f"need at least one prompt, got n={n}")
    if n > MAX_PROMPTS:
        raise TaskError(
            f"n={n} prompts is too many: at most {MAX_PROMPTS} prompts in one batch "
            f"(circuitfind.tasks.MAX_PROMPTS; every patching run holds the whole batch in memory)"
        )
    return int(n)


def generate_prompts(spec: TaskSpec | str, n: int, seed: int = 0) -> list[Prompt]:
    """Sample ``n`` prompts (1 to :data:`MAX_PROMPTS`) from a task spec, deterministically for a given seed."""
    check_prompt_count(n)
    if isinstance(spec, str):
        spec = load_task(spec)
    return GENERATORS[spec.kind](spec, n, random.Random(seed))


# --------------------------------------------------------------------------------------------
# Tokenisation


def _bos_ids(tokenizer, model) -> list[int]:
    prepend = getattr(model.cfg, "default_prepend_bos", True)
    return [tokenizer.bos_token_id] if prepend and tokenizer.bos_token_id is not None else []


def encode(model: TransformerBridge, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (BOS prepended where the model expects one)."""
    tok = model.tokenizer
    return _bos_ids(tok, model) + tok(text, add_special_tokens=False)["input_ids"]


def continuation_ids(model: TransformerBridge, prompt: str, answer: str) -> list[int]:
    """The token ids of ``answer`` as the continuation of ``prompt``: ``prompt + answer`` tokenised, minus
    the prompt's tokens (no space added or dropped; a shipped task's answers carry their own leading space)."""
    tok = model.tokenizer
    if not answer:
        raise TaskError(f"prompt {prompt!r}: the answer is empty")
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    if not full or (prompt and not head):
        raise TaskError(
            f"the tokenizer gives no tokens for {prompt + answer!r}: its files are missing or broken "
            "(fetch the model again: circuitfind fetch)"
        )
    if full[: len(head)] != head or len(full) == len(head):
        raise TaskError(
            f"prompt {prompt!r}: answer {answer!r} does not start at a token boundary (this tokenizer merges it "
            f"with the prompt's last token); move the boundary, e.g. end the prompt before a space"
        )
    return full[len(head) :]


def single_token_id(model: TransformerBridge, word: str, prompt: str = "") -> int:
    """The id of ``word`` as the one-token continuation of ``prompt``; error if it is not one token.

    With no prompt the word is tokenised on its own (give it its leading space, ``" Mary"``)."""
    tok = model.tokenizer
    if prompt:
        ids = continuation_ids(model, prompt, word)
    else:
        if not word:
            raise TaskError("the answer is empty")
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TaskError(
                f"the tokenizer gives no tokens for {word!r}: its files are missing or broken "
                "(fetch the model again: circuitfind fetch)"
            )
    where = f"prompt {prompt!r}: " if prompt else ""
    if len(ids) == 1 and ids[0] == tok.unk_token_id and word.strip() != tok.unk_token:
        raise TaskError(f"{where}answer {word!r} is not in this model's vocabulary (it maps to the unknown token)")
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise TaskError(
            f"{where}answer {word!r} is {len(ids)} tokens {pieces} for this tokenizer; answers must be a "
            f'single token (or declare "answer_tokens": "multi" in the task). Choose single-token answers '
            f"for this model."
        )
    return ids[0]


def _key_positions(model, prompt: Prompt, n_bos: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Token positions of the single-token keys, and of every token of each multi-token span."""
    text = prompt.text
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    positions = {}
    for name, char in prompt.key_chars.items():
        idx = next((i for i, (_, end) in enumerate(offsets) if end > char), None)
        if idx is None:
            raise TaskError(f"key token {name!r} at character {char} not found in {text!r}")
        positions[name] = n_bos + idx
    spans = {}
    for name, (lo, hi) in prompt.key_spans.items():
        spans[name] = [n_bos + i for i, (a, b) in enumerate(offsets) if b > lo and a < hi]
        if not spans[name]:
            raise TaskError(f"key span {name!r} ({text[lo:hi]!r}) has no tokens in {text!r}")
    return positions, spans


@dataclass
class TaskBatch:
    """A tokenised batch of prompts for one model.

    Attributes:
        clean_tokens: ``[batch, pos]`` right-padded clean prompts.
        corrupted_tokens: STR variant name -> ``[batch, pos]`` corrupted prompts (same lengths).
        answers: ``[batch]`` token id of the correct answer ``r``.
        counter_answers: ``[batch]`` token id of the counterfactual answer ``r'``.
        end_pos: ``[batch]`` index of the last real token (where the answer is predicted).
        positions: key token name -> ``[batch]`` positions (``end`` is always present).
        mask: ``[batch, pos]`` True on real (non-padding) tokens.
        spans: multi-token key name (``subject``) -> ``[batch, pos]`` bool mask of its tokens.
        answer_sets / answer_mask: ``[batch, k]`` ids of every correct answer (0-padded) and the mask of
            real entries; ``counter_sets`` / ``counter_mask`` likewise for the wrong answers.
        answer_sequences: with ``answer_tokens: multi``, each prompt's first answer as its token ids
            (``answers`` then holds their first tokens); ``None`` for single-token tasks.
    """

    task: TaskSpec
    prompts: list[Prompt]
    clean_tokens: torch.Tensor
    corrupted_tokens: dict[str, torch.Tensor]
    answers: torch.Tensor
    counter_answers: torch.Tensor
    end_pos: torch.Tensor
    positions: dict[str, torch.Tensor]
    mask: torch.Tensor
    spans: dict[str, torch.Tensor] = field(default_factory=dict)
    answer_sets: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None
    counter_sets: torch.Tensor | None = None
    counter_mask: torch.Tensor | None = None
    answer_sequences: list[list[int]] | None = None

    @property
    def size(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    def corrupted(self, variant: str | None = None) -> torch.Tensor:
        variant = variant or self.task.default_str
        if variant not in self.corrupted_tokens:
            raise TaskError(
                f"task {self.task.name!r} has no STR variant {variant!r}; choose from {list(self.corrupted_tokens)}"
            )
        return self.corrupted_tokens[variant]

    @classmethod
    def build(
        cls, model: TransformerBridge, task: TaskSpec | str, prompts: Sequence[Prompt] | int, seed: int = 0
    ) -> TaskBatch:
        """Tokenise ``prompts`` (or sample that many, at most :data:`MAX_PROMPTS`) for ``model``,
        checking STR lengths and answers."""
        if isinstance(task, str):
            task = load_task(task)
        if isinstance(prompts, numbers.Integral):
            # checked before any conversion: int(True) would quietly be one prompt
            prompts = generate_prompts(task, check_prompt_count(prompts), seed)  # type: ignore[arg-type]
        prompts = list(prompts)  # type: ignore[arg-type]  # mypy does not narrow Sequence | int by Integral
        if not prompts:
            raise TaskError("cannot build a batch from zero prompts")
        check_prompt_count(len(prompts))
        if task.kind == "factual":
            prompts = _subject_swaps(model, task, prompts)
        if task.kind == "dataset":  # token-id answers decoded; unequal clean/corrupted lengths refused or dropped
            prompts = datasets.resolve_for_model(task.data, prompts, lambda t: encode(model, t), model.tokenizer)
        tok = model.tokenizer
        n_bos = len(_bos_ids(tok, model))
        clean = [encode(model, p.text) for p in prompts]
        variants = list(prompts[0].corrupted)
        corrupted = {v: [encode(model, p.corrupted[v]) for p in prompts] for v in variants}
        for v, rows in corrupted.items():
            for i, (c, x) in enumerate(zip(clean, rows, strict=True)):
                if len(c) != len(x):
                    raise TaskError(
                        f"STR variant {v!r}, prompt {i}: clean and corrupted prompts have different "
                        f"token lengths ({len(c)} vs {len(x)}): {prompts[i].text!r} vs "
                        f"{prompts[i].corrupted[v]!r}. Symmetric token replacement needs equal lengths."
                    )
        multi = task.answer_tokens == "multi"
        sequences = None
        if multi:
            sequences = [continuation_ids(model, p.text, p.answer_set[0]) for p in prompts]
            answer_sets = [[seq[0]] for seq in sequences]
            counter_sets = [[continuation_ids(model, p.text, a)[0] for a in p.counter_answer_set] for p in prompts]
        else:
            answer_sets = [[single_token_id(model, a, p.text) for a in p.answer_set] for p in prompts]
            counter_sets = [[single_token_id(model, a, p.text) for a in p.counter_answer_set] for p in prompts]
        answers = [ids[0] for ids in answer_sets]
        counters = [ids[0] if ids else answers[i] for i, ids in enumerate(counter_sets)]
        positions, spans = zip(*[_key_positions(model, p, n_bos) for p in prompts], strict=True)
        n_pos = max(len(c) for c in clean)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        device = model_device(model)

        def pad_rows(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor([r + [pad] * (n_pos - len(r)) for r in rows], dtype=torch.long, device=device)

        lengths = torch.tensor([len(c) for c in clean], device=device)
        key_pos = {k: torch.tensor([p[k] for p in positions], device=device) for k in positions[0]}
        key_pos["end"] = lengths - 1
        span_masks = {}
        for name in spans[0]:
            span_masks[name] = torch.zeros(len(prompts), n_pos, dtype=torch.bool, device=device)
            for i, row in enumerate(spans):
                span_masks[name][i, row[name]] = True
        return cls(
            task=task,
            prompts=prompts,
            clean_tokens=pad_rows(clean),
            corrupted_tokens={v: pad_rows(rows) for v, rows in corrupted.items()},
            answers=torch.tensor(answers, device=device),
            counter_answers=torch.tensor(counters, device=device),
            end_pos=lengths - 1,
            positions=key_pos,
            mask=torch.arange(n_pos, device=device)[None, :] < lengths[:, None],
            spans=span_masks,
            answer_sets=pad_answer_sets(answer_sets, device)[0],
            answer_mask=pad_answer_sets(answer_sets, device)[1],
            counter_sets=pad_answer_sets(counter_sets, device)[0],
            counter_mask=pad_answer_sets(counter_sets, device)[1],
            answer_sequences=sequences,
        )

    @classmethod
    def from_prompts(
        cls, model: TransformerBridge, prompts: Sequence[Prompt], name: str = "custom", **data
    ) -> TaskBatch:
        """A batch from :class:`Prompt` objects made in Python, with no spec file.

        ``data`` becomes the task's spec data (e.g. ``key_tokens=[...]``, ``answer_tokens="multi"``); the
        STR variants are the prompts' ``corrupted`` keys, the first being the default corruption."""
        prompts = list(prompts)
        if not prompts:
            raise TaskError("cannot build a batch from zero prompts")
        variants = list(prompts[0].corrupted)
        for i, p in enumerate(prompts):
            if list(p.corrupted) != variants:
                raise TaskError(f"prompt {i} ({p.text!r}) has corruptions {list(p.corrupted)}, prompt 0 has {variants}")
            missing = [v for v, text in p.corrupted.items() if text is None]
            if missing:
                raise TaskError(f"prompt {i} ({p.text!r}): corrupted text of {missing} is None; give the text")
        corruptions: dict[str, Any] = {"str_variants": {v: v for v in variants}}
        if variants:
            corruptions["str"] = variants[0]
        spec = TaskSpec(name=name, kind="python", data={"name": name, "corruptions": corruptions, **data})
        return cls.build(model, spec, prompts)

    def metric_context(self) -> MetricContext:
        """The metric context of this batch: answers, answer sets and the prompts' ``extra`` columns."""
        device = self.answers.device
        ctx = MetricContext(
            self.answers,
            self.counter_answers,
            answer_sets=self.answer_sets,
            answer_mask=self.answer_mask,
            counter_sets=self.counter_sets,
            counter_mask=self.counter_mask,
            extra=extra_columns([dict(p.extra) for p in self.prompts], device),
            prompt_index=torch.arange(self.size, device=device),
        )
        return ctx

    def key_position_mask(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """``[batch, pos]`` bool mask of the named key tokens (all task key tokens by default)."""
        names = list(names) if names is not None else self.task.key_tokens
        out = torch.zeros_like(self.mask)
        rows = torch.arange(self.size, device=self.mask.device)
        for name in names:
            if name in self.spans:
                out |= self.spans[name]
            elif name in self.positions:
                out[rows, self.positions[name]] = True
            else:
                raise TaskError(
                    f"unknown key token {name!r}; task {self.task.name!r} has {list(self.positions) + list(self.spans)}"
                )
        return out
