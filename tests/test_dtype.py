"""Lower precision (``--dtype bfloat16``) against float32 on toy-ioi.

bfloat16 keeps about three significant digits per operation. Measured on toy-ioi (24 prompts;
README): normalised node- and path-patching effects and masked-forward values within 0.003 of
float32, EAP / EAP-IG scores (divided by their largest magnitude) within 0.01, the same top-20
edges. The tests allow 0.01 and 0.03 (and the same top-20 edges).
"""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.cli import main
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.models.loading import load_model, resolve_dtype
from circuitfind.tasks.batch import TaskBatch

EFFECT_TOL, SCORE_TOL = 0.01, 0.03


@pytest.fixture(scope="module")
def bf16_model():
    return load_model("toy-ioi", device="cpu", dtype="bfloat16")


def _results(model, batch, corruption):
    setup = P.prepare(model, batch, corruption, "logit_diff")
    patcher = EdgePatcher(setup)
    masks = (torch.rand(6, patcher.n_edges, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    gap = setup.clean_value - setup.corrupt_value
    eap, ig = D.eap(patcher), D.eap_ig(patcher, 3)
    return {
        "heads": P.patch_heads(setup, "denoise").normalised,
        "resid_pre": P.patch_block(setup, "resid_pre", "noise").normalised,
        "path": P.path_patch(setup, P.LOGITS, "end", "noise").normalised,
        "masked": (patcher.value(masks) - setup.corrupt_value) / gap,
        "masked_hooks": (EdgePatcher(setup, engine="hooks").value(masks) - setup.corrupt_value) / gap,
        "eap": eap / eap.abs().max(),
        "eap_ig": ig / ig.abs().max(),
    }


@pytest.mark.parametrize("corruption", ["str", pytest.param("gn", marks=pytest.mark.slow)])
def test_bfloat16_matches_float32_within_tolerance(ioi_model, bf16_model, ioi_batch, corruption):
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    low = _results(bf16_model, TaskBatch.build(bf16_model, "ioi", 24, seed=3), corruption)
    full = _results(ioi_model, ioi_batch, corruption)
    for key, value in full.items():
        tol = SCORE_TOL if key.startswith("eap") else EFFECT_TOL
        assert (low[key].float() - value).abs().max().item() < tol, key
        assert low[key].dtype == torch.float32  # metrics and scores come back in float32
    for key in ("eap", "eap_ig"):
        assert set(low[key].abs().topk(20).indices.tolist()) == set(full[key].abs().topk(20).indices.tolist())


def test_dtype_names_are_checked():
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        resolve_dtype("float16", "cpu")


def test_cli_reports_a_cpu_float16_as_one_line(capsys):
    assert main(["evaluate", "--model", "toy-ioi", "-n", "8", "--dtype", "float16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: dtype float16 needs a GPU") and "Traceback" not in err
