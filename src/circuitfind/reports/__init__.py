"""Reports: the sweep's circuit diff report (:mod:`circuitfind.reports.sweep_report`) and the rendering
shared by every report (:mod:`circuitfind.reports.render`: tables, sections, the page with its
contents list and CSS, as HTML and Markdown)."""

from circuitfind.reports.sweep_report import report_sections, write_report, write_run_report
from circuitfind.runs.statistics import compare_records

__all__ = ["compare_records", "report_sections", "write_report", "write_run_report"]
