"""Stage 2, the task batch: behaviour specs and dataset files as prompts (:mod:`~circuitfind.tasks.batch`,
:mod:`~circuitfind.tasks.datasets`, :mod:`~circuitfind.tasks.mib_rows`), multi-token answers
(:mod:`~circuitfind.tasks.multitoken`), what a patching run measures and how it corrupts
(:mod:`~circuitfind.tasks.metrics`, :mod:`~circuitfind.tasks.corruptions`) and a model's accuracy on a
task (:mod:`~circuitfind.tasks.evaluation`)."""

from circuitfind.tasks.batch import Prompt, TaskBatch, TaskSpec, available_tasks, generate_prompts, load_task

__all__ = ["Prompt", "TaskBatch", "TaskSpec", "available_tasks", "generate_prompts", "load_task"]
