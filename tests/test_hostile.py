"""Hostile input (issue 25): every one is refused fast with one line naming the file, line and
problem, exit 2 on the command line. Each test here failed before its fix: it ran for minutes,
took gigabytes, printed a traceback, named the wrong thing, or was silently accepted."""

import json
import os
import re
import resource
import time

import pytest
import torch

from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.cli import main
from circuitfind.errors import MetricError, TaskError
from circuitfind.tasks import TaskBatch, load_task
from circuitfind.tasks.datasets import MAX_ANSWERS, first_repeat
from circuitfind.tasks.metrics import CallableMetric, MetricContext

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
ROW = {"clean": CLEAN, "corrupted": CORRUPT, "answers": [" Mary"], "counter_answers": [" John"]}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module", autouse=True)
def warm():
    """The commands' imports and the toy model, paid once: the limits are on the hostile input's own work."""
    assert main(["evaluate", "--task", "ioi", "-n", "2", "--model", "toy-ioi"]) == 0


def refused(argv, capsys, *fragments: str, seconds: float = 15.0) -> str:
    """Run the command in-process: exit 2, one line with every fragment, no traceback, within ``seconds``
    of CPU (the machine is shared: wall time measures the load) and 1 GB."""
    capsys.readouterr()
    rss, start = _rss_gb(), _cpu_s()
    code = main([str(a) for a in argv])
    elapsed = _cpu_s() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    assert elapsed < seconds, f"took {elapsed:.1f} s of CPU"
    assert _rss_gb() - rss < 1.0, "allocated more than 1 GB"
    return err


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _evaluate(path, n=2):
    return ["evaluate", "--task", path, "-n", n, "--model", "toy-ioi"]


# --------------------------------------------------------------------------------------------
# Blow-ups from small inputs


def test_a_prompt_longer_than_the_context_is_refused_naming_its_line(tmp_path, capsys):
    rows = [ROW, {**ROW, "clean": CLEAN * 300, "corrupted": CORRUPT * 300}]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    refused(_evaluate(path), capsys, "long.jsonl:2: the prompt is", "context length n_ctx")


def test_a_multi_token_answer_longer_than_the_context_is_refused(tmp_path, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", [{**ROW, "answers": [" Mary" * 500]}])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": data, "answer_tokens": "multi"}))
    refused(_evaluate(spec, 1), capsys, "rows.jsonl:1:", "longest answer (500 tokens)", "n_ctx = 32")


def test_answer_sets_are_bounded_and_repeats_found_in_one_pass(tmp_path, capsys):
    rows = [{**ROW, "answers": [f" w{i}" for i in range(50_000)]}] * 2
    path = _jsonl(tmp_path / "many.jsonl", rows)
    refused(_evaluate(path), capsys, "many.jsonl:1: 'answers' lists 50000 answers", f"at most {MAX_ANSWERS}", seconds=5)
    start = time.monotonic()
    assert first_repeat([str(i) for i in range(200_000)] + ["7"]) == "7"
    assert first_repeat(["a", "b"]) is None
    assert time.monotonic() - start < 1.0  # pairwise, 20,000 answers took 14 s


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_huge_sparse_file_is_refused_before_it_is_read(tmp_path, capsys, suffix):
    path = tmp_path / f"huge{suffix}"
    with open(path, "wb") as f:
        f.write(b'{"kind": "ioi", ' if suffix == ".json" else b"")
        f.truncate(2**30)  # 1 GB of holes: free on disk, 2.5 GB and 50 s once read whole
    refused(_evaluate(path), capsys, str(path), "16 MiB", seconds=5)


def test_a_dataset_spec_over_the_limit_is_refused(tmp_path, capsys):
    path = tmp_path / "spec.json"
    with open(path, "wb") as f:
        f.write(b'{"kind": "dataset", "file": "x.jsonl", "pad": "')
        f.truncate(2**30)
    refused(_evaluate(path), capsys, str(path), "over 16 MiB", seconds=5)


# --------------------------------------------------------------------------------------------
# A user's metric


@pytest.fixture
def user_metrics(tmp_path, monkeypatch):
    (tmp_path / "hostile_metrics.py").write_text(
        "import sys, time\n"
        "def sleeps(logits, ctx):\n    time.sleep(3600)\n"
        "def exits(logits, ctx):\n    sys.exit(0)\n"
        "def argmax(logits, ctx):\n    return logits.argmax(-1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CIRCUITFIND_METRIC_TIMEOUT", "2")


@pytest.mark.parametrize(
    "name, message",
    [
        ("sleeps", "did not return within 2 s on its first call"),
        ("exits", "called sys.exit(0)"),
        ("argmax", "returned int64 values; a metric returns floating-point scores"),
    ],
)
def test_a_hostile_metric_is_one_line(user_metrics, capsys, name, message):
    argv = ["discover", "--task", "ioi", "-n", "4", "--model", "toy-ioi", "--algorithm", "eap"]
    refused([*argv, "--metric", f"hostile_metrics:{name}"], capsys, f"hostile_metrics:{name}", message, seconds=20)


def test_a_guarded_first_call_keeps_the_callers_grad_mode():
    logits = torch.randn(3, 5, requires_grad=True)
    metric = CallableMetric(lambda x, ctx: x[:, 0] * 2)
    ctx = MetricContext(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        assert not metric(logits, ctx).requires_grad
    metric = CallableMetric(lambda x, ctx: x[:, 0] * 2)
    values = metric(logits, ctx)
    values.sum().backward()
    assert logits.grad[:, 0].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(MetricError, match="called sys.exit"):
        CallableMetric(lambda x, ctx: exit(3))(logits, ctx)


# --------------------------------------------------------------------------------------------
# Messages that named the wrong thing, or nothing


def test_a_400_digit_integer_in_an_extra_column_names_its_line(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROW)[:-1] + ', "year": ' + "9" * 400 + "}\n")
    refused(_evaluate(path, 1), capsys, "rows.jsonl:1: 'year'", "400 digits", "64-bit")


def _template(**change):
    spec = {
        "kind": "template",
        "vocab": {"N": [" Mary", " John", " Tom"], "Y": ["x1", "x2"]},
        "draw": [{"vars": ["A", "B"], "from": "N"}, {"vars": ["YY"], "from": "Y"}],
        "templates": ["Then [A] and [B] went, [B] gave it to"],
        "answer": "[A]",
        "counter_answer": "[B]",
        "key_tokens": {"S": "B"},
        "corruptions": {"str": "s", "str_variants": {"s": {"substitute": {"B": "[A]"}}}},
    }
    spec.update(change)
    return spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answers": {"from": "Y", "compare": ">", "to": "[YY]"}}, "compares the words of 'Y' as numbers, but 'x1'"),
        ({"templates": ["Then [[A]] and [B] went, [B] gave it to"]}, "templates[0] has a '[' or ']' outside"),
        ({"templates": ["Then [A and [B] went, [B] gave it to"]}, "outside a [VARIABLE] slot"),
    ],
)
def test_template_specs_refused_on_load_naming_file_and_line(tmp_path, capsys, change, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_template(**change), indent=1))
    err = refused(_evaluate(path), capsys, message)
    assert f"{path}:" in err


@pytest.mark.parametrize(
    "answer, message",
    [
        (" ", "does not start at a token boundary"),
        (" Zxqvw", "not in this model's vocabulary"),
        (" Mary" * 500, "is 500 tokens"),
        (" Mary John", '"file": "FILE", "answer_tokens": "multi"'),  # how a data file declares it
    ],
)
def test_answer_refusals_name_file_and_line(tmp_path, capsys, answer, message):
    path = _jsonl(tmp_path / "rows.jsonl", [ROW, {**ROW, "answers": [answer]}])
    err = refused(_evaluate(path), capsys, "rows.jsonl:2: prompt 'When Mary", message)
    assert len(err) < 600  # a 500-token answer is not quoted whole


def test_a_multi_token_answer_declared_in_a_dataset_spec_is_read(tmp_path, ioi_model):
    data = _jsonl(tmp_path / "rows.jsonl", [{**ROW, "answers": [" Mary John"]}])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": data, "answer_tokens": "multi"}))
    batch = TaskBatch.build(ioi_model, load_task(spec), 1)
    assert [len(s) for s in batch.answer_sequences[0]] == [2]


def test_paths_that_are_not_regular_files(tmp_path, capsys):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # opened, it would wait forever for a writer
    refused(_evaluate(fifo), capsys, f"{fifo}: not a regular file (a FIFO)", seconds=5)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    refused(_evaluate(zero), capsys, f"{zero}: not a regular file (a device or socket)", seconds=5)
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    refused(_evaluate(folder), capsys, f"{folder}: not a regular file (a folder)")


def test_an_output_that_cannot_be_written_names_the_output(tmp_path, capsys):
    graph = ModelGraph(2, 2)
    path = Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges), {}).save(
        tmp_path / "c.graphml"
    )
    err = refused(["export", path, "/proc/version.graphml"], capsys, "cannot write /proc/version.graphml")
    assert ".tmp" not in err


def test_a_float_number_of_prompts(ioi_model):
    with pytest.raises(TaskError, match=r"the number of prompts must be a whole number, got 2.7"):
        TaskBatch.build(ioi_model, "ioi", 2.7)


# --------------------------------------------------------------------------------------------
# Silently accepted before


def _auto(prompts) -> dict:
    return {"prompts": prompts}


SHORT, SHORT_X = "Then Mary and John met and John gave it to", "Then Mary and John met and Mary gave it to"
AUTO_ROW = {"clean": CLEAN, "corrupt": CORRUPT, "answers": [" Mary"], "wrong_answers": [" John"]}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.json", json.dumps(_auto([AUTO_ROW])) + " trailing", "a.json:1: not valid JSON: the file ends with"),
        ("a.json", json.dumps(_auto([AUTO_ROW])) + ' {"x": {}}', "a.json:1: not valid JSON: extra data after"),
        ("a.json", '{"prompts": [], "prompts": [' + json.dumps(AUTO_ROW) + "]}", "the key 'prompts' is given twice"),
        ("a.jsonl", json.dumps(ROW)[:-1] + ', "clean": "other"}\n', "a.jsonl:1: the key 'clean' is given twice"),
        ("a.csv", f"clean,corrupted,correct_idx\n{SHORT},{SHORT_X},1_9\n", "a.csv:2: column 'correct_idx'"),
        ("a.csv", f"clean,corrupted,correct_idx\n{SHORT},{SHORT_X},١٩\n", "must be a token id"),
        ("a.csv", f"clean,corrupted,answers,key.IO\n{SHORT},{SHORT_X}, Mary,٥\n", "a.csv:2: column 'key.IO'"),
        ("a.csv", f"clean,corrupted,answers\n{SHORT}\0,{SHORT_X}, Mary\n", "a.csv:2: 'clean' holds a NUL character"),
        ("a.jsonl", json.dumps({**ROW, "clean": CLEAN + "\0"}) + "\n", "a.jsonl:1: 'clean' holds a NUL"),
    ],
)
def test_silently_accepted_rows_are_refused(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    refused(_evaluate(path, 2), capsys, message)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e400"])
def test_non_finite_numbers_in_a_spec_are_refused(tmp_path, capsys, value):
    spec = dict(load_task("induction").data)
    text = json.dumps(spec, indent=1).replace(f'"min_length": {spec["min_length"]}', f'"min_length": {value}')
    path = tmp_path / "spec.json"
    path.write_text(text)
    refused(_evaluate(path), capsys, str(path), "invalid JSON")


def test_a_duplicate_key_in_a_spec_names_its_line(tmp_path, capsys):
    text = json.dumps(load_task("induction").data, indent=1)
    text = text.replace('"kind":', '"min_length": 3,\n "kind":', 1)
    path = tmp_path / "spec.json"
    path.write_text(text)
    second = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(' "min_length":')][1]
    refused(_evaluate(path), capsys, f"{path}:{second}: the key 'min_length' is given twice")


# --------------------------------------------------------------------------------------------
# Every input format: empty, truncated, binary, huge, wrong types


def _graph_files(folder) -> dict[str, bytes]:
    graph = ModelGraph(2, 2)
    scores = torch.linspace(-1, 1, graph.n_edges)
    circuit = Circuit(graph, scores.abs() > 0.5, scores, {"algorithm": "test"})
    suffixes = (".graphml", ".gexf", ".json", ".dot", ".mib.json")
    return {s: circuit.save(folder / f"good{s}", d_model=8).read_bytes() for s in suffixes}


TASK_FILES = {
    "jsonl": ("rows.jsonl", (json.dumps(ROW) + "\n").encode(), json.dumps({**ROW, "answers": 5}).encode()),
    "csv": ("rows.csv", f"clean,corrupted,answers\n{SHORT},{SHORT_X}, Mary\n".encode(), b"clean,corrupted\nx,y\n"),
    "auto-circuit": ("auto.json", json.dumps(_auto([AUTO_ROW])).encode(), json.dumps(_auto([5])).encode()),
    "eap-ig": (
        "eap.csv",
        f"clean,corrupted,correct_idx\n{SHORT},{SHORT_X},3\n".encode(),
        f"clean,corrupted,correct_idx\n{SHORT},{SHORT_X},Mary\n".encode(),
    ),
    "spec": ("spec.json", json.dumps(_template(), indent=1).encode(), json.dumps(_template(templates=5)).encode()),
}
DAMAGE = ("empty", "truncated", "binary", "huge", "wrong types")


def _damaged(good: bytes, wrong: bytes, damage: str, path) -> None:
    content = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "binary": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)),
        "huge": good,
        "wrong types": wrong,
    }[damage]
    with open(path, "wb") as f:
        f.write(content)
        if damage == "huge":
            f.truncate(2**31)  # 2 GB of holes after a valid start


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("fmt", list(TASK_FILES))
def test_every_task_format_damaged_is_one_line(tmp_path, capsys, fmt, damage):
    name, good, wrong = TASK_FILES[fmt]
    path = tmp_path / name
    _damaged(good, wrong, damage, path)
    refused(_evaluate(path), capsys, str(path), seconds=10)


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("suffix", [".graphml", ".gexf", ".json", ".dot", ".mib.json"])
def test_every_circuit_format_damaged_is_one_line(tmp_path, capsys, suffix, damage):
    good = _graph_files(tmp_path)[suffix]
    text = good.decode()
    wrong = {
        ".graphml": lambda: re.sub(r'(<data key="\w+">)2(</data>)', r"\1two\2", text, count=1),
        ".gexf": lambda: text.replace('value="true"', 'value="maybe"', 1),  # a boolean attribute
        ".json": lambda: json.dumps({**json.loads(text), "nodes": 5}),
        ".dot": lambda: text.replace('n_layers="2"', 'n_layers="two"', 1),
        ".mib.json": lambda: json.dumps({**json.loads(text), "edges": 5}),
    }[suffix]().encode()
    assert wrong != good
    path = tmp_path / f"bad{suffix}"
    _damaged(good, wrong, damage, path)
    refused(["export", path, tmp_path / "out.graphml"], capsys, str(path), seconds=10)
    assert not (tmp_path / "out.graphml").exists()
