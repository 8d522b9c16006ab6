"""Reports: report.json (the contract other tools read) and the human report (report.html)."""

from qdistill.report.contract import SUMMARY_KEYS, bit_summary, build_report, environment, summary
from qdistill.report.html import render

__all__ = ["SUMMARY_KEYS", "bit_summary", "build_report", "environment", "render", "summary"]
