"""Uniform gradient sampling (UGS, Li & Janson 2024): its mask distribution, its gradient estimate
against patched runs, determinism, the target size, and the known-answer circuits."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits import agreement
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.methods.ugs import inclusion_probability, ugs_mask, ugs_scores
from circuitfind.models.catalogue import load_model
from circuitfind.models.zoo import known
from circuitfind.tasks.batch import TaskBatch, generate_prompts


@pytest.fixture(scope="module")
def ioi_setup(ioi_model):
    return P.prepare(ioi_model, TaskBatch.build(ioi_model, "ioi", 8, seed=1), "str", "logit_diff")


def _known_patcher(tmp_path_factory, name: str, metric: str, n: int) -> tuple[EdgePatcher, list]:
    build, truth = {
        "induction": (known.build_induction_model, known.INDUCTION_TRUTH),
        "suppress": (known.build_suppression_model, known.SUPPRESSION_TRUTH),
        "backup": (known.build_backup_model, known.BACKUP_MAIN_TRUTH),
    }[name]
    model = load_model(build(tmp_path_factory.mktemp(name)), device="cpu")
    prompts = generate_prompts("induction", 600, seed=0)
    length = Counter(len(p.text.split()) for p in prompts).most_common(1)[0][0]
    batch = TaskBatch.build(model, "induction", [p for p in prompts if len(p.text.split()) == length][:n])
    return EdgePatcher(P.prepare(model, batch, "resample", metric)), list(truth)


def test_ugs_masks_are_the_bernoulli_uniform_mixture_with_unit_slope_in_the_window():
    """1 with probability p - w/2, 0 with 1 - p - w/2, uniform on (0, 1) with w = p(1 - p); mean p;
    d mask / d theta = 1 where the mask is uniform, 0 where it is 0 or 1."""
    n = 200_000
    u = (torch.arange(n) + 0.5) / n  # stratified: the fractions are exact up to 1/n
    for t in (-2.0, 0.0, 0.7, 3.0):
        theta = torch.full((n,), t, requires_grad=True)
        a = ugs_mask(theta, u)
        p = torch.sigmoid(torch.tensor(t)).item()
        w = p * (1 - p)
        inside = (a > 0) & (a < 1)
        assert (a == 1).float().mean().item() == pytest.approx(p - w / 2, abs=2 / n)
        assert (a == 0).float().mean().item() == pytest.approx(1 - p - w / 2, abs=2 / n)
        assert a.mean().item() == pytest.approx(p, abs=1e-4)
        assert torch.histc(a[inside], bins=4, min=0, max=1).div(inside.sum()).sub(0.25).abs().max() < 1e-3
        a.sum().backward()
        assert torch.allclose(theta.grad[inside], torch.ones(int(inside.sum())), atol=1e-4)
        assert (theta.grad[~inside] == 0).all()
    assert inclusion_probability(torch.tensor([0.0])).item() == 0.5
    far = ugs_mask(torch.tensor([-40.0, 40.0]), torch.tensor([0.5, 0.5]))  # windows underflow: still 0 / 1
    assert far.tolist() == [0.0, 1.0]


def test_the_ugs_gradient_estimate_matches_two_patched_runs_per_draw(ioi_setup):
    """Li & Janson's estimator on a tiny case: two free edges (``p_j = 1/2``), the others kept. Averaged over
    the draws, the gradient of the metric with respect to ``theta_j`` is
    ``p_j (1 - p_j) E_{a_i}[metric(a_j = 1) - metric(a_j = 0)]``; the reference computes that from
    forward passes at ``a_j`` in {0, 1} only, the estimate by autograd through the uniform masks."""
    patcher = EdgePatcher(ioi_setup)
    top = D.eap(patcher).abs().flatten().topk(2).indices
    i, j = int(top[0]), int(top[1])
    n_u, n_i = 64, 4  # midpoint grids; theta_j = 0 puts its window (3/8, 5/8) on grid lines
    u_j = (torch.arange(n_u) + 0.5) / n_u
    u_i = (torch.arange(n_i) + 0.5) / n_i  # a_i: 1, 1, 0.49 (in its window), 0
    theta = torch.full((patcher.n_edges,), 30.0)
    theta[i], theta[j] = 0.5, 0.0
    theta.requires_grad_(True)
    reference = 0.0
    for ui in u_i:
        u = torch.full((n_u, patcher.n_edges), 0.5)
        u[:, i], u[:, j] = ui, u_j
        masks = ugs_mask(theta, u)
        assert masks[:, [k for k in range(patcher.n_edges) if k not in (i, j)]].eq(1).all()
        patcher.value(masks).sum().div(n_u * n_i).backward()
        with torch.no_grad():
            ends = masks[:2].detach().clone()
            ends[0, j], ends[1, j] = 1.0, 0.0
            kept, patched = patcher.value(ends).tolist()
        reference += 0.25 * (kept - patched) / n_i  # p_j (1 - p_j) = 1/4
    assert abs(reference) > 0.01  # the edges matter
    assert theta.grad[j].item() == pytest.approx(reference, rel=2e-3)


def test_ugs_is_deterministic_for_a_seed(ioi_setup):
    patcher = EdgePatcher(ioi_setup)
    a, _ = ugs_scores(patcher, 40, steps=15, samples=2, seed=3)
    b, _ = ugs_scores(patcher, 40, steps=15, samples=2, seed=3)
    c, _ = ugs_scores(patcher, 40, steps=15, samples=2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ugs_keeps_its_split_passes_within_the_memory_budget(ioi_model):
    """A budget too small for one pass splits the prompts; the optimisation is the same up to rounding."""
    setups = [
        P.prepare(ioi_model, TaskBatch.build(ioi_model, "ioi", 4, seed=1), "str", "logit_diff", max_memory=m)
        for m in (None, 2_000_000)
    ]
    patchers = [EdgePatcher(s) for s in setups]
    assert len(patchers[0].passes(2, "grad")) == 1 < len(patchers[1].passes(2, "grad"))
    (a, ta), (b, tb) = (ugs_scores(p, 40, steps=8, samples=2, seed=1) for p in patchers)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ta.faithfulness == pytest.approx(tb.faithfulness, abs=1e-4)


@pytest.mark.slow
def test_ugs_reaches_its_target_and_its_circuit_beats_eap_on_toy_ioi(ioi_model):
    setup = P.prepare(ioi_model, TaskBatch.build(ioi_model, "ioi", 16, seed=1), "str", "logit_diff")
    patcher = EdgePatcher(setup)
    _, trace = ugs_scores(patcher, 40, steps=200)
    assert trace.target[0] > trace.target[-1] == pytest.approx(40 / patcher.n_edges)
    assert trace.kept[0] > 0.9 and trace.kept[-1] * patcher.n_edges == pytest.approx(40, rel=0.15)
    found = D.discover(setup, "ugs", top_k=20)
    eap = D.discover(setup, "eap", top_k=20)
    assert found.circuit.n_edges == 20 and found.circuit.settings["algorithm"] == "ugs"
    assert found.curve is not None and len(found.curve.faithfulness) == len(D.MIB_FRACTIONS)
    assert found.faithfulness > 0.8 > eap.faithfulness  # measured 0.92 and 0.22


def test_ugs_runs_denoising(ioi_setup):
    found = D.discover(ioi_setup, "ugs", "denoise", top_k=30, prune_steps=40)
    assert found.circuit.n_edges == 30 and found.faithfulness > 0.5
    assert found.circuit.settings["direction"] == "denoise" and found.circuit.settings["steps"] == 40


@pytest.mark.slow  # 5 s; make test stays under 5 minutes
def test_ugs_recovers_the_known_induction_circuit(tmp_path_factory):
    patcher, truth = _known_patcher(tmp_path_factory, "induction", "kl", 8)
    scores, _ = ugs_scores(patcher, len(truth), steps=60)
    assert agreement.roc_auc(scores, torch.tensor([e in truth for e in patcher.graph.edges])).auc == pytest.approx(1.0)
    assert set(D.select_top_k(patcher.graph, scores, len(truth)).edges) == set(truth)


@pytest.mark.slow
@pytest.mark.parametrize("name, metric", [("induction", "logit_diff"), ("suppress", "kl"), ("backup", "kl")])
def test_ugs_recovers_the_negative_head_and_mlp_path_and_the_backup_models_active_path(tmp_path_factory, name, metric):
    """As edge pruning does (tests/test_pruning.py): known-suppress's whole truth, its negative head and
    MLP path included, and known-backup's path active in the full model; AUROC 1.0 and the true set."""
    patcher, truth = _known_patcher(tmp_path_factory, name, metric, 8 if name == "induction" else 16)
    scores, _ = ugs_scores(patcher, len(truth), steps=200)
    assert agreement.roc_auc(scores, torch.tensor([e in truth for e in patcher.graph.edges])).auc == pytest.approx(1.0)
    assert set(D.select_top_k(patcher.graph, scores, len(truth)).edges) == set(truth)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_k=0), "--top-k must be >= 1"),
        (dict(prune_steps=0), "--prune-steps must be >= 1"),
        (dict(prune_steps=2.5), "--prune-steps must be a whole number"),
        (dict(prune_steps=10**9), "--prune-steps must be at most 100,000"),
    ],
)
def test_bad_ugs_options_are_refused_before_any_work(options, message):
    with pytest.raises(ValueError, match=message):
        D.check_options("ugs", **options)


def test_bad_ugs_arguments_are_refused(ioi_setup):
    patcher = EdgePatcher(ioi_setup)
    for kw, message in (
        (dict(k=0), "k must be >= 1"),
        (dict(k=10**6), "k must be in 1.."),
        (dict(samples=0), "samples"),
    ):
        with pytest.raises(ValueError, match=message):
            ugs_scores(patcher, **{"k": 5, **kw})


@pytest.mark.slow
def test_ugs_runs_in_a_sweep_and_the_report_ranks_it(prefect_harness, tmp_path):
    from circuitfind.runs.sweep import SweepConfig
    from flows.sweep import sweep

    config = SweepConfig(
        algorithms=["ugs", "eap"], corruptions=["str"], metrics=["kl"], directions=["noise"], prompts=8, prune_steps=30
    )
    manifest = sweep(config, run="r", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 2 and not manifest["failures"]
    records = {r["algorithm"]: r for r in (json.loads(Path(e["json"]).read_text()) for e in manifest["settings"])}
    assert records["ugs"]["n_edges"] == config.top_k and records["ugs"]["curve"]["cpr"] > 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| ugs/str/kl/noise |" in md
