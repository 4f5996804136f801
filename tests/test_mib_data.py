"""MIB's Hugging Face task rows (``mib-bench/ioi``, ``copycolors_mcqa``, ``arc_easy``, ``arithmetic_addition``) as tasks.

The fixtures in ``tests/data/mib/`` are written by hand in the row layout that MIB's circuit-track
loader reads: ``HFEAPDataset.__getitem__`` / ``filter_dataset`` in hannamw/MIB-circuit-track
``MIB_circuit_track/dataset.py`` at commit b759df34433c9e31043ba9e02908ce0bf20e894f (``prompt``;
IOI ``metadata.indirect_object`` / ``metadata.subject`` / ``metadata.random_c``; MCQA and ARC
``choices.label`` indexed by ``answerKey``; arithmetic ``label`` and ``operator``; one
``<name>_counterfactual`` object per counterfactual with its own ``prompt`` and answer fields). The
prompt texts follow aaronmueller/MIB at commit cc2a160ef6da5508bd670e8c0ba696168a57fca3:
``MIB-causal-variable-track/tasks/IOI_task/templates.json`` (IOI, with ``template`` and ``metadata``
as in ``test_MIB_datasets/test_ioi.py``), the MCQA prompt printed in ``example_submission.ipynb``,
the ARC prompt of ``test_MIB_datasets/test_ARC.py`` and the arithmetic prompt of
``tasks/two_digit_addition_task/arithmetic.py``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from circuitfind import patching as P
from circuitfind.cli import main
from circuitfind.errors import TaskError
from circuitfind.methods.discover import discover
from circuitfind.tasks.batch import TaskBatch, generate_prompts, load_task

DATA = Path(__file__).parent / "data" / "mib"


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(tmp_path, file, **options):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"kind": "dataset", "file": str(file), **options}))
    return path


def test_ioi_rows_default_and_all_counterfactuals(tmp_path):
    """IOI: the answer is " " + indirect_object, the counter-answer " " + subject for every
    counterfactual (MIB tokenises f" {name}"); s2_io_flip is MIB's default counterfactual."""
    rows = _rows("ioi.jsonl")
    spec = load_task(str(DATA / "ioi.jsonl"))
    assert spec.kind == "dataset" and spec.data["format"] == "mib" and spec.str_variants == ["s2_io_flip"]
    got = generate_prompts(spec, 10)
    assert len(got) == 3
    for p, row in zip(got, rows, strict=True):
        assert p.text == row["prompt"]
        assert p.answer == " " + row["metadata"]["indirect_object"]
        assert p.counter_answer == " " + row["metadata"]["subject"]
        assert p.corrupted == {"s2_io_flip": row["s2_io_flip_counterfactual"]["prompt"]}
        assert p.extra["metadata"] == row["metadata"] and p.extra["template"] == row["template"]
    every = load_task(str(_spec(tmp_path, DATA / "ioi.jsonl", variants="all")))
    assert every.str_variants == ["s2_io_flip", "abc"] and every.default_str == "s2_io_flip"
    (p, *_) = generate_prompts(every, 3)
    assert p.corrupted["abc"] == rows[0]["abc_counterfactual"]["prompt"] and p.counter_answer == " John"
    named = load_task(str(_spec(tmp_path, DATA / "ioi.jsonl", variants=["abc_counterfactual"])))
    assert named.str_variants == ["abc"]


def _mib_ioi_rows(prompts):
    """Shipped IOI prompts written as MIB rows (IO and S in metadata, one column per counterfactual)."""
    out = []
    for p in prompts:
        row = {
            "prompt": p.text,
            "metadata": {"indirect_object": p.answer.strip(), "subject": p.counter_answer.strip()},
        }
        row.update({f"{v}_counterfactual": {"prompt": text} for v, text in p.corrupted.items()})
        out.append(row)
    return out


def test_ioi_rows_give_the_generators_batch_and_circuit(tmp_path, ioi_model):
    """The shipped generator's IOI prompts as MIB rows: the same tokens and answers as the generator's
    batch for every counterfactual, and the identical EAP circuit."""
    ref = TaskBatch.build(ioi_model, "ioi", 12, seed=4)
    path = _write_jsonl(tmp_path / "mib_ioi.jsonl", _mib_ioi_rows(ref.prompts))
    ours = TaskBatch.build(ioi_model, str(_spec(tmp_path, path, variants="all")), 12)
    assert list(ours.corrupted_tokens) == list(ref.corrupted_tokens)
    assert torch.equal(ours.clean_tokens, ref.clean_tokens)
    for v in ref.corrupted_tokens:
        assert torch.equal(ours.corrupted_tokens[v], ref.corrupted_tokens[v]), v
    assert torch.equal(ours.answers, ref.answers) and torch.equal(ours.counter_answers, ref.counter_answers)
    found = [
        discover(P.prepare(ioi_model, b, "str", "logit_diff"), "eap", "noise", top_k=15, curve=False).circuit
        for b in (ours, ref)
    ]
    assert found[0].n_edges == 15 and found[0].edges == found[1].edges
    assert torch.equal(found[0].scores, found[1].scores)


def test_jsonl_json_array_and_json_lines_read_alike(tmp_path):
    """``datasets.Dataset.to_json`` writes JSON Lines even to a ``.json`` file; a JSON array of rows is read too."""
    rows = _rows("ioi.jsonl")
    ref = [(p.text, p.answer, dict(p.corrupted)) for p in generate_prompts(str(DATA / "ioi.jsonl"), 3)]
    lines = tmp_path / "train.json"
    shutil.copy(DATA / "ioi.jsonl", lines)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=2))
    for path in (lines, array):
        spec = load_task(str(path))
        assert spec.data["format"] == "mib", path
        assert [(p.text, p.answer, dict(p.corrupted)) for p in generate_prompts(spec, 3)] == ref


def test_parquet_rows(tmp_path):
    """The Hub's Parquet files, read a batch at a time with pyarrow (when installed); the first n rows only."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows("ioi.jsonl")
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows * 400), path, row_group_size=100)
    spec = load_task(str(path))
    assert spec.data["format"] == "mib" and spec.str_variants == ["s2_io_flip"]
    got = generate_prompts(spec, 3)
    assert [p.text for p in got] == [r["prompt"] for r in rows]
    assert [p.extra["source"] for p in got] == [f"{path.name}:{i}" for i in (1, 2, 3)]
    assert got[0].extra["metadata"] == rows[0]["metadata"]
    with pytest.raises(TaskError, match=r"\.parquet:4: duplicate row: the same as line 1"):
        generate_prompts(spec, 4)


def test_multiple_choice_answers_on_gpt2(tmp_path, random_gpt2):
    """MCQA / ARC: choices.label[answerKey] for both sides. By default the label follows a space
    (" C", what the model writes after "Answer:", and what MIB's causal-variable track scores);
    ``answer_prefix: ""`` gives the token MIB's circuit-track code scores, ``tokenizer(label)``."""
    tok = random_gpt2.tokenizer
    rows = _rows("copycolors_mcqa.jsonl")
    batch = TaskBatch.build(random_gpt2, str(DATA / "copycolors_mcqa.jsonl"), 2)
    assert batch.task.str_variants == ["symbol"]
    label = [r["choices"]["label"][r["answerKey"]] for r in rows]
    counter = [r["symbol_counterfactual"]["choices"]["label"][r["symbol_counterfactual"]["answerKey"]] for r in rows]
    assert label == ["C", "A"] and counter == ["Y", "P"]
    ids = lambda texts: [tok(t, add_special_tokens=False)["input_ids"][0] for t in texts]  # noqa: E731
    assert batch.answers.tolist() == ids([" " + x for x in label]) == [327, 317]
    assert batch.counter_answers.tolist() == ids([" " + x for x in counter])
    bare = TaskBatch.build(random_gpt2, str(_spec(tmp_path, DATA / "copycolors_mcqa.jsonl", answer_prefix="")), 2)
    assert bare.answers.tolist() == ids(label) and bare.counter_answers.tolist() == ids(counter)
    position = load_task(str(_spec(tmp_path, DATA / "copycolors_mcqa.jsonl", variants=["answerPosition"])))
    assert [p.counter_answer for p in generate_prompts(position, 2)] == [" A", " C"]
    arc = TaskBatch.build(random_gpt2, str(DATA / "arc_easy.json"), 1)
    assert [tok.decode([i]) for i in (arc.answers[0], arc.counter_answers[0])] == [" C", " M"]


def test_arithmetic_rows(random_gpt2):
    """Arithmetic: str(label) without a space, as MIB tokenises it. The prompts end in "A: ", which
    GPT-2's BPE merges with the answer (" 38" is one token), so they are refused there, naming the prompt."""
    rows = _rows("arithmetic_addition.jsonl")
    got = generate_prompts(str(DATA / "arithmetic_addition.jsonl"), 3)
    assert [(p.answer, p.counter_answer) for p in got] == [("38", "58"), ("53", "64"), ("29", "66")]
    assert [p.corrupted["random"] for p in got] == [r["random_counterfactual"]["prompt"] for r in rows]
    assert got[0].extra["operator"] == "+" and got[0].extra["operand1"] == 13
    with pytest.raises(TaskError, match=r"'Q: How much is 13 plus 25\? A: ': answer '38' does not start at a token"):
        TaskBatch.build(random_gpt2, str(DATA / "arithmetic_addition.jsonl"), 3)


IOI = json.loads((DATA / "ioi.jsonl").read_text().splitlines()[0])
MCQA = json.loads((DATA / "copycolors_mcqa.jsonl").read_text().splitlines()[0])
ADD = json.loads((DATA / "arithmetic_addition.jsonl").read_text().splitlines()[0])


def _without(row, *keys):
    return {k: v for k, v in row.items() if k not in keys}


def _with(row, path, value):
    row = json.loads(json.dumps(row))
    *head, last = path
    obj = row
    for k in head:
        obj = obj[k]
    obj[last] = value
    return row


BAD = [
    ([{"prompt": "a b", "x_counterfactual": {"prompt": "a c"}}], {}, r"rows.jsonl:1: a MIB row needs metadata"),
    ([_without(IOI, "s2_io_flip_counterfactual")], {}, r"rows.jsonl:1: no counterfactual column 's2_io_flip_"),
    (
        [_with(ADD, ["random_counterfactual"], None)],
        {},
        r"rows.jsonl:1: 'random_counterfactual' has no prompt \(null\)",
    ),
    ([_with(MCQA, ["answerKey"], 7)], {}, r"rows.jsonl:1: the row.answerKey must be an index into choices.label"),
    ([_with(IOI, ["metadata", "subject"], 3)], {}, r"rows.jsonl:1: metadata.subject must be a non-empty string"),
    ([IOI, {"clean": "a b", "corrupted": "a c", "answers": " x"}], {}, r"rows.jsonl:2: not a MIB row"),
    (
        [_with(IOI, ["s2_io_flip_counterfactual", "prompt"], IOI["prompt"])],
        {},
        r"rows.jsonl:1: 'corrupted.s2_io_flip' is identical to 'clean'",
    ),
    ([IOI, IOI], {}, r"rows.jsonl:2: duplicate row: the same as line 1"),
    (
        [MCQA],
        {"variants": ["symbol", "answerPosition"]},
        r"rows.jsonl:1: the chosen counterfactuals have different counter-answers \(symbol: ' Y', answerPosition: ' A'\)",
    ),
    ([MCQA], {"variants": "symbol"}, r'spec.json: "variants" must be "all" or a non-empty list'),
    ([MCQA], {"answer_prefix": 1}, r'spec.json: "answer_prefix" must be a string'),
    (
        [_with(IOI, ["metadata", "subject"], IOI["metadata"]["indirect_object"])],
        {},
        r"rows.jsonl:1: the metadata.indirect_object and metadata.subject are the same \(' Mary'\)",
    ),
    # Columns of circuitfind's own schema would replace the answers and counterfactuals read from MIB's.
    ([_with(IOI, ["answers"], [" John"])], {}, r"rows.jsonl:1: .*cannot also have 'answers' columns"),
    ([_with(ADD, ["corrupted"], "1 + 2 = ")], {}, r"rows.jsonl:1: .*cannot also have 'corrupted' columns"),
]


@pytest.mark.parametrize(("rows", "options", "message"), BAD)
def test_bad_mib_rows_are_one_line_errors(tmp_path, capsys, rows, options, message):
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    task = str(_spec(tmp_path, path, **options)) if options else str(path)
    with pytest.raises(TaskError, match=message):
        generate_prompts(load_task(task), 5)
    assert main(["evaluate", "--task", task, "-n", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitfind: error: ") and "\n" not in err and ("rows.jsonl" in err or "spec.json" in err)


def test_a_broken_parquet_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TaskError, match=r"train.parquet: not a readable Parquet file"):
        load_task(str(path))
    assert main(["evaluate", "--task", str(path), "-n", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_json_array_is_streamed_and_its_errors_name_the_line(tmp_path):
    """Taking the first rows of a JSON array reads no further: a broken array after them is only seen
    when more rows are asked for, as a FILE:LINE error."""
    rows = _rows("ioi.jsonl")
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps(rows[0]) + "\n")
    assert len(generate_prompts(load_task(str(path)), 3)) == 3
    with pytest.raises(TaskError, match=r"rows.json:5: not valid JSON: expected ',' or '\]' in the array of rows"):
        generate_prompts(load_task(str(path)), 4)


def test_evaluate_runs_on_mib_rows_without_key_tokens(capsys):
    """MIB rows carry no key tokens: ``evaluate`` reports the corruptions the task can take and names
    Gaussian noise as not run, instead of refusing the whole file (it takes no --corruption)."""
    assert main(["evaluate", "--task", str(DATA / "ioi.jsonl"), "-n", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["corrupted"]) == {"str", "mean", "resample"}
    assert report["skipped"] == {"gn": "the task has no key tokens"}
    assert main(["evaluate", "--task", str(DATA / "ioi.jsonl"), "-n", "4"]) == 0
    assert "corrupted (        gn) not run: the task has no key tokens" in capsys.readouterr().out
