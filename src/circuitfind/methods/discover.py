"""One entry point, :func:`discover`: run a registered method (:mod:`circuitfind.methods.registry`) on a
patching setup, check its options first, and measure the circuit's faithfulness and curve.

The methods, one module each: :mod:`~circuitfind.methods.acdc` (ACDC, Conmy et al. 2023),
:mod:`~circuitfind.methods.eap` (EAP, Syed et al. 2023), :mod:`~circuitfind.methods.eap_ig` (EAP-IG on
embeddings, Hanna et al. 2024), :mod:`~circuitfind.methods.eap_ig_act` (on activations, Mueller et al.
2025), :mod:`~circuitfind.methods.ifr` (Ferrando & Voita 2024), :mod:`~circuitfind.methods.edge_pruning`
(Bhaskar et al. 2024), :mod:`~circuitfind.methods.ugs` (Li & Janson 2024),
:mod:`~circuitfind.methods.iterative_path` (Wang et al. 2022), :mod:`~circuitfind.methods.node` (node
patching) and :mod:`~circuitfind.methods.atp` (AtP / AtP*, Kramár et al. 2024). Their functions are
re-exported here (``discover.eap``, ``discover.acdc``, ...) for scripts and notebooks.

Scores are signed estimates of the metric change when an edge is patched; :func:`select_top_k` and
:func:`select_threshold` rank them by magnitude. The sign of a score: masks are 1 = keep the base
run's value, 0 = patch in the source run's value (:mod:`circuitfind.edge_patching`). A score is
``-d metric / d mask`` at masks that keep every edge, i.e. the first-order change of the metric when
the edge's mask goes from 1 to 0 (the edge is patched): ``(source - base) . d metric / d receiver
input``. Noising (base = clean, source = corrupted), an important edge has a negative score;
denoising, a positive one (:func:`circuitfind.patching.effect_sign`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.errors import CircuitfindError
from circuitfind.methods import registry
from circuitfind.methods.acdc import acdc
from circuitfind.methods.atp import atp_circuit
from circuitfind.methods.base import FALLBACK_METRIC, Found, Method, MethodOptions, OptionError, flag
from circuitfind.methods.eap import eap
from circuitfind.methods.eap_ig import eap_circuit, eap_ig
from circuitfind.methods.eap_ig_act import eap_ig_act
from circuitfind.methods.edge_pruning import edge_pruning_circuit
from circuitfind.methods.faithfulness import (
    MIB_FRACTIONS,
    EmptyCircuitError,
    FaithfulnessCurve,
    circuit_masks,
    faithfulness,
    faithfulness_curve,
)
from circuitfind.methods.iterative_path import iterative_path_patching
from circuitfind.methods.node import node_circuit
from circuitfind.methods.selection import check_top_k, select_threshold, select_top_k
from circuitfind.methods.ugs import ugs_circuit
from circuitfind.progress import bar as progress_bar
from circuitfind.tasks import multitoken
from circuitfind.tasks.metrics import normalise

__all__ = [
    "ALGORITHMS",
    "MIB_FRACTIONS",
    "Circuit",
    "Discovery",
    "EmptyCircuitError",
    "FaithfulnessCurve",
    "acdc",
    "atp_circuit",
    "check_measurable",
    "check_options",
    "default_metric",
    "check_top_k",
    "circuit_masks",
    "discover",
    "eap",
    "eap_circuit",
    "eap_ig",
    "eap_ig_act",
    "edge_pruning_circuit",
    "faithfulness",
    "faithfulness_curve",
    "iterative_path_patching",
    "node_circuit",
    "select_threshold",
    "select_top_k",
    "ugs_circuit",
]

# Derived from the registry's traits (not spelled out again): the built-in methods that ...
_BUILTIN = registry.builtin()
ALGORITHMS = tuple(_BUILTIN)
TOP_K = tuple(n for n, m in _BUILTIN.items() if m.keeps_top_k())  # ... keep the top k edges (or heads within k edges)
NOISING_ONLY = tuple(n for n, m in _BUILTIN.items() if m.directions == ("noise",))  # ... run noising only (ACDC)
CORRUPTION_FREE = tuple(n for n, m in _BUILTIN.items() if not m.needs_corruption)  # ... find it from the clean run
PER_PROMPT = tuple(n for n, m in _BUILTIN.items() if m.per_prompt)  # ... give per-prompt edge scores
SCORED = tuple(n for n, m in _BUILTIN.items() if m.ranks_every_edge)  # ... rank every edge (a curve applies)
MAX_PRUNE_STEPS = registry.option_fields()["prune_steps"].metadata[-1].le


def allows_direction(algorithm: str, direction: str) -> bool:
    """Whether ``algorithm`` runs in ``direction`` (ACDC in the noising direction only)."""
    return direction in registry.get_method(algorithm).directions


def check_options(
    algorithm: str, direction: str = "noise", options: Mapping[str, Any] | None = None, **values: Any
) -> MethodOptions:
    """Refuse bad :func:`discover` options before any work: an unknown algorithm or direction, an option
    no method knows, and the values of the options the method reads (bounds from its options class, each
    error naming the command line's option). Returns the method's options. ``top_k`` is checked against the
    graph's size when the graph is known (:func:`check_top_k`)."""
    method = registry.get_method(algorithm)
    given = {**(options or {}), **values}
    known = set(registry.option_fields()) | set(method.Options.model_fields)
    unknown = sorted(set(given) - known)
    if unknown:
        raise OptionError(
            f"unknown option {', '.join(flag(u) for u in unknown)}; the methods' options: "
            f"{', '.join(flag(k) for k in sorted(known))}"
        )
    P.check_direction(direction)
    if direction not in method.directions:
        if method.directions == ("noise",):
            raise ValueError(
                f"{method.name} prunes from the full (clean) model: use direction='noise' (--direction noise)"
            )
        raise ValueError(f"{method.name} runs in the {' and '.join(method.directions)} direction only")
    return method.options(given)


def default_metric(algorithm: str, prompts: Sequence[Any] | None = None, task: str = "") -> tuple[str, str | None]:
    """The metric ``algorithm`` runs under when none is given (its method's ``default_metric``), and a note
    when it is not the method's own: a task (named ``task``) with a prompt of ``prompts``
    (:class:`~circuitfind.tasks.batch.Prompt`) that lacks a wrong answer cannot take ``logit_diff`` or
    ``logprob_diff``, and falls back to :data:`~circuitfind.methods.base.FALLBACK_METRIC`."""
    metric = registry.get_method(algorithm).default_metric
    if prompts is None or metric not in multitoken.NEEDS_WRONG:
        return metric, None
    lacking = [i for i, p in enumerate(prompts) if not p.counter_answer_set]
    if not lacking:
        return metric, None
    return FALLBACK_METRIC, (
        f"--metric defaults to {FALLBACK_METRIC} here, not {metric}: {len(lacking)} of {len(prompts)} prompts "
        f"of task {task!r} have no wrong answer, which {metric} needs"
    )


def check_measurable(setup: P.PatchingSetup) -> None:
    """Refuse a setup whose clean and corrupted metric values are equal (a constant metric, or a corruption
    that changes nothing): no effect can be normalised, so every method's result would be empty or
    noise. The same one-line refusal as the faithfulness's (:func:`circuitfind.tasks.metrics.normalise`),
    made before the search, so ACDC does not return an empty circuit as if it were a finding."""
    normalise(setup.clean_value, setup.clean_value, setup.corrupt_value)


@dataclass
class Discovery:
    """The result of :func:`discover`: the circuit and how well it reproduces the model.

    ``per_prompt``: EAP/EAP-IG edge scores per prompt ``[n_edges, batch]`` (when asked for; with
    multi-token answers one column per prompt, its teacher-forced rows summed);
    ``faithfulness``: :func:`faithfulness` of the circuit in the direction it was found in (``None``
    for an empty circuit, with the reason in ``faithfulness_status``); ``curve``: the
    :func:`faithfulness_curve` of the scores for :data:`SCORED` algorithms (when asked for).
    """

    circuit: Circuit
    direction: str
    per_prompt: torch.Tensor | None = None
    faithfulness: float | None = None
    faithfulness_status: str = "ok"
    curve: FaithfulnessCurve | None = None


def _run_method(
    method: type[Method],
    spec: str,
    setup: P.PatchingSetup,
    direction: P.Direction,
    options: MethodOptions,
    per_prompt: bool,
) -> Found:
    """``method.find``; a method of the user's (not built in) that exits, raises or returns something other
    than a :class:`~circuitfind.methods.base.Found` is a one-line :class:`~circuitfind.methods.registry.MethodError`
    naming it (its own refusals, circuitfind errors, pass through)."""
    if spec in registry.BUILTIN:
        return method().find(setup, direction, options, per_prompt=per_prompt)
    try:
        result = method().find(setup, direction, options, per_prompt=per_prompt)
    except CircuitfindError:
        raise
    except (Exception, SystemExit) as exc:
        raise registry.MethodError(f"method {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(result, Found) or not isinstance(result.circuit, Circuit):
        raise registry.MethodError(
            f"method {spec!r}: find() returned {type(result).__name__}, not a circuitfind.methods.base.Found of a Circuit"
        )
    return result


def discover(
    setup: P.PatchingSetup,
    algorithm: str,
    direction: P.Direction = "noise",
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    per_prompt: bool = False,
    curve: bool = True,
    **values: Any,
) -> Discovery:
    """Run one discovery method (a registered name, or ``package.module:Class``) and measure the
    circuit's faithfulness (and, with ``curve``, the faithfulness curve of its scores). ``options`` (or
    keywords: ``top_k=50``) are the method's options; any other method's options are ignored, an
    option no method knows is refused. With ``per_prompt``, methods that give per-prompt edge scores
    (EAP, EAP-IG) also return them ``[n_edges, batch]``. Options are checked first
    (:func:`check_options`); a ``top_k`` larger than the graph is an error, as in :func:`select_top_k`."""
    if isinstance(options, MethodOptions):
        options = options.model_dump()
    chosen = check_options(algorithm, direction, options, **values)
    method = registry.get_method(algorithm)
    if isinstance(setup.batch, multitoken.AnswerRows):
        multitoken.check_algorithm(setup.batch.task.name, method.name)
    name = method.name
    check_measurable(setup)
    with progress_bar(show=setup.progress, desc=f"{name}: searching", total=2 + curve, unit="stage") as stages:
        result = _run_method(method, algorithm, setup, direction, chosen, per_prompt and method.per_prompt)
        circuit = result.circuit
        if algorithm not in registry.BUILTIN:  # a method of the user's: the setting names what ran
            circuit.settings.update(algorithm=algorithm, method=method.name)
        found = Discovery(circuit, direction, result.per_prompt)
        patcher = EdgePatcher(setup, circuit.graph, direction=direction)
        stages.update()
        stages.set_description(f"{name}: faithfulness")
        if circuit.n_edges:
            found.faithfulness = faithfulness(patcher, circuit)
        else:
            found.faithfulness_status = "empty circuit"
        stages.update()
        if curve and method.ranks_every_edge and circuit.scores is not None:
            stages.set_description(f"{name}: faithfulness curve")
            found.curve = faithfulness_curve(patcher, circuit.scores)
        stages.update(stages.total - stages.n)
    # what was measured travels with the circuit into its files (circuitfind.circuits.circuit)
    circuit.settings.update(
        faithfulness=found.faithfulness,
        faithfulness_status=found.faithfulness_status,
        curve=found.curve.as_dict() if found.curve else None,
    )
    return found
