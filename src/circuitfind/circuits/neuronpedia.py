"""A circuit as Neuronpedia's attribution-graph JSON, which the Neuronpedia and circuit-tracer graph
frontend opens (``circuitfind export CIRCUIT out.json --format neuronpedia``).

The format is an attribution graph of features at token positions (Ameisen et al. 2025, "Circuit
Tracing"); its schema is vendored in ``schemas/neuronpedia-graph-schema.json`` (source, commit and
licence in ``schemas/README.md``) and every file written is validated against it first. circuitfind's
circuits are graphs of components, so the mapping is:

========================  ===================================================================
circuitfind               Neuronpedia node
========================  ===================================================================
``input``                 ``feature_type`` ``embedding``, ``layer`` ``"E"``
head ``a{l}.{h}``         ``attention head``, ``layer`` ``"l"``, ``feature`` ``h``
MLP ``m{l}``              ``mlp``, ``layer`` ``"l"``, after the layer's heads
receiver ``a{l}.{h}<q>``  ``attention input`` (q, k or v), ``layer`` ``"l"``, next to its head
``logits``                ``logit`` (the frontend draws it above the last layer)
========================  ===================================================================

* Only the circuit's nodes and edges are written (:meth:`Circuit.to_networkx` with ``circuit_only``).
  Each edge is a link weighted by its score (the sign kept: the frontend colours by sign). A q/k/v
  receiver feeds its head through a link weighted by the sum of the scores of the circuit's edges
  into that receiver (the signal it passes on), as ACDC draws it.
* Node ids are built from the layer, a per-layer ``feature`` index and the position
  (``{layer}_{feature}_{ctx_idx}``, ``jsNodeId`` ``{layer}_{feature}-{ctx_idx}``, circuit-tracer's
  pattern), never from node names: a name only appears in the node's label (``clerp``), as JSON text.
* Positions: a circuit over all positions is one column, ``ctx_idx`` 0, with the one prompt token
  ``"(all positions)"``; a per-position circuit (``n_pos``) has a column per position, named
  ``pos 0``, ``pos 1``, ... (circuitfind keeps no token strings with a circuit).
* The logit node's label reads ``output: 'logits' (p=1.000)``: the frontend parses a logit's ``p=``
  from its label; here it is not a probability, there is one output node, the metric's.
* ``metadata``: ``scan`` is the model's name (``settings["model"]``, else ``circuitfind``), ``slug``
  a slug of the run's settings; the settings (faithfulness, curve) are in ``generation_settings``
  under ``circuitfind``, and a one-line summary in ``info.description``.
* Known limit of the frontend: it refuses a graph whose every non-logit node is in layer 0 or the
  embedding ("No layer found"), which only a circuit of a one-layer model can be.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import networkx as nx

from circuitfind import __version__
from circuitfind.circuits.graph_io import circuit_subgraph, jsonable, settings_of
from circuitfind.io import write_text

SCHEMA_FILE = "neuronpedia-graph-schema.json"
ALL_POSITIONS = "(all positions)"
FEATURE_TYPES = {
    "input": "embedding",
    "head": "attention head",
    "mlp": "mlp",
    "input_q": "attention input",
    "input_k": "attention input",
    "input_v": "attention input",
    "logits": "logit",
}
_KIND_ORDER = {"head": 0, "mlp": 1, "input_q": 2, "input_k": 3, "input_v": 4}
_SLUG = re.compile(r"[^a-z0-9]+")
MAX_LABEL = 200  # characters of a node label (a hostile name is cut, not copied whole into every view)


@cache
def schema() -> dict:
    """The vendored Neuronpedia graph schema (draft-07)."""
    return json.loads(files("circuitfind.circuits").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8"))


def validate(obj: Any) -> None:
    """Check ``obj`` against the vendored schema; ``ValueError`` naming the first problem and where."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema())
    error = next(iter(sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"not a valid Neuronpedia graph at {where}: {error.message[:200]}")


def slug(text: str, limit: int = 80) -> str:
    """``text`` as a URL slug: lower-case letters, digits and single dashes, at most ``limit`` long."""
    out = _SLUG.sub("-", text.lower()).strip("-")[:limit].strip("-")
    return out or "circuit"


def _label(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 3] + "..."


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"score {value!r} is not a finite number")
    return number


def to_neuronpedia(g: nx.DiGraph, settings: dict | None = None, n_pos: int | None = None) -> dict:
    """The Neuronpedia graph of a circuit graph (``Circuit.to_networkx(circuit_only=True)``: nodes with
    ``layer`` and ``kind``, edges with ``score``; per-position edges with ``in_circuit_pos`` and
    ``score_pos``), validated against the vendored schema. See the module docstring for the mapping."""
    settings = jsonable(dict(settings or {}))
    positions = [ALL_POSITIONS] if n_pos is None else [f"pos {p}" for p in range(n_pos)]

    def place(name: Any) -> tuple[str, int]:
        d = g.nodes[name]
        kind = d.get("kind")
        if kind not in FEATURE_TYPES:
            raise ValueError(
                f"node {_label(repr(name))[:60]}: kind {_label(repr(kind))[:40]} is not one of {sorted(FEATURE_TYPES)}"
            )
        if kind == "input":
            return "E", 0
        if kind == "logits":
            return "logit", 0
        layer = d.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(
                f"node {_label(repr(name))[:60]}: layer {_label(repr(layer))[:40]} is not a whole number >= 0"
            )
        return str(layer), _KIND_ORDER[kind]

    # a feature index per layer, in a fixed order: heads by index, the MLP, then q/k/v inputs
    def order(name: Any) -> tuple:
        d = g.nodes[name]
        head = d.get("head") if isinstance(d.get("head"), int) and not isinstance(d.get("head"), bool) else -1
        return (*place(name), head, str(name))

    features: dict[Any, tuple[str, int]] = {}
    counters: dict[str, int] = {}
    for name in sorted(g.nodes, key=order):
        layer = place(name)[0]
        features[name] = (layer, counters.get(layer, 0))
        counters[layer] = counters.get(layer, 0) + 1

    nodes: dict[tuple[Any, int], dict] = {}

    def node_id(name: Any, ctx: int) -> str:
        layer, feature = features[name]
        if (name, ctx) not in nodes:
            kind = g.nodes[name]["kind"]
            if kind == "logits":
                clerp = "output: 'logits' (p=1.000)"
            elif kind.startswith("input_"):
                clerp = f"{_label(name)}: {kind[-1]} input"  # of its head, or its key/value group's heads
            else:
                clerp = _label(name)
            nodes[(name, ctx)] = {
                "node_id": f"{layer}_{feature}_{ctx}",
                "feature": feature,
                "layer": layer,
                "ctx_idx": ctx,
                "feature_type": FEATURE_TYPES[kind],
                "jsNodeId": f"{layer}_{feature}-{ctx}",
                "clerp": clerp,
                "influence": None,
                "activation": None,
            }
        return nodes[(name, ctx)]["node_id"]

    links: list[dict] = []
    into: dict[tuple[Any, int], float] = {}  # summed scores into each q/k/v receiver, per position
    structural: list[tuple[Any, Any]] = []
    for u, v, d in g.edges(data=True):
        if d.get("structural"):
            structural.append((u, v))
            continue
        for ctx, weight in _positions(d, n_pos):
            links.append({"source": node_id(u, ctx), "target": node_id(v, ctx), "weight": weight})
            into[(v, ctx)] = into.get((v, ctx), 0.0) + weight
    for u, v in structural:
        for ctx in range(len(positions)):
            if (u, ctx) in into:
                links.append({"source": node_id(u, ctx), "target": node_id(v, ctx), "weight": into[(u, ctx)]})
    for name in g.nodes:  # a node without edges (an empty circuit's input and logits) still shows
        if g.degree(name) == 0:
            node_id(name, len(positions) - 1)

    summary = _summary(settings, len(links))
    out = {
        "metadata": {
            "slug": slug(
                "-".join(str(settings.get(k, "")) for k in ("task", "algorithm", "corruption", "metric", "direction"))
                or "circuit"
            ),
            "scan": _scan(settings),
            "prompt_tokens": positions,
            "prompt": _label(f"{settings.get('task', 'task')}: {len(positions)} position column(s)"),
            "info": {
                "description": summary,
                "generator": {"name": "circuitfind", "version": __version__},
            },
            "generation_settings": {"circuitfind": settings},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both"},
        "nodes": sorted(nodes.values(), key=lambda n: (n["layer"] != "E", n["node_id"])),
        "links": links,
    }
    validate(out)
    return out


def _positions(d: dict, n_pos: int | None) -> list[tuple[int, float]]:
    """``(ctx_idx, weight)`` of an edge: position 0 for a circuit over all positions, else each
    position where it is in the circuit."""
    if n_pos is None:
        return [(0, _finite(d.get("score", 0.0)))]
    keep = json.loads(d["in_circuit_pos"]) if isinstance(d.get("in_circuit_pos"), str) else [True] * n_pos
    scores = json.loads(d["score_pos"]) if isinstance(d.get("score_pos"), str) else [0.0] * n_pos
    return [(p, _finite(s)) for p, (k, s) in enumerate(zip(keep, scores, strict=True)) if k]


def _scan(settings: dict) -> str:
    model = settings.get("model")
    text = model if isinstance(model, str) and model.strip() else "circuitfind"
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:100]
    return text or "circuitfind"


def _summary(settings: dict, n_links: int) -> str:
    parts = [f"{settings.get('algorithm', 'circuit')} circuit from circuitfind, {n_links} links"]
    faith = settings.get("faithfulness")
    if isinstance(faith, (int, float)) and not isinstance(faith, bool):
        parts.append(f"faithfulness {faith:.3f}")
    curve = settings.get("curve") if isinstance(settings.get("curve"), dict) else {}
    for key in ("cpr", "cmd"):
        if isinstance(curve.get(key), (int, float)) and not isinstance(curve.get(key), bool):
            parts.append(f"{key.upper()} {curve[key]:.3f}")
    return _label("; ".join(parts))


def write_neuronpedia(graph: nx.DiGraph, path) -> Path:
    """Write a full circuit graph (``Circuit.to_networkx()``) as a Neuronpedia graph, atomically."""
    n_pos = graph.graph.get("n_pos", -1)
    obj = to_neuronpedia(circuit_subgraph(graph), settings_of(graph), None if n_pos in (-1, None) else n_pos)
    return write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False))
