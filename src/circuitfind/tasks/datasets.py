"""Dataset files of prompt pairs: circuitfind's own JSONL/CSV schema, auto-circuit JSON, EAP-IG / MIB CSV and MIB's rows.

A dataset file is a task: ``load_task("pairs.jsonl")`` gives a spec of kind ``"dataset"`` whose
prompts are the file's rows. Rows are read streaming and only as far as needed, so taking 16 rows
of a 1 GB file reads 16 rows (plus one pass of sha256 over the bytes for the cache key).

**circuitfind's schema** (``.jsonl``: one JSON object a line; ``.csv``: a header and one row a line):

- ``clean`` (str, required): the clean prompt, used verbatim.
- ``corrupted`` or ``corrupted.<variant>`` (str, at least one): a corrupted prompt per named STR
  variant (``corrupted`` alone is the variant ``corrupted``). The variants are the task's STR
  variants (``--corruption str:<variant>``); the first is the default. Every row has the same ones.
- ``answers`` (str or list of str, required): the correct answer(s), written as the model
  continues the prompt (``" Mary"``, with its space). CSV: ``|``-separated.
- ``counter_answers`` (str or list of str, optional): the counterfactual (wrong) answer(s).
- ``keys`` (object, optional): key-token markers for position-restricted patching, a name ->
  character offset in ``clean`` where that token starts (``{"IO": 5}``), or ``[start, end]`` for a
  multi-token span. CSV: a column ``key.<name>`` holding ``5`` or ``5:9``. Every row has the same keys.
- any other key or column is carried in ``Prompt.extra`` (for metrics that need per-prompt data), with
  one type in every format: a CSV cell that is a number as JSON writes it (``2``, ``0.5``, ``-1e3``; not
  ``007``) is that number, as in JSON Lines; a dataset spec's ``"columns": {"weight": "number", "id":
  "text"}`` declares a column's type, and a row that breaks it is an error naming its line.

**auto-circuit** (``.json``): ``{"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}, ...]}``,
as documented in ``load_datasets_from_json`` of UFO-101/auto-circuit ``auto_circuit/data.py``
(``seq_labels`` and ``word_idxs`` are optional there and ignored here). auto-circuit also allows
pre-tokenised prompts and answers (lists of ints); those are refused, since they belong to one
tokenizer. The single corruption is the variant ``corrupt``.

**EAP-IG / MIB** (``.csv``): columns ``clean``, ``corrupted`` and ``correct_idx`` (and
``incorrect_idx``), read by ``EAPDataset`` in hannamw/EAP-IG and in the MIB circuit-track code
(yanivnik/MIB-shared-task ``gt_dataset.py``: ``row['clean'], row['corrupted'], [row['correct_idx'],
row['incorrect_idx']]``). For IOI these are token ids of the tokenizer the file was made for; they
are checked against the model's vocabulary (special tokens refused) and decoded to the answer text
when the batch is built. For greater-than (Hanna et al. 2023), ``correct_idx`` is a year label, not a
token: a dataset spec says which, ``"idx": "token"`` or ``"idx": "label"`` with ``"labels"`` (an
object of label -> answer text, or a format such as ``"{:02d}"``). Without one, indices all below 100
on a real vocabulary are refused as label-like (token 51 is ``'C'``). An ``answers`` column makes
the file circuitfind's schema (``correct_idx`` then lands in ``extra``).

**MIB's Hugging Face rows** (``.jsonl``, ``.json``, ``.parquet``: a ``prompt`` and ``*_counterfactual``
columns, as ``mib-bench/ioi``, ``mib-bench/copycolors_mcqa``, ... publish them): read by
:mod:`circuitfind.tasks.mib_rows`, each chosen counterfactual a ``corrupted.<variant>``, the answers from
the row's fields; a dataset spec's ``"variants"`` (names or ``"all"``) and ``"answer_prefix"`` choose.

**Options** (keys of a small spec file ``{"kind": "dataset", "file": "pairs.jsonl", ...}``, which is
itself a task, or arguments of :func:`dataset_spec`): ``"sample": true`` takes a seeded uniform
sample of the rows (reservoir sampling, Vitter 1985, "Random sampling with a reservoir", Algorithm
R: one pass, memory for ``n`` rows) instead of the first ``n``; ``"drop_unequal": true`` drops rows
whose clean and corrupted prompts have different token lengths for the model, instead of refusing
them. A file with fewer rows than asked for gives all its rows.

Every problem is a :class:`TaskError` ``FILE:LINE: ...``: invalid JSON or CSV on a line, a missing
key or column, a wrong type, an empty file, bytes that are not UTF-8, a duplicate row, a corrupted
prompt equal to the clean one, and (when the batch is built) unequal token lengths, naming the rows.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from circuitfind.errors import TaskError
from circuitfind.tasks import mib_rows

DATASET_SUFFIXES = (".jsonl", ".csv", ".parquet")
# How much of a .json file is read at a time while streaming its "prompts" array.
_CHUNK = 1 << 16


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Recognising a dataset file


def json_kind(path: Path) -> str | None:
    """For a ``.json`` file: ``"auto-circuit"`` (has a top-level ``prompts``), ``"spec"`` (a dataset
    spec, ``"kind": "dataset"``), ``"mib"`` (MIB rows: JSON Lines or an array whose first row has a
    ``prompt`` and ``*_counterfactual`` columns) or None (anything else, e.g. a behaviour spec). Reads
    only the top-level keys before the deciding one, or the first row."""
    if _first_char(path) == "[":  # never a behaviour spec (an object), so its errors are the rows' own
        for _, record in _JsonStream(path).elements("the array of rows"):
            return "mib" if mib_rows.is_mib_record(record) else None
        return None
    try:
        seen: dict[str, Any] = {}
        for key, value in _top_level(path, stop_at={"prompts", "kind"}):
            if key == "prompts":
                return "auto-circuit"
            if key == "kind":
                return "spec" if value == "dataset" else None
            seen[key] = value
        return "mib" if mib_rows.is_mib_record(seen) else None
    except (TaskError, UnicodeDecodeError):
        return None


# Answers in one set (R or R'): greater-than's years are under 100; every answer is tokenised with its
# prompt and gathered in every pass, and 2 rows of 50,000 answers ran for minutes.
MAX_ANSWERS = 1000

# A task spec or a dataset spec is a small JSON file (the shipped ones are a few KB); read whole, a
# 1 GB one took 50 s and 2.5 GB before its first error.
MAX_SPEC_BYTES = 16 * 2**20


def check_regular_file(path: Path) -> None:
    """Refuse a path that exists but is not a regular file (a folder, a FIFO, a device such as a link to
    ``/dev/zero``) before it is opened: reading a FIFO waits forever, a device never ends."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # not there: the caller's "no such file" (or a task name)
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise TaskError(f"{path}: not a regular file ({kind}); a task is a JSON, JSON Lines, CSV or Parquet file")


def read_small_text(path: Path, limit: int = MAX_SPEC_BYTES) -> str:
    """A spec file's text, refused (naming the file) when over ``limit`` bytes or not UTF-8."""
    check_regular_file(path)
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise TaskError(
            f"{path}: over {limit // 2**20} MiB; a spec file is a few KB (a dataset belongs in .jsonl or .csv)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range for a number")
    return value


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses what RFC 8259 leaves open or forbids and Python accepts: a key
    given twice in one object (the last silently won), ``NaN`` / ``Infinity`` and numbers that
    overflow to infinity (``1e400``). Raises ``ValueError`` (``JSONDecodeError`` for syntax)."""
    return json.loads(
        text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant, parse_float=_finite_float
    )


def parse_json(path: Path, text: str) -> Any:
    """A spec file's JSON, strictly (:func:`loads_strict`), every problem one :class:`TaskError` with its line."""
    try:
        return loads_strict(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except _DuplicateKey as err:
        raise TaskError(
            f"{path}:{_line_of_key(text, err.key)}: the key {err.key!r} is given twice in one object"
        ) from None
    except (ValueError, RecursionError) as err:
        raise TaskError(f"{path}: invalid JSON: {_json_limit(err)}") from None


def _line_of_key(text: str, key: str) -> int:
    """The line of the second ``"key":`` in ``text`` (the first when there is one)."""
    hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
    at = hits[1] if len(hits) > 1 else hits[0] if hits else 0
    return text.count("\n", 0, at) + 1


def _first_char(path: Path) -> str:
    """The first character of a text file that is not white space (or a BOM); ``""`` when there is none."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    return head[:1]


# A row's line: prompts are sentences and MIB's rows a few KB, so a longer line is not a row; read
# whole, a 2 GB line would take several times that in memory before any check.
MAX_LINE_BYTES = 16 * 2**20


def _lines(f: Any, path: Path) -> Iterator[tuple[int, bytes]]:
    """The lines of a binary file, numbered from 1, each read at most :data:`MAX_LINE_BYTES` at a time."""
    line = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        line += 1
        if len(raw) > MAX_LINE_BYTES:
            raise TaskError(f"{path}:{line}: the line is over {MAX_LINE_BYTES // 2**20} MiB; a row is a few KB")
        yield line, raw


def _first_jsonl_record(path: Path) -> Any:
    """The first non-blank line of a JSON Lines file, decoded (None when it is not valid JSON: the
    reader then names the problem)."""
    with open(path, "rb") as f:
        for line, raw in _lines(f, path):
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8", errors="replace")
            if text.strip():
                try:
                    return json.loads(text)
                except (ValueError, RecursionError):
                    return None
    return None


def is_dataset_file(path: Path) -> bool:
    """A ``.jsonl`` or ``.csv`` file, an auto-circuit ``.json`` or a dataset spec ``.json``."""
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    return suffix in DATASET_SUFFIXES or (suffix == ".json" and json_kind(path) is not None)


def dataset_spec(path: str | os.PathLike, sample: bool = False, drop_unequal: bool = False) -> dict[str, Any]:
    """The fields of a :class:`~circuitfind.tasks.batch.TaskSpec` (``name``, ``kind``, ``data``) for a dataset
    file or a dataset spec file. The first row is read and checked here, so a file that cannot
    work is refused when it is loaded."""
    path = Path(path)
    extra: dict[str, Any] = {}
    if path.suffix.lower() == ".json" and json_kind(path) == "spec":
        spec = _read_spec(path)
        target = Path(spec["file"])
        if not target.is_absolute():
            target = path.parent / target
        if not target.is_file():
            raise TaskError(f"{path}: dataset file {spec['file']!r} not found (looked for {target})")
        sample = bool(spec.get("sample", sample))
        drop_unequal = bool(spec.get("drop_unequal", drop_unequal))
        extra = {k: v for k, v in spec.items() if k not in {"kind", "file", "sample", "drop_unequal"}}
        name = str(spec.get("name", path.stem))
        path = target
    else:
        name = path.name
    fmt = _format(path)
    if fmt == "auto-circuit":  # a JSON array of rows is read as a stream: its end is seen when read to it
        _check_tail(path, "}")
    if fmt != "eap-ig" and ("idx" in extra or "labels" in extra):
        raise TaskError(f'{path}: "idx" and "labels" say what an EAP-IG CSV\'s correct_idx holds; this is a {fmt} file')
    first = next(iter_rows(path, extra), None)
    if first is None:
        raise TaskError(f"{path}: empty file: no rows")
    variants = list(first.corrupted)
    keys = sorted(first.key_chars) + sorted(first.key_spans)
    data = {
        **extra,
        "name": name,
        "kind": "dataset",
        "file": str(path.resolve()),
        "format": fmt,
        "sha256": file_sha256(path),
        "sample": sample,
        "drop_unequal": drop_unequal,
        "key_tokens": keys,
        "corruptions": {"str": variants[0], "str_variants": {v: f"column corrupted.{v}" for v in variants}},
    }
    return {"name": name, "kind": "dataset", "data": data}


def _check_tail(path: Path, closing: str) -> None:
    """A JSON document's last character closes its top-level value: rows are read only as far as needed,
    so without this, text after the closing brace was never seen (the whole file is checked when it is
    read to its end)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 4096))
        tail = f.read().rstrip(b" \t\r\n")
    if not tail.endswith(closing.encode()):
        with open(path, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        shown = tail[-20:].decode("utf-8", "replace")
        raise TaskError(
            f"{path}:{lines + 1}: not valid JSON: the file ends with {shown!r}, not the {closing!r} that closes "
            f"its top-level value (extra data after it, or a truncated file)"
        )


def _read_spec(path: Path) -> dict[str, Any]:
    spec = parse_json(path, read_small_text(path))
    if not isinstance(spec.get("file"), str):
        raise TaskError(f'{path}: a dataset spec needs "file": the path of a .jsonl, .csv or .json dataset')
    for option in ("sample", "drop_unequal"):
        if option in spec and not isinstance(spec[option], bool):
            raise TaskError(f"{path}: {option!r} must be true or false, got {spec[option]!r}")
    _check_index_options(path, spec)
    check_columns(path, spec)
    mib_rows.check_options(path, spec)
    return spec


# What the index columns of an EAP-IG / MIB CSV (``correct_idx``, ``incorrect_idx``) hold: token ids of
# the file's tokenizer (IOI), or labels that a mapping turns into answers (greater-than's two-digit years).
INDEX_MEANINGS = ("token", "label")
# Ids all below this (on a vocabulary of 10,000 or more tokens) look like labels, not token ids: the
# first hundred ids of a BPE vocabulary are single characters and special tokens, no task's answers.
_LABEL_LIKE = 100


def _check_index_options(path: Path, spec: Mapping[str, Any]) -> None:
    """``"idx"``: ``"token"`` or ``"label"``; ``"labels"`` (with ``"idx": "label"`` only): an object of
    label -> answer text, or a format string such as ``"{:02d}"`` applied to the label."""
    idx, labels = spec.get("idx"), spec.get("labels")
    if idx is not None and idx not in INDEX_MEANINGS:
        raise TaskError(f'{path}: "idx" must be "token" or "label" (what correct_idx holds), got {idx!r}')
    if idx == "label" and labels is None:
        raise TaskError(
            f'{path}: "idx": "label" needs "labels": an object of label -> answer, or a format like " {{:02d}}"'
        )
    if labels is not None:
        if idx != "label":
            raise TaskError(f'{path}: "labels" is read with "idx": "label" only')
        if isinstance(labels, str):
            try:
                labels.format(0)
            except (ValueError, IndexError, KeyError) as err:
                raise TaskError(f'{path}: "labels" {labels!r} is not a format of one number: {err}') from None
            if labels.format(0) == labels:
                raise TaskError(f'{path}: "labels" {labels!r} has no {{}} for the label')
        elif not isinstance(labels, dict) or not all(isinstance(v, str) and v for v in labels.values()):
            raise TaskError(f'{path}: "labels" must map each label to its answer text (a non-empty string)')


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "mib" if mib_rows.is_mib_record(_first_jsonl_record(path)) else "circuitfind"
    if suffix == ".parquet":
        return "mib"
    if suffix == ".json":
        kind = json_kind(path)
        if kind not in ("auto-circuit", "mib"):
            raise TaskError(
                f'{path}: not a dataset: an auto-circuit file has a top-level "prompts" list, MIB rows a '
                f'"prompt" and "*_counterfactual" columns'
            )
        return kind
    if suffix == ".csv":
        header = _csv_header(path)
        if "answers" not in header and "correct_idx" in header:
            return "eap-ig"
        return "circuitfind"
    raise TaskError(f"{path}: not a dataset file: the suffix must be .jsonl, .csv, .json or .parquet")


# --------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One validated row: the fields of a :class:`~circuitfind.tasks.batch.Prompt`, plus where it came from."""

    clean: str
    corrupted: dict[str, str]
    answers: tuple[str, ...]
    counter_answers: tuple[str, ...]
    key_chars: dict[str, int]
    key_spans: dict[str, tuple[int, int]]
    extra: dict[str, Any]
    line: int

    def prompt_fields(self, path: str) -> dict[str, Any]:
        """Keyword arguments of ``Prompt``; ``extra`` also records ``source`` = ``FILE:LINE``."""
        return {
            "text": self.clean,
            "answer": self.answers[0],
            "counter_answer": self.counter_answers[0] if self.counter_answers else "",
            "corrupted": dict(self.corrupted),
            "key_chars": dict(self.key_chars),
            "key_spans": dict(self.key_spans),
            "answers": self.answers if len(self.answers) > 1 else (),
            "counter_answers": self.counter_answers if len(self.counter_answers) > 1 else (),
            "extra": {**self.extra, "source": f"{Path(path).name}:{self.line}"},
        }


COLUMN_TYPES = ("number", "text")
# A CSV cell read as a number: what JSON writes for one (no leading zeros, so "007" stays text).
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _typed_extra(
    path: Path, line: int, extra: Mapping[str, Any], declared: Mapping[str, str], csv_cells: bool
) -> dict[str, Any]:
    """A row's extra columns with one type in every format: a CSV cell that is a number as JSON writes it
    becomes that number (as JSON Lines gives it), so a metric reads ``ctx.extra["weight"]`` as a tensor
    whatever the file; a column declared in the dataset spec's ``"columns"`` (``"number"`` or ``"text"``)
    is that type in every row, and a cell that is not is an error naming the line."""
    out = dict(extra)
    for column, value in extra.items():
        kind = declared.get(column)
        if kind == "text":
            if not isinstance(value, str):
                raise TaskError(f"{path}:{line}: column {column!r} is declared text, got {value!r}")
            continue
        if isinstance(value, str) and csv_cells and _NUMBER.fullmatch(value.strip()):
            number = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(number, int) or math.isfinite(number):
                out[column] = value = number
        if kind == "number" and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise TaskError(f"{path}:{line}: column {column!r} is declared a number, got {value!r}")
    return out


def check_columns(path: Path, spec: Mapping[str, Any]) -> None:
    """A dataset spec's ``"columns"``: an object of extra column -> ``"number"`` or ``"text"``."""
    columns = spec.get("columns")
    if columns is None:
        return
    if not isinstance(columns, dict) or not all(v in COLUMN_TYPES for v in columns.values()):
        raise TaskError(f'{path}: "columns" must map column names to "number" or "text", got {columns!r}')


def iter_rows(path: str | os.PathLike, options: Mapping[str, Any] | None = None) -> Iterator[Row]:
    """Every row of a dataset file in order, validated one at a time (streaming). ``options``: a
    dataset spec's (MIB rows read its ``variants`` and ``answer_prefix``)."""
    path = Path(path)
    fmt = _format(path)
    options = options or {}
    raw: Iterator[tuple[int, dict[str, Any]]]
    if fmt == "auto-circuit":
        raw = _auto_circuit_records(path)
    elif path.suffix.lower() == ".csv":
        raw = _csv_records(path, fmt)
    elif path.suffix.lower() == ".parquet":
        raw = mib_rows.parquet_records(path)
    elif path.suffix.lower() == ".json" and _first_char(path) == "[":
        raw = _array_records(path)
    else:
        raw = _jsonl_records(path)
    csv_cells = path.suffix.lower() == ".csv"
    shape: tuple[list[str], list[str]] | None = None
    for line, record in raw:
        if fmt == "mib":
            if not mib_rows.is_mib_record(record):
                raise TaskError(
                    f'{path}:{line}: not a MIB row: it needs a "prompt" and "*_counterfactual" columns '
                    f"like the first row (the row has {sorted(record)})"
                )
            record = mib_rows.to_pair_record(path, line, record, options)
        row = _row(path, line, record, fmt)
        if row.extra:
            row = dataclasses.replace(
                row, extra=_typed_extra(path, line, row.extra, options.get("columns") or {}, csv_cells)
            )
        this = (list(row.corrupted), sorted(row.key_chars) + sorted(row.key_spans))
        if shape is None:
            shape = this
        elif this != shape:
            raise TaskError(
                f"{path}:{line}: this row has corrupted variants {this[0]} and keys {this[1]}; "
                f"the first row has {shape[0]} and {shape[1]} (every row needs the same)"
            )
        yield row


def read_rows(
    path: str | os.PathLike, n: int, sample: bool = False, seed: int = 0, options: Mapping[str, Any] | None = None
) -> list[Row]:
    """The first ``n`` rows (reading no further), or with ``sample`` a seeded uniform sample of
    ``n`` rows in file order (reservoir sampling, Algorithm R of Vitter 1985: one pass over the
    file, ``n`` rows in memory). Refuses a file with no rows and duplicate rows among those taken.
    ``options``: the dataset spec's (:func:`iter_rows`)."""
    path = Path(path)
    rows: list[Row] = []
    if not sample:
        for row in iter_rows(path, options):
            rows.append(row)
            if len(rows) == n:  # before the next row is read
                break
    else:
        rng = random.Random(seed)
        reservoir: list[tuple[int, Row]] = []
        for i, row in enumerate(iter_rows(path, options)):
            if i < n:
                reservoir.append((i, row))
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    reservoir[j] = (i, row)
        rows = [row for _, row in sorted(reservoir, key=lambda t: t[0])]
    if not rows:
        raise TaskError(f"{path}: empty file: no rows")
    seen: dict[tuple, int] = {}
    for row in rows:
        key = (row.clean, tuple(sorted(row.corrupted.items())), row.answers, row.counter_answers)
        if key in seen:
            raise TaskError(f"{path}:{row.line}: duplicate row: the same as line {seen[key]}")
        seen[key] = row.line
    return rows


def _json_limit(err: BaseException) -> str:
    """Python's own limits on JSON text, as one line."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(";")[0]


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        for line, raw in _lines(f, path):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a BOM, as the CSV reader allows
            except UnicodeDecodeError as err:
                raise TaskError(
                    f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start} of the line)"
                ) from None
            if not text.strip():
                continue
            try:
                record = loads_strict(text)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{line}: not valid JSON: {err.msg} (column {err.colno})") from None
            except _DuplicateKey as err:
                raise TaskError(f"{path}:{line}: the key {err.key!r} is given twice in the row") from None
            except (ValueError, RecursionError) as err:  # a 5,000-digit number; arrays nested 100,000 deep
                raise TaskError(f"{path}:{line}: not valid JSON: {_json_limit(err)}") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{line}: a row must be a JSON object, got {type(record).__name__}")
            yield line, record


def _csv_lines(path: Path) -> Iterator[str]:
    """The file's lines decoded one at a time, so bytes that are not UTF-8 are named by their line."""
    with open(path, "rb") as f:
        for line, raw in _lines(f, path):
            try:
                yield raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(
                    f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start} of the line)"
                ) from None


def _csv_header(path: Path) -> list[str]:
    try:
        header = next(csv.reader(_csv_lines(path)), None)
    except csv.Error as err:
        raise TaskError(f"{path}:1: not valid CSV: {err}") from None
    if not header:
        raise TaskError(f"{path}: empty file: no header row")
    return [h.strip() for h in header]


def _csv_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    header = _csv_header(path)
    if len(set(header)) != len(header):
        raise TaskError(f"{path}:1: repeated column names in the header {header}")
    reader = csv.reader(_csv_lines(path))
    try:
        next(reader)
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise TaskError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)} columns")
            yield line, _csv_record(path, line, dict(zip(header, cells, strict=True)), fmt)
    except csv.Error as err:
        raise TaskError(f"{path}:{reader.line_num}: not valid CSV: {err}") from None


def _csv_record(path: Path, line: int, cells: dict[str, str], fmt: str) -> dict[str, Any]:
    """CSV cells -> a record in the JSONL shape (answer lists split at ``|``, key columns gathered)."""
    if fmt == "eap-ig":
        out: dict[str, Any] = {k: v for k, v in cells.items() if k not in {"correct_idx", "incorrect_idx"}}
        for column in ("correct_idx", "incorrect_idx"):
            if column in cells:
                try:
                    out[column] = parse_whole(cells[column])
                except ValueError:
                    raise TaskError(
                        f"{path}:{line}: column {column!r} must be a token id (a whole number), got {cells[column]!r}"
                    ) from None
        return out
    record: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for column, value in cells.items():
        if column in ("answers", "counter_answers"):
            record[column] = value.split("|") if value else []
        elif column.startswith("key."):
            lo, sep, hi = value.partition(":")
            try:
                keys[column[4:]] = [parse_whole(lo), parse_whole(hi)] if sep else parse_whole(lo)
            except ValueError:
                raise TaskError(
                    f"{path}:{line}: column {column!r} must be a character offset (5) or a span (5:9), got {value!r}"
                ) from None
        else:
            record[column] = value
    if keys:
        record["keys"] = keys
    return record


def _top_level(path: Path, stop_at: set[str] = frozenset()) -> Iterator[tuple[str, Any]]:  # type: ignore[assignment]
    """The top-level ``key, value`` pairs of a JSON object file, decoded one at a time; the value of
    ``prompts`` is an iterator over its elements (read lazily), and reading stops after a key in
    ``stop_at`` is given."""
    reader = _JsonStream(path)
    reader.expect("{")
    while True:
        c = reader.peek()
        if c == "}":
            return
        if c == ",":
            reader.advance(1)
            continue
        key = reader.value()
        if not isinstance(key, str):
            raise reader.error("expected a key")
        reader.expect(":")
        if key == "prompts" and "prompts" in stop_at:
            yield key, reader
            return
        value = reader.value()
        yield key, value
        if key in stop_at:
            return


class _JsonStream:
    """A JSON text read in chunks: values are decoded one at a time with ``raw_decode``."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "rb")  # noqa: SIM115  # read to the end or dropped
        self.buf, self.pos, self.eof, self.line = "", 0, False, 1
        self.decoder = json.JSONDecoder(
            object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant, parse_float=_finite_float
        )
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def _fill(self, size: int = _CHUNK) -> bool:
        if self.eof:
            return False
        chunk = self.file.read(size)
        if not chunk:
            self.eof = True
            self.file.close()
            try:
                self.utf8.decode(b"", final=True)
            except UnicodeDecodeError as err:
                raise TaskError(f"{self.path}:{self.here()}: not UTF-8 text ({err.reason})") from None
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :]
        self.pos = 0
        try:
            self.buf += self.utf8.decode(chunk)
        except UnicodeDecodeError as err:
            raise TaskError(f"{self.path}:{self.here()}: not UTF-8 text ({err.reason})") from None
        return True

    def here(self) -> int:
        return self.line + self.buf.count("\n", 0, self.pos)

    def too_long(self) -> TaskError:
        return TaskError(
            f"{self.path}:{self.here()}: a JSON value over {MAX_LINE_BYTES // 2**20} MiB; a row is a few KB"
        )

    def error(self, what: str) -> TaskError:
        return TaskError(f"{self.path}:{self.here()}: not valid JSON: {what}")

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                raise self.error("unexpected end of file")

    def advance(self, n: int) -> None:
        self.pos += n

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r}, found {self.buf[self.pos]!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                held = len(self.buf) - self.pos
                if held > MAX_LINE_BYTES and not self.eof:
                    raise self.too_long() from None
                # maybe the value runs past the buffer: read as much again, so a long value is decoded
                # O(log n) times, not once per chunk (a 100 MB row took minutes)
                if self._fill(max(_CHUNK, held)):
                    continue
                raise self.error(err.msg) from None
            except _DuplicateKey as err:
                raise TaskError(
                    f"{self.path}:{self.here()}: the key {err.key!r} is given twice in one object"
                ) from None
            except (ValueError, RecursionError) as err:
                raise self.error(_json_limit(err)) from None
            if end == len(self.buf) and not self.eof and isinstance(value, int | float):
                if self._fill():  # a number may continue in the next chunk
                    continue
            if end - self.pos > MAX_LINE_BYTES:
                raise self.too_long()
            self.pos = end
            return value

    def expect_end(self) -> None:
        """Only white space may follow the top-level value (``json.loads`` refuses extra data too)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                raise self.error(
                    f"extra data after the top-level value, starting {self.buf[self.pos : self.pos + 20]!r}"
                )
            if not self._fill():
                return

    def elements(self, what: str = 'the "prompts" list') -> Iterator[tuple[int, Any]]:
        """The elements of the array that starts here, with the line each starts on."""
        self.expect("[")
        first = True
        while True:
            c = self.peek()
            if c == "]":
                self.pos += 1
                return
            if not first:
                if c != ",":
                    raise self.error(f"expected ',' or ']' in {what}, found {c!r}")
                self.pos += 1
                self.peek()
            first = False
            line = self.here()
            yield line, self.value()


def _array_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a JSON array of rows, streamed, each with the line it starts on."""
    reader = _JsonStream(path)
    for line, record in reader.elements("the array of rows"):
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{line}: a row must be a JSON object, got {type(record).__name__}")
        yield line, record
    reader.expect_end()


def _auto_circuit_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The ``prompts`` of an auto-circuit file, streamed; read to its end, the rest of the file is checked
    too: one ``prompts`` key (a second one was read as no rows) and nothing after the closing brace."""
    reader = _JsonStream(path)
    reader.expect("{")
    seen: set[str] = set()
    while reader.peek() != "}":
        if seen:
            reader.expect(",")
        line = reader.here()
        key = reader.value()
        if not isinstance(key, str):
            raise reader.error("expected a key")
        if key in seen:
            raise TaskError(f"{path}:{line}: the key {key!r} is given twice in the top-level object")
        seen.add(key)
        reader.expect(":")
        if key != "prompts":
            reader.value()
            continue
        for line, record in reader.elements():
            if not isinstance(record, dict):
                raise TaskError(f'{path}:{line}: a "prompts" entry must be an object, got {type(record).__name__}')
            yield line, record
    reader.advance(1)
    reader.expect_end()
    if "prompts" not in seen:
        raise TaskError(f'{path}: no "prompts" list (an auto-circuit file is {{"prompts": [...]}})')


def _answer_list(path: Path, line: int, key: str, value: Any, required: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        if isinstance(value, list) and all(isinstance(a, int) for a in value):
            raise TaskError(
                f"{path}:{line}: {key!r} holds token ids; circuitfind needs answers as text "
                f"(token ids belong to one tokenizer)"
            )
        raise TaskError(f"{path}:{line}: {key!r} must be a string or a list of strings, got {value!r}")
    if any(not a for a in value):
        raise TaskError(f"{path}:{line}: {key!r} holds an empty answer")
    if required and not value:
        raise TaskError(f"{path}:{line}: {key!r} is empty; a row needs at least one answer")
    if len(value) > MAX_ANSWERS:
        raise TaskError(
            f"{path}:{line}: {key!r} lists {len(value)} answers; a set holds at most {MAX_ANSWERS} "
            f"(circuitfind.tasks.datasets.MAX_ANSWERS: each is tokenised and scored in every pass)"
        )
    twice = first_repeat(value)
    if twice is not None:
        raise TaskError(f"{path}:{line}: {key!r} lists {twice!r} twice; a set holds each answer once")
    return tuple(value)


def first_repeat(items: Sequence[str]) -> str | None:
    """The first item seen twice, in one pass (a list of 50,000 answers took minutes pairwise)."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _text(path: Path, line: int, key: str, value: Any) -> str:
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        raise TaskError(f"{path}:{line}: {key!r} holds token ids; circuitfind needs prompts as text")
    if not isinstance(value, str):
        raise TaskError(f"{path}:{line}: {key!r} must be a string, got {type(value).__name__}")
    if not value:
        raise TaskError(f"{path}:{line}: {key!r} is empty")
    if "\0" in value:  # a tokenizer reads it as text; it is a broken or binary file
        raise TaskError(f"{path}:{line}: {key!r} holds a NUL character (at character {value.index(chr(0))})")
    return value


_WHOLE = re.compile(r"[+-]?[0-9]+")
# extra columns become int64 tensors for metrics (MetricContext.extra)
_INT64 = (-(2**63), 2**63 - 1)


def parse_whole(text: str) -> int:
    """A whole number written in ASCII digits: ``int()`` also takes ``1_9`` and other scripts' digits
    (``١٩``), which a data file means as text, not as 19."""
    if not _WHOLE.fullmatch(text.strip()):
        raise ValueError(text)
    return int(text)


def _row(path: Path, line: int, record: dict[str, Any], fmt: str) -> Row:
    """Check one record (any format, in the JSONL shape) and make it a :class:`Row`."""
    names = {"clean": "clean", "answers": "answers", "counter_answers": "counter_answers"}
    if fmt == "auto-circuit":
        names = {"clean": "clean", "answers": "answers", "counter_answers": "wrong_answers"}
        record = dict(record)
        if "corrupt" in record:
            record["corrupted.corrupt"] = record.pop("corrupt")
        required = ["clean", "corrupted.corrupt", "answers", "wrong_answers"]
    elif fmt == "eap-ig":
        required = ["clean", "corrupted", "correct_idx"]
    else:
        required = ["clean", "answers"]
    for key in required:
        if key not in record:
            raise TaskError(f"{path}:{line}: missing key {key!r} (the row has {sorted(record)})")
    clean = _text(path, line, "clean", record["clean"])
    corrupted: dict[str, str] = {}
    for key, value in record.items():
        if key == "corrupted" or key.startswith("corrupted."):
            variant = key.partition(".")[2] or "corrupted"
            if not variant.replace("_", "").replace("-", "").isalnum():
                raise TaskError(f"{path}:{line}: {key!r}: a variant name is letters, digits, '_' and '-'")
            corrupted[variant] = _text(path, line, key, value)
            if corrupted[variant] == clean:
                raise TaskError(f"{path}:{line}: {key!r} is identical to 'clean': patching cannot tell them apart")
    if not corrupted:
        raise TaskError(f"{path}:{line}: missing key 'corrupted' (or 'corrupted.<variant>'): no corrupted prompt")
    used = {
        "clean",
        "keys",
        names["answers"],
        names["counter_answers"],
        *(k for k in record if k.startswith("corrupted")),
    }
    extra = {k: v for k, v in record.items() if k not in used}
    for k, v in extra.items():
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise TaskError(
                f"{path}:{line}: {k!r} = {str(v)[:20]}... ({len(str(v))} digits) is outside the 64-bit integers "
                f"a metric reads; write it as a string"
            )
    if fmt == "eap-ig":
        # Token ids, decoded by resolve_for_model once the tokenizer is known.
        answers: tuple[str, ...] = ("",)
        counters: tuple[str, ...] = ("",) if "incorrect_idx" in record else ()
    else:
        answers = _answer_list(path, line, names["answers"], record[names["answers"]], required=True)
        counters = _answer_list(path, line, names["counter_answers"], record.get(names["counter_answers"], []), False)
        both = sorted(set(answers) & set(counters))
        if both:  # the metrics compare R with R': a shared answer cancels, an empty difference is NaN
            raise TaskError(
                f"{path}:{line}: {both[0]!r} is both an answer ({names['answers']!r}) and a counter-answer "
                f"({names['counter_answers']!r}): the metrics compare the two sets, so they must not share one"
            )
    key_chars: dict[str, int] = {}
    key_spans: dict[str, tuple[int, int]] = {}
    keys = record.get("keys", {})
    if not isinstance(keys, dict):
        raise TaskError(f"{path}:{line}: 'keys' must be an object of name -> character offset, got {keys!r}")
    for name, mark in keys.items():
        if isinstance(mark, int) and not isinstance(mark, bool):
            if not 0 <= mark < len(clean):
                raise TaskError(
                    f"{path}:{line}: key {name!r} at character {mark} is outside 'clean' ({len(clean)} characters)"
                )
            key_chars[name] = mark
        elif (
            isinstance(mark, list)
            and len(mark) == 2
            and all(isinstance(m, int) and not isinstance(m, bool) for m in mark)
        ):
            lo, hi = mark
            if not 0 <= lo < hi <= len(clean):
                raise TaskError(
                    f"{path}:{line}: key span {name!r} [{lo}, {hi}] is not inside 'clean' ({len(clean)} characters)"
                )
            key_spans[name] = (lo, hi)
        else:
            raise TaskError(f"{path}:{line}: key {name!r} must be a character offset or [start, end], got {mark!r}")
        if name == "end":
            raise TaskError(f"{path}:{line}: key name 'end' is reserved (the last token)")
    return Row(clean, corrupted, answers, counters, key_chars, key_spans, extra, line)


# --------------------------------------------------------------------------------------------
# Fitting rows to a model (at batch build)


class _PromptLike(Protocol):
    """What :func:`resolve_for_model` reads of a prompt (a frozen dataclass: ``tasks.Prompt``)."""

    @property
    def text(self) -> str: ...
    @property
    def corrupted(self) -> Mapping[str, str | None]: ...
    @property
    def extra(self) -> Mapping[str, Any]: ...


P = TypeVar("P", bound=_PromptLike)


def _continuation_text(tokenizer: Any, prompt: str, token: int, where: str) -> str:
    """The text that continues ``prompt`` as exactly the token ``token``: its decoded text, or that text
    after a space (word-level tokenizers decode a word without the space that separates it)."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode([token])
    for text in (decoded, " " + decoded):
        full = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        if full[: len(head)] == head and full[len(head) :] == [token]:
            return text
    raise TaskError(f"{where} = {token} ({decoded!r}) is not one token when it continues the prompt {prompt!r}")


def resolve_for_model(
    data: Mapping[str, Any], prompts: Sequence[P], encode: Callable[[str], list[int]], tokenizer: Any
) -> list[P]:
    """Fit a dataset's prompts to a model: decode EAP-IG token-id answers, and check that clean and
    corrupted prompts have equal token lengths (symmetric token replacement needs them), refusing
    the rows that do not, by line, or dropping them when the dataset asks (``drop_unequal``)."""
    where = data.get("file", "dataset")
    out = list(prompts)
    if data.get("format") == "eap-ig":
        vocab = len(tokenizer)
        meaning = data.get("idx")
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        every = [p.extra[k] for p in out for k in ("correct_idx", "incorrect_idx") if k in p.extra]
        if meaning is None and vocab >= 100 * _LABEL_LIKE and every and max(every) < _LABEL_LIKE:
            raise TaskError(
                f"{where}: every correct_idx / incorrect_idx is below {_LABEL_LIKE} (largest {max(every)}): "
                f"labels (greater-than's years), not token ids of this tokenizer, where {every[0]} is "
                f"{tokenizer.decode([every[0]])!r}. Say what they are in a dataset spec: "
                f'{{"kind": "dataset", "file": "{Path(where).name}", "idx": "token"}}, or "idx": "label" with '
                '"labels": {"51": "51", ...} or a format such as "{:02d}"'
            )
        fitted = []
        for p in out:
            ids = {k: p.extra[k] for k in ("correct_idx", "incorrect_idx") if k in p.extra}
            if meaning == "label":
                texts = {k: _label_text(data["labels"], i, f"{where}:{_line(p)}: {k}") for k, i in ids.items()}
                fitted.append(
                    dataclasses.replace(
                        p,  # type: ignore[type-var]
                        answer=texts["correct_idx"],
                        counter_answer=texts.get("incorrect_idx", ""),
                    )
                )
                continue
            for k, i in ids.items():
                if not 0 <= i < vocab:
                    raise TaskError(
                        f"{where}:{_line(p)}: {k} = {i} is not a token id of this tokenizer ({vocab} tokens)"
                    )
                if i in special:
                    raise TaskError(
                        f"{where}:{_line(p)}: {k} = {i} is the special token {tokenizer.decode([i])!r}, not an "
                        'answer; if the column holds labels, say so: "idx": "label" in a dataset spec'
                    )
            texts = {k: _continuation_text(tokenizer, p.text, i, f"{where}:{_line(p)}: {k}") for k, i in ids.items()}
            fitted.append(
                dataclasses.replace(
                    p,  # type: ignore[type-var]
                    answer=texts["correct_idx"],
                    counter_answer=texts.get("incorrect_idx", ""),
                )
            )
        out = fitted
    unequal = []
    for p in out:
        n = len(encode(p.text))
        bad = [v for v, text in p.corrupted.items() if text is not None and len(encode(text)) != n]
        if bad:
            unequal.append((p, bad))
    if unequal and not data.get("drop_unequal"):
        lines = ", ".join(f"{_line(p)} ({'/'.join(bad)})" for p, bad in unequal[:10])
        more = f" and {len(unequal) - 10} more" if len(unequal) > 10 else ""
        raise TaskError(
            f"{where}: {len(unequal)} rows have clean and corrupted prompts of different token lengths for "
            f"this tokenizer: lines {lines}{more}. Symmetric token replacement needs equal lengths; fix them, "
            f'or drop them with "drop_unequal": true in a dataset spec'
        )
    dropped = {id(p) for p, _ in unequal}
    out = [p for p in out if id(p) not in dropped]
    if not out:
        raise TaskError(f"{where}: every row has unequal clean/corrupted token lengths; nothing is left")
    return out


def _label_text(labels: str | Mapping[str, str], label: int, where: str) -> str:
    """The answer text of a label: ``labels[str(label)]``, or the format ``labels`` applied to it."""
    if isinstance(labels, str):
        return labels.format(label)
    if str(label) not in labels:
        raise TaskError(f'{where} = {label} has no answer in "labels" (it maps {len(labels)} labels)')
    return labels[str(label)]


def _line(p: _PromptLike) -> str:
    return str(p.extra.get("source", "?")).rpartition(":")[2]
