"""Reports: report.json (the contract other tools read) and the human pages (report.html)."""

from qdistill.report.contract import SUMMARY_KEYS, bit_summary, build_report, environment, summary
from qdistill.report.page import render

__all__ = ["SUMMARY_KEYS", "bit_summary", "build_report", "environment", "render", "summary"]
