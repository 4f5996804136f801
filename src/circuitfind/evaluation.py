"""How well a model does a task: accuracy and the clean/corrupted metric baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from circuitfind.patching import answer_logits, prepare
from circuitfind.tasks import TaskBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class TaskReport:
    """Top-1 accuracy and mean logit difference ``r - r'`` on clean prompts, per-corruption baselines."""

    task: str
    n_prompts: int
    accuracy: float
    logit_diff: float
    corrupted: dict[str, dict[str, float]]

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"task {self.task}: {self.n_prompts} prompts",
            f"  accuracy (top-1 = r)        {self.accuracy:.3f}",
            f"  clean logit diff r - r'     {self.logit_diff:.3f}",
        ]
        for name, row in self.corrupted.items():
            lines.append(
                f"  corrupted ({name:>10}) logit diff {row['logit_diff']:.3f}   KL(clean||corrupt) {-row['kl']:.3f}"
            )
        return "\n".join(lines)


def evaluate(
    model: TransformerBridge, batch: TaskBatch, corruptions: tuple[str, ...] = ("str", "gn", "mean", "resample")
) -> TaskReport:
    """Accuracy of ``model`` on ``batch`` and the logit difference / KL under each corruption."""
    with torch.no_grad():
        logits = answer_logits(model(batch.clean_tokens), batch.end_pos).float()  # metrics in float32
    accuracy = (logits.argmax(-1) == batch.answers).float().mean().item()
    diff = (logits.gather(1, batch.answers[:, None]) - logits.gather(1, batch.counter_answers[:, None])).mean().item()
    corrupted = {}
    for name in corruptions:
        setup = prepare(model, batch, name, "logit_diff")
        corrupted[name] = {"logit_diff": setup.corrupt_value, "kl": setup.baselines("kl")[1]}
    return TaskReport(batch.task.name, batch.size, accuracy, diff, corrupted)
