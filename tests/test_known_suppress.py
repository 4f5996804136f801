"""The known-answer model with a negative head and an MLP path: its documented circuit is what patching finds."""

import json
from collections import Counter

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits import agreement
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.models.catalogue import load_model
from circuitfind.models.zoo.known import (
    KNOWN_TRUTH,
    NEGATIVE_HEAD,
    SUPPRESSION_DISTRACTORS,
    SUPPRESSION_TRUTH,
    build_suppression_model,
)
from circuitfind.tasks.batch import TaskBatch, generate_prompts
from circuitfind.tasks.evaluation import evaluate


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    torch.set_num_threads(1)
    model = load_model(build_suppression_model(tmp_path_factory.mktemp("suppress")), device="cpu")
    prompts = generate_prompts("induction", 600, seed=0)
    length = Counter(len(p.text.split()) for p in prompts).most_common(1)[0][0]
    same = [p for p in prompts if len(p.text.split()) == length][:32]  # resample needs equal lengths
    return model, TaskBatch.build(model, "induction", same)


def test_the_model_does_induction_at_full_accuracy(known):
    model, batch = known
    report = evaluate(model, batch, corruptions=("str",))
    assert report.accuracy == 1.0 and report.logit_diff > 3


def test_node_patching_finds_the_heads_and_the_negative_one(known):
    model, batch = known
    setup = P.prepare(model, batch, "resample", "logit_diff")
    effect = P.patch_heads(setup, "noise").effect
    for name in SUPPRESSION_DISTRACTORS:
        layer, head = map(int, name[1:].split("."))
        assert abs(effect[layer, head].item()) < 1e-4
    assert effect[0, 0] < -2 and effect[1, 0] < -2
    layer, head = map(int, NEGATIVE_HEAD[1:].split("."))
    assert effect[layer, head] > 1  # patching the suppressor helps the answer
    found = {f"a{l}.{h}" for l, h in P.detect(effect, k=0.5, sign="both")}
    assert found == {"a0.0", "a1.0", NEGATIVE_HEAD}


def test_the_answer_goes_through_the_mlp(known):
    """Removing m1 (its output patched from the corrupted run) removes the answer; the induction
    head's direct edge to the logits does nothing."""
    model, batch = known
    patcher = EdgePatcher(P.prepare(model, batch, "resample", "logit_diff"))
    edges = patcher.graph.edges
    base = patcher.value(patcher.ones())[0].item()

    def without(edge):
        keep = patcher.ones()
        keep[0, edges.index(edge)] = 0.0
        return patcher.value(keep)[0].item() - base

    assert abs(without(("a1.0", "logits"))) < 1e-4
    assert without(("m1", "logits")) < -2 and without(("a1.0", "m1")) < -2
    assert without((NEGATIVE_HEAD, "logits")) > 1


def test_acdc_with_kl_recovers_the_circuit(known):
    model, batch = known
    circuit = D.acdc(EdgePatcher(P.prepare(model, batch, "resample", "kl")), tau=0.05)
    assert set(circuit.edges) == set(SUPPRESSION_TRUTH)


def test_acdc_with_signed_logit_diff_drops_the_negative_head(known):
    """ACDC removes an edge when removing it does not *lower* the metric; removing a suppressor raises
    it, so on a signed metric the negative head's edges are pruned (the reason to use KL)."""
    model, batch = known
    circuit = D.acdc(EdgePatcher(P.prepare(model, batch, "resample", "logit_diff")), tau=0.05)
    negative = {e for e in SUPPRESSION_TRUTH if NEGATIVE_HEAD in e[0] or NEGATIVE_HEAD in e[1]}
    assert set(circuit.edges) == set(SUPPRESSION_TRUTH) - negative


def test_known_suppress_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITFIND_CACHE", str(tmp_path))
    model = load_model("known-suppress", device="cpu")
    assert model.cfg.n_layers == 2 and (tmp_path / "models" / "known-suppress" / "known_circuit.json").is_file()
    written = json.loads((tmp_path / "models" / "known-suppress" / "known_circuit.json").read_text())
    assert [tuple(e) for e in written["truth"]] == KNOWN_TRUTH["known-suppress"] == SUPPRESSION_TRUTH


def test_eap_ig_ranks_the_circuit_first(known):
    """Integrated gradients rank all 10 true edges, the negative head's included, above every other."""
    model, batch = known
    patcher = EdgePatcher(P.prepare(model, batch, "resample", "logit_diff"))
    scores = D.eap_ig(patcher, steps=10)
    truth = torch.tensor([e in SUPPRESSION_TRUTH for e in patcher.graph.edges])
    assert agreement.roc_auc(scores, truth).auc == 1.0


def test_path_patching_counts_later_mlps_as_part_of_the_path(known):
    """Wang et al.'s path patching recomputes MLPs: the path "a1.0 -> logits" carries the answer, all of it
    through m1, while the edge a1.0 -> logits alone does nothing (test above)."""
    model, batch = known
    setup = P.prepare(model, batch, "resample", "logit_diff")
    path = P.path_patch(setup, "logits", positions=None, direction="noise").effect
    node = P.patch_heads(setup, "noise").effect
    assert path[1, 0] < -2 and path[1, 0].item() == pytest.approx(node[1, 0].item(), abs=1e-4)
