"""The Moré–Thuente line search of the L-BFGS engine (xtalscale.fit.line_search)."""
import math

import pytest

from xtalscale.fit.line_search import more_thuente


def _strong_wolfe(result, f0, slope0, ftol, gtol):
    return result.f <= f0 + ftol * result.alpha * slope0 and abs(result.slope) <= gtol * abs(slope0)


@pytest.mark.parametrize("alpha0, evaluations, alpha, slope", [
    (1e-3, 6, 1.4, -9.2e-3), (1e-1, 3, 1.4, 4.7e-3), (1e1, 1, 10.0, 9.4e-3), (1e3, 4, 37.0, 7.3e-4)])
def test_more_thuente_paper_function_1(alpha0, evaluations, alpha, slope):
    # Moré & Thuente (1994), function (5.1): φ(α) = −α/(α² + β), β = 2, ftol 1e-3, gtol 0.1,
    # and the paper's Table 1 (evaluations, final α and φ'(α), to the digits it prints).
    beta = 2.0

    def phi(a):
        return -a / (a * a + beta), (a * a - beta) / (a * a + beta) ** 2

    f0, slope0 = phi(0.0)
    result = more_thuente(phi, f0, slope0, alpha0, ftol=1e-3, gtol=0.1)
    assert result.converged
    assert _strong_wolfe(result, f0, slope0, 1e-3, 0.1)
    assert result.evaluations == evaluations
    assert result.alpha == pytest.approx(alpha, abs=0.05 if alpha < 10 else 0.5)
    assert result.slope == pytest.approx(slope, rel=0.06)


def test_quadratic_is_solved_by_interpolation():
    phi = lambda a: ((a - 2.0) ** 2, 2.0 * (a - 2.0))
    result = more_thuente(phi, 4.0, -4.0, 1.0, gtol=1e-3)
    assert result.converged
    assert result.alpha == pytest.approx(2.0, rel=1e-6)


def test_non_finite_steps_are_shortened_not_interpolated():
    # the minimum (at 3) lies beyond α = 1.5, where the "scales" overflow
    def phi(a):
        return None if a > 1.5 else ((a - 3.0) ** 2, 2.0 * (a - 3.0))

    result = more_thuente(phi, 9.0, -6.0, 10.0)
    assert 0.0 < result.alpha <= 1.5
    assert result.f < 9.0 and math.isfinite(result.f)


def test_rejects_an_ascent_direction():
    with pytest.raises(ValueError, match="descent"):
        more_thuente(lambda a: (a, 1.0), 0.0, 1.0)
