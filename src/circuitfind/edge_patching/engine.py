"""The interface between :class:`~circuitfind.edge_patching.EdgePatcher` and its engines.

An engine turns keep-masks into answer-position logits; the patcher does the rest (checking the
masks, splitting candidates and prompts into passes within the memory budget, scoring). Two
engines implement it: :class:`~circuitfind.edge_patching.hooks.HooksEngine` (``hooks``: the bridge
with forward hooks; every architecture, and the only one for gradients) and
:class:`~circuitfind.edge_patching.direct.DirectEngine` (``functional``: a hook-free pass on GPT-2
and Llama-style models, faster for plain evaluations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from circuitfind.circuits.graph import ModelGraph
from circuitfind.patching.setup import Direction, PatchingSetup

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@runtime_checkable
class Engine(Protocol):
    """What :class:`~circuitfind.edge_patching.EdgePatcher` needs from an engine for plain
    (no-gradient, position-free) evaluations. (Searches: :class:`~circuitfind.edge_patching.IncrementalSearch`
    runs incremental passes on the direct engine's masked pass, and starts each pass at the first
    changed receiver on any other engine.)"""

    name: str  # the engine option: "hooks" or "functional"

    def logits(self, keep: torch.Tensor, prompts: slice, first_receiver: int = 0) -> torch.Tensor:
        """Answer-position logits ``[candidates * prompts, vocab]`` of float keep-masks
        ``[candidates, n_edges]`` on the prompts ``prompts``. The candidates agree on every edge
        into the receivers before ``first_receiver`` (graph order), so the pass below it can run
        once and be shared (:class:`~circuitfind.edge_patching.prefix.PrefixCache`)."""
        ...


class Patcher(Protocol):
    """What the engines and the incremental search read from their
    :class:`~circuitfind.edge_patching.EdgePatcher`: a structural type below both, so that neither
    imports the patcher that imports them (not even for annotations)."""

    setup: PatchingSetup
    model: TransformerBridge
    graph: ModelGraph
    direction: Direction
    sender_hooks: list[str]
    sources: dict[str, torch.Tensor]
    engine: str  # "hooks" or "functional"
    backend: Engine

    def base_outputs(self) -> dict[str, torch.Tensor]: ...
    def row_bytes(self, kind: str) -> int: ...
    def budget(self) -> int: ...
    def embedding_stage_only(self, extra_hooks) -> bool: ...
    def score(self, answer: torch.Tensor, prompts: slice | None = None) -> torch.Tensor: ...
    def value(self, keep: torch.Tensor, **kw) -> torch.Tensor: ...
    def ones(self, n: int = 1, dtype=torch.float32, per_prompt: bool = False) -> torch.Tensor: ...
