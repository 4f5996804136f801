"""The result of a node or path patching sweep, with the baselines needed to read it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitfind.patching.setup import PatchingSetup
from circuitfind.tasks import multitoken
from circuitfind.tasks.metrics import normalise


@dataclass
class PatchResult:
    """Metric values of a patching sweep, with the baselines needed to read them.

    ``values`` is the mean over prompts (shape ``axes``), ``per_prompt`` keeps the prompt axis last.
    For GN the prompt axis counts every noise sample; for multi-token answers it holds prompts, each the
    sum of its teacher-forced rows (noise samples averaged, :func:`circuitfind.tasks.multitoken.by_prompt`).
    """

    values: torch.Tensor
    per_prompt: torch.Tensor
    axes: tuple[str, ...]
    metric: str
    corruption: str
    direction: str
    clean: float
    corrupt: float
    kind: str = ""

    @property
    def base(self) -> float:
        """The unpatched value of the patched run (corrupt for denoising, clean for noising)."""
        return self.corrupt if self.direction == "denoise" else self.clean

    @property
    def normalised(self) -> torch.Tensor:
        """``(patched - corrupt) / (clean - corrupt)``."""
        return normalise(self.values, self.clean, self.corrupt)

    @property
    def effect(self) -> torch.Tensor:
        """``patched - base``: positive when the patch moves the metric up."""
        return self.values - self.base

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "axes": list(self.axes),
            "metric": self.metric,
            "corruption": self.corruption,
            "direction": self.direction,
            "clean": self.clean,
            "corrupt": self.corrupt,
            "values": self.values.tolist(),
        }


def sweep_result(
    setup: PatchingSetup, direction: str, per_prompt: torch.Tensor, shape: Sequence[int], axes, kind
) -> PatchResult:
    per_prompt = multitoken.prompt_values(per_prompt.reshape(*shape, setup.size), setup.batch, setup.ctx).cpu()
    return PatchResult(
        per_prompt.mean(-1),
        per_prompt,
        tuple(axes),
        setup.metric.name,
        setup.plan.name,
        direction,
        setup.clean_value,
        setup.corrupt_value,
        kind,
    )
