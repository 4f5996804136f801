import time

import pytest
import torch

from circuitfind.errors import ModelNotFoundError
from circuitfind.models.loading import load_model, resolve_model_path, shipped_models


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


def _copy_model(tmp_path, name="toy-ioi", **config):
    """A copy of a shipped model's folder with ``config`` written over its config.json."""
    import json
    import shutil

    folder = tmp_path / name
    shutil.copytree(resolve_model_path(name), folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


def _cli_error(capsys, *argv) -> str:
    from circuitfind.cli import main

    assert main(list(argv)) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuitfind: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0]


def test_truncated_weights_are_one_line(tmp_path, capsys):
    folder = _copy_model(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    line = _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")
    assert "model.safetensors" in line and "truncated" in line
    weights.write_bytes(b"\x05\x00")  # not even a header
    assert "model.safetensors" in _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")


@pytest.mark.parametrize("n_layer", [100000, -1, 0, 2.5, True, "3"])
def test_config_shape_out_of_bounds_is_refused_before_allocating(tmp_path, capsys, n_layer):
    from circuitfind.models.loading import SHAPE_LIMITS

    folder = _copy_model(tmp_path, n_layer=n_layer)
    start = time.time()
    line = _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")
    assert time.time() - start < 5
    assert "config.json" in line and "n_layer" in line and str(SHAPE_LIMITS["layers"]) in line


def test_config_layers_must_match_the_weights(tmp_path, capsys):
    folder = _copy_model(tmp_path, n_layer=5)  # within bounds, but the weights hold 3 layers
    line = _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")
    assert "5 layers" in line and "hold 3" in line


def test_config_that_is_not_json_is_one_line(tmp_path, capsys):
    folder = _copy_model(tmp_path)
    (folder / "config.json").write_text('{"n_layer": 3,')
    assert "config.json" in _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")
    (folder / "config.json").write_text("[1, 2]")
    assert "JSON object" in _cli_error(capsys, "evaluate", "--model", str(folder), "--task", "ioi", "-n", "4")
