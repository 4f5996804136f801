"""EAP-IG on activations and IFR as values of the sweep's algorithm axis: they run, are recorded and
the report lists them with their faithfulness curves (IFR marked corruption-free)."""

import json
from pathlib import Path

import pytest

from circuitfind.runs.sweep import SweepConfig
from flows.sweep import sweep


@pytest.mark.slow
def test_new_algorithms_run_in_a_sweep_and_the_report_ranks_them(prefect_harness, tmp_path):
    config = SweepConfig(
        algorithms=["eap_ig_act", "ifr", "eap"],
        corruptions=["str"],
        metrics=["kl"],
        directions=["noise"],
        prompts=8,
        ig_steps=3,
        max_batch=256,
    )
    manifest = sweep(config, run="r", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 3 and not manifest["failures"]
    records = {r["algorithm"]: r for r in (json.loads(Path(e["json"]).read_text()) for e in manifest["settings"])}
    assert records["ifr"]["corruption_free"] is True and records["eap_ig_act"]["corruption_free"] is False
    for name in ("eap_ig_act", "ifr"):
        assert records[name]["n_edges"] == config.top_k and records[name]["curve"]["cpr"] > 0
    assert (tmp_path / "r" / records["eap_ig_act"]["per_prompt"]).is_file()
    md = (tmp_path / "r" / "report.md").read_text()
    for name in ("eap_ig_act", "ifr"):
        assert f"| {name}/str/kl/noise |" in md
    assert "corruption-free" in md
