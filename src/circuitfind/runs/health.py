"""Health checks of a sweep's settings, and the known pitfalls of the settings themselves.

:func:`check_record` flags a setting whose result cannot be interpreted (its *flags*): scores all
zero or constant, undefined (NaN) faithfulness, an empty circuit, a clean run that the corruption
does not change. Flagged settings are left out of every summary that would call something
significant. :func:`setting_notes` names the pitfalls of a setting's choices (*notes*): facts about
what the setting can and cannot show, each with its reason (:data:`PITFALLS`); they do not make the
result wrong, they say how to read it.
"""

from __future__ import annotations

import math
from pathlib import Path

# Relative size below which scores count as zero: a fraction of the clean - corrupt gap of the metric.
ZERO_SCORE_TOLERANCE = 1e-6
# Clean and corrupt values closer than this (relative to their size) count as equal.
SAME_VALUE_TOLERANCE = 1e-6

FLAGS = {
    "zero_scores": "every edge score is zero: the scores carry no ranking",
    "constant_scores": "every edge score is the same: the scores carry no ranking",
    "nonfinite_scores": "some edge scores are not finite",
    "nan_faithfulness": "the faithfulness is undefined (NaN)",
    "empty_circuit": "the circuit has no edges",
    "clean_equals_corrupt": "the corruption does not change the metric (clean = corrupt): nothing can be attributed",
}

PITFALLS = {
    "probability_metric": (
        "probability metric: cannot show components that push the answer down",
        "a patch can lower the answer's probability p by at most p (the metric is bounded below by -p), "
        "while it can raise it by up to 1 - p; when p is small, components that suppress the answer "
        "(negative heads) show next to no effect",
    ),
    "gaussian_noise": (
        "Gaussian noise can make early components look important",
        "noise added to the embeddings gives the model inputs it never saw in training; "
        "restoring early layers then repairs that out-of-distribution damage, not the task's mechanism",
    ),
    "sliding_mlp_window": (
        "a sliding MLP window inflates peaks compared with single layers",
        "restoring several adjacent layers at once adds their effects (and their interactions), "
        "so a window's curve peaks higher and wider than any single layer's effect",
    ),
    "noising": (
        "noising measures necessity",
        "corrupting a component in the clean run asks whether the behaviour needs it; "
        "a component can be necessary without being sufficient",
    ),
    "denoising": (
        "denoising measures sufficiency",
        "restoring a component in the corrupted run asks whether it is enough to bring the behaviour back; "
        "noising and denoising answer different questions and need not find the same circuit",
    ),
}

# Why a flag appears under a particular setting, where the reason is known.
KNOWN_CAUSES = {
    ("zero_scores", "kl", "noise"): "attribution patching linearises the metric at the clean run, and the gradient of "
    "the KL divergence to the clean distribution is zero there (its minimum)",
}


def setting_notes(record: dict) -> list[str]:
    """Codes of :data:`PITFALLS` that apply to a setting's choices."""
    notes = []
    if str(record.get("metric", "")) == "prob":
        notes.append("probability_metric")
    if str(record.get("corruption", "")).split(":")[0] == "gn":
        notes.append("gaussian_noise")
    if record.get("mlp_window", 1) and int(record.get("mlp_window", 1)) > 1:
        notes.append("sliding_mlp_window")
    direction = record.get("direction") if record.get("algorithm") != "acdc" else "noise"
    if direction == "noise":
        notes.append("noising")
    elif direction == "denoise":
        notes.append("denoising")
    return notes


def check_record(record: dict) -> list[str]:
    """Codes of :data:`FLAGS` that a setting record raises (empty: healthy)."""
    flags = []
    clean, corrupt = record.get("clean"), record.get("corrupt")
    if (
        _number(clean)
        and _number(corrupt)
        and abs(clean - corrupt) <= SAME_VALUE_TOLERANCE * max(1.0, abs(clean), abs(corrupt))
    ):
        flags.append("clean_equals_corrupt")
    scores = record.get("scores")
    if scores is not None and record.get("algorithm") != "node":
        values = [float("nan") if s is None else float(s) for s in _flat(scores)]
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < len(values):
            flags.append("nonfinite_scores")
        if finite:
            gap = abs(clean - corrupt) if _number(clean) and _number(corrupt) else 1.0
            if max(abs(v) for v in finite) <= ZERO_SCORE_TOLERANCE * max(gap, 1e-12) or not any(finite):
                flags.append("zero_scores")
            elif len(finite) > 1 and max(finite) == min(finite):
                flags.append("constant_scores")
    if not record.get("n_edges", len(record.get("edges", []))):
        flags.append("empty_circuit")
    elif record.get("faithfulness") is None or (_number(record["faithfulness"]) and math.isnan(record["faithfulness"])):
        flags.append("nan_faithfulness")
    return flags


def explain(record: dict, flag: str) -> str:
    """The flag's description, with its known cause under this setting when there is one."""
    cause = KNOWN_CAUSES.get((flag, record.get("metric"), record.get("direction")))
    return FLAGS[flag] + (f" ({cause})" if cause else "")


def check_records(records: list[dict]) -> dict[str, dict[str, list[str]]]:
    """Per setting name: its ``flags`` and ``notes``."""
    return {r["setting"]: {"flags": check_record(r), "notes": setting_notes(r)} for r in records}


def check_run(run_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """:func:`check_records` of every record in a sweep's run folder (for its manifest)."""
    from circuitfind.runs.records import load_records

    return check_records(load_records(run_dir))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flat(values):
    for v in values:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v
