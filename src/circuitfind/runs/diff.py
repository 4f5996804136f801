"""Run against run: how the circuits of two sweep runs of the same grid differ.

Two runs (two models, two checkpoints, tonight's scheduled run and last night's) are paired setting
by setting: :func:`diff_runs` gives, for each setting present in both, the edges gained and lost
(from run A to run B), the edge Jaccard, the shift of the edge scores (Spearman rank correlation of
``|score|`` and mean ``|score_B - score_A|`` over the edges both runs score) and the change of
faithfulness; settings found in only one run, and those that failed in either (the manifest's
``failures``), are listed, and shared parameters that differ between the manifests (``prompts``,
``seed``, ...) are a warning at the top. Runs that share no setting are refused. :func:`write_diff` writes it as
``diff.html``, ``diff.md`` and ``diff.json``, atomically.

Pairing: settings pair by their full name when both runs hold the same models; when each run holds
one model and they differ (model A against model B), they pair by task, algorithm, corruption,
metric and direction. Runs of different graph shapes (layers, heads, key/value heads) are compared
on the component level only: heads ``a{l}.{h}`` and MLPs ``m{l}`` by name, with a note that a name
in one model is not the same component in another; edges and scores are not compared.

Input is a run folder written by the sweep: ``manifest.json`` (written last, so its presence means
the run completed) lists the settings, ``circuits/<setting>.json`` their records. A missing folder,
a missing or unreadable manifest and a truncated or incomplete record are each one ``ValueError``
naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np

from circuitfind.circuits import agreement
from circuitfind.circuits.graph import check_shape
from circuitfind.io import write_json, write_text
from circuitfind.names import INPUT, LOGITS
from circuitfind.reports import render as R

GRID_AXES = ("task", "algorithm", "corruption", "metric", "direction")
RECORD_FIELDS = {
    "setting": str,
    "model": str,
    "task": str,
    "algorithm": str,
    "corruption": str,
    "metric": str,
    "direction": str,
    "n_layers": int,
    "n_heads": int,
    "edges": list,
    "nodes": list,
}
MANIFEST = "manifest.json"
GRID_LISTS = (
    "models",
    "tasks",
    "algorithms",
    "corruptions",
    "metrics",
    "directions",
)  # the config's grid, not parameters


@dataclass
class Run:
    """A completed sweep run: its folder, name, setting records (by setting name) and the settings
    that failed (as the manifest lists them)."""

    path: Path
    name: str
    records: dict[str, dict]
    failed: list[str]
    parameters: dict | None = None  # the manifest's shared parameters (prompts, seed, ...), when it records them

    @property
    def models(self) -> set[str]:
        return {r["model"] for r in self.records.values()}


def load_run(run_dir: str | Path) -> Run:
    """A sweep run folder's records, checked; ``ValueError`` (one line, naming the file) if unusable."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: no such run folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path} is missing: not a completed sweep run (the sweep writes it last)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = [s["setting"] for s in manifest["settings"]]
        failed = [f["setting"] for f in manifest.get("failures") or []]
        if not all(isinstance(s, str) for s in listed + failed):
            raise TypeError("setting names are not strings")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest_path} is not a sweep manifest ({type(err).__name__}: {err})") from None
    records = {}
    for name in listed:
        records[name] = _load_record(path, name)
    if not records:
        raise ValueError(f"{manifest_path}: the run has no settings")
    config = manifest.get("config")
    parameters = {k: v for k, v in config.items() if k not in GRID_LISTS} if isinstance(config, dict) else None
    return Run(
        path,
        manifest.get("run") if isinstance(manifest.get("run"), str) else path.name,
        records,
        sorted(failed),
        parameters,
    )


def parameter_changes(a: Run, b: Run) -> dict[str, list]:
    """The shared parameters both manifests record with different values (``{name: [A's, B's]}``): a circuit
    that changes between runs of 8 and 16 prompts may change because of them, not of the model or the code."""
    if a.parameters is None or b.parameters is None:
        return {}
    return {
        k: [a.parameters[k], b.parameters[k]]
        for k in sorted(a.parameters.keys() & b.parameters.keys())
        if a.parameters[k] != b.parameters[k]
    }


def _load_record(run_dir: Path, setting: str) -> dict:
    """One setting's record, its fields type-checked (records may be truncated or edited)."""
    file = run_dir / "circuits" / f"{Path(setting).name}.json"
    if not file.is_file():
        raise ValueError(f"{file} is missing: the manifest lists setting {setting!r}")
    try:
        record = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"setting record {file} is not valid JSON (truncated?): {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"setting record {file} is not a JSON object")
    for field, typ in RECORD_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ValueError(f"setting record {file}: field {field!r} missing or not a {typ.__name__}")
    if not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in record["edges"]):
        raise ValueError(f"setting record {file}: 'edges' is not a list of [sender, receiver] names")
    if not all(isinstance(n, str) for n in record["nodes"]):
        raise ValueError(f"setting record {file}: 'nodes' is not a list of names")
    kv = record.get("n_kv_heads")
    if kv is not None and not (isinstance(kv, int) and not isinstance(kv, bool)):
        raise ValueError(f"setting record {file}: 'n_kv_heads' is not a whole number")
    try:
        n_edges = check_shape(record["n_layers"], record["n_heads"], n_kv_heads=kv)
    except ValueError as err:
        raise ValueError(f"setting record {file}: {err}") from None
    scores = record.get("scores")
    if scores is not None and not (isinstance(scores, list) and all(_is_number(s) or s is None for s in scores)):
        raise ValueError(f"setting record {file}: 'scores' is not a list of numbers")
    if scores is not None and len(scores) != n_edges:
        raise ValueError(f"setting record {file}: {len(scores)} scores for a graph of {n_edges} edges")
    for field in ("faithfulness",):
        if record.get(field) is not None and not _is_number(record[field]):
            raise ValueError(f"setting record {file}: {field!r} is not a number")
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape(record: dict) -> tuple[int, int, int]:
    return record["n_layers"], record["n_heads"], record.get("n_kv_heads") or record["n_heads"]


def _components(record: dict) -> set[str]:
    return set(record["nodes"]) - {INPUT, LOGITS}


def pairing(a: Run, b: Run) -> tuple[str, str | None]:
    """How settings pair: ``("setting", None)`` by full name, or ``("grid", note)`` by grid point
    without the model (each run one model, different ones)."""
    if a.models == b.models:
        return "setting", None
    if len(a.models) == 1 and len(b.models) == 1:
        (ma,), (mb,) = a.models, b.models
        return (
            "grid",
            f"run A holds model {ma}, run B model {mb}: settings are paired by task, algorithm, corruption, metric and direction",
        )
    raise ValueError(
        f"runs {a.name} and {b.name} hold different sets of models ({sorted(a.models)} vs {sorted(b.models)}): "
        f"settings cannot be paired; diff runs of the same models, or of one model each"
    )


def _key(record: dict, by: str) -> str:
    return record["setting"] if by == "setting" else "__".join(record[k] for k in GRID_AXES)


def _failed_key(setting: str, by: str) -> str:
    """A failed setting's pairing key, from its name (model__task__algorithm__corruption__metric__direction)."""
    return setting if by == "setting" else setting.split("__", 1)[-1]


def compare_setting(ra: dict, rb: dict) -> dict:
    """The difference from ``ra`` (run A) to ``rb`` (run B) of one setting."""
    nodes_a, nodes_b = _components(ra), _components(rb)
    row = {
        "setting_a": ra["setting"],
        "setting_b": rb["setting"],
        "components_gained": sorted(nodes_b - nodes_a),
        "components_lost": sorted(nodes_a - nodes_b),
        "component_jaccard": agreement.jaccard(nodes_a, nodes_b),
        "faithfulness_a": ra.get("faithfulness"),
        "faithfulness_b": rb.get("faithfulness"),
        "faithfulness_change": (
            rb["faithfulness"] - ra["faithfulness"]
            if ra.get("faithfulness") is not None and rb.get("faithfulness") is not None
            else None
        ),
        "n_edges_a": len(ra["edges"]),
        "n_edges_b": len(rb["edges"]),
    }
    if _shape(ra) != _shape(rb):
        la, ha, ka = _shape(ra)
        lb, hb, kb = _shape(rb)
        row.update(
            level="components",
            note=(
                f"graphs differ in shape (A: n_layers={la}, n_heads={ha}, n_kv_heads={ka}; B: n_layers={lb}, n_heads={hb}, "
                f"n_kv_heads={kb}): compared on components by name only; a component of one model is not the same "
                f"component of the other"
            ),
            edges_gained=None,
            edges_lost=None,
            edge_jaccard=None,
            spearman=None,
            mean_abs_score_change=None,
            scored_edges=0,
        )
        return row
    edges_a, edges_b = {tuple(e) for e in ra["edges"]}, {tuple(e) for e in rb["edges"]}
    row.update(
        level="edges",
        note=None,
        edges_gained=sorted(edges_b - edges_a),
        edges_lost=sorted(edges_a - edges_b),
        edge_jaccard=agreement.jaccard(edges_a, edges_b),
        **_score_shift(ra.get("scores"), rb.get("scores")),
    )
    return row


def _score_shift(sa: list | None, sb: list | None) -> dict:
    """Spearman of ``|score|`` and mean ``|score_B - score_A|`` over the edges both runs score (finite in both)."""
    if sa is None or sb is None or len(sa) != len(sb):
        return {"spearman": None, "mean_abs_score_change": None, "scored_edges": 0}
    a = np.array([math.nan if s is None else s for s in sa], dtype=float)
    b = np.array([math.nan if s is None else s for s in sb], dtype=float)
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return {"spearman": None, "mean_abs_score_change": None, "scored_edges": 0}
    rho = agreement.rank_correlation(a[both], b[both])["spearman"] if both.sum() > 1 else math.nan
    return {
        "spearman": None if math.isnan(rho) else rho,
        "mean_abs_score_change": float(np.abs(b[both] - a[both]).mean()),
        "scored_edges": int(both.sum()),
    }


def diff_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """Compare two sweep runs setting by setting (see the module docstring)."""
    a, b = load_run(run_a), load_run(run_b)
    by, note = pairing(a, b)
    keyed_a = {_key(r, by): r for r in a.records.values()}
    keyed_b = {_key(r, by): r for r in b.records.values()}
    shared = sorted(keyed_a.keys() & keyed_b.keys())
    if not shared:  # an empty table would read as "no differences"
        raise ValueError(
            f"runs {a.name} and {b.name} share no setting (A has e.g. {min(keyed_a)}, B {min(keyed_b)}): "
            "nothing to compare; diff runs of overlapping grids"
        )
    rows = [{"key": k, **compare_setting(keyed_a[k], keyed_b[k])} for k in shared]
    return {
        "run_a": {"name": a.name, "path": str(a.path), "models": sorted(a.models)},
        "run_b": {"name": b.name, "path": str(b.path), "models": sorted(b.models)},
        "paired_by": by,
        "note": note,
        "parameter_changes": parameter_changes(a, b),
        "settings": rows,
        "only_in_a": sorted(keyed_a.keys() - keyed_b.keys()),
        "only_in_b": sorted(keyed_b.keys() - keyed_a.keys()),
        "failed_in_a": [_failed_key(s, by) for s in a.failed],
        "failed_in_b": [_failed_key(s, by) for s in b.failed],
    }


# -- rendering ----------------------------------------------------------------------------------

SUMMARY_HEADER = [
    "setting",
    "edges A",
    "edges B",
    "gained",
    "lost",
    "edge Jaccard",
    "component Jaccard",
    "Spearman of abs scores",
    "mean abs score change",
    "faithfulness A",
    "faithfulness B",
    "faithfulness change",
]
LIST_LIMIT = 25  # items listed inline per line of HTML and Markdown (as in the sweep report); diff.json has them all


def _summary_rows(diff: dict) -> list[list]:
    rows = []
    for s in diff["settings"]:
        gained = (
            len(s["edges_gained"]) if s["edges_gained"] is not None else f"{len(s['components_gained'])} components"
        )
        lost = len(s["edges_lost"]) if s["edges_lost"] is not None else f"{len(s['components_lost'])} components"
        rows.append(
            [
                s["key"],
                s["n_edges_a"],
                s["n_edges_b"],
                gained,
                lost,
                s["edge_jaccard"],
                s["component_jaccard"],
                s["spearman"],
                s["mean_abs_score_change"],
                s["faithfulness_a"],
                s["faithfulness_b"],
                s["faithfulness_change"],
            ]
        )
    return rows


def _names(items: list, limit: int = LIST_LIMIT) -> str:
    text = [" -> ".join(x) if isinstance(x, (list, tuple)) else str(x) for x in items[:limit]]
    more = f" ... and {len(items) - limit} more (diff.json)" if len(items) > limit else ""
    return (", ".join(text) or "none") + more


def _details(s: dict) -> list[tuple[str, str]]:
    lines = []
    if s["note"]:
        lines.append(("note", s["note"]))
    if s["edges_gained"] is not None:
        lines += [("edges gained", _names(s["edges_gained"])), ("edges lost", _names(s["edges_lost"]))]
    lines += [("components gained", _names(s["components_gained"])), ("components lost", _names(s["components_lost"]))]
    return lines


def _title(diff: dict) -> str:
    return f"Run diff: {diff['run_a']['name']} -> {diff['run_b']['name']}"


def parameter_note(diff: dict) -> str | None:
    """A warning that the runs were made with different shared parameters, or None."""
    changes = diff.get("parameter_changes") or {}
    if not changes:
        return None
    listed = ", ".join(f"{k} {a!r} in A, {b!r} in B" for k, (a, b) in changes.items())
    return f"the runs were made with different parameters ({listed}): differences may come from these"


def _intro(diff: dict) -> list[str]:
    warning = parameter_note(diff)
    lines = [f"Warning: {warning}."] if warning else []
    lines += [
        f"Run A: {diff['run_a']['path']} ({', '.join(diff['run_a']['models'])}); "
        f"run B: {diff['run_b']['path']} ({', '.join(diff['run_b']['models'])}). "
        f"{len(diff['settings'])} settings in both; gained and lost are from A to B. Score shift over the edges "
        f"both runs score: Spearman rank correlation of |score|, mean |score B - score A|."
    ]
    if diff["note"]:
        lines.append(diff["note"] + ".")
    return lines


def _one_run_only(diff: dict) -> list[tuple[str, list[str]]]:
    return [
        ("Only in run A", diff["only_in_a"]),
        ("Only in run B", diff["only_in_b"]),
        ("Failed in run A", diff["failed_in_a"]),
        ("Failed in run B", diff["failed_in_b"]),
    ]


def _details_block(s: dict) -> R.Block:
    items = _details(s)
    html = "<ul>" + "".join(f"<li><b>{escape(k)}:</b> {escape(v)}</li>" for k, v in items) + "</ul>"
    return R.Block(html, "\n".join(f"- **{k}:** {v}" for k, v in items))


def _sections(diff: dict) -> list[R.Section]:
    """The diff as report sections (rendered by the shared :mod:`circuitfind.reports.render`)."""
    summary = R.section(
        "Summary",
        *(R.text(line) for line in _intro(diff)),
        R.table(SUMMARY_HEADER, _summary_rows(diff)),
        *(R.text(_names(items), bold=f"{label}:") for label, items in _one_run_only(diff)),
    )
    settings = [R.section(s["key"], _details_block(s), level=3) for s in diff["settings"]]
    return [summary, R.section("Per setting", R.text("Edges gained and lost, from run A to run B.")), *settings]


def to_markdown(diff: dict) -> str:
    return R.markdown_page(_title(diff), _sections(diff))


def to_html(diff: dict) -> str:
    return R.html_page(_title(diff), _sections(diff))


def write_diff(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> dict:
    """Diff two runs and write ``diff.html``, ``diff.md`` and ``diff.json`` into ``out_dir`` (default:
    ``<run B>/diff-<run A's name>``; a symbolic link there is replaced by a folder, never written through),
    atomically; return their paths, the Markdown and the ``warning`` that the runs' parameters differ (or None)."""
    diff = diff_runs(run_a, run_b)
    out = Path(out_dir) if out_dir is not None else Path(run_b) / f"diff-{Path(run_a).resolve().name}"
    if out_dir is None and out.is_symlink():  # the default folder is the run's own: never write through a link
        out.unlink()
    markdown = to_markdown(diff)
    paths = {
        "json": str(write_json(out / "diff.json", diff)),
        "html": str(write_text(out / "diff.html", to_html(diff))),
        "markdown": str(write_text(out / "diff.md", markdown)),
    }
    return {**paths, "markdown_text": markdown, "warning": parameter_note(diff)}


__all__ = ["Run", "compare_setting", "diff_runs", "load_run", "pairing", "write_diff"]
