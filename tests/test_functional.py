"""The hook-free engine: components equal the bridge's, masked passes equal the hooks engine,
incremental passes equal full ones."""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher
from circuitfind.models import tensor_forward
from circuitfind.models.loading import load_model
from circuitfind.tasks.batch import TaskBatch


@pytest.fixture(scope="module")
def models(ioi_model, induction_model, gqa_model):
    return {"toy-ioi": ioi_model, "toy-induction": induction_model, "gqa-llama": gqa_model}


def _batch(model, name):
    task = "induction" if "induction" in name else "ioi"
    return TaskBatch.build(model, task, 12, seed=5)


@pytest.mark.parametrize("name", ["toy-ioi", "gqa-llama"])
def test_components_equal_the_bridge(models, name):
    """Attention per head, MLP and unembedding, fed the bridge's own cached inputs."""
    model = models[name]
    tokens = _batch(model, name).clean_tokens
    fm = tensor_forward.TensorModel(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        for layer in range(model.cfg.n_layers):
            q, k, v = (cache[f"blocks.{layer}.hook_{x}_input"] for x in "qkv")
            out = fm.attention(layer, q, k, v)
            torch.testing.assert_close(out, cache[f"blocks.{layer}.attn.hook_result"], atol=1e-5, rtol=1e-5)
            end = torch.randint(0, tokens.shape[1], (tokens.shape[0],))  # queries at one position per row
            rows = torch.arange(tokens.shape[0])
            at_end = fm.attention(layer, q[rows, end], k, v, q_pos=end)
            torch.testing.assert_close(at_end, out[rows, end], atol=1e-5, rtol=1e-5)
            some = fm.attention(
                layer,
                q[:, :, [1, 3]],
                k[:, :, [1 * k.shape[2] // 4, 3 * k.shape[2] // 4]],
                v[:, :, [1 * k.shape[2] // 4, 3 * k.shape[2] // 4]],
                heads=[1, 3],
            )
            torch.testing.assert_close(some, out[:, :, [1, 3]], atol=1e-5, rtol=1e-5)
            mlp = fm.mlp(layer, cache[f"blocks.{layer}.hook_mlp_in"])
            torch.testing.assert_close(mlp, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=1e-5)
        final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        torch.testing.assert_close(fm.unembed(final), logits, atol=1e-4, rtol=1e-5)


CASES = [
    ("toy-ioi", c, d, s) for c in ("str", "gn", "resample", "mean") for d in ("noise", "denoise") for s in (True, False)
]
CASES += [("toy-induction", c, "noise", True) for c in ("gn", "zero")]
CASES += [("gqa-llama", c, d, True) for c in ("str", "gn") for d in ("noise", "denoise")]


@pytest.mark.parametrize("name,corruption,direction,split_qkv", CASES)
def test_masked_forward_equals_the_hooks_engine(models, name, corruption, direction, split_qkv):
    model = models[name]
    setup = P.prepare(model, _batch(model, name), corruption, "kl")
    graph = ModelGraph.from_model(model, split_qkv=split_qkv)
    hooks = EdgePatcher(setup, graph, direction, engine="hooks")
    fast = EdgePatcher(setup, graph, direction, engine="functional")
    gen = torch.Generator().manual_seed(2)
    masks = torch.cat(
        [hooks.ones(), (torch.rand(5, hooks.n_edges, generator=gen) > 0.4).float(), torch.zeros(1, hooks.n_edges)]
    )
    expected = hooks.run(masks)
    assert expected.std() > 0.01  # the masks make a difference
    torch.testing.assert_close(fast.run(masks), expected, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,split_qkv,direction,corruption",
    [
        ("toy-ioi", True, "noise", "str"),
        ("toy-ioi", False, "denoise", "str"),
        ("toy-ioi", True, "noise", "mean"),
        ("toy-induction", True, "noise", "gn"),
        ("gqa-llama", True, "noise", "str"),
    ],
)
def test_incremental_passes_equal_full_passes(models, name, split_qkv, direction, corruption):
    """A random walk of edits into one or two receivers at a time, adopting one candidate per step."""
    model = models[name]
    setup = P.prepare(model, _batch(model, name), corruption, "logit_diff")
    graph = ModelGraph.from_model(model, split_qkv=split_qkv)
    patcher = EdgePatcher(setup, graph, direction)
    reference = EdgePatcher(setup, graph, direction, engine="hooks")
    search = patcher.incremental()
    assert search.forward is not None
    r_idx = graph.edge_index[1]
    gen = torch.Generator().manual_seed(0)
    current = patcher.ones()
    for step in range(10):
        receivers = torch.randint(0, len(graph.receivers), (1 + step % 2,), generator=gen)
        into = torch.isin(r_idx, receivers)
        masks = current.repeat(3, 1)
        masks[:, into] = (torch.rand(3, int(into.sum()), generator=gen) > 0.5).float()
        torch.testing.assert_close(search.values(masks), reference.value(masks), atol=5e-5, rtol=1e-5)
        j = int(torch.randint(0, 3, (1,), generator=gen))
        search.adopt(j)
        current = masks[j : j + 1]


def test_incremental_search_on_the_hooks_engine(models):
    model = models["toy-ioi"]
    setup = P.prepare(model, _batch(model, "toy-ioi"), "gn", "kl")
    hooks = EdgePatcher(setup, engine="hooks")
    search = hooks.incremental()
    assert search.forward is None
    masks = hooks.ones(2)
    late = hooks.graph.edge_index[1] >= len(hooks.graph.receivers) - 6
    masks[1, late] = 0.0
    torch.testing.assert_close(search.values(masks), hooks.value(masks), atol=1e-5, rtol=1e-5)
    search.adopt(1)
    assert torch.equal(search.reference, masks[1:])


def test_start_requires_candidates_to_agree_below_it(models):
    model = models["toy-ioi"]
    patcher = EdgePatcher(P.prepare(model, _batch(model, "toy-ioi"), "str", "kl"))
    masks = patcher.ones(2)
    masks[1, 0] = 0.0  # an edge into the first receiver
    start = [r.name for r in patcher.graph.receivers].index("a1.0<q>")
    with pytest.raises(ValueError, match="candidates must agree"):
        patcher.run(masks, first_receiver=start)


def test_engine_choice(models, tmp_path):
    model = models["toy-ioi"]
    setup = P.prepare(model, _batch(model, "toy-ioi"), "str", "kl")
    assert EdgePatcher(setup).engine == "functional"
    assert EdgePatcher(setup, engine="hooks").engine == "hooks"
    per_position = ModelGraph.from_model(model, n_pos=setup.n_pos)
    assert EdgePatcher(setup, per_position).engine == "hooks"
    with pytest.raises(tensor_forward.UnsupportedModelError):
        EdgePatcher(setup, per_position, engine="functional")
    with pytest.raises(ValueError, match="engine must be"):
        EdgePatcher(setup, engine="fast")


def test_unsupported_architecture_falls_back_to_hooks(tmp_path):
    """A GPT-NeoX (Pythia-style) model: parallel attention and partial rotary are not implemented."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuitfind.models.zoo.train import build_tokenizer, task_words
    from circuitfind.tasks.batch import load_task

    tokenizer = build_tokenizer(task_words(load_task("ioi")))
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    assert not tensor_forward.supports(model)
    setup = P.prepare(model, TaskBatch.build(model, "ioi", 8, seed=0), "gn", "logit_diff")
    patcher = EdgePatcher(setup)
    assert patcher.engine == "hooks" and patcher.incremental().forward is None
    assert patcher.value(patcher.ones()).item() == setup.clean_value
    with pytest.raises(tensor_forward.UnsupportedModelError, match="gpt_neox"):
        tensor_forward.TensorModel(model)


@pytest.mark.parametrize("name,tau", [("gqa-llama", 0.05), ("toy-induction", 0.05)])
def test_acdc_finds_the_same_circuit_on_both_engines(models, name, tau):
    from circuitfind.methods import discover as D

    model = models[name]
    corruption = "gn" if "induction" in name else "str"
    setup = P.prepare(model, _batch(model, name), corruption, "kl")
    fast, hooks = EdgePatcher(setup), EdgePatcher(setup, engine="hooks")
    assert fast.engine == "functional"
    reference = D.acdc(hooks, tau, candidates=1, reuse_prefix=False)
    circuit = D.acdc(fast, tau)
    assert 0 < reference.n_edges < fast.n_edges
    assert torch.equal(circuit.in_circuit, reference.in_circuit)


@pytest.mark.parametrize("name", ["toy-ioi", "gqa-llama"])
def test_both_engines_implement_the_engine_interface(models, name):
    from circuitfind.edge_patching import Engine

    model = models[name]
    setup = P.prepare(model, _batch(model, name), "str", "kl")
    direct, hooks = EdgePatcher(setup, engine="functional").backend, EdgePatcher(setup, engine="hooks").backend
    assert (
        isinstance(direct, Engine)
        and isinstance(hooks, Engine)
        and (direct.name, hooks.name) == ("functional", "hooks")
    )
    gen = torch.Generator().manual_seed(3)
    keep = (torch.rand(3, direct.patcher.n_edges, generator=gen) > 0.3).float()
    keep[:, : direct.patcher.graph.upstream(direct.patcher.graph.receivers[0])] = (
        1.0  # agree on the first receiver's edges
    )
    everything, prompts = slice(0, setup.size), slice(2, 7)
    expected = hooks.logits(keep, everything)
    assert expected.shape == (3 * setup.size, model.cfg.d_vocab)
    torch.testing.assert_close(direct.logits(keep, everything), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(direct.logits(keep, everything, first_receiver=1), expected, atol=1e-4, rtol=1e-5)
    rows = torch.cat([torch.arange(c * setup.size + 2, c * setup.size + 7) for c in range(3)])
    torch.testing.assert_close(direct.logits(keep, prompts), expected[rows], atol=1e-4, rtol=1e-5)
