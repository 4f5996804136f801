"""How well a circuit reproduces the model: its faithfulness, ``(circuit - corrupt) / (clean - corrupt)``
with its edges clean and every other edge corrupted, and the faithfulness curve of a method's scores
at MIB's edge fractions, with its CPR and CMD areas."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.errors import CircuitfindError
from circuitfind.tasks.metrics import normalise


class EmptyCircuitError(CircuitfindError, ValueError):
    """An operation needs at least one edge in the circuit."""


def circuit_masks(patcher: EdgePatcher, in_circuit: torch.Tensor) -> torch.Tensor:
    """Edge masks that run a circuit: its edges carry clean values, every other edge corrupted ones.

    For ``noise`` patchers (base = clean run) that keeps the circuit's edges; for ``denoise``
    patchers (base = corrupted run) it patches them.
    """
    keep = in_circuit.float() if patcher.direction == "noise" else 1.0 - in_circuit.float()
    return keep.to(patcher.setup.plan.clean.tokens.device)


def faithfulness(patcher: EdgePatcher, circuit: Circuit) -> float:
    """``(circuit - corrupt) / (clean - corrupt)``: the circuit's edges clean, every other edge corrupted."""
    if circuit.n_edges == 0:
        raise EmptyCircuitError("the circuit has no edges: faithfulness of an empty circuit is not defined here")
    value = patcher.value(circuit_masks(patcher, circuit.in_circuit)[None]).item()
    return float(normalise(value, patcher.setup.clean_value, patcher.setup.corrupt_value))


@dataclass
class FaithfulnessCurve:
    """Faithfulness of top-scoring circuits of growing size.

    ``cpr``: area under the curve over the fraction of edges kept (higher is better);
    ``cmd``: area under ``|1 - faithfulness|`` (lower is better); both trapezoids over the fractions.
    """

    fractions: list[float]
    sizes: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


# The MIB circuit-localization track's edge fractions and counts: `percentages = (.001, .002, .005,
# .01, .02, .05, .1, .2, .5, 1)` and `int(pct * n_edges)` edges (top |score|) in
# `evaluate_area_under_curve`, MIB_circuit_track/evaluation.py of the track's code (Mueller et al.
# 2025, "MIB: A Mechanistic Interpretability Benchmark"). Its areas are trapezoids over these
# fractions in some versions of that file and over log edge counts in others; ours are over the
# fractions.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def faithfulness_curve(patcher: EdgePatcher, scores: torch.Tensor, fractions=MIB_FRACTIONS) -> FaithfulnessCurve:
    """Faithfulness of the top-``|score|`` circuits at each fraction of edges (``int(fraction * n_edges)``
    edges, as MIB counts them), in one batched run."""
    fractions = sorted(set(float(f) for f in fractions))
    if not fractions or not all(0 <= f <= 1 for f in fractions):  # NaN fails both comparisons
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    flat = scores.abs().flatten().cpu()
    order = flat.argsort(descending=True)
    total = flat.numel()
    sizes = [int(f * total) for f in fractions]  # MIB's count: rounded down
    masks = torch.zeros(len(sizes), total)
    for i, n in enumerate(sizes):
        masks[i, order[:n]] = 1.0
    values = patcher.value(
        circuit_masks(patcher, masks.reshape(len(sizes), *scores.shape)),
        desc=f"faithfulness curve ({len(sizes)} points)",
    ).cpu()
    faith = normalise(values, patcher.setup.clean_value, patcher.setup.corrupt_value).tolist()
    x = torch.tensor(fractions)
    f = torch.tensor(faith)
    cpr = float(torch.trapezoid(f, x)) if len(x) > 1 else 0.0
    cmd = float(torch.trapezoid((1 - f).abs(), x)) if len(x) > 1 else 0.0
    return FaithfulnessCurve(fractions, sizes, faith, cpr, cmd)
