"""Checks of numeric options, shared by the library's entry points (so the Python API, the command
line and the sweep refuse the same values with the same message)."""

from __future__ import annotations

import math
import numbers


def finite_number(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a float; it must be a real number, finite, ``> 0`` if ``positive``, ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    """``value`` as an int ``>= 1`` (bools and floats are refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
