"""Entry point of the settings-sensitivity study in a checkout: ``python flows/study.py --help``. The
code is in :mod:`circuitfind.flows.study_flow`."""

import sys

from circuitfind.flows.study_flow import main, settings_study

__all__ = ["main", "settings_study"]

if __name__ == "__main__":
    sys.exit(main())
