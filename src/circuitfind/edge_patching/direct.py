"""The hook-free edge-patching engine (``engine="functional"``): the masked pass on a
:class:`circuitfind.models.tensor_forward.TensorModel`.

:class:`DirectEngine` is what :class:`~circuitfind.edge_patching.EdgePatcher` calls; it keeps one
:class:`MaskedForward` per prompt range. :class:`MaskedForward` runs the edge-masked forward pass
stage by stage (layer ``l``'s attention is stage ``2l``, its MLP ``2l + 1``, the logits ``2L``),
starting at any stage with everything below it computed once and shared by all candidates
(:class:`~circuitfind.edge_patching.prefix.PrefixCache`) and, since metrics read only the answer
position, computing the last layer's queries, MLP and logits there only. :class:`_Run` is one pass.
"""

from __future__ import annotations

import torch

from circuitfind.circuits.graph import ModelGraph
from circuitfind.edge_patching.engine import Patcher
from circuitfind.edge_patching.prefix import PrefixCache
from circuitfind.models.tensor_forward import TensorModel
from circuitfind.names import hook_name


class DirectEngine:
    """The ``functional`` engine of an :class:`EdgePatcher`: plain (no-gradient) evaluations of
    position-free graphs on GPT-2 and Llama-style models (see :class:`circuitfind.edge_patching.Engine`)."""

    name = "functional"

    def __init__(self, patcher: Patcher):
        self.patcher = patcher
        self._model: TensorModel | None = None
        self._masked: dict[tuple[int, int], MaskedForward] = {}  # by prompt range

    def masked_forward(self, prompts: slice | None = None) -> MaskedForward:
        """The masked pass on the setup's prompts ``prompts`` (default: all), built on first use and kept."""
        p = self.patcher
        prompts = prompts or slice(0, p.setup.size)
        key = (prompts.start, prompts.stop)
        if key not in self._masked:
            if self._model is None:
                self._model = TensorModel(p.model)
            base = {name: t[prompts] for name, t in p.base_outputs().items()}
            sources = {name: t[prompts] for name, t in p.sources.items()}
            self._masked[key] = MaskedForward(
                self._model, p.graph, base, sources, p.setup.plan.end_pos[prompts], p.sender_hooks
            )
        return self._masked[key]

    def logits(self, keep: torch.Tensor, prompts: slice, first_receiver: int = 0) -> torch.Tensor:
        """Answer-position logits ``[candidates * prompts, vocab]`` of float keep-masks
        ``[candidates, n_edges]``, the pass starting at the stage where ``first_receiver`` reads."""
        graph = self.patcher.graph
        first_stage = MaskedForward.stage(graph.receivers[first_receiver]) if first_receiver else 0
        with torch.no_grad():
            return self.masked_forward(prompts).logits(1.0 - graph.dense(keep), first_stage)


class MaskedForward:
    """The edge-masked forward pass on a :class:`TensorModel` (see :mod:`circuitfind.edge_patching`).

    The run is split into stages: layer ``l``'s attention is stage ``2l``, its MLP ``2l + 1``, the
    logits stage ``2L``. :meth:`logits` runs the stages from ``first_stage`` per candidate; the state
    below it (the residual stream and the sender differences) is computed once, for the
    first candidate, and cached, so candidates must agree on every edge into receivers below it.

    Args:
        fm: the model's components.
        graph: the edge graph (no per-position edges).
        base: sender outputs of the unpatched base run (``blocks.0.hook_resid_pre``, every
            ``attn.hook_result`` and ``hook_mlp_out``).
        sources: the same hooks in the run whose values patched edges carry.
        end_pos: ``[batch]`` answer positions; only they reach the metric.
        sender_hooks: the senders' hooks in graph order (the input's first).
    """

    def __init__(
        self,
        fm: TensorModel,
        graph: ModelGraph,
        base: dict[str, torch.Tensor],
        sources: dict[str, torch.Tensor],
        end_pos: torch.Tensor,
        sender_hooks: list[str],
    ):
        if graph.n_pos is not None:
            raise ValueError("the functional engine needs a graph without per-position edges")
        self.fm, self.graph = fm, graph
        L, H = graph.n_layers, graph.n_heads
        self.embed = base[sender_hooks[0]]
        self.B, self.T, self.d = self.embed.shape
        self.end_pos = end_pos
        self.rows = torch.arange(self.B, device=end_pos.device)
        self.end_tokens = self.rows * self.T + end_pos  # answer positions in the flattened [B * T] axis
        BT = self.B * self.T
        # sender differences are token-major, [B * T, senders, d]: a receiver's correction is then a
        # small matmul per token (weights [R, senders] x differences [senders, d]), which runs
        # faster than one skinny matmul over [senders, B * T * d], and lands in the layout q/k/v need.
        # Every pass starts with the input's (the others are computed by the pass).
        self.input_diff = (sources[sender_hooks[0]] - self.embed).reshape(BT, 1, self.d)  # [B * T, 1, d]
        self.input_source = sources[sender_hooks[0]]
        self.sources = {name: sources[name].reshape(BT, -1, self.d) for name in sender_hooks[1:]}  # [B * T, g, d]
        self.base = {name: base[name].reshape(BT, -1, self.d) for name in sender_hooks[1:]}
        # receiver indices per layer: q, k, v inputs (merged: one per head, read as q, k and v)
        self.qkv: list[tuple[list[int], list[int], list[int]]] = []
        for layer in range(L):
            if graph.split_qkv:
                q, k, v = (graph.receiver_slices(layer, which) for which in ("q", "k", "v"))
                self.qkv.append((q, k, v))
            else:
                idx = graph.receiver_slices(layer, "qkv")
                self.qkv.append((idx, idx, idx))
        self.mlp_recv = [graph.receiver_slices(layer, "mlp")[0] for layer in range(L)]
        self.logit_recv = len(graph.receivers) - 1
        stage_of = [self.stage(r) for r in graph.receivers]
        self.receivers_before = [sum(s < k for s in stage_of) for k in range(2 * L + 1)]  # receivers are stage-ordered
        self.senders_at = [graph.senders_before(k // 2) + (H if k % 2 else 0) for k in range(2 * L + 1)]
        self._prefixes: PrefixCache[tuple[torch.Tensor, torch.Tensor]] = PrefixCache()

    def source(self, sender_hook: str) -> torch.Tensor:
        """A sender hook's source activations, ``[B, T, g, d]`` (``g`` heads, or 1)."""
        return self.sources[sender_hook].reshape(self.B, self.T, -1, self.d)

    def base_output(self, sender_hook: str) -> torch.Tensor:
        """A sender hook's activations in the unpatched base run, ``[B, T, g, d]``."""
        return self.base[sender_hook].reshape(self.B, self.T, -1, self.d)

    @staticmethod
    def stage(receiver) -> int:
        """The stage at which ``receiver`` reads (attention ``2l``, MLP ``2l + 1``, logits ``2L``)."""
        return 2 * receiver.layer + (1 if receiver.kind == "mlp" else 0)

    # -- the pass -------------------------------------------------------------------------
    def logits(self, patched: torch.Tensor, first_stage: int = 0) -> torch.Tensor:
        """Answer-position logits ``[candidates * batch, vocab]`` for dense patch weights
        ``patched = 1 - keep`` ``[candidates, senders, receivers]``, running stages ``first_stage`` on."""
        n = patched.shape[0]
        if first_stage:
            R = self.receivers_before[first_stage]
            if n > 1 and not torch.equal(patched[1:, :, :R], patched[:1, :, :R].expand(n - 1, -1, -1)):
                raise ValueError("candidates must agree on every edge into receivers below the start stage")
            resid, shared = self._prefix(patched[0], first_stage)
        else:
            resid, shared = self.embed, self.input_diff
        run = _Run(self, patched, shared, resid, first_stage)
        return run.finish()

    def _prefix(self, patched_row: torch.Tensor, first_stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream and sender differences of one mask set below stage ``first_stage`` (cached)."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            run = _Run(self, patched_row[None], self.input_diff, self.embed, 0, stop=first_stage)
            resid = run.finish()[0]
            shared = torch.cat([self.input_diff, run.diffs[0, :, : self.senders_at[first_stage] - 1]], dim=1)
            return resid, shared

        return self._prefixes.get(first_stage, patched_row[:, : self.receivers_before[first_stage]], compute)


class _Run:
    """One pass of :meth:`MaskedForward.logits` over ``n`` candidates (state kept for a prefix)."""

    def __init__(
        self,
        mf: MaskedForward,
        patched: torch.Tensor,
        shared: torch.Tensor,
        resid: torch.Tensor,
        first_stage: int,
        stop: int | None = None,
    ):
        self.mf, self.patched = mf, patched.to(resid.dtype)
        n, S = patched.shape[0], patched.shape[1]
        self.n, self.S0 = n, shared.shape[1]
        self.shared = shared  # [B * T, S0, d], common to all candidates
        self.diffs = resid.new_empty(n, mf.B * mf.T, S - self.S0, mf.d)  # senders from the first stage on
        self.count = self.S0
        self.resid = resid.expand(n, *resid.shape).clone() if resid.dim() == 3 else resid.clone()
        self.first_stage, self.stop = first_stage, 2 * mf.graph.n_layers if stop is None else stop
        self.prefix_only = stop is not None  # keep every position; return the state, not logits
        self._mlp_below: tuple[int, torch.Tensor] | None = None  # an MLP's correction from below its layer

    # corrections: sum over upstream senders of patched weight x difference
    def _correct(self, recv: list[int], up: int, end: bool = False, lo: int = 0) -> torch.Tensor:
        """``[n, B, T (or end), R, d]`` corrections of receivers ``recv`` from senders ``lo..up-1``.

        Per token, patch weights ``[R, senders]`` times differences ``[senders, d]``; the
        differences are the bulk of the data, so callers ask for all receivers that read the same
        senders at once."""
        mf, n, R = self.mf, self.n, len(recv)
        rows = torch.tensor(recv, device=self.patched.device)
        corr = None
        if lo < self.S0:  # senders below the first stage: one difference tensor shared by all candidates
            s0 = min(up, self.S0)
            shared = self.shared[mf.end_tokens, lo:s0] if end else self.shared[:, lo:s0]  # [M, s, d]
            ws = self.patched[:, lo:s0, rows].transpose(1, 2)  # [n, R, s]
            if n == 1 or torch.equal(ws, ws[:1].expand_as(ws)):
                corr = torch.matmul(ws[0], shared).expand(n, -1, -1, -1)  # [n, M, R, d]
            else:
                corr = torch.matmul(ws.reshape(n * R, -1), shared).view(-1, n, R, mf.d).transpose(0, 1)
        first = max(lo, self.S0)
        if up > first:  # senders this pass computed, per candidate
            new = (
                self.diffs[:, mf.end_tokens, first - self.S0 : up - self.S0]
                if end
                else self.diffs[:, :, first - self.S0 : up - self.S0]
            )
            new = torch.matmul(self.patched[:, first:up, rows].transpose(1, 2)[:, None], new)  # [n, M, R, d]
            corr = new if corr is None else corr + new
        return corr.reshape(n, mf.B, R, mf.d) if end else corr.reshape(n, mf.B, mf.T, R, mf.d)

    def _store_end(self, diff: torch.Tensor) -> None:
        """Differences ``[n, B, g, d]`` known at the answer positions only (the last layer)."""
        k, g = self.count - self.S0, diff.shape[2]
        self.diffs[:, self.mf.end_tokens, k : k + g] = diff
        self.count += g

    def _end_resid(self) -> torch.Tensor:
        """The residual stream at the answer positions, ``[n, B, d]``."""
        return self.resid if self.resid.dim() == 3 else self.resid[:, self.mf.rows, self.mf.end_pos]

    def finish(self) -> torch.Tensor:
        mf = self.mf
        L = mf.graph.n_layers
        n, B = self.n, mf.B
        end_layer = L if self.prefix_only else L - 1  # the last layer runs at the answer positions only
        for k in range(self.first_stage, self.stop):
            layer, mlp = k // 2, k % 2
            end = layer == end_layer
            if not mlp:
                self._attention(layer, end)
            else:
                self._mlp(layer, end)
        if self.prefix_only:
            return self.resid
        x = self._end_resid() + self._correct([mf.logit_recv], mf.senders_at[2 * L], end=True)[..., 0, :]
        return mf.fm.unembed(x).reshape(n * B, -1)

    def _attention(self, layer: int, end: bool) -> None:
        mf = self.mf
        n, B, T, d = self.n, mf.B, mf.T, mf.d
        q_idx, k_idx, v_idx = mf.qkv[layer]
        up = mf.senders_at[2 * layer]
        split = mf.graph.split_qkv
        kv_idx = k_idx + v_idx if split else q_idx  # a merged receiver is its head's q, k and v input
        if end:  # keys and values at every position; queries (below) at the answer positions only
            corr = self._correct(kv_idx, up)
            ck = corr[..., : len(k_idx), :]
            cv = corr[..., len(k_idx) :, :] if split else ck
        else:  # one pass over the upstream differences: q, k, v and the MLP's share from below this layer
            corr = self._correct((q_idx + kv_idx if split else q_idx) + [mf.mlp_recv[layer]], up)
            cq = corr[..., : len(q_idx), :]
            ck = corr[..., len(q_idx) : len(q_idx) + len(k_idx), :] if split else cq
            cv = corr[..., len(q_idx) + len(k_idx) : -1, :] if split else cq
        k_in = (self.resid[:, :, :, None] + ck).reshape(n * B, T, -1, d)
        v_in = (self.resid[:, :, :, None] + cv).reshape(n * B, T, -1, d)
        if end:
            resid_end = self._end_resid()
            q_in = (resid_end[:, :, None] + self._correct(q_idx, up, end=True)).reshape(n * B, -1, d)
            out = mf.fm.attention(layer, q_in, k_in, v_in, q_pos=mf.end_pos.repeat(n)).reshape(n, B, -1, d)
            src = mf.sources[hook_name(layer, "result")][mf.end_tokens]  # [B, H, d]
            self._store_end(src - out)
            self.resid = resid_end + out.sum(2) + mf.fm.attn_bias(layer)
            return
        q_in = (self.resid[:, :, :, None] + cq).reshape(n * B, T, -1, d)
        self._mlp_below = (layer, corr[..., -1, :])
        out = mf.fm.attention(layer, q_in, k_in, v_in)  # [n * B, T, H, d]
        H = out.shape[2]
        k = self.count - self.S0
        # source - output, written straight into the candidates' difference buffer
        torch.sub(mf.sources[hook_name(layer, "result")], out.view(n, B * T, H, d), out=self.diffs[:, :, k : k + H])
        self.count += H
        self.resid = self.resid + out.sum(2).view(n, B, T, d) + mf.fm.attn_bias(layer)

    def _mlp(self, layer: int, end: bool) -> None:
        mf = self.mf
        up, r = mf.senders_at[2 * layer + 1], mf.mlp_recv[layer]
        src = mf.sources[hook_name(layer, "mlp_out")]
        if end:
            self.resid = self._end_resid()
            x = self.resid + self._correct([r], up, end=True)[..., 0, :]
            out = mf.fm.mlp(layer, x)  # [n, B, d]
            self._store_end(src[mf.end_tokens] - out[:, :, None])
        else:
            below = self._mlp_below
            if below is not None and below[0] == layer:  # only this layer's heads are left to add
                corr = below[1] + self._correct([r], up, lo=mf.senders_at[2 * layer])[..., 0, :]
            else:
                corr = self._correct([r], up)[..., 0, :]
            out = mf.fm.mlp(layer, self.resid + corr)
            k = self.count - self.S0
            torch.sub(src[:, 0], out.view(self.n, -1, mf.d), out=self.diffs[:, :, k])
            self.count += 1
        self.resid = self.resid + out
