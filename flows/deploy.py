"""Entry point of the scheduled deployment in a checkout: ``python flows/deploy.py --help``. The code
is in :mod:`circuitfind.flows.deploy`."""

from circuitfind.flows.deploy import build_deployment, main

__all__ = ["build_deployment", "main"]

if __name__ == "__main__":
    main()
