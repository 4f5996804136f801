"""Comparing circuits found under different settings.

Set statistics work on any collection of hashable components (edge tuples, node names):
:func:`jaccard`, :func:`overlap_coefficient`, :func:`precision_recall_f1`. Score statistics work on
per-edge score vectors: :func:`rank_correlation` (Spearman, Kendall), :func:`roc_auc` against a
reference circuit; both refuse vectors of different lengths, and :func:`check_comparable` refuses
circuits whose graphs differ in shape (another model's edges mean something else). :func:`pairwise` builds a matrix across settings, :func:`consensus` the circuit
of components found in at least a given fraction of settings, and :func:`bootstrap_ci` confidence
intervals over prompts for per-prompt scores.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from circuitfind.errors import GraphMismatchError

if TYPE_CHECKING:
    from circuitfind.circuits.circuit import Circuit

Component = Hashable
C = TypeVar("C", bound=Hashable)  # one kind of component: node names, or edges


def check_comparable(circuits: Mapping[str, Circuit]) -> list[str]:
    """Refuse circuits from graphs of different shapes (layers, heads, key/value heads, split q/k/v,
    positions); return warnings for circuits of differently named models with the same shape.

    Raises:
        GraphMismatchError: naming each circuit and its graph's shape.
    """
    shapes = {name: c.graph.shape for name, c in circuits.items()}
    if len({tuple(s.items()) for s in shapes.values()}) > 1:
        described = "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in shape.items()) for name, shape in shapes.items()
        )
        raise GraphMismatchError(f"circuits from different graph shapes cannot be compared ({described})")
    models = {name: c.settings.get("model") for name, c in circuits.items() if c.settings.get("model")}
    if len(set(models.values())) > 1:
        found = ", ".join(f"{name}: {model}" for name, model in models.items())
        return [
            f"the circuits come from different models ({found}): their graphs have the same shape, "
            f"but the same edge may not mean the same thing"
        ]
    return []


def jaccard(a: Iterable[Component], b: Iterable[Component]) -> float:
    """|A & B| / |A | B| (1.0 for two empty sets: they agree)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def overlap_coefficient(a: Iterable[Component], b: Iterable[Component]) -> float:
    """|A & B| / min(|A|, |B|) (1.0 if both are empty, 0.0 if only one is)."""
    a, b = set(a), set(b)
    if not a or not b:
        return 1.0 if a == b else 0.0
    return len(a & b) / min(len(a), len(b))


def precision_recall_f1(found: Iterable[Component], reference: Iterable[Component]) -> dict[str, float]:
    """Precision, recall and F1 of ``found`` against a ``reference`` circuit."""
    found, reference = set(found), set(reference)
    tp = len(found & reference)
    precision = tp / len(found) if found else 0.0
    recall = tp / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def rank_correlation(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, absolute: bool = True
) -> dict[str, float]:
    """Spearman and Kendall rank correlation of two score vectors (of ``|score|`` by default)."""
    x, y = (np.abs(_np(v)) if absolute else _np(v) for v in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"score vectors differ in shape: {x.shape} vs {y.shape}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    from scipy import stats  # here, not at import: scipy.stats takes most of a second to import

    return {"spearman": float(stats.spearmanr(x, y).statistic), "kendall": float(stats.kendalltau(x, y).statistic)}


@dataclass
class ROC:
    """ROC curve of scores against reference membership, thresholding ``|score|``."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]
    auc: float


def roc_auc(scores: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> ROC:
    """ROC over all thresholds of ``|score|`` for predicting ``reference`` (bool per edge)."""
    s, truth = np.abs(_np(scores)).ravel(), _np(reference).astype(bool).ravel()
    if s.shape != truth.shape:
        raise ValueError(f"scores and reference differ in length: {s.size} vs {truth.size}")
    n_pos, n_neg = truth.sum(), (~truth).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both reference and non-reference components")
    order = np.argsort(-s, kind="stable")
    s, truth = s[order], truth[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(truth)[distinct]
    fp = np.cumsum(~truth)[distinct]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thresholds = np.r_[np.inf, s[distinct]]
    return ROC(fpr.tolist(), tpr.tolist(), thresholds.tolist(), float(np.trapezoid(tpr, fpr)))


def pairwise(items: Mapping[str, Any], stat: Callable[[Any, Any], Any] = jaccard) -> dict[tuple[str, str], Any]:
    """``stat`` for every ordered pair of named items (diagonal included)."""
    out = {(k, k): stat(v, v) for k, v in items.items()}
    for a, b in combinations(items, 2):
        out[(a, b)] = out[(b, a)] = stat(items[a], items[b])
    return out


def matrix(values: Mapping[tuple[str, str], float], names: Sequence[str]) -> np.ndarray:
    """A pairwise dict as a square array in ``names`` order."""
    return np.array([[values[(a, b)] for b in names] for a in names])


def stability(circuits: Mapping[str, Iterable[C]]) -> dict[C, float]:
    """For each component found anywhere, the fraction of settings whose circuit contains it."""
    sets = [set(v) for v in circuits.values()]
    if not sets:
        return {}
    found: set[C] = set().union(*sets)
    return {c: sum(c in s for s in sets) / len(sets) for c in sorted(found, key=str)}


def consensus(circuits: Mapping[str, Iterable[C]], min_fraction: float = 1.0) -> set[C]:
    """Components found in at least ``min_fraction`` of the settings (1.0: in every one)."""
    return {c for c, f in stability(circuits).items() if f >= min_fraction - 1e-12}


@dataclass
class BootstrapCI:
    """Mean and percentile confidence interval per component."""

    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    level: float

    def excludes_zero(self) -> torch.Tensor:
        """Components whose interval lies entirely on one side of zero."""
        return (self.low > 0) | (self.high < 0)


def bootstrap_ci(
    per_prompt: torch.Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0, chunk_elements: int = 1 << 22
) -> BootstrapCI:
    """Percentile bootstrap over prompts (the last axis) of the mean score of each component.

    Each resample of prompts is a row of counts (how often each prompt was drawn), so all
    resampled means are one matrix product instead of ``n_boot`` small means. Components are
    taken ``chunk_elements // n_boot`` at a time, so memory stays bounded on graphs with many
    edges. The resamples are those of drawing ``n_boot`` index rows with ``torch.randint`` from
    ``seed``, as before; means and percentiles are computed in float64.
    """
    if per_prompt.shape[-1] < 2:
        raise ValueError("bootstrap needs at least two prompts")
    x = per_prompt.detach().float().cpu()
    B = x.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, B, (n_boot, B), generator=gen)
    weights = (
        torch.zeros(n_boot, B, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, B, dtype=torch.float64)) / B
    )
    flat = x.reshape(-1, B)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.empty(flat.shape[0]), torch.empty(flat.shape[0])
    step = max(1, chunk_elements // n_boot)
    for start in range(0, flat.shape[0], step):
        means = weights @ flat[start : start + step].double().T  # [n_boot, components]
        low[start : start + step], high[start : start + step] = torch.quantile(means, q, dim=0)
    shape = x.shape[:-1]
    # the point made as the ends are, in float64 then rounded to float32 (rounding keeps order): a float32
    # mean of a constant row can fall one rounding step outside its own interval
    return BootstrapCI(x.double().mean(-1).float(), low.reshape(shape), high.reshape(shape), level)


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
