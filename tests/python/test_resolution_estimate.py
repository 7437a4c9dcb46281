"""Resolution estimates (xtalscale.stats.resolution), as dials.estimate_resolution."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from xtalscale.stats import MergingStatistics, estimate_resolution
from xtalscale.stats.resolution import (
    _tanh_fit,
    interpolate_crossing,
    quasi_normalised_e_squared,
    tanh_cc_half,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GAMMA = DATA / "mtz_gamma_aimless" / "HKLOUT_unmerged.mtz.gz"


def test_interpolation_takes_the_first_crossing_from_the_start():
    x = np.array([4.0, 3.0, 2.0, 1.0])
    y = np.array([0.1, 0.5, 0.2, 0.9])
    assert interpolate_crossing(x, y, 0.3) == pytest.approx(3.5)
    with pytest.raises(RuntimeError):
        interpolate_crossing(x, y, 2.0)


def test_tanh_fit_recovers_a_known_curve():
    x = np.linspace(0.05, 0.6, 200)[::-1]
    r, s0 = 0.05, 0.3
    y = tanh_cc_half(x, r, s0)
    fit = _tanh_fit(x, y, np.full(200, 100.0))
    np.testing.assert_allclose(fit, y, atol=1e-6)
    crossing = interpolate_crossing(x, fit, 0.3)
    assert crossing == pytest.approx(s0 + r * math.atanh(0.4), rel=2e-3)


def test_cc_half_estimate_on_simulated_falloff():
    """Intensities fall off as exp(-B d*²/2) at constant noise: the true CC½ of a shell is
    var(I)/(var(I) + 2σ²/m) for m observations split in halves; the estimate must land
    near the d where that equals 0.3."""
    rng = np.random.default_rng(11)
    cell = (40.0, 40.0, 40.0, 90, 90, 90)
    hkl = np.array([[h, k, l] for h in range(25) for k in range(25) for l in range(1, 25)])
    dss = (hkl ** 2).sum(axis=1) / 40.0 ** 2
    sel = dss < 1 / 1.7 ** 2
    hkl, dss = hkl[sel], dss[sel]
    B, A, sigma, m = 50.0, 1e4, 60.0, 6
    truth = rng.exponential(1.0, len(hkl)) * A * np.exp(-B * dss / 2)
    rows = np.repeat(np.arange(len(hkl)), m)
    obs = truth[rows] + rng.normal(0, sigma, len(rows))
    stats = MergingStatistics.from_arrays(hkl[rows], obs, np.full(len(rows), sigma), "P 1",
                                          cell)
    est = estimate_resolution(stats, emax=None)
    # exponential intensities: var = mean²; CC½ = mean²/(mean² + 2σ²/m) = 0.3
    mean_at = math.sqrt(0.3 / 0.7 * 2 * sigma ** 2 / m)
    d_true = 1 / math.sqrt(2 / B * math.log(A / mean_at))
    assert est.d_min == pytest.approx(d_true, rel=0.06)
    assert "cc_half_significance_level" in est.results
    assert est.results["cc_half"].y_fit is not None
    assert "Resolution cc_half" in est.summary()


def test_gamma_estimates_reach_the_edge_and_report_failures():
    stats = MergingStatistics.from_mtz(GAMMA)
    est = estimate_resolution(stats, isigma=0.25, misigma=1.0, completeness=0.9)
    assert len(est.statistics.bins) == 50
    assert est.n_wilson_outliers >= 0
    # CC½ never drops to 0.3 in these data: the estimate is the highest resolution
    assert est.d_min == pytest.approx(stats.overall.d_min, rel=1e-3)
    assert est.results["isigma"].d_min == pytest.approx(stats.overall.d_min, rel=1e-3)
    assert est.results["completeness"].d_min is not None
    d = est.as_dict()
    assert set(d) >= {"cc_half", "isigma", "misigma", "completeness"}


def test_quasi_normalisation_has_unit_mean_per_shell():
    rng = np.random.default_rng(2)
    hkl = rng.integers(-15, 16, (5000, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    inten = rng.exponential(50.0, len(hkl))
    e2 = quasi_normalised_e_squared(hkl, inten, "P 1", (30, 30, 30, 90, 90, 90))
    assert np.mean(e2) == pytest.approx(1.0, rel=0.02)
