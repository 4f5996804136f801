"""Entry point of the sweep flow in a checkout: ``python flows/sweep.py --help`` (the same as
``circuitfind sweep``) and ``prefect.yaml``'s ``flows/sweep.py:sweep``. The code is in
:mod:`circuitfind.flows.sweep_flow`, so an installed package carries it."""

import sys

from circuitfind.flows.sweep_flow import compare_run, dask_runner, main, sweep

__all__ = ["compare_run", "dask_runner", "main", "sweep"]

if __name__ == "__main__":
    sys.exit(main())
