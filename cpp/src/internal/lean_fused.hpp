// Internal helper (not installed): the lean 1-D smoother's kernels for the one-pass f+g and the
// transposed product (ModelBlock::functional_and_gradient, ModelBlock::transpose_product).
//
// The public smooth_1d_apply writes the derivative rows as compact CSR (each row its window's
// columns), which a transposed product then reads back row by row with a scatter into the
// columns. Here each row's normalised weights are kept at a fixed stride instead (zero past the
// window, columns counted from the window's first value in the full parameters), so that the
// transposed product adds one short vector per row into a per-window-start accumulator, with no
// compaction on the way in and no data-dependent loop on the way out. Nothing is checked here:
// the callers (LeanSmoothTerm) checked the parameters, the window records and the factor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/smoother.hpp"

namespace xtalscale::components::fused {

/// Doubles per row of the fixed-stride weights: 4 for window bounds up to 4, else 8.
constexpr int lean_fused_stride(int max_window) noexcept { return max_window <= 4 ? 4 : 8; }

/// Scales of @p n rows (with @p factor, the smoothed-B scales exp(value·factor)) into
/// @p scales, bit for bit smooth_1d_apply's, and each row's normalised weights into
/// @p wn + i·stride (zeros past the row's window; the weight of the window's first value at
/// offset 0, column 0 included even with a fixed first parameter). @p x is read only at rows
/// whose q is NaN (points far outside the range: DIALS's direct formula).
void lean_fused_rows(const GaussianSmoother<1>& smoother, std::size_t n, const double* x,
                     const std::uint16_t* window, const double* q, const double* p,
                     const double* factor, double* scales, double* wn);

/// out[c] += Σ_i u'_i·wn[i, c + skip − first_i] for the derivative columns c (n_params − skip
/// of them; skip = 1 with a fixed first parameter), u'_i = u_i, or u_i·(scales_i·factor_i)
/// for the smoothed B: the transposed derivative matrix of lean_fused_rows's rows times @p u.
/// Rows are summed into four accumulators by row number mod 4 (no store waits on the
/// previous row's), added in a fixed order at the end: the same bits at every SIMD level.
/// @p acc is scratch, resized here.
void lean_fused_transpose(int max_window, std::size_t n, const std::uint16_t* window,
                          const double* wn, const double* u, const double* scales,
                          const double* factor, std::size_t n_params, bool first_fixed,
                          double* out, std::vector<double>& acc);

/// smooth_1d_apply without the pattern and without its checks of the factor and the
/// parameters' count (a LeanSmoothTerm checks its factor once, at construction, and its
/// parameters itself; the per-call scan of the factor cost ~1.3 ns a row): the same bits.
std::size_t smooth_1d_apply_prechecked(const GaussianSmoother<1>& smoother, std::size_t n,
                                    const double* x, double x_shift, const std::uint16_t* window,
                                    const double* q, const double* p, bool first_fixed,
                                    const double* factor, double* scales, double* data);

}  // namespace xtalscale::components::fused
