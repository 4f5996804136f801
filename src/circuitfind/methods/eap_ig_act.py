"""EAP-IG on activations (MIB's "EAP-IG-activations", Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark"): integrated gradients taken at the senders' activations, every edge mask
at ``alpha`` along the path from the patched to the base run."""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.checks import positive_int
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.eap_ig import EAPIGOptions
from circuitfind.methods.selection import EdgeAttribution


def eap_ig_act(patcher: EdgePatcher, steps: int = 5, per_prompt: bool = False) -> torch.Tensor:
    """EAP-IG on activations scores ``[n_edges]`` (MIB's "EAP-IG-activations", Mueller et al. 2025,
    "MIB: A Mechanistic Interpretability Benchmark"; IG of Sundararajan et al. 2017 taken at the
    senders' activations instead of the input embeddings).

    Every sender's activation, as its receivers read it, is interpolated between the source and base
    runs: with fixed differences (``source - base``, :meth:`EdgePatcher.run`'s ``fixed_diff``) and
    every edge mask at ``alpha``, receiver inputs are ``base + (1 - alpha) (source - base)`` per edge.
    The score is ``-d metric / d mask`` averaged over the grid ``alpha = k / steps``, ``k = 1..steps``
    (a right-endpoint Riemann sum in mask space, the same choice as :func:`eap_ig`). The grid is
    chosen so that ``steps=1`` is the gradient at masks that keep every edge, which is EAP exactly, in
    both directions (tested); it never evaluates the fully patched point ``alpha = 0``.

    With ``per_prompt``, ``[n_edges, batch]`` scores (their mean over prompts is the default)."""
    positive_int("steps", steps)
    B = patcher.setup.size
    ones = patcher.ones(steps, per_prompt=per_prompt)
    alphas = torch.arange(1, steps + 1, dtype=ones.dtype, device=ones.device) / steps
    masks = (ones * alphas.view(-1, *([1] * (ones.dim() - 1)))).requires_grad_(True)
    scale = 1.0 if per_prompt else 1.0 / B
    for steps_part, prompts in patcher.passes(steps, "grad"):  # a backward per pass (memory budget)
        values = patcher.run(masks[steps_part], fixed_diff=True, per_prompt=per_prompt, prompts=prompts)
        (values.sum() * scale).backward()
    assert masks.grad is not None
    return -masks.grad.mean(0).detach()


class EAPIGAct(EdgeAttribution):
    name = "eap_ig_act"
    paper = "Mueller et al. 2025, MIB: A Mechanistic Interpretability Benchmark"
    summary = "EAP-IG with the senders' activations interpolated (MIB's EAP-IG-activations)"
    Options = EAPIGOptions

    def scores(self, patcher: EdgePatcher, options: Any, per_prompt: bool) -> torch.Tensor:
        return eap_ig_act(patcher, options.ig_steps, per_prompt=per_prompt)

    def recorded(self, options: Any) -> dict:
        return {"ig_steps": options.ig_steps}
