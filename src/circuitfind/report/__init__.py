"""Reports: the sweep's circuit diff report (:mod:`circuitfind.report.sweep`) and the rendering
shared by every report (:mod:`circuitfind.report.render`: tables, sections, the page with its
contents list and CSS, as HTML and Markdown)."""

from circuitfind.report.sweep import report_sections, write_report, write_run_report
from circuitfind.run_statistics import compare_records

__all__ = ["compare_records", "report_sections", "write_report", "write_run_report"]
