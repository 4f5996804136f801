"""The sweep's circuit diff report, built around the researcher's questions.

Sections, in order: which choice of setting moves the circuit (axes ranked by ``1 - mean edge
Jaccard`` over pairs of settings that differ on that axis only, with bootstrap intervals over the
pairs; the robust and the setting-dependent edges and components); the settings with their health
flags and the pitfalls of their choices (:mod:`circuitfind.runs.health`); then per (model, task): overlaps
between settings, faithfulness curves as small multiples, circuit drawings, component stability,
agreement with a reference, and bootstrap intervals of edge scores over prompts (flagged settings
left out). Statistics come from :mod:`circuitfind.runs.statistics`; rendering from
:mod:`circuitfind.reports.render` (HTML with inline SVG, and the same as Markdown).
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape
from pathlib import Path

from circuitfind.io import write_text
from circuitfind.reports import figures
from circuitfind.reports import render as R
from circuitfind.runs import health
from circuitfind.runs.statistics import axis_effects, compare_records, nan_for_null, record_components, record_edges
from circuitfind.threads import torch_threads

SETTINGS_HEADER = [
    "setting (algorithm/corruption/metric/direction)",
    "edges",
    "components",
    "faithfulness",
    "CPR",
    "CMD",
    "clean",
    "corrupt",
    "seconds",
    "health flags",
    "pitfalls (see below)",
]
AXES_HEADER = [
    "axis",
    "values",
    "pairs",
    "moves the circuit (1 - edge Jaccard)",
    "edge Jaccard [95% CI]",
    "component Jaccard [95% CI]",
    "Spearman of |score| [95% CI]",
]
STABILITY_HEADER = ["component", "fraction of settings"]
APPEAR_HEADER = ["setting", "appear", "vanish"]
REFERENCE_HEADER = ["setting", "edge precision", "edge recall", "edge F1", "component F1", "ROC AUC"]
BOOTSTRAP_HEADER = ["edge", "mean", "low", "high"]
MAX_LINES_PER_PANEL = 6
CURVE_SPLITS = (("algorithm",), ("algorithm", "metric"), ("algorithm", "metric", "direction"))


def _label(record: dict) -> str:
    return "/".join(str(record[k]) for k in ("algorithm", "corruption", "metric", "direction"))


def _interval(stat: dict) -> str:
    if not stat["n"]:
        return "n/a"
    if stat.get("reason") or math.isnan(stat["low"]):  # undefined: runs.statistics.interval_reason
        return f"{stat['mean']:.3f} (no interval: {stat.get('reason') or 'one pair'})"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def _edge_text(edge) -> str:
    return " -> ".join(edge)


def _axes_sections(effects: list[dict], groups: list[dict]) -> list[R.Section]:
    intro = R.text(
        "Each axis of the grid is judged by the pairs of healthy settings that differ on that axis only "
        "(every other choice equal). For each pair: the Jaccard overlap of the circuits' edges and of their "
        "components, and the Spearman correlation of |edge score| over the edges in either circuit. "
        "Intervals: 95% percentile bootstrap over those pairs (not over prompts); with few pairs they are rough. "
        "Flagged settings (see the health checks) are left out."
    )
    blocks = [intro]
    if effects:
        rows = [
            [
                e["axis"],
                ", ".join(e["values"]),
                f"{len(e['pairs'])} ({e['skipped_pairs']} across graph shapes skipped)"
                if e["skipped_pairs"]
                else len(e["pairs"]),
                e["movement"],
                _interval(e["edge_jaccard"]),
                _interval(e["node_jaccard"]),
                _interval(e["spearman"]),
            ]
            for e in effects
        ]
        blocks.append(R.table(AXES_HEADER, rows))
        svg = figures.interval_bars(
            [e["axis"] for e in effects],
            [e["movement"] for e in effects],
            [math.nan if e.get("movement_reason") else e["movement_low"] for e in effects],
            [math.nan if e.get("movement_reason") else e["movement_high"] for e in effects],
            "How much each choice moves the circuit",
            "1 - mean edge Jaccard (95% CI over pairs)",
        )
        blocks.append(R.figure(svg, f"Largest first: {effects[0]['axis']} moves the circuit most."))
    else:
        blocks.append(R.text("No axis takes two values among the healthy settings: nothing to rank."))
    sections = [R.section("Which choice matters", *blocks)]
    for g in groups:
        rob = g["robust"]
        where = f" ({g['model']} on {g['task']})" if len(groups) > 1 else ""
        items = [
            R.text(
                f"Over the {rob['n_settings']} healthy settings. Robust: found in every one of them. "
                "Setting-dependent: found in every setting where the axis takes this value and in none where it does not."
            )
        ]
        for kind in ("edges", "components"):
            fmt = _edge_text if kind == "edges" else str
            robust = rob[kind]["robust"]
            items.append(R.text(", ".join(fmt(x) for x in robust) or "none", bold=f"Robust {kind} ({len(robust)}):"))
            dep = rob[kind]["dependent"]
            if dep:
                items.append(
                    R.table(
                        ["only when", "settings with that value", f"setting-dependent {kind}"],
                        [
                            [f"{d['axis']} = {d['value']}", d["n_settings"], ", ".join(fmt(x) for x in d["items"])]
                            for d in dep
                        ],
                    )
                )
            else:
                items.append(R.text("none", bold=f"Setting-dependent {kind}:"))
        sections.append(R.section(f"Robust and setting-dependent edges{where}", *items, level=3))
    return sections


def _settings_rows(group: dict) -> list[list]:
    rows = []
    for r in group["records"]:
        curve = r.get("curve") or {}
        checks = group["health"][r["setting"]]
        faith = r["faithfulness"] if r["faithfulness"] is not None else r.get("faithfulness_status", "n/a")
        flags = ", ".join(checks["flags"]) or "ok"
        rows.append(
            [
                _label(r),
                r["n_edges"],
                len(record_components(r)),
                faith,
                curve.get("cpr", float("nan")),
                curve.get("cmd", float("nan")),
                r["clean"],
                r["corrupt"],
                r.get("seconds", float("nan")),
                flags,
                ", ".join(
                    checks["notes"]
                    + (["corruption-free: found from the clean run"] if r.get("corruption_free") else [])
                )
                or "-",
            ]
        )
    return rows


def _health_sections(groups: list[dict]) -> list[R.Section]:
    blocks = []
    for g in groups:
        if len(groups) > 1:
            blocks.append(R.text("", bold=f"{g['model']} on {g['task']}: {len(g['names'])} settings"))
        rows = _settings_rows(g)
        for row in rows:  # flags in red
            row[9] = row[9] if row[9] == "ok" else R.Markup(f"<span class='flag'>{escape(row[9])}</span>", row[9])
        blocks.append(R.table(SETTINGS_HEADER, rows))
    flagged = [(r, f) for g in groups for r in g["records"] for f in g["health"][r["setting"]]["flags"]]
    if flagged:
        blocks.append(
            R.text(
                f"{len({r['setting'] for r, _ in flagged})} settings are flagged. Their results cannot be read as "
                "circuits: they are left out of the axis comparison, the consensus, the faithfulness curves and "
                "every significance table.",
                bold="Health flags.",
                css_class="flag",
            )
        )
        blocks.append(R.bullets(f"{_label(r)}: {flag}: {health.explain(r, flag)}" for r, flag in flagged))
    else:
        blocks.append(
            R.text(
                "No setting is flagged (degenerate scores, NaN faithfulness, empty circuit, clean = corrupt).",
                bold="Health flags.",
            )
        )
    notes = sorted(
        {n for g in groups for c in g["health"].values() for n in c["notes"]}, key=list(health.PITFALLS).index
    )
    sections = [R.section("Settings and health checks", *blocks)]
    if notes:
        sections.append(
            R.section(
                "Pitfalls of these settings",
                R.text(
                    "Facts about what each choice in this grid can show, "
                    "with the reason; they do not make a result wrong, they say how to read it."
                ),
                R.bullets(f"{code}: {health.PITFALLS[code][0]}. Why: {health.PITFALLS[code][1]}." for code in notes),
                level=3,
            )
        )
    return sections


def _curve_panels(group: dict) -> list[str]:
    """Faithfulness curves of the healthy settings, one panel per algorithm, split further (by metric,
    then direction) while a panel would hold more than :data:`MAX_LINES_PER_PANEL` lines."""
    recs = [r for r in group["records"] if r.get("curve") and not group["health"][r["setting"]]["flags"]]
    panels = []
    by_algorithm: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_algorithm[r["algorithm"]].append(r)
    for _algorithm, members in sorted(by_algorithm.items()):
        split = next(
            (keys for keys in CURVE_SPLITS if _largest_panel(members, keys) <= MAX_LINES_PER_PANEL), CURVE_SPLITS[-1]
        )
        panel_members: dict[tuple, list[dict]] = defaultdict(list)
        for r in members:
            panel_members[tuple(r[k] for k in split)].append(r)
        for key, rs in sorted(panel_members.items()):
            rest = [k for k in ("corruption", "metric", "direction") if k not in split]
            series = {
                "/".join(str(r[k]) for k in rest) or _label(r): (
                    r["curve"]["fractions"],
                    nan_for_null(r["curve"]["faithfulness"]),
                )
                for r in sorted(rs, key=_label)
            }
            panels.append(
                figures.line_chart(
                    series, "fraction of edges kept", "faithfulness", " / ".join(map(str, key)), 420, 240
                )
            )
    return panels


def _largest_panel(members: list[dict], keys: tuple[str, ...]) -> int:
    counts: dict[tuple, int] = defaultdict(int)
    for r in members:
        counts[tuple(r[k] for k in keys)] += 1
    return max(counts.values())


def _answer_list(answers: list[str], shown: int = 6) -> str:
    """An answer set for a table cell: every answer, or for a large set (greater-than's years) the
    first and last few around a count, so the cell stays readable."""
    if len(answers) <= shown:
        return " | ".join(map(repr, answers))
    head, tail = answers[: shown // 2], answers[-(shown // 2) :]
    middle = f"... ({len(answers) - len(head) - len(tail)} more) ..."
    return " | ".join([*map(repr, head), middle, *map(repr, tail)]) + f" ({len(answers)} answers)"


def _examples_section(records: list[dict], g: dict, several: bool) -> list[R.Section]:
    """A few example rows of the group's task (records written before examples were recorded have none)."""
    rows = next(
        (r["examples"] for r in records if (r["model"], r["task"]) == (g["model"], g["task"]) and r.get("examples")),
        None,
    )
    if not rows:
        return []
    where = f" ({g['model']} on {g['task']})" if several else ""
    table = R.table(
        ["clean", "corrupted", "answers", "counterfactual"],
        [
            [
                e["clean"],
                e["corrupted"] or "",
                _answer_list(e["answers"]),
                _answer_list(e["counter_answers"]),
            ]
            for e in rows
        ],
    )
    return [R.section(f"Example prompts{where}", table, level=3)]


def _group_sections(g: dict, several: bool) -> list[R.Section]:
    where = f" ({g['model']} on {g['task']})" if several else ""
    sections = []
    consensus = f"{g['consensus_fraction']:.0%}"
    summary = [
        R.text(", ".join(g["unanimous_nodes"]) or "none", bold="Components in every setting (healthy ones):"),
        R.text(", ".join(g["consensus_nodes"]) or "none", bold=f"Components in >= {consensus} of healthy settings:"),
        R.text(str(len(g["consensus_edges"])), bold=f"Edges in >= {consensus} of healthy settings:"),
        R.text(
            f"Mean pairwise edge Jaccard {_off_diagonal_mean(g['edge_jaccard']):.3f}, "
            f"component Jaccard {_off_diagonal_mean(g['node_jaccard']):.3f} (all settings)."
        ),
    ]
    cell = max(12, min(34, 900 // max(1, len(g["names"]))))
    label = dict(zip(g["names"], g["labels"], strict=True))
    maps = [
        figures.heatmap(g["edge_jaccard"], g["labels"], "edge Jaccard", cell),
        figures.heatmap(g["node_jaccard"], g["labels"], "component Jaccard", cell),
    ]
    if g["score_names"]:
        maps.append(
            figures.heatmap(
                g["spearman"], [label[n] for n in g["score_names"]], "Spearman rank correlation of |edge scores|", cell
            )
        )
    sections.append(
        R.section(
            f"Overlap between settings{where}",
            *summary,
            R.figures(maps, "Pairwise overlaps (rows named, columns numbered)"),
            level=3,
        )
    )
    panels = _curve_panels(g)
    if panels:
        sections.append(
            R.section(
                f"Faithfulness curves{where}",
                R.figures(
                    panels,
                    "Faithfulness of the top-scoring edges, one panel per algorithm (healthy settings; the dashed line is the full model)",
                ),
                level=3,
            )
        )
    shared = {tuple(e) for e in g["consensus_edges"]}
    first = g["records"][0]
    kv = first.get("n_kv_heads")
    legend = R.text(
        f"Dark: edge in >= {consensus} of the healthy settings; orange: found only in some. Solid q, dashed k, dotted v input."
    )
    consensus_drawing = figures.circuit_drawing(
        first["n_layers"],
        first["n_heads"],
        sorted(shared),
        shared,
        f"consensus circuit ({len(shared)} edges)",
        n_kv_heads=kv,
    )
    drawings = [
        figures.circuit_drawing(
            r["n_layers"],
            r["n_heads"],
            sorted(record_edges(r)),  # a set: drawn in a fixed order, so the report is byte-for-byte reproducible
            shared,
            f"{lab} ({r['n_edges']} edges{', flagged' if g['health'][r['setting']]['flags'] else ''})",
            n_kv_heads=r.get("n_kv_heads"),
        )
        for lab, r in zip(g["labels"], g["records"], strict=True)
    ]
    sections.append(
        R.section(
            f"Circuits{where}",
            legend,
            R.figure(consensus_drawing, "The consensus circuit"),
            R.figures(drawings, collapsed=f"The circuit of each setting ({len(drawings)} drawings)"),
            level=3,
        )
    )
    av = g["appear_vanish"]
    sections.append(
        R.section(
            f"Components that appear or vanish, against the consensus{where}",
            R.table(
                APPEAR_HEADER,
                [
                    [lab, ", ".join(av[n]["appear"]) or "-", ", ".join(av[n]["vanish"]) or "-"]
                    for lab, n in zip(g["labels"], g["names"], strict=True)
                ],
            ),
            level=3,
        )
    )
    sections.append(
        R.section(
            f"How often each component is found{where}",
            R.table(STABILITY_HEADER, [[c, f] for c, f in sorted(g["node_stability"].items(), key=lambda kv: -kv[1])]),
            level=3,
        )
    )
    if "reference" in g:
        ref = g["reference"]
        rows = [
            [
                lab,
                s["edges"]["precision"],
                s["edges"]["recall"],
                s["edges"]["f1"],
                s["nodes"]["f1"],
                s.get("roc_auc", float("nan")),
            ]
            for lab, s in zip(g["labels"], ref["scores"].values(), strict=True)
        ]
        sections.append(
            R.section(f"Against the reference `{ref['setting']}`{where}", R.table(REFERENCE_HEADER, rows), level=3)
        )
    if g["bootstrap"] or g["bootstrap_skipped"]:
        blocks = [
            R.text(
                "95% percentile bootstrap over prompts of each edge's mean score; flagged settings are not summarised."
            )
        ]
        for name, b in g["bootstrap"].items():
            blocks.append(
                R.text(
                    f"{b['excluding_zero']} edges with a {b['level']:.0%} interval excluding 0. Top edges by |mean score|:",
                    bold=label[name] + ":",
                )
            )
            blocks.append(
                R.table(BOOTSTRAP_HEADER, [[_edge_text(t["edge"]), t["mean"], t["low"], t["high"]] for t in b["top"]])
            )
        for name, reason in g["bootstrap_skipped"].items():
            blocks.append(R.text(f"no intervals: {reason}.", bold=label[name] + ":"))
        sections.append(R.section(f"Bootstrap intervals of edge scores (over prompts){where}", *blocks, level=3))
    return sections


def _off_diagonal_mean(m: list[list[float]]) -> float:
    n = len(m)
    vals = [m[i][j] for i in range(n) for j in range(n) if i != j and not math.isnan(m[i][j])]
    return sum(vals) / len(vals) if vals else float("nan")


METHODS_HEADER = ["method", "settings (healthy)", "mean faithfulness", "mean CPR", "what it is", "paper"]


def _methods_section(groups: list[dict]) -> list[R.Section]:
    """The run's methods, built-in and a researcher's own alike, ranked by their healthy settings' mean CPR
    (then mean faithfulness); what each is and its paper come from the method registry."""
    from circuitfind.methods import registry

    healthy: dict[str, list[dict]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for g in groups:
        for r in g["records"]:
            counts[r["algorithm"]] += 1
            if not g["health"][r["setting"]]["flags"]:
                healthy[r["algorithm"]].append(r)

    def mean(values: list) -> float:
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    rows = []
    for name in counts:
        try:
            method = registry.get_method(name)
            what, paper = method.summary, method.paper
        except ValueError:  # a method of the user's that is not importable here
            what, paper = "(not importable here)", "-"
        members = healthy[name]
        cpr = mean([(r.get("curve") or {}).get("cpr") for r in members])
        faith = mean([r["faithfulness"] for r in members])
        rows.append([name, f"{counts[name]} ({len(members)})", faith, cpr, what, paper])

    def rank(row: list) -> tuple[float, float]:  # higher CPR first, then higher faithfulness; undefined last
        cpr, faith = float(row[3]), float(row[2])
        return (-cpr if math.isfinite(cpr) else math.inf, -faith if math.isfinite(faith) else math.inf)

    rows.sort(key=rank)
    note = R.text(
        "Ranked by the mean CPR (area under the faithfulness curve) of each method's healthy settings, then "
        "by mean faithfulness; methods without a curve (node circuits, path patching, AtP) rank by faithfulness."
    )
    return [R.section("Methods, ranked", note, R.table(METHODS_HEADER, rows))]


def report_sections(
    records: list[dict], reference: dict | None = None, consensus_fraction: float = 0.5
) -> list[R.Section]:
    """The report's sections (statistics computed here)."""
    with torch_threads(1):  # small tensors only: extra intra-op threads just wait for busy cores
        groups = compare_records(records, reference, consensus_fraction)
        effects = axis_effects(records)
    sections = _axes_sections(effects, groups) + _methods_section(groups) + _health_sections(groups)
    for g in groups:
        sections.append(R.section(f"{g['model']} on {g['task']}: {len(g['names'])} settings"))
        sections += _examples_section(records, g, len(groups) > 1) + _group_sections(g, len(groups) > 1)
    return sections


def write_report(
    records: list[dict],
    out_dir: str | Path,
    title: str = "Circuit diff report",
    reference: dict | None = None,
    consensus_fraction: float = 0.5,
    note: str | None = None,
) -> dict[str, str]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (atomically); return their paths and the
    Markdown. ``note``: a warning shown above the contents (e.g. that the run is unfinished)."""
    if not records:
        raise ValueError("no settings to compare")
    sections = report_sections(records, reference, consensus_fraction)
    intro = [R.text(note, bold="Note:", css_class="flag")] if note else []
    markdown = R.markdown_page(title, sections, intro)
    html = write_text(Path(out_dir) / "report.html", R.html_page(title, sections, intro))
    md = write_text(Path(out_dir) / "report.md", markdown)
    return {"html": str(html), "markdown": str(md), "markdown_text": markdown}


def write_run_report(
    run_dir: str | Path, reference: str | None = None, title: str | None = None, note: str | None = None
) -> dict[str, str | None]:
    """The diff report of a sweep's run folder; ``reference`` names the setting taken as the truth. The
    returned ``note`` is the warning shown in the report (``note``, and records the manifest lists that are gone)."""
    from circuitfind.runs.sweep import load_records, missing_records

    records = load_records(run_dir)
    missing = missing_records(run_dir)
    if missing:  # a finished run that lost records: say so, as `diff` refuses such a folder
        lost = (
            f"{len(missing)} of {len(records) + len(missing)} settings of this run have no record "
            f"({', '.join(missing)}): the report covers the other {len(records)}"
        )
        note = f"{note}; {lost}" if note else lost
    ref = None
    if reference is not None:
        ref = next((r for r in records if r["setting"] == reference), None)
        if ref is None:
            raise ValueError(f"reference setting {reference!r} is not in {run_dir}")
    title = title or f"Circuit diff report: {Path(run_dir).name}"
    return {**write_report(records, run_dir, title, reference=ref, note=note), "note": note}
