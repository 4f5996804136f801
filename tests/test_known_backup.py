"""The known-answer model with a backup head: silent in the full model, it takes over when the main
head is patched, which hides the main head from node patching and the backup from ACDC."""

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
    BACKUP_DISTRACTORS,
    BACKUP_HEAD,
    BACKUP_MAIN_TRUTH,
    BACKUP_TRUTH,
    KNOWN_TRUTH,
    build_backup_model,
)
from circuitfind.tasks.batch import TaskBatch, generate_prompts
from circuitfind.tasks.evaluation import evaluate


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    torch.set_num_threads(1)
    model = load_model(build_backup_model(tmp_path_factory.mktemp("backup")), device="cpu")
    prompts = generate_prompts("induction", 600, seed=0)
    length = Counter(len(p.text.split()) for p in prompts).most_common(1)[0][0]
    same = [p for p in prompts if len(p.text.split()) == length][:32]  # resample needs equal lengths
    return model, TaskBatch.build(model, "induction", same)


@pytest.fixture(scope="module")
def removal(known):
    """``removal(edges)``: change of the logit difference when ``edges`` are patched together."""
    model, batch = known
    patcher = EdgePatcher(P.prepare(model, batch, "resample", "logit_diff"))
    edges = patcher.graph.edges
    base = patcher.value(patcher.ones())[0].item()

    def change(remove):
        keep = patcher.ones()
        for e in remove:
            keep[0, edges.index(e)] = 0.0
        return patcher.value(keep)[0].item() - base

    return change, edges


def test_the_model_does_induction_and_the_backup_is_silent(known):
    model, batch = known
    report = evaluate(model, batch, corruptions=("str",))
    assert report.accuracy == 1.0 and report.logit_diff > 3
    _, cache = model.run_with_cache(batch.clean_tokens)
    layer, head = map(int, BACKUP_HEAD[1:].split("."))
    assert (cache[f"blocks.{layer}.attn.hook_pattern"][:, head, -1, 0] > 0.99).all()  # parked on BOS


def test_node_patching_sees_neither_the_main_head_nor_the_backup(known, removal):
    model, batch = known
    change, _ = removal
    effect = P.patch_heads(P.prepare(model, batch, "resample", "logit_diff"), "noise").effect
    for name in BACKUP_DISTRACTORS:
        layer, head = map(int, name[1:].split("."))
        assert abs(effect[layer, head].item()) < 1e-4
    assert effect[0, 0] < -4  # the previous-token head feeds both paths
    assert abs(effect[1, 0].item()) < 1 and abs(effect[2, 0].item()) < 0.05
    assert change([("a1.0", "logits")]) < -4  # yet the main head's direct edge carries the answer


def test_the_backup_path_matters_once_the_main_head_is_removed(removal):
    change, edges = removal
    main_off = [e for e in edges if e[0] == "a1.0"]
    for edge in BACKUP_TRUTH:
        if edge not in BACKUP_MAIN_TRUTH and edge[0] != "a1.0":
            assert change([*main_off, edge]) - change(main_off) < -1, edge
    assert change([("a1.0", "a2.0<q>")]) > 4  # lifting the veto alone turns the backup on


@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_acdc_finds_the_main_path_and_misses_the_backup(known, metric):
    model, batch = known
    circuit = D.acdc(EdgePatcher(P.prepare(model, batch, "resample", metric)), tau=0.05)
    assert set(circuit.edges) == set(BACKUP_MAIN_TRUTH)


def test_known_backup_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITFIND_CACHE", str(tmp_path))
    model = load_model("known-backup", device="cpu")
    assert model.cfg.n_layers == 3 and (tmp_path / "models" / "known-backup" / "known_circuit.json").is_file()
    written = json.loads((tmp_path / "models" / "known-backup" / "known_circuit.json").read_text())
    assert [tuple(e) for e in written["truth"]] == KNOWN_TRUTH["known-backup"] == BACKUP_TRUTH


def test_eap_ig_ranks_the_active_path_first_and_not_the_backup(known):
    """Gradients at the full model see what is active there: the main path ranks first, the silent
    backup's edges do not (AUROC < 1 against the whole truth)."""
    model, batch = known
    patcher = EdgePatcher(P.prepare(model, batch, "resample", "logit_diff"))
    scores = D.eap_ig(patcher, steps=10)
    edges = patcher.graph.edges
    assert agreement.roc_auc(scores, torch.tensor([e in BACKUP_MAIN_TRUTH for e in edges])).auc == 1.0
    assert agreement.roc_auc(scores, torch.tensor([e in BACKUP_TRUTH for e in edges])).auc < 0.95
