"""The self-contained HTML report (jinja2 template, plotly embedded once, opens offline).

Entry point for commands and pipelines::

    from xtalscale.report import write_html_report
    write_html_report("xtalscale.html", statistics=stats, merged=merged,
                      experiments=experiments, batch_statistics=per_batch,
                      normalised_deviations=deviations)

Every input is optional: the report shows what it is given and says what is missing.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import plots

__all__ = ["STATISTICS_COLUMNS", "prepare_report", "render_html_report", "statistics_as_dict",
           "write_html_report"]

#: (iotbx name, column header, format) of the statistics table, in AIMLESS/DIALS order.
STATISTICS_COLUMNS = (
    ("d_max", "d_max", "{:.2f}"),
    ("d_min", "d_min", "{:.2f}"),
    ("n_obs", "#obs", "{:d}"),
    ("n_uniq", "#uniq", "{:d}"),
    ("mean_redundancy", "mult.", "{:.2f}"),
    ("completeness", "%comp", "{:.1f}"),
    ("i_over_sigma_mean", "<I/sI>", "{:.1f}"),
    ("r_merge", "r_mrg", "{:.4f}"),
    ("r_meas", "r_meas", "{:.4f}"),
    ("r_pim", "r_pim", "{:.4f}"),
    ("cc_one_half", "cc1/2", "{:.4f}"),
    ("cc_anom", "cc_ano", "{:.4f}"),
)


def _shell_dict(shell: Any) -> dict:
    d = dict(shell.as_dict()) if hasattr(shell, "as_dict") else dict(shell)
    if "mean_redundancy" not in d and "multiplicity" in d:
        d["mean_redundancy"] = d["multiplicity"]
    return d


def statistics_as_dict(statistics: Any) -> dict | None:
    """``{"overall": {...}, "bins": [{...}, ...]}`` (iotbx names, completeness in %).

    Accepts a ``dataset_statistics`` (``.overall`` and ``.bins``), iotbx's ``as_dict()``
    layout (one list per quantity plus ``overall``) or this layout itself.
    """
    if statistics is None:
        return None
    if hasattr(statistics, "bins") and hasattr(statistics, "overall"):
        return {"overall": _shell_dict(statistics.overall),
                "bins": [_shell_dict(b) for b in statistics.bins]}
    if not isinstance(statistics, Mapping):
        raise TypeError(f"statistics must be a mapping or a dataset_statistics; got "
                        f"{type(statistics).__name__}")
    overall = _shell_dict(statistics.get("overall") or {})
    if "bins" in statistics:
        return {"overall": overall, "bins": [_shell_dict(b) for b in statistics["bins"]]}
    lists = {k: v for k, v in statistics.items() if isinstance(v, (list, tuple))}
    n = len(lists.get("d_min", []))
    return {"overall": overall,
            "bins": [_shell_dict({k: v[i] for k, v in lists.items() if len(v) == n})
                     for i in range(n)]}


def _format(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt.endswith("d}"):
        return fmt.format(int(value))
    return fmt.format(float(value))


def _table(stats: dict) -> dict | None:
    bins = stats.get("bins") or []
    overall = stats.get("overall") or {}
    present = [c for c in STATISTICS_COLUMNS
               if any(c[0] in b for b in bins) or c[0] in overall]
    if not present:
        return None
    return {"header": [h for _, h, _ in present],
            "rows": [[_format(b.get(n), f) for n, _, f in present] for b in bins],
            "overall": [_format(overall.get(n), f) for n, _, f in present]}


def _json_figures(figures: dict) -> str:
    text = json.dumps(figures, allow_nan=False, separators=(",", ":"))
    return text.replace("</", "<\\/")  # a figure title cannot close the script element


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    """The report's compiled jinja2 template, made once per process (importing jinja2 and
    compiling the template cost ~50 ms; a process that writes several reports pays once)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("xtalscale.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2")


def prepare_report() -> None:
    """Import jinja2 and compile the report's template now (once per process; ~50 ms of
    Python): for a caller whose other thread is busy meanwhile (the scaling job merges the
    observations then), so that :func:`write_html_report` later does not wait for it."""
    _template()


def _plotly_js() -> str:
    """plotly.js, the text ``plotly.offline.get_plotlyjs()`` returns, read from the same file
    (``package_data/plotly.min.js`` in the plotly package) without importing plotly: its
    package import costs ~30 ms of CPU, a twentieth of a small scaling job."""
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "package_data", "plotly.min.js")
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                return fh.read().decode("utf-8")
    import plotly.offline  # another layout: plotly's own reader (ImportError if absent)

    return plotly.offline.get_plotlyjs()


def _merged_arrays(merged: Any) -> tuple | None:
    """(1/d², IMEAN, centric) of finite merged intensities, or None."""
    from ..symmetry import centric_flags

    if merged is None or len(merged) == 0:
        return None
    intensity = np.asarray(merged.columns["IMEAN"], dtype=np.float64)
    d_star_sq = merged.unit_cell.d_star_sq(merged.miller_index)
    centric = centric_flags(merged.miller_index, merged.space_group)
    return d_star_sq, intensity, centric


def render_html_report(statistics: Any = None, merged: Any = None, experiments: Any = None,
                       batch_statistics: Mapping | None = None,
                       normalised_deviations: Any = None,
                       summary: Sequence[tuple[str, str]] = (),
                       notes: Sequence[str] = (), title: str = "xtalscale report") -> str:
    """The report as one HTML string (see :func:`write_html_report`)."""
    stats = statistics_as_dict(statistics)
    figures: dict = {}
    sections = []
    notes = list(notes)

    def section(name: str, plot_dict: dict, missing: str) -> None:
        plot_dict = {k: v for k, v in plot_dict.items() if v is not None}
        ids = []
        for key, fig in plot_dict.items():
            plot_id = f"plot-{key}".replace("_", "-")
            figures[plot_id] = fig
            ids.append(plot_id)
        sections.append({"title": name, "plots": ids, "note": None if ids else missing})

    section("Statistics against resolution",
            plots.resolution_plots((stats or {}).get("bins") or []),
            "No merging statistics were given.")
    section("Statistics against batch", plots.batch_plots(batch_statistics or {}),
            "No per-batch statistics were given.")
    model_plots = plots.scaling_model_plots(experiments) if experiments is not None else {}
    section("Scaling model", model_plots,
            "No scaling model is stored with these data (an MTZ input, or unscaled data).")
    section("Error model", {"normal_probability": plots.normal_probability_plot(
        normalised_deviations) if normalised_deviations is not None else None},
            "No normalised deviations were given.")
    arrays = _merged_arrays(merged)
    intensity_plots = {}
    if arrays is not None:
        d_star_sq, intensity, centric = arrays
        intensity_plots = {"wilson": plots.wilson_plot(d_star_sq, intensity),
                           "cumulative_intensity": plots.cumulative_intensity_distribution(
                               d_star_sq, intensity, centric)}
    section("Intensity statistics", intensity_plots,
            "Too few merged reflections for a Wilson plot." if arrays is not None
            else "No merged intensities were given.")
    table = _table(stats) if stats else None
    if stats is not None and table is None:
        notes.append("The merging statistics hold no shells.")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from .. import __version__

    return _template().render(
        title=title, subtitle=f"xtalscale {__version__}, {now}", notes=notes,
        summary=list(summary), table=table, sections=sections, n_plots=len(figures),
        figures_json=_json_figures(figures), plotly_js=_plotly_js())


def write_html_report(path: Any, statistics: Any = None, merged: Any = None,
                      experiments: Any = None, batch_statistics: Mapping | None = None,
                      normalised_deviations: Any = None,
                      summary: Sequence[tuple[str, str]] = (), notes: Sequence[str] = (),
                      title: str = "xtalscale report") -> str:
    """Write the self-contained HTML report and return its path.

    Parameters
    ----------
    path : str or path
    statistics : dataset_statistics or dict, optional
        Merging statistics: a ``dataset_statistics`` or a dict (see
        :func:`statistics_as_dict`; completeness in %).
    merged : xtalscale.merge.MergedData, optional
        For the Wilson plot and the cumulative intensity distribution.
    experiments : ExperimentList, optional
        Their scaling models are plotted against rotation angle.
    batch_statistics : mapping, optional
        Dataset name → ``{"batch", "r_merge", "i_over_sigma"}`` arrays.
    normalised_deviations : array_like, optional
        For the normal probability plot.
    summary : sequence of (label, value)
        Extra lines for the summary table (files, counts, resolution estimate...).
    notes : sequence of str
        Messages shown at the top (e.g. why a statistic is missing).
    title : str
    """
    path = os.fspath(path)
    text = render_html_report(statistics, merged, experiments, batch_statistics,
                              normalised_deviations, summary, notes, title)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
