import numpy as np
import pytest
import torch
from scipy import stats

from circuitfind import compare


def test_set_statistics():
    a, b = {1, 2, 3, 4}, {3, 4, 5}
    assert compare.jaccard(a, b) == pytest.approx(2 / 5)
    assert compare.overlap_coefficient(a, b) == pytest.approx(2 / 3)
    assert compare.jaccard(set(), set()) == 1.0 and compare.overlap_coefficient(set(), {1}) == 0.0
    prf = compare.precision_recall_f1(found=a, reference=b)
    assert prf == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)})


def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.5, size=50)
    got = compare.rank_correlation(torch.tensor(x), torch.tensor(y), absolute=False)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert got["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert np.isnan(compare.rank_correlation(np.ones(5), np.arange(5))["spearman"])


def test_roc_auc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    truth = rng.random(200) < 0.2
    scores = rng.normal(size=200) + 1.5 * truth
    scores[:20] = np.round(scores[:20])  # some ties
    roc = compare.roc_auc(scores, truth)
    pos, neg = np.abs(scores[truth]), np.abs(scores[~truth])
    u = stats.mannwhitneyu(pos, neg).statistic
    assert roc.auc == pytest.approx(u / (len(pos) * len(neg)))
    assert roc.fpr[0] == 0 and roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    with pytest.raises(ValueError, match="both"):
        compare.roc_auc(scores, np.zeros(200))


def test_pairwise_consensus_and_stability():
    circuits = {"a": {1, 2, 3}, "b": {2, 3}, "c": {3, 4}}
    m = compare.matrix(compare.pairwise(circuits), ["a", "b", "c"])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(2 / 3)
    assert compare.consensus(circuits) == {3}
    assert compare.consensus(circuits, 0.5) == {2, 3}
    assert compare.stability(circuits)[1] == pytest.approx(1 / 3)


def test_bootstrap_ci():
    gen = torch.Generator().manual_seed(0)
    per_prompt = torch.stack([torch.full((400,), 2.0), torch.randn(400, generator=gen) * 3 + 1, torch.randn(400, generator=gen)])
    ci = compare.bootstrap_ci(per_prompt, n_boot=2000, seed=1)
    assert ci.low[0] == ci.high[0] == 2.0
    half_width = (ci.high[1] - ci.low[1]) / 2
    assert half_width.item() == pytest.approx(1.96 * per_prompt[1].std().item() / 20, rel=0.15)
    assert ci.low[1] < per_prompt[1].mean() < ci.high[1]
    assert ci.excludes_zero()[:2].all() and not ci.excludes_zero()[2]
    with pytest.raises(ValueError):
        compare.bootstrap_ci(torch.ones(3, 1))
