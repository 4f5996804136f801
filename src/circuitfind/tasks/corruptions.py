"""Corruptions: how the "corrupted" run is made and what is patched in when ablating.

Every corruption turns a :class:`~circuitfind.tasks.batch.TaskBatch` into a :class:`CorruptionPlan`:

* ``clean`` and ``corrupt`` runs (tokens plus forward hooks), used as the base run (denoising starts
  from the corrupted run, noising from the clean run) and as the source of patched-in activations;
* for mean and zero ablation, ``ablate``: the value patched into the clean run for any activation,
  derived from the clean activation itself (its batch mean, or zeros).

The corruptions (Zhang & Nanda 2023 naming):

* :class:`STR` symmetric token replacement: the task's corrupted prompt (same token length).
* :class:`GaussianNoise` (GN): noise on the token embeddings (``hook_embed``, not positions) of the
  key tokens, std = ``factor`` x the std of token embeddings over the dataset, ``samples`` seeded
  draws, each a copy of the batch (metrics average over them).
* :class:`MeanAblation`, :class:`ZeroAblation`: ablate an activation to its batch mean / to zero;
  the corrupted run ablates the token embeddings the same way.
* :class:`ResampleAblation`: activations from another prompt of the same token length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from circuitfind.errors import TaskError
from circuitfind.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Hook = tuple[str | Callable, Callable]  # (hook name or name filter, hook function), as run_with_hooks takes them
EMBED_HOOK = "hook_embed"


@dataclass
class Run:
    """A forward pass to make: input tokens and the hooks that shape it (e.g. embedding noise).

    Hooks must accept activations whose batch is any number of stacked copies of ``tokens``'s batch
    (the patching engine stacks candidate patches along the batch).
    """

    tokens: torch.Tensor
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class CorruptionPlan:
    """The clean run, the corrupted run and the ablation rule of one corruption on one batch."""

    name: str
    batch: TaskBatch
    clean: Run
    corrupt: Run
    answers: torch.Tensor
    counter_answers: torch.Tensor
    end_pos: torch.Tensor
    positions: dict[str, torch.Tensor]
    ablate: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.clean.tokens.shape[0]


def _per_copy(fn: Callable[[torch.Tensor], torch.Tensor], base: int) -> Callable:
    """Apply ``fn`` to each stacked copy of a ``base``-sized batch."""

    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
        shape = act.shape
        return fn(act.reshape(-1, base, *shape[1:])).reshape(shape)

    return hook


class Corruption:
    """Base class: subclasses implement :meth:`plan`."""

    name = "corruption"

    def plan(self, model: TransformerBridge, batch: TaskBatch) -> CorruptionPlan:
        raise NotImplementedError

    def _plan(self, batch: TaskBatch, clean: Run, corrupt: Run, **kw) -> CorruptionPlan:
        return CorruptionPlan(
            name=self.name,
            batch=batch,
            clean=clean,
            corrupt=corrupt,
            answers=batch.answers,
            counter_answers=batch.counter_answers,
            end_pos=batch.end_pos,
            positions=batch.positions,
            **kw,
        )

    def __repr__(self) -> str:
        return self.name


class STR(Corruption):
    """Symmetric token replacement with one of the task's variants (``None``: its default)."""

    def __init__(self, variant: str | None = None):
        self.variant = variant
        self.name = f"str:{variant}" if variant else "str"

    def plan(self, model: TransformerBridge, batch: TaskBatch) -> CorruptionPlan:
        return self._plan(batch, Run(batch.clean_tokens), Run(batch.corrupted(self.variant)))


def embedding_std(model: TransformerBridge, batch: TaskBatch) -> float:
    """Std of the token embeddings of every real token in the batch (the GN scale reference)."""
    return model.W_E[batch.clean_tokens][batch.mask].std().item()


def no_key_tokens(task: str) -> str:
    """Why Gaussian noise cannot run on a task without key tokens (it would noise nothing)."""
    return (
        f"corruption 'gn': task {task!r} has no key tokens, so Gaussian noise would noise nothing; mark them "
        "(a spec's key_tokens, a dataset's keys / key.NAME columns) or use another corruption"
    )


class GaussianNoise(Corruption):
    """Gaussian noise on the key tokens' embeddings (ROME-style corruption, "GN").

    Args:
        factor: noise std in units of the dataset's token-embedding std (3 in Meng et al.).
        samples: number of noise draws; the batch is repeated once per draw.
        seed: seed of the noise generator.
        key_tokens: which key token positions are noised (default: the task's ``key_tokens``).
    """

    def __init__(self, factor: float = 3.0, samples: int = 3, seed: int = 0, key_tokens: Sequence[str] | None = None):
        if samples < 1:
            raise ValueError(f"GaussianNoise needs samples >= 1, got {samples}")
        self.factor, self.samples, self.seed = factor, samples, seed
        self.key_tokens = list(key_tokens) if key_tokens is not None else None
        self.name = "gn"

    def noise(self, model: TransformerBridge, batch: TaskBatch) -> torch.Tensor:
        """The ``[samples * batch, pos, d_model]`` noise tensor, zero outside key tokens."""
        std = self.factor * embedding_std(model, batch)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        shape = (self.samples * batch.size, batch.n_pos, model.cfg.d_model)
        noise = torch.randn(shape, generator=gen).to(batch.clean_tokens.device) * std
        if not (self.key_tokens if self.key_tokens is not None else batch.task.key_tokens):
            raise TaskError(no_key_tokens(batch.task.name))
        where = batch.key_position_mask(self.key_tokens).repeat(self.samples, 1)
        return noise * where[..., None]

    def plan(self, model: TransformerBridge, batch: TaskBatch, noise: torch.Tensor | None = None) -> CorruptionPlan:
        """The plan of :meth:`noise` (or ``noise``, ``[samples * batch, pos, d_model]``, drawn elsewhere:
        teacher-forced rows take their prompt's draw, :func:`circuitfind.tasks.multitoken.corruption_plan`)."""
        noise = self.noise(model, batch) if noise is None else noise
        tokens = batch.clean_tokens.repeat(self.samples, 1)
        add = _per_copy(lambda act: act + noise.to(act.dtype), tokens.shape[0])

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(self.samples)

        return CorruptionPlan(
            name=self.name,
            batch=batch,
            clean=Run(tokens),
            corrupt=Run(tokens, [(EMBED_HOOK, add)]),
            answers=rep(batch.answers),
            counter_answers=rep(batch.counter_answers),
            end_pos=rep(batch.end_pos),
            positions={k: rep(v) for k, v in batch.positions.items()},
        )


class MeanAblation(Corruption):
    """Replace an activation by its mean over the batch (per position)."""

    name = "mean"

    @staticmethod
    def ablate(act: torch.Tensor) -> torch.Tensor:
        return act.mean(0, keepdim=True).expand_as(act)

    def plan(self, model: TransformerBridge, batch: TaskBatch) -> CorruptionPlan:
        tokens = batch.clean_tokens
        embed = _per_copy(lambda a: a.mean(1, keepdim=True).expand_as(a), tokens.shape[0])
        return self._plan(batch, Run(tokens), Run(tokens, [(EMBED_HOOK, embed)]), ablate=self.ablate)


class ZeroAblation(Corruption):
    """Replace an activation by zeros."""

    name = "zero"

    @staticmethod
    def ablate(act: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(act)

    def plan(self, model: TransformerBridge, batch: TaskBatch) -> CorruptionPlan:
        tokens = batch.clean_tokens
        return self._plan(
            batch,
            Run(tokens),
            Run(tokens, [(EMBED_HOOK, lambda a, hook=None: torch.zeros_like(a))]),
            ablate=self.ablate,
        )


class ResampleAblation(Corruption):
    """Activations from another prompt of the batch with the same token length (seeded derangement)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.name = "resample"

    def partner(self, batch: TaskBatch) -> torch.Tensor:
        """For each prompt, the index of the prompt its activations are taken from."""
        lengths = (batch.end_pos + 1).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        rng = random.Random(self.seed)
        partner = list(range(batch.size))
        for n, members in groups.items():
            if len(members) < 2:
                raise TaskError(
                    f"resample ablation needs at least two prompts of each token length; length {n} "
                    f"has one (prompt {members[0]}). Use more prompts."
                )
            order = members[:]
            rng.shuffle(order)
            for a, b in zip(order, order[1:] + order[:1], strict=True):
                partner[a] = b
        return torch.tensor(partner, device=batch.clean_tokens.device)

    def plan(self, model: TransformerBridge, batch: TaskBatch) -> CorruptionPlan:
        return self._plan(batch, Run(batch.clean_tokens), Run(batch.clean_tokens[self.partner(batch)]))


CORRUPTIONS: dict[str, Callable[..., Corruption]] = {
    "str": STR,
    "gn": GaussianNoise,
    "mean": MeanAblation,
    "zero": ZeroAblation,
    "resample": ResampleAblation,
}


def get_corruption(spec: str | Corruption) -> Corruption:
    """A corruption from its name: ``str``, ``str:<variant>``, ``gn``, ``mean``, ``zero``, ``resample``."""
    if isinstance(spec, Corruption):
        return spec
    name, _, arg = spec.partition(":")
    if name not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {spec!r}; choose from {sorted(CORRUPTIONS)} (str:<variant> for an STR variant)"
        )
    if name == "str":
        return STR(arg or None)
    if arg:
        raise ValueError(f"corruption {name!r} takes no ':' argument (got {spec!r})")
    return CORRUPTIONS[name]()
