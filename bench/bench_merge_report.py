"""Benchmark of merging, French–Wilson truncation and the HTML report (prints figures only).

* French–Wilson kernel: ns per reflection on 10⁶ merged reflections (C++, one thread), and
  the same posterior integral written in numpy (the same 16-point × 4-panel Gauss–Legendre
  rule, vectorised over reflections in chunks) in the same run.
* ``merge_observations`` (IMEAN, I(±), French–Wilson on the anomalous array, F, DANO) wall
  time on the insulin MTZ (45,595 observations) and on 10⁶ simulated observations (P 21 21 21).
* ``xtalscale merge`` end to end on the insulin MTZ (read, merge, statistics, MTZ, report).
* Report generation time (``write_html_report``: statistics, 12 plots, plotly embedded).

Run: ``PYTHONPATH=python python bench/bench_merge_report.py [n_reflections]``
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import best_time

ROOT = Path(__file__).resolve().parents[1]
INSULIN = ROOT / "tests" / "data" / "mtz_insulin_dials_aimless" / \
    "insulin_dials_scaled_unmerged.mtz.gz"
CYS_EXPT = ROOT / "tests" / "data" / "dials_l_cysteine_4_sweeps_scaled" / "scaled_30.expt"


def _gauss_legendre(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def numpy_french_wilson_f(h: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """E[√z] of the acentric posterior, the kernel's integral in numpy (reference)."""
    x, w = _gauss_legendre()
    panels = 4
    out = np.empty_like(h)
    for start in range(0, len(h), chunk):
        hh = h[start:start + chunk, None]
        sqrt_h = np.sqrt(np.maximum(hh, 0.0))
        top = np.sqrt(np.where(hh < 0, hh * hh, 0.0) + 100.0)
        u_max = np.sqrt(hh + top)
        z_min = np.where(hh > 10.0, hh - 10.0, 0.0)
        u_min = np.sqrt(z_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.where(hh > 0, (z_min - hh) / (u_min + sqrt_h), 0.0)
        hi = np.where(hh > 0, top / (u_max + sqrt_h), u_max)
        offset = np.where(hh > 0, 0.0, -hh)
        peak = np.where(hh < 0, 0.5 * hh * hh, 0.0)
        t = (np.arange(panels)[:, None] + x[None, :]).ravel() / panels
        d = lo + (hi - lo) * t[None, :]
        zh = d * (2 * sqrt_h + d) + offset
        weight = np.tile(w, panels)[None, :] * np.exp(peak - 0.5 * zh * zh) * (sqrt_h + d)
        out[start:start + chunk] = (sqrt_h + (weight * d).sum(1, keepdims=True)
                                    / weight.sum(1, keepdims=True))[:, 0]
    return out


def bench_french_wilson(n: int) -> None:
    from xtalscale._core import merge as kernel

    rng = np.random.default_rng(0)
    sigma = rng.uniform(1.0, 50.0, n)
    expected = rng.uniform(100.0, 1000.0, n)
    intensity = rng.exponential(expected) + sigma * rng.standard_normal(n)
    centric = np.zeros(n, dtype=np.uint8)
    # CPU time of this thread (the kernel runs in it): steadier than wall time on a busy host
    t_cpp = best_time(lambda: kernel.french_wilson(intensity, sigma, expected, centric), 3,
                      time.thread_time)
    _, _, f, _, valid = kernel.french_wilson(intensity, sigma, expected, centric)
    h = intensity / sigma - sigma / expected
    t_np = best_time(lambda: numpy_french_wilson_f(h[valid]), 1, time.thread_time)
    f_np = numpy_french_wilson_f(h[valid]) * np.sqrt(sigma[valid])
    print(f"French-Wilson kernel, {n} reflections (CPU time): {t_cpp * 1e9 / n:.0f} ns/reflection "
          f"({t_cpp * 1e3:.0f} ms); numpy same integral {t_np * 1e9 / valid.sum():.0f} "
          f"ns/reflection; ratio numpy/C++ {t_np / t_cpp * n / valid.sum():.1f}x "
          f"(max |ΔF|/F {np.max(np.abs(f_np / f[valid] - 1)):.1e})")


def bench_merge(n: int) -> None:
    from xtalscale.merge import (
        ScaledObservations,
        merge_observations,
        observations_from_mtz,
    )
    from xtalscale.symmetry import SpaceGroup, UnitCell

    obs = observations_from_mtz(INSULIN)
    t = best_time(lambda: merge_observations(obs), 3)
    print(f"merge_observations, insulin ({len(obs)} observations): {t * 1e3:.0f} ms "
          f"({t * 1e9 / len(obs):.0f} ns/observation)")
    rng = np.random.default_rng(1)
    hkl = rng.integers(-40, 41, size=(n, 3)).astype(np.int32)
    hkl[np.all(hkl == 0, axis=1)] = (1, 1, 1)
    cell = UnitCell((60, 70, 80, 90, 90, 90))
    s = cell.d_star_sq(hkl)
    intensity = rng.exponential(1000 * np.exp(-10 * s))
    variance = intensity + 25.0
    big = ScaledObservations(hkl, intensity, variance, np.zeros(n, int), np.zeros(n, int),
                             SpaceGroup("P 21 21 21"), cell, 1.0, "simulated", n)
    t = best_time(lambda: merge_observations(big), 1)
    merged = merge_observations(big)
    print(f"merge_observations, {n} simulated observations -> {len(merged)} unique: "
          f"{t:.2f} s ({t * 1e9 / n:.0f} ns/observation)")


def bench_cli_and_report() -> None:
    from xtalscale import merging_statistics as ms
    from xtalscale.cli import main
    from xtalscale.experiments import ExperimentList
    from xtalscale.merge import merge_observations, observations_from_mtz
    from xtalscale.report import write_html_report

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                main(["merge", str(INSULIN), f"output.mtz={tmp}/m.mtz",
                      f"output.html={tmp}/r.html", f"output.json={tmp}/s.json"])
            finally:
                sys.stdout = stdout
        print(f"xtalscale merge, insulin MTZ end to end: {time.perf_counter() - start:.2f} s")
        obs = observations_from_mtz(INSULIN)
        sigma = np.sqrt(obs.variance)
        stats = ms.dataset_statistics.from_arrays(obs.miller_index, obs.intensity, sigma,
                                                  obs.space_group, obs.unit_cell)
        merged = merge_observations(obs)
        deviations = ms.normalised_deviations(obs.miller_index, obs.intensity, sigma,
                                              obs.space_group)
        experiments = ExperimentList.from_file(str(CYS_EXPT))
        t = best_time(lambda: write_html_report(
            f"{tmp}/full.html", statistics=stats, merged=merged, experiments=experiments,
            normalised_deviations=deviations), 3)
        size = os.path.getsize(f"{tmp}/full.html")
        print(f"write_html_report (table, 11 plots incl. model curves): {t * 1e3:.0f} ms, "
              f"{size / 1e6:.1f} MB (plotly.js {size / 1e6 - 0.1:.1f} MB of it)")


if __name__ == "__main__":
    n_refl = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    bench_french_wilson(n_refl)
    bench_merge(n_refl)
    bench_cli_and_report()
