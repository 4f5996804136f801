"""Multi-token answers scored by teacher forcing (circuitfind.tasks.multitoken), checked against plain forward
passes of the whole sequence, the patching invariants, a dataset through `discover`, and the refusals."""

import dataclasses
import json

import pytest
import torch
from _forcing import forced_log_prob

from circuitfind import patching as P
from circuitfind.cli import main
from circuitfind.edge_patching import EdgePatcher
from circuitfind.errors import TaskError
from circuitfind.methods import discover as discovery
from circuitfind.methods.ifr import ifr_scores
from circuitfind.models import fetch
from circuitfind.models.bpe import tokenizer_dir
from circuitfind.names import hook_name
from circuitfind.runs.study import prepare_recording
from circuitfind.tasks import multitoken
from circuitfind.tasks.batch import Prompt, TaskBatch, encode, generate_prompts
from circuitfind.tasks.corruptions import GaussianNoise


def _log_prob(model, prompt: str, answer: str) -> float:
    return forced_log_prob(model, prompt, answer)


def _forced(model, prompt: str, clean_prompt: str, answer: str) -> float:
    return forced_log_prob(model, prompt, answer, clean_prompt)


def _ioi_multi(model, n: int, seed: int = 0, template: int | None = None) -> tuple[list[Prompt], TaskBatch]:
    """IOI prompts whose answers are 3 tokens (" Mary and John") and 2 tokens (" John and"), alternating
    (``template``: only prompts of that template, which share a token length)."""
    prompts = []
    pool = generate_prompts("ioi", n if template is None else 20 * n, seed=seed)
    pool = [p for p in pool if template is None or p.template == template][:n]
    for i, p in enumerate(pool):
        a, b = (p.answer + " and" + p.counter_answer, p.counter_answer + " and" + p.answer)
        if i % 2:
            a, b = p.answer + " and", p.counter_answer + " and"
        prompts.append(dataclasses.replace(p, answer=a, counter_answer=b))
    return prompts, TaskBatch.from_prompts(model, prompts, answer_tokens="multi", key_tokens=["IO", "S1", "S2"])


@pytest.fixture(scope="module")
def multi(ioi_model):
    return _ioi_multi(ioi_model, 6)


def test_teacher_forced_log_probability_equals_the_full_sequence(ioi_model, multi):
    prompts, batch = multi
    assert [len(s) for (s,) in batch.answer_sequences] == [3, 2, 3, 2, 3, 2]
    clean = [_log_prob(ioi_model, p.text, p.answer) for p in prompts]
    counter = [_log_prob(ioi_model, p.text, p.counter_answer) for p in prompts]
    corrupt = [_forced(ioi_model, p.corrupted["abc"], p.text, p.answer) for p in prompts]
    n = len(prompts)
    setup = P.prepare(ioi_model, batch, "str:abc", "logprob")
    assert isinstance(setup.batch, multitoken.AnswerRows) and setup.size == 2 * (3 + 2) * n // 2
    assert setup.clean_value == pytest.approx(sum(clean) / n, abs=1e-4)
    assert setup.corrupt_value == pytest.approx(sum(corrupt) / n, abs=1e-4)
    diff = P.prepare(ioi_model, batch, "str:abc", "logprob_diff")
    assert diff.clean_value == pytest.approx(sum(a - b for a, b in zip(clean, counter, strict=True)) / n, abs=1e-4)
    # logit_diff of a multi-token answer is the same log-probability difference
    assert P.prepare(ioi_model, batch, "str:abc", "logit_diff").clean_value == pytest.approx(diff.clean_value, 1e-6)
    # rows summed back into prompts give each prompt's own value
    per_row = diff.metric(diff.clean_logits, diff.ctx)
    per_prompt = multitoken.by_prompt(per_row, diff.ctx.prompt_index, n)
    assert per_prompt.tolist() == pytest.approx([a - b for a, b in zip(clean, counter, strict=True)], abs=1e-4)
    # the other metric's baselines from the same rows
    assert diff.baselines("logprob")[0] == pytest.approx(setup.clean_value, abs=1e-5)


def test_kl_sums_over_the_answer_tokens(ioi_model, multi):
    prompts, batch = multi
    setup = P.prepare(ioi_model, batch, "str:abc", "kl")
    want = []
    for p in prompts:
        full, bad = encode(ioi_model, p.text + p.answer), encode(ioi_model, p.corrupted["abc"])
        n_prompt = len(encode(ioi_model, p.text))
        bad = bad + full[n_prompt:]
        with torch.no_grad():
            lc = ioi_model(torch.tensor([full])).float().log_softmax(-1)[0, n_prompt - 1 : len(full) - 1]
            lx = ioi_model(torch.tensor([bad])).float().log_softmax(-1)[0, n_prompt - 1 : len(full) - 1]
        want.append(-(lc.exp() * (lc - lx)).sum().item())
    assert setup.clean_value == pytest.approx(0.0, abs=1e-6)
    assert setup.corrupt_value == pytest.approx(sum(want) / len(want), abs=1e-4)


def test_rows_keep_the_key_tokens_and_the_answer_prefix(ioi_model, multi):
    _, batch = multi
    rows = multitoken.expand(ioi_model, batch)
    i = rows.prompt_index
    for name in ("IO", "S1", "S2"):
        assert torch.equal(
            rows.clean_tokens[torch.arange(rows.size), rows.positions[name]],
            batch.clean_tokens[i, batch.positions[name][i]],
        )
    assert torch.equal(rows.end_pos - batch.end_pos[i], rows.token_index)
    assert torch.equal(rows.positions["end"], rows.end_pos)
    for r in range(rows.size):
        n, end, p = int(batch.end_pos[i[r]]) + 1, int(rows.end_pos[r]) + 1, int(i[r])
        (seq,) = (batch.answer_sequences if rows.sign[r] > 0 else batch.counter_sequences)[p]
        j = int(rows.token_index[r])
        assert rows.answers[r].item() == seq[j] and rows.clean_tokens[r, n:end].tolist() == seq[:j]
        assert rows.clean_tokens[r, :n].tolist() == batch.clean_tokens[p, :n].tolist()
        for v, tokens in rows.corrupted_tokens.items():  # the corrupted prompt + the same prefix
            assert tokens[r, :n].tolist() == batch.corrupted_tokens[v][p, :n].tolist()
            assert tokens[r, n:end].tolist() == seq[:j]
        assert not rows.mask[r, end:].any() and rows.mask[r, :end].all()


def test_patching_invariants_node_and_edges(ioi_model, multi):
    """Patch nothing: the clean value; patch everything: the corrupted value (noising), for node
    patching (both engines) and edge patching, and EAP's per-prompt scores group into prompts."""
    _, batch = multi
    setup = P.prepare(ioi_model, batch, "str", "logprob_diff")
    hooks = P.prepare(ioi_model, batch, "str", "logprob_diff", engine="hooks")
    resid = hook_name(0, "resid_pre")
    for s in (setup, hooks):
        masks = {resid: torch.tensor([0.0, 1.0])[:, None, None, None].expand(2, 1, s.n_pos, 1)}
        values = P.run_patched(s, "noise", masks).mean(-1)
        assert values.tolist() == pytest.approx([s.clean_value, s.corrupt_value], abs=1e-4)
    heads, heads_ref = P.patch_heads(setup, "noise"), P.patch_heads(hooks, "noise")
    assert torch.allclose(heads.values, heads_ref.values, atol=1e-4)
    assert heads.per_prompt.shape[-1] == 6 and torch.allclose(heads.per_prompt.mean(-1), heads.values, atol=1e-5)
    patcher = EdgePatcher(setup)
    ones = patcher.ones()[0]
    values = patcher.value(torch.stack([ones, torch.zeros_like(ones)]))
    assert values.tolist() == pytest.approx([setup.clean_value, setup.corrupt_value], abs=1e-4)
    found = discovery.discover(setup, "eap", "noise", top_k=10, per_prompt=True, curve=False)
    assert found.per_prompt.shape == (patcher.n_edges, 6)
    scores = discovery.eap(patcher)
    assert torch.allclose(found.per_prompt.mean(-1), scores, atol=1e-5)


def test_gaussian_noise_and_resample_rows(ioi_model):
    prompts, batch = _ioi_multi(ioi_model, 8, seed=1, template=0)
    gn = P.prepare(ioi_model, batch, GaussianNoise(samples=2), "logprob_diff")
    assert gn.size == 2 * gn.batch.size and gn.ctx.prompt_index.shape == (gn.size,)
    patcher = EdgePatcher(gn)
    ones = patcher.ones()[0]
    values = patcher.value(torch.stack([ones, torch.zeros_like(ones)]))
    assert values.tolist() == pytest.approx([gn.clean_value, gn.corrupt_value], abs=1e-4)
    per = discovery.discover(gn, "eap", "noise", top_k=5, per_prompt=True, curve=False).per_prompt
    assert per.shape[-1] == 8 and torch.allclose(per.mean(-1), discovery.eap(patcher), atol=1e-5)
    # resample pairs prompts: each row's corrupted input is its partner's prompt + its own answer prefix
    resample = P.prepare(ioi_model, batch, "resample", "logprob")
    partner = resample.plan.corrupt.tokens
    rows = resample.batch
    want = []
    for i, p in enumerate(prompts):
        mates = [j for j in range(len(prompts)) if j != i]
        row = int((rows.prompt_index == i).nonzero()[0])
        n = int(batch.end_pos[i]) + 1
        mate = next(j for j in mates if batch.clean_tokens[j, :n].tolist() == partner[row, :n].tolist())
        want.append(_log_prob(ioi_model, prompts[mate].text, p.answer))
    assert resample.corrupt_value == pytest.approx(sum(want) / len(want), abs=1e-4)


def _dataset(tmp_path):
    """A circuitfind JSONL of IOI pairs with two-token answers (" Mary and"), and its dataset spec."""
    rows = [
        {
            "clean": p.text,
            "corrupted": p.corrupted["abc"],
            "answers": [p.answer + " and"],
            "counter_answers": [p.counter_answer + " and"],
        }
        for p in generate_prompts("ioi", 6, seed=2)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "pairs-multi.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": "pairs.jsonl", "answer_tokens": "multi"}))
    return spec


def test_a_multi_token_dataset_through_discover(tmp_path, capsys, monkeypatch):
    spec = _dataset(tmp_path)
    (tmp_path / "row_metrics.py").write_text("def first(logits, ctx):\n    return logits[:, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "c.json"
    args = ["discover", "--model", "toy-ioi", "--task", str(spec), "-n", "6", "--top-k", "8"]
    assert main([*args, "--algorithm", "eap", "--metric", "logprob_diff", "--out", str(out)]) == 0
    assert out.is_file() and "faithfulness" in capsys.readouterr().out
    assert main([*args, "--algorithm", "acdc", "--tau", "0.5", "--metric", "kl"]) == 0
    capsys.readouterr()
    # refusals: one line, exit 2, naming the task and the algorithm or metric
    assert main([*args, "--algorithm", "ifr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'pairs-multi'" in err and "algorithm 'ifr'" in err
    assert main([*args, "--algorithm", "eap", "--metric", "prob_diff"]) == 0  # a set metric over whole answers
    assert "faithfulness" in capsys.readouterr().out
    assert main([*args, "--algorithm", "eap", "--metric", "row_metrics:first"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitfind: error:") and "metric 'row_metrics:first' cannot score them" in err


def test_refusals(ioi_model, multi):
    prompts, batch = multi
    with pytest.raises(TaskError, match="multi-token answers .* cannot score them; use one of logprob"):
        P.prepare(ioi_model, batch, "str", lambda logits, ctx: logits[:, 0])
    setup = P.prepare(ioi_model, batch, "str", "logprob")
    with pytest.raises(TaskError, match="algorithm 'ifr' cannot use them"):
        discovery.discover(setup, "ifr", "noise", top_k=5)
    with pytest.raises(TaskError, match="algorithm 'ifr' cannot use them"):
        ifr_scores(setup)
    with pytest.raises(TaskError, match="the settings-sensitivity study scores one next token"):
        prepare_recording(ioi_model, batch, "str", ["logit_diff", "kl"])
    lone = [dataclasses.replace(p, counter_answer="") for p in prompts[:2]]
    one_sided = TaskBatch.from_prompts(ioi_model, lone, answer_tokens="multi")
    assert P.prepare(ioi_model, one_sided, "str", "logprob").size == 5
    with pytest.raises(TaskError, match="prompt 0 .* has no counterfactual answer, which metric 'logit_diff' needs"):
        P.prepare(ioi_model, one_sided, "str", "logit_diff")
    both = [dataclasses.replace(prompts[0], answers=(prompts[0].answer, " Mary"), counter_answers=(" Mary",))]
    with pytest.raises(TaskError, match=r"prompt 0 .*: ' Mary' is both a correct and a wrong answer"):
        TaskBatch.from_prompts(ioi_model, both, answer_tokens="multi")


def test_the_sweep_grid_check_refuses_before_anything_runs(tmp_path):
    from circuitfind.runs.sweep import SweepConfig

    spec = str(_dataset(tmp_path))
    # the default grid but Gaussian noise (the dataset marks no key tokens): every algorithm and metric
    SweepConfig(tasks=[spec], corruptions=["str", "resample", "mean"], prompts=6).check()
    with pytest.raises(TaskError, match="task 'pairs-multi' .* algorithm 'ifr' cannot use them"):
        SweepConfig(tasks=[spec], algorithms=["eap", "ifr"], prompts=6).check()
    SweepConfig(tasks=[spec], metrics=["kl", "prob_diff"], corruptions=["str"], prompts=6).check()


def test_a_sweep_setting_of_a_multi_token_dataset(tmp_path):
    """One sweep setting computed as the flow computes it: the record counts prompts (not rows), and the
    per-prompt EAP scores (for the report's bootstrap) have one column per prompt."""
    from circuitfind.runs.sweep import SweepConfig, compute_setting

    config = SweepConfig(
        tasks=[str(_dataset(tmp_path))],
        algorithms=["eap"],
        corruptions=["str"],
        metrics=["logprob_diff"],
        directions=["noise"],
        prompts=6,
        top_k=8,
    ).check()
    (setting,) = config.settings()
    record, circuit, per_prompt = compute_setting(setting, config)
    assert record["n_prompts"] == 6 and per_prompt.shape == (circuit.graph.n_edges, 6)
    assert record["clean"] > record["corrupt"] and circuit.n_edges == 8


@pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="SmolLM2 not in the cache")
@pytest.mark.slow  # loads SmolLM2-135M
def test_smollm2_four_digit_answer():
    from circuitfind.models.loading import load_model

    smol = load_model("smollm2-135m", device="cpu")
    prompt = Prompt(
        "The war lasted from the year 1732 to the year",
        " 1745",
        " 1701",
        {"abc": "The war lasted from the year 1799 to the year"},
        {},
    )
    batch = TaskBatch.from_prompts(smol, [prompt, dataclasses.replace(prompt, answer=" 1760")], answer_tokens="multi")
    assert [len(s) for (s,) in batch.answer_sequences] == [5, 5]  # a space, then one token per digit
    setup = P.prepare(smol, batch, "str", "logprob_diff")
    want = [_log_prob(smol, prompt.text, a) - _log_prob(smol, prompt.text, " 1701") for a in (" 1745", " 1760")]
    assert setup.clean_value == pytest.approx(sum(want) / 2, abs=1e-3)


@pytest.mark.skipif(not (tokenizer_dir() / "tokenizer.json").is_file(), reason="GPT-2 tokenizer not built")
def test_gpt2_tokenizer_two_token_answer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitfind.models.loading import load_model

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", tokenizer="gpt2")
    prompt = Prompt(
        "The war lasted from the year 1732 to the year 17",
        "33 AD",
        "01 BC",
        {"abc": "The war lasted from the year 1799 to the year 17"},
        {},
    )
    batch = TaskBatch.from_prompts(model, [prompt], answer_tokens="multi")
    assert batch.answer_sequences[0][0][0] == 2091  # '33', not ' 33'
    setup = P.prepare(model, batch, "str", "logprob_diff")
    want = _log_prob(model, prompt.text, "33 AD") - _log_prob(model, prompt.text, "01 BC")
    assert setup.clean_value == pytest.approx(want, abs=1e-4)


def test_evaluate_scores_the_whole_answer(ioi_model, multi):
    from circuitfind.tasks.evaluation import evaluate

    prompts, batch = multi
    report = evaluate(ioi_model, batch, corruptions=("str:abc", "gn"))
    a = torch.tensor([_log_prob(ioi_model, p.text, p.answer) for p in prompts])
    b = torch.tensor([_log_prob(ioi_model, p.text, p.counter_answer) for p in prompts])
    greedy = []
    for p in prompts:
        full, n = encode(ioi_model, p.text + p.answer), len(encode(ioi_model, p.text))
        with torch.no_grad():
            top = ioi_model(torch.tensor([full]))[0, n - 1 : len(full) - 1].argmax(-1)
        greedy.append(top.tolist() == full[n:])
    assert report.accuracy == pytest.approx(sum(greedy) / len(greedy))
    assert report.logit_diff == pytest.approx((a - b).mean().item(), abs=1e-4)
    assert report.prob_diff == pytest.approx((a.exp() - b.exp()).mean().item(), abs=1e-5)
    assert report.pair_accuracy == (a > b).float().mean().item() and report.pair_chance == 0.5
    # the corrupted prompt with the same answer tokens appended (teacher forcing)
    c = torch.tensor([_forced(ioi_model, p.corrupted["abc"], p.text, p.answer) for p in prompts])
    d = torch.tensor([_forced(ioi_model, p.corrupted["abc"], p.text, p.counter_answer) for p in prompts])
    assert report.corrupted["str:abc"]["logit_diff"] == pytest.approx((c - d).mean().item(), abs=1e-4)
    assert report.corrupted["str:abc"]["prob_diff"] == pytest.approx((c.exp() - d.exp()).mean().item(), abs=1e-5)
    # GN's noise samples averaged per prompt: the same value as the metric over every stacked row
    gn = P.prepare(ioi_model, batch, "gn", "logprob_diff")
    assert report.corrupted["gn"]["logit_diff"] == pytest.approx(gn.corrupt_value, abs=1e-4)
    assert report.corrupted["str:abc"]["kl"] < 0 and set(report.corrupted) == {"str:abc", "gn"}


def test_logprob_diff_of_one_token_answers():
    """log mass of R minus log mass of R': the logit difference for one answer each (the normaliser cancels)."""
    from circuitfind.tasks.metrics import MetricContext, get_metric

    logits = torch.randn(3, 7)
    one = MetricContext(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]))
    assert torch.allclose(get_metric("logprob_diff")(logits, one), get_metric("logit_diff")(logits, one), atol=1e-5)
    sets = MetricContext.from_sets([[0, 1], [2], [3]], [[4], [5, 6], [0]])
    p = logits.softmax(-1)
    want = torch.stack([(p[0, 0] + p[0, 1]) / p[0, 4], p[1, 2] / (p[1, 5] + p[1, 6]), p[2, 3] / p[2, 0]]).log()
    assert torch.allclose(get_metric("logprob_diff")(logits, sets), want, atol=1e-5)
