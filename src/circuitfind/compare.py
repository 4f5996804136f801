"""Overlap statistics between circuits found under different settings."""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Hashable, Iterable, Mapping

Component = Hashable


def jaccard(a: Iterable[Component], b: Iterable[Component]) -> float:
    """|A & B| / |A | B| (1.0 for two empty sets: they agree)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def overlap_coefficient(a: Iterable[Component], b: Iterable[Component]) -> float:
    """|A & B| / min(|A|, |B|) (1.0 when either set is empty and both are, else 0.0)."""
    a, b = set(a), set(b)
    if not a or not b:
        return 1.0 if a == b else 0.0
    return len(a & b) / min(len(a), len(b))


def pairwise(circuits: Mapping[str, Iterable[Component]], stat: Callable = jaccard) -> dict[tuple[str, str], float]:
    """``stat`` for every ordered pair of named circuits (diagonal included)."""
    sets = {k: set(v) for k, v in circuits.items()}
    out = {(k, k): stat(v, v) for k, v in sets.items()}
    for a, b in combinations(sets, 2):
        out[(a, b)] = out[(b, a)] = stat(sets[a], sets[b])
    return out


def stability(circuits: Mapping[str, Iterable[Component]]) -> dict[Component, float]:
    """For each component found anywhere, the fraction of settings whose circuit contains it."""
    sets = [set(v) for v in circuits.values()]
    if not sets:
        return {}
    found = set().union(*sets)
    return {c: sum(c in s for s in sets) / len(sets) for c in sorted(found, key=str)}
