"""The detection rule: components whose score stands out from the rest by ``k`` standard deviations."""

from __future__ import annotations

from typing import Literal

import torch

from circuitfind.checks import finite_number


def check_k(k: float) -> float:
    """The detection rule's threshold ``k`` (in SDs): a finite number > 0 (NaN would find nothing)."""
    return finite_number("k", k, positive=True)


def effect_sign(direction: str) -> Literal["positive", "negative"]:
    """The sign of an important component's effect: noising it lowers the metric (``negative``),
    denoising it raises the metric (``positive``)."""
    return "negative" if direction == "noise" else "positive"


def detect(scores: torch.Tensor, k: float = 2.0, sign: Literal["positive", "negative", "both"] = "positive") -> list[tuple[int, ...]]:
    """Components whose score is at least ``k`` standard deviations from the mean.

    ``sign="positive"`` keeps scores >= mean + k*sd, ``"negative"`` those <= mean - k*sd (e.g. noising
    effects, which are negative for important components), ``"both"`` either. NaNs are ignored.
    Returns index tuples sorted by decreasing distance from the mean. ``k`` must be finite and > 0.
    """
    check_k(k)
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
