"""Answer sets of multi-token answers (circuitfind.tasks.multitoken's trie layout and set metrics), checked
against plain forward passes of every whole answer, the patching invariants, passes split by memory,
Gaussian-noise samples, and exact greater-than on SmolLM2 (Hanna et al. 2023 over two-token years)."""

import dataclasses
import json
import math

import pytest
import torch
from _forcing import forced_log_prob

from circuitfind import patching as P
from circuitfind.edge_patching import EdgePatcher
from circuitfind.errors import MetricError, TaskError
from circuitfind.methods import discover as discovery
from circuitfind.models import fetch
from circuitfind.patching import memory
from circuitfind.tasks import multitoken
from circuitfind.tasks.batch import Prompt, TaskBatch, encode, generate_prompts
from circuitfind.tasks.corruptions import GaussianNoise


def _log_prob(model, prompt: str, answer: str, clean_prompt: str | None = None) -> float:
    return forced_log_prob(model, prompt, answer, clean_prompt)


def _set_prompts(n: int, seed: int = 0, template: int | None = None) -> list[Prompt]:
    """IOI prompts with R = {IO and S, IO gave, IO went} (three answers sharing prefixes, none beginning
    another) and R' = {S and, S gave}."""
    pool = generate_prompts("ioi", n if template is None else 20 * n, seed=seed)
    pool = [p for p in pool if template is None or p.template == template][:n]
    out = []
    for p in pool:
        io, s = p.answer, p.counter_answer
        answers = (io + " and" + s, io + " gave", io + " went")
        out.append(dataclasses.replace(p, answers=answers, counter_answers=(s + " and", s + " gave")))
    return out


@pytest.fixture(scope="module")
def sets(ioi_model):
    prompts = _set_prompts(6)
    return prompts, TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi", key_tokens=["IO", "S1", "S2"])


def _masses(model, prompts, corrupted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prompts, |R|]`` and ``[prompts, |R'|]`` log-probabilities of every whole answer."""

    def lp(p, a):
        return _log_prob(model, p.corrupted["abc"] if corrupted else p.text, a, p.text)

    return (
        torch.tensor([[lp(p, a) for a in p.answers] for p in prompts]),
        torch.tensor([[lp(p, a) for a in p.counter_answers] for p in prompts]),
    )


def test_every_set_metric_equals_its_rule_over_whole_answers(ioi_model, sets):
    prompts, batch = sets
    n = len(prompts)
    rules = {
        "prob": lambda r, w: r.exp().sum(-1),
        "prob_diff": lambda r, w: r.exp().sum(-1) - w.exp().sum(-1),
        "logprob": lambda r, w: r.logsumexp(-1),
        "logprob_diff": lambda r, w: r.logsumexp(-1) - w.logsumexp(-1),
        "logit_diff": lambda r, w: r.mean(-1) - w.mean(-1),
    }
    clean, corrupt = _masses(ioi_model, prompts, False), _masses(ioi_model, prompts, True)
    for name, rule in rules.items():
        setup = P.prepare(ioi_model, batch, "str:abc", name)
        # one row per distinct proper prefix: the prompt, + IO, + IO and, + S
        assert setup.batch.layout == "trie" and setup.size == 4 * n
        assert isinstance(setup.metric, multitoken.SequenceSetMetric)
        assert setup.clean_value == pytest.approx(rule(*clean).mean().item(), abs=1e-5), name
        assert setup.corrupt_value == pytest.approx(rule(*corrupt).mean().item(), abs=1e-5), name
        per_prompt = multitoken.by_prompt(setup.metric(setup.clean_logits, setup.ctx), setup.ctx.prompt_index, n)
        assert per_prompt.tolist() == pytest.approx(rule(*clean).tolist(), abs=1e-5), name
    # kl adds over the rows: -sum of KL(clean || corrupted) at every prefix row
    kl = P.prepare(ioi_model, batch, "str:abc", "kl")
    rows = kl.batch
    with torch.no_grad():
        lc = ioi_model(rows.clean_tokens).float().log_softmax(-1)
        lx = ioi_model(rows.corrupted_tokens["abc"]).float().log_softmax(-1)
    at = torch.arange(rows.size)
    lc, lx = lc[at, rows.end_pos], lx[at, rows.end_pos]
    want = -(lc.exp() * (lc - lx)).sum(-1).sum().item() / n
    assert kl.corrupt_value == pytest.approx(want, abs=1e-4)


def test_prob_metrics_of_one_answer_each_in_the_chain_layout(ioi_model):
    prompts = [
        dataclasses.replace(p, answer=p.answer + " and", counter_answer=p.counter_answer + " and")
        for p in generate_prompts("ioi", 4, seed=5)
    ]
    batch = TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi")
    setup = P.prepare(ioi_model, batch, "str", "prob_diff")
    assert setup.batch.layout == "chain" and isinstance(setup.metric, multitoken.SequenceSetMetric)
    a = torch.tensor([_log_prob(ioi_model, p.text, p.answer) for p in prompts])
    b = torch.tensor([_log_prob(ioi_model, p.text, p.counter_answer) for p in prompts])
    assert setup.clean_value == pytest.approx((a.exp() - b.exp()).mean().item(), abs=1e-5)
    assert setup.baselines("prob")[0] == pytest.approx(a.exp().mean().item(), abs=1e-5)


def test_patching_invariants_and_passes_that_never_split_a_prompt(ioi_model, sets):
    """Patch nothing: clean; everything: corrupted (node and edge patching). A memory budget of one row
    per pass makes every pass one prompt's rows (the set metric refuses a split prompt), with the values
    of one pass; EAP's per-prompt scores group into prompts."""
    _, batch = sets
    setup = P.prepare(ioi_model, batch, "str", "prob_diff")
    resid = "blocks.0.hook_resid_pre"
    masks = {resid: torch.tensor([0.0, 1.0])[:, None, None, None].expand(2, 1, setup.n_pos, 1)}
    values = P.run_patched(setup, "noise", masks).mean(-1)
    assert values.tolist() == pytest.approx([setup.clean_value, setup.corrupt_value], abs=1e-5)
    heads = P.patch_heads(setup, "noise")
    assert heads.per_prompt.shape[-1] == 6 and torch.allclose(heads.per_prompt.mean(-1), heads.values, atol=1e-6)
    patcher = EdgePatcher(setup)
    ones = patcher.ones()[0]
    torch.manual_seed(0)
    keep = torch.stack([ones, torch.zeros_like(ones), (torch.rand_like(ones) > 0.5).float()])
    whole = patcher.run(keep)
    assert whole.mean(-1)[:2].tolist() == pytest.approx([setup.clean_value, setup.corrupt_value], abs=1e-5)
    tight = EdgePatcher(P.prepare(ioi_model, batch, "str", "prob_diff", max_batch=1, max_memory=1))
    assert len(tight.passes(1)) == 6  # one prompt's 4 rows per pass
    torch.testing.assert_close(tight.run(keep), whole, atol=1e-5, rtol=1e-5)
    found = discovery.discover(setup, "eap", "noise", top_k=10, per_prompt=True, curve=False)
    assert found.per_prompt.shape == (patcher.n_edges, 6)
    torch.testing.assert_close(found.per_prompt.mean(-1), discovery.eap(patcher), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(discovery.eap(tight), discovery.eap(patcher), atol=1e-6, rtol=1e-5)


def test_a_split_prompt_is_refused(ioi_model, sets):
    _, batch = sets
    setup = P.prepare(ioi_model, batch, "str", "prob_diff")
    part = torch.arange(6)  # prompt 0's four rows and half of prompt 1's
    with pytest.raises(MetricError, match="prompt 1's teacher-forced rows were split between passes"):
        setup.metric(setup.clean_logits[part], setup.ctx.take(part))


def test_answers_that_repeat_or_begin_another_are_refused(ioi_model, tmp_path, capsys):
    from circuitfind.cli import main

    p = generate_prompts("ioi", 1, seed=0)[0]
    io, s = p.answer, p.counter_answer
    cases = [
        (dict(answers=(io, io + " and"), counter_answers=(s,)), r"correct answer tokens \[\d+\] begin correct answer"),
        (dict(answers=(io,), counter_answers=(s, s + " gave")), r"wrong answer tokens \[\d+\] begin wrong answer"),
        (dict(answers=(io, io), counter_answers=(s,)), r"the correct answers list .* twice"),
        (dict(answers=(io,), counter_answers=(io,)), r"is both a correct and a wrong answer"),
    ]
    for change, message in cases:
        prompt = dataclasses.replace(p, **change)
        with pytest.raises(TaskError, match=message):
            P.prepare(ioi_model, TaskBatch.from_prompts(ioi_model, [prompt], answer_tokens="multi"), "str", "prob")
    # a correct answer may begin a wrong one, in either layout (one rule per prompt, whatever its batch)
    across = dataclasses.replace(p, answers=(io,), counter_answers=(io + " and",))
    other = dataclasses.replace(p, answers=(io + " and", io + " gave"), counter_answers=(s,))
    for prompts in ([across], [across, other]):
        setup = P.prepare(
            ioi_model, TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi"), "str", "prob_diff"
        )
        a, b = (_log_prob(ioi_model, p.text, x) for x in (io, io + " and"))
        values = multitoken.by_prompt(setup.metric(setup.clean_logits, setup.ctx), setup.ctx.prompt_index, len(prompts))
        assert values[0].item() == pytest.approx(math.exp(a) - math.exp(b), abs=1e-5)
    # single-token sets too: a repeated answer would count its mass twice
    with pytest.raises(TaskError, match=r"prompt 0 .*: the correct answers list .* twice"):
        TaskBatch.from_prompts(ioi_model, [dataclasses.replace(p, answers=(io, io))])
    # and from a dataset file: one line naming the file and the line, exit 2
    data = tmp_path / "dup.jsonl"
    data.write_text(json.dumps({"clean": p.text, "corrupted": p.corrupted["abc"], "answers": [io, io]}) + "\n")
    assert main(["evaluate", "--model", "toy-ioi", "--task", str(data), "-n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"circuitfind: error: {data}:1: 'answers' lists {io!r} twice; a set holds each answer once"
    # a set whose answers begin each other is seen once the rows are tokenised: still FILE:LINE, exit 2
    data = tmp_path / "prefix.jsonl"
    row = {"clean": p.text, "corrupted": p.corrupted["abc"], "answers": [io, io + " and"], "counter_answers": [s]}
    data.write_text(json.dumps(row) + "\n")
    spec = tmp_path / "prefix.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": "prefix.jsonl", "answer_tokens": "multi"}))
    assert main(["discover", "--model", "toy-ioi", "--task", str(spec), "-n", "1", "--metric", "prob_diff"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitfind: error: prefix.jsonl:1: correct answer tokens") and "\n" not in err


def test_the_schedule_starts_passes_only_where_allowed():
    assert memory.schedule(1, 10, 3) == [(slice(0, 1), slice(a, min(a + 3, 10))) for a in range(0, 10, 3)]
    starts = [0, 4, 8]  # three prompts of 4, 4 and 2 rows
    assert [p for _, p in memory.schedule(1, 10, 5, starts=starts)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert [p for _, p in memory.schedule(1, 10, 8, starts=starts)] == [slice(0, 8), slice(8, 10)]
    # a prompt larger than the budget is one pass of its own
    assert [p for _, p in memory.schedule(2, 10, 2, starts=starts)] == [slice(0, 4), slice(4, 8), slice(8, 10)] * 2


def test_gaussian_noise_samples_are_scored_per_copy(ioi_model):
    prompts = _set_prompts(4, seed=1, template=0)
    batch = TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi", key_tokens=["IO", "S1", "S2"])
    gn = P.prepare(ioi_model, batch, GaussianNoise(samples=3), "prob_diff")
    assert gn.size == 3 * gn.batch.size
    # each noise sample's rows scored on their own: the mean of three separate evaluations
    rows = gn.batch.size
    ctx = gn.batch.metric_context()
    single = [gn.metric(gn.corrupt_logits[k * rows : (k + 1) * rows], ctx).mean().item() for k in range(3)]
    assert gn.corrupt_value == pytest.approx(sum(single) / 3, abs=1e-6)
    patcher = EdgePatcher(gn)
    ones = patcher.ones()[0]
    keep = torch.stack([ones, torch.zeros_like(ones)])
    assert patcher.value(keep).tolist() == pytest.approx([gn.clean_value, gn.corrupt_value], abs=1e-5)
    # a budget of one row per pass: one pass per prompt in every noise copy, the same values
    tight = EdgePatcher(P.prepare(ioi_model, batch, GaussianNoise(samples=3), "prob_diff", max_batch=1, max_memory=1))
    assert len(tight.passes(1)) == 3 * 4
    torch.testing.assert_close(tight.run(keep), patcher.run(keep), atol=1e-5, rtol=1e-5)


def test_one_token_answers_declared_multi_equal_single_tokens_under_gaussian_noise(ioi_model):
    """Every row of a prompt takes its prompt's noise draw, so the chain layout's rows of a and of b see
    the same noised input, as the single-token batch's one row does."""
    prompts = generate_prompts("ioi", 8, seed=2)
    single = TaskBatch.from_prompts(ioi_model, prompts, key_tokens=["IO", "S1", "S2"])
    multi = TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi", key_tokens=["IO", "S1", "S2"])
    for metric in ("logit_diff", "prob_diff", "logprob_diff"):
        one = P.prepare(ioi_model, single, GaussianNoise(samples=2), metric)
        whole = P.prepare(ioi_model, multi, GaussianNoise(samples=2), metric)
        assert whole.corrupt_value == pytest.approx(one.corrupt_value, abs=1e-5), metric
        assert whole.clean_value == pytest.approx(one.clean_value, abs=1e-5), metric


def test_evaluate_with_answer_sets(ioi_model, sets):
    from circuitfind.tasks.evaluation import evaluate

    prompts, batch = sets
    report = evaluate(ioi_model, batch, corruptions=("str:abc",))
    r, w = _masses(ioi_model, prompts, False)
    assert report.prob_diff == pytest.approx((r.exp().sum(-1) - w.exp().sum(-1)).mean().item(), abs=1e-5)
    assert report.logit_diff == pytest.approx((r.mean(-1) - w.mean(-1)).mean().item(), abs=1e-4)
    assert report.teacher_forced and "accuracy (greedy in R)" in report.format()
    assert report.pair_accuracy == (r.amax(-1) > w.amax(-1)).float().mean().item()
    assert report.pair_chance == pytest.approx(3 / 5)
    greedy = []
    for p in prompts:  # greedy decoding from the prompt reaches one of R's answers
        hits = []
        for a in p.answers:
            full, k = encode(ioi_model, p.text + a), len(encode(ioi_model, p.text))
            with torch.no_grad():
                top = ioi_model(torch.tensor([full]))[0, k - 1 : len(full) - 1].argmax(-1)
            hits.append(top.tolist() == full[k:])
        greedy.append(any(hits))
    assert report.accuracy == pytest.approx(sum(greedy) / len(greedy))
    c, d = _masses(ioi_model, prompts, True)
    want = (c.exp().sum(-1) - d.exp().sum(-1)).mean().item()
    assert report.corrupted["str:abc"]["prob_diff"] == pytest.approx(want, abs=1e-5)


@pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="SmolLM2 not in the cache")
@pytest.mark.slow  # loads SmolLM2-135M; 22 teacher-forced rows
def test_greater_than_years_is_hanna_et_al_probability_difference_on_smollm2():
    """SmolLM2 writes each digit as a token: prob_diff of greater_than_years is
    sum_{y > YY} p(y) - sum_{y <= YY} p(y) over the 100 two-digit years, p(y) = p(tens) p(ones | tens),
    here from 11 plain forward passes per prompt."""
    from circuitfind.models.loading import load_model

    smol = load_model("smollm2-135m", device="cpu")
    batch = TaskBatch.build(smol, "greater_than_years", 2, seed=4)
    setup = P.prepare(smol, batch, "str", "prob_diff")
    assert setup.batch.layout == "trie" and setup.size == 22
    want = []
    for p in batch.prompts:
        yy = int(p.text.split(" to the year")[0][-2:])
        head = encode(smol, p.text)
        total = 0.0
        for tens in range(10):
            (t,) = encode(smol, p.text + str(tens))[len(head) :]
            with torch.no_grad():
                lp = smol(torch.tensor([head + [t]])).float().log_softmax(-1)[0]
            for ones in range(10):
                (o,) = encode(smol, p.text + f"{tens}{ones}")[len(head) + 1 :]
                prob = math.exp(lp[-2, t].item() + lp[-1, o].item())
                total += prob if 10 * tens + ones > yy else -prob
        want.append(total)
    assert setup.clean_value == pytest.approx(sum(want) / 2, abs=1e-4)
    assert setup.clean_value > 0.5 > setup.corrupt_value
