"""The EAP-IG / MIB circuit-track graph JSON: read and written to the format's spec.

``TINY`` is a 2-layer, 2-head graph file written here by hand from the spec (node names ``a{l}.h{h}``,
edges ``parent->child`` with ``<q>``/``<k>``/``<v>`` into heads, every edge with a score and
``in_graph``); scores are multiples of 1/8 so they are exact in float32.
"""

import json
import re
import time

import pytest
import torch

from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.circuits.mib import read_mib, to_mib, write_mib
from circuitfind.cli import main
from circuitfind.errors import GraphFileError

TINY = """{
  "cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8, "n_ctx": 16},
  "nodes": {
    "input": {"in_graph": true}, "a0.h0": {"in_graph": true}, "a0.h1": {"in_graph": false},
    "m0": {"in_graph": true}, "a1.h0": {"in_graph": false}, "a1.h1": {"in_graph": true},
    "m1": {"in_graph": true}, "logits": {"in_graph": true}
  },
  "edges": {
    "input->a0.h0<q>": {"score": 0.125, "in_graph": false},
    "input->a0.h1<q>": {"score": 0.25, "in_graph": false},
    "input->a0.h0<k>": {"score": -0.375, "in_graph": false},
    "input->a0.h1<k>": {"score": 0.5, "in_graph": false},
    "input->a0.h0<v>": {"score": 0.625, "in_graph": true},
    "input->a0.h1<v>": {"score": -0.75, "in_graph": false},
    "input->m0": {"score": 0.875, "in_graph": false},
    "a0.h0->m0": {"score": 1.0, "in_graph": true},
    "a0.h1->m0": {"score": -1.125, "in_graph": false},
    "input->a1.h0<q>": {"score": 1.25, "in_graph": false},
    "input->a1.h1<q>": {"score": 1.375, "in_graph": false},
    "input->a1.h0<k>": {"score": -1.5, "in_graph": false},
    "input->a1.h1<k>": {"score": 1.625, "in_graph": false},
    "input->a1.h0<v>": {"score": 1.75, "in_graph": false},
    "input->a1.h1<v>": {"score": -1.875, "in_graph": false},
    "a0.h0->a1.h0<q>": {"score": 2.0, "in_graph": false},
    "a0.h0->a1.h1<q>": {"score": 2.125, "in_graph": false},
    "a0.h0->a1.h0<k>": {"score": -2.25, "in_graph": false},
    "a0.h0->a1.h1<k>": {"score": 2.375, "in_graph": true},
    "a0.h0->a1.h0<v>": {"score": 2.5, "in_graph": false},
    "a0.h0->a1.h1<v>": {"score": -2.625, "in_graph": false},
    "a0.h1->a1.h0<q>": {"score": 2.75, "in_graph": false},
    "a0.h1->a1.h1<q>": {"score": 2.875, "in_graph": false},
    "a0.h1->a1.h0<k>": {"score": -3.0, "in_graph": false},
    "a0.h1->a1.h1<k>": {"score": 3.125, "in_graph": false},
    "a0.h1->a1.h0<v>": {"score": 3.25, "in_graph": false},
    "a0.h1->a1.h1<v>": {"score": -3.375, "in_graph": false},
    "m0->a1.h0<q>": {"score": 3.5, "in_graph": false},
    "m0->a1.h1<q>": {"score": 3.625, "in_graph": true},
    "m0->a1.h0<k>": {"score": -3.75, "in_graph": false},
    "m0->a1.h1<k>": {"score": 3.875, "in_graph": false},
    "m0->a1.h0<v>": {"score": 4.0, "in_graph": false},
    "m0->a1.h1<v>": {"score": -4.125, "in_graph": false},
    "input->m1": {"score": 4.25, "in_graph": false},
    "a0.h0->m1": {"score": 4.375, "in_graph": false},
    "a0.h1->m1": {"score": -4.5, "in_graph": false},
    "m0->m1": {"score": 4.625, "in_graph": false},
    "a1.h0->m1": {"score": 4.75, "in_graph": false},
    "a1.h1->m1": {"score": -4.875, "in_graph": false},
    "input->logits": {"score": 5.0, "in_graph": false},
    "a0.h0->logits": {"score": 5.125, "in_graph": false},
    "a0.h1->logits": {"score": -5.25, "in_graph": false},
    "m0->logits": {"score": 5.375, "in_graph": false},
    "a1.h0->logits": {"score": 5.5, "in_graph": false},
    "a1.h1->logits": {"score": -5.625, "in_graph": true},
    "m1->logits": {"score": 5.75, "in_graph": true}
  }
}
"""

# The circuit of TINY in circuitfind's names.
TINY_CIRCUIT = {
    ("input", "a0.0<v>"),
    ("a0.0", "a1.1<k>"),
    ("m0", "a1.1<q>"),
    ("a0.0", "m0"),
    ("a1.1", "logits"),
    ("m1", "logits"),
}


def _circuitfind_name(mib_edge: str) -> tuple[str, str]:
    """``a0.h1->a1.h0<k>`` -> ``("a0.1", "a1.0<k>")``: the naming difference, spelled out for the test."""
    parent, child = mib_edge.split("->")
    return tuple(re.sub(r"^a(\d+)\.h(\d+)", r"a\1.\2", n) for n in (parent, child))


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.mib.json"
    path.write_text(TINY)
    return path


def test_read_gives_the_files_edges_scores_and_circuit(tiny):
    circuit = Circuit.load(tiny)
    assert circuit.graph.shape == {"n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "split_qkv": True, "n_pos": None}
    assert set(circuit.edges) == TINY_CIRCUIT
    file_edges = json.loads(TINY)["edges"]
    assert len(file_edges) == circuit.graph.n_edges == 46
    for name, value in file_edges.items():
        i = circuit.graph.edge_lookup[_circuitfind_name(name)]
        assert circuit.scores[i].item() == value["score"], name
        assert circuit.in_circuit[i].item() == value["in_graph"], name
    assert circuit.settings == {"source_format": "eap-ig/mib", "d_model": 8}


def test_write_gives_the_exact_keys_and_names(tiny, tmp_path):
    out = tmp_path / "out.mib.json"
    Circuit.load(tiny).save(out)
    written, original = json.loads(out.read_text()), json.loads(TINY)
    assert list(written) == ["cfg", "nodes", "edges"]
    assert written["edges"] == original["edges"]  # names, scores and in_graph, exactly
    assert written["nodes"] == original["nodes"]
    assert written["cfg"] == {
        "n_layers": 2,
        "n_heads": 2,
        "parallel_attn_mlp": False,
        "d_model": 8,
        "circuitfind_settings": {"source_format": "eap-ig/mib", "d_model": 8},
    }


def test_circuitfind_to_mib_to_circuitfind_is_the_identity(tmp_path):
    graph = ModelGraph(3, 4)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1))
    circuit = Circuit(graph, scores.abs() > 1.0, scores, {"algorithm": "eap_ig", "metric": "kl"})
    path = write_mib(circuit, tmp_path / "c.mib.json", d_model=32)
    back = Circuit.load(path)
    assert back.graph.shape == graph.shape
    assert torch.equal(back.in_circuit, circuit.in_circuit) and torch.equal(back.scores, circuit.scores)
    assert back.settings == {"algorithm": "eap_ig", "metric": "kl", "d_model": 32}
    assert Circuit.load(back.save(tmp_path / "again.mib.json")).settings == back.settings


def test_gqa_group_edges_are_copied_to_every_query_head_and_merged_back(tmp_path):
    graph = ModelGraph(2, 4, n_kv_heads=2)  # heads 0, 1 share k/v group g0; heads 2, 3 group g1
    scores = torch.arange(graph.n_edges, dtype=torch.float32) / 8
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    group_edge = graph.edge_lookup[("a0.1", "a1.g1<k>")]
    keep[group_edge] = True
    circuit = Circuit(graph, keep, scores, {"d_model": 16})
    obj = to_mib(circuit)
    assert obj["cfg"]["n_key_value_heads"] == 2
    assert len(obj["edges"]) == 110  # EAP-IG's edge count of 2 layers x 4 heads: k/v per query head
    expected = {"score": scores[group_edge].item(), "in_graph": True}
    assert obj["edges"]["a0.h1->a1.h2<k>"] == obj["edges"]["a0.h1->a1.h3<k>"] == expected
    assert not obj["edges"]["a0.h1->a1.h2<v>"]["in_graph"]
    back = Circuit.from_mib(obj)
    assert back.graph.shape == graph.shape
    assert torch.equal(back.in_circuit, keep) and torch.equal(back.scores, scores)
    # per-head edges of one group that disagree: in_graph if any is, the mean score
    obj["edges"]["input->a0.h0<v>"] = {"score": 1.0, "in_graph": True}
    obj["edges"]["input->a0.h1<v>"] = {"score": 3.0, "in_graph": False}
    merged = Circuit.from_mib(obj)
    i = graph.edge_lookup[("input", "a0.g0<v>")]
    assert merged.in_circuit[i].item() is True and merged.scores[i].item() == 2.0


def test_merged_qkv_is_written_as_its_three_edges(tmp_path):
    graph = ModelGraph(2, 2, split_qkv=False)
    scores = torch.arange(graph.n_edges, dtype=torch.float32) / 4
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    keep[graph.edge_lookup[("m0", "a1.1")]] = True
    obj = to_mib(Circuit(graph, keep, scores, {"d_model": 8}))
    assert len(obj["edges"]) == 46
    score = scores[graph.edge_lookup[("m0", "a1.1")]].item()
    for kind in "qkv":
        assert obj["edges"][f"m0->a1.h1<{kind}>"] == {"score": score, "in_graph": True}
    back = Circuit.from_mib(obj)
    assert back.graph.split_qkv and set(back.edges) == {("m0", "a1.1<q>"), ("m0", "a1.1<k>"), ("m0", "a1.1<v>")}


def test_writing_needs_d_model(tmp_path):
    circuit = Circuit(ModelGraph(1, 1), torch.zeros(ModelGraph(1, 1).n_edges, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_model"):
        circuit.save(tmp_path / "c.mib.json")
    assert not (tmp_path / "c.mib.json").exists()


def _hostile(text: str, tmp_path, capsys, *fragments: str) -> None:
    """``circuitfind export`` refuses the file: exit 2, one line naming the file and the problem."""
    path = tmp_path / "bad.mib.json"
    path.write_text(text)
    with pytest.raises(GraphFileError):
        read_mib(path)
    assert main(["export", str(path), str(tmp_path / "out.graphml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1 and str(path) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out.graphml").exists()


def _edit(edit) -> str:
    obj = json.loads(TINY)
    edit(obj)
    return json.dumps(obj)


@pytest.mark.parametrize("key", ["cfg", "nodes", "edges"])
def test_missing_top_level_key(tmp_path, capsys, key):
    _hostile(_edit(lambda o: o.pop(key)), tmp_path, capsys, f"'{key}'", "missing")


def test_hostile_files(tmp_path, capsys):
    cases = [
        (_edit(lambda o: o["cfg"].update(n_layers="2")), ["n_layers", "whole number"]),
        (_edit(lambda o: o["cfg"].update(n_heads=True)), ["n_heads"]),
        (_edit(lambda o: o["cfg"].pop("parallel_attn_mlp")), ["parallel_attn_mlp"]),
        (_edit(lambda o: o["cfg"].update(parallel_attn_mlp=True)), ["parallel_attn_mlp", "parallel"]),
        (_edit(lambda o: o["cfg"].update(n_layers=10**9)), ["too large"]),
        (_edit(lambda o: o.update(edges=list(o["edges"]))), ["'edges' must be an object"]),
        (_edit(lambda o: o["nodes"].update({"a0.x1": {"in_graph": True}})), ["unknown node", "a0.x1"]),
        (_edit(lambda o: o["nodes"]["m0"].update(in_graph="yes")), ["node 'm0'", "in_graph"]),
        (_edit(lambda o: o["nodes"]["m0"].update(neurons=[True, False])), ["neuron"]),
        (_edit(lambda o: o["edges"].pop("m0->m1")), ["'m0->m1' is missing"]),
        (_edit(lambda o: o["edges"].update({"m1->m0": o["edges"].pop("m0->m1")})), ["unknown edge", "m1->m0"]),
        (_edit(lambda o: o["edges"]["m0->m1"].update(score="1.0")), ["m0->m1", "finite number"]),
        (_edit(lambda o: o["edges"]["m0->m1"].pop("in_graph")), ["m0->m1", "in_graph"]),
        (_edit(lambda o: o["edges"].update({"m0->m1": 1.0})), ["m0->m1", "not an object"]),
        (TINY.replace('"m0->m1": {"score": 4.625', '"m0->m1": {"score": NaN'), ["m0->m1", "finite number"]),
        (TINY.replace('"m0->m1": {"score": 4.625', '"m0->m1": {"score": Infinity'), ["m0->m1", "finite number"]),
        ("[1, 2]", ["top level", "array"]),
        (TINY[: len(TINY) // 2], ["not a valid EAP-IG / MIB graph JSON"]),
        ("", ["empty"]),
    ]
    for text, fragments in cases:
        _hostile(text, tmp_path, capsys, *fragments)


def test_node_scores_may_be_nan(tmp_path):
    """EAP-IG writes NaN for a node it did not score: allowed for node scores, not for edge scores."""
    path = tmp_path / "scored.mib.json"
    path.write_text(TINY.replace('"m0": {"in_graph": true}', '"m0": {"in_graph": true, "score": NaN}'))
    assert set(Circuit.load(path).edges) == TINY_CIRCUIT


def test_cli_export_and_compare_take_the_format(tiny, tmp_path, capsys):
    graphml = tmp_path / "tiny.graphml"
    assert main(["export", str(tiny), str(graphml)]) == 0
    back = tmp_path / "back.json"
    assert main(["export", str(graphml), str(back), "--format", "mib"]) == 0  # settings carry d_model
    assert json.loads(back.read_text())["edges"] == json.loads(TINY)["edges"]
    node_link = tmp_path / "plain.json"  # a plain .json stays node-link JSON
    assert main(["export", str(tiny), str(node_link)]) == 0 and "links" not in json.loads(node_link.read_text())
    assert "directed" in json.loads(node_link.read_text())
    bare = tmp_path / "bare.graphml"
    Circuit(ModelGraph(2, 2), Circuit.load(tiny).in_circuit).save(bare)
    assert main(["export", str(bare), str(tmp_path / "x.mib.json")]) == 2
    assert "--d-model" in capsys.readouterr().err
    assert main(["export", str(bare), str(tmp_path / "x.mib.json"), "--d-model", "8"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tiny), str(graphml), str(tmp_path / "x.mib.json")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]  # the table; a footnote follows
    assert [row.split()[2:4] for row in rows] == [["1.000", "1.000"]] * 3


def test_a_discovered_circuit_saves_as_mib_without_extra_arguments(ioi_model, ioi_batch, tmp_path):
    """The docs' example (how-to: MIB and EAP-IG files): discovery records d_model, so circuit.save("x.mib.json") works as written."""
    from circuitfind import patching
    from circuitfind.edge_patching import EdgePatcher
    from circuitfind.methods import discover as discovery

    circuit = discovery.eap_circuit(EdgePatcher(patching.prepare(ioi_model, ioi_batch)), k=10)
    assert circuit.settings["d_model"] == ioi_model.cfg.d_model
    back = Circuit.load(circuit.save(tmp_path / "c.mib.json"))
    assert back.edges == circuit.edges


@pytest.mark.parametrize("d_model", [-5, 0, 2.5, "64", True, 10**12])
def test_a_bad_d_model_in_a_file_is_refused(tmp_path, d_model):
    import json

    obj = json.loads(TINY)
    obj["cfg"]["d_model"] = d_model
    path = tmp_path / "bad.mib.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(GraphFileError, match="cfg 'd_model' must be a whole number between 1 and 1,000,000"):
        Circuit.load(path)


def test_a_small_file_declaring_a_huge_shape_is_refused_before_building(tmp_path, capsys):
    """400 layers x 8 heads is 18 million edges (under MAX_EDGES): building it took 5 minutes and
    5.1 GB before the edge check refused a 100 KB file."""
    obj = to_mib(Circuit(ModelGraph(2, 2), torch.zeros(ModelGraph(2, 2).n_edges, dtype=torch.bool)), d_model=8)
    obj["cfg"].update(n_layers=400, n_heads=8)
    start = time.monotonic()
    _hostile(json.dumps(obj), tmp_path, capsys, "refused before building it", "n_layers=400")
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("score", ["NaN", "Infinity", "9" * 4001])
def test_non_finite_or_huge_edge_scores_are_one_line(tmp_path, capsys, score):
    obj = to_mib(Circuit(ModelGraph(2, 2), torch.zeros(ModelGraph(2, 2).n_edges, dtype=torch.bool)), d_model=8)
    obj["edges"]["m0->m1"]["score"] = 0
    text = json.dumps(obj).replace('"m0->m1": {"score": 0,', '"m0->m1": {"score": ' + score + ",")
    _hostile(text, tmp_path, capsys, "'m0->m1'", "not a finite number")
