"""EAP-IG on the input embeddings (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness"):
EAP with integrated gradients, the gradients averaged over ``steps`` inputs interpolated between the
corrupted and clean token embeddings."""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.checks import positive_int
from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.edge_patching.hooks import Hook
from circuitfind.methods.base import IGSteps, TopK
from circuitfind.methods.eap import eap
from circuitfind.methods.selection import EdgeAttribution, check_top_k, select_top_k, settings_of


def eap_ig(patcher: EdgePatcher, steps: int = 5, per_prompt: bool = False) -> torch.Tensor:
    """EAP-IG scores ``[n_edges]``: ``(source - base)`` sender outputs times the receivers' gradients
    averaged over ``steps`` token-embedding interpolations ``corrupt + k/steps (clean - corrupt)``.

    With ``per_prompt``, ``[n_edges, batch]`` scores (their mean over prompts is the default)."""
    positive_int("steps", steps)
    setup = patcher.setup
    clean = setup.activations("clean", ["hook_embed"])["hook_embed"]
    corrupt = setup.activations("corrupt", ["hook_embed"])["hook_embed"]
    # A right-endpoint Riemann sum of the path integral from the corrupted (alpha = 0) to the clean
    # (alpha = 1) embeddings: alpha = k / steps for k = 1..steps. So steps=1 is the gradient at the
    # clean input, which in the noising direction (base run = clean) is EAP exactly (tested). Hanna
    # et al.'s EAP-IG code (later versions) sums k = 0..steps-1, the left endpoints: it includes the
    # corrupted input and never reaches the clean one. Both tend to the same integral as steps grows.
    alphas = torch.arange(1, steps + 1, dtype=clean.dtype, device=clean.device) / steps
    B = setup.size
    start = 0  # the first step of the current pass

    def interpolate(act, hook):
        n = act.shape[0] // B
        a = alphas[start : start + n].view(n, 1, 1, 1)
        return (corrupt + a * (clean - corrupt)).reshape(act.shape)

    hooks: list[Hook] = [("hook_embed", interpolate)]
    scale = 1.0 if per_prompt else 1.0 / B
    if patcher.graph.n_pos is None:
        total = None
        for steps_part, prompts in patcher.passes(steps, extra_hooks=hooks):  # a backward per pass (memory budget)
            start = steps_part.start
            part = patcher.attribution(
                fixed_diff=True,
                extra_hooks=hooks,
                n=steps_part.stop - steps_part.start,
                per_prompt=per_prompt,
                prompts=prompts,
                scale=scale,
            )
            if per_prompt:
                total = torch.zeros(part.shape[0], B, device=part.device) if total is None else total
                total[:, prompts] += part
            else:
                total = part if total is None else total + part
        return total / steps
    masks = patcher.ones(steps, per_prompt=per_prompt).requires_grad_(True)  # per-position edges: the masks' gradient
    for steps_part, prompts in patcher.passes(steps, "grad", extra_hooks=hooks):
        start = steps_part.start
        values = patcher.run(
            masks[steps_part], fixed_diff=True, extra_hooks=hooks, per_prompt=per_prompt, prompts=prompts
        )
        (values.sum() * scale).backward()
    return -masks.grad.mean(0).detach()


def eap_circuit(patcher: EdgePatcher, k: int, ig_steps: int | None = None) -> Circuit:
    """Top-``k`` circuit by EAP (``ig_steps=None``) or EAP-IG scores."""
    check_top_k(k, patcher.graph)
    scores = eap(patcher) if ig_steps is None else eap_ig(patcher, ig_steps)
    name = "eap" if ig_steps is None else "eap_ig"
    return select_top_k(patcher.graph, scores, k, settings_of(patcher, name, k=k, ig_steps=ig_steps))


class EAPIGOptions(TopK, IGSteps):
    pass


class EAPIG(EdgeAttribution):
    name = "eap_ig"
    paper = "Hanna, Pezzelle & Belinkov 2024, Have Faith in Faithfulness"
    summary = "EAP with integrated gradients over interpolated input embeddings"
    Options = EAPIGOptions

    def scores(self, patcher: EdgePatcher, options: Any, per_prompt: bool) -> torch.Tensor:
        return eap_ig(patcher, options.ig_steps, per_prompt=per_prompt)

    def recorded(self, options: Any) -> dict:
        return {"ig_steps": options.ig_steps}
