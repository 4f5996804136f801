"""Progress bars for long work, on stderr so that stdout (results, JSON) stays the same.

At a terminal, tqdm bars. When stderr is not a terminal (a notebook, a Prefect or batch log), one plain
line every ~10 s (``CIRCUITFIND_PROGRESS_INTERVAL`` seconds), e.g. ``edge pruning: step 40/200, 12 s,
faith=0.830``, and nothing for work that ends sooner, so a log shows where a long run is without a
bar's carriage returns. ``CIRCUITFIND_PROGRESS=0`` turns progress off; ``CIRCUITFIND_PROGRESS=1`` shows
the tqdm bars without a terminal too (tests).

Stages: every bar's description (when made, and when :meth:`tqdm.set_description` changes it) and
every :func:`stage` call go to the listener of :func:`stages`, shown or not, so that a Prefect task can
log a setting's stage ("baselines", "eap: searching", ...) through its run logger without a terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm import tqdm

ENV = "CIRCUITFIND_PROGRESS"
INTERVAL_ENV = "CIRCUITFIND_PROGRESS_INTERVAL"
INTERVAL = 10.0  # seconds between two progress lines when stderr is not a terminal
LINE_FORMAT = "{desc}: {unit} {n_fmt}/{total_fmt}, {elapsed_s:.0f} s{postfix}"
_LISTENER: ContextVar[Callable[[str], None] | None] = ContextVar("circuitfind_stage_listener", default=None)


def mode() -> str:
    """How progress is shown: ``"off"`` or ``"bars"`` when ``CIRCUITFIND_PROGRESS`` is ``0`` or ``1``;
    else ``"bars"`` at a terminal and ``"lines"`` (a line every :func:`interval` seconds) elsewhere."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "bars"
    try:
        return "bars" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return "lines"


def enabled() -> bool:
    """Whether progress is shown (:func:`mode` is not ``"off"``)."""
    return mode() != "off"


def interval() -> float:
    """Seconds between progress lines: ``CIRCUITFIND_PROGRESS_INTERVAL``, else :data:`INTERVAL`."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(text) if text else INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={text!r} is not a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{INTERVAL_ENV}={text!r} must be a number of seconds >= 0")
    return value


class _Lines:
    """A stream for tqdm that turns each carriage-return redraw into one finished line on stderr
    (blank redraws, such as a bar's removal, write nothing)."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


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

    _lines_after: float | None = None  # in line mode: redraws before this time are not written

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        if desc and desc != getattr(self, "_stage", None):
            self._stage = desc
            stage(desc)
        if self._lines_after is not None and time.monotonic() < self._lines_after:
            refresh = False  # a line for a new description only once the work has run past the delay
        super().set_description(desc, refresh=False)
        self.desc = str(getattr(self, "desc", "")).removesuffix(
            ": "
        )  # tqdm appends ": " here but not at creation: one form for the lines
        if refresh:
            self.refresh()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True, **kwargs: Any) -> None:
        # in line mode the postfix is written with the next interval's line, not as a line of its own
        super().set_postfix(ordered_dict, refresh=refresh and self._lines_after is None, **kwargs)


def bar(
    iterable: Iterable | None = None,
    *,
    show: bool,
    desc: str,
    total: int | None = None,
    announce: bool = True,
    **kw: Any,
) -> tqdm:
    """A tqdm bar on stderr (``show=False``: a silent one), removed from the screen when done; when
    stderr is not a terminal (:func:`mode` ``"lines"``), a line every :func:`interval` seconds instead,
    the first after that long. ``announce=False``: its description is not a :func:`stage` (an engine's
    passes within a method's stage)."""
    lines = show and mode() == "lines"
    if lines:
        wait = interval()
        kw = {**kw, "file": _Lines(), "mininterval": wait, "maxinterval": max(wait, 1.0), "delay": wait}
        kw.setdefault("bar_format", LINE_FORMAT)
    else:
        kw.setdefault("file", sys.stderr)
    out = _Bar(iterable, total=total, desc=desc, disable=not show, leave=False, **kw)
    if lines:
        out._lines_after = time.monotonic() + wait
    out._stage = desc
    if announce:
        stage(desc)
    return out
