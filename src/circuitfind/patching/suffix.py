"""Node and path patching that recompute only what a patch can change.

A candidate that first patches layer ``l`` at one of the points ``resid_pre``, ``z``, ``attn_out``,
``mlp_out`` or ``resid_post`` (in forward order) leaves everything before that point as it was in
the unpatched base run. :class:`SuffixForward` starts each candidate there, from the base run's
cached activations, and runs only the rest of the model, on the components of
:class:`circuitfind.models.tensor_forward.TensorModel` (GPT-2 and Llama-style models); candidates are
sorted by their starting point and stacked along the batch, each joining the pass at its own
layer (one batched operation per layer and pass, whatever the mix of starting points), and the
logits are computed at the answer positions only. Over a sweep of every layer that is about half
a forward pass per candidate.

``TransformerBridge.forward(start_at_layer=k)`` swaps in the residual stream at block ``k`` but
still runs the blocks below it (their output is discarded), so it saves no work; hence the
functional components. Architectures they do not implement, hooks they do not know, and base runs
with hooks after the embedding stage go through full forward passes of the bridge
(:func:`circuitfind.patching.run_patched`); tests pin both to each other.

Corruption hooks on the embedding stage (Gaussian noise, mean ablation of the embeddings) are
already in the cached residual stream entering layer 0, so every candidate sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from circuitfind.models import tensor_forward
from circuitfind.models.tensor_forward import UnsupportedModelError
from circuitfind.names import EMBEDDING_STAGE, hook_name, parse_hook
from circuitfind.patching.setup import Direction, PatchingSetup, patch_hook, repeat_ctx

POINTS = ("resid_pre", "z", "attn_out", "mlp_out", "resid_post")  # patch points of a layer, in forward order
RESID_PRE, Z, ATTN_OUT, MLP_OUT, RESID_POST = range(len(POINTS))

Patch = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, point, activation) -> patched activation


def patch_point(name: str) -> tuple[int, int] | None:
    """``(layer, index in POINTS)`` of a hook the suffix passes patch, ``None`` for any other hook."""
    hook = parse_hook(name)
    return None if hook is None or hook[1] not in POINTS else (hook[0], POINTS.index(hook[1]))


def receiver_input(name: str) -> tuple[int, str] | None:
    """``(layer, "q" | "k" | "v")`` of a head-input hook (a path-patching receiver), else ``None``."""
    hook = parse_hook(name)
    return None if hook is None or hook[1] not in ("q_input", "k_input", "v_input") else (hook[0], hook[1][0])


def supports(
    setup: PatchingSetup, direction: Direction, names: Sequence[str] = (), receivers: Sequence[str] = ()
) -> bool:
    """Whether suffix passes serve these patched hooks (``names``) or path-patching receiver hooks:
    the setup allows it, the functional engine implements the model, every hook is one it knows,
    and the base run's own hooks act on the embedding stage only."""
    if getattr(setup, "engine", "auto") == "hooks" or not tensor_forward.supports(setup.model):
        return False
    last = hook_name(setup.n_layers - 1, "resid_post")
    if any(patch_point(n) is None for n in names) or any(r != last and receiver_input(r) is None for r in receivers):
        return False
    return all(isinstance(h, str) and h in EMBEDDING_STAGE for h, _ in setup.base_run(direction).hooks)


def use_suffix(setup: PatchingSetup, direction: Direction, names=(), receivers=()) -> bool:
    """Whether suffix passes serve this sweep under the setup's engine (an error where the setup
    asks for the ``functional`` engine and they cannot)."""
    usable = supports(setup, direction, names, receivers)
    if setup.engine == "functional" and not usable:
        raise UnsupportedModelError(
            "suffix passes need a GPT-2 or Llama-style model, block/head hooks and "
            "base-run hooks on the embedding stage only"
        )
    return usable


class SuffixForward:
    """Forward passes of stacked candidates that start from the base run's cached activations.

    Args:
        setup: model, batch, corruption and metric.
        direction: ``noise`` (the clean run is the base) or ``denoise`` (the corrupted run is).
    """

    def __init__(self, setup: PatchingSetup, direction: Direction):
        self.setup, self.direction = setup, direction
        self.fm = tensor_forward.TensorModel(setup.model)
        self.n_layers, self.size = setup.n_layers, setup.size
        self.end_pos = setup.plan.end_pos

    # -- base-run activations -------------------------------------------------------------
    def base(self, layer: int, point: str) -> torch.Tensor:
        """The base run's activation at a patch point (cached by the setup)."""
        name = hook_name(layer, point)
        return self.setup.base_activations(self.direction, [name])[name]

    def prefetch(self, names: Sequence[str]) -> None:
        """Cache every base activation a sweep starts from in one forward pass of the bridge."""
        L = self.n_layers
        wanted = [hook_name(layer, "resid_pre") for layer in range(L)] + [hook_name(L - 1, "resid_post")]
        self.setup.base_activations(self.direction, list(dict.fromkeys(wanted + list(names))))

    def base_values(self) -> torch.Tensor:
        """Per-prompt metric ``[batch]`` of the unpatched base run (from the setup's baselines)."""
        s = self.setup
        logits = s.corrupt_logits if self.direction == "denoise" else s.clean_logits
        return s.metric(logits, s.ctx)

    def _copies(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t.repeat(n, *([1] * (t.dim() - 1)))

    def _answer_logits(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Logits ``[n * batch, vocab]`` of the final residual stream at the answer positions."""
        rows = torch.arange(x.shape[0], device=x.device)
        return self.fm.unembed(x[rows, self.end_pos.repeat(n)])

    def score(self, answer: torch.Tensor, n: int) -> torch.Tensor:
        """Per-prompt metric ``[n, batch]`` of stacked answer-position logits."""
        s = self.setup
        return s.metric(answer, repeat_ctx(s.ctx, n)).reshape(n, self.size)

    # -- node patching ----------------------------------------------------------------------
    def _layer(self, layer: int, at: int, x: torch.Tensor | None, n: int, patch: Patch) -> torch.Tensor:
        """The residual stream leaving ``layer`` for ``n`` stacked candidates whose patches in this
        layer start at point ``at``: ``x`` enters the layer (``None`` where ``at`` is ``RESID_POST``:
        the block is the base run's). Points before ``at`` keep the base run's values."""
        fm = self.fm
        if at == RESID_POST:
            return patch(layer, "resid_post", self._copies(self.base(layer, "resid_post"), n))
        assert x is not None
        z = None
        if at == RESID_PRE:
            x = patch(layer, "resid_pre", x)
            z = fm.z(layer, *fm.qkv(layer, x))
        elif at == Z:
            z = self._copies(self.base(layer, "z"), n)
        attn = (
            fm.attn_out(layer, patch(layer, "z", z)) if z is not None else self._copies(self.base(layer, "attn_out"), n)
        )
        x = x + patch(layer, "attn_out", attn)
        mlp = self._copies(self.base(layer, "mlp_out"), n) if at == MLP_OUT else fm.mlp(layer, x)
        return patch(layer, "resid_post", x + patch(layer, "mlp_out", mlp))

    def logits(self, start: tuple[int, int], n: int, patch: Patch) -> torch.Tensor:
        """Answer-position logits ``[n * batch, vocab]`` of ``n`` candidates whose first patched
        point is ``start`` (``(layer, point index)``; ``(n_layers, 0)``: nothing patched).

        ``patch(layer, point, act)`` applies the candidates' patches to an activation of the
        stacked ``[n * batch, ...]`` run. Before ``start`` the base run's values are used as they are.
        """
        return self.merged_logits([start[0] * len(POINTS) + start[1]] * n, lambda c, lay, p, a: patch(lay, p, a))

    def merged_logits(self, starts: Sequence[int], patch: Callable) -> torch.Tensor:
        """Answer-position logits ``[n * batch, vocab]`` of candidates with sorted first patched
        points ``starts`` (``layer * len(POINTS) + point``), in one stacked pass.

        Candidates join the pass at their own starting layer, so one pass serves candidates of
        many starting points with one batched operation per layer (per-op overhead is paid per
        layer, not per starting point: the many small operations of one pass per starting point
        are what slowed head patching on a busy multi-threaded CPU). ``patch(cands, layer, point,
        act)`` applies the patches of the candidates ``cands`` (a slice of ``starts``) to ``act``.
        """
        L, P_ = self.n_layers, len(POINTS)
        n = len(starts)
        assert all(a <= b for a, b in zip(starts, starts[1:], strict=False)), "starts must be sorted"
        live = sum(s < L * P_ for s in starts)  # candidates that patch anything
        x: torch.Tensor | None = None  # residual stream of candidates [0, k) entering the next layer
        k = 0
        first = starts[0] // P_ if live else L
        for layer in range(first, L):
            parts = [] if x is None else [self._layer(layer, RESID_PRE, x, k, lambda *a, c=slice(0, k): patch(c, *a))]
            j = k
            while j < live and starts[j] // P_ == layer:
                at, e = starts[j] % P_, j
                while e < live and starts[e] == starts[j]:
                    e += 1
                x_in = None if at == RESID_POST else self._copies(self.base(layer, "resid_pre"), e - j)
                parts.append(self._layer(layer, at, x_in, e - j, lambda *a, c=slice(j, e): patch(c, *a)))
                j = e
            k = j
            if parts:
                x = parts[0] if len(parts) == 1 else torch.cat(parts)
        final = self._copies(self.base(L - 1, "resid_post"), n - k)
        x = final if x is None else (x if k == n else torch.cat([x, final]))
        return self._answer_logits(x, n)

    def run(
        self, masks: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], chunk: int, progress=None
    ) -> torch.Tensor:
        """Per-prompt metric ``[candidates, batch]`` of candidate patches (the arguments of
        :func:`circuitfind.patching.run_patched`), ``chunk`` candidates per stacked pass.

        Candidates are sorted by their first patched point and cut into passes of ``chunk``
        (see :meth:`merged_logits`)."""
        C = next(iter(masks.values())).shape[0]
        none = self.n_layers * len(POINTS)
        starts = torch.full((C,), none, dtype=torch.long)
        touched = {}
        for name, mask in masks.items():
            layer, at = patch_point(name)
            touched[name] = (mask.reshape(C, -1) != 0).any(1).cpu()
            starts = torch.where(touched[name], starts.clamp(max=layer * len(POINTS) + at), starts)
        self.prefetch(
            [hook_name(s // len(POINTS), POINTS[s % len(POINTS)]) for s in starts.unique().tolist() if s < none]
        )
        order = torch.sort(starts, stable=True).indices
        device = next(iter(masks.values())).device
        out: torch.Tensor | None = None
        for part in order.split(chunk):
            on_device = part.to(device)
            sub = {name: mask[on_device] for name, mask in masks.items() if touched[name][part].any()}
            hit = {name: touched[name][part] for name in sub}

            def patch(cands: slice, layer: int, point: str, act: torch.Tensor, sub=sub, hit=hit) -> torch.Tensor:
                name = hook_name(layer, point)
                if name not in sub or not hit[name][cands].any():
                    return act
                return patch_hook(act, None, sources[name], sub[name][cands])

            with torch.no_grad():
                answer = self.merged_logits(starts[part].tolist(), patch)
            values = self.score(answer, len(part))
            if out is None:
                out = values.new_empty(C, self.size)
            out[on_device.to(out.device)] = values
            if progress is not None:
                progress.update(len(part))
        assert out is not None
        return out

    # -- path patching ----------------------------------------------------------------------
    def path_values(
        self,
        senders: Sequence[tuple[int, int]],
        receivers: dict[str, torch.Tensor | None],
        pos: torch.Tensor,
        chunk: int,
        progress=None,
    ) -> torch.Tensor:
        """Path patching (see :func:`circuitfind.patching.path_patch`): per-prompt metric
        ``[senders, batch]`` with the paths from each sender head to the receivers patched.

        ``receivers`` maps ``blocks.{l}.hook_{q,k,v}_input`` to a bool mask over (key/value) heads,
        or the last ``hook_resid_post`` (the logits) to ``None``; ``pos`` is ``[batch, pos]``.
        Step 1 (every head frozen to the base run but the sender, MLPs recomputed) runs from the
        sender's layer to the last receiver; step 2 from the first receiver after the sender.
        """
        L = self.n_layers
        wanted = [hook_name(layer, p) for layer in range(L) for p in ("z", "attn_out")]
        self.prefetch(wanted)
        source_z = self.setup.sources(self.direction, [hook_name(layer, "z") for layer in range(L)])
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        to_logits = False
        for name, heads in receivers.items():
            recv = receiver_input(name)
            if recv is None:
                to_logits = True
            else:
                by_layer.setdefault(recv[0], {})[recv[1]] = heads
        top = L if to_logits else max(by_layer)
        base_values = self.base_values()
        out = base_values.new_empty(len(senders), self.size)
        groups: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(senders):
            groups.setdefault(layer, []).append(i)
        for layer, members in groups.items():
            if layer >= top:  # no path from a sender to receivers at or below its layer
                out[members] = base_values
                if progress is not None:
                    progress.update(len(members))
                continue
            for part in torch.tensor(members).split(chunk):
                sender_heads = [senders[i][1] for i in part.tolist()]
                with torch.no_grad():
                    recorded = self._path_step1(layer, sender_heads, top, source_z, by_layer, to_logits)
                    answer = self._path_step2(layer, len(sender_heads), recorded, by_layer, to_logits, pos)
                out[part.to(out.device)] = self.score(answer, len(sender_heads))
                if progress is not None:
                    progress.update(len(part))
        return out

    def _path_step1(
        self, layer: int, heads: list[int], top: int, source_z: dict, by_layer: dict, to_logits: bool
    ) -> dict[int, torch.Tensor]:
        """Residual streams ``[n * batch, pos, d]`` entering each receiver layer (key ``L``: the final
        one) with every head frozen to the base run except the senders (one per candidate)."""
        fm, n, B = self.fm, len(heads), self.size
        name = hook_name(layer, "z")
        change = (source_z[name] - self.base(layer, "z"))[:, :, heads]  # [B, T, n, e]
        W_O = fm.layers[layer].W_O[heads]  # [n, e, d]
        sender_out = torch.einsum("btne,ned->nbtd", change, W_O)
        x = self._copies(self.base(layer, "resid_pre"), n)
        recorded = {}
        for lay in range(layer, top):
            attn = self.base(lay, "attn_out")
            resid = x.view(n, B, *x.shape[1:]) + (attn + sender_out if lay == layer else attn)
            x = resid.view_as(x)
            x = x + fm.mlp(lay, x)
            if lay + 1 in by_layer or (lay + 1 == self.n_layers and to_logits):
                recorded[lay + 1] = x
        return recorded

    def _path_step2(
        self, layer: int, n: int, recorded: dict[int, torch.Tensor], by_layer: dict, to_logits: bool, pos: torch.Tensor
    ) -> torch.Tensor:
        """Answer-position logits of the base run with the receivers' inputs (at ``pos``) replaced
        by the recorded ones, for the receivers after the senders' ``layer``."""
        fm, L = self.fm, self.n_layers
        later = sorted(lay for lay in by_layer if lay > layer)
        first = later[0] if later else L
        at = pos.bool().repeat(n, 1)[:, :, None, None]  # [n * B, T, 1, 1]
        x = self._copies(self.base(first, "resid_pre") if first < L else self.base(L - 1, "resid_post"), n)
        for lay in range(first, L):
            q, k, v = fm.qkv(lay, x)
            if lay in by_layer:
                qkv = {"q": q, "k": k, "v": v}
                rec = dict(zip("qkv", fm.qkv(lay, recorded[lay]), strict=True))
                for kind, heads in by_layer[lay].items():
                    where = at & heads.to(x.device)[None, None, :, None]
                    qkv[kind] = torch.where(where, rec[kind], qkv[kind])
                q, k, v = qkv["q"], qkv["k"], qkv["v"]
            x = x + fm.attn_out(lay, fm.z(lay, q, k, v))
            x = x + fm.mlp(lay, x)
        if to_logits:
            x = torch.where(at[..., 0], recorded[L], x)
        return self._answer_logits(x, n)
