"""The sweep's circuit diff report, built around the researcher's questions.

Sections, in order: what was run (the grid and its parameters, from the run's manifest); which choice
of setting moves the circuit (axes ranked by ``1 - mean edge Jaccard`` over pairs of settings that
differ on that axis only, with bootstrap intervals over the pairs; algorithms compared at equal
circuit size; the robust and the setting-dependent edges and components); the methods; the settings
with their health flags and the pitfalls of their choices (:mod:`circuitfind.runs.health`); then per
(model, task): overlaps between settings, the layer x layer edge-score mass, faithfulness curves as
small multiples, circuit drawings, component stability, agreement with a reference, and bootstrap
intervals of edge scores over prompts. Flagged settings are left out of every statistic and figure.

At any size the page stays readable: no list runs past :data:`INLINE` items; longer ones are tables of
the strongest, grouped by the component they feed, with every item in a CSV file written beside the
report (``robust-edges.csv``, ``robust-components.csv``, ``component-stability.csv``). Statistics come
from :mod:`circuitfind.runs.statistics`; rendering from :mod:`circuitfind.reports.render` (HTML with
inline SVG figures, :mod:`circuitfind.reports.figures`, and the same as Markdown).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from html import escape
from pathlib import Path
from typing import Any

from circuitfind import progress
from circuitfind.io import write_text
from circuitfind.names import parse_node
from circuitfind.reports import figures
from circuitfind.reports import render as R
from circuitfind.runs import health
from circuitfind.runs.statistics import axis_effects, compare_records, nan_for_null, record_components
from circuitfind.threads import torch_threads

INLINE = 25  # no list in the page longer than this: longer ones are tables of the strongest, with the full file beside

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


def _interval(stat: dict, why: str = "no pair to compare") -> str:
    if not stat["n"]:
        return f"n/a: {why}"
    if stat.get("reason") or math.isnan(stat["low"]):  # undefined: runs.statistics.interval_reason
        return f"{R.fmt(stat['mean'])} (no interval: {stat.get('reason') or 'one pair'})"
    return f"{R.fmt(stat['mean'])} [{R.fmt(stat['low'])}, {R.fmt(stat['high'])}]"


def _dependent_table(dependent: list[dict], what: str, ranked: Callable[[list], list[str]]) -> R.Block:
    """The setting-dependent ``what`` (edges or components) as a table, one row per axis value (at most
    :data:`INLINE`), with their count and the strongest five (``ranked``: the items as text, strongest first)."""
    if not dependent:
        return R.text("none", bold=f"Setting-dependent {what}:")
    return R.table(
        ["only when", "settings with that value", f"setting-dependent {what}", "strongest five"],
        [
            [f"{d['axis']} = {d['value']}", d["n_settings"], len(d["items"]), ", ".join(ranked(d["items"])[:5])]
            for d in dependent[:INLINE]
        ],
    )


def _capped(items: list[str], where: str, limit: int = INLINE) -> str:
    """Items for one line of text: all of them up to ``limit``, else the first ``limit`` and where the rest are."""
    if not items:
        return "none"
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more in {where})"


def _csv(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([R.fmt(v) if isinstance(v, float) else v for v in row])
    return out.getvalue()


def _link(name: str, text: str | None = None) -> R.Block:
    """A paragraph linking a file beside the report."""
    text = text or name
    return R.Block(f"<p><a href='{escape(name)}'>{escape(text)}</a></p>", f"[{text}]({name})")


def _into(receiver: str, n_layers: int, band: int) -> str:
    """The receiving component group of an edge: heads (q/k/v) or MLPs of a band of layers, or the logits."""
    node = parse_node(receiver)
    if node.kind == "logits":
        return "logits"
    first = node.layer // band * band
    layers = f"layer {first}" if band == 1 else f"layers {first}-{min(first + band, n_layers) - 1}"
    return f"{'MLP' if node.kind == 'mlp' else 'heads'} of {layers}"


def _band(n_layers: int) -> int:
    """Layers per group, so that heads and MLPs by band and the logits fit in :data:`INLINE` rows."""
    return max(1, math.ceil(n_layers / ((INLINE - 1) // 2)))


def _edge_text(edge) -> str:
    return " -> ".join(edge)


def _axes_sections(effects: list[dict], groups: list[dict], files: dict[str, str]) -> list[R.Section]:
    intro = R.text(
        "Each axis of the grid is judged by the pairs of healthy settings that differ on that axis only "
        "(every other choice equal). For each pair: the Jaccard overlap of the circuits' edges and of their "
        "components, and the Spearman correlation of |edge score| over the edges in either circuit. "
        "Intervals: 95% percentile bootstrap over those pairs (not over prompts); with few pairs they are rough. "
        "Flagged settings (see the health checks) are left out."
    )
    blocks = [intro]
    algorithm = next((e for e in effects if e["equal_size"]), None)
    if algorithm is not None:
        sizes = sorted({p["size"] for p in algorithm["pairs"]})
        left = algorithm["left_out"]
        blocks.append(
            R.text(
                "Algorithms return circuits of very different sizes, and the Jaccard of a small and a large circuit "
                "measures their sizes as much as the choice. So each pair of algorithms is compared at equal size: "
                "at the smaller circuit's size k, each circuit cut to its k edges of largest |score| (from the stored "
                f"scores; k = {', '.join(map(str, sizes)) or 'n/a'})."
                + (
                    " A circuit without edge scores cannot be cut: it is compared only with circuits at least its size, "
                    f"and these settings are left out of this axis: {_capped(left, 'the settings table')}."
                    if left
                    else ""
                ),
                bold="Algorithm axis at equal size.",
            )
        )
    if effects:
        rows = [
            [
                e["axis"] + (" (equal size)" if e["equal_size"] else ""),
                ", ".join(e["values"]),
                f"{len(e['pairs'])} ({e['skipped_pairs']} across graph shapes skipped)"
                if e["skipped_pairs"]
                else len(e["pairs"]),
                e["movement"] if e["pairs"] else "n/a: no pair to compare (at equal size)",
                _interval(e["edge_jaccard"]),
                _interval(e["node_jaccard"]),
                _interval(e["spearman"], "no pair with three scored edges"),
            ]
            for e in effects
        ]
        blocks.append(R.table(AXES_HEADER, rows))
        ranked = [e for e in effects if e["pairs"]]
        if ranked:
            svg = figures.interval_bars(
                [e["axis"] for e in ranked],
                [e["movement"] for e in ranked],
                [math.nan if e.get("movement_reason") else e["movement_low"] for e in ranked],
                [math.nan if e.get("movement_reason") else e["movement_high"] for e in ranked],
                "How much each choice moves the circuit",
                "1 - mean edge Jaccard (95% CI over pairs)",
            )
            blocks.append(R.figure(svg, f"Largest first: {ranked[0]['axis']} moves the circuit most."))
    else:
        blocks.append(R.text("No axis takes two values among the healthy settings: nothing to rank."))
    sections = [R.section("Which choice matters", *blocks)]
    for g in groups:
        sections.append(_robust_section(g, len(groups) > 1, files))
    return sections


def _file_name(stem: str, g: dict, several: bool) -> str:
    return f"{stem}-{g['model']}-{g['task']}.csv".replace("/", "_") if several else f"{stem}.csv"


def _robust_section(g: dict, several: bool, files: dict[str, str]) -> R.Section:
    """Robust and setting-dependent edges and components: counts, tables of the strongest grouped by the
    component they feed, and every one of them in CSV files beside the report."""
    rob = g["robust"]
    where = f" ({g['model']} on {g['task']})" if several else ""
    strength, comp_strength = g["edge_strength"], g["component_strength"]
    n_layers = g["records"][0]["n_layers"]
    band = _band(n_layers)
    edges_file, comps_file = _file_name("robust-edges", g, several), _file_name("robust-components", g, several)
    scored = bool(strength)
    order = (
        "strongest first (mean relative |score| over the healthy settings with edge scores)"
        if scored
        else "in graph order (no setting has edge scores)"
    )

    def by_strength(items: Iterable, table: dict) -> list:
        return sorted(items, key=lambda x: (-table.get(x, 0.0), x))

    def edge_rows(found: str, edges: list) -> list[list]:
        return [[found, s, r, _into(r, n_layers, band), strength.get((s, r), float("nan"))] for s, r in edges]

    edge_csv = []
    comp_csv = []
    blocks = [
        R.text(
            f"Over the {rob['n_settings']} healthy settings. Robust: found in every one of them. "
            "Setting-dependent: found in every setting where the axis takes this value and in none where it "
            f"does not. Lists are {order}; every item is in the files linked below."
        )
    ]
    robust_edges = by_strength(rob["edges"]["robust"], strength)
    edge_csv += edge_rows("every healthy setting", robust_edges)
    blocks.append(R.text("", bold=f"Robust edges ({len(robust_edges)})."))
    if robust_edges:
        groups: dict[str, list] = defaultdict(list)
        for e in robust_edges:
            groups[_into(e[1], n_layers, band)].append(e)
        total = sum(strength.get(e, 0.0) for e in robust_edges) or 1.0
        group_rows = sorted(groups.items(), key=lambda kv: -sum(strength.get(e, 0.0) for e in kv[1]))
        blocks.append(
            R.table(
                ["into", "robust edges", "share of their |score|", "strongest three"],
                [
                    [
                        name,
                        len(members),
                        sum(strength.get(e, 0.0) for e in members) / total if scored else "n/a: no edge scores",
                        ", ".join(_edge_text(e) for e in members[:3]),
                    ]
                    for name, members in group_rows[:INLINE]
                ],
            )
        )
        shown = robust_edges[:INLINE]
        blocks.append(
            R.table(
                ["edge", "into", "mean relative |score|"],
                [[_edge_text(e), _into(e[1], n_layers, band), strength.get(e, float("nan"))] for e in shown],
            )
        )
    dependent = rob["edges"]["dependent"]
    for d in dependent:
        d_items = by_strength(d["items"], strength)
        edge_csv += edge_rows(f"only when {d['axis']} = {d['value']}", d_items)
    blocks.append(
        _dependent_table(dependent, "edges", lambda items: [_edge_text(e) for e in by_strength(items, strength)])
    )
    robust_comps = by_strength(rob["components"]["robust"], comp_strength)
    comp_csv += [["every healthy setting", c, comp_strength.get(c, float("nan"))] for c in robust_comps]
    blocks.append(
        R.text(_capped(robust_comps, comps_file), bold=f"Robust components ({len(robust_comps)}; strongest first):")
    )
    comp_dep = rob["components"]["dependent"]
    for d in comp_dep:
        comp_csv += [
            [f"only when {d['axis']} = {d['value']}", c, comp_strength.get(c, float("nan"))]
            for c in by_strength(d["items"], comp_strength)
        ]
    blocks.append(_dependent_table(comp_dep, "components", lambda items: by_strength(items, comp_strength)))
    files[edges_file] = _csv(["found", "sender", "receiver", "into", "mean relative |score|"], edge_csv)
    files[comps_file] = _csv(["found", "component", "share of |score| it sends or receives"], comp_csv)
    blocks.append(_link(edges_file, f"All robust and setting-dependent edges ({len(edge_csv)}): {edges_file}"))
    blocks.append(_link(comps_file, f"All robust and setting-dependent components ({len(comp_csv)}): {comps_file}"))
    return R.section(f"Robust and setting-dependent edges{where}", *blocks, level=3)


def _settings_rows(group: dict) -> list[list]:
    rows = []
    for r in group["records"]:
        checks = group["health"][r["setting"]]
        faith = r["faithfulness"] if r["faithfulness"] is not None else r.get("faithfulness_status", "n/a")
        flags = ", ".join(checks["flags"]) or "ok"
        rows.append(
            [
                _label(r),
                r["n_edges"],
                len(record_components(r)),
                faith,
                _curve_value(r, "cpr"),
                _curve_value(r, "cmd"),
                r["clean"],
                r["corrupt"],
                r.get("seconds", "n/a: not recorded"),
                flags,
                ", ".join(
                    checks["notes"]
                    + (["corruption-free: found from the clean run"] if r.get("corruption_free") else [])
                )
                or "-",
            ]
        )
    return rows


def _curve_value(record: dict, key: str) -> float | str:
    """CPR or CMD of a setting, or why it has none (a node circuit has no edge ranking to grow)."""
    from circuitfind.runs.statistics import NODE_LEVEL

    curve = record.get("curve") or {}
    value = curve.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if record.get("algorithm") in NODE_LEVEL:
        return "n/a: no curve for node circuits"
    if not curve:
        return "n/a: no curve recorded" if record.get("scores") is not None else "n/a: no curve, no edge ranking"
    return "n/a: the curve is undefined (NaN faithfulness)"


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
                    series,
                    "edges kept (share of the graph, log scale)",
                    "faithfulness",
                    " / ".join(map(str, key)),
                    460,
                    250,
                    log_x=True,
                    reference=1.0,
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


def _group_sections(g: dict, several: bool, files: dict[str, str], run_dir: Path | None = None) -> list[R.Section]:
    where = f" ({g['model']} on {g['task']})" if several else ""
    sections = []
    consensus = f"{g['consensus_fraction']:.0%}"
    stability_file = _file_name("component-stability", g, several)
    by_strength = sorted(
        g["node_stability"], key=lambda c: (-g["node_stability"][c], -g["component_strength"].get(c, 0.0), c)
    )
    files[stability_file] = _csv(
        ["component", "fraction of healthy settings", "share of |score| it sends or receives"],
        [[c, g["node_stability"][c], g["component_strength"].get(c, float("nan"))] for c in by_strength],
    )
    strongest = {c: i for i, c in enumerate(by_strength)}
    unanimous = sorted(g["unanimous_nodes"], key=strongest.__getitem__)
    common = sorted(g["consensus_nodes"], key=strongest.__getitem__)
    n_healthy = len(g["healthy"])
    summary = [
        R.text(
            _capped(unanimous, stability_file), bold=f"Components in every setting (healthy ones; {len(unanimous)}):"
        ),
        R.text(
            _capped(common, stability_file), bold=f"Components in >= {consensus} of healthy settings ({len(common)}):"
        ),
        R.text(str(len(g["consensus_edges"])), bold=f"Edges in >= {consensus} of healthy settings:"),
        R.text(
            f"Mean pairwise edge Jaccard {_mean_text(g['edge_jaccard'])}, "
            f"component Jaccard {_mean_text(g['node_jaccard'])} (the {n_healthy} healthy settings; "
            + (
                f"{len(g['names']) - n_healthy} flagged ones are left out)."
                if n_healthy < len(g["names"])
                else "none is flagged)."
            )
        ),
    ]
    label = dict(zip(g["names"], g["labels"], strict=True))
    kept = [label[n] for n in g["matrix_names"]]
    maps = []
    if len(kept) >= 2:
        maps += [
            figures.heatmap(g["edge_jaccard"], kept, "edge Jaccard", scale_label="Jaccard"),
            figures.heatmap(g["node_jaccard"], kept, "component Jaccard", scale_label="Jaccard"),
        ]
    if len(g["score_names"]) >= 2:
        maps.append(
            figures.heatmap(
                g["spearman"],
                [label[n] for n in g["score_names"]],
                "Spearman of |edge scores|",
                vmin=-1.0,
                vmax=1.0,
                cmap="RdBu_r",
                scale_label="Spearman",
            )
        )
    overlap = [*summary]
    if maps:
        overlap.append(
            R.figures(
                maps,
                "Pairwise overlaps of the healthy settings (rows named, columns numbered): Jaccard of the circuits' "
                "edges and components (0: disjoint, 1: the same), and the Spearman rank correlation of |edge score| "
                "over every edge of the graph",
            )
        )
    else:
        overlap.append(R.text("Fewer than two healthy settings: no overlaps to show."))
    sections.append(R.section(f"Overlap between settings{where}", *overlap, level=3))
    if g["layer_mass"]:
        sections.append(
            R.section(
                f"Where the edge scores are, layer by layer{where}",
                R.text(
                    "For each healthy setting with edge scores: the share of its total |edge score| (over every edge "
                    "of the graph, not only the circuit's) between each sender layer (rows, from the input) and "
                    "receiver layer (columns, to the logits); one colour scale for all panels."
                ),
                R.figure(
                    figures.layer_mass({label[n]: m for n, m in g["layer_mass"].items()}),
                    "Edge-score mass, sender layer x receiver layer",
                ),
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
    legend = R.text(
        f"Dark: edge in >= {consensus} of the healthy settings; orange: found only in some. Solid q, dashed k, "
        "dotted v input. Hover a line for its edge."
    )
    consensus_record = {**first, "edges": sorted(shared), "setting": "consensus"}
    consensus_drawing = figures.circuit_picture(consensus_record, shared, f"consensus circuit ({len(shared)} edges)")
    drawings = [
        figures.circuit_picture(
            r, shared, f"{lab} ({r['n_edges']} edges{', flagged' if g['health'][r['setting']]['flags'] else ''})"
        )
        for lab, r in zip(g["labels"], g["records"], strict=True)
    ]
    circuit_blocks = [legend]
    if run_dir is not None and (Path(run_dir) / "explorer.html").is_file():
        circuit_blocks.append(
            _link("explorer.html", "Explore the circuits interactively: explorer.html (in this run folder)")
        )
    circuit_blocks += [
        R.figure(consensus_drawing, "The consensus circuit"),
        R.figures(drawings, collapsed=f"The circuit of each setting ({len(drawings)} drawings)"),
    ]
    sections.append(R.section(f"Circuits{where}", *circuit_blocks, level=3))
    av = g["appear_vanish"]
    flagged = {n for n in g["names"] if g["health"][n]["flags"]}
    sections.append(
        R.section(
            f"Components that appear or vanish, against the consensus{where}",
            R.text(
                f"Against the components in >= {consensus} of the healthy settings, strongest first "
                f"(at most 10 a cell; every component's frequency is in {stability_file})."
            ),
            R.table(
                APPEAR_HEADER,
                [
                    [
                        lab + (" (flagged)" if n in flagged else ""),
                        _cell(sorted(av[n]["appear"], key=lambda c: strongest.get(c, len(strongest)))),
                        _cell(sorted(av[n]["vanish"], key=lambda c: strongest.get(c, len(strongest)))),
                    ]
                    for lab, n in zip(g["labels"], g["names"], strict=True)
                ],
            ),
            level=3,
        )
    )
    sections.append(
        R.section(
            f"How often each component is found{where}",
            R.text(
                f"{len(by_strength)} components found in some healthy setting; the {min(INLINE, len(by_strength))} most "
                "often found (then strongest) are listed."
            ),
            R.table(STABILITY_HEADER, [[c, g["node_stability"][c]] for c in by_strength[:INLINE]]),
            _link(stability_file, f"Every component's frequency: {stability_file}"),
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
            n = b["excluding_zero"]
            lead = f"{n} edges with a {b['level']:.0%} interval excluding 0 (of {b['n_edges']})."
            if b["top"]:
                lead += f" The {len(b['top'])} of them with the largest |mean score|:"
            blocks.append(R.text(lead, bold=label[name] + ":"))
            if b["top"]:
                blocks.append(
                    R.table(
                        BOOTSTRAP_HEADER,
                        [[_edge_text(t["edge"]), *(_precise(t[k]) for k in ("mean", "low", "high"))] for t in b["top"]],
                    )
                )
        for name, reason in g["bootstrap_skipped"].items():
            blocks.append(R.text(f"no intervals: {reason}.", bold=label[name] + ":"))
        sections.append(R.section(f"Bootstrap intervals of edge scores (over prompts){where}", *blocks, level=3))
    return sections


def _precise(value: float) -> float | str:
    """An interval's number: three decimals, or three significant digits below 0.01, so an end that
    excludes 0 never prints as 0.000."""
    return value if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def _cell(items: list[str], limit: int = 10) -> str:
    """A table cell of names: up to ``limit`` of them, then how many more."""
    if not items:
        return "-"
    more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _mean_text(m: list[list[float]]) -> str:
    value = _off_diagonal_mean(m)
    return "n/a (fewer than two healthy settings)" if math.isnan(value) else R.fmt(value)


def _off_diagonal_mean(m: list[list[float]]) -> float:
    n = len(m)
    vals = [m[i][j] for i in range(n) for j in range(n) if i != j and not math.isnan(m[i][j])]
    return sum(vals) / len(vals) if vals else float("nan")


def _method_facts(name: str, records: list[dict]) -> tuple[str, str]:
    """A method's one-line summary and paper: as its settings' records carry them (the sweep writes what the
    method registry says of the method that ran), else from the registry, for runs older than that field
    (importing a method loads the engines and transformers: seconds, for a report that runs no model)."""
    facts = next((r["method"] for r in records if isinstance(r.get("method"), dict)), None)
    if facts and isinstance(facts.get("summary"), str) and isinstance(facts.get("paper"), str):
        return facts["summary"], facts["paper"]
    from circuitfind.methods import registry

    try:
        method = registry.get_method(name)
        return method.summary, method.paper
    except ValueError:  # a method of the user's that is not importable here
        return "(not importable here)", "-"


METHODS_HEADER = ["method", "settings (healthy)", "mean faithfulness", "mean CPR", "what it is", "paper"]


def _methods_section(groups: list[dict]) -> list[R.Section]:
    """The run's methods, built-in and a researcher's own alike, ranked by their healthy settings' mean CPR
    (then mean faithfulness); what each is and its paper come from the method registry."""
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

    from circuitfind.runs.statistics import NODE_LEVEL

    ranked = []
    for name in counts:
        members = healthy[name]
        cpr = mean([(r.get("curve") or {}).get("cpr") for r in members])
        faith = mean([r["faithfulness"] for r in members])
        # higher CPR first, then higher faithfulness; undefined last
        key = (-cpr if math.isfinite(cpr) else math.inf, -faith if math.isfinite(faith) else math.inf)
        ranked.append((key, name, members, faith, cpr))
    rows: list[list] = []
    for _, name, members, faith, cpr in sorted(ranked, key=lambda x: x[0]):
        what, paper = _method_facts(name, [r for g in groups for r in g["records"] if r["algorithm"] == name])
        no_curve = "n/a: no curve for node circuits" if name in NODE_LEVEL else "n/a: no healthy setting with a curve"
        rows.append(
            [
                name,
                f"{counts[name]} ({len(members)})",
                faith if math.isfinite(faith) else "n/a: no healthy setting",  # an undefined mean says why
                cpr if math.isfinite(cpr) else no_curve,
                what,
                paper,
            ]
        )
    note = R.text(
        "Ranked by the mean CPR (area under the faithfulness curve) of each method's healthy settings, then "
        "by mean faithfulness; methods without a curve (node circuits, path patching, AtP) rank by faithfulness."
    )
    return [R.section("Methods, ranked", note, R.table(METHODS_HEADER, rows))]


def report_sections(
    records: list[dict],
    reference: dict | None = None,
    consensus_fraction: float = 0.5,
    files: dict[str, str] | None = None,
    run_dir: str | Path | None = None,
) -> list[R.Section]:
    """The report's sections (statistics computed here). ``files``: filled with the CSV files the
    sections link to (name -> text), for the caller to write beside the report; ``run_dir``: the run
    folder, where the sections look for ``explorer.html``."""
    files = {} if files is None else files
    show = progress.enabled()
    with progress.bar(total=3, show=show, desc="report: statistics") as bar, torch_threads(1):
        groups = compare_records(records, reference, consensus_fraction)  # small tensors: one thread is enough
        bar.update()
        effects = axis_effects(records, flags={n: c["flags"] for g in groups for n, c in g["health"].items()})
        bar.set_description("report: figures")
        bar.update()
        sections = (
            _header_section(records, groups, run_dir)
            + _axes_sections(effects, groups, files)
            + _methods_section(groups)
            + _health_sections(groups)
        )
        for g in groups:
            sections.append(R.section(f"{g['model']} on {g['task']}: {len(g['names'])} settings"))
            sections += _examples_section(records, g, len(groups) > 1) + _group_sections(
                g, len(groups) > 1, files, Path(run_dir) if run_dir is not None else None
            )
        bar.update()
    return sections


def _values(items: Iterable[Any]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in items)) or "n/a"


def _header_section(records: list[dict], groups: list[dict], run_dir: str | Path | None) -> list[R.Section]:
    """What was run: the grid and the parameters every setting shares (from the run's manifest when it
    has one, else from the records), so the report can be read without the command line."""
    from circuitfind.runs.records import read_manifest

    config = ((read_manifest(run_dir) if run_dir is not None else None) or {}).get("config") or {}

    def axis(key: str, field: str) -> str:
        return _values(config.get(key) or [r[field] for r in records])

    prompts = config.get("prompts") or _values(r.get("n_prompts", "n/a") for r in records)
    seed = config.get("seed", "n/a: not recorded (no manifest)")
    options = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in config.items()
        if k not in _SHARED and not isinstance(v, (dict, list)) and v is not None  # None: an option left off
    ]
    extra = [
        f"{k.replace('_', ' ')} {config[k]}" for k in ("dtype", "device", "max_batch") if config.get(k) is not None
    ]
    n_healthy = sum(len(g["healthy"]) for g in groups)
    # the name the sweep gave the run (its manifest's), not the folder's: a copied or moved run reports the same
    manifest = (read_manifest(run_dir) if run_dir is not None else None) or {}
    run = str(manifest.get("run") or "n/a: no manifest")
    lines = [
        R.text(
            f"{axis('models', 'model')} on {axis('tasks', 'task')}; {prompts} prompts per setting, seed {seed}.",
            bold="Data:",
        ),
        R.text(
            f"algorithms {axis('algorithms', 'algorithm')} x corruptions {axis('corruptions', 'corruption')} x "
            f"metrics {axis('metrics', 'metric')} x directions {axis('directions', 'direction')}: "
            f"{len(records)} settings ({n_healthy} healthy).",
            bold="Grid:",
        ),
        R.text(
            (", ".join(options) + " (as given to the sweep; each method reads its own)")
            if options
            else "n/a: not recorded (no manifest)",
            bold="Method options:",
        ),
        R.text(f"{run}" + (f"; {', '.join(extra)}" if extra else "") + ".", bold="Run:"),
    ]
    if run_dir is not None and (Path(run_dir) / "explorer.html").is_file():  # first thing a reader may want
        lines.append(_link("explorer.html", "Explore the circuits interactively: explorer.html (in this run folder)"))
    return [R.section("What was run", *lines)]


# the sweep's shared parameters (every other key of its config is a method option)
_SHARED = {"models", "tasks", "algorithms", "corruptions", "metrics", "directions", "prompts", "seed"}
_SHARED |= {"max_batch", "device", "dtype", "reference", "workers", "dask", "dask_address", "torch_threads"}


def write_report(
    records: list[dict],
    out_dir: str | Path,
    title: str = "Circuit diff report",
    reference: dict | None = None,
    consensus_fraction: float = 0.5,
    note: str | None = None,
) -> dict[str, str]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` with the CSV files they link to (each
    atomically); return their paths and the Markdown. ``note``: a warning shown above the contents
    (e.g. that the run is unfinished)."""
    if not records:
        raise ValueError("no settings to compare")
    files: dict[str, str] = {}
    sections = report_sections(records, reference, consensus_fraction, files, out_dir)
    intro = [R.text(note, bold="Note:", css_class="flag")] if note else []
    markdown = R.markdown_page(title, sections, intro)
    for name, content in sorted(files.items()):  # the linked files first: the page never links a missing one
        write_text(Path(out_dir) / name, content)
    html = write_text(Path(out_dir) / "report.html", R.html_page(title, sections, intro))
    md = write_text(Path(out_dir) / "report.md", markdown)
    return {"html": str(html), "markdown": str(md), "markdown_text": markdown}


def default_title(run_dir: str | Path, records: list[dict]) -> str:
    """The run's name and what it studies: ``bench-report: smollm2-135m on ioi``."""
    from circuitfind.runs.records import read_manifest

    models, tasks = _values(r["model"] for r in records), _values(r["task"] for r in records)
    name = (read_manifest(run_dir) or {}).get("run") or Path(run_dir).resolve().name
    return f"{name}: {models} on {tasks}"


def write_run_report(
    run_dir: str | Path, reference: str | None = None, title: str | None = None, note: str | None = None
) -> dict[str, str | None]:
    """The diff report of a sweep's run folder; ``reference`` names the setting taken as the truth. The
    returned ``note`` is the warning shown in the report (``note``, and records the manifest lists that are gone)."""
    from circuitfind.runs.records import load_records, missing_records

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
    title = title or default_title(run_dir, records)
    return {**write_report(records, run_dir, title, reference=ref, note=note), "note": note}
