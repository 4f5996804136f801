"""Exceptions raised for bad input, each with a message that names the problem."""

from __future__ import annotations


class CircuitfindError(Exception):
    """Base class of circuitfind's own errors."""


class ModelNotFoundError(CircuitfindError, LookupError):
    """The model name is neither shipped, nor a local folder, nor reachable on the hub."""


class TaskError(CircuitfindError, ValueError):
    """A task spec or a batch built from it is unusable (bad spec, unequal STR lengths, ...)."""


class MetricError(CircuitfindError, ValueError):
    """A metric produced NaN/inf, or clean and corrupted runs cannot be told apart."""


# Errors the command line reports as one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CircuitfindError, ValueError, FileNotFoundError)
