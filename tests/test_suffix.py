"""Suffix passes (node and path patching from the base run's cached activations) equal full
forward passes of the bridge, for every sweep kind, both directions and every corruption."""

import dataclasses

import pytest
import torch

from circuitfind import patching as P
from circuitfind.patching import suffix
from circuitfind.tasks.batch import TaskBatch
from circuitfind.tasks.corruptions import STR, CorruptionPlan

KINDS = {
    "heads": lambda s, d: P.patch_heads(s, d),
    "heads_by_pos": lambda s, d: P.patch_heads(s, d, by_position=True),
    "resid_pre": lambda s, d: P.patch_block(s, "resid_pre", d),
    "attn_out": lambda s, d: P.patch_block(s, "attn_out", d),
    "mlp_out": lambda s, d: P.patch_block(s, "mlp_out", d),
    "resid_post": lambda s, d: P.patch_block(s, "resid_post", d),
    "mlp_window": lambda s, d: P.patch_mlp_windows(s, 3, d, ["S2"]),
    "path_logits": lambda s, d: P.path_patch(s, P.LOGITS, "end", d),
    "path_qkv": lambda s, d: P.path_patch(
        s, [P.PathReceiver(2, 1, "q"), P.PathReceiver(1, 0, "k"), P.PathReceiver(2, 3, "v")], None, d
    ),
}


@pytest.fixture(scope="module")
def batch(ioi_model):
    return TaskBatch.build(ioi_model, "ioi", 8, seed=0)  # two or more prompts per length (resample ablation)


def _engines(model, batch, corruption, metric="logit_diff"):
    """The same setup twice: suffix passes only (``functional``) and full forward passes (``hooks``)."""
    fast = P.prepare(model, batch, corruption, metric, max_batch=4096, engine="functional")
    full = dataclasses.replace(fast, engine="hooks", _cache={})
    return fast, full


def _assert_same(fast: P.PatchResult, full: P.PatchResult) -> None:
    assert fast.values.shape == full.values.shape
    torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast.per_prompt, full.per_prompt, atol=3e-5, rtol=0, equal_nan=True)


CORRUPTIONS = ("str", "gn", "mean", "resample")
# every kind and every corruption in the default run; the whole product with -m slow
QUICK = {("heads", c) for c in CORRUPTIONS} | {
    ("heads_by_pos", "gn"),
    ("resid_pre", "str"),
    ("resid_pre", "mean"),
    ("attn_out", "resample"),
    ("mlp_out", "gn"),
    ("resid_post", "mean"),
    ("mlp_window", "str"),
    ("mlp_window", "resample"),
    ("path_logits", "gn"),
    ("path_logits", "resample"),
    ("path_qkv", "str"),
    ("path_qkv", "mean"),
}
CASES = [
    pytest.param(k, c, marks=() if (k, c) in QUICK else pytest.mark.slow) for k in sorted(KINDS) for c in CORRUPTIONS
]


@pytest.mark.parametrize("kind,corruption", CASES)
def test_suffix_passes_equal_full_forward_passes(ioi_model, batch, kind, corruption):
    fast, full = _engines(ioi_model, batch, corruption, "kl" if corruption == "gn" else "logit_diff")
    for direction in ("noise", "denoise"):
        result = KINDS[kind](fast, direction)
        _assert_same(result, KINDS[kind](full, direction))
        assert result.values.nan_to_num().std() > 0  # the patches make a difference


@pytest.mark.parametrize("corruption", ["str", pytest.param("gn", marks=pytest.mark.slow)])
def test_suffix_passes_on_grouped_query_attention(gqa_model, corruption):
    batch = TaskBatch.build(gqa_model, "ioi", 8, seed=2)
    fast, full = _engines(gqa_model, batch, corruption)
    receivers = [
        P.PathReceiver(1, 3, "q"),
        P.PathReceiver(1, 1, "k"),
        P.PathReceiver(1, 0, "v"),
    ]  # k/v: key/value heads
    for direction in ("noise", "denoise"):
        for kind in ("heads", "mlp_out", "path_logits"):
            _assert_same(KINDS[kind](fast, direction), KINDS[kind](full, direction))
        _assert_same(P.path_patch(fast, receivers, None, direction), P.path_patch(full, receivers, None, direction))


def test_each_candidate_starts_at_its_first_patched_point(ioi_model, batch):
    """Candidates patching several hooks (and none) in one sweep, in scrambled order."""
    fast, full = _engines(ioi_model, batch, "str")
    T, gen = fast.n_pos, torch.Generator().manual_seed(0)
    masks = {
        P.hook_name(layer, what): (torch.rand(9, 1, T, 1, generator=gen) > 0.6).float() * 0.7
        for layer in range(3)
        for what in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    }
    masks[P.hook_name(1, "z")] = torch.rand(9, 1, T, 4, 1, generator=gen) > 0.5
    masks = {
        name: m * (torch.arange(9) % 4 == i % 4).reshape(9, *[1] * (m.dim() - 1))
        for i, (name, m) in enumerate(masks.items())
    }
    for m in masks.values():
        m[8] = 0  # candidate 8 patches nothing
    for direction in ("noise", "denoise"):
        values = P.run_patched(fast, direction, masks)
        torch.testing.assert_close(values, P.run_patched(full, direction, masks), atol=3e-5, rtol=0)
        torch.testing.assert_close(values[8], suffix.SuffixForward(fast, direction).base_values(), atol=1e-5, rtol=0)


class LateHookSTR(STR):
    """STR whose corrupted run also scales the residual stream entering layer 1 (a hook past the embeddings)."""

    def plan(self, model, batch) -> CorruptionPlan:
        plan = super().plan(model, batch)
        plan.corrupt.hooks.append(("blocks.1.hook_resid_pre", lambda act, hook: act * 0.5))
        return plan


def test_base_run_hooks_after_the_embeddings_still_fire(ioi_model, batch):
    auto = P.prepare(ioi_model, batch, LateHookSTR(), "logit_diff")
    assert not suffix.supports(auto, "denoise", [P.hook_name(0, "z")]) and suffix.supports(
        auto, "noise", [P.hook_name(0, "z")]
    )
    full = dataclasses.replace(auto, engine="hooks", _cache={})
    _assert_same(P.patch_heads(auto, "denoise"), P.patch_heads(full, "denoise"))
    with pytest.raises(Exception, match="embedding stage"):
        P.patch_heads(dataclasses.replace(auto, engine="functional"), "denoise")
    with pytest.raises(ValueError, match="engine must be"):
        P.prepare(ioi_model, batch, "str", engine="fast")
