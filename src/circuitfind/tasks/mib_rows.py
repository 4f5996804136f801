"""MIB's task rows (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark") as prompt pairs.

MIB publishes its circuit-localization tasks on the Hugging Face Hub (``mib-bench/ioi``,
``mib-bench/arithmetic_addition``, ``mib-bench/copycolors_mcqa``, ``mib-bench/arc_easy``, ...) as rows
with a clean ``prompt``, the answer in the row's own fields, and one column per counterfactual,
``<name>_counterfactual``, each an object with its own ``prompt`` (and answer fields). The layout
here is the one MIB's circuit-track loader reads: ``HFEAPDataset.__getitem__`` in
hannamw/MIB-circuit-track ``MIB_circuit_track/dataset.py`` (commit b759df34433c9e31043ba9e02908ce0bf20e894f,
the submodule of aaronmueller/MIB):

- **IOI** (``metadata`` holds ``indirect_object`` and ``subject``): the answer is ``" " + indirect_object``,
  the counter-answer ``" " + subject`` of the clean row, for every counterfactual (MIB tokenises
  ``f" {name}"``). Default counterfactual ``s2_io_flip``.
- **Multiple choice** (MCQA, ARC: ``choices`` is ``{"label": [...], "text": [...]}`` and ``answerKey`` an
  index into it): the answer is ``choices.label[answerKey]``, the counter-answer the counterfactual's
  ``choices.label[answerKey]``. Default counterfactual ``symbol``. The prompts end in ``Answer:``;
  the model continues with ``" A"``, which is what MIB's causal-variable track scores
  (``" " + symbols[answer_pointer]`` in ``MIB-causal-variable-track/tasks/ARC/ARC.py``), so the answer
  text gets a leading space. MIB's circuit-track code tokenises the bare label (``"A"``), another
  token for most tokenizers: ``"answer_prefix": ""`` in a dataset spec scores that token instead.
- **Arithmetic** (``label``, the number): the answer is ``str(label)``, the counter-answer
  ``str(<counterfactual>.label)``, no space (the prompts end in ``"A: "``). Default counterfactual ``random``.

Each chosen counterfactual becomes the STR variant ``corrupted.<name>`` (``s2_io_flip_counterfactual``
-> ``s2_io_flip``), so variants stay a grid axis. A prompt has one counter-answer, so chosen
counterfactuals whose counter-answers differ in a row are refused (MCQA's ``symbol`` and
``answerPosition`` move the answer to different letters): choose one. The row's other fields
(``template``, ``metadata``, ``choices``, ...) are carried in ``Prompt.extra``. MIB's loader drops
rows whose counterfactual is missing (arithmetic) or whose names have unequal token lengths (IOI);
here a missing counterfactual is an error naming the row, and unequal lengths are refused or dropped
(``"drop_unequal": true``) when the batch is built. Greater-than and EWoK rows (other fields) are not read.

Rows come as JSON Lines (``.jsonl``, or ``.json`` as ``datasets.Dataset.to_json`` writes it), a JSON
array of rows (``.json``), or Parquet (``.parquet``, the Hub's own files; read with pyarrow when it
is installed: the extra ``circuitfind[parquet]``, not a dependency, since pyarrow alone is tens of MB). In Parquet
files the ``LINE`` of an error is the row number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from circuitfind.errors import TaskError

SUFFIX = "_counterfactual"
DEFAULT_VARIANT = {"ioi": "s2_io_flip", "choice": "symbol", "arithmetic": "random"}
ANSWER_PREFIX = {"ioi": " ", "choice": " ", "arithmetic": ""}
# Spec options of a MIB dataset (keys of a {"kind": "dataset", "file": ...} spec).
OPTIONS = ("variants", "answer_prefix")


def is_mib_record(record: Any) -> bool:
    """A MIB row: a ``prompt`` and at least one ``*_counterfactual`` column (and no circuitfind ``clean``)."""
    return (
        isinstance(record, dict)
        and "prompt" in record
        and "clean" not in record
        and any(isinstance(k, str) and k.endswith(SUFFIX) for k in record)
    )


def layout(path: Path, line: int, record: Mapping[str, Any]) -> str:
    """``ioi``, ``choice`` or ``arithmetic``: which of MIB's task layouts the row has."""
    metadata = record.get("metadata")
    if isinstance(metadata, dict) and "indirect_object" in metadata and "subject" in metadata:
        return "ioi"
    if isinstance(record.get("choices"), dict) and "answerKey" in record:
        return "choice"
    if "label" in record:
        return "arithmetic"
    raise TaskError(
        f"{path}:{line}: a MIB row needs metadata.indirect_object and metadata.subject (IOI), choices.label "
        f"and answerKey (MCQA, ARC) or label (arithmetic); the row has {sorted(record)}"
    )


def check_options(path: Path, options: Mapping[str, Any]) -> None:
    """The MIB options of a dataset spec: ``variants`` (a list of counterfactual names, or ``"all"``)
    and ``answer_prefix`` (a string put before every answer)."""
    variants = options.get("variants")
    if variants is not None and variants != "all":
        if not isinstance(variants, list) or not variants or not all(isinstance(v, str) and v for v in variants):
            raise TaskError(
                f'{path}: "variants" must be "all" or a non-empty list of counterfactual names, got {variants!r}'
            )
    prefix = options.get("answer_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise TaskError(f'{path}: "answer_prefix" must be a string (" " or ""), got {prefix!r}')


def _label(path: Path, line: int, where: str, obj: Any) -> str:
    """``obj.choices.label[obj.answerKey]``, checked."""
    if not isinstance(obj, dict):
        raise TaskError(f"{path}:{line}: {where} must be an object, got {type(obj).__name__}")
    choices, key = obj.get("choices"), obj.get("answerKey")
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(labels, list) or not labels:
        raise TaskError(f"{path}:{line}: {where}.choices must be an object with a non-empty 'label' list")
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(labels):
        raise TaskError(
            f"{path}:{line}: {where}.answerKey must be an index into choices.label (0..{len(labels) - 1}), got {key!r}"
        )
    return str(labels[key])


def _number(path: Path, line: int, where: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise TaskError(f"{path}:{line}: {where} must be a number, got {value!r}")
    return str(value)


def _name(path: Path, line: int, metadata: Mapping[str, Any], key: str) -> str:
    value = metadata.get(key)
    if not isinstance(value, str) or not value:
        raise TaskError(f"{path}:{line}: metadata.{key} must be a non-empty string, got {value!r}")
    return value


def to_pair_record(path: Path, line: int, record: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """One MIB row as a record of circuitfind's own schema (``clean``, ``corrupted.<variant>``,
    ``answers``, ``counter_answers``, the rest carried)."""
    kind = layout(path, line, record)
    available = [k[: -len(SUFFIX)] for k in record if k.endswith(SUFFIX)]
    wanted = options.get("variants")
    if wanted == "all":
        variants = available
    elif wanted:
        variants = [v[: -len(SUFFIX)] if v.endswith(SUFFIX) else v for v in wanted]
    else:
        variants = [DEFAULT_VARIANT[kind]]
    prefix = options.get("answer_prefix")
    prefix = ANSWER_PREFIX[kind] if prefix is None else prefix
    if kind == "ioi":
        answer = _name(path, line, record["metadata"], "indirect_object")
        counter = _name(path, line, record["metadata"], "subject")
    elif kind == "choice":
        answer = _label(path, line, "the row", record)
    else:
        answer = _number(path, line, "label", record["label"])
    out: dict[str, Any] = {"clean": record["prompt"]}
    counters: dict[str, str] = {}
    for v in variants:
        column = v + SUFFIX
        if column not in record:
            raise TaskError(f"{path}:{line}: no counterfactual column {column!r} (the row has {available})")
        cf = record[column]
        if not isinstance(cf, dict) or cf.get("prompt") is None:
            raise TaskError(
                f"{path}:{line}: {column!r} has no prompt ({'null' if cf is None else type(cf).__name__}); "
                f"MIB's loader skips such rows: remove them, or choose other variants"
            )
        out[f"corrupted.{v}"] = cf["prompt"]
        if kind == "choice":
            counters[v] = _label(path, line, column, cf)
        elif kind == "arithmetic":
            counters[v] = _number(path, line, f"{column}.label", cf.get("label"))
        else:
            counters[v] = counter
    if len(set(counters.values())) > 1:
        shown = ", ".join(f"{v}: {prefix + c!r}" for v, c in counters.items())
        raise TaskError(
            f"{path}:{line}: the chosen counterfactuals have different counter-answers ({shown}); a prompt has "
            f'one counter-answer, so choose one with "variants" in a dataset spec'
        )
    if counters[variants[0]] == answer:
        where = "metadata.indirect_object and metadata.subject" if kind == "ioi" else "answer and counter-answer"
        raise TaskError(
            f"{path}:{line}: the {where} are the same ({prefix + answer!r}) under {variants[0]!r}; the metrics "
            "compare the answer with the counter-answer, so they must differ"
        )
    out["answers"] = [prefix + answer]
    out["counter_answers"] = [prefix + counters[variants[0]]]
    carried = {k: v for k, v in record.items() if k != "prompt" and not k.endswith(SUFFIX)}
    clash = sorted(k for k in carried if k in ("answers", "counter_answers") or k.split(".")[0] == "corrupted")
    if clash:
        # Carried, they would replace the answers and counterfactuals taken from MIB's own fields.
        raise TaskError(
            f"{path}:{line}: a MIB row's answers and corrupted prompts come from its prompt, answer and "
            f"*_counterfactual fields; it cannot also have {', '.join(map(repr, clash))} columns"
        )
    out.update(carried)
    return out


def parquet_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a Parquet file, numbered from 1, read a batch at a time (bounded memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(
            f"{path}: reading Parquet needs pyarrow, which is not installed (pip install 'circuitfind[parquet]'), "
            "or export the rows as JSON Lines (datasets.Dataset.to_json)"
        ) from None
    import pyarrow as pa

    try:
        reader = pq.ParquetFile(path)
        row = 0
        for batch in reader.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError) as err:
        raise TaskError(f"{path}: not a readable Parquet file: {' '.join(str(err).split())}") from None
