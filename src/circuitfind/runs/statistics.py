"""Statistics over a sweep's setting records (see :mod:`circuitfind.runs.sweep`), built on :mod:`circuitfind.circuits.agreement`.

:func:`compare_records`: per (model, task) group, overlaps between every pair of healthy settings,
consensus and stability of components, agreement with a reference circuit, bootstrap intervals of
edge scores over prompts, edge and component strength and the layer x layer score mass; flagged
settings (see :mod:`circuitfind.runs.health`) are left out of every one of them.
:func:`axis_effects`: which choice of setting moves the circuit: for each axis of the grid, every pair
of settings that differ on that axis only, with bootstrap intervals over those pairs (algorithms at
equal circuit size, :func:`cut_to_size`).
:func:`robust_and_dependent`: the edges and components found in every healthy setting, and those
found exactly when one axis takes one value.
:func:`bootstrap_excluding_zero`: the percentile bootstrap of :func:`circuitfind.circuits.agreement.bootstrap_ci`,
without sorting every edge's resamples (the same numbers, a fraction of the time on 70,000-edge graphs).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitfind.circuits import agreement
from circuitfind.circuits.graph import ModelGraph, check_shape
from circuitfind.errors import GraphMismatchError
from circuitfind.names import INPUT, LOGITS, head_name, parse_node
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
        checks = health.check_records(recs)
        # flagged settings cannot be read as circuits: every statistic below is over the healthy ones only
        healthy = [n for n in names if not checks[n]["flags"]]
        kept = [r for r in recs if not checks[r["setting"]]["flags"]]
        scored = {r["setting"]: _tensor(r["scores"]) for r in kept if _scored(r)}
        ranks = _rank_pairs(scored)
        stab_nodes = agreement.stability({n: nodes[n] for n in healthy})
        consensus_edges = agreement.consensus({n: edges[n] for n in healthy}, consensus_fraction)
        consensus_nodes = agreement.consensus({n: nodes[n] for n in healthy}, consensus_fraction)
        kept_edges = {n: edges[n] for n in healthy}
        kept_nodes = {n: nodes[n] for n in healthy}
        group = {
            "model": model,
            "task": task,
            "records": recs,
            "names": names,
            "labels": labels,
            "matrix_names": healthy,  # the rows and columns of the overlap matrices
            "edge_jaccard": agreement.matrix(agreement.pairwise(kept_edges, agreement.jaccard), healthy).tolist(),
            "node_jaccard": agreement.matrix(agreement.pairwise(kept_nodes, agreement.jaccard), healthy).tolist(),
            "edge_overlap": agreement.matrix(
                agreement.pairwise(kept_edges, agreement.overlap_coefficient), healthy
            ).tolist(),
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
            "healthy": healthy,
            "robust": robust_and_dependent(kept),
            "edge_strength": edge_strength(kept),
            "component_strength": component_strength(kept),
            "layer_mass": {r["setting"]: layer_mass(r) for r in kept if _scored(r)},
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


def _rank_pairs(scored: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, float]]:
    """Spearman and Kendall of ``|score|`` for every ordered pair of settings, once per pair; a setting
    against itself is 1 without computing it (NaN where its scores do not vary, as the statistic gives)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name, v in scored.items():
        finite = v[torch.isfinite(v)].abs()
        varies = finite.numel() > 1 and bool((finite != finite[0]).any())
        out[(name, name)] = {"spearman": 1.0, "kendall": 1.0} if varies else agreement.rank_correlation(v, v)
    for a, b in combinations(scored, 2):
        out[(a, b)] = out[(b, a)] = agreement.rank_correlation(scored[a], scored[b])
    return out


class _Unusable(Exception):
    """A run folder's per-prompt scores cannot be used (missing, unreadable, wrong shape)."""


def _bootstrap(record: dict, n_boot: int) -> dict:
    """Bootstrap intervals of a setting's edge scores over prompts, from its per-prompt file: how many
    edges have an interval excluding 0, and the (up to) 8 of those of largest ``|mean|`` with their
    intervals (the mean over prompts is the record's score, the same quantity)."""
    path = Path(record["per_prompt"])
    if not path.is_file():
        raise _Unusable(f"{path.name} is missing")
    try:
        per = torch.load(path, weights_only=True)
    except Exception as err:  # truncated, edited or not a torch file: the report goes on without it
        first_line = next(iter(str(err).splitlines()), "")[:100]
        raise _Unusable(f"{path.name} could not be read ({type(err).__name__}: {first_line})") from err
    edges = _index_of(record)["edges"]
    if not isinstance(per, torch.Tensor) or per.dim() != 2 or per.shape[0] != len(edges) or per.shape[1] < 2:
        shape = list(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
        raise _Unusable(f"{path.name} holds {shape}, not scores [{len(edges)} edges, >= 2 prompts]")
    reason = interval_reason(n_boot)
    if reason:
        raise _Unusable(reason)
    found = bootstrap_excluding_zero(per, n_boot=n_boot)
    return {
        "level": found["level"],
        "excluding_zero": found["excluding_zero"],
        "n_edges": len(edges),
        "top": [{**t, "edge": list(edges[t.pop("index")])} for t in found["top"]],
    }


def _resample_weights(n_prompts: int, n_boot: int, seed: int) -> torch.Tensor:
    """The resamples of :func:`circuitfind.circuits.agreement.bootstrap_ci`: ``n_boot`` index rows drawn
    with ``torch.randint`` from ``seed``, as counts per prompt over the number of prompts (float64)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_prompts, (n_boot, n_prompts), generator=gen)
    ones = torch.ones(n_boot, n_prompts, dtype=torch.float64)
    return torch.zeros(n_boot, n_prompts, dtype=torch.float64).scatter_add_(1, idx, ones) / n_prompts


def exact_quantiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``torch.quantile(values, q, dim=-1)`` (linear interpolation) of a float64 ``[rows, n]`` array,
    found by partial sorting (``np.partition``, linear time) instead of a full sort: the same numbers,
    ``[rows, len(q)]``. The rank and interpolation arithmetic is torch's (its ``lerp`` branches)."""
    n = values.shape[-1]
    ranks = np.asarray(q, dtype=np.float64) * (n - 1)
    below = np.floor(ranks).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    weight = ranks - below
    part = np.partition(values, sorted({*below.tolist(), *above.tolist()}), axis=-1)
    a, b = part[..., below], part[..., above]
    diff = b - a
    return np.where(weight < 0.5, a + weight * diff, b - diff * (1 - weight))


def bootstrap_excluding_zero(
    per_prompt: torch.Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0, top: int = 8
) -> dict:
    """Which edges' percentile-bootstrap intervals exclude 0, and the ``top`` of those by ``|mean|``
    with their intervals: the numbers of :func:`circuitfind.circuits.agreement.bootstrap_ci` (same
    resamples, same float64 means and percentiles, the same float32 results), without sorting every
    edge's resampled means. Whether an interval lies above 0 is read from how many resampled means
    are <= 0 (the lower end interpolates between two order statistics, so if both are > 0 so is the end,
    if both are <= 0 so is the end); only edges whose count falls at those order statistics, and the
    listed edges, get their percentiles computed. A 70,651-edge graph with 8 prompts takes well under a
    second, where sorting took about four."""
    if per_prompt.dim() != 2 or per_prompt.shape[-1] < 2:
        raise ValueError("bootstrap needs [edges, prompts] scores with at least two prompts")
    x = per_prompt.detach().float().cpu()
    weights = _resample_weights(x.shape[1], n_boot, seed)
    alpha = (1 - level) / 2
    q = (alpha, 1 - alpha)
    ranks = np.asarray(q, dtype=np.float64) * (n_boot - 1)
    lo_below, hi_below = (int(r) for r in np.floor(ranks))
    excludes = np.zeros(x.shape[0], dtype=bool)
    # a mean too small for float32 could round to 0 in the float32 ends: such rows are computed exactly. A
    # mean is a sum of at most B float32 scores times multiples of 1/B, so a nonzero one is at least about
    # 2^-24 / B of the row's smallest nonzero |score|: only rows with a score below 1e-20 can have one.
    xa = x.abs()
    tiny_rows = ((xa > 0) & (xa < 1e-20)).any(dim=1).numpy()
    step = max(1, (1 << 17) // n_boot)  # chunks of about 1 MB: the passes below read them from cache
    for start in range(0, x.shape[0], step):
        means = (weights @ x[start : start + step].double().T).numpy()  # [n_boot, edges], as bootstrap_ci
        nonpos = np.count_nonzero(means <= 0, axis=0)
        neg = np.count_nonzero(means < 0, axis=0)
        # the low end is > 0 when the order statistics it reads (lo_below, lo_below + 1) are both > 0:
        # fewer than lo_below values <= 0; it is <= 0 when both are <= 0. The high end likewise.
        tiny = tiny_rows[start : start + step]
        sure = ((nonpos < lo_below) | (neg > hi_below + 2)) & ~tiny
        band = ((nonpos >= lo_below) & (nonpos <= lo_below + 2)) | ((neg >= hi_below) & (neg <= hi_below + 2))
        unsure = ~sure & (band | tiny)
        chunk = excludes[start : start + step]
        chunk[sure] = True
        rows = np.flatnonzero(unsure)
        if rows.size:
            ends = exact_quantiles(np.ascontiguousarray(means[:, rows].T), q).astype(np.float32)
            chunk[rows] = (ends[:, 0] > 0) | (ends[:, 1] < 0)
    mean = x.double().mean(-1).float()  # made as the interval's ends are, so it lies inside them
    candidates = np.flatnonzero(excludes)
    order = candidates[np.argsort(-np.abs(mean.numpy()[candidates]), kind="stable")][:top]
    rows_out = []
    if order.size:
        means = (weights @ x[torch.from_numpy(order)].double().T).T.numpy()
        ends = exact_quantiles(means, q).astype(np.float32)
        for i, (low, high) in zip(order.tolist(), ends.tolist(), strict=True):
            rows_out.append({"index": i, "mean": float(mean[i]), "low": low, "high": high})
    return {"level": level, "excluding_zero": int(excludes.sum()), "top": rows_out}


def _tensor(values) -> torch.Tensor:
    """A tensor from JSON numbers, where ``null`` (a non-finite value) becomes NaN."""
    if isinstance(values, list) and values and not isinstance(values[0], list):
        return torch.from_numpy(_array(values).astype(np.float32))
    return torch.tensor(nan_for_null(values), dtype=torch.float32)


_ARRAYS: dict[int, tuple[list, np.ndarray]] = {}  # id of a record's score list -> (the list, its array)


def _array(values: list) -> np.ndarray:
    """A record's scores (a flat list of JSON numbers, ``null`` for a non-finite one) as a float64 array
    with NaN for ``null``; converted once per list (the statistics read a setting's 70,651 scores
    several times), a few kept (read-only: copy before writing)."""
    hit = _ARRAYS.get(id(values))
    if hit is not None and hit[0] is values:
        return hit[1]
    try:
        out = np.asarray(values, dtype=np.float64)
    except TypeError:  # a null among the numbers
        out = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    out.setflags(write=False)
    if len(_ARRAYS) >= 32:
        _ARRAYS.pop(next(iter(_ARRAYS)))
    _ARRAYS[id(values)] = (values, out)
    return out


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
        cache[shape] = graph_index(*shape)["lookup"]
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
            sa, sb = torch.from_numpy(_array(a["scores"])[index]), torch.from_numpy(_array(b["scores"])[index])
            sa, sb = sa.float(), sb.float()  # as before: float32 scores
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


def axis_effects(records: list[dict], n_boot: int = 2000, flags: dict[str, list[str]] | None = None) -> list[dict]:
    """How much each axis of the grid moves the circuit, largest first.

    For each axis taking several values among the healthy records (:func:`circuitfind.runs.health.check_record`
    flags none), every pair of healthy settings that differ on that axis only is compared
    (:func:`pair_statistics`); the axis's ``movement`` is ``1 - mean edge Jaccard``. Intervals
    resample the pairs (not the prompts). Pairs from graphs of different shapes (two models) are
    counted in ``skipped_pairs``, not compared.

    The algorithm axis compares circuits of equal size: methods return circuits of very different
    sizes (a node circuit of 5 edges, ACDC's 17-96, a top-k of 1,000), and the Jaccard of a small and a
    large circuit measures their sizes as much as their choices. Each pair of algorithms is compared
    at the smaller circuit's size ``k``, each circuit cut to its ``k`` edges of largest ``|score|``
    (:func:`cut_to_size`); a larger circuit without edge scores (node-level methods) cannot be cut, so
    its pairs are left out (``left_out``: settings in no compared pair for that reason)."""
    healthy = [r for r in records if not (flags[r["setting"]] if flags is not None else health.check_record(r))]
    lookups: dict = {}
    out = []
    for axis in _grid_axes(healthy):
        others = [a for a in AXES if a != axis]
        by_rest: dict[tuple, list[dict]] = defaultdict(list)
        for r in healthy:
            by_rest[tuple(_axis_value(r, a) for a in others)].append(r)
        pairs, skipped, uncut = [], 0, set()
        for group in by_rest.values():
            for a, b in combinations(sorted(group, key=lambda r: r["setting"]), 2):
                if _record_shape(a) != _record_shape(b):
                    skipped += 1
                    continue
                if axis == "algorithm":
                    k = min(len(a["edges"]), len(b["edges"]))
                    cannot = [r["setting"] for r in (a, b) if len(r["edges"]) > k and not _scored(r)]
                    if cannot:  # a larger circuit without edge scores cannot be cut to the other's size
                        uncut.update(cannot)
                        continue
                    pairs.append({**pair_statistics(cut_to_size(a, k), cut_to_size(b, k), lookups), "size": k})
                else:
                    pairs.append(pair_statistics(a, b, lookups))
        compared = {n for p in pairs for n in (p["a"], p["b"])}
        members = [r for r in healthy if r["setting"] in compared] if axis == "algorithm" else healthy
        stats = {k: mean_interval([p[k] for p in pairs], n_boot) for k in ("edge_jaccard", "node_jaccard", "spearman")}
        ej = stats["edge_jaccard"]
        out.append(
            {
                "axis": axis,
                "values": sorted({_axis_value(r, axis) for r in members}),
                "pairs": pairs,
                "skipped_pairs": skipped,
                "left_out": sorted(uncut - compared) if axis == "algorithm" else [],
                "equal_size": axis == "algorithm",
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


@functools.lru_cache(maxsize=8)
def graph_index(n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """Per-edge layer and component indices of a graph shape, so per-edge arrays (scores) reduce by
    layer or by component in one ``np.bincount``: ``sender_layer`` (0 = the input, ``l + 1`` = layer
    ``l``), ``receiver_layer`` (``l``, or ``n_layers`` for the logits), ``receiver_kind`` (``head``,
    ``mlp``, ``logits``) and the (edge, component) incidence pairs of every component an edge touches
    (a grouped-query k/v receiver touches every head of its group)."""
    graph = ModelGraph(n_layers, n_heads, n_kv_heads=n_kv_heads)
    size = n_heads // n_kv_heads
    senders, sender_of = np.unique([s for s, _ in graph.edges], return_inverse=True)
    receivers, receiver_of = np.unique([r for _, r in graph.edges], return_inverse=True)
    components: dict[str, int] = {}
    s_layer, s_component = [], []
    for name in senders.tolist():  # a few hundred names, not one per edge
        node = parse_node(name)
        s_layer.append(0 if node.kind == "input" else node.layer + 1)
        s_component.append(-1 if node.kind == "input" else components.setdefault(name, len(components)))
    r_layer, r_kind, r_components = [], [], []
    for name in receivers.tolist():
        node = parse_node(name)
        r_layer.append(n_layers if node.kind == "logits" else node.layer)
        r_kind.append({"group": "head"}.get(node.kind, node.kind))
        if node.kind == "head":
            touched = [head_name(node.layer, node.index)]
        elif node.kind == "group":  # a grouped-query k/v receiver feeds every head of its group
            touched = [head_name(node.layer, h) for h in range(node.index * size, (node.index + 1) * size)]
        else:
            touched = [name] if node.kind == "mlp" else []
        r_components.append([components.setdefault(c, len(components)) for c in touched])
    s_comp = np.array(s_component)[sender_of]
    edge_ids = np.arange(len(graph.edges))
    pairs = [np.stack([edge_ids[s_comp >= 0], s_comp[s_comp >= 0]], axis=1)]
    # each edge's receiver components, gathered from one flat array of every receiver's (offsets, counts)
    lengths = np.array([len(c) for c in r_components], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat_all = np.array([c for cs in r_components for c in cs], dtype=np.int64)
    counts = lengths[receiver_of]
    starts = np.repeat(offsets[receiver_of], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    pairs.append(np.stack([np.repeat(edge_ids, counts), flat_all[starts + within]], axis=1))
    incidence = np.concatenate(pairs).astype(np.int64)
    incidence = incidence[np.lexsort((incidence[:, 1], incidence[:, 0]))]
    sender_layer = np.array(s_layer)[sender_of]
    receiver_layer = np.array(r_layer)[receiver_of]
    kinds = [r_kind[i] for i in receiver_of.tolist()]
    return {
        "edges": graph.edges,
        "lookup": graph.edge_lookup,
        "sender_layer": sender_layer,
        "receiver_layer": receiver_layer,
        "receiver_kind": kinds,
        "components": list(components),
        "incidence": incidence,
    }


def _relative_scores(record: dict) -> np.ndarray | None:
    """``|score|`` over the largest ``|score|`` of the setting (scores of different metrics have
    different units; relative ones average), or ``None`` without usable scores."""
    if not _scored(record):
        return None
    a = np.abs(_array(record["scores"]))
    a[~np.isfinite(a)] = 0.0
    top = a.max(initial=0.0)
    return a / top if top > 0 else None


def _index_of(record: dict) -> dict:
    return graph_index(*_record_shape(record))


def edge_strength(records: list[dict]) -> dict[tuple[str, str], float]:
    """Each edge's mean relative ``|score|`` (:func:`_relative_scores`) over the records with edge
    scores, for the edges in any record's circuit: how the report orders lists of edges."""
    rel = [(r, x) for r in records if (x := _relative_scores(r)) is not None]
    if not rel:
        return {}
    mean = np.mean([x for _, x in rel], axis=0)
    lookup = _index_of(rel[0][0])["lookup"]
    wanted = set().union(*(record_edges(r) for r in records))
    return {e: float(mean[lookup[e]]) for e in wanted if e in lookup}


def component_strength(records: list[dict]) -> dict[str, float]:
    """Each component's mean (over the records with edge scores) of the relative ``|score|`` of the
    edges it sends or receives, as a share of all edges' (so the values sum to about 2 over components)."""
    rel = [(r, x) for r in records if (x := _relative_scores(r)) is not None]
    if not rel:
        return {}
    index = _index_of(rel[0][0])
    inc = index["incidence"]
    shares = []
    for _, x in rel:
        total = x.sum()
        shares.append(np.bincount(inc[:, 1], weights=x[inc[:, 0]], minlength=len(index["components"])) / total)
    mean = np.mean(shares, axis=0)
    return {c: float(v) for c, v in zip(index["components"], mean, strict=True)}


def layer_mass(record: dict) -> dict:
    """The share of a setting's total ``|edge score|`` (every edge of the graph, not just the circuit's)
    between each sender layer (rows: the input, then layers) and receiver layer (columns: layers, then
    the logits): where in depth the setting finds the effect."""
    index = _index_of(record)
    a = np.abs(_array(record["scores"]))
    a[~np.isfinite(a)] = 0.0
    n = record["n_layers"]
    cells = index["sender_layer"] * (n + 1) + index["receiver_layer"]
    mass = np.bincount(cells, weights=a, minlength=(n + 1) * (n + 1)).reshape(n + 1, n + 1)
    total = mass.sum()
    return {
        "rows": ["input", *(f"L{i}" for i in range(n))],
        "columns": [*(f"L{i}" for i in range(n)), "logits"],
        "share": (mass / total if total > 0 else mass).tolist(),
        "total": float(total),
    }


def cut_to_size(record: dict, k: int) -> dict:
    """The record with its circuit cut to its ``k`` edges of largest ``|score|`` (ties: graph order), its
    components those the kept edges touch: circuits of different sizes compared at one size. A record
    whose circuit has ``k`` edges or fewer is returned as it is."""
    edges = sorted(record_edges(record))
    if len(edges) <= k:
        return record
    index = _index_of(record)
    scores = np.abs(_array(record["scores"]))
    scores[~np.isfinite(scores)] = -1.0
    positions = np.array([index["lookup"][e] for e in edges])
    keep = positions[np.argsort(-scores[positions], kind="stable")][:k]
    kept = sorted(index["edges"][i] for i in keep)
    touched = set(index["incidence"][np.isin(index["incidence"][:, 0], keep), 1].tolist())
    nodes = {index["components"][c] for c in touched}
    return {**record, "edges": [list(e) for e in kept], "nodes": sorted(nodes), "n_edges": len(kept)}
