import math

import pytest
import torch

from circuitfind.errors import MetricError
from circuitfind.tasks.metrics import CallableMetric, MetricContext, get_metric, normalise


def _ctx(logits=None):
    lp = None if logits is None else logits.log_softmax(-1)
    return MetricContext(torch.tensor([0, 1]), torch.tensor([1, 2]), lp)


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])


def test_logit_diff_prob_logprob():
    ctx = _ctx()
    assert get_metric("logit_diff")(LOGITS, ctx).tolist() == [1.5, -2.0]
    probs = LOGITS.softmax(-1)
    torch.testing.assert_close(get_metric("prob")(LOGITS, ctx), torch.stack([probs[0, 0], probs[1, 1]]))
    torch.testing.assert_close(get_metric("logprob")(LOGITS, ctx), torch.stack([probs[0, 0], probs[1, 1]]).log())


def test_kl_is_zero_on_clean_and_matches_definition():
    ctx = _ctx(LOGITS)
    kl = get_metric("kl")
    assert kl(LOGITS, ctx).abs().max() < 1e-6
    other = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    p = LOGITS.softmax(-1)
    expected = (p * (p.log() - other.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl(other, ctx), -expected)


def test_normalise_and_degenerate_baselines():
    assert normalise(5.0, clean=10.0, corrupt=0.0) == 0.5
    assert normalise(-3.0, clean=-1.0, corrupt=-5.0) == 0.5
    with pytest.raises(MetricError, match="corruption does not change"):
        normalise(1.0, 2.0, 2.0)


def test_nan_metric_is_a_clear_error():
    bad = CallableMetric(lambda logits, ctx: torch.full((logits.shape[0],), math.nan), name="broken")
    with pytest.raises(MetricError, match="'broken' returned NaN"):
        bad(LOGITS, _ctx())
    # it counts the rows and names the first, as rows (a batched pass holds several candidates' prompts)
    one = CallableMetric(lambda logits, ctx: torch.tensor([0.0, math.nan] + [0.0] * (logits.shape[0] - 2)), name="one")
    with pytest.raises(MetricError, match=rf"'one' returned NaN or inf in 1 of {LOGITS.shape[0]} rows \(first \[1\];"):
        one(LOGITS, _ctx())


def test_wrong_shape_metric_is_a_clear_error():
    bad = CallableMetric(lambda logits, ctx: logits.sum(), name="scalar")
    with pytest.raises(MetricError, match="one value per prompt"):
        bad(LOGITS, _ctx())


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("accuracy")


def test_setup_baselines_of_another_metric_match_a_fresh_setup(ioi_model, ioi_batch):
    from circuitfind.patching import prepare

    setup = prepare(ioi_model, ioi_batch, "gn", "logit_diff")
    fresh = prepare(ioi_model, ioi_batch, "gn", "kl")
    assert setup.baselines("kl") == pytest.approx((fresh.clean_value, fresh.corrupt_value), abs=1e-6)


@pytest.mark.parametrize(
    ("source", "raised"),
    [("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"), ("def f(:\n", "SyntaxError")],
)
def test_a_metric_module_that_fails_to_import_is_one_error(tmp_path, monkeypatch, source, raised):
    (tmp_path / "cf_broken_metric.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MetricError, match=f"importing module 'cf_broken_metric' raised {raised}"):
        get_metric("cf_broken_metric:f")


def test_a_metric_that_raises_is_one_error():
    def lookup(logits, ctx):
        raise KeyError("column")

    with pytest.raises(MetricError, match="metric 'lookup' raised KeyError: 'column'"):
        CallableMetric(lookup)(LOGITS, _ctx())
