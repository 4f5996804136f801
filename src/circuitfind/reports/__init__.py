"""Reports: the sweep's circuit diff report (:mod:`circuitfind.reports.sweep_report`) and the rendering
shared by every report (:mod:`circuitfind.reports.render`: tables, sections, the page with its
contents list and CSS, as HTML and Markdown).

The public names are imported on first use, so importing :mod:`circuitfind.reports.render` (the
study, checkpoints and diff reports, and the command line's parser through them) loads neither the
statistics nor torch."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_records", "report_sections", "write_report", "write_run_report"]


def __getattr__(name: str) -> Any:
    if name == "compare_records":
        from circuitfind.runs.statistics import compare_records

        return compare_records
    if name in ("report_sections", "write_report", "write_run_report"):
        from circuitfind.reports import sweep_report

        return getattr(sweep_report, name)
    raise AttributeError(f"module 'circuitfind.reports' has no attribute {name!r}")
