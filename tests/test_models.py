import time

import pytest
import torch

from circuitfind.errors import ModelNotFoundError
from circuitfind.models import load_model, resolve_model_path, shipped_models


def test_shipped_models_listed():
    assert {"toy-ioi", "toy-induction"} <= set(shipped_models())


def test_loaded_model_has_per_head_hooks_and_eval_mode(ioi_model):
    model = ioi_model
    assert not model.training
    assert model.cfg.use_split_qkv_input and model.cfg.use_attn_result
    tokens = torch.tensor([[0, 1, 2, 3]])
    _, cache = model.run_with_cache(tokens)
    H, d = model.cfg.n_heads, model.cfg.d_model
    assert cache["blocks.1.hook_q_input"].shape == (1, 4, H, d)
    assert cache["blocks.1.hook_k_input"].shape == (1, 4, H, d)
    assert cache["blocks.1.hook_v_input"].shape == (1, 4, H, d)
    assert cache["blocks.1.attn.hook_result"].shape == (1, 4, H, d)
    # q/k/v inputs are per-head copies of the residual stream (pre-LayerNorm)
    assert torch.equal(cache["blocks.1.hook_q_input"][:, :, 0], cache["blocks.1.hook_resid_pre"])
    # head results plus the output bias sum to the attention output
    total = cache["blocks.1.attn.hook_result"].sum(2) + model.blocks[1].attn.b_O
    torch.testing.assert_close(total, cache["blocks.1.hook_attn_out"])


def test_shipped_model_is_small():
    path = resolve_model_path("toy-ioi")
    import os

    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 1_000_000


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ModelNotFoundError, match=r"not a shipped model.*offline"):
        load_model("no-such-model-xyz")
    assert time.time() - start < 10


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_local_folder_loads_by_path():
    model = load_model(resolve_model_path("toy-induction"), device="cpu")
    assert model.cfg.n_layers == 2
