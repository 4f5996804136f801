"""Circuits over training: the circuit discovered at every checkpoint of a training run, and when
each of its edges appears and disappears.

* :func:`find_checkpoints`: the ``step-NNNNN`` HF folders that ``circuitfind train --checkpoints N``
  writes (listed in ``checkpoints.json``).
* :func:`analyse_checkpoint`: accuracy, logit difference and the circuit of one checkpoint, under one
  discovery setting (default ACDC, STR corruption, KL, as in the sweep's defaults).
* :func:`edge_timeline`: per edge, the checkpoints whose circuit holds it, as appear/disappear spans.
* :func:`write_report`: ``checkpoints.html`` and ``checkpoints.md`` (written atomically) with the
  timeline figure and the accuracy and logit difference alongside.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Literal

from circuitfind.io import write_text
from circuitfind.reports import render as R

STEP_FOLDER = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    folder: Path


def _read_manifest(manifest: Path) -> list[tuple[int, Path]]:
    """The (step, folder) entries of ``checkpoints.json``, checked: a JSON object whose ``checkpoints``
    is a list of ``{"step": int >= 0, "folder": name}`` with distinct steps, each folder inside the
    checkpoints folder (an entry pointing elsewhere would analyse a model the run never wrote)."""
    root = manifest.parent
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{manifest}: unreadable ({err})") from None
    entries = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{manifest}: must be a JSON object with a "checkpoints" list')
    out: dict[int, Path] = {}
    inside = root.resolve()
    for i, entry in enumerate(entries):
        where = f"{manifest}: checkpoints[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f'{where} must be an object {{"step": N, "folder": "step-NNNNN"}}, got {entry!r}')
        step, name = entry.get("step"), entry.get("folder")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be a whole number >= 0, got {step!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: folder must be a folder name, got {name!r}")
        folder = root / name
        if not folder.resolve().is_relative_to(inside) or folder.resolve() == inside:
            raise ValueError(f"{where}: folder {name!r} lies outside the checkpoints folder {root}: refused")
        if step in out:
            raise ValueError(f"{where}: step {step} is listed twice")
        out[step] = folder
    return sorted(out.items())


def find_checkpoints(folder: str | Path, steps: list[int] | None = None) -> list[Checkpoint]:
    """The checkpoints in ``folder`` (a ``checkpoints/`` folder or the model folder holding one), by
    step; ``steps`` picks some of them (each must exist). A malformed ``checkpoints.json``, or one
    naming folders outside the checkpoints folder, is a ``ValueError`` naming the entry."""
    root = Path(folder)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(
            f"no checkpoints folder at {folder} (write one with: circuitfind train toy-ioi --out DIR --checkpoints N)"
        )
    manifest = root / "checkpoints.json"
    if manifest.is_file():
        entries = _read_manifest(manifest)
    else:
        entries = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    found = {step: Checkpoint(step, path) for step, path in entries if (path / "config.json").is_file()}
    if not found:
        raise FileNotFoundError(f"no checkpoints (step-NNNNN folders with a config.json) in {root}")
    if steps is not None:
        missing = sorted(set(steps) - set(found))
        if missing:
            raise ValueError(f"no checkpoint at steps {missing} in {root}; there are {sorted(found)}")
        found = {s: found[s] for s in set(steps)}
    return [found[s] for s in sorted(found)]


def analyse_checkpoint(
    folder: str | Path,
    step: int,
    task: str = "ioi",
    prompts: int = 40,
    seed: int = 0,
    algorithm: str = "acdc",
    corruption: str = "str",
    metric: str | None = None,
    direction: Literal["noise", "denoise"] = "noise",
    device: str | None = None,
    **options,
) -> dict:
    """Accuracy and logit difference of one checkpoint on ``task``, and its circuit under one setting
    (``options``: :func:`circuitfind.methods.discover.discover`'s, e.g. ``acdc_tau``, ``top_k``)."""
    from circuitfind import patching as P
    from circuitfind.methods import discover as discovery
    from circuitfind.models.loading import load_model
    from circuitfind.tasks.batch import TaskBatch
    from circuitfind.tasks.evaluation import evaluate

    discovery.check_options(algorithm, direction, **options)
    model = load_model(str(folder), device=device)
    batch = TaskBatch.build(model, task, prompts, seed=seed)
    report = evaluate(model, batch, corruptions=(corruption,))
    if metric is None:  # the method's default (circuitfind.methods.base.Method.default_metric)
        metric = discovery.default_metric(algorithm, batch.prompts, batch.task.name)[0]
    setup = P.prepare(model, batch, corruption, metric)
    circuit = discovery.discover(setup, algorithm, direction, curve=False, **options).circuit
    scores = circuit.scores
    if scores is not None and scores.dim() == 2:  # per-position edges: the edge's total
        scores = scores.sum(-1)
    edges = circuit.edges
    index = {e: i for i, e in enumerate(circuit.graph.edges)}
    return {
        "step": step,
        "folder": str(folder),
        "accuracy": report.accuracy,
        "logit_diff": report.logit_diff,
        "corrupt_logit_diff": report.corrupted[corruption]["logit_diff"],
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
        "n_edges": len(edges),
        "n_graph_edges": circuit.graph.n_edges,
        "edges": [list(e) for e in edges],
        "scores": {f"{s}->{r}": float(scores[index[(s, r)]]) for s, r in edges} if scores is not None else {},
    }


def analyse_or_flag(folder: str | Path, step: int, **setting) -> dict:
    """:func:`analyse_checkpoint`, or, when the checkpoint cannot be analysed (a damaged or truncated
    model file, ...), ``{"step", "folder", "error"}``: one bad checkpoint of a long training run is
    flagged and skipped, not the end of the whole analysis."""
    from circuitfind.models.loading import check_model_folder

    try:
        check_model_folder(folder)
        return analyse_checkpoint(folder, step, **setting)
    except Exception as err:  # any failure of this one checkpoint: flagged in the report, the rest go on
        message = " ".join(str(err).split()) or type(err).__name__
        return {"step": step, "folder": str(folder), "error": f"{type(err).__name__}: {message}"}


def edge_timeline(results: list[dict]) -> dict:
    """Which checkpoints' circuits hold each edge. ``edges`` are ordered by the step they first appear
    (then by name); ``present[edge]`` is one bool per checkpoint; ``spans[edge]`` lists
    ``[appears, disappears]`` step pairs (``disappears`` is the first checkpoint without the edge
    after it was present, ``None`` if it stays to the last checkpoint). ``final_recall`` is, per
    checkpoint, the fraction of the last checkpoint's edges already present."""
    steps = [r["step"] for r in results]
    sets = [{f"{s}->{r}" for s, r in res["edges"]} for res in results]
    first: dict[str, int] = {}
    for i, edges in enumerate(sets):
        for e in edges:
            first.setdefault(e, i)
    order = sorted(first, key=lambda e: (first[e], e))
    present = {e: [e in s for s in sets] for e in order}
    spans = {}
    for e, row in present.items():
        out, start = [], None
        for i, here in enumerate(row):
            if here and start is None:
                start = steps[i]
            if not here and start is not None:
                out.append([start, steps[i]])
                start = None
        if start is not None:
            out.append([start, None])
        spans[e] = out
    final = sets[-1] if sets else set()
    recall = [len(s & final) / len(final) if final else float("nan") for s in sets]
    return {"steps": steps, "edges": order, "present": present, "spans": spans, "final_recall": recall}


def timeline_svg(results: list[dict], timeline: dict, cell_w: int = 34, row_h: int = 14) -> str:
    """The timeline figure: accuracy and logit difference over the checkpoints on top, and below one
    row per edge with a filled cell at each checkpoint whose circuit holds it (columns are checkpoints)."""
    steps, edges = timeline["steps"], timeline["edges"]
    label_w, top, chart_h, gap = 150, 24, 90, 26
    width = label_w + cell_w * max(len(steps), 1) + 20
    grid_top = top + 2 * (chart_h + gap) + 18
    height = grid_top + row_h * max(len(edges), 1) + 10
    body = [f'<text x="4" y="16" font-weight="bold">Circuit edges over training ({len(edges)} edges seen)</text>']

    def col(i: int) -> float:
        return label_w + cell_w * i + cell_w / 2

    for k, (key, label, colour) in enumerate(
        [("accuracy", "accuracy", "#1f77b4"), ("logit_diff", "logit difference", "#d62728")]
    ):
        y0 = top + k * (chart_h + gap)
        values = [r[key] for r in results]
        lo, hi = min(values + [0.0]), max(values + [1.0 if key == "accuracy" else 0.0])
        span = (hi - lo) or 1.0

        def py(v: float, y0=y0, lo=lo, span=span) -> float:
            return y0 + chart_h - (v - lo) / span * chart_h

        body.append(
            f'<rect x="{label_w}" y="{y0}" width="{cell_w * len(steps)}" height="{chart_h}" fill="none" stroke="#bbb"/>'
        )
        body.append(f'<text x="{label_w - 6}" y="{y0 + chart_h / 2}" text-anchor="end">{escape(label)}</text>')
        for v in (lo, hi):
            body.append(f'<text x="{label_w - 6}" y="{py(v) + 4}" text-anchor="end" font-size="9">{v:.2f}</text>')
        if lo < 0 < hi:
            body.append(
                f'<line x1="{label_w}" y1="{py(0)}" x2="{label_w + cell_w * len(steps)}" y2="{py(0)}" stroke="#ccc" stroke-dasharray="3,3"/>'
            )
        points = " ".join(f"{col(i):.1f},{py(v):.1f}" for i, v in enumerate(values))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        body += [
            f'<circle cx="{col(i):.1f}" cy="{py(v):.1f}" r="2.5" fill="{colour}"><title>step {s}: {label} {v:.3f}</title></circle>'
            for i, (s, v) in enumerate(zip(steps, values, strict=True))
        ]
    for i, s in enumerate(steps):
        body.append(f'<text x="{col(i)}" y="{grid_top - 6}" text-anchor="middle" font-size="9">{s}</text>')
    body.append(f'<text x="{label_w - 6}" y="{grid_top - 6}" text-anchor="end" font-size="9">step</text>')
    for j, e in enumerate(edges):
        y = grid_top + j * row_h
        body.append(f'<text x="{label_w - 6}" y="{y + row_h - 3}" text-anchor="end" font-size="10">{escape(e)}</text>')
        for i, here in enumerate(timeline["present"][e]):
            fill = "#2ca02c" if here else "#f2f2f2"
            body.append(
                f'<rect x="{label_w + cell_w * i + 1}" y="{y + 1}" width="{cell_w - 2}" height="{row_h - 2}" fill="{fill}">'
                f"<title>{escape(e)} at step {steps[i]}: {'in' if here else 'not in'} the circuit</title></rect>"
            )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
        + "".join(body)
        + "</svg>"
    )


# "0-200" read as present through step 200; the second step is the first checkpoint without the edge.
EDGE_SPANS = "in the circuit from step - to the first step without it (end: still in the last checkpoint)"


def _fmt_spans(spans: list[list]) -> str:
    return ", ".join(f"{a}-{'end' if b is None else b}" for a, b in spans)


def write_report(
    results: list[dict], settings: dict, out_dir: str | Path, skipped: list[dict] | None = None
) -> dict[str, str]:
    """Write ``checkpoints.html`` and ``checkpoints.md`` in ``out_dir``; returns their paths.
    ``skipped``: the checkpoints that could not be analysed (:func:`analyse_or_flag`), listed with why."""
    timeline = edge_timeline(results)
    title = f"Circuits over training: {settings.get('model', '')}".rstrip(": ")
    setting = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model")
    rows = [
        [
            r["step"],
            f"{r['accuracy']:.3f}",
            f"{r['logit_diff']:.3f}",
            f"{r['corrupt_logit_diff']:.3f}",
            r["n_edges"],
            "n/a" if rec != rec else f"{rec:.2f}",
        ]
        for r, rec in zip(results, timeline["final_recall"], strict=True)
    ]
    header = ["step", "accuracy", "logit diff", "corrupted logit diff", "edges", "share of final circuit"]
    edge_rows = [[e, _fmt_spans(timeline["spans"][e])] for e in timeline["edges"]]
    sections = [
        R.section(
            "Checkpoints",
            R.text(f"Setting: {setting}."),
            R.figure(
                timeline_svg(results, timeline), "Circuit edges over training, with accuracy and logit difference"
            ),
            R.text(
                "Each checkpoint's circuit is discovered under the same setting; share of final circuit is the "
                "fraction of the last checkpoint's edges that the checkpoint's circuit already holds."
            ),
            R.table(header, rows),
        ),
        R.section("When each edge is in the circuit", R.table(["edge", EDGE_SPANS], edge_rows)),
    ]
    if skipped:
        sections.insert(
            0,
            R.section(
                "Skipped checkpoints",
                R.text(f"{len(skipped)} checkpoint(s) could not be analysed and are left out of every table below."),
                R.table(["step", "folder", "why"], [[r["step"], r["folder"], r["error"]] for r in skipped]),
            ),
        )
    out = Path(out_dir)
    return {
        "html": str(write_text(out / "checkpoints.html", R.html_page(title, sections))),
        "markdown": str(write_text(out / "checkpoints.md", R.markdown_page(title, sections))),
    }


def add_arguments(p: argparse.ArgumentParser, method_options: bool = True) -> None:
    """The options of the checkpoints flow (``circuitfind checkpoints``, ``flows/checkpoints.py``);
    ``method_options=False`` leaves out the methods' options (they import the methods and torch)."""
    from circuitfind.methods import registry

    p.add_argument("checkpoints", help="a checkpoints/ folder, or the model folder holding one")
    p.add_argument("--steps", type=int, nargs="*", default=None, help="only these checkpoints (default: all)")
    p.add_argument("--task", default="ioi")
    p.add_argument("-n", "--prompts", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--algorithm",
        default="acdc",
        help=f"{', '.join(registry.names())}, or package.module:Class (default: acdc)",
    )
    p.add_argument("--corruption", default="str", help="(default: str)")
    p.add_argument(
        "--metric",
        default=None,
        help="a metric name or package.module:function (default: the algorithm's"
        + (f": {registry.default_metrics_help()})" if method_options else ")"),
    )
    p.add_argument("--direction", choices=("denoise", "noise"), default="noise")
    if method_options:
        registry.add_arguments(p.add_argument_group("method options (each method reads its own)"))
    p.add_argument("--device", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--outputs", default=None, help="default: ./outputs of the current folder")
