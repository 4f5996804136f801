"""Statistics over a sweep's setting records (see :mod:`circuitfind.runs.sweep`), built on :mod:`circuitfind.circuits.agreement`.

:func:`compare_records`: per (model, task) group, overlaps between every pair of settings, consensus
and stability of components, agreement with a reference circuit, bootstrap intervals of edge scores
over prompts (flagged settings, see :mod:`circuitfind.runs.health`, are left out of those).
:func:`axis_effects`: which choice of setting moves the circuit: for each axis of the grid, every pair
of settings that differ on that axis only, with bootstrap intervals over those pairs.
:func:`robust_and_dependent`: the edges and components found in every healthy setting, and those
found exactly when one axis takes one value.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitfind.circuits import agreement
from circuitfind.circuits.graph import ModelGraph, check_shape
from circuitfind.errors import GraphMismatchError
from circuitfind.names import INPUT, LOGITS
from circuitfind.runs import health

# Algorithms whose edge scores are their heads' (on the circuit's edges only, no ranking of every edge):
# left out of the rank correlations of scores.
NODE_LEVEL = ("node", "atp", "atp_star")

# Below these a percentile interval is not a 95% interval: with 1 resample its ends are one value, and
# resampling 2 pairs gives at most 3 distinct means (a duplicated metric gave [0.401, 0.401]).
MIN_RESAMPLES = 100
MIN_PAIRS = 3


def interval_reason(n_boot: int, n: int | None = None, unit: str = "pairs") -> str | None:
    """Why a bootstrap interval from ``n_boot`` resamples of ``n`` ``unit`` is undefined (fewer than
    :data:`MIN_RESAMPLES` resamples, or fewer than :data:`MIN_PAIRS` units), or ``None`` when it is defined."""
    if n is not None and n < MIN_PAIRS:
        return f"{n} {unit}, at least {MIN_PAIRS} needed for an interval"
    if n_boot < MIN_RESAMPLES:
        return f"{n_boot} resample(s), at least {MIN_RESAMPLES} needed for an interval"
    return None


def record_edges(record: dict) -> set[tuple[str, str]]:
    """A record's circuit edges as (sender, receiver) tuples."""
    return {tuple(e) for e in record["edges"]}


def record_components(record: dict) -> set[str]:
    """A record's circuit components (heads, MLPs), without ``input`` and ``logits``."""
    return set(record["nodes"]) - {INPUT, LOGITS}


def _short(record: dict, group_keys: tuple[str, ...]) -> str:
    """A setting's name without the parts shared by its whole group."""
    return "/".join(str(record[k]) for k in ("algorithm", "corruption", "metric", "direction") if k not in group_keys)


def _record_shape(record: dict) -> tuple[int, int, int]:
    """A record's graph shape ``(n_layers, n_heads, n_kv_heads)``, bounded (records may come from
    elsewhere), with its scores checked against the graph's edge count."""
    shape = (record["n_layers"], record["n_heads"], record.get("n_kv_heads") or record["n_heads"])
    n_edges = check_shape(shape[0], shape[1], n_kv_heads=shape[2])
    if record.get("scores") is not None and len(record["scores"]) != n_edges:
        raise GraphMismatchError(
            f"record {record['setting']}: {len(record['scores'])} scores for a graph of {n_edges} edges "
            f"(n_layers={shape[0]}, n_heads={shape[1]}, n_kv_heads={shape[2]})"
        )
    return shape


def _check_same_shape(recs: list[dict], what: str) -> None:
    shapes = {r["setting"]: _record_shape(r) for r in recs}
    if len(set(shapes.values())) > 1:
        found = "; ".join(f"{name}: n_layers={s[0]}, n_heads={s[1]}, n_kv_heads={s[2]}" for name, s in shapes.items())
        raise GraphMismatchError(f"{what} come from different graph shapes and cannot be compared ({found})")


def compare_records(
    records: list[dict], reference: dict | None = None, consensus_fraction: float = 0.5, n_boot: int = 1000
) -> list[dict]:
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
        edges = {r["setting"]: record_edges(r) for r in recs}
        nodes = {r["setting"]: record_components(r) for r in recs}
        scored = {
            r["setting"]: _tensor(r["scores"])
            for r in recs
            if r.get("scores") is not None and r["algorithm"] not in NODE_LEVEL
        }
        ranks = agreement.pairwise(scored, agreement.rank_correlation)  # Spearman and Kendall together, once per pair
        checks = health.check_records(recs)
        healthy = [n for n in names if not checks[n]["flags"]] or names  # consensus over the healthy settings
        stab_nodes = agreement.stability({n: nodes[n] for n in healthy})
        consensus_edges = agreement.consensus({n: edges[n] for n in healthy}, consensus_fraction)
        consensus_nodes = agreement.consensus({n: nodes[n] for n in healthy}, consensus_fraction)
        group = {
            "model": model,
            "task": task,
            "records": recs,
            "names": names,
            "labels": labels,
            "edge_jaccard": agreement.matrix(agreement.pairwise(edges, agreement.jaccard), names).tolist(),
            "node_jaccard": agreement.matrix(agreement.pairwise(nodes, agreement.jaccard), names).tolist(),
            "edge_overlap": agreement.matrix(agreement.pairwise(edges, agreement.overlap_coefficient), names).tolist(),
            "score_names": list(scored),
            "spearman": agreement.matrix({k: v["spearman"] for k, v in ranks.items()}, list(scored)).tolist()
            if scored
            else [],
            "kendall": agreement.matrix({k: v["kendall"] for k, v in ranks.items()}, list(scored)).tolist()
            if scored
            else [],
            "node_stability": stab_nodes,
            "consensus_fraction": consensus_fraction,
            "consensus_edges": sorted(consensus_edges),
            "consensus_nodes": sorted(consensus_nodes),
            "unanimous_nodes": sorted(agreement.consensus({n: nodes[n] for n in healthy}, 1.0)),
            "health": checks,
            "healthy": [n for n in names if not checks[n]["flags"]],
            "robust": robust_and_dependent([r for r in recs if not checks[r["setting"]]["flags"]]),
            "appear_vanish": {
                n: {"appear": sorted(nodes[n] - consensus_nodes), "vanish": sorted(consensus_nodes - nodes[n])}
                for n in names
            },
        }
        if reference is not None and (reference["model"], reference["task"]) == (model, task):
            ref_edges, ref_nodes = record_edges(reference), record_components(reference)
            truth = None
            rows = {}
            for r in recs:
                row: dict[str, Any] = {
                    "edges": agreement.precision_recall_f1(edges[r["setting"]], ref_edges),
                    "nodes": agreement.precision_recall_f1(nodes[r["setting"]], ref_nodes),
                }
                if r["setting"] in scored:
                    if truth is None:
                        graph = ModelGraph(r["n_layers"], r["n_heads"], n_kv_heads=r.get("n_kv_heads"))
                        truth = torch.tensor([e in ref_edges for e in graph.edges])
                    if 0 < truth.sum() < truth.numel() and len(scored[r["setting"]]) == truth.numel():
                        row["roc_auc"] = agreement.roc_auc(scored[r["setting"]], truth).auc
                rows[r["setting"]] = row
            group["reference"] = {"setting": reference["setting"], "scores": rows}
        boots, skipped = {}, {}
        for r in recs:
            if r.get("per_prompt"):
                if checks[r["setting"]]["flags"]:  # a degenerate setting is never summarised as significant
                    flags = ", ".join(checks[r["setting"]]["flags"])
                    skipped[r["setting"]] = f"left out of the significance tables: the setting is flagged ({flags})"
                    continue
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
    """Bootstrap intervals of a setting's edge scores over prompts, from its per-prompt file: the mean
    over prompts (the record's score, same quantity) of the 8 edges of largest ``|mean|``, with its interval."""
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
    reason = interval_reason(n_boot)
    if reason:
        raise _Unusable(reason)
    ci = agreement.bootstrap_ci(per, n_boot=n_boot)
    mean = ci.mean  # made as the interval's ends are, so it lies inside them
    top = mean.abs().topk(min(8, mean.numel())).indices.tolist()
    return {
        "level": ci.level,
        "excluding_zero": int(ci.excludes_zero().sum()),
        "top": [
            {
                "edge": list(graph.edges[i]),
                "mean": float(mean[i]),
                "low": float(ci.low[i]),
                "high": float(ci.high[i]),
            }
            for i in top
        ],
    }


def _tensor(values) -> torch.Tensor:
    """A tensor from JSON numbers, where ``null`` (a non-finite value) becomes NaN."""
    return torch.tensor(nan_for_null(values), dtype=torch.float32)


def nan_for_null(values):
    if isinstance(values, list):
        return [nan_for_null(v) for v in values]
    return float("nan") if values is None else values


AXES = ("algorithm", "corruption", "metric", "direction", "model", "task")


def _axis_value(record: dict, axis: str) -> str:
    # ACDC runs in the noising direction only, whatever the grid asked
    return "noise" if axis == "direction" and record.get("algorithm") == "acdc" else str(record[axis])


def _grid_axes(records: list[dict]) -> list[str]:
    """The axes that take more than one value among ``records``."""
    return [a for a in AXES if len({_axis_value(r, a) for r in records}) > 1]


def _edge_lookup(record: dict, cache: dict) -> dict[tuple[str, str], int]:
    shape = _record_shape(record)
    if shape not in cache:
        cache[shape] = ModelGraph(shape[0], shape[1], n_kv_heads=shape[2]).edge_lookup
    return cache[shape]


def _scored(record: dict) -> bool:
    return record.get("scores") is not None and record.get("algorithm") not in NODE_LEVEL


def pair_statistics(a: dict, b: dict, lookups: dict | None = None) -> dict:
    """Edge Jaccard, component Jaccard and the Spearman correlation of ``|score|`` over the edges in
    either circuit (NaN where a setting has no scores, fewer than three such edges, or constant scores)."""
    ea, eb = record_edges(a), record_edges(b)
    out = {
        "a": a["setting"],
        "b": b["setting"],
        "edge_jaccard": agreement.jaccard(ea, eb),
        "node_jaccard": agreement.jaccard(record_components(a), record_components(b)),
        "spearman": float("nan"),
    }
    if _scored(a) and _scored(b) and _record_shape(a) == _record_shape(b):
        lookup = _edge_lookup(a, {} if lookups is None else lookups)
        index = sorted(lookup[e] for e in ea | eb if e in lookup)
        if len(index) >= 3:
            sa, sb = _tensor(a["scores"])[index], _tensor(b["scores"])[index]
            if torch.isfinite(sa).all() and torch.isfinite(sb).all():
                out["spearman"] = agreement.rank_correlation(sa, sb)["spearman"]
    return out


def mean_interval(values: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of the finite ``values`` with a percentile bootstrap interval over them (resampling the
    values, i.e. the pairs of settings). ``reason`` says why the interval is undefined
    (:func:`interval_reason`: fewer than 3 values or 100 resamples; ``None`` when it is defined): the
    percentile ends of 2 values are still given, for what they are, but no report may call them an
    interval. With fewer than two values the ends are NaN."""
    x = np.array([v for v in values if v == v], dtype=float)
    reason = interval_reason(n_boot, int(x.size))
    if x.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "reason": reason}
    if x.size == 1:
        return {"mean": float(x[0]), "low": float("nan"), "high": float("nan"), "n": 1, "reason": reason}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size), "reason": reason}


def axis_effects(records: list[dict], n_boot: int = 2000) -> list[dict]:
    """How much each axis of the grid moves the circuit, largest first.

    For each axis taking several values among the healthy records (:func:`circuitfind.runs.health.check_record`
    flags none), every pair of healthy settings that differ on that axis only is compared
    (:func:`pair_statistics`); the axis's ``movement`` is ``1 - mean edge Jaccard``. Intervals
    resample the pairs (not the prompts). Pairs from graphs of different shapes (two models) are
    counted in ``skipped_pairs``, not compared."""
    healthy = [r for r in records if not health.check_record(r)]
    lookups: dict = {}
    out = []
    for axis in _grid_axes(healthy):
        others = [a for a in AXES if a != axis]
        by_rest: dict[tuple, list[dict]] = defaultdict(list)
        for r in healthy:
            by_rest[tuple(_axis_value(r, a) for a in others)].append(r)
        pairs, skipped = [], 0
        for group in by_rest.values():
            for a, b in combinations(sorted(group, key=lambda r: r["setting"]), 2):
                if _record_shape(a) != _record_shape(b):
                    skipped += 1
                    continue
                pairs.append(pair_statistics(a, b, lookups))
        stats = {k: mean_interval([p[k] for p in pairs], n_boot) for k in ("edge_jaccard", "node_jaccard", "spearman")}
        ej = stats["edge_jaccard"]
        out.append(
            {
                "axis": axis,
                "values": sorted({_axis_value(r, axis) for r in healthy}),
                "pairs": pairs,
                "skipped_pairs": skipped,
                **stats,
                "movement": 1 - ej["mean"] if ej["n"] else float("nan"),
                "movement_low": 1 - ej["high"],
                "movement_high": 1 - ej["low"],
                "movement_reason": ej["reason"],  # why the movement's interval is undefined (None: defined)
            }
        )
    return sorted(out, key=lambda e: (-(e["movement"] if e["movement"] == e["movement"] else -1.0), e["axis"]))


def robust_and_dependent(records: list[dict]) -> dict:
    """Edges and components found in every one of ``records`` (pass the healthy ones), and for each
    axis value those found exactly when the axis takes that value: in every setting with the value
    and in none without it. Empty lists with fewer than two records."""
    out: dict = {"n_settings": len(records)}
    for kind, items_of in (("edges", record_edges), ("components", record_components)):
        sets: dict[str, set[Any]] = {r["setting"]: items_of(r) for r in records}
        entry: dict[str, list] = {"robust": [], "dependent": []}
        if len(records) >= 2:
            entry["robust"] = sorted(set.intersection(*sets.values()))
            for axis in _grid_axes(records):
                for value in sorted({_axis_value(r, axis) for r in records}):
                    inside = [sets[r["setting"]] for r in records if _axis_value(r, axis) == value]
                    outside = [sets[r["setting"]] for r in records if _axis_value(r, axis) != value]
                    only = set.intersection(*inside) - set.union(*outside)
                    if only:
                        entry["dependent"].append(
                            {"axis": axis, "value": value, "n_settings": len(inside), "items": sorted(only)}
                        )
        out[kind] = entry
    return out
