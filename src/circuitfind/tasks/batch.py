"""Behaviour specifications (``tasks/*.json``) turned into prompts and tokenised batches.

A task spec is data: templates, word lists and the names of its symmetric-token-replacement (STR)
variants. :func:`generate_prompts` samples :class:`Prompt` objects from it (seeded), and
:meth:`TaskBatch.build` tokenises them for one model: clean tokens, the answer ``r``, the
counterfactual answer ``r'``, each STR variant's corrupted tokens and the position of every key
token. Prompts of different lengths are right-padded; metrics read the logits at ``end_pos``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitfind.errors import TaskError
from circuitfind.paths import default_tasks_dir
from circuitfind.tasks import datasets
from circuitfind.tasks.metrics import MetricContext, extra_columns, pad_answer_sets

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
        """The STR variant used when none is named: the spec's ``corruptions.str``, else its first variant.

        A task with no STR variants (e.g. Python prompts with no corrupted texts) has none; asking for one
        is a :class:`TaskError` that says to use Gaussian noise instead, not a bare ``IndexError``."""
        corruptions = self.data.get("corruptions", {})
        if "str" in corruptions:
            return corruptions["str"]
        variants = self.str_variants
        if not variants:
            raise TaskError(
                f"task {self.name!r} has no STR variants (no corrupted prompts), so it cannot be STR-corrupted; "
                "give each prompt a corrupted text or use the Gaussian-noise corruption (gn)"
            )
        return variants[0]

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


def tasks_dirs() -> list[Path]:
    """Where task specs are looked up, first match winning: ``$CIRCUITFIND_TASKS_DIR`` (if set), then the
    shipped ``tasks/`` (the copy in the package when installed from a wheel). A user's folder adds to the
    shipped tasks; its spec wins on a name clash."""
    extra = os.environ.get("CIRCUITFIND_TASKS_DIR")
    shipped = Path(default_tasks_dir())
    return [Path(extra), shipped] if extra and Path(extra).resolve() != shipped.resolve() else [shipped]


def tasks_dir() -> Path:
    """The first folder of :func:`tasks_dirs` (``$CIRCUITFIND_TASKS_DIR`` if set, else the shipped one)."""
    return tasks_dirs()[0]


def task_files() -> dict[str, Path]:
    """Task name -> spec file, over :func:`tasks_dirs` (earlier folders win on a name clash)."""
    found: dict[str, Path] = {}
    for folder in reversed(tasks_dirs()):
        found.update({p.stem: p for p in folder.glob("*.json")})
    return dict(sorted(found.items()))


def available_tasks() -> list[str]:
    return list(task_files())


def task_problems() -> dict[str, str | None]:
    """Task name -> why its spec is invalid (``None`` when it loads): for ``circuitfind tasks``."""
    out: dict[str, str | None] = {}
    for name, path in task_files().items():
        try:
            load_task(path)
            out[name] = None
        except TaskError as err:
            out[name] = str(err)
    return out


def load_task(name_or_path: str | os.PathLike) -> TaskSpec:
    """Load a task spec by name (``ioi``) or by path to a JSON file, and check it against its kind's
    schema, so a bad spec is a :class:`TaskError` naming the file (and line) before anything runs."""
    path = Path(name_or_path)
    datasets.check_regular_file(path)
    if datasets.is_dataset_file(path):  # a .jsonl/.csv/auto-circuit file of prompt pairs, or a spec pointing at one
        return TaskSpec(**datasets.dataset_spec(path))
    if not path.is_file():
        path = task_files().get(str(name_or_path), Path(f"{name_or_path}.json"))
    if not path.is_file():
        raise TaskError(
            f"unknown task {str(name_or_path)!r}: no such file and not one of {available_tasks()} in "
            f"{', '.join(map(str, tasks_dirs()))}"
        )
    text = datasets.read_small_text(path)
    data = datasets.parse_json(path, text)
    check_spec(data, path, text)
    return TaskSpec(name=data.get("name", path.stem), kind=data["kind"], data=data)


# --------------------------------------------------------------------------------------------
# Spec validation


def _where(path: Path, text: str, key: str | None) -> str:
    """``FILE:LINE`` of the first ``"key":`` in the spec's text (``FILE`` alone when not found)."""
    if key is not None:
        match = re.search(r'"' + re.escape(key) + r'"\s*:', text)
        if match:
            return f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
    return str(path)


_SLOT = re.compile(r"\[([A-Za-z_][A-Za-z0-9_]*)\]")


class _Checker:
    """Type checks of a spec's fields, each failure a TaskError naming the file, line and key."""

    def __init__(self, data: Any, path: Path, text: str) -> None:
        self.data, self.path, self.text = data, path, text

    def fail(self, key: str | None, message: str) -> TaskError:
        return TaskError(f"{_where(self.path, self.text, key)}: {message}")

    def get(self, key: str, types: type | tuple[type, ...], what: str, required: bool = True, within=None) -> Any:
        obj = self.data if within is None else within
        if key not in obj:
            if required:
                raise self.fail(None, f"missing key {key!r} ({what})")
            return None
        value = obj[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
            raise self.fail(key, f"{key!r} must be {what}, got {type(value).__name__} {_short(value)}")
        return value

    def strings(self, key: str, what: str = "a non-empty list of strings", within=None, at_least: int = 1) -> list:
        value = self.get(key, list, what, within=within)
        if len(value) < at_least:
            raise self.fail(key, f"{key!r} must have at least {at_least} entries, got {len(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(key, f"{key}[{i}] must be a string, got {type(item).__name__} {_short(item)}")
        return value

    def slots_known(self, key: str, templates: list[str], known: set[str]) -> None:
        for i, t in enumerate(templates):
            rest = _SLOT.sub("", t)
            if "[" in rest or "]" in rest:  # `[[A]]` filled as `[Mary]`; a typo like `[A` stayed in the prompt
                raise self.fail(
                    key, f"{key}[{i}] has a '[' or ']' outside a [VARIABLE] slot: {_short(t)} (slots are [NAME])"
                )
            for slot in _SLOT.findall(t):
                if slot not in known:
                    raise self.fail(
                        key, f"{key}[{i}] has slot [{slot}], which has no vocabulary (known: {sorted(known)})"
                    )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_spec(data: Any, path: Path, text: str = "") -> None:
    """Check a parsed spec: the common keys (``kind``, ``key_tokens``, ``corruptions``) and its kind's own."""
    c = _Checker(data, path, text)
    if not isinstance(data, dict):
        raise c.fail(None, f"a task spec must be a JSON object, got {type(data).__name__}")
    kind = c.get("kind", str, f"the task kind, one of {sorted(GENERATORS)}")
    if kind not in GENERATORS:
        raise c.fail("kind", f"kind {kind!r} is not one of {sorted(GENERATORS)}")
    c.get("name", str, "a string", required=False)
    corruptions = c.get("corruptions", dict, "an object with 'str' and 'str_variants'")
    if corruptions is not None:
        variants = c.get("str_variants", dict, "an object: variant name -> description", within=corruptions)
        if not variants:
            raise c.fail("str_variants", "'str_variants' must name at least one STR variant")
        default = c.get("str", str, "the default STR variant's name", required=False, within=corruptions)
        if default is not None and default not in variants:
            raise c.fail("str", f"default STR variant {default!r} is not one of {list(variants)}")
    if kind in SCHEMAS:  # a dataset spec is checked by circuitfind.tasks.datasets when its rows are read
        SCHEMAS[kind](c, data)


def _check_ioi(c: _Checker, d: dict) -> None:
    c.strings("names", at_least=5)
    c.strings("places")
    c.strings("objects")
    c.slots_known("templates", c.strings("templates"), {"X", "Y", "S", "PLACE", "OBJECT"})
    c.strings("key_tokens")


def _check_induction(c: _Checker, d: dict) -> None:
    vocab = c.strings("vocab", at_least=3)
    lo = c.get("min_length", int, "a whole number >= 2")
    hi = c.get("max_length", int, "a whole number >= min_length")
    if lo < 2 or hi < lo or hi >= len(vocab):
        raise c.fail("min_length", f"need 2 <= min_length <= max_length < len(vocab) (got {lo}, {hi}, {len(vocab)})")
    c.strings("key_tokens")


def _check_factual(c: _Checker, d: dict) -> None:
    facts = c.get("facts", list, "a non-empty list of [subject, answer] pairs")
    if len(facts) < 2:
        raise c.fail(
            "facts", f"'facts' needs at least 2 [subject, answer] pairs (for the subject swap), got {len(facts)}"
        )
    for i, fact in enumerate(facts):
        if not (isinstance(fact, list) and len(fact) == 2 and all(isinstance(x, str) and x for x in fact)):
            raise c.fail("facts", f"facts[{i}] must be a [subject, answer] pair of strings, got {_short(fact)}")
    templates = c.strings("templates")
    c.slots_known("templates", templates, {"SUBJECT"})
    for i, t in enumerate(templates):
        if "[SUBJECT]" not in t:
            raise c.fail("templates", f"templates[{i}] has no [SUBJECT] slot: {t!r}")
    c.strings("key_tokens")


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_CYCLE_KEYS = {"let", "answer", "counter_answer", "answers", "counter_answers"}


def _check_template(c: _Checker, d: dict) -> None:
    vocab = c.get("vocab", dict, "an object: vocabulary name -> list of strings")
    if not vocab:
        raise c.fail("vocab", "'vocab' must define at least one vocabulary")
    for name, words in vocab.items():
        if not (isinstance(words, list) and words and all(isinstance(w, list) for w in words)):
            c.strings(name, within=vocab)  # a list of words, or of records (lists of words) for 'fields'
        elif not all(w and all(isinstance(x, str) for x in w) for w in words):
            raise c.fail(name, f"vocabulary {name!r} of records: every entry must be a list of strings")
    draws = c.get("draw", list, "a list of {'vars': [...], 'from': vocabulary}")
    drawn: list[str] = []
    for i, draw in enumerate(draws):
        if not isinstance(draw, dict):
            raise c.fail("draw", f"draw[{i}] must be an object with 'vars' and 'from', got {_short(draw)}")
        names = c.strings("vars", within=draw)
        source = c.get("from", str, "a vocabulary name", within=draw)
        if source not in vocab:
            raise c.fail("from", f"draw[{i}] draws from {source!r}, which is not in 'vocab' ({sorted(vocab)})")
        if len(names) > len(vocab[source]):
            raise c.fail(
                "draw", f"draw[{i}] needs {len(names)} distinct words from {source!r}, which has {len(vocab[source])}"
            )
        fields = c.get("fields", list, "a list of field names", required=False, within=draw)
        if fields is not None:
            if any(not isinstance(w, list) or len(w) != len(fields) for w in vocab[source]):
                raise c.fail("fields", f"draw[{i}]: every entry of {source!r} must be a list of {len(fields)} strings")
            drawn += [f"{v}_{f}" for v in names for f in fields]
        else:
            if any(not isinstance(w, str) for w in vocab[source]):
                raise c.fail("from", f"draw[{i}]: {source!r} holds records: name them with 'fields'")
            drawn += names
    let = c.get("let", dict, "an object: variable -> text with [VARIABLE]s", required=False) or {}
    cycle = c.get("cycle", list, "a non-empty list of per-prompt overrides", required=False)
    if cycle is not None and not cycle:
        raise c.fail("cycle", "'cycle' must not be empty")
    cycle_lets: set[str] = set()
    for i, entry in enumerate(cycle or []):
        if not isinstance(entry, dict) or not set(entry) <= _CYCLE_KEYS:
            raise c.fail(
                "cycle", f"cycle[{i}] must be an object with keys among {sorted(_CYCLE_KEYS)}, got {_short(entry)}"
            )
        cycle_lets |= set(c.get("let", dict, "an object", required=False, within=entry) or {})
    known = set(drawn) | set(let) | cycle_lets
    templates = c.strings("templates")
    c.slots_known("templates", templates, known)
    for key in ("let",):
        c.slots_known(key, [str(v) for v in let.values()], set(drawn))
    sides = [d] + list(cycle or [])
    if not any("answer" in s or "answers" in s for s in sides):
        raise c.fail(None, "missing key 'answer' (text of the correct continuation, e.g. ' [IO]') or 'answers'")
    for side in sides:
        for key in ("answer", "counter_answer"):
            if key in side:
                c.slots_known(key, [c.get(key, str, "a text with [VARIABLE]s", within=side)], known)
        for key in ("answers", "counter_answers"):
            value = side.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                c.slots_known(key, c.strings(key, within=side), known)
            elif isinstance(value, dict):
                source = c.get("from", str, "a vocabulary name", within=value)
                if source not in vocab:
                    raise c.fail(key, f"{key!r} takes its set from {source!r}, which is not in 'vocab'")
                for word in vocab[source]:
                    if _number(word) is None:
                        raise c.fail(
                            key,
                            f"{key!r} compares the words of {source!r} as numbers, but {_short(word)} is not a number",
                        )
                op = c.get("compare", str, f"one of {sorted(_COMPARE)}", within=value)
                if op not in _COMPARE:
                    raise c.fail(key, f"{key!r}: compare {op!r} is not one of {sorted(_COMPARE)}")
                c.slots_known(key, [c.get("to", str, "a text with [VARIABLE]s", within=value)], known)
            else:
                raise c.fail(
                    key, f"{key!r} must be a list of texts or {{'from', 'compare', 'to'}}, got {_short(value)}"
                )
    keys = c.get("key_tokens", dict, "an object: key name -> variable (VAR, or VAR#n for its n-th slot)")
    for name, ref in keys.items():
        if not isinstance(ref, str) or ref.partition("#")[0] not in known:
            raise c.fail("key_tokens", f"key token {name!r} must name a variable ({sorted(known)}), got {_short(ref)}")
    corruptions = c.get("corruptions", dict, "an object with 'str' and 'str_variants'")
    for name, variant in corruptions["str_variants"].items():
        if not isinstance(variant, dict):
            raise c.fail(name, f"STR variant {name!r} must be an object with 'substitute' (slot -> text)")
        sub = c.get("substitute", dict, "an object: slot -> replacement text", within=variant)
        if not sub:
            raise c.fail(name, f"STR variant {name!r} substitutes nothing")
        for slot, value in sub.items():
            if slot not in known or not isinstance(value, str):
                raise c.fail(
                    name, f"STR variant {name!r}: substitute {slot!r} -> {_short(value)} must map a slot to a text"
                )
            c.slots_known(name, [value], known)
    for var in c.get("single_token", list, "a list of variables", required=False) or []:
        if var not in known:
            raise c.fail("single_token", f"single_token names {var!r}, which is not a variable ({sorted(known)})")


SCHEMAS: dict[str, Callable[[_Checker, dict], None]] = {
    "ioi": _check_ioi,
    "induction": _check_induction,
    "factual": _check_factual,
    "template": _check_template,
}


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

    template = spec.data["templates"]
    lengths: dict[tuple[int, str], int] = {}

    def n_tokens(t: int, subject: str) -> int:  # in context: the subject need not follow a space
        if (t, subject) not in lengths:
            text = _fill(template[t], {"SUBJECT": subject})[0]
            lengths[t, subject] = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        return lengths[t, subject]

    out = []
    for p in prompts:
        if p.corrupted.get("subject_swap") is not None:
            out.append(p)
            continue
        start, end = p.key_spans["subject"]
        subject = p.text[start:end]
        partners = [
            (s, a) for s, a in facts if " " + a != p.answer and n_tokens(p.template, s) == n_tokens(p.template, subject)
        ]
        if not partners:
            raise TaskError(
                f"no other subject has the token length of {subject!r} ({n_tokens(p.template, subject)} tokens in template {p.template}) "
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
    """The first ``n`` rows of a dataset file, or a sample seeded from ``rng`` (:mod:`circuitfind.tasks.datasets`)."""
    rows = datasets.read_rows(
        spec.data["file"], n, sample=spec.data["sample"], seed=rng.randrange(2**32), options=spec.data
    )
    return [Prompt(**row.prompt_fields(spec.data["file"])) for row in rows]


def _render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every ``[VAR]`` replaced by that variable's value."""
    return _SLOT.sub(lambda m: values[m.group(1)], text)


def _fill_slots(template: str, values: Mapping[str, str]) -> tuple[str, list[tuple[str, int]]]:
    """Fill a template's ``[SLOT]``s; return the text and every slot's (name, character offset), in order."""
    out, slots, last, length = [], [], 0, 0
    for match in _SLOT.finditer(template):
        piece = template[last : match.start()]
        length += len(piece)
        slots.append((match.group(1), length))
        value = values[match.group(1)]
        out += [piece, value]
        length += len(value)
        last = match.end()
    out.append(template[last:])
    return "".join(out), slots


def _answer_set(rule: Any, values: Mapping[str, str], vocab: Mapping[str, list[str]], spec: str) -> tuple[str, ...]:
    """A list of texts, or ``{"from": vocab, "compare": op, "to": text}``: the vocabulary's words that
    compare (as numbers) with ``to`` -- e.g. the years after ``[YY]`` for greater-than."""
    if rule is None:
        return ()
    if isinstance(rule, list):
        return tuple(_render(r, values) for r in rule)
    to = _render(rule["to"], values)
    bound, test = _number(to), _COMPARE[rule["compare"]]
    if bound is None:
        raise TaskError(
            f"task {spec}: the answer set compares {rule['from']!r} with 'to' = {rule['to']!r}, which is {to!r} here: "
            "not a number"
        )
    words = tuple(w for w in vocab[rule["from"]] if test(float(w), bound))
    if not words:
        raise TaskError(f"task {spec}: no word of {rule['from']!r} is {rule['compare']} {bound:g}: an empty answer set")
    return words


def _number(text: Any) -> float | None:
    """``text`` as a finite number, or None (``float`` also reads ``nan`` and ``inf``)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _template_prompts(spec: TaskSpec, n: int, rng: random.Random) -> list[Prompt]:
    """The generic kind: per prompt, pick a template (``rng.randrange``), draw each ``draw`` group's
    variables (``rng.sample`` for a group of distinct words, ``rng.choice`` for one), then apply
    ``let`` and the ``cycle`` entry ``i % len(cycle)``. A draw with ``fields`` picks records (lists)
    and binds ``VAR_FIELD`` for each field. This is the draw order of the ``ioi`` generator,
    so ``tasks/ioi_template.json`` gives the same prompts as ``ioi`` for the same seed."""
    d = spec.data
    vocab, templates, cycle = d["vocab"], d["templates"], d.get("cycle") or [{}]
    prompts = []
    for i in range(n):
        t = rng.randrange(len(templates))
        values: dict[str, str] = {}
        for draw in d["draw"]:
            names, pool = draw["vars"], vocab[draw["from"]]
            picked = [rng.choice(pool)] if len(names) == 1 else rng.sample(pool, len(names))
            if "fields" in draw:  # records: VAR_FIELD for each field of the drawn entry
                values.update(
                    {
                        f"{v}_{f}": x
                        for v, rec in zip(names, picked, strict=True)
                        for f, x in zip(draw["fields"], rec, strict=True)
                    }
                )
            else:
                values.update(zip(names, picked, strict=True))
        entry = cycle[i % len(cycle)]
        alias: dict[str, str] = {}
        for name, expr in {**d.get("let", {}), **entry.get("let", {})}.items():
            values[name] = _render(expr, values)
            if m := re.fullmatch(r"\[(\w+)\]", expr):
                alias[name] = alias.get(m.group(1), m.group(1))
        text, slots = _fill_slots(templates[t], values)
        keys = {}
        for key, ref in d["key_tokens"].items():
            var, _, nth = ref.partition("#")
            hits = [off for slot, off in slots if var in (slot, alias.get(slot, slot))]
            if len(hits) < int(nth or 1):
                raise TaskError(f"task {spec.name}: key token {key!r} ({ref}) is not in template {t}: {templates[t]!r}")
            keys[key] = hits[int(nth or 1) - 1]
        corrupted: dict[str, str | None] = {
            name: _fill_slots(
                templates[t], {**values, **{s: _render(v, values) for s, v in var["substitute"].items()}}
            )[0]
            for name, var in d["corruptions"]["str_variants"].items()
        }
        side = {k: entry.get(k, d.get(k)) for k in ("answer", "counter_answer", "answers", "counter_answers")}
        answers = _answer_set(side["answers"], values, vocab, spec.name)
        counters = _answer_set(side["counter_answers"], values, vocab, spec.name)
        answer = _render(side["answer"], values) if side["answer"] is not None else answers[0]
        counter = _render(side["counter_answer"], values) if side["counter_answer"] is not None else ""
        counter = counter or (counters[0] if counters else "")
        spans = {}
        for var in d.get("single_token", []):
            off = next((o for s, o in slots if var in (s, alias.get(s, s))), None)
            if off is not None:
                spans[var] = (off, off + len(values[var]))
        prompts.append(Prompt(text, answer, counter, corrupted, keys, t, spans, answers, counters))
    return prompts


def _single_token_slots(model, spec: TaskSpec, prompts: list[Prompt]) -> list[Prompt]:
    """The template kind's per-model rule: each ``single_token`` variable is one token of the prompt for
    this tokenizer (greater-than's ``YY``: Hanna et al. 2023 keep only years that are one token)."""
    for p in prompts:
        if not p.key_spans:
            continue
        offsets = model.tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for var, (lo, hi) in p.key_spans.items():
            n = sum(1 for a, b in offsets if b > lo and a < hi)
            if n != 1:
                raise TaskError(
                    f"task {spec.name}: [{var}] = {p.text[lo:hi]!r} is {n} tokens in {p.text!r} for this tokenizer; "
                    f"the spec's 'single_token' needs one (this behaviour cannot be posed this way to this model)"
                )
    return prompts


def _dataset_rows_for_model(model, spec: TaskSpec, prompts: list[Prompt]) -> list[Prompt]:
    """A dataset's per-model step: token-id answers decoded; unequal clean/corrupted lengths refused or dropped."""
    return datasets.resolve_for_model(spec.data, prompts, lambda t: encode(model, t), model.tokenizer)


GENERATORS: dict[str, Callable[[TaskSpec, int, random.Random], list[Prompt]]] = {
    "dataset": _dataset_prompts,
    "ioi": _ioi_prompts,
    "induction": _induction_prompts,
    "factual": _factual_prompts,
    "template": _template_prompts,
}


# Per-kind steps that need the model's tokenizer, run by TaskBatch.build before tokenising.
RESOLVERS: dict[str, Callable[[Any, TaskSpec, list[Prompt]], list[Prompt]]] = {
    "dataset": _dataset_rows_for_model,
    "factual": _subject_swaps,
    "template": _single_token_slots,
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
            f"(circuitfind.tasks.batch.MAX_PROMPTS; every patching run holds the whole batch in memory)"
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


_REFETCH = (
    "fetch it again: circuitfind models fetch NAME (the GPT-2 tokenizer: circuitfind models fetch gpt2-tokenizer)"
)
_MULTI_HINT = (
    'or declare "answer_tokens": "multi": in a task spec, or for a data file in a dataset spec '
    '{"kind": "dataset", "file": "FILE", "answer_tokens": "multi"}'
)


def continuation_ids(model: TransformerBridge, prompt: str, answer: str, where: str | None = None) -> list[int]:
    """The token ids of ``answer`` as the continuation of ``prompt``: ``prompt + answer`` tokenised, minus
    the prompt's tokens (no space added or dropped; a shipped task's answers carry their own leading space).
    ``where`` (``FILE:LINE`` of a dataset row) starts an error; by default the prompt is named."""
    tok = model.tokenizer
    where = where or f"prompt {_short(prompt, 200)}"
    if not answer:
        raise TaskError(f"{where}: the answer is empty")
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    if not full or (prompt and not head):
        raise TaskError(
            f"the tokenizer gives no tokens for {_short(prompt + answer)}: its files are missing or broken ({_REFETCH})"
        )
    if full[: len(head)] != head or len(full) == len(head):
        raise TaskError(
            f"{where}: answer {_short(answer, 60)} does not start at a token boundary (this tokenizer merges it "
            f"with the prompt's last token); move the boundary, e.g. end the prompt before a space"
        )
    return full[len(head) :]


def single_token_id(model: TransformerBridge, word: str, prompt: str = "", where: str | None = None) -> int:
    """The id of ``word`` as the one-token continuation of ``prompt``; error if it is not one token.

    With no prompt the word is tokenised on its own (give it its leading space, ``" Mary"``)."""
    tok = model.tokenizer
    if prompt:
        ids = continuation_ids(model, prompt, word, where)
    else:
        if not word:
            raise TaskError(f"{where + ': ' if where else ''}the answer is empty")
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TaskError(
                f"the tokenizer gives no tokens for {_short(word)}: its files are missing or broken ({_REFETCH})"
            )
    at = f"{where}: " if where else (f"prompt {_short(prompt, 200)}: " if prompt else "")
    if len(ids) == 1 and ids[0] == tok.unk_token_id and word.strip() != tok.unk_token:
        raise TaskError(
            f"{at}answer {_short(word, 60)} is not in this model's vocabulary (it maps to the unknown token)"
        )
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids[:8]) + (["..."] if len(ids) > 8 else [])
        hint = ""
        if prompt and not word[:1].isspace():
            try:
                if len(continuation_ids(model, prompt, " " + word)) == 1:
                    hint = f" ({' ' + word!r} is one token: is a leading space missing?)"
            except TaskError:
                pass
        raise TaskError(
            f"{at}answer {_short(word, 60)} is {len(ids)} tokens {pieces} for this tokenizer{hint}; answers must be a "
            f"single token ({_MULTI_HINT}). Choose single-token answers for this model."
        )
    return ids[0]


def _context_length(model: Any) -> int:
    """The most tokens the model reads (``cfg.n_ctx``; no limit when the config has none)."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else sys.maxsize


def _refuse_special_answers(model: TransformerBridge, task: str, prompts: list[Prompt], correct, wrong) -> None:
    """Refuse an answer with a special token (``<|im_start|>``, ``<|endoftext|>``): no behaviour's answer
    is one, and a token id read where a label was meant lands there (EAP-IG greater-than's ``1``).
    ``correct`` / ``wrong``: per prompt, the answers' token ids (one id each, or one id list each)."""
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    if not special:
        return
    for i, prompt in enumerate(prompts):
        for what, answers in (("answer", correct[i]), ("counter-answer", wrong[i])):
            for answer in answers:
                hit = [t for t in (answer if isinstance(answer, list) else [answer]) if t in special]
                if hit:
                    name = model.tokenizer.convert_ids_to_tokens(hit[:1])[0]
                    raise TaskError(
                        f"{prompt_origin(task, i, prompt)}: {what} has the special token {name!r} (id {hit[0]}), "
                        "which is no answer of a behaviour"
                    )


def prompt_origin(task: str, i: int, prompt: Prompt) -> str:
    """Where a prompt comes from, for an error: ``FILE:LINE`` for a dataset row, else the task and index."""
    source = prompt.extra.get("source")
    return str(source) if source else f"task {task!r}, prompt {i} ({_short(prompt.text)})"


def _check_answer_sets(task: str, i: int, prompt: Prompt) -> None:
    """Refuse an answer listed twice in a set (a set's mass counts each answer once) or in both sets
    (the metrics compare ``R`` with ``R'``: a shared answer cancels)."""
    where = prompt_origin(task, i, prompt)
    for name, answers in (("correct", prompt.answer_set), ("wrong", prompt.counter_answer_set)):
        if len(answers) > datasets.MAX_ANSWERS:
            raise TaskError(
                f"{where}: {len(answers)} {name} answers; a set holds at most {datasets.MAX_ANSWERS} "
                f"(circuitfind.tasks.datasets.MAX_ANSWERS)"
            )
        twice = datasets.first_repeat(answers)
        if twice is not None:
            raise TaskError(f"{where}: the {name} answers list {twice!r} twice; a set holds each answer once")
    both = sorted(set(prompt.answer_set) & set(prompt.counter_answer_set))
    if both:
        raise TaskError(f"{where}: {both[0]!r} is both a correct and a wrong answer; the sets must not share one")


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
        answer_sequences: with ``answer_tokens: multi``, each prompt's correct answers (its set ``R``)
            as token id lists (``answers`` then holds the first token of the first one); ``None`` for
            single-token tasks. ``counter_sequences`` likewise for the wrong answers ``R'`` (``[]``
            where a prompt has none). :func:`circuitfind.tasks.multitoken.expand` turns them into
            teacher-forced rows.
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
    answer_sequences: list[list[list[int]]] | None = None
    counter_sequences: list[list[list[int]]] | None = None

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
        if isinstance(prompts, numbers.Number | str | bytes) or not isinstance(prompts, Iterable):
            check_prompt_count(prompts)  # type: ignore[arg-type]  # a float or a string: one line naming it
        if isinstance(prompts, numbers.Integral):
            # checked before any conversion: int(True) would quietly be one prompt
            prompts = generate_prompts(task, check_prompt_count(prompts), seed)  # type: ignore[arg-type]
        prompts = list(prompts)  # type: ignore[arg-type]  # mypy does not narrow Sequence | int by Integral
        if not prompts:
            raise TaskError("cannot build a batch from zero prompts")
        check_prompt_count(len(prompts))
        if task.kind in RESOLVERS:
            prompts = RESOLVERS[task.kind](model, task, prompts)
        tok = model.tokenizer
        n_bos = len(_bos_ids(tok, model))
        clean = [encode(model, p.text) for p in prompts]
        n_ctx = _context_length(model)
        for i, (p, c) in enumerate(zip(prompts, clean, strict=True)):
            if len(c) > n_ctx:  # checked before any pass: a 100,000-token prompt asked for 40 GB
                raise TaskError(
                    f"{prompt_origin(task.name, i, p)}: the prompt is {len(c)} tokens; this model reads at most "
                    f"{n_ctx} (its context length n_ctx)"
                )
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
        for i, p in enumerate(prompts):
            _check_answer_sets(task.name, i, p)
        multi = task.answer_tokens == "multi"
        # a dataset row's answer refusal names FILE:LINE and the prompt; another prompt is named by its text
        where = [
            f"{p.extra['source']}: prompt {_short(p.text, 200)}" if p.extra.get("source") else None for p in prompts
        ]
        sequences = counter_sequences = None
        if multi:
            sequences = [
                [continuation_ids(model, p.text, a, where[i]) for a in p.answer_set] for i, p in enumerate(prompts)
            ]
            counter_sequences = [
                [continuation_ids(model, p.text, a, where[i]) for a in p.counter_answer_set]
                for i, p in enumerate(prompts)
            ]
            for i, p in enumerate(prompts):
                # teacher forcing reads the prompt and every answer token but the last
                longest = max(len(seq) for seq in sequences[i] + counter_sequences[i])
                if len(clean[i]) + longest - 1 > n_ctx:
                    raise TaskError(
                        f"{prompt_origin(task.name, i, p)}: the prompt ({len(clean[i])} tokens) and its longest "
                        f"answer ({longest} tokens) are over this model's context length n_ctx = {n_ctx}"
                    )
            answer_sets = [[seqs[0][0]] for seqs in sequences]
            counter_sets = [[seqs[0][0]] if seqs else [] for seqs in counter_sequences]
        else:
            answer_sets = [
                [single_token_id(model, a, p.text, where[i]) for a in p.answer_set] for i, p in enumerate(prompts)
            ]
            counter_sets = [
                [single_token_id(model, a, p.text, where[i]) for a in p.counter_answer_set]
                for i, p in enumerate(prompts)
            ]
        _refuse_special_answers(model, task.name, prompts, sequences or answer_sets, counter_sequences or counter_sets)
        answers = [ids[0] for ids in answer_sets]
        counters = [ids[0] if ids else answers[i] for i, ids in enumerate(counter_sets)]
        positions, spans = zip(*[_key_positions(model, p, n_bos) for p in prompts], strict=True)
        n_pos = max(len(c) for c in clean)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        device = next(model.parameters()).device

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
            counter_sequences=counter_sequences,
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
