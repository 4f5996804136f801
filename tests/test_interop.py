"""Circuits for other tools: Neuronpedia's graph JSON (validated against the vendored schema), the
layered Graphviz drawing, and what a discovery measured (faithfulness, CPR, CMD, settings) carried
through GraphML, GEXF, node-link JSON and DOT and read back; the Prefect UI link of a flow run."""

import json
import math
import re
import shutil
import subprocess

import jsonschema
import networkx as nx
import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits import neuronpedia
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.circuits.graph_io import MAX_SETTINGS_DEPTH, layered_dot, read_graph
from circuitfind.cli import main
from circuitfind.errors import GraphFileError
from circuitfind.methods.discover import discover

ROUND_TRIP = (".graphml", ".gexf", ".json", ".dot")


@pytest.fixture(scope="module")
def found(ioi_model, ioi_batch):
    """A real toy-ioi circuit (EAP, top 20 edges) with its faithfulness and curve."""
    setup = P.prepare(ioi_model, ioi_batch, "str", "logit_diff")
    return discover(setup, "eap", "noise", top_k=20)


def schema_errors(obj) -> list[str]:
    """Errors of ``obj`` against the vendored schema, by an independent validator run (not the module's)."""
    with open(neuronpedia.__file__.replace("neuronpedia.py", "schemas/neuronpedia-graph-schema.json")) as fh:
        schema = json.load(fh)
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def test_the_vendored_schema_is_the_neuronpedia_attribution_graph_schema():
    schema = neuronpedia.schema()
    assert schema["title"] == "Anthropic Attribution Graph" and schema["$schema"].endswith("draft-07/schema#")
    assert schema["required"] == ["metadata", "qParams", "nodes", "links"]
    jsonschema.Draft7Validator.check_schema(schema)
    # the validator has teeth: a graph without its links, or a node without its id, is refused
    assert schema_errors({"metadata": {}, "qParams": {}, "nodes": []})
    with pytest.raises(ValueError, match="not a valid Neuronpedia graph at nodes/0"):
        neuronpedia.validate(
            {
                "metadata": {"slug": "s", "scan": "m", "prompt_tokens": [], "prompt": ""},
                "qParams": {},
                "nodes": [{"feature": 1}],
                "links": [],
            }
        )


def test_a_real_toy_ioi_circuit_exports_to_a_valid_neuronpedia_graph(found, tmp_path, capsys):
    circuit = found.circuit
    circuit.save(tmp_path / "c.graphml")
    assert main(["export", str(tmp_path / "c.graphml"), str(tmp_path / "np.json"), "--format", "neuronpedia"]) == 0
    obj = json.loads((tmp_path / "np.json").read_text())
    assert schema_errors(obj) == []
    nodes = {n["node_id"]: n for n in obj["nodes"]}
    assert len(nodes) == len(obj["nodes"])  # ids are unique
    # every circuit edge is a link with its score; each used q/k/v input feeds its head
    label = {n["node_id"]: n["clerp"] for n in obj["nodes"]}
    label.update({n["node_id"]: "logits" for n in obj["nodes"] if n["feature_type"] == "logit"})
    links = {(label[x["source"]].split(":")[0], label[x["target"]].split(":")[0]): x["weight"] for x in obj["links"]}
    expected = dict(zip(circuit.graph.edges, circuit.scores.tolist(), strict=True))
    for edge in circuit.edges:
        assert links[edge] == pytest.approx(expected[edge])
    receivers = {r for _, r in circuit.edges if "<" in r}
    for r in receivers:
        into = sum(expected[e] for e in circuit.edges if e[1] == r)
        assert links[(r, r.split("<")[0])] == pytest.approx(into)
    assert len(obj["links"]) == circuit.n_edges + len(receivers)
    kinds = {n["clerp"].split(":")[0]: n for n in obj["nodes"]}
    assert kinds["input"]["feature_type"] == "embedding" and kinds["input"]["layer"] == "E"
    for name, node in kinds.items():
        if name.startswith("a") and "<" not in name:
            assert node["feature_type"] == "attention head" and node["layer"] == name[1:].split(".")[0]
        if "<" in name:  # a q/k/v input sits in its head's layer
            assert node["feature_type"] == "attention input" and node["layer"] == kinds[name.split("<")[0]]["layer"]
    logit = [n for n in obj["nodes"] if n["feature_type"] == "logit"]
    assert len(logit) == 1 and "(p=" in logit[0]["clerp"]  # the frontend parses p= from a logit's label
    meta = obj["metadata"]
    assert meta["generation_settings"]["circuitfind"]["faithfulness"] == pytest.approx(found.faithfulness)
    assert f"faithfulness {found.faithfulness:.3f}" in meta["info"]["description"]
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", meta["slug"])
    # the suffix names the format too; the export is not read back
    assert main(["export", str(tmp_path / "c.graphml"), str(tmp_path / "c.neuronpedia.json")]) == 0
    assert json.loads((tmp_path / "c.neuronpedia.json").read_text()) == obj
    capsys.readouterr()
    assert main(["export", str(tmp_path / "c.neuronpedia.json"), str(tmp_path / "back.graphml")]) == 2
    assert "not read back" in capsys.readouterr().err


def test_hostile_node_names_and_settings_still_give_a_valid_graph():
    """Names are labels only: ids come from layers and indices, so quotes, underscores, dashes,
    HTML, control characters, huge names and names that collide once cleaned stay apart."""
    names = ['a"1', "0_0_0", "E_0-0", "<script>alert(1)</script>", "x\x00\n\ty", "é" * 5000, "a 1", "a_1", "a-1"]
    g = nx.DiGraph()
    g.add_node("input", kind="input", layer=-1)
    g.add_node("logits", kind="logits", layer=3)
    for i, name in enumerate(names):
        g.add_node(name, kind="head" if i % 2 else "mlp", layer=i % 3, head=i)
        g.add_edge("input", name, score=0.5 - i, in_circuit=True, structural=False)
        g.add_edge(name, "logits", score=1e30 if i == 0 else -(2.0**-60), in_circuit=True, structural=False)
    q = "weird<q>\"'"
    g.add_node(q, kind="input_q", layer=1, head=0)
    g.add_edge("input", q, score=2.0, in_circuit=True, structural=False)
    g.add_edge(q, names[1], score=0.0, in_circuit=True, structural=True)
    settings = {
        "model": "../../etc/passwd\n<b>",
        "task": "ioi\u202e'\"; DROP",
        "faithfulness": math.nan,
        "nested": {"a": [1, {"b": math.inf}]},
        "huge": 10**5000,
        "batch_size": "not an integer",  # a schema-typed generation setting: namespaced, so still valid
    }
    obj = neuronpedia.to_neuronpedia(g, settings)
    assert schema_errors(obj) == []
    ids = [n["node_id"] for n in obj["nodes"]]
    assert len(ids) == len(set(ids)) == len(names) + 3
    assert all(re.fullmatch(r"(E|logit|\d+)_\d+_\d+", i) for i in ids)
    assert all(n["clerp"].isprintable() and len(n["clerp"]) <= neuronpedia.MAX_LABEL for n in obj["nodes"])
    assert {x["source"] for x in obj["links"]} | {x["target"] for x in obj["links"]} <= set(ids)
    assert len(obj["links"]) == 2 * len(names) + 2
    assert re.fullmatch(r"[A-Za-z0-9._-]+", obj["metadata"]["scan"])
    text = json.dumps(obj, allow_nan=False)  # strict JSON: NaN and the huge integer are gone
    assert "DROP" in text and "NaN" not in text
    g.nodes[names[0]]["layer"] = "0; rm"
    with pytest.raises(ValueError, match="is not a whole number"):
        neuronpedia.to_neuronpedia(g, settings)
    g.nodes[names[0]]["layer"] = 0
    g.edges["input", names[0]]["score"] = math.nan
    with pytest.raises(ValueError, match="not a finite number"):
        neuronpedia.to_neuronpedia(g, settings)


def test_a_per_position_circuit_has_a_column_per_position():
    graph = ModelGraph(2, 2, n_pos=3)
    keep = torch.zeros(graph.n_edges, 3, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges, 3)
    i = graph.edge_lookup[("a0.1", "logits")]
    keep[i, 2], scores[i, 2] = True, -0.75
    obj = neuronpedia.to_neuronpedia(Circuit(graph, keep, scores).to_networkx(circuit_only=True), {}, n_pos=3)
    assert schema_errors(obj) == []
    assert obj["metadata"]["prompt_tokens"] == ["pos 0", "pos 1", "pos 2"]
    (link,) = obj["links"]
    assert link["weight"] == -0.75 and link["source"].endswith("_2") and link["target"].endswith("_2")


def test_layered_dot_puts_input_below_and_logits_above_with_colour_by_sign(found, tmp_path):
    circuit = found.circuit
    path = circuit.save(tmp_path / "c.gv", "dot-layered")
    text = path.read_text()
    assert "rankdir=BT" in text
    ids = dict(re.findall(r'^  (n\d+) \[label="([^"]+)"', text, re.M))
    name_of = ids
    ranks = [re.findall(r"n\d+", line) for line in text.splitlines() if "rank=same" in line]
    order = [{name_of[i] for i in rank} for rank in ranks]
    assert order[0] == {"input"} and order[-1] == {"logits"}  # bottom to top
    level = {n: k for k, rank in enumerate(order) for n in rank}
    for name in level:
        if "<" in name:  # a q/k/v input shares its head's rank and cluster
            assert level[name] == level[name.split("<")[0]]
        elif name.startswith("a"):
            assert level[f"m{name[1:].split('.')[0]}"] > level[name] if f"m{name[1:].split('.')[0]}" in level else True
    edges = re.findall(r"^  (n\d+) -> (n\d+) \[color=\"(#\w+)\", penwidth=([\d.]+)", text, re.M)
    scores = dict(zip(circuit.graph.edges, circuit.scores.tolist(), strict=True))
    assert len(edges) == circuit.n_edges
    biggest = max(abs(scores[e]) for e in circuit.edges)
    for u, v, colour, width in edges:
        s = scores[(name_of[u], name_of[v])]
        assert colour == ("#c62828" if s < 0 else "#1f5fbf")
        assert float(width) == pytest.approx(0.5 + 5.5 * abs(s) / biggest, abs=0.01)
    # the lossless .dot round trip is unchanged
    back = Circuit.load(circuit.save(tmp_path / "c.dot"))
    assert back.edges == circuit.edges
    if shutil.which("dot"):  # Graphviz draws it without a warning
        run = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stderr == "" and "<svg" in run.stdout


def test_layered_dot_of_hostile_names_is_one_clean_drawing(tmp_path):
    import pydot

    name = 'a"0\\.0\n}; digraph x {'
    g = nx.relabel_nodes(ModelGraph(1, 1).to_networkx(), {"a0.0": name})
    text = layered_dot(g)
    (parsed,) = pydot.graph_from_dot_data(text)  # one graph, the name inside one quoted label
    labels = [n.get_attributes().get("label") for n in parsed.get_nodes()]
    assert '"a\\"0\\\\.0?}; digraph x {"' in labels
    if shutil.which("dot"):
        (tmp_path / "h.gv").write_text(text)
        run = subprocess.run(["dot", "-Tsvg", str(tmp_path / "h.gv")], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "digraph x" in run.stdout  # drawn as a label


@pytest.mark.parametrize("suffix", ROUND_TRIP)
def test_faithfulness_cpr_cmd_and_settings_are_graph_attributes_that_load_back(found, tmp_path, suffix):
    circuit = found.circuit
    assert circuit.settings["faithfulness"] == found.faithfulness
    assert circuit.settings["curve"]["cpr"] == found.curve.cpr and circuit.settings["curve"]["cmd"] == found.curve.cmd
    path = circuit.save(tmp_path / f"c{suffix}")
    g = read_graph(path)
    assert g.graph["faithfulness"] == found.faithfulness
    assert g.graph["cpr"] == found.curve.cpr and g.graph["cmd"] == found.curve.cmd
    assert g.graph["faithfulness_status"] == "ok"
    back = Circuit.load(path)
    assert back.settings == json.loads(json.dumps(circuit.settings))
    assert back.settings["curve"]["faithfulness"] == found.curve.faithfulness


@pytest.mark.parametrize("suffix", ROUND_TRIP)
def test_hostile_settings_values_are_written_and_read_back(tmp_path, suffix):
    deep: dict = {}
    cursor = deep
    for _ in range(200):
        cursor["d"] = {}
        cursor = cursor["d"]
    cyclic: list = []
    cyclic.append(cyclic)
    settings = {
        "faithfulness": math.nan,
        "faithfulness_status": "ok\x00\n<bad>",
        "curve": {"cpr": math.inf, "cmd": 1e308, "fractions": [0.5, math.nan]},
        "huge_int": 10**5000,
        "big_int": 10**300,
        "long": "x" * 1_000_000,
        "quotes": "\"\\'</data>]]><!--",
        "nested": deep,
        "cyclic": cyclic,
        "tensor": torch.tensor([1.5, 2.5]),
        "object": object(),
        7: "a non-string key",
    }
    graph = ModelGraph(2, 2)
    circuit = Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool), torch.zeros(graph.n_edges), settings)
    back = Circuit.load(circuit.save(tmp_path / f"c{suffix}"))
    s = back.settings
    assert s["faithfulness"] is None and s["curve"]["cpr"] is None and s["curve"]["cmd"] == 1e308
    assert s["curve"]["fractions"] == [0.5, None]
    assert s["faithfulness_status"] == "ok\x00\n<bad>"  # kept in the settings, never as raw XML text
    assert s["huge_int"] == "<integer of about 5000 digits>" and s["big_int"] == 10**300
    assert s["long"] == "x" * 1_000_000 and s["quotes"] == settings["quotes"]
    depth, cursor = 0, s["nested"]
    while isinstance(cursor, dict):
        cursor, depth = cursor["d"], depth + 1
    assert isinstance(cursor, str) and depth == MAX_SETTINGS_DEPTH - 1  # cut to a string, not lost
    assert isinstance(s["tensor"], list) and s["tensor"] == [1.5, 2.5]
    assert s["object"].startswith("<object object") and s["7"] == "a non-string key"
    assert isinstance(s["cyclic"], list)
    g = read_graph(tmp_path / f"c{suffix}")
    assert "faithfulness" not in g.graph and "cpr" not in g.graph and g.graph["cmd"] == 1e308


def test_a_typed_attribute_that_disagrees_with_the_settings_is_refused(tmp_path, found):
    path = found.circuit.save(tmp_path / "c.json")
    obj = json.loads(path.read_text())
    obj["graph"]["cpr"] = 0.123
    path.write_text(json.dumps(obj))
    with pytest.raises(GraphFileError, match=r"c.json: graph attribute cpr \(0.123\) disagrees"):
        Circuit.load(path)
    obj["graph"]["cpr"] = "NaN"
    path.write_text(json.dumps(obj))
    with pytest.raises(GraphFileError, match="graph attribute cpr: 'NaN' is not a finite number"):
        Circuit.load(path)


def test_attributes_written_by_another_tool_alone_fill_in_the_settings(tmp_path, found):
    path = found.circuit.save(tmp_path / "c.json")
    obj = json.loads(path.read_text())
    obj["graph"]["settings"] = json.dumps({"algorithm": "eap"})
    path.write_text(json.dumps(obj))
    s = Circuit.load(path).settings
    assert s["faithfulness"] == found.faithfulness and s["curve"] == {"cpr": found.curve.cpr, "cmd": found.curve.cmd}


def test_the_sweep_writes_circuits_with_faithfulness_and_curve(tmp_path):
    from circuitfind.runs.sweep import SweepConfig, load_records, run_setting

    grid = SweepConfig(algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8)
    (setting,) = grid.settings()
    run_setting(setting, grid, tmp_path / "run", tmp_path / "cache")
    (record,) = load_records(tmp_path / "run")
    (graphml,) = (tmp_path / "cache").rglob("circuit.graphml")
    settings = Circuit.load(graphml).settings
    assert settings["faithfulness"] == pytest.approx(record["faithfulness"])
    assert settings["curve"]["cpr"] == pytest.approx(record["curve"]["cpr"])
    assert settings["curve"]["cmd"] == pytest.approx(record["curve"]["cmd"])
    g = read_graph(graphml)
    assert g.graph["faithfulness"] == pytest.approx(record["faithfulness"])


def test_flow_run_links_point_at_the_ui_of_prefect_server_start(monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
    from prefect.utilities.urls import url_for

    from circuitfind.flows import server

    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4311")
    assert server.later_ui_url() == "http://127.0.0.1:4311"
    with server._api_url("http://127.0.0.1:59999/api"):
        assert PREFECT_API_URL.value() == "http://127.0.0.1:59999/api"
        assert PREFECT_UI_URL.value() == "http://127.0.0.1:4311"
        link = url_for("flow-run", obj_id="1234")
        assert link == "http://127.0.0.1:4311/runs/flow-run/1234"
    monkeypatch.setenv("PREFECT_UI_URL", "http://ui.example:8080/")
    assert server.later_ui_url() == "http://ui.example:8080"
