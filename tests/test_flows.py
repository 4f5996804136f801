"""Prefect flows: the sweep (caching, resume, report), Dask scale-out, the scheduled deployment."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from circuitfind.circuits.circuit import Circuit
from circuitfind.runs.sweep import SweepConfig
from flows.sweep import compare_run, sweep

SMALL = dict(
    algorithms=["eap_ig", "acdc", "node"],
    corruptions=["str", "gn"],
    metrics=["kl"],
    directions=["noise"],
    prompts=12,
    max_batch=256,
)


@pytest.fixture(scope="module")
def first_run(prefect_harness, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    state = sweep(SweepConfig(**SMALL), run="r1", outputs=str(outputs), return_state=True)
    FIRST_RUN_ID.append(state.state_details.flow_run_id)  # later tests' sweeps share this Prefect server
    return outputs, state.result()


FIRST_RUN_ID: list = []


def test_sweep_writes_circuits_report_and_manifest(first_run):
    outputs, manifest = first_run
    run = outputs / "r1"
    assert len(manifest["settings"]) == 6 and not manifest["failures"]
    assert json.loads((run / "manifest.json").read_text())["settings"] == manifest["settings"]
    for entry in manifest["settings"]:
        record = json.loads(Path(entry["json"]).read_text())
        circuit = Circuit.load(entry["graphml"])
        assert [list(e) for e in circuit.edges] == record["edges"]
        assert circuit.settings["algorithm"] == record["algorithm"]
        if record["algorithm"] == "eap_ig":
            assert (run / record["per_prompt"]).is_file()  # paths relative to the run
            curve = record["curve"]
            assert (
                curve["cpr"] == pytest.approx(float(np.trapezoid(curve["faithfulness"], curve["fractions"])))
                and curve["cpr"] > 0
            )
    algorithms = sorted(json.loads(Path(e["json"]).read_text())["algorithm"] for e in manifest["settings"])
    assert algorithms == ["acdc", "acdc", "eap_ig", "eap_ig", "node", "node"]  # the eap_ig checks above ran twice
    html = (run / "report.html").read_text()
    # the axis figure, 2 Jaccard heatmaps + Spearman, the layer x layer score mass, the curves of acdc and
    # eap_ig (a panel each), the consensus drawing and the 6 settings' drawings
    assert html.count("<svg") == 1 + 3 + 1 + 2 + 1 + 6 and "edge Jaccard" in html and "Bootstrap" in html
    md = (run / "report.md").read_text()
    assert "| acdc/str/kl/noise |" in md and "Components in every setting" in md
    # the manifest is written before the report, so the flow's report states the run's parameters as a rerun does
    assert "no manifest" not in md and "seed 0" in md
    assert manifest["report"]["explorer"] == str((run / "explorer.html").resolve())  # written before the report
    assert "explorer.html" in md  # ... so the report links it
    assert '<script type="application/json" id="explorer-data">' in (run / "explorer.html").read_text()
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_rerun_resumes_from_the_cache(first_run):
    outputs, manifest = first_run
    again = sweep(SweepConfig(**SMALL), run="r2", outputs=str(outputs))
    assert all(s["from_cache"] for s in again["settings"])
    for a, b in zip(manifest["settings"], again["settings"], strict=True):
        assert Path(a["graphml"]).read_bytes() == Path(b["graphml"]).read_bytes()
    # a larger grid only computes what is new
    bigger = sweep(SweepConfig(**{**SMALL, "corruptions": ["str", "gn", "resample"]}), run="r3", outputs=str(outputs))
    cached = {s["setting"].split("__")[3] for s in bigger["settings"] if s["from_cache"]}
    fresh = {s["setting"].split("__")[3] for s in bigger["settings"] if not s["from_cache"]}
    assert cached == {"str", "gn"} and fresh == {"resample"}


def test_compare_flow_with_reference(first_run):
    outputs, manifest = first_run
    reference = next(s["setting"] for s in manifest["settings"] if "acdc" in s["setting"] and "__str__" in s["setting"])
    paths = compare_run(str(outputs / "r1"), reference=reference)
    md = Path(paths["markdown"]).read_text()
    assert f"Against the reference `{reference}`" in md
    assert "| acdc/str/kl/noise | 1.000 | 1.000 | 1.000 |" in md


@pytest.mark.slow
def test_every_json_file_of_a_sweep_is_strict(prefect_harness, tmp_path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    # no head is 50 SD from the mean: the node circuit is empty and its faithfulness undefined
    config = SweepConfig(
        algorithms=["eap", "node"],
        corruptions=["str"],
        metrics=["logit_diff"],
        directions=["noise"],
        prompts=8,
        node_k=50.0,
    )
    manifest = sweep(config, run="j", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 2 and not manifest["failures"]
    files = list(tmp_path.rglob("*.json"))
    assert tmp_path / "j" / "manifest.json" in files
    keys = sorted(p.name for p in (tmp_path / ".cache").iterdir() if p.is_dir())  # a cache entry per setting
    circuits = [f"j/circuits/toy-ioi__ioi__{a}__str__logit_diff__noise.json" for a in ("eap", "node")]
    assert len(keys) == 2 and sorted(str(f.relative_to(tmp_path)) for f in files) == sorted(
        [f".cache/{k}/{name}" for k in keys for name in ("checksums.json", "record.json")]
        + circuits
        + ["j/manifest.json"]
    )
    for f in files:
        json.loads(f.read_text(), parse_constant=reject)
    node = next(s for s in manifest["settings"] if "__node__" in s["setting"])
    assert node["n_edges"] == 0 and node["faithfulness"] is None and node["faithfulness_status"] == "empty circuit"
    eap = next(s["setting"] for s in manifest["settings"] if "__eap__" in s["setting"])
    assert manifest["health"] == {
        node["setting"]: {"flags": ["empty_circuit"], "notes": ["noising"]},
        eap: {"flags": [], "notes": ["noising"]},
    }
    assert "empty circuit" in (tmp_path / "j" / "report.md").read_text()


@pytest.mark.slow
def test_failed_settings_are_reported_not_fatal(prefect_harness, tmp_path):
    # the induction task has no 'str:abc' variant: those settings fail with a clear message
    config = SweepConfig(
        models=["toy-induction"],
        tasks=["induction"],
        algorithms=["node"],
        corruptions=["str", "str:abc"],
        metrics=["logit_diff"],
        directions=["noise"],
        prompts=12,
    )
    manifest = sweep(config, run="f", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 1
    (failure,) = manifest["failures"]
    assert "no STR variant 'abc'" in failure["error"]


@pytest.mark.slow  # starts a Dask worker process (13 s with a busy core); tests/test_dask_cluster.py covers more
def test_dask_task_runner(prefect_harness, tmp_path):
    pytest.importorskip("prefect_dask")
    from flows.sweep import dask_runner

    config = SweepConfig(
        algorithms=["eap"], corruptions=["str", "gn"], metrics=["logit_diff"], directions=["noise"], prompts=8
    )
    # one worker process (each imports torch: tens of seconds under load); tests/test_dask_cluster.py runs two
    manifest = sweep.with_options(task_runner=dask_runner(1))(config, run="d", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 2 and not manifest["failures"]
    assert os.getpid() not in {s["worker"]["pid"] for s in manifest["settings"]}  # ran in the worker process


def test_scheduled_deployment():
    from flows.deploy import build_deployment

    deployment = build_deployment(cron="15 2 * * 1")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "15 2 * * 1"
    assert deployment.parameters["config"]["models"] == ["toy-ioi"]


def test_prefect_yaml_points_at_the_sweep_flow():
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["schedules"][0]["cron"] == "0 3 * * *"
    flow = load_flow_from_entrypoint(
        str(root / dep["entrypoint"].split(":")[0]) + ":" + dep["entrypoint"].split(":")[1]
    )
    assert flow.name == "circuitfind-sweep"


@pytest.mark.slow
def test_settings_study_flow(prefect_harness, tmp_path):
    from flows.study import settings_study

    out = settings_study(ioi_models=["toy-ioi"], factual_models=[], ioi_prompts=16, run="s", outputs=str(tmp_path))
    (heads,) = out["heads"]
    assert set(heads["settings"]) == {f"{c}/{m}" for c in ("str:s2_io", "gn") for m in ("prob", "logit_diff", "kl")} | {
        "str:s1_io/logit_diff"
    }
    for row in heads["settings"].values():
        low, high, eff = map(torch.tensor, (row["ci_low"], row["ci_high"], row["effect"]))
        assert (low <= eff + 1e-6).all() and (eff <= high + 1e-6).all()
    assert len(heads["jaccard"]) == 7 and set(heads["s2_vs_s1io"]) == {"str:s2_io", "str:s1_io"}
    html = Path(out["html"]).read_text()
    assert "Jaccard overlap of the heads found" in html and "[" in html
    assert json.loads((tmp_path / "s" / "study.json").read_text())["heads"][0]["model"] == "toy-ioi"


@pytest.mark.slow
def test_sweep_attaches_link_and_table_artifacts(first_run):
    """Read back from the flow's Prefect server: the report's link, the axis ranking, each setting's summary."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    outputs, manifest = first_run
    keys = ["circuit-diff-report-link", "circuit-explorer-link", "axis-ranking", "circuit-summary"]
    with get_client(sync_client=True) as client:  # the report is made by the circuitfind-compare subflow
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=FIRST_RUN_ID)),
        )
    latest = {}
    for a in sorted(found, key=lambda a: a.created):
        latest[a.key] = a
    assert set(latest) == set(keys)
    # Prefect stores a link artifact as Markdown: [text](link)
    assert (outputs / "r1" / "report.html").resolve().as_uri() in latest["circuit-diff-report-link"].data
    assert (outputs / "r1" / "explorer.html").resolve().as_uri() in latest["circuit-explorer-link"].data

    def table(key):
        data = latest[key].data
        return json.loads(data) if isinstance(data, str) else data

    assert latest["axis-ranking"].type == "table"
    assert {row["axis"] for row in table("axis-ranking")} == {"algorithm", "corruption"}
    summary = {row["setting"]: row for row in table("circuit-summary")}
    records = {json.loads(Path(e["json"]).read_text())["setting"]: e for e in manifest["settings"]}
    assert set(summary) == set(records)
    for name, row in summary.items():
        record = json.loads(Path(records[name]["json"]).read_text())
        assert row["edges"] == record["n_edges"] and row["faithfulness"] == record["faithfulness"]
        assert "flags" in row


def test_study_flow_runs_directions_at_once_with_the_library_numbers(prefect_harness, tmp_path, ioi_model):
    """--workers 2: each direction is a task of its own, run in two threads; the study is the library's."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from circuitfind.flows.study_flow import settings_study
    from circuitfind.runs import study

    grid = {"metrics": ("logit_diff", "prob"), "corruptions": ("str:s2_io", "gn"), "variants": ()}
    flow = settings_study.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    out = flow(ioi_prompts=8, n_boot=20, run="both", outputs=str(tmp_path), direction="both", grid=grid)
    (heads,) = out["heads"]
    want = study.head_detection(ioi_model, "toy-ioi", prompts=8, n_boot=20, direction="both", **grid)
    assert heads["directions"] == want["directions"]
    for got, ref in zip(heads["by_direction"], want["by_direction"], strict=True):
        assert got["direction"] == ref["direction"] and got["settings"] == ref["settings"]
        assert got["jaccard_ci"] == ref["jaccard_ci"]
