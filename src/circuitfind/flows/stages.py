"""A flow task's stages in its Prefect run log: :func:`logged_stages` sends every stage of long work
(:func:`circuitfind.progress.stage`, bar descriptions) to the task's run logger, so a scheduled run
shows where each setting is without a terminal."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from circuitfind import progress


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task's Prefect run logger; this module's logger when the task's function runs outside a run
    (``task.fn(...)``, tests), where Prefect has no run to log to."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def logged_stages(prefix: str | None = None) -> Iterator[None]:
    """Within the block, log each stage as ``"<prefix>: <stage>"`` (or the stage alone) at INFO."""
    log = run_logger()

    def listen(stage: str) -> None:
        log.info("%s: %s", prefix, stage) if prefix else log.info("%s", stage)

    with progress.stages(listen):
        yield
