"""The circuit diff report: how circuits found under different settings agree and differ.

:func:`compare_records` computes the statistics from a sweep's setting records (see
:mod:`circuitfind.sweep`); :func:`write_report` writes them as a self-contained HTML file (SVG
figures inline: overlap heatmaps, circuits side by side with shared and setting-specific edges
coloured, faithfulness curves) and as Markdown (the same tables, for a Prefect artifact).
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape
from pathlib import Path

import torch

from circuitfind import compare, figures
from circuitfind.errors import GraphMismatchError
from circuitfind.graph import ModelGraph, check_shape
from circuitfind.io import write_text
from circuitfind.threads import torch_threads


def _edges(record: dict) -> set[tuple[str, str]]:
    return {tuple(e) for e in record["edges"]}


def _components(record: dict) -> set[str]:
    return set(record["nodes"]) - {"input", "logits"}


def _short(record: dict, group_keys: tuple[str, ...]) -> str:
    """A setting's name without the parts shared by its whole group."""
    return "/".join(str(record[k]) for k in ("algorithm", "corruption", "metric", "direction") if k not in group_keys)


def _record_shape(record: dict) -> tuple[int, int, int]:
    """A record's graph shape ``(n_layers, n_heads, n_kv_heads)``, bounded (records may come from
    elsewhere), with its scores checked against the graph's edge count."""
    shape = (record["n_layers"], record["n_heads"], record.get("n_kv_heads") or record["n_heads"])
    n_edges = check_shape(shape[0], shape[1], n_kv_heads=shape[2])
    if record.get("scores") is not None and len(record["scores"]) != n_edges:
        raise GraphMismatchError(f"record {record['setting']}: {len(record['scores'])} scores for a graph of {n_edges} edges "
                                 f"(n_layers={shape[0]}, n_heads={shape[1]}, n_kv_heads={shape[2]})")
    return shape


def _check_same_shape(recs: list[dict], what: str) -> None:
    shapes = {r["setting"]: _record_shape(r) for r in recs}
    if len(set(shapes.values())) > 1:
        found = "; ".join(f"{name}: n_layers={s[0]}, n_heads={s[1]}, n_kv_heads={s[2]}" for name, s in shapes.items())
        raise GraphMismatchError(f"{what} come from different graph shapes and cannot be compared ({found})")


def compare_records(records: list[dict], reference: dict | None = None, consensus_fraction: float = 0.5,
                    n_boot: int = 1000) -> list[dict]:
    """Statistics per (model, task) group of records. ``reference``: a record whose circuit is the truth.

    Raises ``GraphMismatchError`` when a group's records (or the reference and its group) come from
    graphs of different shapes, or a record's scores do not fit its graph."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"])].append(r)
    out = []
    for (model, task), recs in sorted(groups.items()):
        _check_same_shape(recs, f"the records of {model} on {task}")
        if reference is not None and (reference["model"], reference["task"]) == (model, task):
            _check_same_shape(recs[:1] + [reference], f"the records of {model} on {task} and the reference")
        names = [r["setting"] for r in recs]
        labels = [_short(r, ()) for r in recs]
        edges = {r["setting"]: _edges(r) for r in recs}
        nodes = {r["setting"]: _components(r) for r in recs}
        scored = {r["setting"]: _tensor(r["scores"]) for r in recs if r.get("scores") is not None and r["algorithm"] != "node"}
        ranks = compare.pairwise(scored, compare.rank_correlation)  # Spearman and Kendall together, once per pair
        stab_nodes = compare.stability(nodes)
        consensus_edges = compare.consensus(edges, consensus_fraction)
        consensus_nodes = compare.consensus(nodes, consensus_fraction)
        group = {
            "model": model, "task": task, "records": recs, "names": names, "labels": labels,
            "edge_jaccard": compare.matrix(compare.pairwise(edges, compare.jaccard), names).tolist(),
            "node_jaccard": compare.matrix(compare.pairwise(nodes, compare.jaccard), names).tolist(),
            "edge_overlap": compare.matrix(compare.pairwise(edges, compare.overlap_coefficient), names).tolist(),
            "score_names": list(scored),
            "spearman": compare.matrix({k: v["spearman"] for k, v in ranks.items()}, list(scored)).tolist() if scored else [],
            "kendall": compare.matrix({k: v["kendall"] for k, v in ranks.items()}, list(scored)).tolist() if scored else [],
            "node_stability": stab_nodes,
            "consensus_fraction": consensus_fraction,
            "consensus_edges": sorted(consensus_edges),
            "consensus_nodes": sorted(consensus_nodes),
            "unanimous_nodes": sorted(compare.consensus(nodes, 1.0)),
            "appear_vanish": {n: {"appear": sorted(nodes[n] - consensus_nodes), "vanish": sorted(consensus_nodes - nodes[n])} for n in names},
        }
        if reference is not None and (reference["model"], reference["task"]) == (model, task):
            ref_edges, ref_nodes = _edges(reference), _components(reference)
            truth = None
            rows = {}
            for r in recs:
                row = {"edges": compare.precision_recall_f1(edges[r["setting"]], ref_edges),
                       "nodes": compare.precision_recall_f1(nodes[r["setting"]], ref_nodes)}
                if r["setting"] in scored:
                    if truth is None:
                        graph = ModelGraph(r["n_layers"], r["n_heads"], n_kv_heads=r.get("n_kv_heads"))
                        truth = torch.tensor([e in ref_edges for e in graph.edges])
                    if 0 < truth.sum() < truth.numel() and len(scored[r["setting"]]) == truth.numel():
                        row["roc_auc"] = compare.roc_auc(scored[r["setting"]], truth).auc
                rows[r["setting"]] = row
            group["reference"] = {"setting": reference["setting"], "scores": rows}
        boots, skipped = {}, {}
        for r in recs:
            if r.get("per_prompt"):
                try:
                    boots[r["setting"]] = _bootstrap(r, n_boot)
                except _Unusable as err:
                    skipped[r["setting"]] = str(err)
        group["bootstrap"] = boots
        group["bootstrap_skipped"] = skipped
        out.append(group)
    return out


class _Unusable(Exception):
    """A run folder's per-prompt scores cannot be used (missing, unreadable, wrong shape)."""


def _bootstrap(record: dict, n_boot: int) -> dict:
    """Bootstrap intervals of a setting's edge scores over prompts, from its per-prompt file."""
    path = Path(record["per_prompt"])
    if not path.is_file():
        raise _Unusable(f"{path.name} is missing")
    try:
        per = torch.load(path, weights_only=True)
    except Exception as err:  # truncated, edited or not a torch file: the report goes on without it
        first_line = next(iter(str(err).splitlines()), "")[:100]
        raise _Unusable(f"{path.name} could not be read ({type(err).__name__}: {first_line})") from err
    graph = ModelGraph(record["n_layers"], record["n_heads"], n_kv_heads=record.get("n_kv_heads"))
    if not isinstance(per, torch.Tensor) or per.dim() != 2 or per.shape[0] != graph.n_edges or per.shape[1] < 2:
        shape = list(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
        raise _Unusable(f"{path.name} holds {shape}, not scores [{graph.n_edges} edges, >= 2 prompts]")
    ci = compare.bootstrap_ci(per, n_boot=n_boot)
    top = ci.mean.abs().topk(min(8, ci.mean.numel())).indices.tolist()
    return {
        "level": ci.level, "excluding_zero": int(ci.excludes_zero().sum()),
        "top": [{"edge": list(graph.edges[i]), "mean": float(ci.mean[i]), "low": float(ci.low[i]), "high": float(ci.high[i])} for i in top],
    }


def _tensor(values) -> torch.Tensor:
    """A tensor from JSON numbers, where ``null`` (a non-finite value) becomes NaN."""
    return torch.tensor(_nan_for_null(values), dtype=torch.float32)


def _nan_for_null(values):
    if isinstance(values, list):
        return [_nan_for_null(v) for v in values]
    return float("nan") if values is None else values


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings_rows(group: dict) -> list[list]:
    rows = []
    for label, r in zip(group["labels"], group["records"]):
        curve = r.get("curve") or {}
        faith = r["faithfulness"] if r["faithfulness"] is not None else r.get("faithfulness_status", "n/a")
        rows.append([label, r["n_edges"], len(_components(r)), faith, curve.get("cpr", float("nan")),
                     curve.get("cmd", float("nan")), r["clean"], r["corrupt"], r.get("seconds", float("nan"))])
    return rows


SETTINGS_HEADER = ["setting (algorithm/corruption/metric/direction)", "edges", "components", "faithfulness", "CPR", "CMD", "clean", "corrupt", "seconds"]
STABILITY_HEADER = ["component", "fraction of settings"]
APPEAR_HEADER = ["setting", "appear", "vanish"]
REFERENCE_HEADER = ["setting", "edge precision", "edge recall", "edge F1", "component F1", "ROC AUC"]
BOOTSTRAP_HEADER = ["edge", "mean", "low", "high"]


def _stability_rows(group: dict) -> list[list]:
    return [[c, f] for c, f in sorted(group["node_stability"].items(), key=lambda kv: -kv[1])]


def _appear_rows(group: dict) -> list[list]:
    av = group["appear_vanish"]
    return [[lab, ", ".join(av[n]["appear"]) or "-", ", ".join(av[n]["vanish"]) or "-"] for lab, n in zip(group["labels"], group["names"])]


def _reference_rows(group: dict) -> list[list]:
    scores = group["reference"]["scores"]
    return [[lab, s["edges"]["precision"], s["edges"]["recall"], s["edges"]["f1"], s["nodes"]["f1"], s.get("roc_auc", float("nan"))]
            for lab, s in zip(group["labels"], scores.values())]


def _bootstrap_rows(boot: dict) -> list[list]:
    return [[" -> ".join(t["edge"]), t["mean"], t["low"], t["high"]] for t in boot["top"]]


def to_markdown(groups: list[dict], title: str) -> str:
    out = [f"# {title}", ""]
    for g in groups:
        out += [f"## {g['model']} on {g['task']}: {len(g['names'])} settings", "", _table(SETTINGS_HEADER, _settings_rows(g)), ""]
        out += [f"**Components in every setting:** {', '.join(g['unanimous_nodes']) or 'none'}  ",
                f"**Components in >= {g['consensus_fraction']:.0%} of settings:** {', '.join(g['consensus_nodes']) or 'none'}  ",
                f"**Edges in >= {g['consensus_fraction']:.0%} of settings:** {len(g['consensus_edges'])}", ""]
        out += ["### How often each component is found", "", _table(STABILITY_HEADER, _stability_rows(g)), ""]
        out += ["### Components that appear or vanish, against the consensus", "", _table(APPEAR_HEADER, _appear_rows(g)), ""]
        mean_j = _off_diagonal_mean(g["edge_jaccard"])
        out += [f"Mean pairwise edge Jaccard {mean_j:.3f}, node Jaccard {_off_diagonal_mean(g['node_jaccard']):.3f}.", ""]
        if "reference" in g:
            ref = g["reference"]
            out += [f"### Against the reference `{ref['setting']}`", "", _table(REFERENCE_HEADER, _reference_rows(g)), ""]
        if g["bootstrap"] or g["bootstrap_skipped"]:
            out += ["### Bootstrap intervals of edge scores (over prompts)", ""]
            label = dict(zip(g["names"], g["labels"]))
            for name, b in g["bootstrap"].items():
                out += [f"**{label[name]}**: {b['excluding_zero']} edges with a {b['level']:.0%} interval excluding 0. Top edges:", "",
                        _table(BOOTSTRAP_HEADER, _bootstrap_rows(b)), ""]
            for name, reason in g["bootstrap_skipped"].items():
                out += [f"**{label[name]}**: no intervals: {reason}.", ""]
    return "\n".join(out)


def _off_diagonal_mean(m: list[list[float]]) -> float:
    n = len(m)
    vals = [m[i][j] for i in range(n) for j in range(n) if i != j and not math.isnan(m[i][j])]
    return sum(vals) / len(vals) if vals else float("nan")


CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:12px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:4px}h2{border-bottom:2px solid #333}
.legend span{display:inline-block;margin-right:16px}"""


def to_html(groups: list[dict], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(title)}</h1>"]
    for g in groups:
        parts.append(f"<h2>{escape(g['model'])} on {escape(g['task'])}: {len(g['names'])} settings</h2>")
        parts.append(_html_table(SETTINGS_HEADER, _settings_rows(g)))
        parts.append(f"<p><b>Components in every setting:</b> {escape(', '.join(g['unanimous_nodes']) or 'none')}<br>"
                     f"<b>Components in &ge; {g['consensus_fraction']:.0%} of settings:</b> {escape(', '.join(g['consensus_nodes']) or 'none')}</p>")
        cell = max(12, min(34, 900 // max(1, len(g['names']))))
        parts.append("<h3>Overlap between settings</h3><div class='grid'>")
        parts.append(f"<div class='card'>{figures.heatmap(g['edge_jaccard'], g['labels'], 'edge Jaccard', cell)}</div>")
        parts.append(f"<div class='card'>{figures.heatmap(g['node_jaccard'], g['labels'], 'component Jaccard', cell)}</div>")
        if g["score_names"]:
            label = dict(zip(g["names"], g["labels"]))
            parts.append(f"<div class='card'>{figures.heatmap(g['spearman'], [label[n] for n in g['score_names']], 'Spearman rank correlation of |edge scores|', cell)}</div>")
        parts.append("</div>")
        parts.append("<h3>Circuits</h3><p class='legend'><span>dark: edge in the consensus "
                     f"(&ge; {g['consensus_fraction']:.0%} of settings)</span><span style='color:#ff7f0e'>orange: found only in some settings</span>"
                     "<span>solid q, dashed k, dotted v input</span></p><div class='grid'>")
        shared = {tuple(e) for e in g["consensus_edges"]}
        for lab, r in zip(g["labels"], g["records"]):
            drawing = figures.circuit_drawing(r["n_layers"], r["n_heads"], _edges(r), shared, f"{lab} ({r['n_edges']} edges)")
            parts.append(f"<div class='card'>{drawing}</div>")
        parts.append("</div>")
        curves = {lab: (r["curve"]["fractions"], _nan_for_null(r["curve"]["faithfulness"])) for lab, r in zip(g["labels"], g["records"]) if r.get("curve")}
        if curves:
            parts.append("<h3>Faithfulness curves</h3>")
            parts.append(figures.line_chart(curves, "fraction of edges kept (top |score|)", "faithfulness", "faithfulness of top-scoring circuits", 760, 360))
        parts.append("<h3>Components that appear or vanish, against the consensus</h3>")
        parts.append(_html_table(APPEAR_HEADER, _appear_rows(g)))
        parts.append("<h3>How often each component is found</h3>")
        parts.append(_html_table(STABILITY_HEADER, _stability_rows(g)))
        if "reference" in g:
            ref = g["reference"]
            parts.append(f"<h3>Against the reference {escape(ref['setting'])}</h3>")
            parts.append(_html_table(REFERENCE_HEADER, _reference_rows(g)))
        if g["bootstrap"] or g["bootstrap_skipped"]:
            parts.append("<h3>Bootstrap intervals of edge scores (over prompts)</h3>")
            label = dict(zip(g["names"], g["labels"]))
            for name, b in g["bootstrap"].items():
                parts.append(f"<p><b>{escape(label[name])}</b>: {b['excluding_zero']} edges with a {b['level']:.0%} interval excluding 0.</p>")
                parts.append(_html_table(BOOTSTRAP_HEADER, _bootstrap_rows(b)))
            for name, reason in g["bootstrap_skipped"].items():
                parts.append(f"<p><b>{escape(label[name])}</b>: no intervals: {escape(reason)}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(records: list[dict], out_dir: str | Path, title: str = "Circuit diff report", reference: dict | None = None,
                 consensus_fraction: float = 0.5) -> dict[str, str]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (atomically); return their paths and the Markdown."""
    if not records:
        raise ValueError("no settings to compare")
    with torch_threads(1):  # small tensors only: extra intra-op threads just wait for busy cores
        groups = compare_records(records, reference, consensus_fraction)
    markdown = to_markdown(groups, title)
    html = write_text(Path(out_dir) / "report.html", to_html(groups, title))
    md = write_text(Path(out_dir) / "report.md", markdown)
    return {"html": str(html), "markdown": str(md), "markdown_text": markdown}


def write_run_report(run_dir: str | Path, reference: str | None = None, title: str | None = None) -> dict[str, str]:
    """The diff report of a sweep's run folder; ``reference`` names the setting taken as the truth."""
    from circuitfind.sweep import load_records

    records = load_records(run_dir)
    ref = None
    if reference is not None:
        ref = next((r for r in records if r["setting"] == reference), None)
        if ref is None:
            raise ValueError(f"reference setting {reference!r} is not in {run_dir}")
    return write_report(records, run_dir, title or f"Circuit diff report: {Path(run_dir).name}", reference=ref)
