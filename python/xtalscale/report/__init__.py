"""The HTML report (``xtalscale.report``): statistics table and interactive plots.

:func:`write_html_report` writes one self-contained file (plotly's JavaScript embedded once;
no network needed). :mod:`xtalscale.report.plots` builds the plotly figures from plain
arrays and dicts; :mod:`xtalscale.report.terminal` prints tables and progress in a terminal.
"""
from __future__ import annotations

from .html import (
    STATISTICS_COLUMNS,
    render_html_report,
    statistics_as_dict,
    write_html_report,
)

__all__ = ["STATISTICS_COLUMNS", "render_html_report", "statistics_as_dict", "write_html_report"]
