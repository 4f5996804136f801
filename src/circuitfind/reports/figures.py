"""Small dependency-free SVG figures for the reports: heatmaps, circuit drawings, line charts, interval bars."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape

from circuitfind.names import INPUT, LOGITS, head_name, mlp_name, parse_node

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _svg(width: float, height: float, body: Iterable[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>"
    )


def _blue(v: float) -> str:
    """White (0) to dark blue (1)."""
    v = 0.0 if math.isnan(v) else min(max(v, 0.0), 1.0)
    r, g, b = (int(255 - (255 - c) * v) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def heatmap(values: Sequence[Sequence[float]], labels: Sequence[str], title: str = "", cell: int = 34) -> str:
    """A square matrix of values in [0, 1] with row/column labels (columns numbered, rows named)."""
    n = len(labels)
    left, top = max(8 * max((len(s) for s in labels), default=4), 60) + 30, 40
    body = [f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>']
    for j in range(n):
        body.append(
            f'<text x="{left + j * cell + cell / 2}" y="{top - 6}" text-anchor="middle" font-size="{9 if cell < 20 else 11}">{j}</text>'
        )
    for i, label in enumerate(labels):
        y = top + i * cell
        body.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">{i}: {escape(label)}</text>')
        for j in range(n):
            v = float(values[i][j])
            x = left + j * cell
            colour = "white" if v > 0.55 else "black"
            text = "nan" if math.isnan(v) else f"{v:.2f}"
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_blue(v)}" stroke="#ddd">'
                f"<title>{escape(labels[i])} / {escape(labels[j])}: {text}</title></rect>"
            )
            if cell >= 26:  # values as text only where they fit; the tooltip always has them
                body.append(
                    f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" fill="{colour}" font-size="9">{text}</text>'
                )
    return _svg(left + n * cell + 10, top + n * cell + 10, body)


def _targets(receiver: str, n_heads: int, n_kv_heads: int) -> list[str]:
    """The drawn components a receiver feeds: its head (``a1.2<q>`` -> ``a1.2``), every head of a
    grouped-query k/v group (``a1.g0<k>`` -> ``a1.0``, ``a1.1`` with 4 heads in 2 groups), or itself."""
    node = parse_node(receiver)
    if node.kind == "group":
        size = n_heads // n_kv_heads
        return [head_name(node.layer, h) for h in range(node.index * size, (node.index + 1) * size)]
    return [head_name(node.layer, node.index) if node.kind == "head" else receiver]


def circuit_drawing(
    n_layers: int,
    n_heads: int,
    edges: Iterable[tuple[str, str]],
    shared: set[tuple[str, str]],
    title: str = "",
    node_gap: int = 22,
    layer_gap: int = 90,
    n_kv_heads: int | None = None,
) -> str:
    """Heads and MLPs by layer (columns), circuit edges coloured: shared with the consensus (dark) or
    found only under this setting (orange). q/k/v receivers are drawn into their head; a grouped-query
    k/v receiver (``a1.g0<k>``, with ``n_kv_heads`` groups) into every head of its group. Each line
    carries its edge as a tooltip."""
    pos: dict[str, tuple[float, float]] = {}
    top = 46
    pos[INPUT] = (30, top + node_gap * (n_heads + 1) / 2)
    for layer in range(n_layers):
        column = 30 + layer_gap * (layer + 1)
        for h in range(n_heads):
            pos[head_name(layer, h)] = (column, top + node_gap * h)
        pos[mlp_name(layer)] = (column + layer_gap / 2, top + node_gap * (n_heads + 0.5))
    pos[LOGITS] = (30 + layer_gap * (n_layers + 1), top + node_gap * (n_heads + 1) / 2)
    body = [f'<text x="10" y="16" font-weight="bold">{escape(title)}</text>']
    used: set[str] = set()
    lines = []
    for s, r in edges:
        if s not in pos:
            continue
        colour, stroke = ("#333", 1.6) if (s, r) in shared else ("#ff7f0e", 1.6)
        kind = parse_node(r).input or ""
        dash = {"k": ' stroke-dasharray="4,2"', "v": ' stroke-dasharray="1,2"'}.get(kind, "")
        for target in _targets(r, n_heads, n_kv_heads or n_heads):
            if target not in pos:
                continue
            used.update((s, target))
            (x1, y1), (x2, y2) = pos[s], pos[target]
            lines.append(
                f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" stroke-width="{stroke}" opacity="0.8"{dash}>'
                f"<title>{escape(s)} -&gt; {escape(r)}</title></line>"
            )
    body += lines
    for name, (x, y) in pos.items():
        fill = "#9ecae1" if name in used else "#f0f0f0"
        mlp = parse_node(name).kind == "mlp"  # MLPs are squares, the rest circles
        shape = (
            f'<rect x="{x - 7}" y="{y - 7}" width="14" height="14" fill="{fill}" stroke="#555">'
            if mlp
            else f'<circle cx="{x}" cy="{y}" r="7" fill="{fill}" stroke="#555">'
        )
        body.append(shape + f"<title>{escape(name)}</title>" + ("</rect>" if mlp else "</circle>"))
        if name in used or name in (INPUT, LOGITS):
            body.append(f'<text x="{x}" y="{y - 10}" text-anchor="middle" font-size="9">{escape(name)}</text>')
    width = 60 + layer_gap * (n_layers + 1)
    height = top + node_gap * (n_heads + 2)
    return _svg(width, height, body)


def interval_bars(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    title: str = "",
    xlabel: str = "",
    width: int = 460,
) -> str:
    """Horizontal bars in [0, 1] with interval whiskers (NaN bounds: no whisker), one row per label."""
    left, top, row = max(60, 8 * max((len(s) for s in labels), default=4) + 10), 30, 24
    plot = width - left - 50

    def px(v: float) -> float:
        return left + min(max(v, 0.0), 1.0) * plot

    body = [f'<text x="10" y="16" font-weight="bold">{escape(title)}</text>']
    for i, (label, v, lo, hi) in enumerate(zip(labels, values, lows, highs, strict=True)):
        y = top + i * row
        body.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(label)}</text>')
        if not math.isnan(v):
            body.append(
                f'<rect x="{left}" y="{y + 4}" width="{px(v) - left:.1f}" height="{row - 8}" fill="{PALETTE[0]}">'
                f"<title>{escape(label)}: {v:.3f}</title></rect>"
            )
            end = max(v, hi) if not math.isnan(hi) else v  # the value right of its whisker
            body.append(f'<text x="{px(end) + 4:.1f}" y="{y + 15}" font-size="9">{v:.2f}</text>')
        if not (math.isnan(lo) or math.isnan(hi)):
            body.append(
                f'<line x1="{px(lo):.1f}" y1="{y + row / 2}" x2="{px(hi):.1f}" y2="{y + row / 2}" stroke="#222" stroke-width="1.5"/>'
            )
    axis_y = top + len(labels) * row + 4
    body.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot}" y2="{axis_y}" stroke="#999"/>')
    for v in (0.0, 0.5, 1.0):
        body.append(f'<text x="{px(v)}" y="{axis_y + 12}" text-anchor="middle" font-size="9">{v:.1f}</text>')
    body.append(f'<text x="{left + plot / 2}" y="{axis_y + 26}" text-anchor="middle">{escape(xlabel)}</text>')
    return _svg(width, axis_y + 34, body)


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    width: int = 560,
    height: int = 300,
    *,
    fit_y: bool = False,
    integer_x: bool = False,
) -> str:
    """Lines over a shared x axis, with a legend (x and y ranges from the data).

    By default the y axis spans at least 0-1 (normalised scores); ``fit_y`` fits it to the data
    (with 5% margins), so small curves stay readable. ``integer_x`` puts ticks on whole numbers
    (layers), at most about ten of them."""
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv if not math.isnan(y)]
    if not xs or not ys:
        return _svg(width, 40, [f'<text x="10" y="20">{escape(title)}: no data</text>'])
    x0, x1 = min(xs), max(xs)
    if fit_y:
        margin = 0.05 * ((max(ys) - min(ys)) or abs(max(ys)) or 1.0)
        y0, y1 = min(ys) - margin, max(ys) + margin
    else:
        y0, y1 = min(min(ys), 0.0), max(max(ys), 1.0)
    left, right, top, bottom = 50, 190, 30, 40
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y):
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    body = [
        f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">{escape(ylabel)}</text>',
    ]
    for v in (y0, (y0 + y1) / 2, y1):
        body.append(f'<text x="{left - 4}" y="{py(v) + 4}" text-anchor="end" font-size="9">{v:.2f}</text>')
    if integer_x:
        step = max(1, math.ceil((x1 - x0) / 10))
        xticks = [f"{v}" for v in range(math.ceil(x0), math.floor(x1) + 1, step)]
    else:
        xticks = [f"{v:.2f}" for v in (x0, (x0 + x1) / 2, x1)]
    for label in xticks:
        body.append(
            f'<text x="{px(float(label))}" y="{top + ph + 14}" text-anchor="middle" font-size="9">{label}</text>'
        )
    if y0 < 1 < y1 or y1 == 1:
        body.append(
            f'<line x1="{left}" y1="{py(1)}" x2="{left + pw}" y2="{py(1)}" stroke="#ccc" stroke-dasharray="3,3"/>'
        )
    for i, (name, (xv, yv)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv, strict=True) if not math.isnan(y))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        ly = top + 12 * i + 6
        body.append(
            f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 25}" y2="{ly}" stroke="{colour}" stroke-width="2"/>'
            f'<text x="{left + pw + 30}" y="{ly + 4}" font-size="9">{escape(name)}</text>'
        )
    return _svg(width, max(height, top + 12 * len(series) + 10), body)
