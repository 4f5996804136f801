"""Points, intervals and "top" items as a researcher reads them, outside the study.

Wherever the sweep report, ``circuitfind diff`` and node circuits show a point and an interval
together, the point must lie inside its interval and be the same quantity (the record's own score,
``1 - Jaccard`` for the movement); wherever a "top" item is shown, it must be the largest by the stated
measure. Checked from the rendered Markdown in both directions (noise, denoise) and under every metric;
the checkpoints report's numbers and edge spans are read back against the results they come from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits.graph import ModelGraph
from circuitfind.methods import discover as D
from circuitfind.names import head_name
from circuitfind.reports import write_run_report
from circuitfind.runs.diff import write_diff

GRAPH = ModelGraph(2, 2)
METRICS = ("logit_diff", "prob", "kl")
DIRECTIONS = ("noise", "denoise")
NUM = r"(-?\d+\.\d+)"
INTERVAL = re.compile(rf"^{NUM} \[{NUM}, {NUM}\]$")


def _per_prompt(seed: int, sparse: bool) -> torch.Tensor:
    """Per-prompt edge scores [edges, 6]: signed noise, constant rows whose float32 mean rounds off
    the value, and (``sparse``) mostly zero rows, so zero-effect edges are among the top eight."""
    gen = torch.Generator().manual_seed(seed)
    per = 0.05 * torch.randn(GRAPH.n_edges, 6, generator=gen)
    if sparse:
        per[3:] = 0.0
    per[0] = 0.1  # constant rows: a zero-width interval at the value itself
    per[1] = -0.3
    per[2] = 1 / 3
    return per


def _record(run: Path, metric: str, direction: str, seed: int) -> dict:
    name = f"toy__ioi__eap__str__{metric}__{direction}"
    per = _per_prompt(seed, sparse=metric == "prob")
    scores = per.double().mean(-1)
    top = scores.abs().topk(5).indices.tolist()
    edges = [list(GRAPH.edges[i]) for i in top]
    torch.save(per, run / "circuits" / f"{name}.per_prompt.pt")
    return {
        "setting": name,
        "model": "toy",
        "task": "ioi",
        "algorithm": "eap",
        "corruption": "str",
        "metric": metric,
        "direction": direction,
        "n_layers": 2,
        "n_heads": 2,
        "n_kv_heads": 2,
        "graph_edges": GRAPH.n_edges,
        "n_edges": len(edges),
        "edges": edges,
        "nodes": sorted({n.split("<")[0] for e in edges for n in e}),
        "scores": scores.tolist(),
        "faithfulness": 0.8,
        "faithfulness_status": "ok",
        "curve": None,
        "seconds": 1.0,
        "clean": 0.0 if metric == "kl" else 2.0,
        "corrupt": -0.5 if metric == "kl" else -1.0,
        "per_prompt": f"circuits/{name}.per_prompt.pt",
    }


@pytest.fixture
def run(tmp_path) -> tuple[Path, dict[str, dict]]:
    (tmp_path / "circuits").mkdir()
    records = {}
    for i, (metric, direction) in enumerate((m, d) for m in METRICS for d in DIRECTIONS):
        r = _record(tmp_path, metric, direction, seed=i)
        (tmp_path / "circuits" / f"{r['setting']}.json").write_text(json.dumps(r))
        records[f"eap/str/{metric}/{direction}"] = r
    return tmp_path, records


def _bootstrap_tables(md: str) -> dict[str, list[tuple[str, float, float, float]]]:
    """The rendered "Top edges" tables: label -> rows (edge, mean, low, high)."""
    tables: dict[str, list] = {}
    label = None
    for line in md.splitlines():
        if m := re.match(r"\*\*(\S+):\*\* \d+ edges with a 95% interval excluding 0 \(of \d+\)\.", line):
            label = m.group(1)
            tables[label] = []
        elif label and line.startswith("| ") and not line.startswith("| edge |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[label].append((cells[0].replace("\\>", ">"), *map(float, cells[1:])))
        elif label and not line.startswith("|"):
            label = None if tables[label] else label
    return tables


def check_bootstrap_tables(md: str, records: dict[str, dict], folder: Path) -> None:
    """Each table lists what its header says: edges whose interval excludes 0 (as many as
    ``agreement.bootstrap_ci``, the reference, finds), the largest by |mean| among those, each point
    inside its interval and the record's own score."""
    from circuitfind.circuits.agreement import bootstrap_ci

    tables = _bootstrap_tables(md)
    assert set(tables) == set(records)
    for label, rows in tables.items():
        scores = records[label]["scores"]
        ci = bootstrap_ci(torch.load(folder / records[label]["per_prompt"], weights_only=True))
        excluding = ci.excludes_zero()
        count = int(re.search(rf"\*\*{re.escape(label)}:\*\* (\d+) edges", md).group(1))
        assert count == int(excluding.sum()), (
            f"{label}: {count} edges excluding 0, the reference finds {int(excluding.sum())}"
        )
        lookup = GRAPH.edge_lookup
        listed = set()
        for edge, mean, low, high in rows:
            sender, receiver = edge.split(" -> ")
            index = lookup[(sender, receiver)]
            listed.add(index)
            assert low <= mean <= high, f"{label} {edge}: {mean} outside [{low}, {high}]"
            assert low > 0 or high < 0, f"{label} {edge}: [{low}, {high}] includes 0 under an 'excluding 0' header"
            assert (low, high) == pytest.approx((float(ci.low[index]), float(ci.high[index])), abs=5e-4)
            assert mean == pytest.approx(scores[index], abs=6e-4), f"{label} {edge}: not the record's score"
        sizes = [abs(r[1]) for r in rows]
        assert sizes == sorted(sizes, reverse=True), f"{label}: not ordered by |mean|"
        unlisted = [abs(s) for i, s in enumerate(scores) if i not in listed and excluding[i]]
        assert not unlisted or min(sizes) >= round(max(unlisted), 3) - 5e-4, (
            f"{label}: an unlisted edge excluding 0 has a larger |mean|"
        )


def test_sweep_bootstrap_points_lie_in_their_intervals_and_top_edges_are_the_largest(run):
    folder, records = run
    md = write_run_report(folder)["markdown_text"]
    check_bootstrap_tables(md, records, folder)
    tables = _bootstrap_tables(md)
    # a zero-effect edge (the same zero on every prompt) has a zero-width interval at 0: it does not exclude
    # 0, so it is not listed (the sparse prob settings have few edges that do)
    assert all(r[1] != 0.0 for rows in tables.values() for r in rows)
    assert 0 < len(tables["eap/str/prob/noise"]) < 8
    # the checker fails on a point moved out of its interval, and on an interval that includes 0
    first = tables["eap/str/kl/noise"][0]
    moved = md.replace(
        f"| {first[1]:.3f} | {first[2]:.3f} | {first[3]:.3f} |", f"| 9.000 | {first[2]:.3f} | {first[3]:.3f} |"
    )
    with pytest.raises(AssertionError, match="outside"):
        check_bootstrap_tables(moved, records, folder)
    low = -0.001 if first[1] > 0 else first[2]
    high = first[3] if first[1] > 0 else 0.001
    widened = md.replace(
        f"| {first[1]:.3f} | {first[2]:.3f} | {first[3]:.3f} |", f"| {first[1]:.3f} | {low:.3f} | {high:.3f} |"
    )
    with pytest.raises(AssertionError, match="includes 0"):
        check_bootstrap_tables(widened, records, folder)


def test_sweep_bootstrap_points_are_exactly_inside_even_for_constant_rows(run):
    """The float32 mean of a constant row can round one ulp outside its float64-percentile interval."""
    from circuitfind.runs.statistics import compare_records
    from circuitfind.runs.sweep import load_records

    folder, _ = run
    (group,) = compare_records(load_records(folder))
    assert len(group["bootstrap"]) == len(METRICS) * len(DIRECTIONS)
    for boot in group["bootstrap"].values():
        for t in boot["top"]:
            assert t["low"] <= t["mean"] <= t["high"], t


def test_sweep_axis_table_points_match_their_intervals_and_the_largest_is_named(run):
    folder, _ = run
    md = write_run_report(folder)["markdown_text"]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.split("## Which choice matters", 1)[1].splitlines()
        if line.startswith("| ") and not line.startswith("| axis |")
    ]
    rows = [r for r in rows if len(r) == 7 and r[0] in ("metric", "direction", "algorithm", "corruption")]
    assert {r[0] for r in rows} == {"metric", "direction"}
    movements = []
    for axis, _values, _pairs, movement, *intervals in rows:
        parsed = []
        for cell in intervals:
            m = INTERVAL.match(cell)
            assert m, f"{axis}: {cell!r} is not a point with its interval"
            point, low, high = map(float, m.groups())
            assert low <= point <= high, f"{axis}: {point} outside [{low}, {high}]"
            parsed.append(point)
        assert float(movement) == pytest.approx(1 - parsed[0], abs=1.1e-3)  # the same quantity as edge Jaccard
        movements.append(float(movement))
    assert movements == sorted(movements, reverse=True)
    assert f"Largest first: {rows[0][0]} moves the circuit most." in md


def _diff_record(setting_suffix: str, edges: list, scores: list[float], faithfulness: float) -> dict:
    setting = f"m1__ioi__{setting_suffix}"
    algorithm, corruption, metric, direction = setting_suffix.split("__")
    return {
        "setting": setting,
        "model": "m1",
        "task": "ioi",
        "algorithm": algorithm,
        "corruption": corruption,
        "metric": metric,
        "direction": direction,
        "n_layers": 2,
        "n_heads": 2,
        "n_kv_heads": 2,
        "n_edges": len(edges),
        "edges": edges,
        "nodes": sorted({n.split("<")[0] for e in edges for n in e}),
        "scores": scores,
        "faithfulness": faithfulness,
        "faithfulness_status": "ok",
        "per_prompt": None,
    }


def _diff_run(folder: Path, seed: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(seed)
    (folder / "circuits").mkdir(parents=True)
    records = {}
    for metric in METRICS:
        for direction in DIRECTIONS:
            suffix = f"eap__str__{metric}__{direction}"
            scores = torch.randn(GRAPH.n_edges, generator=gen)
            edges = [list(GRAPH.edges[i]) for i in scores.abs().topk(6).indices.tolist()]
            faith = float(torch.rand(1, generator=gen))
            r = _diff_record(suffix, edges, scores.tolist(), faith)
            (folder / "circuits" / f"{r['setting']}.json").write_text(json.dumps(r))
            records[r["setting"]] = r
    settings = [{"setting": s, "n_edges": r["n_edges"]} for s, r in records.items()]
    (folder / "manifest.json").write_text(json.dumps({"run": folder.name, "settings": settings, "failures": []}))
    return records


def test_diff_summary_numbers_are_the_quantities_they_name(tmp_path):
    a, b = _diff_run(tmp_path / "a", 1), _diff_run(tmp_path / "b", 2)
    out = write_diff(tmp_path / "a", tmp_path / "b", tmp_path / "diff")
    md = out["markdown_text"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| m1__")]
    assert len(rows) == len(METRICS) * len(DIRECTIONS)
    for key, n_a, n_b, gained, lost, ej, _cj, _sp, shift, fa, fb, change in rows:
        ra, rb = a[key], b[key]
        ea, eb = {tuple(e) for e in ra["edges"]}, {tuple(e) for e in rb["edges"]}
        assert (int(n_a), int(n_b), int(gained), int(lost)) == (len(ea), len(eb), len(eb - ea), len(ea - eb))
        assert float(ej) == pytest.approx(len(ea & eb) / len(ea | eb), abs=6e-4)
        assert float(fa) == pytest.approx(ra["faithfulness"], abs=6e-4)
        assert float(fb) == pytest.approx(rb["faithfulness"], abs=6e-4)
        assert float(change) == pytest.approx(rb["faithfulness"] - ra["faithfulness"], abs=6e-4)  # B - A
        sa, sb = torch.tensor(ra["scores"]), torch.tensor(rb["scores"])
        assert float(shift) == pytest.approx(float((sb - sa).abs().mean()), abs=6e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_node_circuit_heads_are_the_largest_effects_and_scores_are_the_effects(ioi_model, ioi_batch, metric):
    setup = P.prepare(ioi_model, ioi_batch, "str", metric)
    for direction in DIRECTIONS:
        effect = P.patch_heads(setup, direction).effect
        sign = -1.0 if P.effect_sign(direction) == "negative" else 1.0
        circuit = D.node_circuit(setup, direction, k=1.0)
        found = set(circuit.settings["heads"])
        size = {
            head_name(l, h): sign * float(effect[l, h]) for l in range(setup.n_layers) for h in range(setup.n_heads)
        }
        rest = [v for n, v in size.items() if n not in found]
        if found:  # every found head has a larger signed effect than every head left out
            assert min(size[n] for n in found) >= max(rest), (metric, direction)
        for i in circuit.in_circuit.nonzero().flatten().tolist():
            s, r = circuit.graph.edges[i]
            receiver = r.split("<")[0]
            head = receiver if receiver in size else s
            if head in size:  # each edge's score is a found head's effect against the base run
                assert float(circuit.scores[i]) == pytest.approx(
                    float(effect[int(head[1:].split(".")[0]), int(head.split(".")[1])]), abs=1e-6
                )


def test_checkpoint_report_numbers_and_spans_are_what_they_name(tmp_path):
    from circuitfind.runs.checkpoints import write_report

    gen = torch.Generator().manual_seed(3)
    pool = [list(e) for e in GRAPH.edges[:12]]
    steps = [0, 10, 20, 40, 80]
    results = []
    for step in steps:
        keep = torch.rand(len(pool), generator=gen) < 0.5
        edges = [e for e, k in zip(pool, keep.tolist(), strict=True) if k]
        acc, ld, cld = torch.rand(3, generator=gen).tolist()
        results.append(
            {
                "step": step,
                "accuracy": acc,
                "logit_diff": ld,
                "corrupt_logit_diff": cld,
                "n_edges": len(edges),
                "edges": edges,
            }
        )
    md = Path(write_report(results, {"model": "toy", "algorithm": "acdc"}, tmp_path)["markdown"]).read_text()
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if re.match(r"^\| \d+ \|", line)
    ]
    final = {tuple(e) for e in results[-1]["edges"]}
    assert [int(r[0]) for r in rows] == steps
    for row, res in zip(rows, results, strict=True):
        edges = {tuple(e) for e in res["edges"]}
        assert float(row[1]) == pytest.approx(res["accuracy"], abs=6e-4)
        assert float(row[2]) == pytest.approx(res["logit_diff"], abs=6e-4)
        assert float(row[3]) == pytest.approx(res["corrupt_logit_diff"], abs=6e-4)
        assert int(row[4]) == len(edges)
        assert float(row[5]) == pytest.approx(len(edges & final) / len(final), abs=6e-3)
    # each edge's spans, read back, give exactly the checkpoints whose circuit holds it
    span_rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.split("When each edge is in the circuit", 1)[1].splitlines()
        if "->" in line and line.startswith("| ")
    ]
    assert len(span_rows) == len({tuple(e) for r in results for e in r["edges"]})
    firsts = []
    for edge, spans in span_rows:
        sender, receiver = edge.replace("\\>", ">").split("->")
        present = set()
        for span in spans.split(", "):
            a, b = span.split("-")
            present |= {s for s in steps if int(a) <= s and (b == "end" or s < int(b))}
        truth = {res["step"] for res in results if [sender, receiver] in res["edges"]}
        assert present == truth, edge
        firsts.append(min(truth))
    assert firsts == sorted(firsts)  # ordered by first appearance
