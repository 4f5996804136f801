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


class GraphFileError(CircuitfindError, ValueError):
    """A graph or circuit file is unreadable, hostile, too large, or does not match its declared shape."""


class GraphMismatchError(CircuitfindError, ValueError):
    """Circuits (or scores) from graphs of different shapes cannot be compared."""


class UnsafeModelError(CircuitfindError, ValueError):
    """A model folder holds its weights only as a pickle, which can run code when loaded."""


# Errors the command line reports as one line instead of a traceback (OSError: unreadable or
# unwritable paths given on the command line).
USER_ERRORS: tuple[type[BaseException], ...] = (CircuitfindError, ValueError, OSError)


class ImpossibleSignError(CircuitfindError, ValueError):
    """A detection asked for effects of a sign that the patching setting cannot produce."""
