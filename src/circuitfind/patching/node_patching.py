"""Node patching: sweeps that patch one component (a block's stream, a head, an MLP window) per
candidate, all through :func:`run_patched`.

A set of candidate patches is given as one mask per hook, ``[candidates, batch or 1, *activation
dims]``; candidates are stacked along the batch and evaluated in as few forward passes as
``max_batch`` allows, with no Python loop over prompts or candidates inside a chunk. On GPT-2 and
Llama-style models each candidate runs only the part of the model its patch can change, from the
unpatched run's cached activations (:mod:`circuitfind.patching.suffix`); elsewhere, or with
``engine="hooks"``, through full forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from circuitfind import progress
from circuitfind.names import BLOCK_HOOKS, hook_name
from circuitfind.patching.result import PatchResult, sweep_result
from circuitfind.patching.setup import (
    Direction,
    PatchingSetup,
    answer_logits,
    bind_hook,
    check_direction,
    patch_hook,
    repeat_ctx,
)
from circuitfind.patching.suffix import SuffixForward, use_suffix


def run_patched(
    setup: PatchingSetup,
    direction: Direction,
    masks: dict[str, torch.Tensor],
    sources: dict[str, torch.Tensor] | None = None,
    desc: str | None = None,
) -> torch.Tensor:
    """Per-prompt metric values ``[candidates, batch]`` of candidate patches.

    Args:
        masks: hook name -> ``[candidates, batch or 1, *activation dims (each full or 1)]``; bool
            or float (float blends ``base + m * (source - base)``).
        sources: hook name -> ``[batch, *activation dims]`` patched-in values; by default the
            other run's activations for ``direction`` (see :meth:`PatchingSetup.sources`).
    """
    check_direction(direction)
    if not masks:
        raise ValueError("no hooks to patch: masks is empty")
    counts = {m.shape[0] for m in masks.values()}
    if len(counts) != 1:
        raise ValueError(f"every mask needs the same number of candidates, got {sorted(counts)}")
    n_cand = counts.pop()
    sources = sources if sources is not None else setup.sources(direction, masks)
    chunk = max(1, setup.max_batch // setup.size)
    if use_suffix(setup, direction, names=list(masks)):
        with progress.bar(total=n_cand, desc=desc or "patching", show=setup.progress, announce=False) as bar:
            return SuffixForward(setup, direction).run(masks, sources, chunk, progress=bar)
    base = setup.base_run(direction)
    out = []
    starts = range(0, n_cand, chunk)
    show = setup.progress and len(starts) > 1
    for start in progress.bar(starts, desc=desc or "patching", show=show, announce=False):
        stop = min(start + chunk, n_cand)
        n = stop - start
        hooks = list(base.hooks)
        for name, mask in masks.items():
            part = mask[start:stop]
            if part.dtype == torch.bool and not part.any():
                continue
            hooks.append((name, bind_hook(patch_hook, source=sources[name], mask=part)))
        with torch.no_grad():
            logits = setup.model.run_with_hooks(base.tokens.repeat(n, 1), fwd_hooks=hooks)
        answer = answer_logits(logits, setup.plan.end_pos.repeat(n))
        out.append(setup.metric(answer, repeat_ctx(setup.ctx, n)).reshape(n, setup.size))
    return torch.cat(out)


def one_hot_masks(
    setup: PatchingSetup, what: str, act_shape: Sequence[int], grid: Sequence[int], place
) -> dict[str, torch.Tensor]:
    """Masks with one candidate per cell of ``grid`` (the first grid axis is the layer)."""
    device = setup.plan.clean.tokens.device
    n_cand = int(torch.tensor(grid).prod())
    masks = {}
    cells = torch.arange(n_cand).reshape(*grid)
    for layer in range(grid[0]):
        mask = torch.zeros(n_cand, 1, *act_shape, dtype=torch.bool, device=device)
        for cand in cells[layer].flatten().tolist():
            idx = torch.unravel_index(torch.tensor(cand), tuple(grid))
            place(mask[cand, 0], *[int(i) for i in idx[1:]])
        masks[hook_name(layer, what)] = mask
    return masks


def patch_block(setup: PatchingSetup, component: str = "resid_pre", direction: Direction = "denoise") -> PatchResult:
    """Patch ``resid_pre``, ``attn_out``, ``mlp_out`` or ``resid_post`` at each layer x position.

    Returns values of shape ``[layer, pos]``.
    """
    if component not in BLOCK_HOOKS:
        raise ValueError(f"component must be one of {sorted(BLOCK_HOOKS)}, got {component!r}")
    L, T = setup.n_layers, setup.n_pos
    masks = one_hot_masks(setup, component, (T, 1), (L, T), lambda m, p: m.__setitem__(p, True))
    values = run_patched(setup, direction, masks, desc=f"{component} patching")
    return sweep_result(setup, direction, values, (L, T), ("layer", "pos"), component)


def patch_heads(setup: PatchingSetup, direction: Direction = "denoise", by_position: bool = False) -> PatchResult:
    """Patch each attention head's output (``hook_z``), over all positions or one position at a time.

    Returns ``[layer, head]``, or ``[layer, pos, head]`` with ``by_position``.
    """
    L, H, T = setup.n_layers, setup.n_heads, setup.n_pos
    grid: tuple[int, ...]
    axes: tuple[str, ...]
    if by_position:
        grid, axes = (L, T, H), ("layer", "pos", "head")
        masks = one_hot_masks(setup, "z", (T, H, 1), grid, lambda m, p, h: m.__setitem__((p, h), True))
    else:
        grid, axes = (L, H), ("layer", "head")
        masks = one_hot_masks(setup, "z", (1, H, 1), grid, lambda m, h: m.__setitem__((0, h), True))
    values = run_patched(setup, direction, masks, desc="head patching")
    return sweep_result(setup, direction, values, grid, axes, "heads_by_pos" if by_position else "heads")


def window_layers(center: int, window: int, n_layers: int) -> range:
    """Layers of a sliding window of ``window`` layers centred on ``center``, clipped at the ends."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lo = max(0, center - (window - 1) // 2)
    hi = min(n_layers, center + window // 2 + 1)
    return range(lo, hi)


def patch_mlp_windows(
    setup: PatchingSetup,
    window: int = 1,
    direction: Direction = "denoise",
    positions: str | Sequence[str] | None = None,
) -> PatchResult:
    """Patch the MLP outputs of a sliding window of layers centred on each layer (Meng et al.).

    ``positions`` names key tokens to patch at (e.g. the subject's last token); ``None`` patches
    every position. Returns ``[layer]`` (the window centre).
    """
    L = setup.n_layers
    # a window wider than the model is every layer at every centre: a flat sweep that reads as a result
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= L:
        raise ValueError(f"window must be a whole number of layers from 1 to {L} (the model's layers), got {window!r}")
    pos = setup.position_mask(positions)[None, :, :, None]  # [1, batch, pos, 1]
    inside = torch.zeros(L, L, device=pos.device)
    for center in range(L):
        inside[center, list(window_layers(center, window, L))] = 1.0
    masks = {hook_name(j, "mlp_out"): (inside[:, j, None, None, None] * pos) for j in range(L)}
    values = run_patched(setup, direction, masks, desc=f"MLP window {window}")
    result = sweep_result(setup, direction, values, (L,), ("layer",), f"mlp_window_{window}")
    return result


def window_sum_baseline(single_layer: PatchResult, window: int) -> PatchResult:
    """The summation baseline: each window's effect as the sum of its single-layer effects.

    ``single_layer`` must be :func:`patch_mlp_windows` with ``window=1``.
    """
    if single_layer.axes != ("layer",):
        raise ValueError("window_sum_baseline needs a single-layer MLP sweep (axes ('layer',))")
    L = single_layer.values.shape[0]
    effect = single_layer.per_prompt - single_layer.base
    summed = torch.stack([effect[list(window_layers(c, window, L))].sum(0) for c in range(L)]) + single_layer.base
    return PatchResult(
        summed.mean(-1),
        summed,
        single_layer.axes,
        single_layer.metric,
        single_layer.corruption,
        single_layer.direction,
        single_layer.clean,
        single_layer.corrupt,
        f"mlp_window_sum_{window}",
    )
