"""Entry point of the circuits-over-training flow in a checkout: ``python flows/checkpoints.py --help``.
The code is in :mod:`circuitfind.flows.checkpoints_flow`."""

import sys

from circuitfind.flows.checkpoints_flow import circuits_over_training, main

__all__ = ["circuits_over_training", "main"]

if __name__ == "__main__":
    sys.exit(main())
