"""Task specs as data: validation when a spec is loaded, the task folders, and the generic template kind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitfind.cli import main
from circuitfind.errors import TaskError
from circuitfind.tasks.batch import TaskBatch, available_tasks, generate_prompts, load_task, task_problems

SHIPPED = Path(__file__).resolve().parents[1] / "tasks"


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def _factual(**changes):
    data = json.loads((SHIPPED / "factual.json").read_text())
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def _template(**changes):
    data = json.loads((SHIPPED / "ioi_template.json").read_text())
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_factual(facts=None), r"bad\.json: missing key 'facts'"),
        (_factual(facts="Paris"), r"bad\.json:\d+: 'facts' must be a non-empty list .* got str"),
        (
            _factual(facts=[["Louvre", "Paris"], ["Kremlin"]]),
            r"bad\.json:\d+: facts\[1\] must be a \[subject, answer\]",
        ),
        (_factual(templates=[]), r"bad\.json:\d+: 'templates' must have at least 1 entries"),
        (_factual(templates=["The [SUBJECT] is in [CITY]"]), r"slot \[CITY\], which has no vocabulary"),
        (_factual(kind="poetry"), r"bad\.json:\d+: kind 'poetry' is not one of"),
        (_factual(kind=None), r"bad\.json: missing key 'kind'"),
        (_factual(corruptions={"str": "nope", "str_variants": {"subject_swap": "x"}}), r"'nope' is not one of"),
        (_template(templates=["When [X] met [Z] at the [PLACE]"]), r"slot \[Z\], which has no vocabulary"),
        (_template(vocab={"names": [], "places": ["a"], "objects": ["b"]}), r"'names' must have at least 1"),
        (_template(draw=[{"vars": ["IO"], "from": "people"}]), r"draws from 'people', which is not in 'vocab'"),
        (_template(answer=None), r"missing key 'answer'"),
        (_template(key_tokens={"IO": "NOBODY"}), r"key token 'IO' must name a variable"),
        ("[1, 2]", r"must be a JSON object"),
    ],
)
def test_bad_specs_are_one_task_error_naming_the_file(tmp_path, data, message):
    path = _write(tmp_path, "bad", data)
    with pytest.raises(TaskError, match=message):
        load_task(path)


def test_json_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "broken", '{\n  "kind": "ioi",\n  "names": ["Mary",,]\n}\n')
    with pytest.raises(TaskError, match=r"broken\.json:3: invalid JSON"):
        load_task(path)


def test_cli_reports_a_bad_spec_in_one_line_with_exit_2(tmp_path, capsys):
    path = _write(tmp_path, "nofacts", _factual(facts=None))
    assert main(["evaluate", "--task", str(path), "--model", "toy-ioi", "--prompts", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"circuitfind: error: {path}: missing key 'facts'")


def test_tasks_dir_adds_to_the_shipped_tasks_and_wins_a_clash(tmp_path, monkeypatch, capsys):
    _write(tmp_path, "mine", _factual(name="mine"))
    _write(tmp_path, "factual", _factual(name="my factual"))
    _write(tmp_path, "broken", _factual(facts=None))
    monkeypatch.setenv("CIRCUITFIND_TASKS_DIR", str(tmp_path))
    assert {"ioi", "induction", "factual", "mine", "broken"} <= set(available_tasks())
    assert load_task("factual").name == "my factual" and load_task("ioi").kind == "ioi"
    assert task_problems()["broken"] is not None and task_problems()["mine"] is None
    assert main(["tasks"]) == 0
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in capsys.readouterr().out.splitlines())
    assert lines["broken"].startswith("INVALID:") and "missing key 'facts'" in lines["broken"]
    assert lines["mine"] == "" and lines["ioi"] == ""


@pytest.mark.slow
def test_sweep_refuses_a_bad_spec_before_prefect_starts(tmp_path):
    """The grid check loads every task, so a malformed spec fails in well under Prefect's start-up time."""
    path = _write(tmp_path, "nofacts", _factual(facts=None))
    cmd = [sys.executable, "-m", "circuitfind", "sweep", "--tasks", str(path), "--models", "toy-ioi"]
    cmd += ["--run", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"circuitfind: error: {path}: missing key 'facts' (a non-empty list of [subject, answer] pairs)"
    ]


def test_shipped_specs_are_valid():
    assert all(problem is None for problem in task_problems().values()), task_problems()


def test_ioi_template_spec_gives_the_ioi_generators_prompts():
    for seed in (0, 3):
        a, b = generate_prompts("ioi", 30, seed=seed), generate_prompts("ioi_template", 30, seed=seed)
        for x, y in zip(a, b, strict=True):
            assert (x.text, dict(x.corrupted), dict(x.key_chars), x.template) == (
                y.text,
                dict(y.corrupted),
                dict(y.key_chars),
                y.template,
            )
            assert (x.answer, x.counter_answer) == (y.answer, y.counter_answer)  # both with the space: " Mary"


def test_ioi_template_spec_builds_the_same_batch_on_toy_ioi(ioi_model):
    a = TaskBatch.build(ioi_model, "ioi", 24, seed=3)
    b = TaskBatch.build(ioi_model, "ioi_template", 24, seed=3)
    assert torch.equal(a.clean_tokens, b.clean_tokens)
    assert a.corrupted_tokens.keys() == b.corrupted_tokens.keys()
    for v in a.corrupted_tokens:
        assert torch.equal(a.corrupted_tokens[v], b.corrupted_tokens[v])
    assert torch.equal(a.answers, b.answers) and torch.equal(a.counter_answers, b.counter_answers)
    assert a.positions.keys() == b.positions.keys()
    for k in a.positions:
        assert torch.equal(a.positions[k], b.positions[k])
    assert torch.equal(a.key_position_mask(), b.key_position_mask())


def test_template_answer_sets_by_comparison_and_single_token_rule(tmp_path, ioi_model):
    spec = {
        "kind": "template",
        "vocab": {"yy": ["02", "50", "98"], "years": [f"{y:02d}" for y in range(100)]},
        "draw": [{"vars": ["YY"], "from": "yy"}],
        "templates": ["The war lasted from the year 17[YY] to the year 17"],
        "answers": {"from": "years", "compare": ">", "to": "[YY]"},
        "counter_answers": {"from": "years", "compare": "<=", "to": "[YY]"},
        "key_tokens": {"YY": "YY"},
        "single_token": ["YY"],
        "corruptions": {"str": "01", "str_variants": {"01": {"description": "YY -> 01", "substitute": {"YY": "01"}}}},
    }
    for p in generate_prompts(load_task(_write(tmp_path, "gt", spec)), 12, seed=1):
        yy = int(p.text.split("year 17")[1][:2])
        assert p.corrupted["01"] == p.text.replace(f"17{yy:02d}", "1701", 1)
        assert {int(a) for a in p.answer_set} == set(range(yy + 1, 100))
        assert {int(a) for a in p.counter_answer_set} == set(range(yy + 1))
        assert p.answer == p.answers[0] and p.key_chars["YY"] == p.text.index("17") + 2
    # the per-model rule: a slot value that is two tokens for this tokenizer is refused, naming the slot
    spec["vocab"]["yy"] = ["Mary John"]
    spec["templates"] = ["When [YY] went to the store, John gave a drink to"]
    spec["answers"], spec["counter_answers"] = [" Mary"], [" John"]
    spec["corruptions"]["str_variants"]["01"]["substitute"] = {"YY": "Anna Paul"}
    with pytest.raises(TaskError, match=r"\[YY\] = 'Mary John' is 2 tokens"):
        TaskBatch.build(ioi_model, load_task(_write(tmp_path, "gt2", spec)), 4)


def test_factual_subject_swap_does_not_assume_a_leading_space(tmp_path, ioi_model):
    """A subject at the start of a word-boundary-less slot ("[SUBJECT]'s") is measured in context."""
    names = ["Mary", "John", "Alice", "Bob", "Sarah", "Tom"]
    spec = _factual(
        facts=[[n, m] for n, m in zip(names, names[1:] + names[:1], strict=True)],
        templates=["[SUBJECT]'s friend gave a drink to"],
        key_tokens=["subject"],
    )
    batch = TaskBatch.build(ioi_model, load_task(_write(tmp_path, "poss", spec)), 12, seed=0)
    assert batch.corrupted("subject_swap").shape == batch.clean_tokens.shape
    assert (batch.corrupted("subject_swap") != batch.clean_tokens).any(1).all()
