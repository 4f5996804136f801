"""Dataset files of prompt pairs (circuitfind JSONL/CSV, auto-circuit JSON, EAP-IG / MIB CSV) as tasks."""

import csv
import json
from pathlib import Path

import pytest
import torch

from circuitfind import patching as P
from circuitfind.cli import main
from circuitfind.errors import TaskError
from circuitfind.methods.discover import discover
from circuitfind.tasks import datasets
from circuitfind.tasks.batch import TaskBatch, generate_prompts, load_task

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ioi_rows(n=16, seed=0):
    """IOI prompts of the shipped generator, as circuitfind dataset rows."""
    rows = []
    for p in generate_prompts("ioi", n, seed):
        row = {"clean": p.text, "answers": p.answer, "counter_answers": [p.counter_answer]}
        row.update({f"corrupted.{v}": text for v, text in p.corrupted.items()})
        row["keys"] = dict(p.key_chars)
        row["template"] = p.template
        rows.append(row)
    return rows


def test_ioi_round_trip_same_batch_and_same_circuits(ioi_model, tmp_path):
    """IOI prompts written as JSONL give the generator's batch, and EAP / ACDC find identical circuits."""
    path = _jsonl(tmp_path / "ioi_pairs.jsonl", _ioi_rows(16))
    ours = TaskBatch.build(ioi_model, str(path), 16)
    ref = TaskBatch.build(ioi_model, "ioi", 16, seed=0)
    assert ours.task.kind == "dataset" and ours.task.str_variants == ref.task.str_variants
    assert ours.task.default_str == "s2_io"
    assert torch.equal(ours.clean_tokens, ref.clean_tokens)
    assert set(ours.corrupted_tokens) == set(ref.corrupted_tokens)
    for v in ref.corrupted_tokens:
        assert torch.equal(ours.corrupted_tokens[v], ref.corrupted_tokens[v])
    for name in ("answers", "counter_answers", "end_pos", "mask"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert set(ours.positions) == set(ref.positions)
    for k in ref.positions:
        assert torch.equal(ours.positions[k], ref.positions[k]), k
    assert ours.prompts[0].extra["template"] == ref.prompts[0].template
    for algorithm, kwargs in (("eap", {"top_k": 15}), ("acdc", {"acdc_tau": 0.05})):
        found = [
            discover(P.prepare(ioi_model, b, "str", "logit_diff"), algorithm, "noise", curve=False, **kwargs)
            for b in (ours, ref)
        ]
        assert found[0].circuit.n_edges > 0
        assert found[0].circuit.edges == found[1].circuit.edges, algorithm
        if found[0].circuit.scores is not None:
            assert torch.equal(found[0].circuit.scores, found[1].circuit.scores)


def test_circuitfind_csv_schema(tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["clean", "corrupted.swap", "corrupted.abc", "answers", "counter_answers", "key.IO", "key.span", "level"]
        )
        w.writerow([CLEAN, CORRUPT, CLEAN.replace("Mary", "Anna"), " Mary| Maria", " John", "5", "5:9", "easy"])
    spec = load_task(str(path))
    assert spec.kind == "dataset" and spec.str_variants == ["swap", "abc"] and spec.key_tokens == ["IO", "span"]
    (p,) = generate_prompts(spec, 4)
    assert p.answer == " Mary" and p.answers == (" Mary", " Maria") and p.counter_answer == " John"
    assert p.answer_set == (" Mary", " Maria") and p.counter_answer_set == (" John",)
    assert p.key_chars == {"IO": 5} and p.key_spans == {"span": (5, 9)}
    assert p.corrupted == {"swap": CORRUPT, "abc": CLEAN.replace("Mary", "Anna")}
    assert p.extra == {"level": "easy", "source": "pairs.csv:2"}


def test_auto_circuit_json(tmp_path, ioi_model):
    """auto-circuit's format (UFO-101/auto-circuit, auto_circuit/data.py, load_datasets_from_json)."""
    prompts = [
        {"clean": p.text, "corrupt": p.corrupted["s2_io"], "answers": [p.answer], "wrong_answers": [p.counter_answer]}
        for p in generate_prompts("ioi", 8, 1)
    ]
    path = tmp_path / "ac.json"
    # other top-level keys before "prompts" are skipped
    path.write_text(json.dumps({"seq_labels": ["a"] * 3, "word_idxs": {"IO": 2}, "prompts": prompts}, indent=1))
    spec = load_task(str(path))
    assert spec.data["format"] == "auto-circuit" and spec.str_variants == ["corrupt"]
    got = generate_prompts(spec, 8)
    assert [p.text for p in got] == [p["clean"] for p in prompts]
    assert [p.counter_answer for p in got] == [p["wrong_answers"][0] for p in prompts]
    batch = TaskBatch.build(ioi_model, str(path), 8)
    ref = TaskBatch.build(ioi_model, "ioi", 8, seed=1)
    assert torch.equal(batch.corrupted("corrupt"), ref.corrupted("s2_io"))
    assert torch.equal(batch.answers, ref.answers)
    # a big prompts list is streamed across chunks
    many = [dict(p, clean=f"{i} {p['clean']}") for i, p in enumerate(prompts * 300)]
    path.write_text(json.dumps({"prompts": many}))
    assert path.stat().st_size > 2 * datasets._CHUNK
    assert [p.text for p in generate_prompts(load_task(str(path)), 2400)] == [p["clean"] for p in many]


def test_eap_ig_csv_token_ids_are_decoded(tmp_path, ioi_model):
    """EAP-IG / MIB pair CSV (hannamw/EAP-IG EAPDataset; yanivnik/MIB-shared-task gt_dataset.py):
    clean, corrupted, correct_idx, incorrect_idx as token ids."""
    ref = TaskBatch.build(ioi_model, "ioi", 6, seed=2)
    path = tmp_path / "eap.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "correct_idx", "incorrect_idx"])
        for p, a, c in zip(ref.prompts, ref.answers.tolist(), ref.counter_answers.tolist(), strict=True):
            w.writerow([p.text, p.corrupted["s2_io"], a, c])
    spec = load_task(str(path))
    assert spec.data["format"] == "eap-ig"
    batch = TaskBatch.build(ioi_model, spec, 6)
    assert torch.equal(batch.answers, ref.answers) and torch.equal(batch.counter_answers, ref.counter_answers)
    assert torch.equal(batch.corrupted(), ref.corrupted("s2_io"))
    assert batch.prompts[0].extra["correct_idx"] == ref.answers[0].item()
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(["x y", "x z", 10**9, 0])
    with pytest.raises(TaskError, match=r"eap.csv:8: correct_idx = 1000000000 is not a token id"):
        TaskBatch.build(ioi_model, str(path), 7)


def test_first_n_rows_and_seeded_sample(tmp_path):
    rows = [{"clean": f"row {i} a", "corrupted": f"row {i} b", "answers": " x"} for i in range(200)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    first = generate_prompts(load_task(str(path)), 5, seed=7)
    assert [p.text for p in first] == [f"row {i} a" for i in range(5)]
    spec_file = tmp_path / "sampled.json"
    spec_file.write_text(json.dumps({"kind": "dataset", "file": "rows.jsonl", "sample": True, "name": "rows-sample"}))
    spec = load_task(str(spec_file))
    assert spec.name == "rows-sample" and spec.data["sample"] is True
    a, b = generate_prompts(spec, 20, seed=1), generate_prompts(spec, 20, seed=1)
    assert [p.text for p in a] == [p.text for p in b]
    idx = [int(p.text.split()[1]) for p in a]
    assert idx == sorted(idx) and len(set(idx)) == 20 and idx[-1] > 20  # a sample in file order, not the head
    assert [p.text for p in generate_prompts(spec, 20, seed=2)] != [p.text for p in a]
    assert len(generate_prompts(spec, 500)) == 200  # fewer rows than asked: all of them


def test_taking_rows_stops_reading(tmp_path):
    """The first n rows are taken without reading the rest: a broken line after them is not seen."""
    path = _jsonl(
        tmp_path / "long.jsonl", [{"clean": f"{i} a", "corrupted": f"{i} b", "answers": " x"} for i in range(20)]
    )
    with open(path, "a") as f:
        f.write("not json at all\n")
    assert len(generate_prompts(load_task(str(path)), 16)) == 16
    with pytest.raises(TaskError, match=r"long.jsonl:21: not valid JSON"):
        generate_prompts(load_task(str(path)), 30)


BAD = [
    (
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": " x"}\n{"clean": \n',
        r"bad.jsonl:2: not valid JSON",
    ),
    ("bad.jsonl", b"", r"bad.jsonl: empty file"),
    ("bad.jsonl", b'{"clean": "a b", "answers": " x"}\n', r"bad.jsonl:1: missing key 'corrupted'"),
    ("bad.jsonl", b'{"corrupted": "a b", "answers": " x"}\n', r"bad.jsonl:1: missing key 'clean'"),
    ("bad.jsonl", b'{"clean": 3, "corrupted": "a b", "answers": " x"}\n', r"bad.jsonl:1: 'clean' must be a string"),
    ("bad.jsonl", b'{"clean": "a b", "corrupted": "a c", "answers": [1]}\n', r"bad.jsonl:1: 'answers' holds token ids"),
    ("bad.jsonl", b'{"clean": "a b", "corrupted": "a b", "answers": " x"}\n', r"bad.jsonl:1: 'corrupted' is identical"),
    ("bad.jsonl", b'{"clean": "a \xff b", "corrupted": "a c", "answers": " x"}\n', r"bad.jsonl:1: not UTF-8"),
    ("bad.jsonl", b"[1, 2]\n", r"bad.jsonl:1: a row must be a JSON object"),
    (
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": " x", "keys": {"IO": 40}}\n',
        r"bad.jsonl:1: key 'IO'",
    ),
    (
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": " x"}\n\n{"clean": "a b", "corrupted": "a c", "answers": " x"}\n',
        r"bad.jsonl:3: duplicate row: the same as line 1",
    ),
    (
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": " x"}\n{"clean": "a d", "corrupted.v": "a c", "answers": " x"}\n',
        r"bad.jsonl:2: this row has corrupted variants \['v'\]",
    ),
    (  # a shared answer makes logit_diff NaN (the difference of two empty sets) or zero
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": [" x", " y"], "counter_answers": " y"}\n',
        r"bad.jsonl:1: ' y' is both an answer \('answers'\) and a counter-answer \('counter_answers'\)",
    ),
    (
        "bad.json",
        b'{"prompts": [{"clean": "a b", "corrupt": "a c", "answers": [" x"], "wrong_answers": [" x"]}]}',
        r"bad.json:1: ' x' is both an answer \('answers'\) and a counter-answer \('wrong_answers'\)",
    ),
    ("bad.csv", b"clean,corrupted\na b,a c\n", r"bad.csv:2: missing key 'answers'"),
    ("bad.csv", b"clean,corrupted,answers\na b,a c\n", r"bad.csv:2: 2 cells, the header has 3"),
    ("bad.csv", b"clean,corrupted,answers,key.IO\na b,a c, x,q\n", r"bad.csv:2: column 'key.IO' must be"),
    ("bad.csv", b"", r"bad.csv: empty file"),
    ("bad.csv", b"clean,corrupted,answers\n", r"bad.csv: empty file: no rows"),
    ("bad.csv", b"clean,corrupted,answers\n\xfe\xff,a,b\n", r"bad.csv:2: not UTF-8"),
    (
        "bad.json",
        b'{"prompts": [{"clean": "a b", "corrupt": "a c", "answers": [" x"]}]}',
        r"bad.json:1: missing key 'wrong_answers'",
    ),
    (
        "bad.json",
        b'{"prompts": [{"clean": "a b", "corrupt": "a c", "answers": [" x"], "wrong_answers": []}',
        r"bad.json:1: not valid JSON",
    ),
    # Python's own JSON limits: a RecursionError and the int-digit ValueError, not tracebacks
    ("bad.jsonl", b'{"clean": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"bad.jsonl:1: not valid JSON: nested"),
    (
        "bad.jsonl",
        b'{"clean": "a b", "corrupted": "a c", "answers": " x", "n": 1' + b"0" * 5000 + b"}\n",
        r"bad.jsonl:1: not valid JSON: Exceeds the limit",
    ),
    (
        "bad.json",
        b'{"prompts": [{"clean": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        r"bad.json:1: .*nested too deeply",
    ),
]


def test_a_jsonl_file_may_start_with_a_bom(tmp_path):
    """Editors on Windows write one; the CSV reader already skips it."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"clean": "a b", "corrupted": "a c", "answers": " x"}\r\n')
    (prompt,) = generate_prompts(load_task(str(path)), 10)
    assert prompt.text == "a b"


@pytest.mark.parametrize(("name", "content", "message"), BAD)
def test_bad_dataset_files_are_one_line_errors(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TaskError, match=message):
        generate_prompts(load_task(str(path)), 10)
    assert main(["evaluate", "--task", str(path), "-n", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitfind: error: ") and "\n" not in err and name in err


def test_unequal_token_lengths_name_the_rows_or_are_dropped(tmp_path, ioi_model):
    rows = _ioi_rows(6)
    rows[2]["corrupted.s2_io"] = rows[2]["corrupted.s2_io"].replace(" gave", " gave quickly")
    rows[4]["corrupted.abc"] = rows[4]["corrupted.abc"] + " very"
    path = _jsonl(tmp_path / "uneq.jsonl", rows)
    with pytest.raises(TaskError, match=r"uneq.jsonl: 2 rows .* lines 3 \(s2_io\), 5 \(abc\)\..*drop_unequal"):
        TaskBatch.build(ioi_model, str(path), 6)
    spec_file = tmp_path / "uneq.json"
    spec_file.write_text(json.dumps({"kind": "dataset", "file": str(path), "drop_unequal": True}))
    batch = TaskBatch.build(ioi_model, str(spec_file), 6)
    assert batch.size == 4 and [p.extra["source"] for p in batch.prompts] == [f"uneq.jsonl:{i}" for i in (1, 2, 4, 6)]


def test_a_non_dataset_file_is_still_a_clear_error(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"name": "x", "kind": "nope"}')
    with pytest.raises(TaskError, match="kind 'nope'"):
        load_task(str(path))
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps({"kind": "dataset", "file": "missing.jsonl"}))
    with pytest.raises(TaskError, match=r"s.json: dataset file 'missing.jsonl' not found"):
        load_task(str(spec_file))


def test_sweep_names_a_dataset_by_file_name_and_hash_and_caches_by_content(tmp_path, capsys):
    from circuitfind.runs.sweep import SweepConfig, cache_key

    rows = _ioi_rows(8)
    (tmp_path / "a").mkdir()
    path = _jsonl(tmp_path / "a" / "pairs.jsonl", rows)
    grid = dict(algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8)
    config = SweepConfig(tasks=[str(path)], **grid).check()
    (setting,) = config.settings()
    label = f"pairs.jsonl-{load_task(str(path)).data['sha256'][:10]}"
    assert setting.name == f"toy-ioi__{label}__eap__str__logit_diff__noise"
    key = cache_key(setting, config)
    (tmp_path / "b").mkdir()
    moved = _jsonl(tmp_path / "b" / "pairs.jsonl", rows)  # the same content elsewhere: the same result
    (moved_setting,) = SweepConfig(tasks=[str(moved)], **grid).check().settings()
    assert cache_key(moved_setting, config) == key
    _jsonl(moved, rows[::-1])  # other content: another result
    (changed,) = SweepConfig(tasks=[str(moved)], **grid).check().settings()
    assert changed.name != setting.name and cache_key(changed, config) != key

    # a bad row is refused by the grid check, before anything starts
    _jsonl(path, rows[:3] + [rows[1]])
    with pytest.raises(TaskError, match=r"pairs.jsonl:4: duplicate row: the same as line 2"):
        SweepConfig(tasks=[str(path)], **grid).check()
    assert main(["sweep", "--tasks", str(path), "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1 and "pairs.jsonl:4" in err


@pytest.mark.slow
def test_a_dataset_setting_records_its_label_and_examples_for_the_report(tmp_path):
    from circuitfind.reports.sweep_report import write_report
    from circuitfind.runs.sweep import SweepConfig, compute_setting

    rows = _ioi_rows(8)
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    grid = dict(algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8)
    config = SweepConfig(tasks=[str(path)], **grid).check()
    (setting,) = config.settings()
    label = f"pairs.jsonl-{load_task(str(path)).data['sha256'][:10]}"
    record, circuit, _ = compute_setting(setting, config)
    assert record["task"] == label and record["n_prompts"] == 8 and circuit.n_edges > 0
    assert record["examples"][0] == {
        "clean": rows[0]["clean"],
        "corrupted": rows[0]["corrupted.s2_io"],
        "answers": [rows[0]["answers"]],
        "counter_answers": rows[0]["counter_answers"],
    }
    md = write_report([record], tmp_path / "report")["markdown_text"]
    assert "Example prompts" in md and rows[0]["clean"] in md


@pytest.mark.slow
def test_discover_and_sweep_commands_take_a_dataset(tmp_path, first_sweep, sweep_env):
    import subprocess
    import sys

    path = _jsonl(tmp_path / "pairs.jsonl", _ioi_rows(8))
    out = tmp_path / "c.graphml"
    assert main(["discover", "--task", str(path), "-n", "8", "--algorithm", "eap", "--out", str(out)]) == 0
    assert out.is_file()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuitfind",
            "sweep",
            "--tasks",
            str(path),
            "--algorithms",
            "eap",
            "--corruptions",
            "str",
            "--metrics",
            "logit_diff",
            "--directions",
            "noise",
            "--prompts",
            "8",
            "--run",
            "ds",
            "--outputs",
            str(tmp_path / "outputs"),
        ],
        # the package under test, wherever it is imported from (the worktree or the install)
        env={**sweep_env(first_sweep.home), "PYTHONPATH": str(Path(datasets.__file__).parents[1])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    label = f"pairs.jsonl-{load_task(str(path)).data['sha256'][:10]}"
    circuits = sorted(p.name for p in (tmp_path / "outputs" / "ds" / "circuits").glob("*.graphml"))
    assert circuits == [f"toy-ioi__{label}__eap__str__logit_diff__noise.graphml"]
    assert "Example prompts" in (tmp_path / "outputs" / "ds" / "report.md").read_text()


@pytest.mark.slow
def test_cli_drop_unequal_and_sample_options(tmp_path, capsys):
    rows = _ioi_rows(40)
    rows[2]["corrupted.s2_io"] = rows[2]["corrupted.s2_io"].replace(" gave", " gave quickly")
    path = _jsonl(tmp_path / "uneq.jsonl", rows)
    assert main(["evaluate", "--task", str(path), "-n", "40"]) == 2
    assert "lines 3 (s2_io)" in capsys.readouterr().err
    assert main(["evaluate", "--task", str(path), "-n", "40", "--drop-unequal", "--sample", "--seed", "3"]) == 0
    assert main(["evaluate", "--task", "ioi", "--sample"]) == 2
    assert "--sample and --drop-unequal take a dataset file" in capsys.readouterr().err


def test_gaussian_noise_on_a_dataset_without_key_tokens_is_refused(tmp_path, capsys, ioi_model):
    """GN noises the key tokens only: with none marked it would noise nothing (and fail later with "the clean
    and corrupted values are equal"). The sweep refuses the grid before it starts; the library at prepare."""
    from circuitfind import patching as P
    from circuitfind.errors import TaskError

    rows = [{k: v for k, v in r.items() if k != "keys"} for r in _ioi_rows(8)]
    path = _jsonl(tmp_path / "nokeys.jsonl", rows)
    assert main(["sweep", "--tasks", str(path), "--corruptions", "gn", "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: corruption 'gn': task 'nokeys.jsonl' has no key tokens") and (
        err.count("\n") == 1
    ), err
    assert not (tmp_path / "out").exists()
    batch = TaskBatch.build(ioi_model, str(path), 8)
    with pytest.raises(TaskError, match="has no key tokens"):
        P.prepare(ioi_model, batch, "gn", "logit_diff")
    P.prepare(ioi_model, TaskBatch.build(ioi_model, str(_jsonl(tmp_path / "keys.jsonl", _ioi_rows(8))), 8), "gn", "kl")


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.csv"])
def test_a_line_over_the_limit_is_refused_before_it_is_read_whole(tmp_path, capsys, name):
    """A 200 MB row was read, parsed and carried (1.4 GB resident); a line over MAX_LINE_BYTES is no row."""
    from circuitfind.tasks.datasets import MAX_LINE_BYTES

    path = tmp_path / name
    pad = b"x" * (MAX_LINE_BYTES + 10)
    if name.endswith(".csv"):
        path.write_bytes(b"clean,corrupted,answers\na b,a c, x\na b," + pad + b", x\n")
        line = 3
    else:
        path.write_bytes(b'{"clean": "a b", "corrupted": "a c", "answers": " x", "pad": "' + pad + b'"}\n')
        line = 1
    with pytest.raises(TaskError, match=rf"{name}:{line}: the line is over 16 MiB"):
        generate_prompts(load_task(str(path)), 10)
    assert main(["evaluate", "--task", str(path), "-n", "10"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_json_array_row_over_the_limit_is_refused_as_the_rows_error(tmp_path, capsys):
    """A JSON array's row was re-decoded once per 64 KB chunk (a 100 MB row: minutes); one over
    MAX_LINE_BYTES is now refused, and as the array's error (not "a task spec must be an object")."""
    from circuitfind.tasks.datasets import MAX_LINE_BYTES

    row = json.loads((Path(__file__).parent / "data" / "mib" / "arc_easy.json").read_text())[0]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{**row, "pad": "x" * (MAX_LINE_BYTES + 10)}]))
    with pytest.raises(TaskError, match=r"rows.json:1: a JSON value over 16 MiB"):
        generate_prompts(load_task(str(path)), 1)
    assert main(["evaluate", "--task", str(path), "-n", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
