/// @file components.hpp
/// @brief Kernels behind the scale components (spec §2): Gaussian-smoother weight matrices in
/// CSR form, fused exp scales and derivatives, CSR products and the SH surface.
///
/// Every kernel works on caller-owned, row-major buffers so the Python layer can hand numpy
/// arrays in and out without copies. A CSR matrix here is (indptr[n_rows+1], indices[nnz],
/// data[nnz]) with 32-bit indices and sorted column indices within each row (scipy canonical
/// form). Kernels hold no state and are safe to call concurrently on distinct outputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "xtalscale/export.hpp"

namespace xtalscale::components {

/// One axis of a Gaussian smoother (spec §3.1): coordinate z = (x - x0)/spacing is compared
/// with @p positions (length nvalues) over a window of naverage points (§3.2).
struct SmootherAxis {
  double x0 = 0.0;                     ///< start of the smoother range
  double spacing = 1.0;                ///< (x1 - x0)/num_intervals, > 0
  int nvalues = 0;                     ///< number of parameters along this axis, >= 2
  int naverage = 3;                    ///< window size, 1..5 (clipped to nvalues)
  const double* positions = nullptr;  ///< nvalues positions in normalised units
};

/// Half-open parameter window [first, last) for normalised coordinate @p z on @p axis, with
/// DIALS's rounding (half away from zero) and edge clipping (spec §3.2).
XTALSCALE_EXPORT void smoother_window(const SmootherAxis& axis, double z, int& first, int& last);

/// Validate axes (spacing > 0, nvalues >= 2, 1 <= naverage <= 5, finite positions) and the
/// coordinates (finite); throws std::invalid_argument naming @p coord_names[a] on failure.
XTALSCALE_EXPORT void validate_smoother(const SmootherAxis* axes, int n_axes, double sigma,
                                        const double* const* coords,
                                        const char* const* coord_names, std::size_t n);

/// Pass 1 of the weight matrix: writes indptr[0..n] (row starts) and returns nnz. When
/// @p drop_first is set (1-D only) column 0 is left out (first-fixed smoother, spec §3.4).
XTALSCALE_EXPORT std::size_t smoother_weights_indptr(const SmootherAxis* axes, int n_axes,
                                                     const double* const* coords, std::size_t n,
                                                     bool drop_first, std::int32_t* indptr);

/// Pass 2: normalised weights w_j/Σw (= ∂value/∂p_j) in CSR form. Columns are flat parameter
/// indices i + j·nx + k·nx·ny. With @p drop_first the normalised weight of p₀ goes to
/// @p first_col[row] (if non-null) instead of the matrix, and other columns shift down by one.
XTALSCALE_EXPORT void smoother_weights_fill(const SmootherAxis* axes, int n_axes, double sigma,
                                            const double* const* coords, std::size_t n,
                                            bool drop_first, const std::int32_t* indptr,
                                            std::int32_t* indices, double* data,
                                            double* first_col);

/// out[i] = Σ_k data[k]·p[indices[k]] over row i (+ first_col[i]·p0 if first_col is non-null).
XTALSCALE_EXPORT void csr_matvec(std::size_t n_rows, const std::int32_t* indptr,
                                 const std::int32_t* indices, const double* data,
                                 const double* p, const double* first_col, double p0,
                                 double* out);

/// scales[i] = exp(coef·factor[i]); if @p derivs is non-null, derivs[i] = scales[i]·factor[i].
/// One kernel for B factors (factor 1/(2d²)) and dose decay (x/d or x/d²).
XTALSCALE_EXPORT void exp_scales(std::size_t n, const double* factor, double coef, double* scales,
                                 double* derivs);

/// Smoothed B: value = W·p (with first_col/p0 as in csr_matvec), scales = exp(value·factor);
/// if @p d_data is non-null it receives data[k]·scales[i]·factor[i] (row-multiplied W).
XTALSCALE_EXPORT void smooth_b_scales(std::size_t n_rows, const std::int32_t* indptr,
                                      const std::int32_t* indices, const double* data,
                                      const double* p, const double* first_col, double p0,
                                      const double* factor, double* scales, double* d_data);

/// out_data[k] = data[k]·v[row(k)] (DIALS row_multiply on a CSR matrix).
XTALSCALE_EXPORT void row_multiply(std::size_t n_rows, const std::int64_t* indptr,
                                   const double* data, const double* v, double* out_data);

/// SH surface: scales[i] = 1 + Σ_k H[i,k]·coef[k] for a row-major n × n_params matrix H.
XTALSCALE_EXPORT void sh_scales(std::size_t n, std::size_t n_params, const double* harmonics,
                                const double* coef, double* scales);

/// Check that a CSR structure is well formed for a n_rows × n_cols matrix: indptr starts at 0,
/// is non-decreasing and ends at nnz, and every index is in [0, n_cols). Throws naming @p what.
XTALSCALE_EXPORT void validate_csr(std::size_t n_rows, std::size_t n_cols,
                                   const std::int64_t* indptr, const std::int64_t* indices,
                                   std::size_t nnz, const char* what);

}  // namespace xtalscale::components
