"""Memory budgets: passes split by candidates and prompts give the results of one pass.

Tolerances: splitting changes only the batch shapes of the matrix products, so values agree to
float32 rounding; the tests ask for 1e-5 (metric values and attribution scores, absolute).
"""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.patching import memory
from circuitfind.tasks.batch import TaskBatch

TINY = 1  # one byte: one row (one candidate on one prompt) per pass


def test_parse_memory():
    assert memory.parse_memory("4GB") == 4 * 2**30
    assert memory.parse_memory("512 mb") == 512 * 2**20
    assert memory.parse_memory("1.5G") == int(1.5 * 2**30)
    assert memory.parse_memory(2e9) == 2_000_000_000 and memory.parse_memory(None) is None
    for bad in ("lots", "4 parsecs", -1, 0, "0GB"):
        with pytest.raises(ValueError, match="max_memory"):
            memory.parse_memory(bad)


def test_prepare_rejects_a_bad_budget(ioi_model, ioi_batch):
    with pytest.raises(ValueError, match="max_memory"):
        P.prepare(ioi_model, ioi_batch, "str", max_memory="a lot")


@pytest.mark.parametrize("rows", [1, 3, 8, 24, 100])
def test_schedule_covers_every_candidate_and_prompt_once(rows):
    seen = torch.zeros(5, 8, dtype=torch.int)
    for cands, prompts in memory.schedule(5, 8, rows):
        assert (cands.stop - cands.start) * (prompts.stop - prompts.start) <= max(rows, 1)
        seen[cands, prompts] += 1
    assert (seen == 1).all()
    whole = memory.schedule(5, 8, 3, split_prompts=False)  # one candidate, every prompt per pass
    assert [(c.start, p.stop) for c, p in whole] == [(i, 8) for i in range(5)]


def _pair(model, batch, corruption, metric, **kw):
    """The same setup with an automatic budget (one pass on these toy sizes) and a one-row budget."""
    big = P.prepare(model, batch, corruption, metric, max_batch=4096)
    small = P.prepare(model, batch, corruption, metric, max_batch=4096, max_memory=TINY)
    return EdgePatcher(big, **kw), EdgePatcher(small, **kw)


@pytest.mark.parametrize("engine", ["functional", "hooks"])
@pytest.mark.parametrize(
    "corruption,direction", [("str", "noise"), ("gn", "denoise"), ("mean", "denoise"), ("resample", "noise")]
)
def test_split_passes_equal_one_pass(ioi_model, ioi_batch, engine, corruption, direction):
    one, split = _pair(ioi_model, ioi_batch, corruption, "kl", direction=direction, engine=engine)
    n = 3
    assert len(one._passes(n, engine, True, slice(0, one.setup.size))) == 1
    assert len(split._passes(n, engine, True, slice(0, split.setup.size))) == n * split.setup.size
    masks = (torch.rand(n, one.n_edges, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    expected = one.run(masks)
    assert expected.std() > 0.01
    torch.testing.assert_close(split.run(masks), expected, atol=1e-5, rtol=0)


def test_split_passes_on_grouped_query_attention(gqa_model):
    batch = TaskBatch.build(gqa_model, "ioi", 6, seed=2)
    one, split = _pair(gqa_model, batch, "gn", "logit_diff")
    masks = (torch.rand(2, one.n_edges, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    torch.testing.assert_close(split.run(masks), one.run(masks), atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eap(split), D.eap(one), atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eap_ig(split, steps=3), D.eap_ig(one, steps=3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("corruption,direction", [("str", "noise"), ("gn", "denoise"), ("mean", "noise")])
def test_attributions_with_a_backward_per_pass_equal_one_pass(ioi_model, corruption, direction):
    batch = TaskBatch.build(ioi_model, "ioi", 8, seed=0)
    one, split = _pair(ioi_model, batch, corruption, "logit_diff", direction=direction)
    assert len(split.passes(1)) == split.setup.size and len(one.passes(1)) == 1
    torch.testing.assert_close(D.eap(split), D.eap(one), atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eap(split, per_prompt=True), D.eap(one, per_prompt=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eap_ig(split, steps=3), D.eap_ig(one, steps=3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        D.eap_ig(split, steps=2, per_prompt=True), D.eap_ig(one, steps=2, per_prompt=True), atol=1e-5, rtol=0
    )


def test_acdc_within_a_one_candidate_budget_finds_the_same_circuit(ioi_model, ioi_batch):
    one, split = _pair(ioi_model, ioi_batch, "str", "kl")
    assert split.incremental().max_candidates == 1 and one.incremental().max_candidates > 1
    expected = D.acdc(one, 0.02)
    circuit = D.acdc(split, 0.02)
    assert torch.equal(circuit.in_circuit, expected.in_circuit)
    assert circuit.settings["forward_passes"] > expected.settings["forward_passes"]


def test_incremental_search_splits_candidates_and_adopts_from_any_pass(ioi_model, ioi_batch):
    setup = P.prepare(ioi_model, ioi_batch, "str", "logit_diff")
    patcher, reference = EdgePatcher(setup), EdgePatcher(setup, engine="hooks")
    search = patcher.incremental()
    search.max_candidates = 2
    r_idx, gen = patcher.graph.edge_index[1], torch.Generator().manual_seed(3)
    current = patcher.ones()
    for step, receiver in enumerate([40, 17, 5]):
        masks = current.repeat(5, 1)
        into = r_idx == receiver
        masks[:, into] = (torch.rand(5, int(into.sum()), generator=gen) > 0.5).float()
        torch.testing.assert_close(search.values(masks), reference.value(masks), atol=5e-5, rtol=0)
        j = (0, 3, 4)[step]  # from the first pass (run again), the second, the last (kept)
        search.adopt(j)
        current = masks[j : j + 1]
    torch.testing.assert_close(search.values(current), reference.value(current), atol=5e-5, rtol=0)


def test_per_position_attributions_add_up_to_the_position_free_ones(ioi_model):
    """Per-position graphs take EAP from the masks' gradient (split into passes too); summed over
    positions it is the position-free attribution."""
    from circuitfind.circuits.graph import ModelGraph

    batch = TaskBatch.build(ioi_model, "ioi", 6, seed=0)
    for budget in (None, TINY):
        setup = P.prepare(ioi_model, batch, "str", "logit_diff", max_memory=budget)
        per_pos = EdgePatcher(setup, ModelGraph.from_model(ioi_model, n_pos=setup.n_pos))
        scores = D.eap(per_pos)
        assert scores.shape == (per_pos.n_edges, setup.n_pos)
        torch.testing.assert_close(scores.sum(-1), D.eap(EdgePatcher(setup)), atol=1e-5, rtol=1e-5)
