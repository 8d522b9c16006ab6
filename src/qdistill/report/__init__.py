"""Reports: report.json (the contract other tools read) and the human pages (report.html, index.html, compare.html)."""

from qdistill.report.contract import SUMMARY_KEYS, bit_summary, build_report, environment, summary
from qdistill.report.page import render
from qdistill.report.runs_page import COLUMNS, run_row, runs_page

__all__ = ["COLUMNS", "SUMMARY_KEYS", "bit_summary", "build_report", "environment", "render", "run_row", "runs_page",
           "summary"]
