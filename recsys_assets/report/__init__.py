"""The closed-loop report (HTML + PNG) that ``recsys demo`` ends with."""

from recsys_assets.report.data import Marker, ReportData, RetrainRun, build_report_data
from recsys_assets.report.render import ReportFiles, build_chart, render_report

__all__ = [
    "Marker",
    "ReportData",
    "ReportFiles",
    "RetrainRun",
    "build_chart",
    "build_report_data",
    "render_report",
]
