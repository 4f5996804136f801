"""Node and path patching with a size rule where the k-SD rule cannot fire (one head per layer), and
AtP's MLP nodes against exact MLP patching.

The one-head-per-layer model is a known-answer model built here from the hand-set heads of
``circuitfind.models.zoo.known``: four layers of one head each, a previous-token head (``a0.0``) and
an induction head (``a2.0``) that carry the answer, and two distractors (``a1.0`` copies tokens into
a subspace that ``a3.0`` copies on; nothing reads it), so the two circuit heads have large effects
and the other two none."""

from collections import Counter
from typing import Any

import pytest
import torch

from circuitfind import patching as P
from circuitfind.methods import discover as D
from circuitfind.methods.atp import atp_circuit, atp_estimates, atp_mlp_by_position
from circuitfind.models.catalogue import load_model
from circuitfind.models.zoo.known import _one_hot_gpt2, _set_head
from circuitfind.models.zoo.train import build_tokenizer, task_words
from circuitfind.names import head_name
from circuitfind.tasks.batch import TaskBatch, generate_prompts, load_task


def build_one_head_per_layer_model(folder):
    tokenizer = build_tokenizer(task_words(load_task("induction")))
    V, Pn = len(tokenizer), 24
    TOK, POS = 0, V
    PREV, OUT = POS + Pn, POS + Pn + V
    JUNK1, JUNK2 = OUT + V, OUT + 2 * V
    d_model = JUNK2 + V
    model = _one_hot_gpt2(V, Pn, d_model, n_layer=4, n_head=1, n_inner=4, tok=TOK, pos=POS)
    with torch.no_grad():
        t: Any = model.transformer
        blocks = [2, 3, 4, 5]  # one-hot blocks in the residual stream entering each layer
        scale = [1.0 / (d_model / b) ** 0.5 for b in blocks]  # undo LayerNorm: written blocks have norm ~1

        def head(layer, q_from, k_from, v_from, out_to, q_shift=0):
            _set_head(t, layer, 0, d_model, V, 2.0, q_from, k_from, v_from, out_to, scale[layer], q_shift)

        head(0, (POS, Pn), (POS, Pn), TOK, PREV, q_shift=1)  # previous-token head
        head(1, (POS, Pn), (POS, Pn), TOK, JUNK1)  # distractor: its own token into JUNK1
        head(2, (TOK, V), (PREV, V), TOK, OUT)  # induction head
        head(3, (POS, Pn), (POS, Pn), JUNK1, JUNK2)  # distractor: JUNK1 onwards, read by nothing
        for tok in range(1, V):
            model.lm_head.weight[tok, OUT + tok] = 4.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_head(tmp_path_factory):
    model = load_model(build_one_head_per_layer_model(tmp_path_factory.mktemp("one_head")), device="cpu")
    prompts = generate_prompts("induction", 600, seed=0)
    length = Counter(len(p.text.split()) for p in prompts).most_common(1)[0][0]
    same = [p for p in prompts if len(p.text.split()) == length][:16]  # resample needs equal lengths
    return P.prepare(model, TaskBatch.build(model, "induction", same), "resample", "logit_diff")


def test_the_k_sd_rule_finds_nothing_with_one_head_per_layer_and_a_top_k_finds_the_circuit(one_head):
    assert one_head.n_heads == 1 and one_head.n_layers == 4
    effect = P.patch_heads(one_head, "noise").effect.flatten()
    assert effect[0] < -2 and effect[2] < -2 and effect[[1, 3]].abs().max() < 1e-4  # the model works as built
    assert D.node_circuit(one_head, "noise").heads == set()  # the k-SD rule: nothing
    assert D.node_circuit(one_head, "noise", k=1.0).heads == set()  # two of four: each < 0.9 SD from the mean
    top = D.discover(one_head, "node", "noise", node_top_k=2)
    assert top.circuit.heads == {"a0.0", "a2.0"} and top.faithfulness > 0.99
    assert top.circuit.settings["top_k"] == 2 and top.circuit.settings["threshold"] is None
    assert D.node_circuit(one_head, "noise", top_k=1).heads == {head_name(int(effect.argmin()), 0)}
    # an absolute threshold, alone and with a top-k; denoising looks for positive effects
    assert D.node_circuit(one_head, "noise", threshold=1.0).heads == {"a0.0", "a2.0"}
    assert D.node_circuit(one_head, "noise", top_k=4, threshold=1.0).heads == {"a0.0", "a2.0"}
    # denoising, the induction head alone restores the answer (a0.0's clean output cannot: the
    # induction head reads corrupted tokens); a top-k keeps the k largest, so bound it by a size too
    assert D.node_circuit(one_head, "denoise", top_k=2, threshold=1.0).heads == {"a2.0"}
    assert D.node_circuit(one_head, "noise", threshold=1e6).heads == set()


def test_path_patching_with_a_size_rule_recovers_the_induction_path(one_head):
    assert D.iterative_path_patching(one_head, depth=2).edges == []  # the k-SD rule: nothing
    found = D.discover(one_head, "path_patching", "noise", path_top_k=1, path_threshold=0.5)
    assert set(found.circuit.edges) == {("a2.0", "logits"), ("a0.0", "a2.0<k>")}
    assert found.circuit.settings["top_k"] == 1 and found.circuit.settings["threshold"] == 0.5


def test_select_ranks_by_the_important_direction():
    scores = torch.tensor([[-3.0, 0.5], [float("nan"), -1.0]])
    assert P.select(scores, sign="negative", top_k=5) == [(0, 0), (1, 0 + 1)]
    assert P.select(scores, sign="positive", top_k=5) == [(0, 1)]
    assert P.select(scores, sign="both", threshold=0.9) == [(0, 0), (1, 1)]
    assert P.select(scores, k=0.5, sign="negative") == P.detect(scores, k=0.5, sign="negative")
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1"):
        P.select(scores, top_k=0)
    with pytest.raises(ValueError, match="threshold"):
        P.select(scores, threshold=float("nan"))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--node-top-k", "0", "--node-top-k must be >= 1"),
        ("--node-threshold", "-1", "--node-threshold must be > 0"),
        ("--path-top-k", "1.5", "argument --path-top-k: invalid int value"),
    ],
)
def test_size_rule_options_are_flags_with_one_line_errors(flag, value, message, capsys):
    from circuitfind.cli import main

    algorithm = "node" if "node" in flag else "path_patching"
    try:
        code = main(["discover", "--model", "toy-ioi", "--algorithm", algorithm, flag, value, "--prompts", "4"])
    except SystemExit as exit_:  # argparse's own type check exits
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_the_size_rules_are_sweep_config_fields():
    from circuitfind.runs.sweep import SweepConfig

    config = SweepConfig(algorithms=["node", "path_patching"], node_top_k=3, path_threshold=0.2)
    assert config.method_options("node") == {"node_k": 2.0, "node_top_k": 3, "node_threshold": None}
    assert config.method_options("path_patching")["path_threshold"] == 0.2


# -- AtP's MLP nodes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi(ioi_model):
    return P.prepare(ioi_model, TaskBatch.build(ioi_model, "ioi", 8, seed=0), "str", "logit_diff")


def _scaled_sources(setup, eps, full):
    """Patch in ``base + eps * (source - base)`` (``full`` gives ``source``): exact patching is then
    first order in ``eps``."""

    def near(direction, names):
        names = list(names)
        base = setup.base_activations(direction, names)
        return {n: base[n] + eps * (s - base[n]) for n, s in full(direction, names).items()}

    return near


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_atp_mlp_estimates_are_exact_mlp_patching_to_first_order(ioi, direction, monkeypatch):
    """Against ``patch_block(setup, "mlp_out")`` (one MLP at one position) and the MLP node (one MLP,
    every position): with the patch scaled by ``eps``, estimate and exact effect differ by O(eps^2),
    so their gap relative to the effect shrinks like ``eps``; a wrong gradient or difference would
    leave an O(1) gap."""
    original = ioi.sources

    def gaps(eps):
        monkeypatch.setattr(ioi, "sources", _scaled_sources(ioi, eps, original))
        per_pos = atp_mlp_by_position(ioi, direction)
        block = P.patch_block(ioi, "mlp_out", direction).effect
        node = P.patch_mlp_windows(ioi, 1, direction).effect
        mlps = atp_estimates(ioi, direction, "atp")[1]
        torch.testing.assert_close(per_pos.sum(1), mlps, atol=1e-5, rtol=1e-4)  # first order is linear
        return (
            float((per_pos - block).abs().max() / block.abs().max()),
            float((mlps - node).abs().max() / node.abs().max()),
        )

    big_block, big_node = gaps(0.1)
    small_block, small_node = gaps(0.02)
    assert big_block < 0.4 and big_node < 0.4  # measured 0.20-0.31
    assert small_block < 0.35 * big_block and small_node < 0.35 * big_node  # ~ eps (0.2x): first order
    full_block, full_node = gaps(1)
    assert full_node > 2 * big_node  # the full patch is not small on toy-ioi: the estimate is first order only


def test_atp_star_mlp_qk_fix_is_first_order_exact(ioi, monkeypatch):
    """The QK fix of an MLP's write into later heads replaces a linear term by the exact pattern
    change: with small patches the two agree to first order, so AtP* (QK fix alone) and AtP differ by
    O(eps^2) on the MLPs as on the heads."""

    original = ioi.sources

    def gap(eps):
        monkeypatch.setattr(ioi, "sources", _scaled_sources(ioi, eps, original))
        atp = atp_estimates(ioi, "noise", "atp")[1]
        star = atp_estimates(ioi, "noise", "atp_star", grad_drop=False)[1]
        return float((star - atp).abs().max() / atp.abs().max())

    small, smaller = gap(0.1), gap(0.03)
    assert small < 0.2 and smaller < 0.45 * small  # measured 0.12 and 0.034: relative gap ~ eps

    # at the full patch the QK fix brings toy-ioi's MLP estimates closer to exact MLP patching
    monkeypatch.setattr(ioi, "sources", original)
    exact = P.patch_mlp_windows(ioi, 1, "noise").effect
    errors = {v: float((atp_estimates(ioi, "noise", v)[1] - exact).abs().max()) for v in ("atp", "atp_star")}
    assert errors["atp_star"] < 0.6 * errors["atp"]


def test_atp_circuits_include_mlps_ranked_with_the_heads(ioi):
    heads, mlps = atp_estimates(ioi, "noise", "atp")
    ranked = torch.cat([heads.flatten(), mlps]).abs().argsort(descending=True).tolist()
    H = ioi.n_heads
    names = [f"a{i // H}.{i % H}" if i < heads.numel() else f"m{i - heads.numel()}" for i in ranked]
    for k in (5, 60, 262):
        circuit = atp_circuit(ioi, "noise", "atp", top_k=k)
        chosen = set(circuit.settings["heads"]) | set(circuit.settings["mlps"])
        assert chosen == set(names[: len(chosen)])  # a prefix of the joint ranking
        assert circuit.components == chosen
    assert circuit.settings["mlps"] == ["m0", "m1", "m2"]  # every MLP in the largest circuit
    m0 = circuit.graph.edge_lookup[("m0", "logits")]
    assert circuit.in_circuit[m0] and circuit.scores[m0] == pytest.approx(float(mlps[0]))
