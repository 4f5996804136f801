"""Incremental edge-masked passes: candidates evaluated against a reference circuit whose
activations are kept, rerunning only the components an edit reaches (ACDC's inner loop).

ACDC removes one edge at a time from a circuit that changes only by the edges it accepts. Against
the current circuit's receiver inputs and sender outputs, a candidate that edits the edges into a
few receivers changes only the components downstream of them along kept edges, so each step costs
those components instead of a forward pass. :class:`IncrementalSearch` is the search's view
(:meth:`EdgePatcher.incremental`); :class:`IncrementalForward` the passes, built on
:class:`~circuitfind.edge_patching.direct.MaskedForward`'s components, sources and answer
positions (the direct engine); with the hooks engine a search starts each pass at the first changed
receiver instead. Tests pin both to full passes of the hooks engine.
"""

from __future__ import annotations

import torch

from circuitfind.edge_patching.direct import DirectEngine, MaskedForward
from circuitfind.edge_patching.engine import Patcher
from circuitfind.names import hook_name
from circuitfind.patching import memory


class IncrementalSearch:
    """Metric values of candidate masks that differ little from a reference that moves (ACDC).

    The reference starts as every edge kept. :meth:`values` evaluates candidates, :meth:`adopt`
    makes one of them the new reference. With the functional engine only the components reached
    from the changed receivers along kept edges run (:class:`IncrementalForward`);
    with the hooks engine the forward pass starts at the first changed receiver's layer.

    ``max_candidates`` is how many candidates one incremental pass evaluates within the patcher's
    memory budget (every prompt, at least one candidate); :meth:`values` splits larger sets.
    """

    def __init__(self, patcher: Patcher):
        self.patcher = patcher
        self.reference = patcher.ones()
        self._last: torch.Tensor | None = None
        self._kept_from = 0  # candidates of the last call from here on ran in the pass whose state is kept
        B = patcher.setup.size
        per_candidate = patcher.row_bytes(patcher.engine) * B
        self.max_candidates = memory.rows_per_pass(
            patcher.budget(), per_candidate, max(1, patcher.setup.max_batch // B)
        )
        self.forward: IncrementalForward | None = None
        if isinstance(patcher.backend, DirectEngine):
            inputs = patcher.setup.base_activations(patcher.direction, IncrementalForward.hooks(patcher.graph.n_layers))
            self.forward = IncrementalForward(patcher.backend.masked_forward(), inputs)

    def values(self, keep: torch.Tensor) -> torch.Tensor:
        """Mean metric per candidate ``[candidates]`` for ``[candidates, n_edges]`` keep-masks."""
        self._last = keep
        if self.forward is None:
            differs = (keep != self.reference).any(0)
            first = int(self.patcher.graph.edge_index[1][differs.cpu()].min()) if differs.any() else 0
            return self.patcher.value(keep, first_receiver=first)
        values = []
        with torch.no_grad():
            for part in keep.split(self.max_candidates):
                answer = self.forward.logits(1.0 - self.patcher.graph.dense(part.float()))
                values.append(self.patcher.score(answer).mean(-1))
        self._kept_from = keep.shape[0] - part.shape[0]
        return torch.cat(values)

    def adopt(self, j: int) -> None:
        """Make candidate ``j`` of the last :meth:`values` call the reference."""
        self.reference = self._last[j : j + 1].clone()
        if self.forward is None:
            return
        if j < self._kept_from:  # its pass's state is gone: run it again alone
            with torch.no_grad():
                self.forward.logits(1.0 - self.patcher.graph.dense(self.reference.float()))
            self.forward.adopt(0)
        else:
            self.forward.adopt(j - self._kept_from)


class IncrementalForward:
    """Edge-masked passes relative to a reference mask set whose receiver inputs and sender
    outputs are kept, so that a candidate runs only the components its edit reaches.

    A candidate that differs from the reference on the edges into a few receivers changes only
    the components downstream of them along kept edges. Each of those runs from its reference
    input plus ``sum_s keep(s, r) delta_s + sum_s (patched - patched_ref)(s, r) (source_s - out_s)``,
    where ``delta_s`` is the change of sender ``s``'s output and ``out_s`` its reference output.
    :meth:`adopt` makes one of the last candidates the new reference (ACDC after a removal), so a
    search step costs the few components it touches instead of a forward pass.

    Args:
        mf: the masked pass (model components, graph, sources, answer positions).
        inputs: the base run's receiver inputs (the reference starts as the base run, every edge
            kept): ``blocks.{l}.hook_resid_pre`` (in the base run every head's q, k and v input is
            this residual stream: one tensor serves them all), ``blocks.{l}.hook_mlp_in`` and the
            last ``hook_resid_post``.
    """

    def __init__(self, mf: MaskedForward, inputs: dict[str, torch.Tensor]):
        self.mf, g = mf, mf.graph
        L, H = g.n_layers, g.n_heads
        rows, end = mf.rows, mf.end_pos
        S, R = len(g.senders), len(g.receivers)
        self.patched = torch.zeros(S, R, device=end.device)
        self.inp: list[torch.Tensor | None] = [None] * R
        self.out: list[torch.Tensor | None] = [None] * S
        self.src: list[torch.Tensor | None] = [None] * S
        self.head_recv: list[list[tuple[int, int, int]]] = []  # per layer, per head: q, k, v receivers
        group = H // (g.n_kv_heads or H)  # 1 for merged q/k/v receivers (no grouped-query attention)
        self.src[0], self.out[0] = mf.input_source, mf.embed
        for layer in range(L):
            last = layer == L - 1
            q_idx, k_idx, v_idx = mf.qkv[layer]
            resid = inputs[hook_name(layer, "resid_pre")]
            per_head = []
            for h in range(H):
                kv = h // group
                rq, rk, rv = q_idx[h], k_idx[kv], v_idx[kv]
                per_head.append((rq, rk, rv))
                self.inp[rq] = self.inp[rk] = self.inp[rv] = resid
            self.head_recv.append(per_head)
            mlp_in = inputs[hook_name(layer, "mlp_in")]
            self.inp[mf.mlp_recv[layer]] = mlp_in[rows, end] if last else mlp_in
            first = g.senders_before(layer)
            result, base_result = (f(hook_name(layer, "result")) for f in (mf.source, mf.base_output))
            mlp_src, mlp_out = (f(hook_name(layer, "mlp_out"))[:, :, 0] for f in (mf.source, mf.base_output))
            for h in range(H):  # views of the cached runs (the last layer at the answer positions)
                src, out = result[:, :, h], base_result[:, :, h]
                self.src[first + h], self.out[first + h] = (src[rows, end], out[rows, end]) if last else (src, out)
            self.src[first + H], self.out[first + H] = (
                (mlp_src[rows, end], mlp_out[rows, end]) if last else (mlp_src, mlp_out)
            )
        self.inp[mf.logit_recv] = inputs[hook_name(L - 1, "resid_post")][rows, end]
        self._head_recv_idx = [torch.tensor(per, device=end.device) for per in self.head_recv]  # [H, 3] per layer
        self._last: tuple | None = None

    @staticmethod
    def hooks(n_layers: int) -> list[str]:
        """The base-run activations :class:`IncrementalForward` starts from."""
        kinds = ("resid_pre", "mlp_in")
        return [hook_name(l, k) for l in range(n_layers) for k in kinds] + [hook_name(n_layers - 1, "resid_post")]

    def _end(self, x: torch.Tensor, end: bool, full_dims: int) -> torch.Tensor:
        """``x`` at the answer positions if ``end`` and ``x`` still has every position."""
        return x[..., self.mf.rows, self.mf.end_pos, :] if end and x.dim() == full_dims else x

    def _inputs(self, recv: list[int], end: bool, run: _Changes) -> torch.Tensor:
        """Candidate inputs ``[n, B, (T,) len(recv), d]`` of receivers ``recv``."""
        n = run.keep.shape[0]
        base = torch.stack([self._end(self.inp[r], end, 3) for r in recv], dim=-2)  # [B, (T,) R', d]
        flat = base.movedim(-2, 0).reshape(len(recv), -1)
        out = flat[None].expand(n, *flat.shape)
        rows = torch.tensor(recv, device=run.keep.device)
        if run.recorded:  # changed upstream outputs reaching these receivers along kept edges
            w, d = run.upstream(rows, end)
            out = torch.baddbmm(out, w.to(d.dtype), d)
        edited = [i for i, r in enumerate(recv) if r in run.changed_set]
        if edited:  # receivers whose incoming edges the candidates patch differently from the reference
            cols = rows[edited]
            touched = (run.dpatch[:, :, cols] != 0).any(0).any(-1).nonzero().flatten().tolist()
            ref = torch.stack([self._end(self.src[s], end, 3) - self._end(self.out[s], end, 3) for s in touched])
            w = run.dpatch[:, touched][:, :, cols]  # [n, k, edited]
            w = w.transpose(1, 2).reshape(n * len(edited), -1).to(ref.dtype)
            change = (w @ ref.reshape(len(touched), -1)).reshape(n, len(edited), -1)
            out = out.contiguous() if out.stride(0) == 0 else out  # the expanded reference inputs
            out.index_add_(1, torch.tensor(edited, device=out.device), change)
        return out.reshape(n, len(recv), *base.movedim(-2, 0).shape[1:]).movedim(1, -2)

    def logits(self, patched: torch.Tensor) -> torch.Tensor:
        """Answer-position logits ``[candidates * batch, vocab]`` for dense patch weights
        ``[candidates, senders, receivers]`` (1 = patched)."""
        mf, g = self.mf, self.mf.graph
        L, H, B = g.n_layers, g.n_heads, mf.B
        n = patched.shape[0]
        run = _Changes(self, patched.to(self.patched.dtype))
        new_in: dict[int, tuple[torch.Tensor, int]] = {}
        new_out: dict[int, torch.Tensor] = {}
        reached = run.changed.clone()
        for layer in range(run.first_stage // 2, L):
            end = layer == L - 1
            if 2 * layer >= run.first_stage:
                heads = reached[self._head_recv_idx[layer]].any(1).nonzero().flatten().tolist()
                if heads:
                    q_r, k_r, v_r = ([self.head_recv[layer][h][i] for h in heads] for i in range(3))
                    m = len(heads)
                    if end:  # queries at the answer positions only
                        q = self._inputs(q_r, True, run)  # [n, B, m, d]
                        kv = self._inputs(k_r + v_r, False, run)  # [n, B, T, 2m, d]
                        k, v = kv[..., :m, :], kv[..., m:, :]
                    else:  # one read of the upstream changes for all three
                        kv = self._inputs(q_r + k_r + v_r, False, run)  # [n, B, T, 3m, d]
                        q, k, v = kv[..., :m, :], kv[..., m : 2 * m, :], kv[..., 2 * m :, :]
                        kv = kv[..., m:, :]
                    for i, r in enumerate(q_r):
                        new_in[r] = (q, i)
                    for i, r in enumerate(k_r + v_r):  # a merged receiver keeps its every-position input
                        new_in[r] = (kv, i)
                    T = kv.shape[2]
                    out = mf.fm.attention(
                        layer,
                        q.reshape(n * B, *q.shape[2:]),
                        k.reshape(n * B, T, -1, mf.d),
                        v.reshape(n * B, T, -1, mf.d),
                        q_pos=mf.end_pos.repeat(n) if end else None,
                        heads=heads,
                    )
                    out = out.reshape(n, B, *out.shape[1:])  # [n, B, (T,) h, d]
                    first = g.senders_before(layer)
                    for i, h in enumerate(heads):
                        new_out[first + h] = out[..., i, :]
                        run.record(first + h, new_out[first + h] - self.out[first + h])
                    run.skip_to(first + H)
                    reached |= run.keep[:, [first + h for h in heads]].amax(dim=(0, 1)) > 0
            r, s = mf.mlp_recv[layer], g.senders_before(layer) + H
            if reached[r]:
                x = self._inputs([r], end, run)
                new_in[r] = (x, 0)
                new_out[s] = mf.fm.mlp(layer, x[..., 0, :])
                run.record(s, new_out[s] - self.out[s])
                reached |= run.keep[:, [s]].amax(dim=(0, 1)) > 0
            run.skip_to(s + 1)
        x = self._inputs([mf.logit_recv], True, run)
        new_in[mf.logit_recv] = (x, 0)
        self._last = (run.patched, new_in, new_out)
        return mf.fm.unembed(x[..., 0, :]).reshape(n * B, -1)

    def adopt(self, j: int) -> None:
        """Make candidate ``j`` of the last :meth:`logits` call the reference."""
        patched, new_in, new_out = self._last
        self.patched = patched[j].clone()
        for r, (x, i) in new_in.items():
            self.inp[r] = x[j, ..., i, :].clone()
        for s, out in new_out.items():
            self.out[s] = out[j].clone()


class _Changes:
    """The state of one :meth:`IncrementalForward.logits` call: the candidates' masks against the
    reference, and the changes ``delta_s`` of the sender outputs computed so far, in one buffer
    slot per sender from the first sender that can change."""

    def __init__(self, inc: IncrementalForward, patched: torch.Tensor):
        mf, g = inc.mf, inc.mf.graph
        self.mf, self.patched = mf, patched
        self.keep, self.dpatch = 1.0 - patched, patched - inc.patched[None]
        self.changed = (self.dpatch != 0).any(0).any(0)  # [receivers]
        self.changed_set = set(self.changed.nonzero().flatten().tolist())
        self.first_stage = min((mf.stage(g.receivers[r]) for r in self.changed_set), default=2 * g.n_layers)
        self.first_sender = mf.senders_at[self.first_stage]
        n, S = patched.shape[0], len(g.senders)
        self.deltas = mf.embed.new_empty(n, max(S - self.first_sender, 0), mf.B, mf.T, mf.d)  # activations' dtype
        self.recorded: list[int] = []  # filled slots, increasing
        self.count = 0  # slots below this are settled: filled, or unchanged senders
        self._zeroed: set[int] = set()

    def record(self, sender: int, delta: torch.Tensor) -> None:
        """Sender ``sender`` changed by ``delta`` (``[n, B, T, d]``, or ``[n, B, d]`` at the answer
        positions in the last layer)."""
        k = sender - self.first_sender
        if delta.dim() == 3:
            self.deltas[:, k, self.mf.rows, self.mf.end_pos] = delta
        else:
            self.deltas[:, k] = delta
        self.recorded.append(k)
        self.count = max(self.count, k + 1)

    def skip_to(self, sender: int) -> None:
        """Senders below ``sender`` are settled (the ones not recorded did not change)."""
        self.count = max(self.count, sender - self.first_sender)

    def upstream(self, rows: torch.Tensor, end: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep weights ``[n, R', m]`` of receivers ``rows`` and the changes ``[n, m, X]`` of the
        settled senders: gathered when few changed (ACDC late on), read in place when most did
        (the slots of unchanged senders zeroed first)."""
        if 2 * len(self.recorded) < self.count:
            slots = torch.tensor(self.recorded, device=rows.device)
            d = self.deltas[:, slots]
        else:
            for k in set(range(self.count)) - set(self.recorded) - self._zeroed:
                self.deltas[:, k].zero_()
                self._zeroed.add(k)
            slots = torch.arange(self.count, device=rows.device)
            d = self.deltas[:, : self.count]
        d = d[:, :, self.mf.rows, self.mf.end_pos] if end else d
        w = self.keep[:, self.first_sender + slots][:, :, rows].transpose(1, 2)
        return w, d.reshape(d.shape[0], d.shape[1], -1)
