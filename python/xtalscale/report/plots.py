"""Plot descriptions for the HTML report: plotly figure dicts from plain arrays and dicts.

Every function returns ``{"data": [...], "layout": {...}}`` (plotly's JSON figure format) built
from numpy arrays, lists or dicts, so the report can be made from any source of numbers
(the merging statistics, a scaling job, a test). Functions return ``None`` when there is
nothing to plot, and the report leaves that plot out with a note saying why.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "batch_plots",
    "cumulative_intensity_distribution",
    "normal_probability_plot",
    "resolution_plots",
    "scaling_model_plots",
    "wilson_plot",
]


def _finite_list(values) -> list:
    """JSON-safe list: NaN/inf become None (plotly draws a gap)."""
    a = np.asarray(values, dtype=np.float64)
    return [float(v) if math.isfinite(v) else None for v in a.tolist()]


def _resolution_axis(d_star_sq: np.ndarray, n_ticks: int = 6) -> dict:
    """An x axis in 1/d² with tick labels in d (Å), as dials' reports draw it."""
    lo, hi = float(np.nanmin(d_star_sq)), float(np.nanmax(d_star_sq))
    ticks = np.linspace(lo, hi, n_ticks)
    labels = [f"{1.0 / math.sqrt(t):.2f}" if t > 0 else "∞" for t in ticks]
    return {"title": {"text": "Resolution (Å)"}, "tickvals": _finite_list(ticks),
            "ticktext": labels}


def _figure(traces: list, title: str, xaxis: dict, yaxis: dict, **layout: Any) -> dict:
    # title at the left: plotly's mode bar sits at the top right
    return {"data": traces, "layout": {"title": {"text": title, "x": 0.02, "xanchor": "left"},
                                       "xaxis": xaxis,
                                       "yaxis": yaxis, "margin": {"t": 60, "b": 110},
                                       "legend": {"orientation": "h", "y": -0.3},
                                       **layout}}


def _shell_centres(bins: Sequence[Mapping]) -> np.ndarray:
    d_max = np.array([b["d_max"] for b in bins], dtype=np.float64)
    d_min = np.array([b["d_min"] for b in bins], dtype=np.float64)
    with np.errstate(divide="ignore"):
        inv_max = np.where(np.isfinite(d_max) & (d_max > 0), 1.0 / d_max ** 2, 0.0)
    return 0.5 * (inv_max + 1.0 / d_min ** 2)


def resolution_plots(bins: Sequence[Mapping]) -> dict:
    """CC½ (and CCano), ⟨I/σ⟩, completeness and multiplicity against resolution.

    Parameters
    ----------
    bins : sequence of dicts
        One per shell with iotbx names: ``d_max``, ``d_min`` and any of ``cc_one_half``,
        ``cc_anom``, ``i_over_sigma_mean``, ``completeness`` (%),
        ``mean_redundancy``.

    Returns
    -------
    dict
        Plot name → figure (only for quantities present).
    """
    if not bins:
        return {}
    x = _shell_centres(bins)
    axis = _resolution_axis(x)

    def series(name):
        if not all(name in b and b[name] is not None for b in bins):
            return None
        return np.array([b[name] for b in bins], dtype=np.float64)

    plots = {}
    cc, cc_anom = series("cc_one_half"), series("cc_anom")
    if cc is not None:
        traces = [{"x": _finite_list(x), "y": _finite_list(cc), "type": "scatter",
                   "mode": "lines+markers", "name": "CC½"}]
        if cc_anom is not None:
            traces.append({"x": _finite_list(x), "y": _finite_list(cc_anom), "type": "scatter",
                           "mode": "lines+markers", "name": "CCano"})
        lowest = min(float(np.nanmin(cc)), float(np.nanmin(cc_anom)) if cc_anom is not None
                     else 0.0, -0.1)
        plots["cc_one_half"] = _figure(traces, "CC½ against resolution", axis,
                                       {"title": {"text": "CC"}, "range": [lowest - 0.05, 1.05]})
    for key, title, label in (("i_over_sigma_mean", "⟨I/σ(I)⟩ against resolution", "⟨I/σ⟩"),
                              ("completeness", "Completeness against resolution",
                               "Completeness (%)"),
                              ("mean_redundancy", "Multiplicity against resolution",
                               "Multiplicity")):
        y = series(key)
        if y is None:
            continue
        plots[key] = _figure([{"x": _finite_list(x), "y": _finite_list(y), "type": "scatter",
                               "mode": "lines+markers", "name": label}], title, axis,
                             {"title": {"text": label}, "rangemode": "tozero"})
    return plots


def batch_plots(per_dataset: Mapping[str, Mapping[str, Any]]) -> dict:
    """Rmerge and ⟨I/σ⟩ against batch (image), one trace per dataset.

    Parameters
    ----------
    per_dataset : mapping
        Dataset name → ``{"batch": [...], "r_merge": [...], "i_over_sigma": [...]}``
        (either quantity may be missing).
    """
    plots = {}
    for key, title, label in (("r_merge", "Rmerge against batch", "Rmerge"),
                              ("i_over_sigma", "⟨I/σ(I)⟩ against batch", "⟨I/σ⟩")):
        traces = []
        for name, values in per_dataset.items():
            if key in values and len(values["batch"]):
                traces.append({"x": _finite_list(values["batch"]),
                               "y": _finite_list(values[key]), "type": "scatter",
                               "mode": "lines", "name": str(name)})
        if traces:
            plots[key] = _figure(traces, title, {"title": {"text": "Batch"}},
                                 {"title": {"text": label}, "rangemode": "tozero"})
    return plots


def normal_probability_plot(deviations, max_points: int = 5000, seed: int = 0) -> dict | None:
    """Normal probability plot: sorted normalised deviations against normal quantiles.

    A random subset of ``max_points`` (seeded, so the report is reproducible) keeps the file
    small; the quantiles use Blom's plotting positions (i - 3/8)/(n + 1/4).
    """
    from .._core.stats import normal_quantile

    delta = np.asarray(deviations, dtype=np.float64)
    delta = delta[np.isfinite(delta)]
    if delta.size < 2:
        return None
    if delta.size > max_points:
        delta = np.random.default_rng(seed).choice(delta, max_points, replace=False)
    y = np.sort(delta)
    n = y.size
    x = normal_quantile((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    lim = float(max(abs(x[0]), abs(x[-1])))
    return _figure(
        [{"x": _finite_list(x), "y": _finite_list(y), "type": "scatter", "mode": "markers",
          "marker": {"size": 3}, "name": "δ"},
         {"x": [-lim, lim], "y": [-lim, lim], "type": "scatter", "mode": "lines",
          "name": "y = x", "line": {"dash": "dash"}}],
        "Normal probability plot of normalised deviations",
        {"title": {"text": "Expected normal order statistic"}},
        {"title": {"text": "Normalised deviation δ"}})


def _binned_means(x: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of y in n_bins equal-count bins of x (sorted)."""
    order = np.argsort(x, kind="stable")
    edges = np.linspace(0, x.size, n_bins + 1).astype(int)
    xs = np.add.reduceat(x[order], edges[:-1]) / np.diff(edges)
    ys = np.add.reduceat(y[order], edges[:-1]) / np.diff(edges)
    return xs, ys


def wilson_plot(d_star_sq, intensities, n_bins: int = 20) -> dict | None:
    """ln⟨I⟩ against 1/d² in equal-count shells of merged intensities, with a straight-line
    fit (slope -B/2) over d < 4.5 Å when there are enough shells."""
    s = np.asarray(d_star_sq, dtype=np.float64)
    intensity = np.asarray(intensities, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(intensity)
    s, intensity = s[ok], intensity[ok]
    n_bins = min(n_bins, s.size // 10)
    if n_bins < 2:
        return None
    xs, means = _binned_means(s, intensity, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_mean = np.where(means > 0, np.log(means), np.nan)
    traces = [{"x": _finite_list(xs), "y": _finite_list(log_mean), "type": "scatter",
               "mode": "lines+markers", "name": "ln⟨I⟩"}]
    title = "Wilson plot"
    fit = np.isfinite(log_mean) & (xs > 1.0 / 4.5 ** 2)
    if fit.sum() >= 3:
        slope, intercept = np.polyfit(xs[fit], log_mean[fit], 1)
        traces.append({"x": _finite_list(xs[fit]), "y": _finite_list(intercept + slope * xs[fit]),
                       "type": "scatter", "mode": "lines", "line": {"dash": "dash"},
                       "name": f"fit, B = {-2.0 * slope:.1f} Å²"})
        title = f"Wilson plot (B = {-2.0 * slope:.1f} Å² from d < 4.5 Å)"
    return _figure(traces, title, _resolution_axis(xs), {"title": {"text": "ln⟨I⟩"}})


def cumulative_intensity_distribution(d_star_sq, intensities, centric,
                                      n_bins: int = 20) -> dict | None:
    """N(z), the fraction of normalised intensities z = I/⟨I⟩(shell) below z, for acentric
    and centric reflections, with Wilson's 1 - e^(-z) and erf(√(z/2))."""
    from .._core.stats import erf

    s = np.asarray(d_star_sq, dtype=np.float64)
    intensity = np.asarray(intensities, dtype=np.float64)
    c = np.asarray(centric, dtype=bool)
    ok = np.isfinite(s) & np.isfinite(intensity)
    s, intensity, c = s[ok], intensity[ok], c[ok]
    n_bins = min(n_bins, s.size // 20)
    if n_bins < 1:
        return None
    order = np.argsort(s, kind="stable")
    shell = np.empty(s.size, dtype=np.int64)
    shell[order] = np.minimum(np.arange(s.size) * n_bins // s.size, n_bins - 1)
    mean = np.bincount(shell, weights=intensity, minlength=n_bins) / np.bincount(shell,
                                                                                minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = intensity / mean[shell]
    grid = np.linspace(0.0, 1.0, 21)
    traces = []
    for label, mask in (("acentric (observed)", ~c), ("centric (observed)", c)):
        if mask.sum() >= 10:
            zs = np.sort(z[mask & np.isfinite(z)])
            traces.append({"x": _finite_list(grid),
                           "y": _finite_list(np.searchsorted(zs, grid, side="right") / zs.size),
                           "type": "scatter", "mode": "lines+markers", "name": label})
    traces.append({"x": _finite_list(grid), "y": _finite_list(1.0 - np.exp(-grid)),
                   "type": "scatter", "mode": "lines", "line": {"dash": "dot"},
                   "name": "acentric theory"})
    if c.any():
        traces.append({"x": _finite_list(grid), "y": _finite_list(erf(np.sqrt(grid / 2.0))),
                       "type": "scatter", "mode": "lines", "line": {"dash": "dot"},
                       "name": "centric theory"})
    return _figure(traces, "Cumulative intensity distribution", {"title": {"text": "z"}},
                   {"title": {"text": "N(z)"}, "range": [0, 1]})


def scaling_model_plots(experiments, n_points: int = 200) -> dict:
    """The scaling model's components against rotation angle, per experiment with a model.

    Physical model: the scale term and the relative B (decay) against φ, and the absorption
    correction as a map over crystal-frame directions (for a reflection whose incident and
    diffracted beams both lie along the direction). Other models: the scale and decay terms
    when they are smoothers over the rotation. Experiments without a model are skipped.
    """
    from .model_curves import model_component_curves

    scale_traces, decay_traces, maps = [], [], {}
    for index, experiment in enumerate(experiments):
        curves = model_component_curves(experiment, n_points=n_points)
        if curves is None:
            continue
        name = f"experiment {index}"
        if "scale" in curves:
            phi, value = curves["scale"]
            scale_traces.append({"x": _finite_list(phi), "y": _finite_list(value),
                                 "type": "scatter", "mode": "lines", "name": name})
        if "decay" in curves:
            phi, value = curves["decay"]
            decay_traces.append({"x": _finite_list(phi), "y": _finite_list(value),
                                 "type": "scatter", "mode": "lines", "name": name})
        if "absorption" in curves:
            theta, azimuth, surface = curves["absorption"]
            maps[f"absorption_{index}"] = _figure(
                [{"x": _finite_list(azimuth), "y": _finite_list(theta),
                  "z": [_finite_list(row) for row in surface], "type": "heatmap",
                  "colorscale": "Viridis", "colorbar": {"title": {"text": "correction"}}}],
                f"Absorption correction, {name}",
                {"title": {"text": "azimuth φ (°)"}}, {"title": {"text": "polar angle θ (°)"}})
    plots = {}
    phi_axis = {"title": {"text": "Rotation angle (°)"}}
    if scale_traces:
        plots["model_scale"] = _figure(scale_traces, "Scale term against rotation angle",
                                       phi_axis, {"title": {"text": "scale"}})
    if decay_traces:
        plots["model_decay"] = _figure(decay_traces, "Relative B against rotation angle",
                                       phi_axis, {"title": {"text": "B (Å²)"}})
    plots.update(maps)
    return plots
