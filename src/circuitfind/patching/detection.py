"""The detection rules: components whose score stands out from the rest by ``k`` standard deviations
(:func:`detect`), or, where that rule cannot fire, the largest effects by count or size (:func:`select`)."""

from __future__ import annotations

from typing import Literal

import torch

from circuitfind.checks import finite_number
from circuitfind.errors import ImpossibleSignError


def check_k(k: float) -> float:
    """The detection rule's threshold ``k`` (in SDs): a finite number > 0 (NaN would find nothing)."""
    return finite_number("k", k, positive=True)


def effect_sign(direction: str) -> Literal["positive", "negative"]:
    """The sign of an important component's effect: noising it lowers the metric (``negative``),
    denoising it raises the metric (``positive``)."""
    return "negative" if direction == "noise" else "positive"


def impossible_sign(metric: str, direction: str, sign: str) -> str | None:
    """Why effects (``patched - base``) of ``sign`` cannot occur under ``metric`` and ``direction``,
    or ``None`` when they can. The ``kl`` metric scores ``-KL(clean || patched) <= 0``, which is 0 on
    the clean run: noising starts from the clean run, so no patch can raise the score."""
    if metric == "kl" and direction == "noise" and sign == "positive":
        return (
            "positive effects cannot occur when noising with the kl metric: the score -KL(clean || patched) "
            "is at most 0, its value on the clean (unpatched) run, so every noising effect is <= 0; "
            "use sign='negative', or denoise, or another metric to find components that push the answer down"
        )
    return None


def detect(
    scores: torch.Tensor,
    k: float = 2.0,
    sign: Literal["positive", "negative", "both"] = "positive",
    *,
    metric: str | None = None,
    direction: str | None = None,
) -> list[tuple[int, ...]]:
    """Components whose score is at least ``k`` standard deviations from the mean.

    ``sign="positive"`` keeps scores >= mean + k*sd, ``"negative"`` those <= mean - k*sd (e.g. noising
    effects, which are negative for important components), ``"both"`` either. NaNs are ignored.
    Returns index tuples sorted by decreasing distance from the mean. ``k`` must be finite and > 0.
    Given the ``metric`` name and ``direction`` of the effects, a sign that the setting cannot
    produce raises :class:`~circuitfind.errors.ImpossibleSignError` (:func:`impossible_sign`)
    instead of returning an empty or meaningless list.
    """
    check_k(k)
    if metric is not None and direction is not None and (reason := impossible_sign(metric, direction, sign)):
        raise ImpossibleSignError(reason)
    flat = scores.flatten().float()
    ok = torch.isfinite(flat)
    if ok.sum() < 2:
        raise ValueError("detect needs at least two finite scores")
    mean, sd = flat[ok].mean(), flat[ok].std()
    z = (flat - mean) / sd if sd > 0 else torch.zeros_like(flat)
    z = torch.where(ok, z, torch.zeros_like(z))
    if sign == "positive":
        hit, order = z >= k, -z
    elif sign == "negative":
        hit, order = z <= -k, z
    elif sign == "both":
        hit, order = z.abs() >= k, -z.abs()
    else:
        raise ValueError(f"sign must be 'positive', 'negative' or 'both', got {sign!r}")
    idx = [i for i in order.argsort().tolist() if hit[i]]
    return [tuple(int(j) for j in torch.unravel_index(torch.tensor(i), scores.shape)) for i in idx]


def select(
    scores: torch.Tensor,
    k: float = 2.0,
    sign: Literal["positive", "negative", "both"] = "positive",
    top_k: int | None = None,
    threshold: float | None = None,
) -> list[tuple[int, ...]]:
    """Components by a size rule: the ``k``-SD rule (:func:`detect`) when neither ``top_k`` nor
    ``threshold`` is given; else the components whose effect in ``sign``'s direction (``-score`` for
    ``negative``, ``|score|`` for ``both``) is above 0 and at least ``threshold``, the ``top_k``
    largest of them. Sorted by that effect, largest first; NaNs are ignored.

    Why: with few components (one head per layer, a handful of heads) no score is ``k`` SDs from the
    mean of the others (with ``n`` scores, at most ``(n - 1) / sqrt(n)`` SDs), so the ``k``-SD rule
    finds nothing however large the effects are; a count or an absolute size does not depend on it.
    """
    if top_k is None and threshold is None:
        return detect(scores, k=k, sign=sign)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    if threshold is not None:
        threshold = finite_number("threshold", threshold, positive=True)
    flat = scores.flatten().float()
    if sign == "positive":
        strength = flat
    elif sign == "negative":
        strength = -flat
    elif sign == "both":
        strength = flat.abs()
    else:
        raise ValueError(f"sign must be 'positive', 'negative' or 'both', got {sign!r}")
    strength = torch.where(torch.isfinite(strength), strength, torch.full_like(strength, -torch.inf))
    keep = strength > 0
    if threshold is not None:
        keep &= strength >= threshold
    idx = [i for i in strength.argsort(descending=True, stable=True).tolist() if keep[i]]
    if top_k is not None:
        idx = idx[:top_k]
    return [tuple(int(j) for j in torch.unravel_index(torch.tensor(i), scores.shape)) for i in idx]
