/// @file normal_distribution.hpp
/// @brief The standard normal distribution's quantile and cumulative functions, vectorised over
/// arrays: what the error model (normal probability plots) and the report need, without
/// importing scipy.special (~30 ms at start-up) for two functions.
#pragma once

#include <cstddef>

#include "xtalscale/export.hpp"

namespace xtalscale::special {

/// Φ⁻¹(p), the standard normal quantile (scipy's `ndtri`): −∞ at p = 0, +∞ at p = 1, NaN
/// outside [0, 1] or for NaN. Start from Abramowitz & Stegun 26.2.23 (|error| < 4.5e-4), then
/// three Halley steps on Φ(x) − p, with the residual formed where it keeps its relative
/// precision (0.5·erf(x/√2) − (p − ½) in the centre, 0.5·erfc(∓x/√2) − min(p, 1 − p) in the
/// tails): within a few ulp of the exact quantile across (0, 1).
XTALSCALE_EXPORT double normal_quantile(double p) noexcept;

/// normal_quantile() of @p n values.
XTALSCALE_EXPORT void normal_quantile(std::size_t n, const double* p, double* out) noexcept;

/// Φ(x) = ½·erfc(−x/√2), the standard normal cumulative distribution, for @p n values.
XTALSCALE_EXPORT void normal_cdf(std::size_t n, const double* x, double* out) noexcept;

/// erf(x) for @p n values (the C library's, as Python's math.erf).
XTALSCALE_EXPORT void erf(std::size_t n, const double* x, double* out) noexcept;

}  // namespace xtalscale::special
