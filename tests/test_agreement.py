import numpy as np
import pytest
import torch
from scipy import stats

from circuitfind.circuits import agreement


def test_set_statistics():
    a, b = {1, 2, 3, 4}, {3, 4, 5}
    assert agreement.jaccard(a, b) == pytest.approx(2 / 5)
    assert agreement.overlap_coefficient(a, b) == pytest.approx(2 / 3)
    assert agreement.jaccard(set(), set()) == 1.0 and agreement.overlap_coefficient(set(), {1}) == 0.0
    prf = agreement.precision_recall_f1(found=a, reference=b)
    assert prf == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)})


def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.5, size=50)
    got = agreement.rank_correlation(torch.tensor(x), torch.tensor(y), absolute=False)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert got["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert np.isnan(agreement.rank_correlation(np.ones(5), np.arange(5))["spearman"])


def test_roc_auc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    truth = rng.random(200) < 0.2
    scores = rng.normal(size=200) + 1.5 * truth
    scores[:20] = np.round(scores[:20])  # some ties
    roc = agreement.roc_auc(scores, truth)
    pos, neg = np.abs(scores[truth]), np.abs(scores[~truth])
    u = stats.mannwhitneyu(pos, neg).statistic
    assert roc.auc == pytest.approx(u / (len(pos) * len(neg)))
    assert roc.fpr[0] == 0 and roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    with pytest.raises(ValueError, match="both"):
        agreement.roc_auc(scores, np.zeros(200))


def test_pairwise_consensus_and_stability():
    circuits = {"a": {1, 2, 3}, "b": {2, 3}, "c": {3, 4}}
    m = agreement.matrix(agreement.pairwise(circuits), ["a", "b", "c"])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(2 / 3)
    assert agreement.consensus(circuits) == {3}
    assert agreement.consensus(circuits, 0.5) == {2, 3}
    assert agreement.stability(circuits)[1] == pytest.approx(1 / 3)


def test_bootstrap_ci():
    gen = torch.Generator().manual_seed(0)
    per_prompt = torch.stack(
        [torch.full((400,), 2.0), torch.randn(400, generator=gen) * 3 + 1, torch.randn(400, generator=gen)]
    )
    ci = agreement.bootstrap_ci(per_prompt, n_boot=2000, seed=1)
    assert ci.low[0] == ci.high[0] == 2.0
    half_width = (ci.high[1] - ci.low[1]) / 2
    assert half_width.item() == pytest.approx(1.96 * per_prompt[1].std().item() / 20, rel=0.15)
    assert ci.low[1] < per_prompt[1].mean() < ci.high[1]
    assert ci.excludes_zero()[:2].all() and not ci.excludes_zero()[2]
    with pytest.raises(ValueError):
        agreement.bootstrap_ci(torch.ones(3, 1))


def _bootstrap_one_resample_at_a_time(per_prompt, n_boot, level, seed):
    """The direct computation: draw every resample of prompts, take its mean, then the percentiles."""
    x = per_prompt.float()
    B = x.shape[-1]
    idx = torch.randint(0, B, (n_boot, B), generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(-1, B)
    means = torch.stack([flat[:, i].mean(-1) for i in idx])
    alpha = (1 - level) / 2
    q = torch.quantile(means.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0).float()
    return q[0].reshape(x.shape[:-1]), q[1].reshape(x.shape[:-1])


@pytest.mark.parametrize("shape,level", [((7, 12), 0.95), ((3, 4, 9), 0.9), ((2, 2), 0.5)])
def test_bootstrap_ci_equals_the_direct_resampling(shape, level):
    per_prompt = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 2 + 0.3
    ci = agreement.bootstrap_ci(per_prompt, n_boot=300, level=level, seed=7)
    low, high = _bootstrap_one_resample_at_a_time(per_prompt, 300, level, 7)
    torch.testing.assert_close(ci.low, low, rtol=0, atol=1e-5)
    torch.testing.assert_close(ci.high, high, rtol=0, atol=1e-5)
    torch.testing.assert_close(ci.mean, per_prompt.mean(-1))
    assert ci.low.shape == ci.high.shape == ci.mean.shape == shape[:-1]


def test_bootstrap_ci_of_many_components_in_bounded_chunks():
    # 20k components x 1000 resamples: torch.quantile refuses inputs of more than 2**24 values at once
    per_prompt = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0))
    ci = agreement.bootstrap_ci(per_prompt, n_boot=1000, seed=2)
    low, high = _bootstrap_one_resample_at_a_time(per_prompt[:50], 1000, 0.95, 2)
    torch.testing.assert_close(ci.low[:50], low, rtol=0, atol=1e-5)
    torch.testing.assert_close(ci.high[:50], high, rtol=0, atol=1e-5)
    tiny = agreement.bootstrap_ci(per_prompt[:300], n_boot=1000, seed=2, chunk_elements=1000 * 7)  # 43 chunks of 7
    torch.testing.assert_close(tiny.low, ci.low[:300], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny.high, ci.high[:300], rtol=0, atol=1e-6)


def test_torch_threads_sets_and_restores_the_thread_count():
    from circuitfind.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError("restored on errors too")
    assert torch.get_num_threads() == before


def test_a_constant_row_s_point_lies_inside_its_bootstrap_interval():
    """The point is made as the interval's ends are (float64, then rounded): a float32 mean of a
    constant row can land one rounding step outside them (0.1 does, 24 times over)."""
    from circuitfind.circuits.agreement import bootstrap_ci

    for value in (0.1, 0.3, 1 / 3, 0.7, 1e-3, -0.2):
        x = torch.full((3, 24), value)
        ci = bootstrap_ci(x, n_boot=200)
        assert ((ci.low <= ci.mean) & (ci.mean <= ci.high)).all(), value
        assert torch.equal(ci.low, ci.high)
