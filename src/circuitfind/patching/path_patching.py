"""Path patching (Wang et al. 2022): the effect of each sender head on a set of receivers (q/k/v
inputs of heads, :class:`PathReceiver`, or the logits) only through the direct paths between them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from circuitfind import progress
from circuitfind.names import LOGITS, hook_name
from circuitfind.patching.result import PatchResult
from circuitfind.patching.setup import Direction, PatchingSetup, answer_logits, bind_hook, check_direction, repeat_ctx
from circuitfind.patching.suffix import SuffixForward, use_suffix


@dataclass(frozen=True)
class PathReceiver:
    """A path-patching receiver: one head's ``q``, ``k`` or ``v`` input.

    For grouped-query attention, ``head`` of a ``k`` or ``v`` receiver is the key/value head index.
    """

    layer: int
    head: int
    input: Literal["q", "k", "v"]


def path_patch(
    setup: PatchingSetup,
    receivers: Sequence[PathReceiver] | str = LOGITS,
    positions: str | Sequence[str] | None = "end",
    direction: Direction = "noise",
    senders: Sequence[tuple[int, int]] | None = None,
) -> PatchResult:
    """Path patching (Wang et al. 2022) from each sender head to a receiver set.

    For each sender head: (1) run the base input with every head's output frozen to the base run
    except the sender, which takes the other run's value (MLPs recompute); record the receivers'
    inputs; (2) run the base input again, patching only those receiver inputs (at ``positions``)
    with the recorded values, and measure the metric. Receivers are q/k/v inputs of given heads, or
    ``"logits"``: the final residual stream.

    MLPs recompute in step (1), as in the paper, where the MLPs count as part of a path between heads:
    the path "sender -> logits" is the sender's effect through the residual stream and every later MLP.
    On known-suppress, whose answer goes ``a1.0 -> m1 -> logits``, the path found is ``a1.0 -> logits``.
    Edge-level methods (ACDC, EAP, edge pruning) name ``m1`` where a user needs the MLP as a node.

    Returns ``[layer, head]`` over senders (senders outside ``senders`` are NaN).
    """
    check_direction(direction)
    L, H, B = setup.n_layers, setup.n_heads, setup.size
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    senders = list(senders) if senders is not None else all_heads
    if not senders:
        raise ValueError("path_patch needs at least one sender head")
    path_receivers: list[PathReceiver] | None = None  # None: the logits
    if isinstance(receivers, str) and receivers != LOGITS:
        raise ValueError(f"receivers must be PathReceivers or {LOGITS!r}, got {receivers!r}")
    if not isinstance(receivers, str):
        path_receivers = list(receivers)
        if not path_receivers:
            raise ValueError("path_patch needs at least one receiver (or 'logits')")
        kv = getattr(setup.model.cfg, "n_key_value_heads", None) or H
        for r in path_receivers:
            if r.input not in ("q", "k", "v"):
                raise ValueError(f"invalid receiver {r}: input must be 'q', 'k' or 'v', got {r.input!r}")
            n = H if r.input == "q" else kv  # k/v inputs are per key/value head (grouped-query attention)
            if not (0 <= r.layer < L and 0 <= r.head < n):
                raise ValueError(f"invalid receiver {r}: layer must be < {L}, head < {n} for {r.input} inputs")
    recv_hooks: dict[str, torch.Tensor | None]
    if path_receivers is None:
        recv_hooks = {hook_name(L - 1, "resid_post"): None}
    else:
        recv_hooks = {}
        for r in path_receivers:
            name = hook_name(r.layer, f"{r.input}_input")
            heads = recv_hooks.setdefault(name, torch.zeros(H if r.input == "q" else kv, dtype=torch.bool))
            heads[r.head] = True
    pos = setup.position_mask(positions)  # [batch, pos]
    chunk = max(1, setup.max_batch // B)
    if use_suffix(setup, direction, receivers=list(recv_hooks)):
        with progress.bar(total=len(senders), desc="path patching", show=setup.progress, announce=False) as bar:
            per_sender = SuffixForward(setup, direction).path_values(senders, recv_hooks, pos, chunk, bar).cpu()
    else:
        per_sender = _pathpatch_hooks(setup, direction, senders, recv_hooks, pos, chunk)
    grid = torch.full((L, H, B), float("nan"))
    for (l, h), row in zip(senders, per_sender, strict=True):
        grid[l, h] = row
    return PatchResult(
        grid.mean(-1),
        grid,
        ("layer", "head"),
        setup.metric.name,
        setup.plan.name,
        direction,
        setup.clean_value,
        setup.corrupt_value,
        "path",
    )


def _pathpatch_hooks(
    setup: PatchingSetup,
    direction: Direction,
    senders: Sequence[tuple[int, int]],
    recv_hooks: dict[str, torch.Tensor | None],
    pos: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Path patching with two full forward passes of the bridge per chunk of senders:
    per-prompt values ``[senders, batch]`` (see :func:`path_patch`)."""
    L, H, B = setup.n_layers, setup.n_heads, setup.size
    z_names = [hook_name(l, "z") for l in range(L)]
    base_z = setup.base_activations(direction, z_names)
    src_z = setup.sources(direction, z_names)
    base = setup.base_run(direction)
    values = []
    starts = range(0, len(senders), chunk)
    for start in progress.bar(starts, desc="path patching", show=setup.progress, announce=False):
        group = senders[start : start + chunk]
        n = len(group)
        sender_mask = torch.zeros(L, n, 1, 1, H, 1, dtype=torch.bool, device=pos.device)
        for i, (l, h) in enumerate(group):
            sender_mask[l, i, 0, 0, h] = True
        recorded: dict[str, torch.Tensor] = {}

        # This chunk's n, sender_mask and recorded are bound to the hooks, not read from the loop.
        def freeze(act, hook, layer, n, sender_mask):
            view = act.reshape(n, B, *act.shape[1:])
            out = torch.where(sender_mask[layer], src_z[z_names[layer]], base_z[z_names[layer]])
            return out.expand_as(view).reshape(act.shape)

        def record(act, hook, key, recorded):
            recorded[key] = act.detach().clone()

        hooks = list(base.hooks)
        hooks += [(z_names[l], bind_hook(freeze, layer=l, n=n, sender_mask=sender_mask)) for l in range(L)]
        hooks += [(name, bind_hook(record, key=name, recorded=recorded)) for name in recv_hooks]
        tokens = base.tokens.repeat(n, 1)
        with torch.no_grad():
            setup.model.run_with_hooks(tokens, fwd_hooks=hooks)
            patch_hooks = list(base.hooks)
            for name, heads in recv_hooks.items():
                shape = recorded[name].shape  # [n*B, pos, (head,) d]
                if heads is None:
                    mask = pos[None, :, :, None].bool()
                else:
                    mask = pos[None, :, :, None, None].bool() & heads.to(pos.device)[None, None, None, :, None]
                src = recorded[name].reshape(n, B, *shape[1:])
                patch_hooks.append((name, bind_hook(patch_hook_full, source=src, mask=mask)))
            logits = setup.model.run_with_hooks(tokens, fwd_hooks=patch_hooks)
        answer = answer_logits(logits, setup.plan.end_pos.repeat(n))
        values.append(setup.metric(answer, repeat_ctx(setup.ctx, n)).reshape(n, B))
    return torch.cat(values).cpu()


def patch_hook_full(act: torch.Tensor, hook, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Like the candidate patch hook, but ``source`` already has one copy per candidate."""
    view = act.reshape(*source.shape)
    return torch.where(mask, source, view).reshape(act.shape)
