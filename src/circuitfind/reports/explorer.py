"""The circuit explorer: one self-contained, offline HTML page to look at a run's circuits.

``circuitfind view RUN`` (a sweep run folder) or ``circuitfind view CIRCUIT_FILE`` writes the page. It draws
the circuits with Cytoscape.js (vendored in ``explorer_assets/`` with its licence, inlined) on the layered
layout of :mod:`circuitfind.reports.layout`, and lets a researcher change the circuit's size (top-k by
``|score|``, with the faithfulness read from the stored faithfulness curve), read an edge's score, its
bootstrap interval over prompts and its per-prompt values, compare two settings (or two runs), see the
consensus of the healthy settings, collapse heads into layers, search, and export SVG or PNG.

What the page holds: per setting, the circuit's edges and the ``MAX_RANKED`` edges of largest ``|score|``
(what the size control can show), not all of a large model's scores; bootstrap intervals (the 95%
percentile bootstrap over prompts of :func:`circuitfind.circuits.agreement.bootstrap_ci`, as the report
computes them) for those edges where the run kept per-prompt scores, and the per-prompt values of the
circuit's edges (at most ``MAX_PROMPTS`` prompts).

Everything from files (node and setting names, prompts, answers) is untrusted: the data is embedded as
JSON in a ``<script type="application/json">`` element with ``<``, ``>`` and ``&`` escaped, the page puts
text into the DOM with ``textContent`` only, and its Content-Security-Policy allows only its own two
scripts (by hash) and no network access.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from html import escape
from importlib import resources
from pathlib import Path

import torch

from circuitfind.circuits.agreement import bootstrap_ci
from circuitfind.circuits.graph import ModelGraph, check_shape
from circuitfind.errors import GraphMismatchError
from circuitfind.io import write_text
from circuitfind.names import LOGITS
from circuitfind.reports import layout
from circuitfind.runs import health

MAX_RANKED = 4000  # top-|score| edges embedded per setting: the size control's range
MAX_PROMPTS = 64  # per-prompt values shown per edge
N_BOOT = 1000
CYTOSCAPE_VERSION = "3.35.0"
ASSETS = "explorer_assets"


def default_out(path: str | Path) -> Path:
    """``RUN/explorer.html`` for a run folder, ``<circuit>.explorer.html`` beside a circuit file."""
    path = Path(path)
    if path.is_dir():
        return path / "explorer.html"
    name = path.name
    for suffix in (".mib.json", *(path.suffixes[-1:] or [""])):
        if suffix and name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.explorer.html")


def write_explorer(
    path: str | Path, out: str | Path | None = None, compare: str | Path | None = None, title: str | None = None
) -> Path:
    """Write the explorer page of a run folder or circuit file (with ``compare``: a second run or circuit,
    its settings selectable beside the first's); returns the page's path. Raises the loaders' errors
    (``FileNotFoundError``, ``GraphFileError``, ``ValueError``) for unusable input, before writing anything."""
    path = Path(path)
    sources = [path] + ([Path(compare)] if compare is not None else [])
    entries: list[dict] = []
    for i, source in enumerate(sources):
        prefix = f"{'AB'[i]}: " if len(sources) > 1 else ""
        entries += _load(source, prefix)
    title = title or f"Circuit explorer: {' vs '.join(s.resolve().name for s in sources)}"
    html = render_page(page_data(entries, title))
    return write_text(out if out is not None else default_out(path), html)


def _load(source: Path, prefix: str) -> list[dict]:
    if source.is_dir():
        from circuitfind.runs.sweep import load_records

        return [_from_record(r, prefix + r["setting"], source.resolve().name) for r in load_records(source)]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run folder or circuit file")
    return [_from_circuit(source, prefix)]


def _graph_of(record: dict, where: str) -> ModelGraph:
    try:
        shape = (int(record["n_layers"]), int(record["n_heads"]), int(record.get("n_kv_heads") or record["n_heads"]))
        check_shape(shape[0], shape[1], n_kv_heads=shape[2])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the graph shape is unusable ({err})") from None
    return _graph(*shape)


_GRAPHS: dict[tuple[int, int, int], ModelGraph] = {}


def _graph(n_layers: int, n_heads: int, n_kv_heads: int) -> ModelGraph:
    key = (n_layers, n_heads, n_kv_heads)
    if key not in _GRAPHS:
        _GRAPHS[key] = ModelGraph(n_layers, n_heads, n_kv_heads=n_kv_heads)
    return _GRAPHS[key]


def _from_record(record: dict, label: str, run: str) -> dict:
    """A setting of a run folder, as the page needs it (edge indices into its graph)."""
    where = f"setting record {record.get('json') or record['setting']}"
    graph = _graph_of(record, where)
    lookup = graph.edge_lookup
    try:
        circuit = [lookup[(str(s), str(r))] for s, r in record.get("edges", [])]
    except KeyError as err:
        raise GraphMismatchError(f"{where}: edge {err.args[0]} is not an edge of its model's graph") from None
    except (TypeError, ValueError):
        raise ValueError(f"{where}: edges is not a list of [sender, receiver] pairs") from None
    scores = record.get("scores")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != graph.n_edges:
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"scores as {type(scores).__name__}"
            raise GraphMismatchError(f"{where}: {got} for a graph of {graph.n_edges} edges")
        scores = torch.tensor([math.nan if s is None else float(s) for s in scores])
    flags = health.check_record(record)
    curve = record.get("curve")
    return {
        "label": label,
        "run": run,
        "graph": graph,
        "circuit": circuit,
        "scores": scores,
        "per_prompt": record.get("per_prompt"),
        "info": {k: record.get(k) for k in ("algorithm", "corruption", "metric", "direction", "model", "task")},
        "faithfulness": record.get("faithfulness"),
        "faithfulness_status": record.get("faithfulness_status"),
        "curve": curve if isinstance(curve, dict) else None,
        "flags": [{"code": f, "text": health.explain(record, f)} for f in flags],
        "notes": [health.PITFALLS[n][0] for n in health.setting_notes(record)],
        "examples": record.get("examples") or [],
        "n_prompts": record.get("n_prompts"),
    }


def _from_circuit(path: Path, prefix: str) -> dict:
    """A circuit file (GraphML, GEXF, node-link JSON, DOT, MIB JSON) as one setting: its faithfulness and curve
    where the file stores them (discover and the sweep write them as graph attributes), no prompts."""
    from circuitfind.circuits.circuit import Circuit

    c = Circuit.load(path)
    graph = _graph(c.graph.n_layers, c.graph.n_heads, c.graph.n_kv_heads or c.graph.n_heads)
    if (
        c.graph.shape != {**graph.shape, "split_qkv": c.graph.split_qkv, "n_pos": c.graph.n_pos}
        or not c.graph.split_qkv
    ):
        raise GraphMismatchError(f"{path}: the explorer draws graphs with separate q/k/v inputs only")
    scores = None if c.scores is None else (c.scores.sum(-1) if c.scores.dim() == 2 else c.scores)
    lookup = graph.edge_lookup
    settings = {k: str(v) for k, v in c.settings.items() if isinstance(v, (str, int, float))}
    record = {
        "algorithm": settings.get("algorithm", ""),
        "scores": None if scores is None else scores.tolist(),
        "n_edges": c.n_edges,
        "faithfulness": 0.0,  # a file carries none: not "undefined"
    }
    flags = [f for f in health.check_record(record) if f != "nan_faithfulness"]
    return {
        "label": prefix + path.name,
        "run": path.name,
        "graph": graph,
        "circuit": [lookup[e] for e in c.edges],
        "scores": scores,
        "per_prompt": None,
        "info": settings,
        # circuit files written by discover and the sweep store the faithfulness (and its status) as settings
        "faithfulness": stored if isinstance(stored := c.settings.get("faithfulness"), (int, float)) else None,
        "faithfulness_status": str(c.settings.get("faithfulness_status") or "not stored in this circuit file"),
        "curve": c.settings.get("curve") if isinstance(c.settings.get("curve"), dict) else None,
        "flags": [{"code": f, "text": health.FLAGS[f]} for f in flags],
        "notes": [],
        "examples": [],
        "n_prompts": None,
    }


def _num(x: float, digits: int = 4) -> float | None:
    """A score for the page: 4 significant digits (the page shows 3), ``None`` when not finite."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _setting_data(entry: dict, edge_ids: dict[int, int], edge_table: list[int]) -> dict:
    """One setting's part of the page: embedded edges in rank order, scores, intervals, per-prompt values."""
    graph: ModelGraph = entry["graph"]
    circuit = entry["circuit"]
    scores = entry["scores"]
    if scores is not None:
        magnitude = torch.nan_to_num(scores.abs(), nan=-1.0)
        order = torch.argsort(magnitude, descending=True, stable=True)[: min(MAX_RANKED, graph.n_edges)].tolist()
        ranked = len(order)
        chosen = set(order)
        order += [i for i in sorted(circuit, key=lambda i: -float(magnitude[i])) if i not in chosen]
    else:  # no scores (a node-level method): the circuit only, no size control
        ranked, order = 0, list(circuit)
    for i in order:
        if i not in edge_ids:
            edge_ids[i] = len(edge_table)
            edge_table.append(i)
    in_circuit = set(circuit)
    low = high = None
    per_prompt: list | None = None
    interval_note = "the run kept no per-prompt scores for this setting"
    path = entry.get("per_prompt")
    if path:
        try:
            per = torch.load(path, weights_only=True)
            if not (isinstance(per, torch.Tensor) and per.dim() == 2 and per.shape[0] == graph.n_edges):
                raise ValueError(f"holds {list(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__}")
            if per.shape[1] < 2:
                raise ValueError("has fewer than two prompts")
        except Exception as err:  # the page goes on without intervals, and says why
            interval_note = f"per-prompt scores unusable: {Path(path).name} {str(err).splitlines()[0][:120]}"
        else:
            rows = per[torch.tensor(order, dtype=torch.long)] if order else per[:0]
            ci = bootstrap_ci(rows, n_boot=N_BOOT) if order else None
            low = [_num(x) for x in ci.low.tolist()] if ci is not None else []
            high = [_num(x) for x in ci.high.tolist()] if ci is not None else []
            per_prompt = [
                [_num(x, 3) for x in rows[j, :MAX_PROMPTS].tolist()] if i in in_circuit else None
                for j, i in enumerate(order)
            ]
            interval_note = f"95% percentile bootstrap over {per.shape[1]} prompts ({N_BOOT} resamples)"
    curve = entry["curve"]
    if curve is not None:
        try:
            curve = {
                "sizes": [int(s) for s in curve["sizes"]],
                "faithfulness": [_num(f) if f is not None else None for f in curve["faithfulness"]],
            }
            if len(curve["sizes"]) != len(curve["faithfulness"]):
                curve = None
        except (KeyError, TypeError, ValueError):
            curve = None
    return {
        "label": entry["label"],
        "run": entry["run"],
        "info": {k: str(v) for k, v in entry["info"].items() if v is not None},
        "nEdges": len(circuit),
        "faithfulness": _num(entry["faithfulness"]) if isinstance(entry["faithfulness"], (int, float)) else None,
        "faithfulnessStatus": entry["faithfulness_status"] or "ok",
        "curve": curve,
        "flags": entry["flags"],
        "notes": entry["notes"],
        "examples": _examples(entry["examples"]),
        "nPrompts": entry["n_prompts"],
        "edges": [edge_ids[i] for i in order],
        "ranked": ranked,
        "score": [_num(scores[i]) for i in order] if scores is not None else None,
        "inCircuit": [1 if i in in_circuit else 0 for i in order],
        "low": low,
        "high": high,
        "intervalNote": interval_note,
        "perPrompt": per_prompt,
    }


def _examples(examples) -> list[dict]:
    """A few task rows as text (they came from a file: shown, never interpreted)."""
    out = []
    for e in examples[:3] if isinstance(examples, list) else []:
        if isinstance(e, dict):
            out.append({k: str(e.get(k)) for k in ("clean", "corrupted", "answers", "counter_answers") if k in e})
    return out


def page_data(entries: list[dict], title: str) -> dict:
    """What the page embeds: the graph's node positions, one edge table, and every setting."""
    if not entries:
        raise ValueError("nothing to show: no settings")
    graph: ModelGraph = entries[0]["graph"]
    for e in entries[1:]:
        if e["graph"].shape != graph.shape:
            raise GraphMismatchError(
                f"{e['label']}: its model's graph ({e['graph'].shape}) is not that of {entries[0]['label']} "
                f"({graph.shape}); only circuits of one model can be shown together"
            )
    edge_ids: dict[int, int] = {}
    edge_table: list[int] = []
    settings = [_setting_data(e, edge_ids, edge_table) for e in entries]
    edges = [list(graph.edges[i]) for i in edge_table]
    used = {n for e in edges for n in e}
    receivers = {r.name: r for r in graph.receivers}
    for name in list(used):
        if name in receivers and receivers[name].kind in ("q", "k", "v"):
            used.update(receivers[name].feeds)
    pos = layout.positions(graph)
    nodes = []
    for name, (x, y) in pos.items():
        if name not in used:
            continue
        r = receivers.get(name)
        kind = r.kind if r is not None and r.kind in ("q", "k", "v") else _component_kind(name)
        layer = r.layer if r is not None and name != LOGITS else _layer(name, graph.n_layers)
        nodes.append(
            {
                "id": name,
                "x": round(x, 3),
                "y": round(y, 3),
                "kind": kind,
                "layer": layer,
                "feeds": list(r.feeds) if r is not None and kind in ("q", "k", "v") else [],
            }
        )
    collapsed = [
        {"id": n, "x": round(x, 3), "y": round(y, 3)}
        for n, (x, y) in layout.collapsed_positions(graph.n_layers).items()
    ]
    return {
        "title": title,
        "cytoscapeVersion": CYTOSCAPE_VERSION,
        "graph": {
            "nLayers": graph.n_layers,
            "nHeads": graph.n_heads,
            "nKvHeads": graph.n_kv_heads,
            "nEdges": graph.n_edges,
        },
        "maxRanked": MAX_RANKED,
        "nodes": nodes,
        "collapsed": collapsed,
        "edges": edges,
        "settings": settings,
    }


def _component_kind(name: str) -> str:
    if name in ("input", "logits"):
        return name
    return "mlp" if name.startswith("m") else "head"


def _layer(name: str, n_layers: int) -> int:
    from circuitfind.names import parse_node

    node = parse_node(name)
    return n_layers if node.layer is None else node.layer


def _asset(name: str) -> str:
    return (resources.files("circuitfind.reports") / ASSETS / name).read_text(encoding="utf-8")


def embed_json(data: dict) -> str:
    """``data`` as JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` as ``\\u003c`` ..."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def render_page(data: dict) -> str:
    """The page: style, the vendored Cytoscape.js, the data and the explorer's script, all inline."""
    library, script, style = _asset("cytoscape.min.js"), _asset("explorer.js"), _asset("explorer.css")
    for name, code in (("cytoscape.min.js", library), ("explorer.js", script)):
        if "</script" in code.lower():  # would end the element early
            raise RuntimeError(f"{ASSETS}/{name} contains '</script'")
    policy = (
        f"default-src 'none'; script-src {_hash(library)} {_hash(script)}; style-src 'unsafe-inline'; "
        "img-src data: blob:; connect-src 'none'; form-action 'none'; base-uri 'none'"
    )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(data['title'])}</title>",
            f"<style>{style}</style>",
            "</head><body>",
            '<div id="app"><noscript>The circuit explorer needs JavaScript.</noscript></div>',
            f'<script type="application/json" id="explorer-data">{embed_json(data)}</script>',
            f"<script>{library}</script>",
            f"<script>{script}</script>",
            "</body></html>",
            "",
        ]
    )
