"""Progress bars for long work, on stderr so that stdout (results, JSON) stays the same.

On when stderr is a terminal; ``CIRCUITFIND_PROGRESS=0`` turns them off and ``CIRCUITFIND_PROGRESS=1``
turns them on without a terminal (logs, tests). Bars use tqdm.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

ENV = "CIRCUITFIND_PROGRESS"


def enabled() -> bool:
    """Whether progress is shown: ``CIRCUITFIND_PROGRESS`` (``0``/``1``) when set, else whether stderr is a TTY."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, show: bool, desc: str, total: int | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr (``show=False``: a silent one), removed from the screen when done."""
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, file=sys.stderr, **kw)
