"""A discovered circuit: a subset of a :class:`ModelGraph`'s edges, with scores and settings."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from circuitfind.graph import INPUT, ModelGraph, read_graph, write_graph


@dataclass
class Circuit:
    """Edges of ``graph`` kept by a discovery algorithm.

    Attributes:
        graph: the model's edge graph.
        in_circuit: ``[n_edges]`` bool (``[n_edges, pos]`` for per-position graphs).
        scores: per-edge scores of the algorithm (same shape), or ``None``.
        settings: how it was found (algorithm, corruption, metric, direction, thresholds...).
    """

    graph: ModelGraph
    in_circuit: torch.Tensor
    scores: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.in_circuit = self.in_circuit.bool().cpu()
        if self.scores is not None:
            self.scores = self.scores.detach().float().cpu()
        expected = (self.graph.n_edges,) if self.graph.n_pos is None else (self.graph.n_edges, self.graph.n_pos)
        if tuple(self.in_circuit.shape) != expected:
            raise ValueError(f"in_circuit must have shape {expected}, got {tuple(self.in_circuit.shape)}")

    @property
    def n_edges(self) -> int:
        """Number of edges in the circuit (edge-position pairs for per-position graphs)."""
        return int(self.in_circuit.sum())

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(sender, receiver input)`` names of the circuit's edges."""
        keep = self.in_circuit.any(-1) if self.in_circuit.dim() == 2 else self.in_circuit
        return [e for e, k in zip(self.graph.edges, keep.tolist()) if k]

    @property
    def nodes(self) -> set[str]:
        """Components (heads ``a{l}.{h}``, MLPs ``m{l}``, ``input``, ``logits``) touched by an edge."""
        keep = self.in_circuit.any(-1) if self.in_circuit.dim() == 2 else self.in_circuit
        out = set()
        for i in keep.nonzero().flatten().tolist():
            sender, feeds = self.graph.edge_nodes(i)
            out.update((sender, *feeds))
        return out

    @property
    def heads(self) -> set[str]:
        return {n for n in self.nodes if n.startswith("a")}

    def masks(self, device=None) -> torch.Tensor:
        """Keep-masks ``[1, n_edges(, pos)]`` for :class:`~circuitfind.edges.EdgePatcher`."""
        return self.in_circuit[None].float().to(device)

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as a ``networkx.DiGraph`` (all model edges, with ``in_circuit`` and ``score``)."""
        attrs = {"settings": json.dumps(self.settings, default=str)}
        return self.graph.to_networkx(self.scores, self.in_circuit, **attrs)

    def save(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write the circuit as GraphML, GEXF, node-link JSON or DOT (by suffix), atomically."""
        return write_graph(self.to_networkx(), path, fmt)

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> "Circuit":
        """Rebuild a circuit from :meth:`to_networkx` output (e.g. read back from a file)."""
        n_pos = g.graph.get("n_pos", -1)
        graph = ModelGraph(int(g.graph["n_layers"]), int(g.graph["n_heads"]), bool(g.graph["split_qkv"]),
                           None if n_pos in (-1, None) else int(n_pos), g.graph.get("n_kv_heads"))
        if graph.n_pos is not None:
            scores = torch.tensor([json.loads(g.edges[e].get("score_pos", "[]")) or [0.0] * graph.n_pos for e in graph.edges])
            keep = torch.tensor([json.loads(g.edges[e]["in_circuit_pos"]) for e in graph.edges])
        else:
            scores = torch.tensor([g.edges[e]["score"] for e in graph.edges])
            keep = torch.tensor([g.edges[e]["in_circuit"] for e in graph.edges])
        settings = json.loads(g.graph.get("settings", "{}"))
        return cls(graph, keep, scores, settings)

    @classmethod
    def load(cls, path: str | os.PathLike, fmt: str | None = None) -> "Circuit":
        return cls.from_networkx(read_graph(path, fmt))

    def summary(self) -> str:
        heads = sorted(self.heads, key=lambda n: tuple(int(x) for x in n[1:].split(".")))
        return (f"{self.settings.get('algorithm', 'circuit')}: {self.n_edges} of {self.graph.n_edges} edges, "
                f"{len(self.nodes - {INPUT, 'logits'})} components; heads {', '.join(heads) or '(none)'}")
