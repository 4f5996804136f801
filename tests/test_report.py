"""The sweep diff report on hand-made run folders with known circuits: which axis moves the circuit,
robust and setting-dependent edges, health flags (a degenerate setting left out of the significance
tables), grouped-query k/v edges in the drawings, and the shared rendering."""

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from circuitfind.circuits.graph import ModelGraph
from circuitfind.reports import render as R
from circuitfind.reports import report_sections, write_run_report
from circuitfind.reports.figures import circuit_drawing
from circuitfind.runs import health
from circuitfind.runs.statistics import axis_effects, compare_records, pair_statistics, robust_and_dependent

GRAPH = ModelGraph(2, 2)
R1, R2 = ("a0.0", "a1.0<q>"), ("a1.0", "logits")  # in every circuit
X = ("input", "a0.0<q>")  # EAP's circuits only
G = ("m0", "logits")  # Gaussian-noise circuits only
Y = ("a0.1", "m0")  # one setting only
CIRCUITS = {  # (algorithm, corruption, metric): edges, scores of named edges (others 0)
    ("eap", "str", "logit_diff"): ([R1, R2, X], {R1: 3, R2: 2, X: 1, G: 0.5}),
    ("eap", "gn", "logit_diff"): ([R1, R2, X, G], {R1: 5, R2: 4, X: 3, G: 2, Y: 1}),
    ("acdc", "str", "logit_diff"): ([R1, R2], {R1: 1, R2: 2, X: 3, G: 0.2, Y: 0.1}),
    ("acdc", "gn", "logit_diff"): ([R1, R2, G, Y], {R1: 5, R2: 4, G: 2, Y: 1}),
    # EAP with KL when noising: the gradient at the clean run is zero, so every score is zero
    ("eap", "str", "kl"): ([R1, Y], {}),
}


def _record(algorithm, corruption, metric, edges, scores, run=None) -> dict:
    name = f"toy__ioi__{algorithm}__{corruption}__{metric}__noise"
    lookup = GRAPH.edge_lookup
    vector = [0.0] * GRAPH.n_edges
    for edge, value in scores.items():
        vector[lookup[edge]] = float(value)
    nodes = sorted({n.split("<")[0] for e in edges for n in e})
    record = {
        "setting": name,
        "model": "toy",
        "task": "ioi",
        "algorithm": algorithm,
        "corruption": corruption,
        "metric": metric,
        "direction": "noise",
        "n_layers": 2,
        "n_heads": 2,
        "n_kv_heads": 2,
        "graph_edges": GRAPH.n_edges,
        "n_edges": len(edges),
        "edges": [list(e) for e in edges],
        "nodes": nodes,
        "scores": vector,
        "faithfulness": 0.9,
        "faithfulness_status": "ok",
        "curve": None,
        "seconds": 1.0,
        "clean": 0.0 if metric == "kl" else 2.0,
        "corrupt": -0.5 if metric == "kl" else -1.0,
        "per_prompt": None,
    }
    if algorithm == "eap" and run is not None:
        per = torch.zeros(GRAPH.n_edges, 4)
        if metric == "kl":  # rounding noise, the same sign everywhere: naively "significant" everywhere
            per[:] = 1e-9 * torch.tensor([1.0, 1.1, 0.9, 1.0])
        else:
            per[lookup[R1]] = torch.tensor([1.0, 1.1, 0.9, 1.0])
            per[lookup[R2]] = torch.tensor([2.0, 2.1, 1.9, 2.0])
        record["per_prompt"] = f"circuits/{name}.per_prompt.pt"
        torch.save(per, run / record["per_prompt"])
    return record


@pytest.fixture
def run(tmp_path):
    """A run folder written by hand: four healthy settings and a degenerate one."""
    (tmp_path / "circuits").mkdir()
    for (a, c, m), (edges, scores) in CIRCUITS.items():
        record = _record(a, c, m, edges, scores, tmp_path)
        (tmp_path / "circuits" / f"{record['setting']}.json").write_text(json.dumps(record))
    return tmp_path


def _records(run_dir=None):
    return [_record(a, c, m, e, s, run_dir) for (a, c, m), (e, s) in CIRCUITS.items()]


def test_health_flags_exact():
    recs = {r["metric"] + r["algorithm"] + r["corruption"]: r for r in _records()}
    assert health.check_record(recs["kleapstr"]) == ["zero_scores"]
    assert all(health.check_record(r) == [] for k, r in recs.items() if k != "kleapstr")
    base = recs["logit_diffeapstr"]
    assert health.check_record({**base, "scores": [1.5] * GRAPH.n_edges}) == ["constant_scores"]
    assert health.check_record({**base, "faithfulness": None}) == ["nan_faithfulness"]
    assert health.check_record(
        {**base, "n_edges": 0, "edges": [], "faithfulness": None, "faithfulness_status": "empty circuit"}
    ) == ["empty_circuit"]
    assert health.check_record({**base, "corrupt": 2.0}) == ["clean_equals_corrupt"]
    assert health.setting_notes({**base, "metric": "prob", "corruption": "gn", "direction": "denoise"}) == [
        "probability_metric",
        "gaussian_noise",
        "denoising",
    ]
    assert health.setting_notes({**base, "algorithm": "acdc", "direction": "denoise"}) == ["noising"]  # ACDC noises
    assert "gradient of the KL divergence" in health.explain(recs["kleapstr"], "zero_scores")


def test_axis_ranking_exact():
    effects = axis_effects(_records())
    # the KL setting is flagged, so the metric axis has a single healthy value and is not ranked
    assert [e["axis"] for e in effects] == ["corruption", "algorithm"]
    corruption, algorithm = effects
    # corruption pairs: eap str/gn 3/4, acdc str/gn 2/4
    assert corruption["edge_jaccard"]["mean"] == pytest.approx(0.625)
    assert corruption["movement"] == pytest.approx(0.375)
    # algorithm pairs at equal size: str at k = 2, EAP's {R1, R2, X} cut to its two largest |scores| {R1, R2}
    # = ACDC's {R1, R2}: 1; gn at k = 4 (both have four edges): 3/5. (Without the cut: 2/3 and 3/5.)
    assert [p["size"] for p in algorithm["pairs"]] == [2, 4] and not corruption["pairs"][0].get("size")
    assert algorithm["edge_jaccard"]["mean"] == pytest.approx(0.8)
    assert algorithm["movement"] == pytest.approx(0.2)
    # component Jaccard: corruption 2/3 and 2/4; algorithm 1 and 3/4
    assert corruption["node_jaccard"]["mean"] == pytest.approx(7 / 12)
    assert algorithm["node_jaccard"]["mean"] == pytest.approx(0.875)
    # Spearman of |score| over the edges in either circuit: corruption 1 and 0.8; algorithm: str has two
    # edges only (no correlation), gn 0.7
    assert corruption["spearman"]["mean"] == pytest.approx(0.9)
    assert algorithm["spearman"]["mean"] == pytest.approx(0.7) and algorithm["spearman"]["n"] == 1
    # two pairs: the bootstrap over pairs spans the two values
    assert (corruption["edge_jaccard"]["low"], corruption["edge_jaccard"]["high"]) == pytest.approx((0.5, 0.75))
    assert (algorithm["movement_low"], algorithm["movement_high"]) == pytest.approx((0.0, 0.4))
    assert len(corruption["pairs"]) == len(algorithm["pairs"]) == 2


def test_pair_statistics_needs_three_edges_for_a_rank_correlation():
    a, b = _records()[2], {**_records()[2], "setting": "other"}
    assert pair_statistics(a, b)["spearman"] != pair_statistics(a, b)["spearman"]  # NaN: two edges only
    assert pair_statistics(a, b)["edge_jaccard"] == 1.0


def test_robust_and_setting_dependent_exact():
    healthy = [r for r in _records() if not health.check_record(r)]
    found = robust_and_dependent(healthy)
    assert found["n_settings"] == 4
    assert found["edges"]["robust"] == sorted([R1, R2])
    assert [(d["axis"], d["value"], d["items"]) for d in found["edges"]["dependent"]] == [
        ("algorithm", "eap", [X]),
        ("corruption", "gn", [G]),
    ]  # Y is in one setting only: not "exactly when"
    assert found["components"]["robust"] == ["a0.0", "a1.0"]
    assert [(d["axis"], d["value"], d["items"]) for d in found["components"]["dependent"]] == [
        ("corruption", "gn", ["m0"])
    ]


def test_a_degenerate_setting_is_flagged_and_left_out_of_the_significance_tables(run):
    from circuitfind.runs.sweep import load_records

    (group,) = compare_records(load_records(run))
    kl = "toy__ioi__eap__str__kl__noise"
    assert kl not in group["bootstrap"]
    assert "flagged (zero_scores)" in group["bootstrap_skipped"][kl]
    assert group["bootstrap"]["toy__ioi__eap__str__logit_diff__noise"]["excluding_zero"] == 2
    assert group["bootstrap"]["toy__ioi__eap__gn__logit_diff__noise"]["excluding_zero"] == 2
    assert kl not in group["healthy"] and len(group["healthy"]) == 4
    md = write_run_report(run)["markdown_text"]
    intervals = re.findall(r"\*\*(\S+):\*\* (\d+) edges with a 95% interval excluding 0", md)
    assert intervals == [("eap/gn/logit_diff/noise", "2"), ("eap/str/logit_diff/noise", "2")]
    assert "| eap/str/kl/noise | 2 | 4 | 0.900 |" in md and "| zero_scores | noising |" in md
    assert "**eap/str/kl/noise:** no intervals: left out of the significance tables" in md


def test_report_layout_answers_first(run):
    md = write_run_report(run)["markdown_text"]
    order = [
        md.index(s)
        for s in (
            "**Contents:**",
            "## Which choice matters",
            "### Robust and setting-dependent edges",
            "## Settings and health checks",
            "### Pitfalls of these settings",
            "## toy on ioi: 5 settings",
        )
    ]
    assert order == sorted(order)
    # two pairs per axis: no interval (issue 25: two identical pairs printed [0.401, 0.401])
    assert (
        "| corruption | gn, str | 2 | 0.375 | 0.625 (no interval: 2 pairs, at least 3 needed for an interval) |" in md
    )
    # the algorithm axis at equal size (test_axis_ranking_exact)
    assert (
        "| algorithm (equal size) | acdc, eap | 2 | 0.200 | 0.800 (no interval: 2 pairs, at least 3 needed for an interval) |"
        in md
    )
    # robust edges: a table, strongest first (mean |score| over each setting's largest: R1 5/5, 3/3, 1/3, 5/5)
    assert "**Robust edges (2).**" in md
    assert "| a0.0 -> a1.0<q> | heads of layer 1 | 0.833 |\n| a1.0 -> logits | logits | 0.733 |" in md
    assert "| corruption = gn | 2 | 1 | m0 -> logits |" in md and "| algorithm = eap | 2 | 1 | input -> a0.0<q> |" in md
    assert "[All robust and setting-dependent edges (4): robust-edges.csv](robust-edges.csv)" in md
    assert (run / "robust-edges.csv").read_text().splitlines()[1:] == [
        "every healthy setting,a0.0,a1.0<q>,heads of layer 1,0.833",
        "every healthy setting,a1.0,logits,logits,0.733",
        "only when algorithm = eap,input,a0.0<q>,heads of layer 0,0.483",  # (1/3 + 3/5 + 3/3 + 0) / 4
        "only when corruption = gn,m0,logits,logits,0.258",  # (0.5/3 + 2/5 + 0.2/3 + 2/5) / 4
    ]
    html = (run / "report.html").read_text()
    # one axis figure, 2 overlap heatmaps + Spearman, the layer x layer score mass, the consensus drawing and
    # 5 setting drawings; no curves
    assert html.count("<svg") == 1 + 3 + 1 + 1 + 5
    assert "<nav class='contents'>" in html and "href='#which-choice-matters'" in html


def _lines(svg: str) -> list[tuple[str, tuple[float, float]]]:
    """(tooltip, end point) of every line drawn for an edge, and the centre of every named circle."""
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    circles = {c.find(f"{ns}title").text: (float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{ns}circle")}
    ends = {
        (ln.find(f"{ns}title").text, (float(ln.get("x2")), float(ln.get("y2"))))
        for ln in root.iter(f"{ns}line")
        if ln.find(f"{ns}title") is not None
    }
    heads = {xy: name for name, xy in circles.items()}
    return sorted((tip, heads.get(xy, "?")) for tip, xy in ends)


def test_grouped_query_kv_edges_are_drawn_into_every_head_of_their_group(gqa_model):
    graph = ModelGraph.from_model(gqa_model)
    assert graph.n_kv_heads == 2 and ("a0.1", "a1.g0<k>") in graph.edge_lookup
    edges = [("a0.1", "a1.g0<k>"), ("input", "a1.g1<v>"), ("m0", "a1.2<q>")]
    svg = circuit_drawing(graph.n_layers, graph.n_heads, edges, set(), "gqa", n_kv_heads=graph.n_kv_heads)
    assert _lines(svg) == [
        ("a0.1 -> a1.g0<k>", "a1.0"),
        ("a0.1 -> a1.g0<k>", "a1.1"),
        ("input -> a1.g1<v>", "a1.2"),
        ("input -> a1.g1<v>", "a1.3"),
        ("m0 -> a1.2<q>", "a1.2"),
    ]


def test_the_report_draws_a_discovered_gqa_circuit_completely(gqa_model, tmp_path):
    from circuitfind import patching as P
    from circuitfind.methods import discover as D
    from circuitfind.tasks.batch import TaskBatch

    setup = P.prepare(gqa_model, TaskBatch.build(gqa_model, "ioi", 6, seed=0), "str", "logit_diff")
    graph = ModelGraph.from_model(gqa_model)
    circuit = D.discover(
        setup, "eap", "noise", top_k=graph.n_edges, curve=False
    ).circuit  # every edge: the k/v groups included
    record = {
        "setting": "gqa",
        "model": "gqa",
        "task": "ioi",
        "algorithm": "eap",
        "corruption": "str",
        "metric": "logit_diff",
        "direction": "noise",
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "n_kv_heads": graph.n_kv_heads,
        "n_edges": circuit.n_edges,
        "edges": [list(e) for e in circuit.edges],
        "nodes": sorted(circuit.nodes),
        "scores": circuit.scores.tolist(),
        "faithfulness": 1.0,
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
    }
    html = R.html_page("gqa", report_sections([record]))
    (drawing,) = [
        m
        for m in re.findall(r"<svg.*?</svg>", html, re.S)
        if f"eap/str/logit_diff/noise ({circuit.n_edges} edges)" in m
    ]
    drawn = {tip for tip, _ in _lines(drawing)}
    group_edges = {f"{s} -> {r}" for s, r in circuit.edges if ".g" in r}
    assert group_edges and group_edges <= drawn
    assert len(drawn) == circuit.n_edges


def test_render_page_has_contents_and_escapes():
    sections = [
        R.section("First <one>", R.text("a & b"), R.table(["x", "y"], [["<b>", 1.23456], [None, float("nan")]])),
        R.section("Sub", R.figure("<svg></svg>", "cap"), level=3),
        R.section("First <one>"),
    ]
    html = R.html_page("T", sections)
    assert (
        "<li><a href='#first-one'>First &lt;one&gt;</a></li><ul><li><a href='#sub'>Sub</a></li></ul><li><a href='#first-one-2'>"
        in html
    )
    assert (
        "<td>&lt;b&gt;</td><td class='n'>1.235</td>" in html
        and "<td>n/a</td><td class='n'>n/a</td>" in html  # an undefined number never prints as "nan"
        and "a &amp; b" in html
    )
    marked = R.table(["flag"], [[R.Markup("<span class='flag'>x</span>", "x")]])
    assert "<td><span class='flag'>x</span></td>" in marked.html and marked.markdown.endswith("| x |")
    md = R.markdown_page("T", sections)
    assert (
        "| <b> | 1.235 |\n| n/a | n/a |" in md and "### Sub" in md and "**Contents:** First <one> · First <one>" in md
    )


def test_the_study_report_renders_with_the_shared_module_and_states_its_pitfalls(tmp_path):
    from circuitfind.runs.study import study_report

    normalised = [[0.1, 0.9], [0.0, -0.2]]
    setting = {
        "corruption": "gn",
        "metric": "prob",
        "heads": ["a0.1"],
        "normalised": normalised,
        "ci_low": [[0.0, 0.8], [-0.1, -0.3]],
        "ci_high": [[0.2, 1.0], [0.1, -0.1]],
        "clean": 0.5,
        "corrupt": 0.1,
    }
    heads = [
        {
            "model": "toy",
            "prompts": 4,
            "direction": "denoise",
            "k": 2.0,
            "settings": {"gn/prob": setting},
            "jaccard": [[1.0]],
            "names": ["gn/prob"],
            "stability": {"a0.1": 1.0},
            "s2_vs_s1io": {},
        }
    ]
    mlps = [
        {
            "model": "toy",
            "prompts": 4,
            "corruption": "gn",
            "metric": "prob",
            "position": "subject_last",
            "curves": {"window 1": [0.1, 0.5], "window 3": [0.3, 0.8], "sum of 3 single layers": [0.2, 0.6]},
            "peaks": {"window 1": 1},
            "agreement": {3: {"spearman": 1.0, "peak_window": 1, "peak_sum": 1, "max_window": 0.8, "max_sum": 0.6}},
        }
    ]
    paths = study_report(heads, mlps, tmp_path)
    html, md = (tmp_path / "study.html").read_text(), (tmp_path / "study.md").read_text()
    assert paths["html"].endswith("study.html") and "<nav class='contents'>" in html and html.count("<svg") == 2
    assert "| gn/prob | a0.1 | a0.1: 0.900 [0.800, 1.000] |" in md
    # the MLP table of issue 25: the window's peak and its value; the sum curve's own peak named as such (these
    # records predate the per-prompt window-minus-sum test, so it says it was not recorded)
    assert "| 3 | 1 | 0.800 | - | (not recorded) | layer 1 (0.600) | 1.000 |" in md
    for code in ("probability_metric", "gaussian_noise", "denoising", "sliding_mlp_window"):
        assert health.PITFALLS[code][0] in md
    assert md.count(health.PITFALLS["sliding_mlp_window"][0]) == 1  # only where windows appear


def test_the_model_axis_is_ranked_when_the_grid_has_several_models():
    healthy = [r for r in _records() if not health.check_record(r)]
    other = []
    for r in healthy:  # a second model of the same shape whose circuits never hold X
        edges = [e for e in r["edges"] if tuple(e) != X]
        other.append(
            {
                **r,
                "model": "other",
                "setting": r["setting"].replace("toy__", "other__"),
                "edges": edges,
                "n_edges": len(edges),
            }
        )
    effects = {e["axis"]: e for e in axis_effects(healthy + other)}
    assert set(effects) == {"model", "algorithm", "corruption"}
    # eap/str 2/3, eap/gn 3/4, the ACDC circuits are the same
    assert effects["model"]["edge_jaccard"]["mean"] == pytest.approx((2 / 3 + 3 / 4 + 1 + 1) / 4)
    assert len(effects["model"]["pairs"]) == 4 and effects["model"]["skipped_pairs"] == 0
    groups = compare_records(healthy + other)
    assert [g["model"] for g in groups] == ["other", "toy"]
    assert [(d["axis"], d["value"]) for d in groups[0]["robust"]["edges"]["dependent"]] == [("corruption", "gn")]
    # another graph shape: the pairs across models are not compared, only counted
    bigger = [{**r, "n_layers": 3, "scores": None} for r in other]
    effects = {e["axis"]: e for e in axis_effects(healthy + bigger)}
    assert effects["model"]["pairs"] == [] and effects["model"]["skipped_pairs"] == 4


def test_markdown_table_cells_escape_the_pipe():
    from circuitfind.reports import render as R

    assert R.table(["a|b", "n"], [["x|y", 2]]).markdown == "| a\\|b | n |\n|---|---|\n| x\\|y | 2 |"


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "(not a JSON object)"),
        ('{"setting": "x"}', "(no n_layers, n_heads, n_edges, model, task, algorithm, corruption, metric, direction)"),
    ],
)
def test_a_file_that_is_not_a_setting_record_is_one_line(tmp_path, capsys, content, message):
    from circuitfind.cli import main

    (tmp_path / "circuits").mkdir()
    (tmp_path / "circuits" / "x.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a circuitfind setting record " + message in err


def test_a_record_without_its_model_is_one_line(run, capsys):
    from circuitfind.cli import main

    file = next((run / "circuits").glob("*.json"))
    record = json.loads(file.read_text())
    del record["model"]
    file.write_text(json.dumps(record))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(no model)" in err and file.name in err
    record["model"] = 7
    file.write_text(json.dumps(record))
    assert main(["report", str(run)]) == 2
    assert "model not a string" in capsys.readouterr().err


def test_a_finished_run_with_a_deleted_record_is_reported_with_a_warning(run, capsys):
    from circuitfind.cli import main

    files = sorted((run / "circuits").glob("*.json"))
    settings = [{"setting": f.stem} for f in files]
    (run / "manifest.json").write_text(json.dumps({"run": "r", "settings": settings, "failures": []}))
    files[0].unlink()
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: warning: 1 of 5 settings") and files[0].stem in err, err
    assert f"1 of 5 settings of this run have no record ({files[0].stem})" in (run / "report.md").read_text()


@pytest.mark.slow
def test_report_html_is_byte_for_byte_reproducible(run, tmp_path):
    """Two renders in processes with different hash seeds (set order) give the same bytes."""
    import os
    import subprocess
    import sys

    pages = []
    for seed in ("1", "2", "3"):
        code = "import sys; from circuitfind.reports import write_run_report; write_run_report(sys.argv[1])"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(run)], env=env, check=True, timeout=120)
        pages.append(((run / "report.html").read_bytes(), (run / "report.md").read_bytes()))
    assert pages[0] == pages[1] == pages[2]


def test_a_large_answer_set_is_shortened_in_the_example_table():
    from circuitfind.reports.sweep_report import _answer_list

    assert _answer_list([" he", " him", " his"]) == "' he' | ' him' | ' his'"
    years = [f"{y:02d}" for y in range(33, 100)]  # greater-than's R for YY = 32
    cell = _answer_list(years)
    assert cell == "'33' | '34' | '35' | ... (61 more) ... | '97' | '98' | '99' (67 answers)"
