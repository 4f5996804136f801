import pytest
import torch

from circuitfind.errors import TaskError
from circuitfind.tasks.batch import TaskBatch
from circuitfind.tasks.corruptions import (
    GaussianNoise,
    MeanAblation,
    ResampleAblation,
    ZeroAblation,
    embedding_std,
    get_corruption,
)


def test_gn_noise_has_the_specified_std_on_key_tokens_only(ioi_model):
    batch = TaskBatch.build(ioi_model, "ioi", 200, seed=0)
    gn = GaussianNoise(factor=3.0, samples=5, seed=1)
    noise = gn.noise(ioi_model, batch)
    assert noise.shape == (5 * batch.size, batch.n_pos, ioi_model.cfg.d_model)
    keys = batch.key_position_mask().repeat(5, 1)
    expected = 3.0 * ioi_model.W_E[batch.clean_tokens][batch.mask].std().item()
    assert expected == pytest.approx(3.0 * embedding_std(ioi_model, batch))
    measured = noise[keys].std().item()
    assert measured == pytest.approx(expected, rel=0.02)
    assert noise[keys].mean().abs().item() < 0.02 * expected
    assert noise[~keys].abs().max().item() == 0.0
    # three key tokens per IOI prompt
    assert keys.sum().item() == 3 * 5 * batch.size


def test_gn_is_seeded_and_the_corrupted_run_adds_it_to_hook_embed(ioi_model, ioi_batch):
    a = GaussianNoise(seed=4).noise(ioi_model, ioi_batch)
    b = GaussianNoise(seed=4).noise(ioi_model, ioi_batch)
    c = GaussianNoise(seed=5).noise(ioi_model, ioi_batch)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plan = GaussianNoise(seed=4, samples=3).plan(ioi_model, ioi_batch)
    assert plan.clean.tokens.shape[0] == 3 * ioi_batch.size
    _, clean = ioi_model.run_with_cache(plan.clean.tokens, names_filter="hook_embed")
    seen = {}
    hooks = plan.corrupt.hooks + [("hook_embed", lambda act, hook: seen.setdefault("x", act.clone()))]
    ioi_model.run_with_hooks(plan.corrupt.tokens, fwd_hooks=hooks)
    torch.testing.assert_close(seen["x"] - clean["hook_embed"], a)


def test_resample_partners_have_equal_length_and_differ(ioi_model):
    batch = TaskBatch.build(ioi_model, "ioi", 60, seed=2)
    partner = ResampleAblation(seed=0).partner(batch)
    assert (partner != torch.arange(batch.size)).all()
    assert torch.equal(batch.end_pos[partner], batch.end_pos)
    assert sorted(partner.tolist()) == list(range(batch.size))


def test_resample_needs_two_prompts_per_length(ioi_model):
    batch = TaskBatch.build(ioi_model, "ioi", 1, seed=2)
    with pytest.raises(TaskError, match="at least two prompts of each token length"):
        ResampleAblation().plan(ioi_model, batch)


def test_mean_and_zero_ablation_values():
    act = torch.randn(4, 3, 5)
    torch.testing.assert_close(MeanAblation.ablate(act), act.mean(0, keepdim=True).expand(4, 3, 5))
    assert ZeroAblation.ablate(act).abs().sum() == 0


def test_corruption_names():
    assert get_corruption("str:abc").variant == "abc"
    assert get_corruption("gn").name == "gn"
    with pytest.raises(ValueError, match="unknown corruption"):
        get_corruption("blur")
