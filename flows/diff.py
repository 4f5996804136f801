"""Entry point of the run-against-run diff flow in a checkout: ``python flows/diff.py RUN_A RUN_B``. The
code is in :mod:`circuitfind.flows.diff_flow`."""

import sys

from circuitfind.flows.diff_flow import diff_flow, main

__all__ = ["diff_flow", "main"]

if __name__ == "__main__":
    sys.exit(main())
