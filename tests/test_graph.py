import networkx as nx
import pytest
import torch

from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.circuits.graph_io import read_graph, write_graph


def test_edge_counts_and_order():
    g = ModelGraph(3, 4)
    # senders before layer l heads: 1 + 5l; q,k,v receivers 3*4 per layer; MLP l sees 5 + 5l; logits all 16
    expected = sum(12 * (1 + 5 * l) + (5 + 5 * l) for l in range(3)) + 16
    assert g.n_edges == expected == 262
    assert g.edges[0] == ("input", "a0.0<q>")
    assert g.edges[-1] == ("m2", "logits")
    merged = ModelGraph(3, 4, split_qkv=False)
    assert merged.n_edges == sum(4 * (1 + 5 * l) + (5 + 5 * l) for l in range(3)) + 16
    assert ("a0.1", "a1.3") in merged.edge_lookup and ("a1.0", "a1.3") not in merged.edge_lookup


def test_dense_masks_place_edges():
    g = ModelGraph(2, 2)
    masks = torch.rand(3, g.n_edges)
    dense = g.dense(masks)
    s, r = g.edge_index
    assert torch.equal(dense[:, s, r], masks)
    assert dense.sum() == masks.sum() + 3 * (dense[0].numel() - g.n_edges)


def test_to_networkx_structure():
    g = ModelGraph(2, 2)
    keep = torch.zeros(g.n_edges, dtype=torch.bool)
    keep[g.edge_lookup[("a0.1", "a1.0<k>")]] = True
    nxg = g.to_networkx(torch.arange(g.n_edges, dtype=torch.float), keep)
    assert nx.is_directed_acyclic_graph(nxg)
    assert nxg.edges["a0.1", "a1.0<k>"]["in_circuit"]
    assert nxg.edges["a1.0<k>", "a1.0"]["structural"] and nxg.edges["a1.0<k>", "a1.0"]["in_circuit"]
    assert not nxg.edges["a1.0<q>", "a1.0"]["in_circuit"]
    assert {n for n, d in nxg.nodes(data=True) if d["in_circuit"]} == {"a0.1", "a1.0<k>", "a1.0"}
    assert nxg.nodes["a1.0"]["layer"] == 1 and nxg.nodes["m1"]["kind"] == "mlp"


def _same(a: nx.DiGraph, b: nx.DiGraph):
    assert dict(a.graph) == dict(b.graph)
    assert dict(a.nodes(data=True)) == dict(b.nodes(data=True))
    assert {(u, v): d for u, v, d in a.edges(data=True)} == {(u, v): d for u, v, d in b.edges(data=True)}


@pytest.mark.parametrize("suffix", [".graphml", ".gexf", ".json", ".dot"])
@pytest.mark.parametrize("kind", ["split", "merged", "per_pos"])
def test_round_trip_is_lossless(tmp_path, suffix, kind):
    graph = ModelGraph(2, 3, split_qkv=kind != "merged", n_pos=4 if kind == "per_pos" else None)
    gen = torch.Generator().manual_seed(0)
    shape = (graph.n_edges,) if graph.n_pos is None else (graph.n_edges, graph.n_pos)
    scores = torch.randn(shape, generator=gen) / 7
    circuit = Circuit(graph, scores.abs() > 0.1, scores, {"algorithm": "test", "tau": 0.1, "note": 'a "quoted" <text>'})
    path = circuit.save(tmp_path / f"c{suffix}")
    _same(circuit.to_networkx(), read_graph(path))
    back = Circuit.load(path)
    assert torch.equal(back.in_circuit, circuit.in_circuit)
    assert torch.equal(back.scores, circuit.scores)
    assert back.settings == circuit.settings
    assert back.edges == circuit.edges


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown graph format"):
        write_graph(nx.DiGraph(), tmp_path / "x.txt")


def test_a_circuit_refuses_scores_of_the_wrong_shape():
    graph = ModelGraph(2, 2)
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    for scores in (torch.ones(3), torch.ones(graph.n_edges, 2), torch.ones(graph.n_edges + 1)):
        with pytest.raises(ValueError, match="scores must have shape"):
            Circuit(graph, keep, scores)
    assert Circuit(graph, keep, torch.ones(graph.n_edges)).scores.shape == (graph.n_edges,)


def test_circuit_only_networkx_holds_just_the_circuit_edges():
    graph = ModelGraph(3, 4)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(3))
    circuit = Circuit(graph, scores.abs() > 1.5, scores)
    whole = circuit.to_networkx()
    structural_in = [(u, v) for u, v, d in whole.edges(data=True) if d["in_circuit"] and d["structural"]]
    assert structural_in  # what a user filtering by in_circuit alone also keeps
    only = circuit.to_networkx(circuit_only=True)
    assert set(only.edges) == set(circuit.edges) and only.number_of_edges() == circuit.n_edges
    assert not any(d["structural"] for _, _, d in only.edges(data=True))
    assert all(d["in_circuit"] for _, _, d in only.edges(data=True))
    assert set(only.nodes) == {n for e in circuit.edges for n in e}
    assert only.graph["n_layers"] == 3  # the shape and settings travel with it


def test_compare_command_names_its_component_jaccard(tmp_path, capsys):
    from circuitfind.circuits import agreement
    from circuitfind.cli import main

    graph = ModelGraph(3, 4)
    circuits = []
    for seed in (1, 2):
        scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(seed))
        circuits.append(Circuit(graph, scores.abs() > 2.0, scores))
    paths = [c.save(tmp_path / f"c{i}.graphml") for i, c in enumerate(circuits)]
    assert main(["compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split()[-3] == "J" and "comp" in header
    component_j = float(row.split()[-3])
    a, b = circuits
    assert component_j == pytest.approx(agreement.jaccard(a.components, b.components), abs=5e-4)
    assert agreement.jaccard(a.nodes, b.nodes) != pytest.approx(component_j, abs=5e-4)  # the two differ here
    assert "input and logits" in out


def test_draw_command_writes_an_svg_naming_the_circuit_nodes(tmp_path, capsys):
    """matplotlib's SVG (text kept as text): every circuit component labelled, one line per edge (``edge-<i>``)."""
    import xml.etree.ElementTree as ET

    from circuitfind.cli import main

    graph = ModelGraph(3, 4)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(5))
    circuit = Circuit(graph, scores.abs() > 2.2, scores, {"algorithm": "test"})
    path = circuit.save(tmp_path / "c.graphml")
    out = tmp_path / "c.svg"
    assert main(["draw", str(path), "--out", str(out)]) == 0
    root = ET.fromstring(out.read_text())
    assert root.tag.endswith("svg")
    labels = {el.text for el in root.iter() if el.tag.endswith("text")}
    assert circuit.components and circuit.components <= labels  # every head and MLP of the circuit is named
    assert not (labels & ({f"a{l}.{h}" for l in range(3) for h in range(4)} - circuit.nodes))  # and no other head
    edges = [el for el in root.iter() if el.get("id", "").startswith("edge-")]
    assert len(edges) == circuit.n_edges
    assert main(["draw", str(path), "--out", str(tmp_path / "c.jpg")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "*.pdf, *.svg or *.png" in err and len(err.strip().splitlines()) == 1
