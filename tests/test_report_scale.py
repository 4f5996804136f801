"""The sweep report at the scale researchers run it: 1,000-edge circuits on a 6,637-edge graph (8 layers,
8 heads), with an ACDC-sized circuit, a node circuit without edge scores and a flagged setting. What a
reader must be able to trust: no list runs past 25 items inline (the rest is in a linked file), an
interval table lists only what its header says, a flagged setting is in no statistic or figure, the
algorithm axis compares circuits of equal size, and no number prints as ``nan`` or ``-0.00``. The
bootstrap's fast path is checked against the reference ``agreement.bootstrap_ci``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_report import InlineLists, inline_items
from circuitfind.circuits.agreement import bootstrap_ci
from circuitfind.circuits.graph import ModelGraph
from circuitfind.reports import figures, write_run_report
from circuitfind.runs.records import load_records
from circuitfind.runs.statistics import (
    axis_effects,
    bootstrap_excluding_zero,
    compare_records,
    cut_to_size,
    exact_quantiles,
)

LAYERS, HEADS = 8, 8
GRAPH = ModelGraph(LAYERS, HEADS)
FLAGGED = "big__ioi__eap__str__kl__noise"
NODE = "big__ioi__node__str__logit_diff__noise"
ACDC = "big__ioi__acdc__str__logit_diff__noise"
# edges only the flagged setting has: if any statistic used it, they would show up
ONLY_FLAGGED = [("a7.7", "logits"), ("a7.6", "logits"), ("m7", "logits")]


def _record(run: Path, algorithm: str, corruption: str, metric: str, seed: int, size: int = 1000) -> dict:
    name = f"big__ioi__{algorithm}__{corruption}__{metric}__noise"
    shared = torch.randn(GRAPH.n_edges, 1, generator=torch.Generator().manual_seed(100))  # what settings agree on
    gen = torch.Generator().manual_seed(seed)
    per = (
        shared + 0.3 * torch.randn(GRAPH.n_edges, 1, generator=gen) + 0.5 * torch.randn(GRAPH.n_edges, 8, generator=gen)
    )
    per[:50] = 0.0  # zero-effect edges: zero-width intervals at 0, never "excluding 0"
    scores = per.double().mean(-1)
    record = {
        "setting": name,
        "model": "big",
        "task": "ioi",
        "algorithm": algorithm,
        "corruption": corruption,
        "metric": metric,
        "direction": "noise",
        "n_prompts": 8,
        "n_layers": LAYERS,
        "n_heads": HEADS,
        "n_kv_heads": HEADS,
        "graph_edges": GRAPH.n_edges,
        "faithfulness": 0.8 - 0.1 * seed,
        "faithfulness_status": "ok",
        "curve": {
            "fractions": [0.001, 0.01, 0.1, 1.0],
            "faithfulness": [-0.0001, 0.3, 0.9, 1.0],  # a value that would print as -0.000
            "cpr": 0.7,
            "cmd": 0.3,
        },
        "seconds": 1.0,
        "clean": 2.0,
        "corrupt": -1.0,
    }
    if name == FLAGGED:  # every score zero: flagged zero_scores
        edges = [*ONLY_FLAGGED, *GRAPH.edges[100:110]]
        scores = torch.zeros(GRAPH.n_edges, dtype=torch.float64)
        per = torch.zeros(GRAPH.n_edges, 8)
    elif algorithm == "node":  # a node circuit: 5 edges, no edge scores, no curve
        edges = [("input", "a0.0<q>"), ("a0.0", "m0"), ("m0", "a1.1<v>"), ("a1.1", "m1"), ("m1", "logits")]
        record.update(curve=None, scores=None)
    else:
        candidates = [e for e in np.argsort(-scores.abs().numpy(), kind="stable") if GRAPH.edges[e] not in ONLY_FLAGGED]
        edges = [GRAPH.edges[i] for i in candidates[:size]]
    if algorithm != "node":
        record["scores"] = scores.tolist()
        record["per_prompt"] = f"circuits/{name}.per_prompt.pt"
        torch.save(per, run / record["per_prompt"])
    record.update(
        n_edges=len(edges),
        edges=[list(e) for e in edges],
        nodes=sorted({n.split("<")[0] for e in edges for n in e}),
    )
    (run / "circuits" / f"{name}.json").write_text(json.dumps(record))
    return record


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bench-scale")
    (run / "circuits").mkdir()
    for i, (corruption, metric) in enumerate([("str", "logit_diff"), ("str", "prob"), ("gn", "logit_diff")]):
        _record(run, "eap", corruption, metric, seed=i)
    acdc = _record(run, "acdc", "str", "logit_diff", seed=3, size=60)
    acdc["corrupt"] = -0.0001  # prints in the settings table: as 0.000, never -0.000
    (run / "circuits" / f"{ACDC}.json").write_text(json.dumps(acdc))
    _record(run, "node", "str", "logit_diff", seed=4)
    _record(run, "eap", "str", "kl", seed=5)
    manifest = {
        "run": run.name,
        "config": {
            "models": ["big"],
            "tasks": ["ioi"],
            "algorithms": ["eap", "acdc", "node"],
            "corruptions": ["str", "gn"],
            "metrics": ["logit_diff", "prob", "kl"],
            "directions": ["noise"],
            "prompts": 8,
            "seed": 7,
            "top_k": 1000,
            "acdc_tau": 0.02,
        },
        "settings": [{"setting": f.stem} for f in sorted((run / "circuits").glob("*.json"))],
        "failures": [],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    write_run_report(run)
    return run


def test_no_inline_list_is_longer_than_25_items(run):
    html = (run / "report.html").read_text()
    parser = InlineLists()
    parser.feed(html)
    assert parser.lists and max(n for _, n in parser.lists) <= 25, sorted(parser.lists, key=lambda x: -x[1])[:3]
    md = (run / "report.md").read_text()
    tables = re.split(r"\n\n", md)
    for block in tables:
        lines = block.splitlines()
        if lines and lines[0].startswith("| "):
            assert len(lines) - 2 <= 25, lines[:3]
        else:
            for line in lines:
                assert inline_items(line) <= 25 or line.startswith("**Contents:**"), line[:200]
    # the lists are long, so the full ones are written beside the report and linked
    with open(run / "robust-edges.csv") as fh:
        rows = list(csv.DictReader(fh))
    robust = [r for r in rows if r["found"] == "every healthy setting"]
    assert f"**Robust edges ({len(robust)}).**" in md  # few: the node circuit has 5 edges
    eap_only = [r for r in rows if r["found"] == "only when algorithm = eap"]
    assert len(eap_only) > 25 and f"| algorithm = eap | 3 | {len(eap_only)} |" in md
    assert "(robust-edges.csv)" in md and "href='robust-edges.csv'" in html
    strengths = [float(r["mean relative |score|"]) for r in eap_only]
    assert strengths == sorted(strengths, reverse=True)  # strongest first
    stability = (run / "component-stability.csv").read_text().splitlines()
    assert len(stability) - 1 > 25 and "href='component-stability.csv'" in html


def test_every_interval_table_lists_only_edges_whose_interval_excludes_0(run):
    md = (run / "report.md").read_text()
    section = md.split("### Bootstrap intervals", 1)[1]
    heads = re.findall(r"\*\*(\S+):\*\* (\d+) edges with a 95% interval excluding 0 \(of (\d+)\)\.", section)
    assert len(heads) == 4  # the four healthy settings with per-prompt scores (not the flagged one)
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| edge |")]
    assert len(rows) == 4 * 8
    for row in rows:
        _, mean, low, high = (c.strip() for c in row.strip("|").split("|"))
        assert float(low) <= float(mean) <= float(high)
        assert float(low) > 0 or float(high) < 0, row
    records = {r["setting"]: r for r in load_records(run)}
    for label, count, total in heads:
        name = "big__ioi__" + label.replace("/", "__")
        ci = bootstrap_ci(torch.load(records[name]["per_prompt"], weights_only=True))
        assert int(count) == int(ci.excludes_zero().sum()) and int(total) == GRAPH.n_edges


def test_a_flagged_setting_is_in_no_statistic_and_no_figure(run):
    records = load_records(run)
    (group,) = compare_records(records)
    assert group["health"][FLAGGED]["flags"] == ["zero_scores"]
    assert FLAGGED not in group["matrix_names"] + group["score_names"] + group["healthy"]
    assert FLAGGED not in group["layer_mass"] and FLAGGED not in group["bootstrap"]
    assert len(group["edge_jaccard"]) == len(group["matrix_names"]) == 5
    used = set(group["consensus_edges"]) | set(group["robust"]["edges"]["robust"]) | set(group["edge_strength"])
    used |= {e for d in group["robust"]["edges"]["dependent"] for e in d["items"]}
    assert not used & set(ONLY_FLAGGED)
    # stability is a fraction of the 5 healthy settings (a sixth, flagged, one would give sixths)
    assert all(abs(v * 5 - round(v * 5)) < 1e-9 for v in group["node_stability"].values())
    for effect in axis_effects(records):
        assert all(FLAGGED not in (p["a"], p["b"]) for p in effect["pairs"])
        assert "kl" not in effect["values"]
    html = (run / "report.html").read_text()
    label = "eap/str/kl/noise"
    for svg in re.findall(r"<svg.*?</svg>", html, re.S):
        if "Jaccard" in svg or "Spearman" in svg or "receiver layer" in svg or "faithfulness" in svg:
            assert label not in svg
    assert f"{label} (6 edges, flagged)" not in html or "flagged" in html  # drawn, and marked
    assert "1 flagged ones are left out" in (run / "report.md").read_text()


def test_the_algorithm_axis_compares_circuits_of_equal_size(run):
    records = load_records(run)
    (algorithm,) = [e for e in axis_effects(records) if e["axis"] == "algorithm"]
    eap_str = "big__ioi__eap__str__logit_diff__noise"
    assert algorithm["equal_size"] and algorithm["left_out"] == []
    sizes = {r["setting"]: r["n_edges"] for r in records}
    # the node circuit (5 edges, no scores) is the smaller of its pairs: the others are cut to 5
    assert {(p["a"], p["b"], p["size"]) for p in algorithm["pairs"]} == {
        (ACDC, eap_str, 60),
        (ACDC, NODE, 5),
        (eap_str, NODE, 5),
    }
    assert all(p["size"] == min(sizes[p["a"]], sizes[p["b"]]) for p in algorithm["pairs"])
    # a larger circuit without scores cannot be cut: an AtP circuit of 7 edges against the node circuit's 5
    node = next(r for r in records if r["setting"] == NODE)
    atp = {**node, "setting": NODE.replace("node", "atp"), "algorithm": "atp", "n_edges": 7}
    atp["edges"] = [*node["edges"], ["a0.0", "a1.0<q>"], ["a1.0", "logits"]]
    (with_atp,) = [e for e in axis_effects([*records, atp]) if e["axis"] == "algorithm"]
    pairs = {(p["a"], p["b"]): p["size"] for p in with_atp["pairs"]}
    assert (atp["setting"], NODE) not in pairs and (NODE, atp["setting"]) not in pairs
    assert pairs[(ACDC, atp["setting"])] == pairs[(atp["setting"], eap_str)] == 7  # cut to the AtP circuit's size
    # without the scored circuits, the AtP circuit is in no pair: left out, by name
    (alone,) = [e for e in axis_effects([node, atp]) if e["axis"] == "algorithm"]
    assert alone["left_out"] == [atp["setting"]] and not alone["pairs"] and alone["values"] == []
    # cut_to_size keeps the circuit's k edges of largest |score|
    eap = next(r for r in records if r["setting"] == "big__ioi__eap__str__logit_diff__noise")
    cut = cut_to_size(eap, 60)
    scores = np.abs(np.array(eap["scores"]))
    lookup = GRAPH.edge_lookup
    kept = {lookup[tuple(e)] for e in cut["edges"]}
    dropped = {lookup[tuple(e)] for e in eap["edges"]} - kept
    assert len(kept) == 60 and min(scores[list(kept)]) >= max(scores[list(dropped)])
    assert set(cut["nodes"]) <= set(eap["nodes"])
    md = (run / "report.md").read_text()
    assert "| algorithm (equal size) | acdc, eap, node | 3 |" in md
    assert "each pair of algorithms is compared at equal size" in md and "scores; k = 5, 60)" in md


def test_no_nan_and_no_negative_zero_in_the_report(run):
    md = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    page = re.sub(r"<svg.*?</svg>", "", html, flags=re.S)
    svg_text = " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", html))
    for text in (md, page, svg_text):
        assert not re.search(r"\bnan\b", text, re.I), re.search(r".{80}\bnan\b.{40}", text, re.I | re.S)
        assert not re.search(r"-0\.0+(?!\d*[1-9])\b", text), re.search(r".{80}-0\.0+\b.{20}", text, re.S)
    # an undefined value says why
    assert "n/a: no curve for node circuits" in md


def test_the_header_states_the_run_and_the_title_names_it(run):
    md = (run / "report.md").read_text()
    assert md.startswith(f"# {run.name}: big on ioi\n")
    assert "**Data:** big on ioi; 8 prompts per setting, seed 7." in md
    assert "--top-k 1000" in md and "--acdc-tau 0.02" in md
    assert "algorithms eap, acdc, node x corruptions str, gn x metrics logit_diff, prob, kl x directions noise" in md


def test_the_explorer_is_linked_when_the_run_has_one(run, tmp_path):
    assert "explorer.html" not in (run / "report.html").read_text()
    (run / "explorer.html").write_text("<html></html>")
    try:
        write_run_report(run)
        assert "href='explorer.html'" in (run / "report.html").read_text()
    finally:
        (run / "explorer.html").unlink()
        write_run_report(run)


def test_the_fast_bootstrap_gives_bootstrap_ci_s_numbers():
    gen = torch.Generator().manual_seed(0)
    per = torch.randn(4000, 8, generator=gen) * 0.4 + 0.3 * torch.randn(4000, 1, generator=gen)
    per[:10] = 0.0  # zero-width at 0
    per[10:20] = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0])  # constant-ish, far from 0
    per[20:30] = 1e-38 * torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])  # tiny: float32 ends round to 0
    ci = bootstrap_ci(per)
    fast = bootstrap_excluding_zero(per, top=50)
    assert fast["excluding_zero"] == int(ci.excludes_zero().sum())
    mean = ci.mean.abs().clone()
    mean[~ci.excludes_zero()] = -1
    assert sorted(t["index"] for t in fast["top"]) == sorted(mean.topk(50).indices.tolist())
    for t in fast["top"]:
        i = t["index"]
        assert (t["mean"], t["low"], t["high"]) == (float(ci.mean[i]), float(ci.low[i]), float(ci.high[i]))


def test_exact_quantiles_are_torch_quantile():
    x = torch.randn(300, 1000, dtype=torch.float64)
    q = (0.025, 0.975, 0.5, 0.1)
    expected = torch.quantile(x, torch.tensor(q, dtype=torch.float64), dim=-1).T.numpy()
    assert np.array_equal(exact_quantiles(x.numpy(), q), expected)


def test_the_circuit_picture_draws_every_edge_of_a_record():
    record = {"n_layers": 2, "n_heads": 2, "edges": [["input", "a0.0<q>"], ["a0.0", "m1"], ["m1", "logits"]]}
    svg = figures.circuit_picture(record, title="t")
    assert sorted(re.findall(r"<title>([^<]*-&gt;[^<]*)</title>", svg)) == [
        "a0.0 -&gt; m1",
        "input -&gt; a0.0&lt;q&gt;",
        "m1 -&gt; logits",
    ]


@pytest.mark.slow  # 4 s: a fresh interpreter
def test_the_report_reads_each_methods_facts_from_its_records_without_importing_the_engines(run, tmp_path):
    """The sweep writes the method's paper and summary into each record (``record["method"]``), so the report
    names them without importing a method: that loads the engines and transformers, seconds for no model."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    facts = {
        "eap": ("Syed et al. (from the record)", "EAP (from the record)"),
        "acdc": ("Conmy", "ACDC"),
        "node": ("Z", "N"),
    }
    for path in (copy / "circuits").glob("*.json"):
        record = json.loads(path.read_text())
        paper, summary = facts[record["algorithm"]]
        record["method"] = {"name": record["algorithm"], "paper": paper, "summary": summary}
        path.write_text(json.dumps(record))
    code = (
        "import sys; from circuitfind.reports import write_run_report; "
        f"write_run_report({str(copy)!r}); print(sorted(m for m in ('transformers', 'transformer_lens') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    md = (copy / "report.md").read_text()
    ranked = md[md.index("Methods, ranked") :]
    assert "Syed et al. (from the record)" in ranked and "EAP (from the record)" in ranked
