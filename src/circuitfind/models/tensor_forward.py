"""A supported model's components as plain tensor functions: the hook-free forward pass.

``TransformerBridge`` runs the Hugging Face modules with hook points everywhere and always computes
the whole model. The inner loops of patching (ACDC's hundreds of candidates that each change one
receiver's input, node patching's sweeps) are dominated by that per-call machinery and by the
recomputation of everything below the patched point. :class:`TensorModel` reads a supported model's
weights from the bridge once (the same tensors and norm modules the bridge runs) and exposes its
components as tensor functions: per-head attention from separate q/k/v residual inputs (queries
optionally at one position per prompt), the MLP and the unembedding.

Supported: GPT-2 style (LayerNorm, learned positions, GELU MLP) and Llama style (RMSNorm, rotary
positions, grouped-query attention, gated MLP) models, which covers the shipped models and SmolLM2.
Other architectures use the bridge's hooks. Users: the edge-patching engine ``functional``
(:mod:`circuitfind.edge_patching.direct`) and the suffix passes of node and path patching
(:mod:`circuitfind.patching.suffix`); tests pin both to the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from circuitfind.errors import CircuitfindError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

SUPPORTED = ("gpt2", "llama")


class UnsupportedModelError(CircuitfindError, NotImplementedError):
    """The functional forward pass does not implement this architecture."""


def supports(model: TransformerBridge) -> bool:
    """Whether :class:`TensorModel` implements ``model``'s architecture (and the bridge exposes
    the modules it reads: the per-head input norm, the MLP norm and the final norm)."""
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED or not getattr(model.cfg, "use_split_qkv_input", False):
        return False
    block = model.blocks[0]
    return all(
        x is not None
        for x in (
            getattr(block.attn, "_ln1_module", None),
            getattr(block.ln2, "original_component", None),
            getattr(model.ln_final, "original_component", None),
        )
    )


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


class TensorModel:
    """The components of a GPT-2 or Llama-style bridge model as plain tensor functions."""

    def __init__(self, model: TransformerBridge):
        if not supports(model):
            arch = getattr(getattr(getattr(model, "original_model", None), "config", None), "model_type", "?")
            raise UnsupportedModelError(
                f"no functional forward pass for architecture {arch!r} (supported: {', '.join(SUPPORTED)})"
            )
        hf: Any = model.original_model.config  # a transformers config: its fields differ by architecture
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
            self.layers.append(
                _Layer(
                    norm1,
                    _tensor(a, "W_Q"),
                    _tensor(a, "W_K"),
                    _tensor(a, "W_V"),
                    _tensor(a, "W_O"),
                    _tensor(a, "b_Q"),
                    _tensor(a, "b_K"),
                    _tensor(a, "b_V"),
                    _tensor(a, "b_O"),
                    block.ln2.original_component,
                    _tensor(m, "W_in"),
                    _tensor(m, "b_in"),
                    _tensor(m, "W_gate"),
                    _tensor(m, "W_out"),
                    _tensor(m, "b_out"),
                    d_head**-0.5 / ((layer + 1) if by_layer else 1),
                )
            )
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

    def attention(
        self,
        layer: int,
        q_in: torch.Tensor,
        k_in: torch.Tensor,
        v_in: torch.Tensor,
        q_pos: torch.Tensor | None = None,
        heads: list[int] | None = None,
    ) -> torch.Tensor:
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

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None, group: int
    ) -> torch.Tensor:
        """Causal attention of projected queries ``[N, T, H, e]`` (``[N, H, e]`` at ``q_pos``) over
        keys and values ``[N, T, KV, e]`` (rotary positions applied here): ``z`` as ``[N, H, Tq, e]``."""
        T = k.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [N, KV, pos, e]
        q = q.unsqueeze(1) if q_pos is not None else q  # [N, Tq, H, e]
        q = q.transpose(1, 2)  # [N, H, Tq, e]
        if self.rotary is not None:
            cos, sin = self._rope(T, k)
            k = self._rotate(k, cos, sin)
            q = (
                self._rotate(q, cos, sin)
                if q_pos is None
                else self._rotate(q, cos[q_pos][:, None, None], sin[q_pos][:, None, None])
            )
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

    def pattern(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (``hook_pattern``, ``[N, H, T, T]``, float32) from :meth:`qkv`'s
        queries and keys: rotary positions, grouped keys, the causal mask and the softmax of
        :meth:`attention`, without the values (AtP*'s QK fix recomputes only this)."""
        T = k.shape[1]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [N, H, T, e], [N, KV, T, e]
        if self.rotary is not None:
            cos, sin = self._rope(T, k)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if self.n_heads > self.n_kv_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.layers[layer].scale
        keys = torch.arange(T, device=k.device)
        return torch.softmax(scores.float().masked_fill(keys > keys[:, None], float("-inf")), dim=-1)

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
