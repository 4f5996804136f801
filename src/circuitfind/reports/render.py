"""Rendering shared by every circuitfind report (sweep, study, run-vs-run diff): one structure,
two outputs, a self-contained HTML page and Markdown (for a Prefect artifact or a terminal).

A report is a title and a list of :class:`Section`; a section holds blocks, each with an HTML
and a Markdown form. Build blocks with :func:`table`, :func:`text`, :func:`figure` (and
:func:`figures` for a row of them), sections with :func:`section`, and render the whole with
:func:`html_page` or :func:`markdown_page`::

    from circuitfind.reports import render as R

    sections = [R.section("Settings", R.text("Two settings."), R.table(["setting", "edges"], [["a", 3], ["b", 4]]))]
    html = R.html_page("My report", sections)  # a contents list at the top, the CSS inline
    markdown = R.markdown_page("My report", sections)

Cells are formatted by :func:`fmt` (floats with three decimals, never ``-0.000``; NaN and ``None`` as ``n/a``) and escaped
in HTML; a :class:`Markup` cell carries its own HTML. Figures are SVG strings (see :mod:`circuitfind.reports.figures`); Markdown shows their caption.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:12px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right}h2{border-bottom:2px solid #333;margin-top:32px;overflow:hidden}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.card{border:1px solid #ddd;padding:4px;display:inline-block;vertical-align:top}
.caption{font-size:12px;color:#555;margin:2px 0 10px}nav.contents{background:#f7f7f7;border:1px solid #ddd;padding:6px 16px;float:right;margin:0 0 12px 20px;max-width:360px;font-size:13px}
nav.contents ul{margin:4px 0;padding-left:18px}.flag{color:#b30000;font-weight:bold}.note{color:#8a5a00}
details{margin:8px 0}summary{cursor:pointer;font-weight:bold}"""


def fmt(value: object) -> str:
    """A table cell as text: floats with three decimals, never ``-0.000`` (a negative that rounds to 0
    is 0); an undefined float (NaN) or ``None`` as ``n/a`` (a cell that can say why passes its reason
    as text: ``"n/a: no curve for node circuits"``)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        text = f"{value:.3f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(value)


@dataclass
class Block:
    """One piece of a section, in both output forms."""

    html: str
    markdown: str


@dataclass
class Section:
    """A titled part of a report (``level`` 2 or 3: a heading ``<h2>``/``##`` or ``<h3>``/``###``);
    every section is listed in the page's contents."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


def section(title: str, *blocks: Block, level: int = 2) -> Section:
    """A section of the given blocks."""
    return Section(title, list(blocks), level)


@dataclass(frozen=True)
class Markup:
    """A table cell given as ready HTML (already escaped), with its plain-text form for Markdown."""

    html: str
    text: str


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Block:
    """A table; numbers are right-aligned, text left-aligned; a :class:`Markup` cell keeps its HTML."""
    rows = [list(r) for r in rows]

    def cell(v) -> str:
        if isinstance(v, Markup):
            return f"<td>{v.html}</td>"
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f"<td class='n'>{escape(fmt(v))}</td>" if numeric else f"<td>{escape(fmt(v))}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)

    def md_cell(v) -> str:  # a '|' inside a cell would end it
        return (v.text if isinstance(v, Markup) else fmt(v)).replace("|", "\\|")

    md = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return Block(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", "\n".join(md))


def text(content: str, bold: str | None = None, css_class: str | None = None) -> Block:
    """A paragraph of plain text (escaped in HTML), optionally led by a bold label."""
    lead_html = f"<b>{escape(bold)}</b> " if bold else ""
    lead_md = f"**{bold}** " if bold else ""
    cls = f" class='{css_class}'" if css_class else ""
    return Block(f"<p{cls}>{lead_html}{escape(content)}</p>", f"{lead_md}{content}")


def bullets(items: Iterable[str]) -> Block:
    """A list of plain-text items."""
    items = list(items)
    return Block("<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>", "\n".join(f"- {i}" for i in items))


def figure(svg: str, caption: str = "") -> Block:
    """One SVG figure with a caption (the Markdown form has the caption only)."""
    cap = f"<p class='caption'>{escape(caption)}</p>" if caption else ""
    return Block(f"<div class='card'>{svg}{cap}</div>", f"*Figure: {caption}* (in the HTML report)" if caption else "")


def figures(svgs: Sequence[str], caption: str = "", collapsed: str | None = None) -> Block:
    """A row of SVG figures; ``collapsed``: the summary line of a ``<details>`` element they fold into."""
    grid = "<div class='grid'>" + "".join(f"<div class='card'>{s}</div>" for s in svgs) + "</div>"
    cap = f"<p class='caption'>{escape(caption)}</p>" if caption else ""
    html = f"<details><summary>{escape(collapsed)}</summary>{cap}{grid}</details>" if collapsed else cap + grid
    what = collapsed or caption
    return Block(html, f"*{len(svgs)} figures: {what}* (in the HTML report)" if what else "")


def _unique_anchors(sections: Sequence[Section]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in sections:
        base = s.anchor
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def contents(sections: Sequence[Section]) -> str:
    """The contents list (HTML): level-3 sections nested under the level-2 section before them."""
    parts, open_sub = ["<nav class='contents'><b>Contents</b><ul>"], False
    for s, anchor in zip(sections, _unique_anchors(sections), strict=True):
        link = f"<a href='#{anchor}'>{escape(s.title)}</a>"
        if s.level > 2:
            if not open_sub:
                parts.append("<ul>")
                open_sub = True
            parts.append(f"<li>{link}</li>")
        else:
            if open_sub:
                parts.append("</ul>")
                open_sub = False
            parts.append(f"<li>{link}</li>")
    parts.append("</ul>" if open_sub else "")
    parts.append("</ul></nav>")
    return "".join(parts)


def html_page(title: str, sections: Sequence[Section], intro: Sequence[Block] = ()) -> str:
    """A self-contained HTML page: title, ``intro`` blocks, the contents list, then the sections."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        *(b.html for b in intro),
        contents(sections),
    ]
    for s, anchor in zip(sections, _unique_anchors(sections), strict=True):
        level = min(max(s.level, 2), 4)
        parts.append(f"<h{level} id='{anchor}'>{escape(s.title)}</h{level}>")
        parts += [b.html for b in s.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def markdown_page(title: str, sections: Sequence[Section], intro: Sequence[Block] = ()) -> str:
    """The same page as Markdown: a contents list, then each section's heading and blocks."""
    out = [f"# {title}", ""]
    out += [x for b in intro if b.markdown for x in (b.markdown, "")]
    out += ["**Contents:** " + " · ".join(s.title for s in sections if s.level == 2), ""]
    for s in sections:
        out += ["#" * min(max(s.level, 2), 4) + f" {s.title}", ""]
        out += [x for b in s.blocks if b.markdown for x in (b.markdown, "")]
    return "\n".join(out)
