"""French–Wilson truncation: the C++ posterior against published tables, closed forms and an
independent numerical integral; the per-reflection wrapper; the prior mean estimate."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special

from xtalscale._core import merge as kernel
from xtalscale.merge import expected_intensities, french_wilson

# Published posterior moments (J/σ, σJ/σ, F/√σ, σF/√σ) at standardised intensity h: the
# French & Wilson (1978) tables as recomputed with QUADPACK to 5 decimals (CCP4 ctruncate).
ACENTRIC_TABLE = {
    -4.0: (0.22561, 0.21604, 0.42336, 0.21534),
    -2.0: (0.37322, 0.33805, 0.54857, 0.26886),
    0.0: (0.79788, 0.60281, 0.82218, 0.34915),
    1.0: (1.28760, 0.79353, 1.07043, 0.37653),
    3.0: (3.00444, 0.99331, 1.70644, 0.30416),
}
CENTRIC_TABLE = {
    -4.0: (0.11544, 0.15779, 0.27272, 0.20265),
    -2.0: (0.19742, 0.25728, 0.35988, 0.26059),
    0.0: (0.47799, 0.52108, 0.58137, 0.37417),
    2.0: (1.70427, 1.00200, 1.22766, 0.44397),
    4.0: (3.85783, 1.02396, 1.94516, 0.27234),
}


@pytest.mark.parametrize("centric,table", [(False, ACENTRIC_TABLE), (True, CENTRIC_TABLE)])
def test_posterior_moments_match_the_published_tables(centric, table):
    for h, expected in table.items():
        got = kernel.french_wilson_moments(h, centric)
        for value, published in zip(got, expected):
            # The table's 5th decimal is rounded; its acentric F at h = -4 (0.42336, σF 0.21534)
            # is 5e-5 / 1.1e-4 off the integral, which scipy's quad confirms below.
            assert value == pytest.approx(published, abs=1.2e-4 if h == -4.0 else 6e-6), (h, centric)


def _quad_moments(h: float, centric: bool) -> tuple[float, float, float, float]:
    """Posterior moments by scipy.integrate.quad over J/σ (independent of the kernel)."""
    peak = max(h, 0.0)
    shift = 0.5 * h * h if h < 0 else 0.0

    def weight(z):
        w = math.exp(shift - 0.5 * (z - h) ** 2)
        return w / math.sqrt(z) if centric else w

    lo, hi = max(0.0, peak - 12.0), peak + 12.0
    points = [peak] if lo < peak < hi else None

    def moment(f):
        return integrate.quad(lambda z: f(z) * weight(z), lo, hi, points=points,
                              epsabs=0, epsrel=1e-12, limit=200)[0]

    m0 = moment(lambda z: 1.0)
    j = moment(lambda z: z) / m0
    f = moment(math.sqrt) / m0
    return (j, math.sqrt(moment(lambda z: (z - j) ** 2) / m0), f,
            math.sqrt(moment(lambda z: (math.sqrt(z) - f) ** 2) / m0))


@pytest.mark.parametrize("h", [-3.9, -1.3, 0.4, 2.2, 5.7, 13.0, 42.0])
@pytest.mark.parametrize("centric", [False, True])
def test_posterior_moments_match_an_independent_integral(h, centric):
    got = kernel.french_wilson_moments(h, centric)
    assert got == pytest.approx(_quad_moments(h, centric), rel=2e-7, abs=1e-9)


def test_acentric_mean_is_the_truncated_normal_mean_and_centric_has_the_gamma_ratio():
    for h in (-3.0, -0.5, 0.0, 1.5, 6.0):
        mills = math.exp(-0.5 * h * h) / math.sqrt(2 * math.pi) / special.ndtr(h)
        assert kernel.french_wilson_moments(h, False)[0] == pytest.approx(h + mills, rel=1e-10)
        variance = 1.0 - h * mills - mills ** 2
        assert kernel.french_wilson_moments(h, False)[1] == pytest.approx(math.sqrt(variance),
                                                                          rel=1e-8)
    ratio = math.sqrt(2.0) * math.gamma(0.75) / math.gamma(0.25)
    assert kernel.french_wilson_moments(0.0, True)[0] == pytest.approx(ratio, rel=1e-10)


def test_strong_reflections_tend_to_the_measurement_and_stay_continuous():
    # dials switches to F = √J at h = 3 (acentric); the exact posterior is continuous there
    # and approaches √h (1 - 1/(8h²) - 15/(128h⁴)) with σF → 1/(2√h).
    for h in (3.0, 100.0, 1e4, 1e8):
        j, sig_j, f, sig_f = kernel.french_wilson_moments(h, False)
        series = math.sqrt(h) * (1 - 1 / (8 * h ** 2) - 15 / (128 * h ** 4))
        assert f == pytest.approx(series, rel=2e-3 if h < 10 else 1e-9)
        if h >= 100:
            assert (j, sig_j, sig_f) == pytest.approx((h, 1.0, 0.5 / math.sqrt(h)), rel=1e-4)
    values = [kernel.french_wilson_moments(h, False)[2] for h in np.linspace(2.9, 3.1, 21)]
    # steps of 0.01 in h change F by ~0.003 and smoothly (dials' switch jumps by 0.026 here)
    assert np.all(np.diff(values) > 0) and np.max(np.diff(values)) < 3.5e-3
    assert np.max(np.abs(np.diff(values, 2))) < 1e-5


def test_per_reflection_triples_scale_with_sigma():
    # (I, σ, ⟨Σ⟩) triples: h = I/σ - σ/Σ (acentric), I/σ - σ/(2Σ) (centric)
    intensity = np.array([10.0, -3.0, 250.0, 0.0, 4.0])
    sigma = np.array([5.0, 2.0, 12.0, 1.5, 8.0])
    prior = np.array([20.0, 6.0, 300.0, 1.0, 50.0])
    centric = np.array([0, 0, 1, 1, 0], dtype=bool)
    j, sig_j, f, sig_f, valid = kernel.french_wilson(intensity, sigma, prior,
                                                     centric.astype(np.uint8))
    assert valid.all()
    for r in range(len(intensity)):
        h = intensity[r] / sigma[r] - (0.5 if centric[r] else 1.0) * sigma[r] / prior[r]
        mj, msj, mf, msf = _quad_moments(h, bool(centric[r]))
        s = sigma[r]
        np.testing.assert_allclose([j[r], sig_j[r], f[r], sig_f[r]],
                                   [mj * s, msj * s, mf * math.sqrt(s), msf * math.sqrt(s)],
                                   rtol=1e-6)


def test_rejections_are_flagged_not_dropped():
    intensity = np.array([1.0, 1.0, -8.0, -7.0, np.nan, 5.0, 5.0])
    sigma = np.array([1.0, 0.0, 2.0, 2.0, 1.0, -1.0, 1.0])
    prior = np.array([10.0, 10.0, 10.0, 0.5, 10.0, 10.0, 0.0])
    j, _, f, _, valid = kernel.french_wilson(intensity, sigma, prior, np.zeros(7, np.uint8))
    # row 2: I/σ = -4 < -3.7; row 3: h = -3.5 - 4 < -4; row 6: ⟨Σ⟩ = 0
    assert valid.tolist() == [True, False, False, False, False, False, False]
    assert np.isnan(f[~valid]).all() and np.isnan(j[~valid]).all()


def test_kernel_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="intensity and sigma"):
        kernel.french_wilson(np.ones(3), np.ones(2), np.ones(3), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="h_min"):
        kernel.french_wilson(np.ones(1), np.ones(1), np.ones(1), np.zeros(1, np.uint8),
                             float("nan"))


def test_flat_prior_is_the_infinite_wilson_mean():
    result = french_wilson([2.0, -1.0], [1.0, 1.0], [0.1, 0.2], [False, True], flat_prior=True)
    # a flat positive prior is the acentric posterior with h = I/σ, for centric rows too
    assert result.amplitude[0] == pytest.approx(kernel.french_wilson_moments(2.0, False)[2])
    assert result.amplitude[1] == pytest.approx(kernel.french_wilson_moments(-1.0, False)[2])
    assert np.isinf(result.expected_intensity).all()


def test_expected_intensity_is_the_binned_standardised_median():
    # 100 reflections, min 20 per bin -> 5 equal-count bins; exponential data per bin with
    # known means: the median / ln 2 of each bin is its mean, interpolated between centres.
    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(0.0, 1.0, 100))
    true_mean = 50.0 + 100.0 * x
    sample = rng.exponential(true_mean, size=(2000, 100))  # many draws: average the estimates
    estimates = np.mean([expected_intensities(x, s, max_bins=60) for s in sample[:200]], axis=0)
    inner = (x > 0.15) & (x < 0.85)  # beyond the first/last bin centre the value is held
    np.testing.assert_allclose(estimates[inner], true_mean[inner], rtol=0.08)
    # exact small case: 40 points, 2 bins of 20, each bin constant -> step interpolated
    xs = np.arange(40.0)
    ys = np.where(xs < 20, 2.0, 4.0)
    out = expected_intensities(xs, ys, max_bins=60, min_bin_size=20)
    centres = np.array([(0 + 20) / 2, (20 + 39) / 2])  # edges at x[0], x[20], x[39]
    np.testing.assert_allclose(out, np.interp(xs, centres, [2 / math.log(2), 4 / math.log(2)]))


def test_wrapper_validates_lengths():
    with pytest.raises(ValueError, match="equal length"):
        french_wilson([1.0, 2.0], [1.0], [0.1, 0.2], [False, False])


def test_threads_give_the_same_bits_and_keep_every_row():
    # 10,001 rows: several 2048-row blocks and a short last one, with rejections and
    # non-finite rows among them; each row is computed alone, so any thread count agrees
    rng = np.random.default_rng(7)
    n = 10_001
    sigma = rng.uniform(0.5, 20.0, n)
    intensity = rng.normal(50.0, 40.0, n)
    intensity[::97] = np.nan
    sigma[::131] = 0.0
    x = rng.uniform(0.001, 0.3, n)
    centric = rng.random(n) < 0.2
    one = french_wilson(intensity, sigma, x, centric, n_threads=1)
    for threads in (2, 3, 16):
        many = french_wilson(intensity, sigma, x, centric, n_threads=threads)
        for name in ("intensity", "sigma_intensity", "amplitude", "sigma_amplitude", "valid"):
            np.testing.assert_array_equal(getattr(one, name), getattr(many, name))
    assert one.amplitude.shape == (n,) and not one.valid[::97].any() and not one.valid[::131].any()
    with pytest.raises(ValueError, match="n_threads"):
        kernel.french_wilson(intensity, sigma, np.ones(n), centric.astype(np.uint8), -4.0, 0)


def test_eight_row_lanes_give_the_scalar_bits():
    """With AVX-512 the kernel integrates eight rows at once, one per lane, each with the
    scalar operations in the scalar order: every output the same bits as one row at a time
    (simd level capped at 0), over h from −4 to 10⁶, centric and acentric rows mixed (so lanes
    of both kinds share a pass), flat priors, rejected rows between them and a short tail."""
    from xtalscale import _core as core

    rng = np.random.default_rng(11)
    n = 20_003
    sigma = rng.uniform(0.5, 20.0, n)
    intensity = rng.normal(50.0, 200.0, n) * rng.choice([1.0, 10.0, 1000.0, 1e5], n)
    intensity[::97] = np.nan
    sigma[::131] = 0.0
    expected = rng.uniform(0.001, 500.0, n)
    expected[::53] = np.inf
    centric = (rng.random(n) < 0.3).astype(np.uint8)
    widest = core.simd_level()
    try:
        lanes = kernel.french_wilson(intensity, sigma, expected, centric, -4.0, 2)
        core.set_simd_level(0)
        scalar = kernel.french_wilson(intensity, sigma, expected, centric, -4.0, 2)
    finally:
        core.set_simd_level(widest)
    for a, b in zip(lanes, scalar):
        np.testing.assert_array_equal(a, b)
    assert 0.5 * n < np.count_nonzero(lanes[-1]) < n
    valid = lanes[-1].astype(bool)
    h = intensity[valid] / sigma[valid]
    assert h.min() < 0 and h.max() > 1e4  # weak and very strong rows alike
