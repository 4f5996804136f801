"""The vocabulary: every name the edge graph builds parses back to its parts, and hook names round-trip."""

import pytest

from circuitfind import names
from circuitfind.circuits.graph import ModelGraph
from circuitfind.names import Node, parse_node


def test_node_names_format_and_parse():
    assert names.head_name(3, 7) == "a3.7" and parse_node("a3.7") == Node("head", 3, 7)
    assert names.mlp_name(2) == "m2" and parse_node("m2") == Node("mlp", 2)
    assert names.kv_group_name(1, 0) == "a1.g0" and parse_node("a1.g0") == Node("group", 1, 0)
    assert names.receiver_node("a1.2", "q") == "a1.2<q>" and parse_node("a1.2<q>") == Node("head", 1, 2, "q")
    assert parse_node("a1.g0<k>") == Node("group", 1, 0, "k")
    assert parse_node(names.INPUT) == Node("input", -1) and parse_node(names.LOGITS) == Node("logits", None)
    for bad in ("a1", "m1<q>", "logits<q>", "x1.2", "a1.2<z>", "a1.2.3", ""):
        with pytest.raises(ValueError, match="not a node name"):
            parse_node(bad)
    assert (
        names.is_head("a10.3") and not names.is_head("a1.g0") and not names.is_head("m1") and not names.is_head("input")
    )
    assert sorted(["a10.0", "a2.11", "a2.3"], key=names.head_sort_key) == ["a2.3", "a2.11", "a10.0"]


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layers=3, n_heads=4),
        dict(n_layers=2, n_heads=4, n_kv_heads=2),
        dict(n_layers=2, n_heads=3, split_qkv=False),
    ],
)
def test_every_graph_name_parses_to_its_layer(shape):
    graph = ModelGraph(**shape)
    for sender in graph.senders:
        node = parse_node(sender)
        assert node.input is None and node.kind in ("input", "head", "mlp")
    for r in graph.receivers:
        node = parse_node(r.name)
        assert node.layer == (None if r.kind == "logits" else r.layer)
        assert node.input == (r.kind if r.kind in names.QKV else None)


def test_hook_names_round_trip():
    for what in (
        "resid_pre",
        "attn_out",
        "mlp_out",
        "resid_post",
        "z",
        "result",
        "pattern",
        "q_input",
        "k_input",
        "v_input",
        "mlp_in",
    ):
        assert names.parse_hook(names.hook_name(5, what)) == (5, what)
    assert names.hook_name(0, "z") == "blocks.0.attn.hook_z" and names.hook_name(2, "mlp_in") == "blocks.2.hook_mlp_in"
    assert names.parse_hook("hook_embed") is None and names.parse_hook("blocks.0.attn.hook_resid_pre") is None
    with pytest.raises(ValueError, match="unknown activation"):
        names.hook_name(0, "nope")
