"""Information flow routes (Ferrando & Voita 2024) against a hand-written reference on the 2-layer
toy-induction model, and on numbers worked by hand."""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods import discover as D
from circuitfind.methods.ifr import ifr_scores, local_importances, proximity_importance
from circuitfind.tasks.batch import TaskBatch


def test_proximity_by_hand():
    # x = (3, 0): ||x - c1|| = 1, ||x - c2|| = 2, ||x|| = 3 -> proximities 2 and 1
    c = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(proximity_importance(c, c.sum(0)), torch.tensor([2 / 3, 1 / 3]))
    # x = (0, 1): c1 = (1, 0) and c3 = (-1, 0) are farther from x than x is from 0 -> proximity 0
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(proximity_importance(c, c.sum(0)), torch.tensor([0.0, 1.0, 0.0]))
    zero = torch.zeros(2, 3)
    assert proximity_importance(zero, zero.sum(0)).eq(0).all()  # no proximity anywhere: no importance


@pytest.fixture(scope="module")
def example(induction_model):
    batch = TaskBatch.build(induction_model, "induction", 3, seed=1)
    setup = P.prepare(induction_model, batch, "str", "logit_diff")
    _, cache = induction_model.run_with_cache(batch.clean_tokens)
    return setup, cache


def contribution(cache, name, b, t):
    if name == "input":
        return cache["blocks.0.hook_resid_pre"][b, t]
    if name.startswith("m"):
        return cache[f"blocks.{name[1:]}.hook_mlp_out"][b, t]
    layer, head = map(int, name[1:].split("."))
    return cache[f"blocks.{layer}.attn.hook_result"][b, t, head]


def reference(setup, cache, graph):
    """The paper's formula written out edge by edge, prompt by prompt, position by position."""
    end = setup.plan.end_pos.tolist()
    senders_of: dict[str, list[str]] = {}
    for s, r in graph.edges:
        senders_of.setdefault(r, []).append(s)
    expected = {}
    for r, senders in senders_of.items():
        total = {s: 0.0 for s in senders}
        count = 0
        for b in range(setup.size):
            for t in [end[b]] if r == "logits" else range(end[b] + 1):
                parts = {s: contribution(cache, s, b, t).double() for s in senders}
                x = sum(parts.values())
                prox = {s: max(-(x - c).abs().sum().item() + x.abs().sum().item(), 0.0) for s, c in parts.items()}
                norm = sum(prox.values())
                for s in senders:
                    total[s] += prox[s] / norm
                count += 1
        for s in senders:
            expected[(s, r)] = total[s] / count
    return torch.tensor([expected[e] for e in graph.edges])


def test_ifr_matches_the_hand_written_reference(example):
    setup, cache = example
    graph = ModelGraph.from_model(setup.model)
    assert graph.n_layers == 2
    scores = local_importances(setup, graph)
    torch.testing.assert_close(scores, reference(setup, cache, graph).float(), atol=1e-5, rtol=1e-4)
    _, r_idx = graph.edge_index
    per_receiver = torch.zeros(len(graph.receivers)).index_add(0, r_idx, scores)
    torch.testing.assert_close(per_receiver, torch.ones(len(graph.receivers)))  # shares of each input
    # per position: weighted by the prompts that reach each position, they average to the position-free scores
    per_pos = local_importances(setup, ModelGraph.from_model(setup.model, n_pos=setup.n_pos))
    assert per_pos.shape == (graph.n_edges, setup.n_pos)
    reach = (torch.arange(setup.n_pos)[None] <= setup.plan.end_pos[:, None]).sum(0).float()  # prompts per position
    assert len(set(setup.plan.end_pos.tolist())) > 1  # prompts of different lengths: the weighting matters
    non_logit = r_idx != len(graph.receivers) - 1
    averaged = (per_pos[non_logit] * reach).sum(-1) / reach.sum()
    torch.testing.assert_close(averaged, scores[non_logit], atol=1e-5, rtol=1e-4)


def test_ranking_scores_conserve_importance_from_the_logits(example):
    """Scores into one receiver keep its local proportions; the edges into the logits sum to 1; each
    component passes on through its inputs exactly the importance its outgoing edges carry."""
    setup, _ = example
    graph = ModelGraph.from_model(setup.model)
    local, scores = local_importances(setup, graph), ifr_scores(setup, graph)
    s_idx, r_idx = graph.edge_index
    into_logits = r_idx == len(graph.receivers) - 1
    torch.testing.assert_close(scores[into_logits], local[into_logits])
    assert scores[into_logits].sum().item() == pytest.approx(1.0, abs=1e-5)
    for node in graph.senders[1:]:
        out = scores[s_idx == graph.senders.index(node)].sum()
        inputs = [r for r, rec in enumerate(graph.receivers) if node in rec.feeds]
        into = scores[torch.isin(r_idx, torch.tensor(inputs))].sum()
        torch.testing.assert_close(into, out, atol=1e-5, rtol=1e-4)
        for r in inputs:  # a third of a head's importance through each of q, k, v
            edges = r_idx == r
            torch.testing.assert_close(scores[edges].sum(), out / len(inputs), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(scores[edges], local[edges] * out / len(inputs), atol=1e-5, rtol=1e-4)
    per_pos = ifr_scores(setup, ModelGraph.from_model(setup.model, n_pos=setup.n_pos))
    assert per_pos.shape == (graph.n_edges, setup.n_pos) and (per_pos >= 0).all()


def test_senders_add_up_to_the_residual_stream(example):
    """The contributions decompose the receivers' input: layer 1 reads the input, layer 0's heads and
    MLP, plus only layer 0's attention output bias (the same at every prompt and position)."""
    setup, cache = example
    total = (
        cache["blocks.0.hook_resid_pre"] + cache["blocks.0.attn.hook_result"].sum(2) + cache["blocks.0.hook_mlp_out"]
    )
    rest = cache["blocks.1.hook_resid_pre"] - total
    torch.testing.assert_close(rest, rest[:1, :1].expand_as(rest), atol=1e-5, rtol=1e-4)


def test_discover_ifr_is_corruption_free(example):
    setup, _ = example
    found = D.discover(setup, "ifr", top_k=12)
    settings = found.circuit.settings
    assert settings["algorithm"] == "ifr" and settings["corruption_free"] is True
    assert found.circuit.n_edges == 12 and found.curve is not None and found.faithfulness is not None
    other = P.prepare(setup.model, setup.batch, "mean", "logit_diff")
    assert D.discover(other, "ifr", top_k=12, curve=False).circuit.edges == found.circuit.edges
