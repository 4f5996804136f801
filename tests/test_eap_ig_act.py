"""EAP-IG on activations (MIB's variant): one step is EAP, the integral tends to the exact effect,
and on the known-induction model it ranks the true circuit first."""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits import agreement
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.models.zoo.known import INDUCTION_TRUTH


@pytest.fixture(scope="module")
def setup(ioi_model, ioi_batch):
    return P.prepare(ioi_model, ioi_batch, "str", "logit_diff", max_batch=512)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_one_step_is_eap(setup, direction):
    patcher = EdgePatcher(setup, direction=direction)
    torch.testing.assert_close(D.eap_ig_act(patcher, steps=1), D.eap(patcher), atol=1e-5, rtol=1e-4)
    per = D.eap_ig_act(patcher, steps=1, per_prompt=True)
    torch.testing.assert_close(per, D.eap(patcher, per_prompt=True), atol=1e-5, rtol=1e-4)


def test_one_step_is_eap_per_position(setup):
    patcher = EdgePatcher(setup, ModelGraph.from_model(setup.model, n_pos=setup.n_pos))
    torch.testing.assert_close(D.eap_ig_act(patcher, steps=1), D.eap(patcher), atol=1e-5, rtol=1e-4)


def test_many_steps_integrate_to_the_whole_patch(setup):
    """Completeness of IG (Sundararajan et al. 2017): the scores of every edge sum to the metric change
    when every edge is patched with fixed differences, i.e. the source run's value."""
    patcher = EdgePatcher(setup)
    total = D.eap_ig_act(patcher, steps=40).sum().item()
    patched = patcher.value(torch.zeros(1, patcher.n_edges), fixed_diff=True).item()
    exact = patched - setup.clean_value
    assert abs(total - exact) < 0.05 * abs(exact)
    assert abs(D.eap(patcher).sum().item() - exact) > abs(total - exact)  # IG beats the linear estimate


def test_discover_runs_it(setup):
    found = D.discover(setup, "eap_ig_act", top_k=10, ig_steps=2, per_prompt=True)
    assert found.circuit.settings["algorithm"] == "eap_ig_act" and found.circuit.settings["ig_steps"] == 2
    assert found.circuit.n_edges == 10 and found.per_prompt is not None and found.curve is not None
    with pytest.raises(ValueError, match="--ig-steps"):
        D.check_options("eap_ig_act", ig_steps=0)


def test_ranks_the_known_circuit_first(tmp_path_factory):
    from collections import Counter

    from circuitfind.models.catalogue import load_model
    from circuitfind.models.zoo.known import build_induction_model
    from circuitfind.tasks.batch import TaskBatch, generate_prompts

    model = load_model(build_induction_model(tmp_path_factory.mktemp("known")), device="cpu")
    prompts = generate_prompts("induction", 600, seed=0)
    length = Counter(len(p.text.split()) for p in prompts).most_common(1)[0][0]
    batch = TaskBatch.build(model, "induction", [p for p in prompts if len(p.text.split()) == length][:32])
    patcher = EdgePatcher(P.prepare(model, batch, "resample", "logit_diff"))
    graph = patcher.graph
    truth = torch.tensor([e in INDUCTION_TRUTH for e in graph.edges])
    scores = D.eap_ig_act(patcher, steps=10)
    assert agreement.roc_auc(scores, truth).auc == 1.0
    top = D.select_top_k(graph, scores, len(INDUCTION_TRUTH))
    assert set(top.edges) == set(INDUCTION_TRUTH)
