"""Answers as continuations of their prompts, answer sets in batches and metric contexts, per-prompt
data for custom metrics under stacking, and metrics by import path (issue 17)."""

import sys
import types

import pytest
import torch

from circuitfind import patching as P
from circuitfind.edge_patching import EdgePatcher
from circuitfind.errors import MetricError, TaskError
from circuitfind.models import fetch
from circuitfind.models.bpe import tokenizer_dir
from circuitfind.patching.setup import repeat_ctx, slice_ctx
from circuitfind.tasks.batch import Prompt, TaskBatch, generate_prompts, load_task, single_token_id
from circuitfind.tasks.corruptions import GaussianNoise
from circuitfind.tasks.metrics import MetricContext, get_metric, metric_fingerprint


def _old_rule_id(model, word: str) -> int:
    """The answer rule before issue 17: a leading space added to the stripped word, one token."""
    ids = model.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def _assert_same_ids_as_before(model, task: str, n: int = 12):
    batch = TaskBatch.build(model, task, n, seed=3)
    assert batch.answers.tolist() == [_old_rule_id(model, p.answer) for p in batch.prompts]
    assert batch.counter_answers.tolist() == [_old_rule_id(model, p.counter_answer) for p in batch.prompts]
    assert batch.answer_sets[:, 0].tolist() == batch.answers.tolist() and batch.answer_mask.all()


def test_shipped_toy_tasks_keep_their_answer_ids(ioi_model, induction_model):
    _assert_same_ids_as_before(ioi_model, "ioi")
    _assert_same_ids_as_before(induction_model, "induction")


@pytest.mark.slow
@pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="SmolLM2 not in the cache")
def test_shipped_tasks_keep_their_answer_ids_on_smollm2():
    from circuitfind.models.loading import load_model

    model = load_model("smollm2-135m", device="cpu")
    for task in ("ioi", "induction", "factual"):
        _assert_same_ids_as_before(model, task)


def test_single_token_answer_of_several_tokens_names_the_prompt(ioi_model):
    p = Prompt("When Mary and John went to the store, John gave a drink to", " Mary John", " John", {}, {})
    with pytest.raises(TaskError, match=r"prompt 'When Mary.*drink to': answer ' Mary John' is 2 tokens"):
        TaskBatch.from_prompts(ioi_model, [p])


@pytest.mark.skipif(not (tokenizer_dir() / "tokenizer.json").is_file(), reason="GPT-2 tokenizer not built")
def test_gpt2_answer_is_the_continuation_token():
    from circuitfind.models.bpe import gpt2_tokenizer

    model = types.SimpleNamespace(tokenizer=gpt2_tokenizer(fetch_if_missing=False))
    prompt = "The war lasted from the year 1732 to the year 17"
    assert single_token_id(model, "33", prompt) == 2091
    assert single_token_id(model, " 33") == 4747  # what the old leading-space rule scored


def test_a_tokenizer_without_tokens_says_so():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({}, [])))
    model = types.SimpleNamespace(tokenizer=empty)
    with pytest.raises(TaskError, match="tokenizer gives no tokens.*missing or broken"):
        single_token_id(model, " Paul", "Then John gave it to")


LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0]])


def _set_ctx():
    # prompt 0: correct {0, 1}, wrong {2}; prompt 1: correct {2}, wrong {0, 1, 3}
    return MetricContext.from_sets([[0, 1], [2]], [[2], [0, 1, 3]])


def test_answer_set_rules():
    ctx, probs = _set_ctx(), LOGITS.softmax(-1)
    good = torch.stack([probs[0, 0] + probs[0, 1], probs[1, 2]])
    bad = torch.stack([probs[0, 2], probs[1, 0] + probs[1, 1] + probs[1, 3]])
    torch.testing.assert_close(get_metric("prob")(LOGITS, ctx), good)
    torch.testing.assert_close(get_metric("logprob")(LOGITS, ctx), good.log())
    torch.testing.assert_close(get_metric("prob_diff")(LOGITS, ctx), good - bad)
    expected = torch.tensor([(2.0 + 0.5) / 2 - (-1.0), 3.0 - (0.0 + 1.0 - 2.0) / 3])
    torch.testing.assert_close(get_metric("logit_diff")(LOGITS, ctx), expected)


def test_sets_of_one_answer_give_the_single_answer_numbers():
    single = MetricContext(torch.tensor([0, 2]), torch.tensor([1, 3]))
    sets = MetricContext.from_sets([[0], [2]], [[1], [3]])
    for name in ("prob", "logprob", "logit_diff", "prob_diff"):
        assert torch.equal(get_metric(name)(LOGITS, single), get_metric(name)(LOGITS, sets))


def test_slice_and_repeat_keep_sets_and_extra_aligned():
    ctx = MetricContext.from_sets([[0, 1], [2], [3]], [[2], [0, 1, 3], [1]], [{"w": 1.0}, {"w": 2.0}, {"w": 3.0}])
    part = slice_ctx(ctx, slice(1, 3))
    assert part.answer_sets.tolist() == [[2, 0], [3, 0]] and part.extra["w"].tolist() == [2.0, 3.0]
    rep = repeat_ctx(part, 2)
    assert rep.counter_mask.sum(-1).tolist() == [3, 1, 3, 1] and rep.prompt_index.tolist() == [1, 2, 1, 2]


def weighted_logit_diff(logits, ctx):
    """A per-prompt metric: the logit difference times the row's ``w`` column."""
    return ctx.extra["w"].to(logits) * get_metric("logit_diff")(logits, ctx)


def _weighted_batch(model, n=6):
    prompts = generate_prompts("ioi", n, seed=5)
    prompts = [Prompt(**{**p.__dict__, "extra": {"w": float(i + 1)}}) for i, p in enumerate(prompts)]
    return TaskBatch.build(model, load_task("ioi"), prompts), torch.arange(1.0, n + 1)


@pytest.mark.parametrize("corruption", ["str", GaussianNoise(samples=3)])
def test_per_prompt_metric_under_stacked_candidates_noise_samples_and_chunks(ioi_model, corruption):
    batch, w = _weighted_batch(ioi_model)
    ref = EdgePatcher(P.prepare(ioi_model, batch, corruption, "logit_diff", max_batch=4096))
    keep = torch.stack([ref.ones()[0], torch.zeros_like(ref.ones()[0]), (torch.rand(ref.n_edges) > 0.5).float()])
    expected = ref.run(keep) * w.repeat(ref.setup.size // batch.size)
    for kw in ({"max_batch": 4096}, {"max_batch": 1, "max_memory": 1}):
        setup = P.prepare(ioi_model, batch, corruption, weighted_logit_diff, **kw)
        torch.testing.assert_close(EdgePatcher(setup).run(keep), expected)


def test_metric_by_import_path(tmp_path, monkeypatch, ioi_model, ioi_batch):
    (tmp_path / "my_metrics.py").write_text(
        "import torch\n"
        "def doubled(logits, ctx):\n    return 2 * logits.gather(1, ctx.answers[:, None])[:, 0]\n"
        "def flat(logits, ctx):\n    return logits[:, :2]\n"
        "def hard(logits, ctx):\n    return (logits.argmax(-1) == ctx.answers).float()\n"
        "def nan(logits, ctx):\n    return logits[:, 0] * float('nan')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_metrics", None)
    metric = get_metric("my_metrics:doubled")
    assert metric.name == "my_metrics:doubled" and len(metric_fingerprint("my_metrics:doubled")) == 20
    assert metric_fingerprint("kl") is None
    with pytest.raises(MetricError, match="cannot import module 'no_such_mod'"):
        get_metric("no_such_mod:f")
    with pytest.raises(MetricError, match="has no attribute 'missing'"):
        get_metric("my_metrics:missing")
    with pytest.raises(MetricError, match=r"'my_metrics:flat' must return one value per prompt"):
        get_metric("my_metrics:flat")(LOGITS, MetricContext(torch.tensor([0, 1]), torch.tensor([1, 0])))
    with pytest.raises(MetricError, match="'my_metrics:nan' returned NaN"):
        get_metric("my_metrics:nan")(LOGITS, MetricContext(torch.tensor([0, 1]), torch.tensor([1, 0])))
    leaf = LOGITS.clone().requires_grad_(True)
    with pytest.raises(MetricError, match="'my_metrics:hard' has no gradient"):
        get_metric("my_metrics:hard")(leaf, MetricContext(torch.tensor([0, 1]), torch.tensor([1, 0])))
    setup = P.prepare(ioi_model, ioi_batch, "str", "my_metrics:doubled")
    assert setup.metric.name == "my_metrics:doubled" and setup.clean_value > setup.corrupt_value


def test_one_token_answers_declared_multi_score_as_single_tokens(ioi_model):
    """A one-token answer under answer_tokens: multi is one teacher-forced row: the same logit difference
    (tests/test_multitoken.py checks longer answers)."""
    prompts = generate_prompts("ioi", 3, seed=0)
    batch = TaskBatch.from_prompts(ioi_model, prompts, answer_tokens="multi")
    assert batch.answer_sequences == [[[a]] for a in batch.answers.tolist()]
    single = P.prepare(ioi_model, TaskBatch.from_prompts(ioi_model, prompts))
    multi = P.prepare(ioi_model, batch)
    assert multi.size == 6 and multi.clean_value == pytest.approx(single.clean_value, abs=1e-5)
    assert multi.corrupt_value == pytest.approx(single.corrupt_value, abs=1e-5)


@pytest.mark.slow  # a Prefect sweep: about 55 s on a shared 2-core machine
def test_sweep_with_a_metric_by_import_path(prefect_harness, tmp_path, monkeypatch):
    from circuitfind.runs.sweep import SweepConfig, cache_key
    from flows.sweep import sweep

    module = tmp_path / "sweep_metric_mod.py"
    module.write_text(
        "from circuitfind.tasks.metrics import get_metric\n"
        "def scaled_ld(logits, ctx):\n    return 0.5 * get_metric('logit_diff')(logits, ctx)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sweep_metric_mod", None)
    config = SweepConfig(
        algorithms=["eap"], corruptions=["str"], metrics=["sweep_metric_mod:scaled_ld"], directions=["noise"], prompts=8
    )
    manifest = sweep(config, run="m", outputs=str(tmp_path / "out"))
    assert len(manifest["settings"]) == 1 and not manifest["failures"]
    (setting,) = config.settings()
    key = cache_key(setting, config)
    module.write_text(module.read_text().replace("0.5", "0.25"))
    assert cache_key(setting, config) != key  # the metric's source is in the cache key


def hard_accuracy(logits, ctx):
    """Not differentiable: EAP cannot use it."""
    return (logits.argmax(-1) == ctx.answers).float()


def test_a_metric_without_gradient_under_eap_names_the_metric(ioi_model, ioi_batch):
    from circuitfind.methods import discover as D

    setup = P.prepare(ioi_model, ioi_batch, "str", lambda lg, ctx: hard_accuracy(lg, ctx) + get_metric("kl")(lg, ctx))
    setup.metric = get_metric(hard_accuracy)  # baselines need distinct values; the EAP pass sees the hard metric
    with pytest.raises(MetricError, match="'hard_accuracy' has no gradient"):
        D.eap(EdgePatcher(setup))


def test_a_batch_without_str_variants_refuses_str_but_takes_noise(ioi_model):
    p = Prompt("When Mary and John went to the store, John gave a drink to", " Mary", " John", {}, {"IO": 5})
    batch = TaskBatch.from_prompts(ioi_model, [p], key_tokens=["IO"])
    assert batch.task.str_variants == []
    with pytest.raises(TaskError, match=r"task 'custom' has no STR variants .*Gaussian-noise corruption \(gn\)"):
        _ = batch.task.default_str
    with pytest.raises(TaskError, match="no STR variants"):
        batch.corrupted()
    with pytest.raises(TaskError, match="no STR variants"):
        P.prepare(ioi_model, batch, "str")
    setup = P.prepare(ioi_model, batch, GaussianNoise(seed=0))  # noise on IO needs no corrupted prompts
    assert setup.clean_value != setup.corrupt_value
