/// @file distributions.hpp
/// @brief The standard normal quantile and cumulative distribution and Student's t quantile:
/// what the error model (normal probability plots), the merging statistics (CC½
/// significance) and the report need, without importing scipy.special (~30 ms at start-up)
/// for three functions.
#pragma once

#include <cstddef>

#include "xtalscale/export.hpp"

namespace xtalscale::special {

/// Φ⁻¹(p), the standard normal quantile (scipy's `ndtri`): −∞ at p = 0, +∞ at p = 1, NaN
/// outside [0, 1] or for NaN. Start from Acklam's rational approximation (relative error
/// < 1.2e-9), then one Halley step on Φ(x) − p, with the residual formed where it keeps its relative
/// precision (0.5·erf(x/√2) − (p − ½) in the centre, 0.5·erfc(∓x/√2) − min(p, 1 − p) in the
/// tails): within a few ulp of the exact quantile across (0, 1).
XTALSCALE_EXPORT double normal_quantile(double p) noexcept;

/// normal_quantile() of @p n values.
XTALSCALE_EXPORT void normal_quantile(std::size_t n, const double* p, double* out) noexcept;

/// Φ(x) = ½·erfc(−x/√2), the standard normal cumulative distribution, for @p n values.
XTALSCALE_EXPORT void normal_cdf(std::size_t n, const double* x, double* out) noexcept;

/// erf(x) for @p n values (the C library's, as Python's math.erf).
XTALSCALE_EXPORT void erf(std::size_t n, const double* x, double* out) noexcept;

/// Student's t quantile (scipy's `stdtrit(df, p)`): t with P(T <= t) = p for @p df > 0
/// degrees of freedom; ±∞ at p = 1 / 0, NaN for df <= 0, p outside [0, 1] or NaN. Exact forms
/// for df = 1 and 2; otherwise Newton's method on the upper tail ½·I_x(df/2, ½),
/// x = df/(df + t²) (regularised incomplete beta by its continued fraction), from the
/// Cornish–Fisher expansion: ~1e-13 relative (the log-gamma prefactor limits it for large df).
XTALSCALE_EXPORT double student_t_quantile(double df, double p) noexcept;

/// The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1 (NaN
/// otherwise).
XTALSCALE_EXPORT double incomplete_beta(double a, double b, double x) noexcept;

}  // namespace xtalscale::special
