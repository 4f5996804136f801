"""``circuitfind draw``: a circuit as a publication figure (PDF, SVG or PNG) with matplotlib.

The layout is the explorer's (:mod:`circuitfind.reports.layout`): input at the bottom, one row per layer
(heads in order, the MLP at the row's end), logits at the top, a head's q/k/v inputs just below it. Only the
components the circuit touches are labelled. Edge width grows with ``|score|`` (square root, so weak
edges stay visible) and colour gives its sign; the legend says so. When every score is zero the title says
that widths and colours carry no ranking.
"""

from __future__ import annotations

import math
from pathlib import Path

from circuitfind.circuits.circuit import Circuit
from circuitfind.io import write_bytes
from circuitfind.reports import layout

FORMATS = {".pdf": "pdf", ".svg": "svg", ".png": "png"}
POSITIVE, NEGATIVE, ZERO = "#2166ac", "#b2182b", "#9a9a9a"


def check_suffix(out: str | Path) -> str:
    """The figure format named by ``out``'s suffix; ``ValueError`` in one line for any other."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"--out {str(out)!r}: name the figure *.pdf, *.svg or *.png (got {Path(out).suffix or 'no suffix'!r})"
        )
    return fmt


def default_title(circuit: Circuit) -> str:
    """What the circuit is, in one line (``Circuit.summary`` lists every head: too long for a title)."""
    settings = circuit.settings
    how = ", ".join(str(settings[k]) for k in ("model", "task", "corruption", "metric", "direction") if settings.get(k))
    name = str(settings.get("algorithm", "circuit")) + (f" ({how})" if how else "")
    return f"{name}: {circuit.n_edges} of {circuit.graph.n_edges} edges, {len(circuit.components)} components"


def draw_circuit(circuit: Circuit, out: str | Path, title: str | None = None) -> Path:
    """Draw ``circuit`` into ``out`` (format by suffix), atomically; returns the path."""
    fmt = check_suffix(out)
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    graph = circuit.graph
    if not graph.split_qkv:
        raise ValueError(
            f"{circuit.settings.get('algorithm', 'circuit')}: draw needs a graph with separate q/k/v inputs"
        )
    pos = layout.positions(graph)
    edges = circuit.edges
    scores = None
    if circuit.scores is not None:
        flat = circuit.scores.sum(-1) if circuit.scores.dim() == 2 else circuit.scores
        lookup = graph.edge_lookup
        scores = [float(flat[lookup[e]]) for e in edges]
    values = [abs(s) for s in scores or [] if math.isfinite(s)]
    top = max(values, default=0.0)
    all_zero = scores is None or top == 0.0
    receivers = {r.name: r for r in graph.receivers}
    used = {n for e in edges for n in e}
    for name in list(used):
        r = receivers.get(name)
        if r is not None and r.kind in ("q", "k", "v"):
            used.update(r.feeds)

    xs = [p[0] for p in pos.values()]
    width = min(22.0, max(6.0, 0.75 * (max(xs) - min(xs) + 2)))
    height = min(28.0, max(4.5, 0.55 * (graph.n_layers + 2)))
    fig, ax = plt.subplots(figsize=(width, height))
    for i, (sender, receiver) in enumerate(edges):
        score = scores[i] if scores is not None else 0.0
        colour = ZERO if all_zero or score == 0 or not math.isfinite(score) else (POSITIVE if score > 0 else NEGATIVE)
        lw = 1.0 if all_zero or not math.isfinite(score) else 0.3 + 3.2 * math.sqrt(min(abs(score), top) / top)
        (x1, y1), (x2, y2) = pos[sender], pos[receiver]
        ax.plot([x1, x2], [y1, y2], color=colour, lw=lw, alpha=0.7, solid_capstyle="round", zorder=1, gid=f"edge-{i}")
    for name in used:  # a q/k/v input feeds its head (every head of a grouped-query group)
        r = receivers.get(name)
        if r is not None and r.kind in ("q", "k", "v"):
            for head in r.feeds:
                (x1, y1), (x2, y2) = pos[name], pos[head]
                ax.plot([x1, x2], [y1, y2], color="#bbbbbb", lw=0.6, ls=":", zorder=1)
    for name in sorted(used):
        x, y = pos[name]
        r = receivers.get(name)
        if r is not None and r.kind in ("q", "k", "v"):
            ax.scatter([x], [y], s=12, color="white", edgecolors="#555555", linewidths=0.6, zorder=3)
            continue
        kind = "mlp" if name.startswith("m") else ("end" if name in ("input", "logits") else "head")
        face = {"mlp": "#f3e9d2", "end": "#e0e0e0", "head": "#e8eef7"}[kind]
        ax.text(
            x,
            y,
            name,
            ha="center",
            va="center",
            fontsize=8 if kind != "end" else 9,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.25", "fc": face, "ec": "#6b7a90", "lw": 0.6},
        )
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(-0.7, graph.n_layers + 1.7)
    ax.set_yticks(range(1, graph.n_layers + 1), [f"layer {l}" for l in range(graph.n_layers)], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    heading = title if title is not None else default_title(circuit)
    if all_zero:
        heading += "\n(every score is zero: widths and colours carry no ranking)"
    ax.set_title(heading, fontsize=10, loc="left", wrap=True)
    handles = [
        Line2D([], [], color=POSITIVE, lw=2.5, label="positive score"),
        Line2D([], [], color=NEGATIVE, lw=2.5, label="negative score"),
        Line2D([], [], color=ZERO, lw=1, label="zero score"),
        Line2D([], [], color="#bbbbbb", lw=0.8, ls=":", label="q/k/v input to its head"),
    ]
    note = "" if all_zero else f"; width grows with |score| (widest {top:.3g})"
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
        title=f"{len(edges)} edges{note}",
        title_fontsize=8,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable and editable
        fig.savefig(buffer, format=fmt, dpi=200 if fmt == "png" else None)
    plt.close(fig)
    return write_bytes(out, buffer.getvalue())
