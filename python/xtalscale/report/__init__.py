"""The HTML report (``xtalscale.report``): statistics table and interactive plots.

:func:`write_html_report` writes one self-contained file (plotly's JavaScript embedded once;
no network needed). :func:`statistics_for_report` computes what it shows from scaled
observations; :mod:`xtalscale.report.plots` builds the plotly figures from plain arrays and
dicts; :mod:`xtalscale.report.terminal` prints tables and progress in a terminal;
:mod:`xtalscale.report.browser` checks a report in headless Chromium.
"""
from __future__ import annotations

from .html import (
    STATISTICS_COLUMNS,
    prepare_report,
    render_html_report,
    statistics_as_dict,
    write_html_report,
)
from .inputs import ReportInputs, statistics_for_report

__all__ = ["STATISTICS_COLUMNS", "ReportInputs", "prepare_report", "render_html_report",
           "statistics_as_dict", "statistics_for_report", "write_html_report"]
