"""The forward pass below a starting point, computed once per mask set and shared by candidates.

Candidates that agree on every edge into the receivers below a starting point (a layer for the
hooks engine, a stage for the direct engine) share the forward pass below it: it runs once, for
the first candidate, and is kept here, keyed by the starting point and those edges' masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class PrefixCache(Generic[T]):
    """A small cache of prefix states by ``(start, masks below it)``; cleared when it grows past
    ``size`` entries (searches move on and rarely return to an old prefix)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: dict[tuple[int, bytes], T] = {}

    def get(self, start: int, masks_below: torch.Tensor, compute: Callable[[], T]) -> T:
        """The state below ``start`` for these masks of the edges below it, computed on a miss."""
        key = (start, masks_below.cpu().numpy().tobytes())
        if key not in self._entries:
            value = compute()
            if len(self._entries) > self.size:
                self._entries.clear()
            self._entries[key] = value
        return self._entries[key]
