"""Circuits of different models or graph shapes are never compared, and scores of different
lengths are never correlated."""

import numpy as np
import pytest
import torch

from circuitfind import errors
from circuitfind.circuits import agreement
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.cli import main
from circuitfind.reports import compare_records


def _circuit(graph: ModelGraph, seed: int = 0, **settings) -> Circuit:
    shape = (graph.n_edges,) if graph.n_pos is None else (graph.n_edges, graph.n_pos)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Circuit(graph, scores.abs() > 1.0, scores, {"algorithm": "test", **settings})


SHAPES = {
    "layers": ModelGraph(2, 4),
    "heads": ModelGraph(3, 2),
    "kv heads": ModelGraph(3, 4, n_kv_heads=2),
    "merged qkv": ModelGraph(3, 4, split_qkv=False),
    "positions": ModelGraph(3, 4, n_pos=5),
}


@pytest.mark.parametrize("which", list(SHAPES))
def test_compare_command_refuses_different_shapes(tmp_path, capsys, which):
    a = _circuit(ModelGraph(3, 4)).save(tmp_path / "a.graphml")
    b = _circuit(SHAPES[which], seed=1).save(tmp_path / "b.json")
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1, err
    assert "different graph shapes" in err and str(a) in err and str(b) in err, err
    # the same file as the reference of a differently shaped circuit
    assert main(["compare", str(a), "--reference", str(b)]) == 2
    assert "different graph shapes" in capsys.readouterr().err


def test_compare_command_still_compares_same_shapes(tmp_path, capsys):
    a = _circuit(ModelGraph(3, 4)).save(tmp_path / "a.graphml")
    b = _circuit(ModelGraph(3, 4), seed=1).save(tmp_path / "b.json")
    assert main(["compare", str(a), str(b), "--reference", str(a)]) == 0
    out = capsys.readouterr().out
    assert "edge J" in out and "precision 1.000 recall 1.000" in out


def test_compare_command_warns_about_different_models(tmp_path, capsys):
    a = _circuit(ModelGraph(3, 4), model="toy-ioi").save(tmp_path / "a.graphml")
    b = _circuit(ModelGraph(3, 4), seed=1, model="other-model").save(tmp_path / "b.json")
    assert main(["compare", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    assert "circuitfind: warning: " in captured.err and "toy-ioi" in captured.err and "other-model" in captured.err
    assert "edge J" in captured.out


def test_check_comparable_names_the_shapes():
    circuits = {"a": _circuit(ModelGraph(3, 4)), "b": _circuit(ModelGraph(2, 4))}
    with pytest.raises(errors.GraphMismatchError, match=r"n_layers=3.*n_layers=2|n_layers=2.*n_layers=3"):
        agreement.check_comparable(circuits)
    assert agreement.check_comparable({"a": circuits["a"], "c": _circuit(ModelGraph(3, 4), seed=2)}) == []


def test_scores_of_different_lengths_are_never_correlated():
    with pytest.raises(ValueError, match="differ"):
        agreement.rank_correlation(np.arange(5.0), np.arange(6.0))
    with pytest.raises(ValueError, match="differ"):
        agreement.roc_auc(np.arange(6.0), np.array([True, False, True, False, True]))
    with pytest.raises(ValueError, match="differ"):
        agreement.roc_auc(np.arange(4.0), np.array([True, False, True, False, True]))


def _record(setting: str, graph: ModelGraph, circuit: Circuit, **extra) -> dict:
    return {
        "setting": setting,
        "model": "toy-ioi",
        "task": "ioi",
        "algorithm": "eap",
        "corruption": "str",
        "metric": "kl",
        "direction": "noise",
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "n_kv_heads": graph.n_kv_heads,
        "graph_edges": graph.n_edges,
        "n_edges": circuit.n_edges,
        "edges": [list(e) for e in circuit.edges],
        "nodes": sorted(circuit.nodes),
        "scores": circuit.scores.tolist(),
        "faithfulness": 0.5,
        "curve": None,
        "clean": 1.0,
        "corrupt": 0.0,
        **extra,
    }


def test_report_refuses_records_of_different_shapes_in_one_group():
    small, big = ModelGraph(2, 4), ModelGraph(3, 4)
    records = [_record("a", big, _circuit(big)), _record("b", small, _circuit(small))]
    with pytest.raises(errors.GraphMismatchError, match="different graph shapes"):
        compare_records(records)


def test_report_refuses_a_reference_of_another_shape():
    small, big = ModelGraph(2, 4), ModelGraph(3, 4)
    records = [_record("a", big, _circuit(big)), _record("b", big, _circuit(big, seed=1))]
    with pytest.raises(errors.GraphMismatchError, match="different graph shapes"):
        compare_records(records, reference=_record("ref", small, _circuit(small)))
    assert compare_records(records, reference=records[0])[0]["reference"]["setting"] == "a"


def test_report_refuses_records_whose_scores_do_not_fit_their_graph():
    graph = ModelGraph(3, 4)
    record = _record("a", graph, _circuit(graph))
    record["scores"] = record["scores"][:-1]
    with pytest.raises(errors.GraphMismatchError, match="scores"):
        compare_records([record, _record("b", graph, _circuit(graph, seed=1))])


@pytest.mark.parametrize("n_layers", [10**6, 500, "abc", -1])
def test_report_command_refuses_a_record_with_a_hostile_shape(tmp_path, capsys, n_layers):
    """Run folders from elsewhere are untrusted too: a record's shape is bounded before any graph is built."""
    import json
    import time

    graph = ModelGraph(3, 4)
    records = [_record("a", graph, _circuit(graph)), _record("b", graph, _circuit(graph, seed=1))]
    records[1]["n_layers"] = n_layers
    (tmp_path / "circuits").mkdir()
    for r in records:
        (tmp_path / "circuits" / f"{r['setting']}.json").write_text(json.dumps(r))
    start = time.monotonic()
    assert main(["report", str(tmp_path), "--reference", "b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1 and "n_layers" in err, err
    assert time.monotonic() - start < 10
    assert not (tmp_path / "report.html").exists()
