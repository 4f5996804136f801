"""EAP, edge attribution patching (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery"): the gradient of the metric with respect to every edge mask at once
(clean and corrupted forwards + one forward/backward). A score is ``-d metric / d mask`` at masks that
keep every edge: ``(source - base) . d metric / d receiver input`` (see :mod:`circuitfind.methods`)."""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods.selection import EdgeAttribution


def eap(patcher: EdgePatcher, per_prompt: bool = False) -> torch.Tensor:
    """EAP scores ``[n_edges]``: first-order estimate of the metric change when each edge is patched.

    With ``per_prompt``, ``[n_edges, batch]`` scores, one column per prompt (their mean is the
    default result), for bootstrap intervals. Prompts are split into passes that fit the patcher's
    memory budget, with a backward per pass (:meth:`EdgePatcher.passes`); the gradients add up to
    the one-pass result.
    """
    B = patcher.setup.size
    if patcher.graph.n_pos is None:  # sender differences dotted with receiver gradients, a pass at a time
        parts = [
            patcher.attribution(per_prompt=per_prompt, prompts=prompts, scale=1.0 if per_prompt else 1.0 / B)
            for _, prompts in patcher.passes(1)
        ]
        return torch.cat(parts, dim=1) if per_prompt else torch.stack(parts).sum(0)
    masks = patcher.ones(per_prompt=per_prompt).requires_grad_(True)  # per-position edges: the masks' gradient
    for _, prompts in patcher.passes(1, "grad"):
        values = patcher.run(masks, per_prompt=per_prompt, prompts=prompts)  # [1, prompts]
        (values.sum() if per_prompt else values.sum() / B).backward()
    return -masks.grad[0].detach()


class EAP(EdgeAttribution):
    name = "eap"
    paper = "Syed, Rager & Conmy 2023, Attribution Patching Outperforms Automated Circuit Discovery"
    summary = "edge attribution patching: first-order estimate of every edge's effect"

    def scores(self, patcher: EdgePatcher, options: Any, per_prompt: bool) -> torch.Tensor:
        return eap(patcher, per_prompt=per_prompt)

    def recorded(self, options: Any) -> dict:
        return {"ig_steps": None}
