"""Patching engine: cross-checks against transformer_lens.patching, invariants, slow references."""

import pytest
import torch
from transformer_lens import patching as tl_patching

from circuitfind import patching as P
from circuitfind.tasks.batch import TaskBatch


@pytest.fixture(scope="module")
def small_batch(ioi_model):
    return TaskBatch.build(ioi_model, "ioi", 8, seed=11)


def _tl_metric(batch, name):
    """The same metric as circuitfind's, written for TransformerLens: full logits -> scalar."""

    def metric(logits):
        ans = logits[torch.arange(logits.shape[0]), batch.end_pos]
        if name == "logit_diff":
            return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean()
        return ans.softmax(-1).gather(1, batch.answers[:, None]).mean()

    return metric


TL_SWEEPS = {
    "resid_pre": (tl_patching.get_act_patch_resid_pre, lambda s, d: P.patch_block(s, "resid_pre", d)),
    "attn_out": (tl_patching.get_act_patch_attn_out, lambda s, d: P.patch_block(s, "attn_out", d)),
    "mlp_out": (tl_patching.get_act_patch_mlp_out, lambda s, d: P.patch_block(s, "mlp_out", d)),
    "heads": (tl_patching.get_act_patch_attn_head_out_all_pos, lambda s, d: P.patch_heads(s, d)),
    "heads_by_pos": (
        tl_patching.get_act_patch_attn_head_out_by_pos,
        lambda s, d: P.patch_heads(s, d, by_position=True),
    ),
}


@pytest.mark.parametrize("metric", ["logit_diff", "prob"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("sweep", sorted(TL_SWEEPS))
def test_node_patching_matches_transformer_lens(ioi_model, small_batch, sweep, direction, metric):
    tl_fn, ours = TL_SWEEPS[sweep]
    setup = P.prepare(ioi_model, small_batch, "str", metric, max_batch=64)
    result = ours(setup, direction)
    clean, corrupt = small_batch.clean_tokens, small_batch.corrupted()
    # TransformerLens patches a cached run into the run of the given tokens
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, source_cache = ioi_model.run_with_cache(source)
    expected = tl_fn(ioi_model, base, source_cache, _tl_metric(small_batch, metric))
    assert result.values.shape == expected.shape
    torch.testing.assert_close(result.values, expected.cpu(), atol=1e-5, rtol=1e-5)


def test_resample_matches_transformer_lens(ioi_model):
    batch = TaskBatch.build(ioi_model, "ioi", 30, seed=5)
    setup = P.prepare(ioi_model, batch, "resample", "logit_diff")
    ours = P.patch_heads(setup, "noise")
    _, corrupt_cache = ioi_model.run_with_cache(setup.plan.corrupt.tokens)
    expected = tl_patching.get_act_patch_attn_head_out_all_pos(
        ioi_model, batch.clean_tokens, corrupt_cache, _tl_metric(batch, "logit_diff")
    )
    torch.testing.assert_close(ours.values, expected, atol=1e-5, rtol=1e-5)


def _all_hooks_masks(setup, value):
    """Float masks of a constant over every block output hook (one candidate)."""
    masks = {}
    for layer in range(setup.n_layers):
        for what in ("attn_out", "mlp_out", "resid_post"):
            masks[P.hook_name(layer, what)] = torch.full((1, 1, setup.n_pos, 1), value)
    return masks


CORRUPTIONS = ["str", "str:abc", "gn", "mean", "zero", "resample"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_nothing_reproduces_the_unpatched_run(ioi_model, ioi_batch, corruption, direction):
    setup = P.prepare(ioi_model, ioi_batch, corruption, "logit_diff")
    values = P.run_patched(setup, direction, _all_hooks_masks(setup, 0.0)).mean(1)
    expected = setup.corrupt_value if direction == "denoise" else setup.clean_value
    assert values.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("corruption", ["str", "gn", "resample"])
@pytest.mark.parametrize("metric", ["logit_diff", "kl", "prob"])
def test_patching_the_final_residual_stream_reproduces_the_other_run(ioi_model, ioi_batch, corruption, metric):
    setup = P.prepare(ioi_model, ioi_batch, corruption, metric)
    last = P.hook_name(setup.n_layers - 1, "resid_post")
    mask = {last: torch.ones(1, 1, setup.n_pos, 1, dtype=torch.bool)}
    assert P.run_patched(setup, "denoise", mask).mean().item() == pytest.approx(setup.clean_value, abs=1e-5)
    assert P.run_patched(setup, "noise", mask).mean().item() == pytest.approx(setup.corrupt_value, abs=1e-5)
    # the first residual stream, all positions, is the whole input: the same holds there
    first = {P.hook_name(0, "resid_pre"): torch.ones(1, 1, setup.n_pos, 1, dtype=torch.bool)}
    assert P.run_patched(setup, "denoise", first).mean().item() == pytest.approx(setup.clean_value, abs=1e-5)


def test_denoising_and_noising_results_are_normalised(ioi_model, ioi_batch):
    setup = P.prepare(ioi_model, ioi_batch, "str", "logit_diff")
    res = P.patch_block(setup, "resid_pre", "denoise")
    end = ioi_batch.end_pos
    # patching resid_pre at layer 0 at the S2 position carries the whole corruption for s2_io
    assert res.normalised.shape == (setup.n_layers, setup.n_pos)
    assert (res.normalised <= 1 + 1e-4).all()
    assert torch.allclose(res.effect, res.values - setup.corrupt_value)
    noise = P.patch_block(setup, "resid_pre", "noise")
    assert torch.allclose(noise.effect, noise.values - setup.clean_value)
    assert end.numel() == ioi_batch.size


def test_candidate_batching_does_not_change_results(ioi_model, ioi_batch):
    big = P.prepare(ioi_model, ioi_batch, "gn", "kl", max_batch=100_000)
    small = P.prepare(ioi_model, ioi_batch, "gn", "kl", max_batch=1)
    torch.testing.assert_close(P.patch_heads(big, "noise").values, P.patch_heads(small, "noise").values)
    torch.testing.assert_close(
        P.patch_heads(big, "denoise", by_position=True).values, P.patch_heads(small, "denoise", by_position=True).values
    )


def test_window_layers_clip_at_the_ends():
    assert list(P.window_layers(0, 3, 4)) == [0, 1]
    assert list(P.window_layers(3, 3, 4)) == [2, 3]
    assert list(P.window_layers(2, 5, 4)) == [0, 1, 2, 3]
    assert list(P.window_layers(1, 1, 4)) == [1]
    with pytest.raises(ValueError):
        P.window_layers(0, 0, 4)


def _manual_mlp_patch(model, setup, layers, positions):
    """Slow reference: plain hooks that patch clean mlp_out into the corrupted run."""
    batch = setup.batch
    _, clean = model.run_with_cache(batch.clean_tokens)
    rows = torch.arange(batch.size)

    def patcher(hook_name):
        def hook(act, hook):
            src = clean[hook_name]
            if positions is None:
                return src.clone()
            act = act.clone()
            for name in positions:
                act[rows, batch.positions[name]] = src[rows, batch.positions[name]]
            return act

        return hook

    names = [f"blocks.{l}.hook_mlp_out" for l in layers]
    logits = model.run_with_hooks(batch.corrupted(), fwd_hooks=[(n, patcher(n)) for n in names])
    ans = logits[rows, batch.end_pos]
    return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean().item()


@pytest.mark.parametrize("positions", [None, ["S2"], ["IO", "S1"]])
def test_mlp_windows_match_a_plain_hook_reference(ioi_model, small_batch, positions):
    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff")
    for window in (1, 3):
        res = P.patch_mlp_windows(setup, window, "denoise", positions)
        for center in range(setup.n_layers):
            layers = list(P.window_layers(center, window, setup.n_layers))
            assert res.values[center].item() == pytest.approx(
                _manual_mlp_patch(ioi_model, setup, layers, positions), abs=1e-5
            )


def test_summation_baseline(ioi_model, small_batch):
    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff")
    single = P.patch_mlp_windows(setup, 1, "denoise")
    torch.testing.assert_close(P.window_sum_baseline(single, 1).values, single.values)
    summed = P.window_sum_baseline(single, 3)
    eff = single.values - setup.corrupt_value
    assert summed.values[0].item() == pytest.approx(setup.corrupt_value + eff[0].item() + eff[1].item(), abs=1e-5)


def _reference_path_patch(model, setup, sender, receiver, direction):
    """One sender -> one receiver input at the end position, with plain hooks and three runs."""
    base, other = (
        (setup.plan.clean, setup.plan.corrupt) if direction == "noise" else (setup.plan.corrupt, setup.plan.clean)
    )
    L = setup.n_layers
    z = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    _, base_cache = model.run_with_cache(base.tokens)
    _, other_cache = model.run_with_cache(other.tokens)
    sl, sh = sender
    rl, rh, kind = receiver
    recv = f"blocks.{rl}.hook_{kind}_input"
    recorded = {}

    def freezer(name):
        def freeze(act, hook):
            out = base_cache[name].clone()
            if name == z[sl]:
                out[:, :, sh] = other_cache[name][:, :, sh]
            return out

        return freeze

    def record(act, hook):
        recorded["x"] = act.clone()

    model.run_with_hooks(base.tokens, fwd_hooks=[(n, freezer(n)) for n in z] + [(recv, record)])
    rows, end = torch.arange(base.tokens.shape[0]), setup.plan.end_pos

    def patch(act, hook):
        act = act.clone()
        act[rows, end, rh] = recorded["x"][rows, end, rh]
        return act

    logits = model.run_with_hooks(base.tokens, fwd_hooks=[(recv, patch)])
    ans = logits[rows, end]
    b = setup.plan
    return (ans.gather(1, b.answers[:, None]) - ans.gather(1, b.counter_answers[:, None])).mean().item()


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_path_patching_matches_a_plain_hook_reference(ioi_model, small_batch, direction):
    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff", max_batch=16)
    receivers = [P.PathReceiver(2, 1, "q"), P.PathReceiver(2, 3, "v")]
    res = P.path_patch(setup, [receivers[0]], "end", direction)
    for sender in [(0, 0), (0, 2), (1, 1), (1, 3)]:
        expected = _reference_path_patch(ioi_model, setup, sender, (2, 1, "q"), direction)
        assert res.values[sender].item() == pytest.approx(expected, abs=1e-5)
    # a sender in the receiver's own layer has no path to it
    assert res.values[2].sub(setup.base_value(direction)).abs().max().item() < 1e-5
    res_v = P.path_patch(setup, [receivers[1]], "end", direction, senders=[(1, 0)])
    assert res_v.values[1, 0].item() == pytest.approx(
        _reference_path_patch(ioi_model, setup, (1, 0), (2, 3, "v"), direction), abs=1e-5
    )
    assert torch.isnan(res_v.values[0]).all()


def test_path_to_logits_from_last_layer_heads_equals_head_patching(ioi_model, ioi_batch):
    setup = P.prepare(ioi_model, ioi_batch, "str", "logit_diff")
    path = P.path_patch(setup, P.LOGITS, None, "noise")
    heads = P.patch_heads(setup, "noise")
    last = setup.n_layers - 1
    torch.testing.assert_close(path.values[last], heads.values[last], atol=1e-5, rtol=1e-5)


def test_detect_rule():
    scores = torch.tensor([0.0, 0.1, -0.1, 0.05, 0.0, -0.05, 0.02, 5.0, -0.02, 0.0, -4.0])
    assert P.detect(scores, k=2.0, sign="positive") == [(7,)]
    assert P.detect(scores, k=1.5, sign="negative") == [(10,)]
    assert P.detect(scores, k=1.5, sign="both") == [(7,), (10,)]
    grid = scores[:10].reshape(2, 5)
    assert P.detect(grid, k=2.0) == [(1, 2)]
    with pytest.raises(ValueError):
        P.detect(scores, sign="up")


def test_path_patching_names_a_bad_receiver(ioi_model, small_batch):
    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff", max_batch=16)
    with pytest.raises(ValueError, match="receivers must be PathReceivers or 'logits', got 'logit'"):
        P.path_patch(setup, "logit")
    with pytest.raises(ValueError, match="at least one receiver"):
        P.path_patch(setup, [])


def test_path_patching_names_a_bad_input_kind(ioi_model, small_batch):
    from circuitfind.patching import PathReceiver

    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff", max_batch=16)
    with pytest.raises(ValueError, match="input must be 'q', 'k' or 'v', got 'z'") as err:
        P.path_patch(setup, [PathReceiver(1, 0, "z")])  # type: ignore[arg-type]
    assert "layer must be" not in str(err.value)


@pytest.mark.parametrize("window", [0, 4, 100, True, 1.5])
def test_mlp_window_must_fit_the_model(ioi_model, small_batch, window):
    setup = P.prepare(ioi_model, small_batch, "str", "logit_diff", max_batch=16)
    with pytest.raises(ValueError, match=r"window must be a whole number of layers from 1 to 3"):
        P.patch_mlp_windows(setup, window=window)
    assert P.patch_mlp_windows(setup, window=3).values.shape == (3,)  # the whole model is allowed
