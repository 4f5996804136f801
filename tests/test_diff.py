"""Run against run: `circuitfind diff`, the `circuitfind-diff` flow and the scheduled sweep's diff.

The run folders are made by hand here (manifest.json and circuits/<setting>.json records as the sweep
writes them), with known edges gained and lost, so every expected value is exact.
"""

import json
from pathlib import Path

import pytest

from circuitfind.cli import main
from circuitfind.runs.diff import diff_runs, write_diff

# A 1-layer, 2-head graph: 13 edges (6 into the heads' q/k/v, 3 into m0, 4 into the logits).
ASCENDING = [float(i) for i in range(1, 14)]
DESCENDING = ASCENDING[::-1]


def record(model: str, algorithm: str, edges: list, nodes: list, faithfulness=None, scores=None, n_heads=2) -> dict:
    setting = f"{model}__ioi__{algorithm}__str__kl__noise"
    return {
        "setting": setting,
        "model": model,
        "task": "ioi",
        "algorithm": algorithm,
        "corruption": "str",
        "metric": "kl",
        "direction": "noise",
        "n_layers": 1,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "n_edges": len(edges),
        "edges": edges,
        "nodes": nodes,
        "scores": scores,
        "faithfulness": faithfulness,
        "faithfulness_status": "ok" if faithfulness is not None else "empty circuit",
        "graphml": f"circuits/{setting}.graphml",
        "json": f"circuits/{setting}.json",
        "per_prompt": None,
    }


def make_run(
    folder: Path, records: list[dict], manifest: bool = True, failures: tuple[str, ...] = (), config: dict | None = None
) -> Path:
    (folder / "circuits").mkdir(parents=True)
    for r in records:
        (folder / "circuits" / f"{r['setting']}.json").write_text(json.dumps(r))
    if manifest:
        settings = [{"setting": r["setting"], "n_edges": r["n_edges"]} for r in records]
        failed = [{"setting": name, "error": "ValueError: ..."} for name in failures]
        (folder / "manifest.json").write_text(
            json.dumps({"run": folder.name, "settings": settings, "failures": failed, "config": config})
        )
    return folder


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    a = make_run(
        tmp_path / "monday",
        [
            record(
                "m1",
                "eap",
                [["input", "a0.0<q>"], ["a0.0", "m0"], ["m0", "logits"]],
                ["input", "a0.0", "m0", "logits"],
                0.8,
                ASCENDING,
            ),
            record("m1", "acdc", [["input", "m0"], ["m0", "logits"]], ["input", "m0", "logits"], 0.5),
            record("m1", "node", [["a0.1", "logits"]], ["a0.1", "logits"], 0.25),
        ],
    )
    b = make_run(
        tmp_path / "tuesday",
        [
            record(
                "m1",
                "eap",
                [["a0.0", "m0"], ["m0", "logits"], ["a0.1", "logits"]],
                ["a0.0", "a0.1", "m0", "logits"],
                0.9,
                DESCENDING,
            ),
            record("m1", "acdc", [["input", "m0"], ["m0", "logits"]], ["input", "m0", "logits"], None),
            record("m1", "eap_ig", [["a0.1", "logits"]], ["a0.1", "logits"], 0.7, ASCENDING),
        ],
        failures=("m1__ioi__node__str__kl__noise",),
    )
    return a, b


def test_gained_lost_jaccard_score_shift_and_faithfulness(runs):
    diff = diff_runs(*runs)
    assert diff["paired_by"] == "setting" and diff["note"] is None
    assert diff["only_in_a"] == ["m1__ioi__node__str__kl__noise"]
    assert diff["only_in_b"] == ["m1__ioi__eap_ig__str__kl__noise"]
    assert diff["failed_in_a"] == [] and diff["failed_in_b"] == ["m1__ioi__node__str__kl__noise"]
    acdc, eap = diff["settings"]
    assert eap["key"] == "m1__ioi__eap__str__kl__noise"
    assert eap["edges_gained"] == [("a0.1", "logits")] and eap["edges_lost"] == [("input", "a0.0<q>")]
    assert eap["edge_jaccard"] == 0.5  # 2 shared of 4
    assert eap["components_gained"] == ["a0.1"] and eap["components_lost"] == []
    assert eap["component_jaccard"] == 2 / 3
    assert eap["spearman"] == pytest.approx(-1.0)  # |score| order reversed
    assert eap["mean_abs_score_change"] == pytest.approx(84 / 13)  # mean |14 - 2i|, i = 1..13
    assert eap["scored_edges"] == 13
    assert eap["faithfulness_change"] == pytest.approx(0.1)
    assert acdc["edges_gained"] == [] and acdc["edges_lost"] == [] and acdc["edge_jaccard"] == 1.0
    assert acdc["spearman"] is None and acdc["mean_abs_score_change"] is None  # ACDC records here carry no scores
    assert acdc["faithfulness_a"] == 0.5 and acdc["faithfulness_b"] is None and acdc["faithfulness_change"] is None


def test_report_files_written_atomically(runs, tmp_path):
    paths = write_diff(*runs, tmp_path / "out")
    md = Path(paths["markdown"]).read_text()
    assert md.startswith("# Run diff: monday -> tuesday")
    assert (
        "| m1__ioi__eap__str__kl__noise | 3 | 3 | 1 | 1 | 0.500 | 0.667 | -1.000 | 6.462 | 0.800 | 0.900 | 0.100 |"
        in md
    )
    assert "| m1__ioi__acdc__str__kl__noise | 2 | 2 | 0 | 0 | 1.000 | 1.000 | n/a | n/a | 0.500 | n/a | n/a |" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4 and {line.count("|") for line in table} == {13}  # 12 columns: no stray "|" in a cell
    assert "**Only in run A:** m1__ioi__node__str__kl__noise" in md
    assert "**Failed in run B:** m1__ioi__node__str__kl__noise" in md
    assert "- **edges gained:** a0.1 -> logits" in md and "- **edges lost:** input -> a0.0<q>" in md
    html = Path(paths["html"]).read_text()
    assert "<td>m1__ioi__eap__str__kl__noise</td>" in html and "a0.1 -&gt; logits" in html
    saved = json.loads(Path(paths["json"]).read_text())
    assert saved["settings"][1]["edges_lost"] == [["input", "a0.0<q>"]]
    assert not list(tmp_path.rglob("*.tmp"))
    default = write_diff(*runs)  # default: into run B
    assert Path(default["html"]) == runs[1] / "diff-monday" / "diff.html"


def test_runs_of_two_models_of_different_shapes_compare_components(tmp_path):
    a = make_run(tmp_path / "small", [record("m1", "eap", [["a0.0", "logits"]], ["a0.0", "logits"], 0.5, ASCENDING)])
    big_scores = [1.0] * 23  # 1 layer, 4 heads: 12 edges into q/k/v, 5 into m0, 6 into the logits
    b = make_run(
        tmp_path / "big",
        [
            record(
                "m2",
                "eap",
                [["a0.0", "logits"], ["a0.3", "logits"]],
                ["a0.0", "a0.3", "logits"],
                0.75,
                big_scores,
                n_heads=4,
            )
        ],
    )
    diff = diff_runs(a, b)
    assert diff["paired_by"] == "grid" and "model m1" in diff["note"] and "model m2" in diff["note"]
    (row,) = diff["settings"]
    assert row["key"] == "ioi__eap__str__kl__noise" and row["level"] == "components"
    assert row["components_gained"] == ["a0.3"] and row["components_lost"] == [] and row["component_jaccard"] == 0.5
    assert row["edges_gained"] is None and row["spearman"] is None
    assert "differ in shape" in row["note"] and "n_heads=2" in row["note"] and "n_heads=4" in row["note"]
    assert row["faithfulness_change"] == 0.25
    md = write_diff(a, b, tmp_path / "out")["markdown_text"]
    assert "1 components" in md and "compared on components by name only" in md


def refused(argv: list[str], capsys, *fragments: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("circuitfind: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err, captured.err


def test_cli_diff_and_its_errors(runs, tmp_path, capsys):
    a, b = runs
    assert main(["diff", str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    assert "diff.html" in capsys.readouterr().out and (tmp_path / "cli" / "diff.md").is_file()
    refused(["diff", str(tmp_path / "nowhere"), str(b)], capsys, "nowhere", "no such run folder")
    (a / "manifest.json").rename(a / "manifest.moved")
    refused(["diff", str(a), str(b)], capsys, str(a / "manifest.json"), "not a completed sweep run")
    (a / "manifest.json").write_text('{"run": "monday", "settings": [{"sett')
    refused(["diff", str(a), str(b)], capsys, "manifest.json", "not a sweep manifest")
    (a / "manifest.moved").rename(a / "manifest.json")
    eap = b / "circuits" / "m1__ioi__eap__str__kl__noise.json"
    text = eap.read_text()
    eap.write_text(text[: len(text) // 2])
    refused(["diff", str(a), str(b)], capsys, str(eap), "not valid JSON")
    eap.write_text(text.replace('"n_heads": 2', '"n_heads": "two"'))
    refused(["diff", str(a), str(b)], capsys, str(eap), "'n_heads'")
    eap.write_text(text.replace('"scores": [13.0, ', '"scores": ['))
    refused(["diff", str(a), str(b)], capsys, str(eap), "12 scores for a graph of 13 edges")
    eap.write_text(text.replace('"n_layers": 1', '"n_layers": 100000000'))
    refused(["diff", str(a), str(b)], capsys, str(eap), "too large")
    eap.unlink()
    refused(["diff", str(a), str(b)], capsys, str(eap), "is missing")


def test_runs_with_different_sets_of_models_are_refused(tmp_path, capsys):
    a = make_run(tmp_path / "a", [record("m1", "eap", [], []), record("m2", "eap", [], [])])
    b = make_run(tmp_path / "b", [record("m1", "eap", [], []), record("m3", "eap", [], [])])
    refused(["diff", str(a), str(b)], capsys, "different sets of models")


@pytest.mark.slow
def test_diff_flow_writes_report_and_artifact(prefect_harness, runs, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.diff import diff_flow

    paths = diff_flow(str(runs[0]), str(runs[1]), str(tmp_path / "flow"))
    assert "| 1 | 1 | 0.500 |" in Path(paths["markdown"]).read_text()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["circuit-run-diff"]))
        )
    assert any("m1__ioi__eap__str__kl__noise | 3 | 3 | 1 | 1 | 0.500" in a.data for a in artifacts)


@pytest.mark.slow
def test_series_diffs_against_the_last_completed_run(prefect_harness, runs, tmp_path):
    from prefect import flow

    from circuitfind.flows.diff_flow import diff_with_previous, last_completed, record_completed

    outputs = runs[0].parent

    @flow
    def step(run: str):
        return diff_with_previous(outputs, "nightly", outputs / run)

    assert last_completed(outputs, "nightly") is None
    assert step("monday") is None  # the first run of a series has nothing to diff against
    record_completed(outputs, "nightly", outputs / "monday")
    assert last_completed(outputs, "nightly") == outputs / "monday"
    result = step("tuesday")
    assert result["previous"] == "monday"
    assert Path(result["markdown"]) == outputs / "tuesday" / "diff-previous" / "diff.md"
    assert "edges lost:** input -> a0.0<q>" in Path(result["markdown"]).read_text()
    (outputs / "monday" / "manifest.json").unlink()  # a run without its manifest is not completed
    assert last_completed(outputs, "nightly") is None


@pytest.mark.slow
def test_scheduled_sweep_diffs_each_run_against_the_previous_one(prefect_harness, tmp_path):
    from circuitfind.runs.sweep import SweepConfig
    from flows.deploy import build_deployment
    from flows.sweep import sweep

    assert build_deployment(name="nightly-x").parameters["series"] == "nightly-x"
    config = SweepConfig(
        algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8
    )
    first = sweep(config, run="n1", outputs=str(tmp_path), series="nightly-x")
    assert first["previous_run_diff"] is None
    assert json.loads((tmp_path / ".series" / "nightly-x.json").read_text()) == {"run": "n1"}
    second = sweep(config, run="n2", outputs=str(tmp_path), series="nightly-x")
    diff = second["previous_run_diff"]
    assert diff["previous"] == "n1" and Path(diff["html"]) == tmp_path / "n2" / "diff-previous" / "diff.html"
    assert json.loads((tmp_path / "n2" / "manifest.json").read_text())["previous_run_diff"]["previous"] == "n1"
    saved = json.loads((tmp_path / "n2" / "diff-previous" / "diff.json").read_text())
    (row,) = saved["settings"]  # the same grid, cached: nothing moved
    assert row["edges_gained"] == [] and row["edges_lost"] == [] and row["edge_jaccard"] == 1.0
    assert (
        row["spearman"] == pytest.approx(1.0)
        and row["mean_abs_score_change"] == 0.0
        and row["faithfulness_change"] == 0.0
    )
    assert json.loads((tmp_path / ".series" / "nightly-x.json").read_text()) == {"run": "n2"}
    with pytest.raises(ValueError, match="not a plain name"):
        sweep(config, run="n3", outputs=str(tmp_path), series="../x")


EAP_RECORD = dict(model="m1", algorithm="eap", edges=[["a0.0", "logits"]], nodes=["a0.0", "logits"])


def test_runs_with_different_parameters_are_compared_with_a_warning(tmp_path, capsys):
    shared = {"models": ["m1"], "prompts": 8, "seed": 0, "top_k": 20}
    a = make_run(tmp_path / "a", [record(**EAP_RECORD)], config=shared)
    b = make_run(tmp_path / "b", [record(**EAP_RECORD)], config={**shared, "models": ["m1"], "prompts": 16})
    diff = diff_runs(a, b)
    assert diff["parameter_changes"] == {"prompts": [8, 16]}
    assert main(["diff", str(a), str(b)]) == 0
    err = capsys.readouterr().err
    assert "circuitfind: warning: the runs were made with different parameters (prompts 8 in A, 16 in B)" in err
    md = (b / "diff-a" / "diff.md").read_text()
    assert md.index("Warning: the runs were made with different parameters") < md.index("| setting |")
    same = make_run(tmp_path / "c", [record(**EAP_RECORD)], config=shared)
    assert diff_runs(a, same)["parameter_changes"] == {}


def test_runs_that_share_no_setting_are_refused(tmp_path, capsys):
    a = make_run(tmp_path / "a", [record(**EAP_RECORD)])
    b = make_run(tmp_path / "b", [record(**{**EAP_RECORD, "algorithm": "acdc"})])
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: runs a and b share no setting") and err.count("\n") == 1, err


def test_a_symlinked_default_diff_folder_is_replaced_not_written_through(tmp_path):
    a = make_run(tmp_path / "a", [record(**EAP_RECORD)])
    b = make_run(tmp_path / "b", [record(**EAP_RECORD)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (b / "diff-a").symlink_to(elsewhere)
    paths = write_diff(a, b)
    assert not (b / "diff-a").is_symlink() and (b / "diff-a" / "diff.html").is_file()
    assert Path(paths["html"]) == b / "diff-a" / "diff.html" and not list(elsewhere.iterdir())
