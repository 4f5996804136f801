"""The layered layout of a circuit, shared by the explorer page and ``circuitfind draw``.

Rows are the residual stream's order: ``input`` at the bottom, then one row per layer (its heads in
head order, its MLP at the row's end), ``logits`` at the top. Positions come from networkx's
:func:`networkx.multipartite_layout` (one subset per row, rows stacked), on the components only;
a head's q/k/v receivers sit just below their head, and a grouped-query key/value group's k and v
below the middle of the heads that share them, so an edge into a head's query lands at that head.

Coordinates are in grid units, y upwards: column spacing 1, row spacing 1, ``input`` at y = 0.
:func:`collapsed_positions` is the same layout with each layer's heads merged into one node
(:func:`circuitfind.names.attention_layer_name`).
"""

from __future__ import annotations

import networkx as nx

from circuitfind.circuits.graph import ModelGraph
from circuitfind.names import INPUT, LOGITS, attention_layer_name, head_name, mlp_name

RECEIVER_DROP = 0.28  # how far below its head a q receiver sits (rows)
GROUP_DROP = 0.5  # ... and a grouped-query k/v receiver
RECEIVER_SPREAD = 0.22  # horizontal offset of k and v from their centre (columns)


def _rows(rows: list[list[str]]) -> dict[str, tuple[float, float]]:
    """Grid positions of ``rows`` (bottom first) from networkx's multipartite layout, rescaled so that
    neighbours in a row are 1 apart and rows are 1 apart, the first row at y = 0."""
    g = nx.Graph()
    for row in rows:
        g.add_nodes_from(row)
    # rows as a mapping of lists keeps each row's order (a node attribute would group them into sets)
    pos = nx.multipartite_layout(g, subset_key=dict(enumerate(rows)), align="horizontal")
    first, second = rows[0][0], rows[1][0]
    unit = pos[second][1] - pos[first][1]  # the row spacing (its sign says which way the layout stacks)
    base = pos[first][1]
    return {n: (float(p[0]) / abs(unit), float(p[1] - base) / unit) for n, p in pos.items()}


def positions(graph: ModelGraph) -> dict[str, tuple[float, float]]:
    """Grid positions of every node of ``graph``: components and q/k/v receivers."""
    layers = [[*(head_name(l, h) for h in range(graph.n_heads)), mlp_name(l)] for l in range(graph.n_layers)]
    pos = _rows([[INPUT], *layers, [LOGITS]])
    offsets = {"q": -RECEIVER_SPREAD, "k": 0.0, "v": RECEIVER_SPREAD}
    for receiver in graph.receivers:
        if receiver.kind not in ("q", "k", "v"):
            continue
        xs = [pos[h][0] for h in receiver.feeds]
        x, y = sum(xs) / len(xs), pos[receiver.feeds[0]][1]
        if len(receiver.feeds) > 1:  # a grouped-query k/v input: below the middle of its group
            pos[receiver.name] = (x + (RECEIVER_SPREAD if receiver.kind == "v" else -RECEIVER_SPREAD), y - GROUP_DROP)
        else:
            pos[receiver.name] = (x + offsets[receiver.kind], y - RECEIVER_DROP)
    return pos


def collapsed_positions(n_layers: int) -> dict[str, tuple[float, float]]:
    """Grid positions with each layer's heads merged (``a{l}.*``): one row per layer, attention then MLP."""
    rows = [[INPUT], *([attention_layer_name(l), mlp_name(l)] for l in range(n_layers)), [LOGITS]]
    return _rows(rows)
