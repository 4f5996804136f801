"""Edge-patching engine: invariants and single-edge equality with a plain-hook reference."""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching import EdgePatcher


@pytest.fixture(scope="module")
def setups(ioi_model, ioi_batch):
    return {c: P.prepare(ioi_model, ioi_batch, c, "logit_diff") for c in ("str", "gn", "resample", "mean", "zero")}


def _same(engine):
    """The hooks engine reproduces the base runs exactly; the functional one to float rounding."""
    return (lambda a, b: a == b) if engine == "hooks" else (lambda a, b: a == pytest.approx(b, abs=2e-5))


@pytest.mark.parametrize("corruption", ["str", "gn", "resample", "mean", "zero"])
@pytest.mark.parametrize("engine", ["hooks", "functional"])
def test_keeping_every_edge_is_the_clean_run(setups, corruption, engine):
    patcher = EdgePatcher(setups[corruption], engine=engine)
    assert _same(engine)(patcher.value(patcher.ones()).item(), setups[corruption].clean_value)


@pytest.mark.parametrize("corruption", ["str", "gn", "resample"])
@pytest.mark.parametrize("split_qkv", [True, False])
@pytest.mark.parametrize("engine", ["hooks", "functional"])
def test_patching_every_edge_is_the_corrupted_run(setups, corruption, split_qkv, engine):
    setup = setups[corruption]
    graph = ModelGraph.from_model(setup.model, split_qkv=split_qkv)
    patcher = EdgePatcher(setup, graph, engine=engine)
    assert patcher.value(torch.zeros_like(patcher.ones())).item() == pytest.approx(setup.corrupt_value, abs=1e-4)
    denoise = EdgePatcher(setup, graph, direction="denoise", engine=engine)
    assert _same(engine)(denoise.value(denoise.ones()).item(), setup.corrupt_value)
    assert denoise.value(torch.zeros_like(denoise.ones())).item() == pytest.approx(setup.clean_value, abs=1e-4)


def _sender_slice(name):
    if name == "input":
        return "blocks.0.hook_resid_pre", None
    if name.startswith("a"):
        layer, head = map(int, name[1:].split("."))
        return f"blocks.{layer}.attn.hook_result", head
    return f"blocks.{int(name[1:])}.hook_mlp_out", None


def _reference_single_edge(setup, graph, e, direction="noise", position=None):
    """Patch one edge with plain hooks: receiver input += source_out - base_out of the sender."""
    model = setup.model
    sender, _ = graph.edges[e]
    receiver = graph.receivers[graph.edge_index[1][e]]
    out_hook, head = _sender_slice(sender)
    base_run = setup.base_run(direction)
    base_cache = setup.activations("clean" if direction == "noise" else "corrupt", [out_hook])[out_hook]
    source = setup.sources(direction, [out_hook])[out_hook]
    diff = (source - base_cache) if head is None else (source - base_cache)[:, :, head]
    if position is not None:
        keep = torch.zeros(diff.shape[1], dtype=torch.bool)
        keep[position] = True
        diff = diff * keep[None, :, None]
    if receiver.kind == "logits":
        hooks = [(f"blocks.{graph.n_layers - 1}.hook_resid_post", lambda a, hook: a + diff)]
    elif receiver.kind == "mlp":
        hooks = [(f"blocks.{receiver.layer}.hook_mlp_in", lambda a, hook: a + diff)]
    else:
        kinds = ("q", "k", "v") if receiver.kind == "qkv" else (receiver.kind,)

        def add(a, hook):
            a = a.clone()
            a[:, :, receiver.head] += diff
            return a

        hooks = [(f"blocks.{receiver.layer}.hook_{k}_input", add) for k in kinds]
    with torch.no_grad():
        logits = model.run_with_hooks(base_run.tokens, fwd_hooks=list(base_run.hooks) + hooks)
    ans = P.answer_logits(logits, setup.plan.end_pos)
    return setup.metric(ans, setup.ctx).mean().item()


EDGES = [
    ("input", "a0.1<q>"),
    ("a0.2", "a1.3<k>"),
    ("m0", "a2.0<v>"),
    ("a1.2", "m1"),
    ("input", "m2"),
    ("a1.2", "logits"),
    ("m2", "logits"),
    ("a0.0", "a2.3<q>"),
]


@pytest.mark.parametrize("corruption", ["str", "gn", "mean"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_single_patched_edge_matches_plain_hooks(setups, corruption, direction):
    setup = setups[corruption]
    patcher = EdgePatcher(setup, direction=direction)
    graph = patcher.graph
    ids = [graph.edge_lookup[e] for e in EDGES]
    masks = patcher.ones(len(ids))
    for row, e in enumerate(ids):
        masks[row, e] = 0.0
    values = patcher.value(masks)  # all single-edge candidates in one batched run
    for row, e in enumerate(ids):
        assert values[row].item() == pytest.approx(_reference_single_edge(setup, graph, e, direction), abs=1e-4), (
            graph.edges[e]
        )


def test_merged_qkv_edge_matches_plain_hooks(setups):
    setup = setups["str"]
    graph = ModelGraph.from_model(setup.model, split_qkv=False)
    patcher = EdgePatcher(setup, graph)
    for edge in [("a0.2", "a1.3"), ("input", "a2.1"), ("m1", "a2.2")]:
        e = graph.edge_lookup[edge]
        masks = patcher.ones()
        masks[0, e] = 0
        assert patcher.value(masks).item() == pytest.approx(_reference_single_edge(setup, graph, e), abs=1e-4)


def test_per_position_edges(setups):
    setup = setups["str"]
    graph = ModelGraph.from_model(setup.model, n_pos=setup.n_pos)
    patcher = EdgePatcher(setup, graph)
    assert patcher.value(patcher.ones()).item() == setup.clean_value
    assert patcher.value(torch.zeros_like(patcher.ones())).item() == pytest.approx(setup.corrupt_value, abs=1e-4)
    s2 = setup.batch.positions["S2"][0].item()
    for edge in [("input", "a0.1<k>"), ("a0.3", "a1.2<v>")]:
        e = graph.edge_lookup[edge]
        masks = patcher.ones()
        masks[0, e, s2] = 0
        expected = _reference_single_edge(setup, graph, e, position=s2)
        assert patcher.value(masks).item() == pytest.approx(expected, abs=1e-4)
    # patching an edge at every position equals patching the position-free edge
    flat = EdgePatcher(setup)
    e = graph.edge_lookup[("a0.3", "a1.2<v>")]
    masks = patcher.ones()
    masks[0, e, :] = 0
    flat_masks = flat.ones()
    flat_masks[0, e] = 0
    assert patcher.value(masks).item() == pytest.approx(flat.value(flat_masks).item(), abs=1e-5)


def test_candidate_batching_matches_one_at_a_time(ioi_model, ioi_batch):
    big = EdgePatcher(P.prepare(ioi_model, ioi_batch, "gn", "kl", max_batch=10_000))
    small = EdgePatcher(P.prepare(ioi_model, ioi_batch, "gn", "kl", max_batch=1))
    masks = (torch.rand(6, big.n_edges, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    torch.testing.assert_close(big.value(masks), small.value(masks), atol=1e-5, rtol=1e-5)


def test_float_masks_are_differentiable(setups):
    """The mask gradient agrees with a finite difference of the masked forward."""
    patcher = EdgePatcher(setups["str"])
    masks = patcher.ones().requires_grad_(True)
    patcher.value(masks).sum().backward()
    e = patcher.graph.edge_lookup[("a1.2", "logits")]
    eps = 1e-2
    shifted = patcher.ones()
    shifted[0, e] -= eps
    with torch.no_grad():
        fd = (patcher.value(patcher.ones()) - patcher.value(shifted)).item() / eps
    assert masks.grad[0, e].item() == pytest.approx(fd, rel=1e-2, abs=1e-3)


def test_mask_shape_is_checked(setups):
    patcher = EdgePatcher(setups["str"])
    with pytest.raises(ValueError, match="edge masks must be"):
        patcher.value(torch.ones(1, 5))


@pytest.mark.parametrize("corruption", ["str", "gn", "mean"])
@pytest.mark.parametrize("engine", ["hooks", "functional"])
def test_starting_at_a_receiver_reuses_the_prefix_exactly(setups, corruption, engine):
    patcher = EdgePatcher(setups[corruption], engine=engine)
    graph = patcher.graph
    r_idx = graph.edge_index[1]
    gen = torch.Generator().manual_seed(0)
    names = [r.name for r in graph.receivers]
    for start in [names.index(n) for n in ("a1.0<q>", "a1.2<k>", "m1", "a2.3<v>", "m2", "logits")]:
        masks = (torch.rand(patcher.n_edges, generator=gen) > 0.3).float().repeat(4, 1)
        late = r_idx >= start  # candidates differ only in edges into receivers from `start` on
        masks[:, late] = (torch.rand(4, int(late.sum()), generator=gen) > 0.5).float()
        torch.testing.assert_close(patcher.run(masks, first_receiver=start), patcher.run(masks), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="start"):
        patcher.run(patcher.ones().requires_grad_(True), first_receiver=3)


@pytest.mark.parametrize(
    "corruption,direction", [("str", "noise"), ("gn", "denoise"), ("mean", "noise"), ("resample", "denoise")]
)
def test_attribution_equals_the_mask_gradient(setups, corruption, direction):
    """EAP's pass without masks (differences dotted with receiver gradients) against the gradient of
    the masked forward at masks that keep every edge, per prompt, with live and fixed differences."""
    patcher = EdgePatcher(setups[corruption], direction=direction)
    for fixed in (False, True):
        masks = patcher.ones(per_prompt=True).requires_grad_(True)
        patcher.run(masks, per_prompt=True, fixed_diff=fixed).sum().backward()
        expected = -masks.grad[0]
        torch.testing.assert_close(
            patcher.attribution(per_prompt=True, fixed_diff=fixed), expected, atol=1e-5, rtol=1e-5
        )
        B = patcher.setup.size
        torch.testing.assert_close(
            patcher.attribution(fixed_diff=fixed, scale=1 / B), expected.mean(-1), atol=1e-6, rtol=1e-5
        )


def test_attribution_on_grouped_query_attention_equals_the_mask_gradient(gqa_model):
    from circuitfind.tasks.batch import TaskBatch

    patcher = EdgePatcher(P.prepare(gqa_model, TaskBatch.build(gqa_model, "ioi", 6, seed=2), "str", "logit_diff"))
    masks = patcher.ones().requires_grad_(True)
    patcher.run(masks).mean().backward()
    torch.testing.assert_close(patcher.attribution(scale=1 / 6), -masks.grad[0], atol=1e-6, rtol=1e-5)
    merged = EdgePatcher(P.prepare(gqa_model, TaskBatch.build(gqa_model, "ioi", 6, seed=2), "gn", "kl"))
    masks = merged.ones().requires_grad_(True)
    merged.run(masks).mean().backward()
    torch.testing.assert_close(merged.attribution(scale=1 / merged.setup.size), -masks.grad[0], atol=1e-6, rtol=1e-5)
