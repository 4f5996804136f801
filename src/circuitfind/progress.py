"""Progress bars for long work, on stderr so that stdout (results, JSON) stays the same.

On when stderr is a terminal; ``CIRCUITFIND_PROGRESS=0`` turns them off and ``CIRCUITFIND_PROGRESS=1``
turns them on without a terminal (logs, tests). Bars use tqdm.

Stages: every bar's description (when made, and when :meth:`tqdm.set_description` changes it) and
every :func:`stage` call go to the listener of :func:`stages`, shown or not, so that a Prefect task can
log a setting's stage ("baselines", "eap: searching", ...) through its run logger without a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm import tqdm

ENV = "CIRCUITFIND_PROGRESS"
_LISTENER: ContextVar[Callable[[str], None] | None] = ContextVar("circuitfind_stage_listener", default=None)


def enabled() -> bool:
    """Whether progress is shown: ``CIRCUITFIND_PROGRESS`` (``0``/``1``) when set, else whether stderr is a TTY."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


@contextmanager
def stages(listener: Callable[[str], None]) -> Iterator[None]:
    """Within the block (this thread or task's context), send each stage name to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def stage(name: str) -> None:
    """Announce that long work entered stage ``name`` (to the :func:`stages` listener, if any)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(name)


class _Bar(tqdm):
    """A tqdm bar whose changes of description are announced as stages."""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        if desc and desc != getattr(self, "_stage", None):
            self._stage = desc
            stage(desc)
        super().set_description(desc, refresh)


def bar(iterable: Iterable | None = None, *, show: bool, desc: str, total: int | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr (``show=False``: a silent one), removed from the screen when done."""
    out = _Bar(iterable, total=total, desc=desc, disable=not show, leave=False, file=sys.stderr, **kw)
    out._stage = desc
    stage(desc)
    return out
