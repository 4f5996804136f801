"""Grouped-query attention (Llama-style, shared k/v heads) in every patching mode."""

import pytest
import torch
from transformer_lens import patching as tl_patching

from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.tasks.batch import TaskBatch


@pytest.fixture(scope="module")
def setup(gqa_model):
    batch = TaskBatch.build(gqa_model, "ioi", 12, seed=2)
    return P.prepare(gqa_model, batch, "str", "logit_diff")


def test_graph_has_one_k_and_v_receiver_per_key_value_head(gqa_model):
    graph = ModelGraph.from_model(gqa_model)
    assert graph.n_kv_heads == 2
    k_receivers = [r for r in graph.receivers if r.kind == "k" and r.layer == 1]
    assert [r.name for r in k_receivers] == ["a1.g0<k>", "a1.g1<k>"]
    assert k_receivers[1].feeds == ("a1.2", "a1.3")
    assert graph.receiver_name(1, 3, "v") == "a1.g1<v>" and graph.receiver_name(1, 3, "q") == "a1.3<q>"
    with pytest.raises(ValueError, match="grouped-query"):
        ModelGraph(2, 4, split_qkv=False, n_kv_heads=2)


def test_node_patching_matches_transformer_lens(gqa_model, setup):
    batch = setup.batch

    def metric(logits):
        ans = P.answer_logits(logits, batch.end_pos)
        return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean()

    _, clean_cache = gqa_model.run_with_cache(batch.clean_tokens)
    expected = tl_patching.get_act_patch_attn_head_out_all_pos(gqa_model, batch.corrupted(), clean_cache, metric)
    torch.testing.assert_close(P.patch_heads(setup).values, expected, atol=1e-5, rtol=1e-5)
    expected = tl_patching.get_act_patch_resid_pre(gqa_model, batch.corrupted(), clean_cache, metric)
    torch.testing.assert_close(P.patch_block(setup, "resid_pre").values, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ["hooks", "functional"])
def test_edge_patching_invariants_and_a_shared_kv_edge(gqa_model, setup, engine):
    patcher = EdgePatcher(setup, engine=engine)
    assert patcher.value(patcher.ones()).item() == pytest.approx(
        setup.clean_value, abs=0 if engine == "hooks" else 1e-5
    )
    assert patcher.value(torch.zeros_like(patcher.ones())).item() == pytest.approx(setup.corrupt_value, abs=1e-4)
    graph = patcher.graph
    e = graph.edge_lookup[("a0.1", "a1.g1<k>")]
    masks = patcher.ones()
    masks[0, e] = 0
    # reference: add the corrupted-minus-clean output of head a0.1 to the k input of key/value head 1
    _, clean = gqa_model.run_with_cache(setup.plan.clean.tokens)
    _, corrupt = gqa_model.run_with_cache(setup.plan.corrupt.tokens)
    diff = corrupt["blocks.0.attn.hook_result"][:, :, 1] - clean["blocks.0.attn.hook_result"][:, :, 1]

    def add(act, hook):
        act = act.clone()
        act[:, :, 1] += diff
        return act

    logits = gqa_model.run_with_hooks(setup.plan.clean.tokens, fwd_hooks=[("blocks.1.hook_k_input", add)])
    expected = setup.metric(P.answer_logits(logits, setup.plan.end_pos), setup.ctx).mean().item()
    assert patcher.value(masks).item() == pytest.approx(expected, abs=1e-4)


def test_path_patching_into_a_shared_kv_input(gqa_model, setup):
    res = P.path_patch(setup, [P.PathReceiver(1, 1, "k")], "end", "noise")
    assert torch.isfinite(res.values).all()
    # the same values from the plain hooks (the reference path, no suffix passes)
    hooks_setup = P.prepare(setup.model, setup.batch, "str", "logit_diff", engine="hooks")
    reference = P.path_patch(hooks_setup, [P.PathReceiver(1, 1, "k")], "end", "noise")
    torch.testing.assert_close(res.values, reference.values, atol=1e-5, rtol=1e-4)
    assert res.values[1].sub(setup.clean_value).abs().max() < 1e-5  # same-layer senders have no path
    with pytest.raises(ValueError, match="head < 2 for k inputs"):
        P.path_patch(setup, [P.PathReceiver(1, 3, "k")])


def test_discovery_runs_and_round_trips(setup, tmp_path):
    patcher = EdgePatcher(setup)
    circuit = D.acdc(patcher, tau=0.05)
    reference = D.acdc(EdgePatcher(setup, engine="hooks"), tau=0.05)  # one edge at a time through plain hooks
    assert torch.equal(circuit.in_circuit, reference.in_circuit) and circuit.n_edges > 0
    eap = D.eap_circuit(patcher, k=10, ig_steps=3)
    path = eap.save(tmp_path / "gqa.graphml")
    back = Circuit.load(path)
    assert back.graph.n_kv_heads == 2 and back.edges == eap.edges
    kv_edges = [r for _, r in eap.edges if ".g" in r]
    assert kv_edges and all(r.endswith(("<k>", "<v>")) for r in kv_edges)
    ipp = D.iterative_path_patching(setup, depth=2, k=1.0)
    assert ipp.n_edges and all(r == "logits" or r.endswith((">",)) for _, r in ipp.edges)
