import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import LOGITS
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D


@pytest.fixture(scope="module")
def kl_patcher(ioi_model, ioi_batch):
    return EdgePatcher(P.prepare(ioi_model, ioi_batch, "str", "kl", max_batch=512))


@pytest.fixture(scope="module")
def ld_patcher(ioi_model, ioi_batch):
    return EdgePatcher(P.prepare(ioi_model, ioi_batch, "str", "logit_diff", max_batch=512))


def acdc_reference(patcher, tau):
    """ACDC with one edge per forward pass through the bridge's hooks, written as plainly as possible."""
    patcher = EdgePatcher(patcher.setup, patcher.graph, patcher.direction, engine="hooks")
    graph = patcher.graph
    s_idx, r_idx = graph.edge_index
    keep = torch.ones(graph.n_edges, dtype=torch.bool)
    current = patcher.value(keep[None].float()).item()
    for r in reversed(range(len(graph.receivers))):
        receiver = graph.receivers[r]
        incoming = [e for e in reversed(range(graph.n_edges)) if r_idx[e] == r]
        if receiver.node != LOGITS and not keep[s_idx == graph.senders.index(receiver.node)].any():
            keep[incoming] = False
            continue
        for e in incoming:
            trial = keep.clone()
            trial[e] = False
            value = patcher.value(trial[None].float()).item()
            if current - value < tau:
                keep, current = trial, value
    return keep


@pytest.mark.parametrize("tau", [0.02, pytest.param(0.3, marks=pytest.mark.slow)])  # 0.3: 7 s, in make test-slow
def test_acdc_matches_the_one_edge_at_a_time_reference(kl_patcher, tau):
    assert kl_patcher.engine == "functional"
    circuit = D.acdc(kl_patcher, tau)
    expected = acdc_reference(kl_patcher, tau)
    assert torch.equal(circuit.in_circuit, expected)
    assert circuit.settings["algorithm"] == "acdc" and circuit.settings["forward_passes"] < kl_patcher.n_edges
    assert circuit.settings["engine"] == "functional"
    # every engine and batching mode finds the same circuit
    hooks = EdgePatcher(kl_patcher.setup, engine="hooks")
    for patcher, kw in [
        (hooks, {}),
        (hooks, {"reuse_prefix": False}),
        (kl_patcher, {"candidates": 1}),
        (kl_patcher, {"reuse_prefix": False}),
    ]:
        assert torch.equal(D.acdc(patcher, tau, **kw).in_circuit, expected), (patcher.engine, kw)


def test_acdc_on_logit_difference_matches_reference(ld_patcher):
    assert torch.equal(D.acdc(ld_patcher, 0.5).in_circuit, acdc_reference(ld_patcher, 0.5))


def test_acdc_circuits_are_faithful_and_shrink_with_tau(kl_patcher):
    small, large = D.acdc(kl_patcher, 0.01), D.acdc(kl_patcher, 1.0)
    assert 0 < large.n_edges <= small.n_edges < kl_patcher.n_edges
    assert D.faithfulness(kl_patcher, small) > 0.9
    assert "a1.2" in small.heads  # the toy model's main name-mover head


def test_eap_ig_with_one_step_is_eap(ld_patcher):
    torch.testing.assert_close(D.eap_ig(ld_patcher, steps=1), D.eap(ld_patcher), atol=1e-5, rtol=1e-4)


def test_attribution_scores_track_real_edge_effects(ld_patcher):
    n = ld_patcher.n_edges
    masks = ld_patcher.ones(n) - torch.eye(n)
    actual = ld_patcher.value(masks) - ld_patcher.setup.clean_value  # every single-edge patch
    for scores in (D.eap(ld_patcher), D.eap_ig(ld_patcher, steps=8)):
        assert spearmanr(scores.numpy(), actual.numpy()).statistic > 0.6
        top = scores.abs().topk(5).indices
        assert actual[top].abs().mean() > 5 * actual.abs().mean()


def test_eap_circuits_and_selection(ld_patcher):
    circuit = D.eap_circuit(ld_patcher, k=20, ig_steps=4)
    assert circuit.n_edges == 20 and circuit.settings["algorithm"] == "eap_ig"
    scores = circuit.scores
    thr = D.select_threshold(ld_patcher.graph, scores, scores.abs().topk(7).values[-1].item())
    assert thr.n_edges == 7
    with pytest.raises(ValueError):
        D.select_top_k(ld_patcher.graph, scores, 0)


def test_faithfulness_and_curve(ld_patcher):
    graph = ld_patcher.graph
    full = Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool))
    assert D.faithfulness(ld_patcher, full) == pytest.approx(1.0)
    with pytest.raises(D.EmptyCircuitError, match="no edges"):
        D.faithfulness(ld_patcher, Circuit(graph, torch.zeros(graph.n_edges, dtype=torch.bool)))
    scores = D.eap(ld_patcher)
    curve = D.faithfulness_curve(ld_patcher, scores)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-4) and curve.faithfulness[-1] == pytest.approx(1.0)
    assert curve.sizes == sorted(curve.sizes) and curve.sizes[-1] == graph.n_edges
    # MIB's edge fractions, and its counts int(fraction * n_edges) of toy-ioi's 262 edges
    assert curve.fractions == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert graph.n_edges == 262 and curve.sizes == [0, 0, 1, 2, 5, 13, 26, 52, 131, 262]
    # every point is the faithfulness of the top-|score| circuit of that size; the areas are trapezoids
    expected = [0.0, 0.0] + [D.faithfulness(ld_patcher, D.select_top_k(graph, scores, n)) for n in curve.sizes[2:]]
    assert curve.faithfulness == pytest.approx(expected, abs=1e-4)
    assert curve.cpr == pytest.approx(float(np.trapezoid(curve.faithfulness, curve.fractions)))
    assert curve.cmd == pytest.approx(float(np.trapezoid(np.abs(1 - np.array(curve.faithfulness)), curve.fractions)))
    assert 0.5 < curve.cpr < 1.2 and 0 <= curve.cmd < 0.5
    random_scores = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0))
    assert D.faithfulness_curve(ld_patcher, random_scores).cpr < curve.cpr


def test_iterative_path_patching(ioi_model, ioi_batch):
    setup = P.prepare(ioi_model, ioi_batch, "str", "logit_diff")
    circuit = D.iterative_path_patching(setup, depth=2, k=1.0)
    level1 = P.detect(P.path_patch(setup, P.LOGITS, "end", "noise").effect, k=1.0, sign="negative")
    assert level1, "the rule should find the toy model's layer-1 name movers"
    into_logits = {s for s, r in circuit.edges if r == "logits"}
    assert into_logits == {f"a{l}.{h}" for l, h in level1}
    found = {f"a{l}.{h}" for l, h in level1}
    for sender, receiver in circuit.edges:
        if receiver != "logits":
            head, kind = receiver[:-3], receiver[-2]
            assert head in found and kind in "qkv"
            assert int(sender[1:].split(".")[0]) < int(head[1:].split(".")[0])


def test_per_prompt_attributions_average_to_the_batch_scores(ld_patcher):
    per_prompt = D.eap(ld_patcher, per_prompt=True)
    assert per_prompt.shape == (ld_patcher.n_edges, ld_patcher.setup.size)
    torch.testing.assert_close(per_prompt.mean(-1), D.eap(ld_patcher), atol=1e-5, rtol=1e-4)
    ig = D.eap_ig(ld_patcher, steps=3, per_prompt=True)
    torch.testing.assert_close(ig.mean(-1), D.eap_ig(ld_patcher, steps=3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algorithm, direction", [("eap", "denoise"), ("acdc", "noise"), ("node", "noise")])
def test_discover_returns_the_circuit_with_its_faithfulness(ld_patcher, algorithm, direction):
    setup = ld_patcher.setup
    found = D.discover(setup, algorithm, direction, top_k=30, acdc_tau=0.05, node_k=1.0, per_prompt=algorithm == "eap")
    assert isinstance(found, D.Discovery) and found.direction == direction
    patcher = EdgePatcher(setup, found.circuit.graph, direction)
    # the circuit the algorithm finds when called directly (EAP: the top_k edges)
    if algorithm == "eap":
        assert found.circuit.n_edges == 30
    else:
        direct = D.acdc(patcher, 0.05) if algorithm == "acdc" else D.node_circuit(setup, direction, 1.0)
        assert torch.equal(found.circuit.in_circuit, direct.in_circuit) and direct.n_edges > 0
    assert found.faithfulness_status == "ok"
    assert found.faithfulness == D.faithfulness(patcher, found.circuit)
    if algorithm in D.SCORED:
        assert found.curve.as_dict() == D.faithfulness_curve(patcher, found.circuit.scores).as_dict()
    else:
        assert found.curve is None
    if algorithm == "eap":
        assert found.per_prompt.shape == (found.circuit.graph.n_edges, setup.size)
        torch.testing.assert_close(found.per_prompt.mean(-1), found.circuit.scores)
    else:
        assert found.per_prompt is None
    assert D.discover(setup, algorithm, direction, top_k=30, acdc_tau=0.05, node_k=1.0, curve=False).curve is None


def test_the_noising_only_rule():
    assert D.allows_direction("acdc", "noise") and not D.allows_direction("acdc", "denoise")
    assert all(D.allows_direction(a, d) for a in D.ALGORITHMS if a not in D.NOISING_ONLY for d in P.DIRECTIONS)
    with pytest.raises(ValueError, match="acdc prunes"):
        D.check_options("acdc", "denoise")
