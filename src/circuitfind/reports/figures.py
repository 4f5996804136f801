"""The reports' figures, as inline SVG strings (one offline file, no JavaScript).

Charts (heatmaps with their colour scale, faithfulness and other line charts, interval bars, the
layer x layer score mass) are drawn with matplotlib, the library researchers use for papers, rendered
offline to SVG with text kept as text and fixed ids (``svg.hashsalt``, no date), so a report is
byte-for-byte reproducible. Each chart has a ``*_figure`` function returning the matplotlib
``Figure`` (what tests read: ticks, limits, colour scales) and one returning its SVG.

Circuit drawings (:func:`circuit_drawing`) are hand-placed SVG: one line per edge with the edge as its
tooltip; :func:`circuit_picture` is the one place the report turns a setting record into a picture.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from circuitfind.names import INPUT, LOGITS, head_name, mlp_name, parse_node

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _svg(width: float, height: float, body: Iterable[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>"
    )


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


def circuit_picture(
    record: Mapping[str, Any], shared: set[tuple[str, str]] | None = None, title: str | None = None
) -> str:
    """A setting record's circuit as a picture (SVG), every edge drawn: the one function the report
    calls, so the renderer can change in one place. ``shared``: edges drawn dark (the consensus), the
    rest orange."""
    edges = sorted(tuple(e) for e in record["edges"])  # a fixed order: the report is byte-for-byte reproducible
    return circuit_drawing(
        record["n_layers"],
        record["n_heads"],
        edges,
        set(edges) if shared is None else shared,
        title if title is not None else str(record.get("setting", "")),
        n_kv_heads=record.get("n_kv_heads"),
    )


# -- charts (matplotlib) ---------------------------------------------------------------------------

FONT_SIZE = 9


def number(value: float, digits: int = 2) -> str:
    """A number for a label: ``digits`` decimals, never ``-0.00`` (a negative that rounds to zero is 0)."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _new_figure(width: float, height: float) -> Figure:
    """A figure of this size in inches. Margins are set by hand (:func:`_axes`), not by a layout engine:
    constrained layout draws every figure twice, half a report's figure time."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _axes(fig: Figure, left: float, bottom: float, width: float, height: float):
    """Axes at a rectangle given in inches from the figure's lower left corner."""
    w, h = fig.get_size_inches()
    return fig.add_axes((left / w, bottom / h, width / w, height / h))


def _text_width(labels: Iterable[str], size: float = FONT_SIZE - 1) -> float:
    """About how wide (inches) the longest label is at this font size."""
    return 0.0068 * size * max((len(s) for s in labels), default=0)


def to_svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element: text as text, ids from a fixed salt, no date, so the
    same figure gives the same bytes."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "circuitfind", "svg.fonttype": "none", "font.size": FONT_SIZE}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :].strip()


def heatmap_figure(
    values: Sequence[Sequence[float]],
    labels: Sequence[str],
    title: str = "",
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "Blues",
    scale_label: str = "",
) -> Figure:
    """A square matrix with its colour scale: rows named (``i: label``), columns numbered; undefined
    cells grey and marked ``n/a``; values written in the cells while they fit (up to 12 rows)."""
    import numpy as np
    from matplotlib import colormaps

    data = np.array(values, dtype=float).reshape(len(labels), len(labels))
    n = len(labels)
    row_labels = [f"{i}: {label}" for i, label in enumerate(labels)]
    cell = min(0.34, 6.0 / max(n, 1))
    left, side = _text_width(row_labels) + 0.2, n * cell
    fig = _new_figure(left + side + 1.05, side + 0.75)
    ax = _axes(fig, left, 0.1, side, side)
    bar_ax = _axes(fig, left + side + 0.12, 0.1, 0.12, side)
    colours = colormaps[cmap].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colours, vmin=vmin, vmax=vmax, aspect="equal")
    ax.set_xticks(range(n), [str(j) for j in range(n)], fontsize=FONT_SIZE - 1)
    ax.set_yticks(range(n), row_labels, fontsize=FONT_SIZE - 1)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    fig.text(
        0.02 / fig.get_size_inches()[0], 1 - 0.08 / fig.get_size_inches()[1], title, fontsize=FONT_SIZE + 1, va="top"
    )
    bar = fig.colorbar(image, cax=bar_ax)
    bar.set_label(scale_label or title, fontsize=FONT_SIZE)
    bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    if n <= 12:
        span = (vmax - vmin) or 1.0
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                dark = not math.isnan(v) and (v - vmin) / span > 0.6
                ax.text(
                    j,
                    i,
                    "n/a" if math.isnan(v) else number(v),
                    ha="center",
                    va="center",
                    fontsize=FONT_SIZE - 2,
                    color="white" if dark else "black",
                )
    return fig


def heatmap(
    values: Sequence[Sequence[float]],
    labels: Sequence[str],
    title: str = "",
    cell: int = 0,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "Blues",
    scale_label: str = "",
) -> str:
    """:func:`heatmap_figure` as SVG (``cell`` is ignored: the figure sizes itself)."""
    return to_svg(heatmap_figure(values, labels, title, vmin=vmin, vmax=vmax, cmap=cmap, scale_label=scale_label))


def layer_mass_figure(panels: Mapping[str, Mapping[str, Any]], title: str = "") -> Figure:
    """Small multiples of a layer x layer matrix per setting (rows: sender layers, from the input;
    columns: receiver layers, to the logits), on one shared colour scale."""
    import numpy as np

    names = list(panels)
    cols = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    size, gap_x, gap_y, left, bottom, top_margin = 1.9, 0.65, 0.85, 0.65, 0.75, 0.45
    width = left + cols * size + (cols - 1) * gap_x + 1.3
    height = bottom + rows * size + (rows - 1) * gap_y + top_margin
    fig = _new_figure(width, height)
    from matplotlib.colors import PowerNorm

    top = max((float(np.max(p["share"])) for p in panels.values()), default=1.0) or 1.0
    norm = PowerNorm(0.5, vmin=0.0, vmax=top)  # square-root scale: the mass is concentrated in a few cells
    image = None
    axes = [
        _axes(fig, left + c * (size + gap_x), bottom + (rows - 1 - r) * (size + gap_y), size, size)
        for r in range(rows)
        for c in range(cols)
    ]
    for ax, name in zip(axes, names, strict=False):
        p = panels[name]
        data = np.array(p["share"], dtype=float)
        image = ax.imshow(data, cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
        step = max(1, math.ceil(len(p["rows"]) / 8))
        ax.set_yticks(range(0, len(p["rows"]), step), p["rows"][::step], fontsize=FONT_SIZE - 2)
        ax.set_xticks(range(0, len(p["columns"]), step), p["columns"][::step], fontsize=FONT_SIZE - 2, rotation=90)
        ax.set_title(name, fontsize=FONT_SIZE - 1)
        ax.set_xlabel("receiver layer", fontsize=FONT_SIZE - 1)
        ax.set_ylabel("sender layer", fontsize=FONT_SIZE - 1)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if image is not None:
        bar_ax = _axes(fig, width - 1.1, bottom, 0.14, rows * size + (rows - 1) * gap_y)
        bar = fig.colorbar(image, cax=bar_ax)
        bar.set_label("share of total |edge score| (square-root scale)", fontsize=FONT_SIZE)
        bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    if title:
        fig.text(0.02, 1 - 0.1 / height, title, fontsize=FONT_SIZE + 1, va="top")
    return fig


def layer_mass(panels: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """:func:`layer_mass_figure` as SVG."""
    return to_svg(layer_mass_figure(panels, title))


def interval_bars_figure(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    title: str = "",
    xlabel: str = "",
) -> Figure:
    """Horizontal bars in [0, 1] with interval whiskers (NaN bounds: no whisker), first label on top,
    each bar's value written beside it."""
    left = _text_width(labels, FONT_SIZE) + 0.25
    height = 0.34 * max(len(labels), 1)
    fig = _new_figure(left + 4.0, height + 0.95)
    ax = _axes(fig, left, 0.5, 3.7, height)
    ys = list(range(len(labels)))[::-1]
    for y, v, lo, hi in zip(ys, values, lows, highs, strict=True):
        if math.isnan(v):
            ax.text(0.01, y, "n/a", va="center", fontsize=FONT_SIZE - 1, color="#555")
            continue
        ax.barh(y, v, color=PALETTE[0], height=0.6)
        end = v
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.plot([lo, hi], [y, y], color="#222", linewidth=1.5)
            end = max(v, hi)
        ax.text(min(end, 0.9) + 0.02, y, number(v), va="center", fontsize=FONT_SIZE - 1)
    ax.set_yticks(ys, list(labels), fontsize=FONT_SIZE)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def interval_bars(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    title: str = "",
    xlabel: str = "",
    width: int = 0,
) -> str:
    """:func:`interval_bars_figure` as SVG (``width`` is ignored: the figure sizes itself)."""
    return to_svg(interval_bars_figure(labels, values, lows, highs, title, xlabel))


def line_chart_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    width: int = 560,
    height: int = 300,
    *,
    fit_y: bool = False,
    integer_x: bool = False,
    log_x: bool = False,
    reference: float | None = None,
) -> Figure:
    """Lines over a shared x axis, with a legend.

    By default the y axis spans at least 0-1 (normalised scores); ``fit_y`` fits it to the data, so
    small curves stay readable. ``integer_x`` puts ticks on whole numbers (layers), at most about ten.
    ``log_x``: a logarithmic x axis (fractions of edges from 0.1%: the first 10% is most of the story),
    ticks as percentages. ``reference``: a dashed horizontal line (1 = the full model)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    legend = _text_width(series) + 0.45 if len(series) else 0.0
    fig = _new_figure(width / 100 + legend, height / 100)
    ax = _axes(fig, 0.6, 0.5, width / 100 - 0.75, height / 100 - 0.82)
    ys_all = [y for _, yv in series.values() for y in yv if not math.isnan(y)]
    if not ys_all:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=FONT_SIZE + 1, loc="left")
        return fig
    for i, (name, (xv, yv)) in enumerate(series.items()):
        points = [(x, y) for x, y in zip(xv, yv, strict=True) if not math.isnan(y) and (x > 0 or not log_x)]
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            color=PALETTE[i % len(PALETTE)],
            marker="o" if log_x else None,
            markersize=2.5,
            linewidth=1.4,
            label=name,
        )
    if reference is not None:
        ax.axhline(reference, color="#999", linestyle="--", linewidth=0.8)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.001, 0.01, 0.1, 1.0]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    elif integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    if not fit_y:
        low, high = min(min(ys_all), 0.0), max(max(ys_all), 1.0)
        pad = 0.04 * (high - low)
        ax.set_ylim(low - pad, high + pad)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: number(v, _decimals(ax))))
    ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.set_title(title, fontsize=FONT_SIZE + 1, loc="left")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=FONT_SIZE - 1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _decimals(ax) -> int:
    """Decimals that tell the y ticks apart (their spacing's first significant digit)."""
    ticks = ax.get_yticks()
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    return max(0, -math.floor(math.log10(step))) if step > 0 else 2


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
    log_x: bool = False,
    reference: float | None = None,
) -> str:
    """:func:`line_chart_figure` as SVG."""
    fig = line_chart_figure(
        series,
        xlabel,
        ylabel,
        title,
        width,
        height,
        fit_y=fit_y,
        integer_x=integer_x,
        log_x=log_x,
        reference=reference,
    )
    return to_svg(fig)
