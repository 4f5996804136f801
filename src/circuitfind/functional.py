"""A hook-free forward pass, split at the edge graph's nodes, for the inner loops of edge patching.

``TransformerBridge`` runs the Hugging Face modules with hook points everywhere and always computes
the whole model. ACDC evaluates hundreds of candidates that each change one receiver's input; for
them the per-call machinery and the recomputation of everything below that receiver dominate.
:class:`FunctionalModel` reads a supported model's weights from the bridge once (the same tensors
and norm modules the bridge runs) and exposes its components as tensor functions: per-head
attention from separate q/k/v residual inputs (queries optionally at one position per prompt),
the MLP and the unembedding. :class:`MaskedForward` runs the edge-masked forward pass on them,
starting at any stage with everything below computed once and shared by all candidates, and, since
metrics read only the answer position, computing the last layer's queries, MLP and logits there only.

Supported: GPT-2 style (LayerNorm, learned positions, GELU MLP) and Llama style (RMSNorm, rotary
positions, grouped-query attention, gated MLP) models, which covers the shipped models and SmolLM2.
Other architectures use the hook-based engine. Tests pin both engines to each other.
:mod:`circuitfind.incremental` builds ACDC's incremental passes on the same components.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from circuitfind.errors import CircuitfindError
from circuitfind.graph import ModelGraph
from circuitfind.patching import hook_name

SUPPORTED = ("gpt2", "llama")


class UnsupportedModelError(CircuitfindError, NotImplementedError):
    """The functional forward pass does not implement this architecture."""


def supports(model) -> bool:
    """Whether :class:`FunctionalModel` implements ``model``'s architecture (and the bridge exposes
    the modules it reads: the per-head input norm, the MLP norm and the final norm)."""
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED or not getattr(model.cfg, "use_split_qkv_input", False):
        return False
    block = model.blocks[0]
    return all(x is not None for x in (getattr(block.attn, "_ln1_module", None), getattr(block.ln2, "original_component", None),
                                        getattr(model.ln_final, "original_component", None)))


def _tensor(obj, name: str) -> torch.Tensor | None:
    value = getattr(obj, name, None)
    return None if value is None else value.detach()


@dataclass
class _Layer:
    norm1: torch.nn.Module
    W_Q: torch.Tensor  # [H, d_model, d_head]
    W_K: torch.Tensor  # [KV, d_model, d_head]
    W_V: torch.Tensor
    W_O: torch.Tensor  # [H, d_head, d_model]
    b_Q: torch.Tensor | None
    b_K: torch.Tensor | None
    b_V: torch.Tensor | None
    b_O: torch.Tensor | None
    norm2: torch.nn.Module
    W_in: torch.Tensor
    b_in: torch.Tensor | None
    W_gate: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    scale: float


class FunctionalModel:
    """The components of a GPT-2 or Llama-style bridge model as plain tensor functions."""

    def __init__(self, model):
        if not supports(model):
            arch = getattr(getattr(getattr(model, "original_model", None), "config", None), "model_type", "?")
            raise UnsupportedModelError(f"no functional forward pass for architecture {arch!r} (supported: {', '.join(SUPPORTED)})")
        hf = model.original_model.config
        cfg = model.cfg
        self.n_heads = cfg.n_heads
        self.n_kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        act = getattr(hf, "activation_function", None) or hf.hidden_act
        # GPT-2's gelu_new is the tanh approximation; torch's fused kernel computes the same formula
        self.act = partial(F.gelu, approximate="tanh") if act in ("gelu_new", "gelu_pytorch_tanh") else ACT2FN[act]
        by_layer = getattr(hf, "scale_attn_by_inverse_layer_idx", False)
        self.layers = []
        for layer, block in enumerate(model.blocks):
            a, m = block.attn, block.mlp
            norm1 = a._ln1_module
            if norm1 is None:
                raise UnsupportedModelError("the bridge does not expose the attention's input norm")
            d_head = a.W_Q.shape[-1]
            self.layers.append(_Layer(
                norm1, _tensor(a, "W_Q"), _tensor(a, "W_K"), _tensor(a, "W_V"), _tensor(a, "W_O"),
                _tensor(a, "b_Q"), _tensor(a, "b_K"), _tensor(a, "b_V"), _tensor(a, "b_O"),
                block.ln2.original_component, _tensor(m, "W_in"), _tensor(m, "b_in"), _tensor(m, "W_gate"),
                _tensor(m, "W_out"), _tensor(m, "b_out"), d_head**-0.5 / ((layer + 1) if by_layer else 1),
            ))
        self.final_norm = model.ln_final.original_component
        self.W_U, self.b_U = _tensor(model, "W_U"), _tensor(model, "b_U")
        rotary = [mod for name, mod in model.original_model.named_modules() if name.endswith("rotary_emb")]
        self.rotary = rotary[0].original_component if rotary else None
        self._rope_cache: dict = {}

    # -- components -----------------------------------------------------------------------
    def _rope(self, n_pos: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_pos, like.device, like.dtype)
        if key not in self._rope_cache:
            pos = torch.arange(n_pos, device=like.device)[None]
            cos, sin = self.rotary(like, pos)
            self._rope_cache[key] = (cos[0], sin[0])  # [pos, d_head]
        return self._rope_cache[key]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _project(self, norm, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Per-head norm then projection: ``[..., heads, d_model] -> [..., heads, d_head]``."""
        out = torch.einsum("...hd,hde->...he", norm(x), W)
        return out if b is None else out + b

    def attention(self, layer: int, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
                  q_pos: torch.Tensor | None = None, heads: list[int] | None = None) -> torch.Tensor:
        """Per-head outputs (``hook_result``) from the residual inputs of the heads' q, k and v.

        ``k_in``/``v_in`` are ``[N, pos, KV, d_model]``. ``q_in`` is ``[N, pos, H, d_model]``, or, with
        ``q_pos`` (``[N]``, one query position per row), ``[N, H, d_model]`` at those positions;
        the result is then ``[N, H, d_model]`` instead of ``[N, pos, H, d_model]``. With ``heads``
        (query head indices), only those heads run and ``k_in``/``v_in`` hold one entry per query
        head (its key/value head's input).
        """
        w = self.layers[layer]
        group = self.n_heads // self.n_kv_heads
        W_Q, W_K, W_V, W_O, b_Q, b_K, b_V = w.W_Q, w.W_K, w.W_V, w.W_O, w.b_Q, w.b_K, w.b_V
        if heads is not None:
            kv = [h // group for h in heads]
            W_Q, W_O, W_K, W_V = W_Q[heads], W_O[heads], W_K[kv], W_V[kv]
            b_Q, b_K, b_V = (None if b is None else b[i] for b, i in ((b_Q, heads), (b_K, kv), (b_V, kv)))
            group = 1
        q = self._project(w.norm1, q_in, W_Q, b_Q)
        k = self._project(w.norm1, k_in, W_K, b_K)
        v = self._project(w.norm1, v_in, W_V, b_V)
        z = self._attend(layer, q, k, v, q_pos, group)  # [N, H, Tq, e]
        out = torch.einsum("nhte,hed->nthd", z, W_O)
        return out[:, 0] if q_pos is not None else out

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                group: int) -> torch.Tensor:
        """Causal attention of projected queries ``[N, T, H, e]`` (``[N, H, e]`` at ``q_pos``) over
        keys and values ``[N, T, KV, e]`` (rotary positions applied here): ``z`` as ``[N, H, Tq, e]``."""
        T = k.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [N, KV, pos, e]
        q = q.unsqueeze(1) if q_pos is not None else q  # [N, Tq, H, e]
        q = q.transpose(1, 2)  # [N, H, Tq, e]
        if self.rotary is not None:
            cos, sin = self._rope(T, k)
            k = self._rotate(k, cos, sin)
            q = self._rotate(q, cos, sin) if q_pos is None else self._rotate(q, cos[q_pos][:, None, None], sin[q_pos][:, None, None])
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.layers[layer].scale  # [N, H, Tq, T]
        keys = torch.arange(T, device=k.device)
        queries = keys[:, None] if q_pos is None else q_pos[:, None, None, None]
        scores = scores.masked_fill(keys > queries, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # [N, H, Tq, e]; float32 softmax

    # -- the plain residual stream (node patching) ----------------------------------------
    def qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[N, T, H, e]``, keys and values ``[N, T, KV, e]`` from one residual stream
        ``[N, T, d_model]`` (every head reads the same input: no per-head copies)."""
        w = self.layers[layer]
        h = w.norm1(x)
        out = []
        for W, b in ((w.W_Q, w.b_Q), (w.W_K, w.b_K), (w.W_V, w.b_V)):
            y = torch.einsum("ntd,hde->nthe", h, W)
            out.append(y if b is None else y + b)
        return out[0], out[1], out[2]

    def z(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head attention values (``hook_z``, ``[N, T, H, e]``) from :meth:`qkv`'s projections."""
        return self._attend(layer, q, k, v, None, self.n_heads // self.n_kv_heads).transpose(1, 2)

    def attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The attention block's output (``hook_attn_out``, ``[N, T, d_model]``) from ``z``."""
        w = self.layers[layer]
        out = torch.einsum("nthe,hed->ntd", z, w.W_O)
        return out if w.b_O is None else out + w.b_O

    def attn_bias(self, layer: int) -> torch.Tensor | float:
        b = self.layers[layer].b_O
        return 0.0 if b is None else b

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP output (``hook_mlp_out``) from its residual input (``hook_mlp_in``)."""
        w = self.layers[layer]
        x = w.norm2(x)
        pre = x @ w.W_in
        pre = pre if w.b_in is None else pre + w.b_in
        hidden = self.act(x @ w.W_gate) * pre if w.W_gate is not None else self.act(pre)
        out = hidden @ w.W_out
        return out if w.b_out is None else out + w.b_out

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream (``[..., d_model] -> [..., vocab]``)."""
        out = self.final_norm(x) @ self.W_U
        return out if self.b_U is None else out + self.b_U


class MaskedForward:
    """The edge-masked forward pass on a :class:`FunctionalModel` (see :mod:`circuitfind.edges`).

    The run is split into stages: layer ``l``'s attention is stage ``2l``, its MLP ``2l + 1``, the
    logits stage ``2L``. :meth:`logits` runs the stages from ``start`` per candidate; the state
    below ``start`` (the residual stream and the sender differences) is computed once, for the
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

    def __init__(self, fm: FunctionalModel, graph: ModelGraph, base: dict[str, torch.Tensor],
                 sources: dict[str, torch.Tensor], end_pos: torch.Tensor, sender_hooks: list[str]):
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
                self.qkv.append(tuple(graph.receiver_slices(layer, k) for k in ("q", "k", "v")))
            else:
                idx = graph.receiver_slices(layer, "qkv")
                self.qkv.append((idx, idx, idx))
        self.mlp_recv = [graph.receiver_slices(layer, "mlp")[0] for layer in range(L)]
        self.logit_recv = len(graph.receivers) - 1
        stage_of = [self.stage(r) for r in graph.receivers]
        self.receivers_before = [sum(s < k for s in stage_of) for k in range(2 * L + 1)]  # receivers are stage-ordered
        self.senders_at = [graph.senders_before(k // 2) + (H if k % 2 else 0) for k in range(2 * L + 1)]
        self._prefix_cache: dict = {}

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
    def logits(self, patched: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Answer-position logits ``[candidates * batch, vocab]`` for dense patch weights
        ``patched = 1 - keep`` ``[candidates, senders, receivers]``, running stages ``start`` on."""
        n = patched.shape[0]
        if start:
            R = self.receivers_before[start]
            if n > 1 and not torch.equal(patched[1:, :, :R], patched[:1, :, :R].expand(n - 1, -1, -1)):
                raise ValueError("candidates must agree on every edge into receivers below the start stage")
            resid, shared = self._prefix(patched[0], start)
        else:
            resid, shared = self.embed, self.input_diff
        run = _Run(self, patched, shared, resid, start)
        return run.finish()

    def _prefix(self, patched_row: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream and sender differences of one mask set below stage ``start`` (cached)."""
        R = self.receivers_before[start]
        below = patched_row[:, :R]
        key = (start, below.cpu().numpy().tobytes())
        if key not in self._prefix_cache:
            run = _Run(self, patched_row[None], self.input_diff, self.embed, 0, stop=start)
            resid = run.finish()[0]
            shared = torch.cat([self.input_diff, run.diffs[0, :, : self.senders_at[start] - 1]], dim=1)
            if len(self._prefix_cache) > 16:
                self._prefix_cache.clear()
            self._prefix_cache[key] = (resid, shared)
        return self._prefix_cache[key]


class _Run:
    """One pass of :meth:`MaskedForward.logits` over ``n`` candidates (state kept for a prefix)."""

    def __init__(self, mf: MaskedForward, patched: torch.Tensor, shared: torch.Tensor, resid: torch.Tensor,
                 start: int, stop: int | None = None):
        self.mf, self.patched = mf, patched.to(resid.dtype)
        n, S = patched.shape[0], patched.shape[1]
        self.n, self.S0 = n, shared.shape[1]
        self.shared = shared  # [B * T, S0, d], common to all candidates
        self.diffs = resid.new_empty(n, mf.B * mf.T, S - self.S0, mf.d)  # senders from the start on
        self.count = self.S0
        self.resid = resid.expand(n, *resid.shape).clone() if resid.dim() == 3 else resid.clone()
        self.start, self.stop = start, 2 * mf.graph.n_layers if stop is None else stop
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
        if lo < self.S0:  # senders below the start: one difference tensor shared by all candidates
            s0 = min(up, self.S0)
            shared = self.shared[mf.end_tokens, lo:s0] if end else self.shared[:, lo:s0]  # [M, s, d]
            ws = self.patched[:, lo:s0, rows].transpose(1, 2)  # [n, R, s]
            if n == 1 or torch.equal(ws, ws[:1].expand_as(ws)):
                corr = torch.matmul(ws[0], shared).expand(n, -1, -1, -1)  # [n, M, R, d]
            else:
                corr = torch.matmul(ws.reshape(n * R, -1), shared).view(-1, n, R, mf.d).transpose(0, 1)
        first = max(lo, self.S0)
        if up > first:  # senders this pass computed, per candidate
            new = self.diffs[:, mf.end_tokens, first - self.S0 : up - self.S0] if end else self.diffs[:, :, first - self.S0 : up - self.S0]
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
        for k in range(self.start, self.stop):
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
            self._store_end((src[mf.end_tokens] - out[:, :, None]))
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
