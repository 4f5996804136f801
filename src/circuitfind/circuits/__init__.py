"""Stage 6, circuits and graph files: the edge graph of a model (:mod:`~circuitfind.circuits.graph`),
a circuit on it (:mod:`~circuitfind.circuits.circuit`), its file formats (:mod:`~circuitfind.circuits.graph_io`,
:mod:`~circuitfind.circuits.mib`) and how circuits agree (:mod:`~circuitfind.circuits.agreement`)."""

from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph

__all__ = ["Circuit", "ModelGraph"]
