"""Graph files from elsewhere are untrusted: every bad file is one clear error, fast and small.

The hostile files are built here (tmp_path): empty, binary, truncated, wrong-format, XML entity
payloads, deeply nested DOT and JSON, node-link JSON with missing keys or wrong types, declared
shapes that do not match the edges, and shapes far too large to allocate.
"""

import json
import re
import resource
import subprocess
import sys
import time

import pytest
import torch

from circuitfind import errors
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.circuits.graph_io import read_graph
from circuitfind.cli import main

SUFFIXES = (".graphml", ".gexf", ".json", ".dot")
FORMAT_NAMES = {".graphml": "GraphML", ".gexf": "GEXF", ".json": "node-link JSON", ".dot": "DOT"}


@pytest.fixture(scope="module")
def circuit() -> Circuit:
    graph = ModelGraph(3, 4)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))
    return Circuit(graph, scores.abs() > 1.5, scores, {"algorithm": "test"})


@pytest.fixture(scope="module")
def saved(circuit, tmp_path_factory) -> dict:
    """The circuit in every format, as written by Circuit.save."""
    folder = tmp_path_factory.mktemp("saved")
    return {suffix: circuit.save(folder / f"c{suffix}") for suffix in SUFFIXES}


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def refused(path, capsys, *fragments: str, seconds: float = 10.0) -> str:
    """Run ``circuitfind export`` on ``path`` in-process: exit 2, one line naming the file, fast, small."""
    rss, start = _max_rss_gb(), time.monotonic()
    code = main(["export", str(path), str(path.parent / "out.json")])
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1, err
    assert str(path) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    assert captured.out == "", captured.out  # nothing else printed (e.g. by a parser)
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert _max_rss_gb() - rss < 1.0, "reading allocated more than 1 GB"
    assert not (path.parent / "out.json").exists()
    return err


def test_error_type_names_file_and_is_a_value_error(tmp_path):
    path = tmp_path / "empty.graphml"
    path.write_bytes(b"")
    with pytest.raises(errors.GraphFileError, match="empty.graphml") as info:
        Circuit.load(path)
    assert isinstance(info.value, errors.CircuitfindError) and isinstance(info.value, ValueError)
    with pytest.raises(errors.GraphFileError, match="empty"):
        read_graph(path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_file(tmp_path, capsys, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    refused(path, capsys, "empty")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_binary_file(tmp_path, capsys, suffix):
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(bytes(range(256)) * 64)
    refused(path, capsys, "binary")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_file(tmp_path, capsys, saved, suffix):
    data = saved[suffix].read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: len(data) // 2])
    refused(path, capsys, f"not a valid {FORMAT_NAMES[suffix]} file")


def test_json_content_in_a_graphml_file(tmp_path, capsys, saved):
    path = tmp_path / "wrong.graphml"
    path.write_bytes(saved[".json"].read_bytes())
    refused(path, capsys, "not a valid GraphML file")


def test_graphml_content_in_a_dot_file(tmp_path, capsys, saved):
    path = tmp_path / "wrong.dot"
    path.write_bytes(saved[".graphml"].read_bytes())
    refused(path, capsys, "not a valid DOT")


def test_well_formed_xml_that_is_not_graphml(tmp_path, capsys):
    path = tmp_path / "other.graphml"
    path.write_text('<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>')
    refused(path, capsys, "not a valid GraphML file")
    gexf = tmp_path / "other.gexf"
    gexf.write_text('<?xml version="1.0"?><gexf xmlns="http://www.gexf.net/1.2draft"><meta/></gexf>')
    refused(gexf, capsys, "not a valid GEXF file")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
 <key id="d0" for="graph" attr.name="settings" attr.type="string"/>
 <graph edgedefault="directed"><data key="d0">&lol9;</data><node id="input"/></graph>
</graphml>
"""


@pytest.mark.parametrize("suffix", [".graphml", ".gexf"])
def test_billion_laughs(tmp_path, capsys, suffix):
    path = tmp_path / f"laughs{suffix}"
    text = (
        BILLION_LAUGHS
        if suffix == ".graphml"
        else BILLION_LAUGHS.replace(
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">', '<gexf xmlns="http://www.gexf.net/1.2draft">'
        ).replace("</graphml>", "</gexf>")
    )
    path.write_text(text)
    refused(path, capsys, "DTD")


def test_external_entity(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    path = tmp_path / "xxe.graphml"
    path.write_text(f"""<?xml version="1.0"?>
<!DOCTYPE graphml [<!ENTITY xxe SYSTEM "file://{secret}">]>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
 <key id="d0" for="graph" attr.name="settings" attr.type="string"/>
 <graph edgedefault="directed"><data key="d0">&xxe;</data><node id="input"/></graph>
</graphml>
""")
    err = refused(path, capsys, "DTD")
    assert "TOP-SECRET" not in err


def test_deeply_nested_dot(tmp_path, capsys):
    path = tmp_path / "nested.dot"
    depth = 10_000
    path.write_text("digraph circuit {" + "subgraph {" * depth + "}" * depth + "}\n")
    refused(path, capsys, "nested")


def test_deeply_nested_json(tmp_path, capsys):
    path = tmp_path / "nested.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    refused(path, capsys, "not a valid node-link JSON")


def test_dot_parse_error_prints_nothing_but_the_error(tmp_path, capsys):
    path = tmp_path / "garbage.dot"
    path.write_text("digraph circuit { a -> ; [[ }\n")
    refused(path, capsys, "not a valid DOT")


def _node_link(saved) -> dict:
    return json.loads(saved[".json"].read_text())


@pytest.mark.parametrize(
    "value, fragment",
    [
        (1000, "n_layers"),
        (1e300, "n_layers"),
        (-1, "n_layers"),
        ("abc", "n_layers"),
        (0, "n_layers"),
        (3.5, "n_layers"),
        (True, "n_layers"),
        (None, "n_layers"),
        ([3], "n_layers"),
        (int("9" * 400), "n_layers"),
    ],
)
def test_json_with_bad_layer_count(tmp_path, capsys, saved, value, fragment):
    data = _node_link(saved)
    data["graph"]["n_layers"] = value
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, fragment, seconds=5.0)


@pytest.mark.parametrize(
    "key, value",
    [
        ("n_heads", 1_000_000),
        ("n_heads", 0),
        ("n_kv_heads", 3),
        ("n_kv_heads", 0),
        ("n_pos", 10**12),
        ("n_pos", 0),
    ],
)
def test_json_with_bad_shape_attribute(tmp_path, capsys, saved, key, value):
    data = _node_link(saved)
    data["graph"][key] = value
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, key, seconds=5.0)


def test_a_small_file_cannot_declare_a_huge_graph(tmp_path, capsys, saved):
    """The issue's case: 100 KB of JSON declaring 1000 layers took 5.5 GB and 37 s."""
    data = _node_link(saved)
    data["graph"].update(n_layers=1000, n_heads=12)
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, "too large", seconds=5.0)


def test_missing_graph_attribute(tmp_path, capsys, saved):
    data = _node_link(saved)
    del data["graph"]["n_heads"]
    path = tmp_path / "no_heads.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, "n_heads")


@pytest.mark.parametrize(
    "damage",
    [
        "no nodes key",
        "nodes not a list",
        "edge without target",
        "edge list of ints",
        "graph not a dict",
        "top level list",
        "settings not JSON",
        "settings a list",
    ],
)
def test_node_link_json_with_missing_keys_or_wrong_types(tmp_path, capsys, saved, damage):
    data = _node_link(saved)
    if damage == "no nodes key":
        del data["nodes"]
    elif damage == "nodes not a list":
        data["nodes"] = 5
    elif damage == "edge without target":
        del data["edges"][3]["target"]
    elif damage == "edge list of ints":
        data["edges"] = [1, 2, 3]
    elif damage == "graph not a dict":
        data["graph"] = "n_layers=3"
    elif damage == "top level list":
        data = [data]
    elif damage == "settings not JSON":
        data["graph"]["settings"] = "{not json"
    else:
        data["graph"]["settings"] = "[1, 2]"
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    refused(path, capsys)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("score not a number", "score"),
        ("in_circuit missing", "in_circuit"),
        ("score missing", "score"),
    ],
)
def test_edge_attributes_with_wrong_types(tmp_path, capsys, saved, damage, fragment):
    data = _node_link(saved)
    edge = next(e for e in data["edges"] if not e["structural"])
    if damage == "score not a number":
        edge["score"] = "abc"
    elif damage == "in_circuit missing":
        del edge["in_circuit"]
    else:
        del edge["score"]
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, fragment)


@pytest.mark.parametrize("damage", ["edge removed", "edge added", "node added", "heads changed"])
def test_edges_that_do_not_match_the_declared_shape(tmp_path, capsys, saved, damage):
    data = _node_link(saved)
    if damage == "edge removed":
        data["edges"] = [e for e in data["edges"] if (e["source"], e["target"]) != ("a0.1", "a1.2<v>")]
    elif damage == "edge added":
        data["edges"].append(
            {"source": "a2.3", "target": "a0.0<q>", "score": 0.0, "in_circuit": True, "structural": False}
        )
    elif damage == "node added":
        data["nodes"].append({"id": "a9.9", "layer": 9, "head": 9, "kind": "head", "score": 0.0, "in_circuit": False})
    else:
        data["graph"].update(n_heads=2, n_kv_heads=2)
    path = tmp_path / "mismatch.json"
    path.write_text(json.dumps(data))
    refused(path, capsys, "declared shape")


@pytest.mark.parametrize("damage", ["per-position list too short", "per-position list not JSON"])
def test_per_position_attributes(tmp_path, capsys, damage):
    graph = ModelGraph(2, 2, n_pos=3)
    scores = torch.randn(graph.n_edges, 3, generator=torch.Generator().manual_seed(1))
    path = Circuit(graph, scores > 1, scores).save(tmp_path / "pos.json")
    data = json.loads(path.read_text())
    edge = next(e for e in data["edges"] if not e["structural"])
    edge["in_circuit_pos"] = "[true]" if damage == "per-position list too short" else "[true, "
    path.write_text(json.dumps(data))
    refused(path, capsys, "in_circuit_pos")


def test_gexf_with_bad_graph_attributes(tmp_path, capsys, saved):
    text = saved[".gexf"].read_text()
    path = tmp_path / "bad.gexf"
    path.write_text(re.sub(r'<graph ([^>]*)name="[^"]*"', r'<graph \1name="not json"', text, count=1))
    refused(path, capsys, "GEXF")


def test_dot_with_non_numeric_attribute(tmp_path, capsys, saved):
    path = tmp_path / "bad.dot"
    path.write_text(saved[".dot"].read_text().replace('n_layers="3"', 'n_layers="three"'))
    refused(path, capsys, "n_layers")


def test_file_larger_than_the_limit(tmp_path, capsys):
    from circuitfind.circuits import graph_io as graph

    path = tmp_path / "huge.graphml"
    with open(path, "wb") as fh:  # sparse: no disk or memory used
        fh.truncate(graph.MAX_GRAPH_FILE_BYTES + 1)
    refused(path, capsys, "larger than")


def test_missing_file_and_directory(tmp_path, capsys):
    refused(tmp_path / "missing.graphml", capsys, "no such file")
    folder = tmp_path / "folder.graphml"
    folder.mkdir()
    refused(folder, capsys, "not a file")


def test_good_files_still_load(saved, circuit):
    for path in saved.values():
        back = Circuit.load(path)
        assert torch.equal(back.in_circuit, circuit.in_circuit) and torch.equal(back.scores, circuit.scores)


def test_compare_command_refuses_a_hostile_reference(tmp_path, capsys, saved):
    path = tmp_path / "ref.graphml"
    path.write_text(BILLION_LAUGHS)
    assert main(["compare", str(saved[".json"]), str(saved[".dot"]), "--reference", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and str(path) in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_subprocess_prints_no_traceback(tmp_path, saved):
    bad = tmp_path / "truncated.graphml"
    data = saved[".graphml"].read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    for command in (["compare", str(bad), str(saved[".json"])], ["export", str(bad), str(tmp_path / "x.dot")]):
        proc = subprocess.run(
            [sys.executable, "-m", "circuitfind", *command], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("circuitfind: error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_model_graph_refuses_shapes_too_large_to_build():
    """Every graph (from files, run records or the API) is bounded before its edges are allocated."""
    start = time.monotonic()
    for shape in [(1000, 12), (10**9, 1), (4, 10**7)]:
        with pytest.raises(ValueError, match="too large"):
            ModelGraph(*shape)
    for bad in [dict(n_layers=0, n_heads=4), dict(n_layers=2, n_heads=0), dict(n_layers=2, n_heads=4, n_pos=0)]:
        with pytest.raises(ValueError):
            ModelGraph(**bad)
    assert time.monotonic() - start < 2.0


# -- non-finite and oversized numbers, and counts checked while scanning (issue 19) -----------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_node_link_json_with_a_non_finite_score_is_refused(tmp_path, capsys, saved, value):
    obj = _node_link(saved)
    obj["edges"][0]["score"] = value  # json.dumps writes NaN / Infinity, which json.loads accepts
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    refused(path, capsys, "score", "not a finite number")


def test_graphml_score_that_overflows_to_inf_is_refused(tmp_path, capsys, saved):
    text = saved[".graphml"].read_text()
    score_key = re.search(r'<key id="(d\d+)" for="edge" attr.name="score"', text).group(1)
    text = re.sub(rf'(<data key="{score_key}">)[^<]*(</data>)', r"\g<1>1e400\g<2>", text, count=1)
    path = tmp_path / "bad.graphml"
    path.write_text(text)
    refused(path, capsys, "attribute score: inf is not a finite number")


def test_a_4001_digit_integer_score_is_one_line(tmp_path, capsys, saved):
    obj = _node_link(saved)
    obj["edges"][0]["score"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj).replace('"score": 0,', '"score": ' + "9" * 4001 + ",", 1))
    refused(path, capsys, "score", "not a finite number")


def _padded_graphml(saved, extra: int) -> str:
    """The saved GraphML with ``extra`` nodes beyond its declared 3x4 shape, before its edges."""
    text = saved[".graphml"].read_text()
    first_edge = text.index("<edge ")
    padding = "".join(f'<node id="x{i}"/>\n' for i in range(extra))
    return text[:first_edge] + padding + text[first_edge:]


def test_graphml_with_nodes_beyond_its_declared_shape_stops_early(tmp_path, capsys, saved):
    path = tmp_path / "big.graphml"
    path.write_text(_padded_graphml(saved, 200_000))
    err = refused(path, capsys, "more than 53 <node> elements", "declared shape has 53 nodes", seconds=2.0)
    at = int(re.search(r"refused at byte (\d+) of (\d+)", err).group(1))
    assert at < path.stat().st_size / 10  # stopped at the first node beyond the shape, not at the end


def test_graphml_with_one_node_too_many_is_refused(tmp_path, capsys, saved):
    path = tmp_path / "big.graphml"
    path.write_text(_padded_graphml(saved, 1))
    refused(path, capsys, "more than 53 <node> elements")


def test_dot_with_statements_beyond_its_declared_shape_is_refused_before_pydot(tmp_path, capsys, saved):
    text = saved[".dot"].read_text()
    padded = text.replace("\n}", "\n" + "".join(f'  "x{i}" [kind="head"];\n' for i in range(50_000)) + "}")
    path = tmp_path / "big.dot"
    path.write_text(padded)
    assert len(padded) < 4 * 2**20  # within the DOT size limit: pydot alone would take about a minute
    refused(path, capsys, "statements, more than the", "refused before parsing", seconds=2.0)


def test_dot_with_edges_beyond_its_declared_shape_is_refused(tmp_path, capsys, saved):
    text = saved[".dot"].read_text()
    path = tmp_path / "big.dot"
    path.write_text(text.replace("\n}", '\n  "m0" -> "x" [score="0.0"];\n}'))
    refused(path, capsys, "edge arrows, more than the")


def test_node_link_json_with_nodes_beyond_its_declared_shape(tmp_path, capsys, saved):
    obj = _node_link(saved)
    obj["nodes"] += [{"id": f"x{i}"} for i in range(10)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(obj))
    refused(path, capsys, "63 nodes: more than the 53 of the declared shape")


def test_graphml_with_a_comment_is_still_counted_before_parsing(tmp_path, capsys, saved):
    """A comment once turned the count off: 200,000 extra nodes then reached the parser (3.1 GB)."""
    path = tmp_path / "big.graphml"
    text = _padded_graphml(saved, 200_000)
    path.write_text(text.replace("<graph ", '<!-- a comment with <node id="c"/> inside -->\n<graph ', 1))
    refused(path, capsys, "more than 53 <node> elements", seconds=2.0)


def test_graphml_with_the_graph_data_before_its_nodes_is_counted(tmp_path, capsys, saved):
    """Valid GraphML may give the graph's <data> before its nodes; the declared shape is read there too."""
    text = _padded_graphml(saved, 200_000)
    graph_data = re.findall(r'<data key="d\d+">[^<]*</data>\s*(?=</graph>|<data)', text[text.rindex("</edge>") :])
    assert graph_data, "the saved GraphML has graph attributes after its edges"
    tail = text[text.rindex("</edge>") :]
    for d in graph_data:
        tail = tail.replace(d, "", 1)
    head = text[: text.rindex("</edge>")]
    at = head.index(">", head.index("<graph ")) + 1
    moved = head[:at] + "\n" + "".join(graph_data) + head[at:] + tail
    path = tmp_path / "early.graphml"
    path.write_text(moved)
    refused(path, capsys, "more than 53 <node> elements", seconds=2.0)
    good = tmp_path / "good.graphml"
    good_text = saved[".graphml"].read_text()
    good_head, good_tail = good_text[: good_text.rindex("</edge>")], good_text[good_text.rindex("</edge>") :]
    for d in graph_data:
        good_tail = good_tail.replace(d, "", 1)
    at = good_head.index(">", good_head.index("<graph ")) + 1
    good.write_text(good_head[:at] + "".join(graph_data) + good_head[at:] + good_tail)
    assert Circuit.load(good).graph.n_edges == Circuit.load(saved[".graphml"]).graph.n_edges
