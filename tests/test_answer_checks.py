"""Answers the model does not make, index columns that are labels, special tokens (issue 25)."""

from __future__ import annotations

import csv
import json

import pytest

from circuitfind.errors import TaskError
from circuitfind.tasks.batch import Prompt, TaskBatch, generate_prompts
from circuitfind.tasks.evaluation import answer_checks, evaluate


def _with_answers(prompts, answer, counter=None):
    return [Prompt(p.text, answer or p.answer, counter or p.counter_answer, p.corrupted, p.key_chars) for p in prompts]


def test_an_answer_the_model_never_predicts_is_warned_and_a_task_of_them_refused(ioi_model):
    prompts = generate_prompts("ioi", 6, seed=0)
    assert answer_checks(ioi_model, TaskBatch.from_prompts(ioi_model, prompts)) == []
    odd = prompts[:5] + _with_answers(prompts[5:], " store")
    (warning,) = answer_checks(ioi_model, TaskBatch.from_prompts(ioi_model, odd))
    assert warning.startswith("in 1 of 6 prompts the model almost never predicts the correct answers' first token")
    assert "' store'" in warning and "leading space missing" in warning
    with pytest.raises(TaskError, match="every correct answer of every prompt probability below 1e-06"):
        answer_checks(ioi_model, TaskBatch.from_prompts(ioi_model, _with_answers(prompts, " When")))


def test_evaluate_warns_when_the_corrupted_run_scores_higher_than_the_clean_run(ioi_model):
    prompts = generate_prompts("ioi", 6, seed=0)
    swapped = [Prompt(p.text, p.counter_answer, p.answer, p.corrupted, p.key_chars) for p in prompts]
    report = evaluate(ioi_model, TaskBatch.from_prompts(ioi_model, swapped), corruptions=("str",))
    assert any("the corrupted run (str) scores higher than the clean run" in w for w in report.warnings)
    assert "WARNING: the corrupted run (str)" in report.format()
    assert not evaluate(ioi_model, TaskBatch.from_prompts(ioi_model, prompts), corruptions=("str",)).warnings


def test_a_missing_leading_space_is_named(random_gpt2):
    tok = random_gpt2.tokenizer
    prompt = "The capital of Italy is"
    words = (tok(" Rome", add_special_tokens=False)["input_ids"], tok("Rome", add_special_tokens=False)["input_ids"])
    assert [len(w) for w in words] == [1, 2]  # the premise
    p = Prompt(prompt, "Rome", " Paris", {"c": "The capital of France is"}, {})
    with pytest.raises(TaskError, match=r"\(' Rome' is one token: is a leading space missing\?\)"):
        TaskBatch.from_prompts(random_gpt2, [p])
    batch = TaskBatch.from_prompts(random_gpt2, [p], answer_tokens="multi")
    assert any(
        "answer 'Rome' is 2 tokens but ' Rome' is one: is the leading space missing?" in w
        for w in answer_checks(random_gpt2, batch)
    )


def _eap_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "correct_idx", "incorrect_idx"])
        w.writerows(rows)


GT = [
    ["The war lasted from the year 1751 to the year 17", "The war lasted from the year 1701 to the year 17", 51, 1],
    ["The deal lasted from the year 1634 to the year 16", "The deal lasted from the year 1601 to the year 16", 34, 1],
]


def test_greater_than_labels_are_not_read_as_token_ids(tmp_path, random_gpt2):
    """Hanna et al.'s greater-than CSV holds year labels in correct_idx: read as token ids, 51 was 'C'."""
    path = tmp_path / "greater_than_data.csv"
    _eap_csv(path, GT)
    with pytest.raises(TaskError, match=r"every correct_idx / incorrect_idx is below 100 .*\"idx\": \"label\""):
        TaskBatch.build(random_gpt2, str(path), 2)
    spec = tmp_path / "gt.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": path.name, "idx": "label", "labels": "{:02d}"}))
    batch = TaskBatch.build(random_gpt2, str(spec), 2)
    assert [(p.answer, p.counter_answer) for p in batch.prompts] == [("51", "01"), ("34", "01")]
    spec.write_text(json.dumps({"kind": "dataset", "file": path.name, "idx": "label", "labels": {"51": "51"}}))
    with pytest.raises(TaskError, match=r'greater_than_data.csv:2: incorrect_idx = 1 has no answer in "labels"'):
        TaskBatch.build(random_gpt2, str(spec), 2)
    spec.write_text(json.dumps({"kind": "dataset", "file": path.name, "idx": "tokens"}))
    with pytest.raises(TaskError, match=r'"idx" must be "token" or "label"'):
        TaskBatch.build(random_gpt2, str(spec), 2)


def test_special_tokens_are_refused_as_answers(tmp_path, random_gpt2):
    path = tmp_path / "eap.csv"
    _eap_csv(path, [[GT[0][0], GT[0][1], 50256, 2091]])
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": path.name, "idx": "token"}))
    with pytest.raises(TaskError, match=r"eap.csv:2: correct_idx = 50256 is the special token '<\|endoftext\|>'"):
        TaskBatch.build(random_gpt2, str(spec), 1)
    p = Prompt("The meeting is on a", "<|endoftext|>", " Monday", {"c": "The meeting is on the"}, {})
    with pytest.raises(TaskError, match=r"answer has the special token '<\|endoftext\|>' \(id 50256\)"):
        TaskBatch.from_prompts(random_gpt2, [p])


def test_extra_columns_have_one_type_in_csv_and_jsonl(tmp_path):
    """Numbers in CSV columns reached the metric as lists of strings, in JSONL as tensors: the README's
    ``ctx.extra["weight"].to(logits)`` crashed on a CSV."""
    import torch

    from circuitfind.tasks.batch import load_task
    from circuitfind.tasks.metrics import extra_columns

    rows = [
        {"clean": "a b c", "corrupted": "a b d", "answers": " x", "weight": 2, "scale": 0.5, "id": "007"},
        {"clean": "a b e", "corrupted": "a b f", "answers": " y", "weight": 3, "scale": -1e-3, "id": "012"},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    columns = {}
    for name in ("pairs.jsonl", "pairs.csv"):
        prompts = generate_prompts(load_task(str(tmp_path / name)), 2)
        columns[name] = extra_columns([{k: v for k, v in p.extra.items() if k != "source"} for p in prompts])
    for key in ("weight", "scale"):
        assert isinstance(columns["pairs.csv"][key], torch.Tensor)
        assert torch.equal(columns["pairs.csv"][key], columns["pairs.jsonl"][key]), key
    assert columns["pairs.csv"]["id"] == columns["pairs.jsonl"]["id"] == ["007", "012"]
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": "pairs.csv", "columns": {"id": "number"}}))
    with pytest.raises(TaskError, match=r"pairs.csv:2: column 'id' is declared a number, got '007'"):
        generate_prompts(load_task(str(spec)), 2)
    spec.write_text(json.dumps({"kind": "dataset", "file": "pairs.csv", "columns": {"id": "int"}}))
    with pytest.raises(TaskError, match=r'"columns" must map column names to "number" or "text"'):
        load_task(str(spec))


def _greater_prob(a):
    p = a.logprobs.exp()
    return (p * a.correct).sum(-1) - (p * a.wrong).sum(-1)


def test_a_metric_over_whole_answers_scores_multi_token_answers(tmp_path, monkeypatch, random_gpt2):
    """A researcher's own metric was refused on multi-token answers; one over whole answers (per-prompt
    answer log-probabilities) gives the built-in set metric's numbers."""
    from circuitfind import patching as P
    from circuitfind.tasks import multitoken
    from circuitfind.tasks.metrics import answer_metric

    prompts = [
        Prompt("The capital of Italy is", " Rome", " Berlin", {"c": "The capital of Spain is"}, {}),
        Prompt("The capital of Spain is", " Madrid", " Beethoven", {"c": "The capital of Italy is"}, {}),
    ]
    batch = TaskBatch.from_prompts(random_gpt2, prompts, answer_tokens="multi")
    assert max(len(s) for p in batch.counter_sequences for s in p) == 3  # " Beethoven": answers of any length
    mine = P.prepare(random_gpt2, batch, "str", answer_metric(_greater_prob))
    builtin = P.prepare(random_gpt2, batch, "str", "prob_diff")
    assert mine.clean_value == pytest.approx(builtin.clean_value, rel=1e-5, abs=1e-9)
    assert mine.corrupt_value == pytest.approx(builtin.corrupt_value, rel=1e-5, abs=1e-9)
    (tmp_path / "whole_metrics.py").write_text(
        "from circuitfind.tasks.metrics import answer_metric\n"
        "@answer_metric\ndef greater(a):\n    p = a.logprobs.exp()\n    return (p * a.correct).sum(-1) - (p * a.wrong).sum(-1)\n"
        "def logits_only(logits, ctx):\n    return logits[:, 0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    multitoken.check_metric("t", "whole_metrics:greater")  # accepted by import path, before a model loads
    with pytest.raises(TaskError, match="metric 'whole_metrics:logits_only' cannot score them"):
        multitoken.check_metric("t", "whole_metrics:logits_only")


def test_a_metric_over_whole_answers_on_one_token_answers_is_the_token_metric(ioi_model, ioi_batch):
    from circuitfind import patching as P
    from circuitfind.tasks.metrics import answer_metric

    @answer_metric
    def log_diff(a):
        import torch

        def log_mass(side):
            return a.logprobs.masked_fill(~side, -torch.inf).logsumexp(-1)

        return log_mass(a.correct) - log_mass(a.wrong)

    mine = P.prepare(ioi_model, ioi_batch, "str", log_diff)
    builtin = P.prepare(ioi_model, ioi_batch, "str", "logprob_diff")
    assert (mine.clean_value, mine.corrupt_value) == pytest.approx((builtin.clean_value, builtin.corrupt_value))


def test_an_answer_whose_twin_is_far_more_probable_is_warned(random_gpt2):
    """SmolLM2 gives "Rome" after "The capital of Italy is" p = 8e-4 and " Rome" 0.48; " 52" after "... to
    the year 17" p = 5e-6 and "52" 0.39. The rule, on a distribution set to those numbers (GPT-2 splits "Rome",
    so "Paris", one token with or without its space, stands in)."""
    import torch

    from circuitfind.tasks.evaluation import _spacing_warning

    tok = random_gpt2.tokenizer
    cases = [
        ("The capital of France is", "Paris", " Paris", 8e-4, 0.48, "missing"),
        ("The war lasted from the year 1751 to the year 17", " 52", "52", 5e-6, 0.39, "extra"),
    ]
    for prompt, answer, twin, p, q, what in cases:
        batch = TaskBatch.from_prompts(random_gpt2, [Prompt(prompt, answer, "", {}, {})], answer_tokens="multi")
        probs = torch.zeros(1, len(tok))
        probs[0, batch.answer_sequences[0][0][0]] = p
        probs[0, tok(prompt + twin, add_special_tokens=False)["input_ids"][len(tok(prompt)["input_ids"]) - 1]] = q
        warning = _spacing_warning(random_gpt2, batch, probs)
        assert (
            warning is not None and f"where {twin!r} starts with p = {q:.2g}: is the leading space {what}?" in warning
        )
        probs[0, batch.answer_sequences[0][0][0]] = q  # as probable as its twin: no warning
        assert _spacing_warning(random_gpt2, batch, probs) is None
