/// @file components.hpp
/// @brief Kernels behind the scale components (spec §2): CSR weight-matrix helpers, fused exp
/// scales and derivatives, CSR products and the SH surface. The smoother weights themselves come
/// from xtalscale/smoother.hpp (GaussianSmoother<D>::multi_value_weight, normalised mode).
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

/// Move column 0 of a CSR matrix out into a dense vector, in place: for each row whose first
/// stored column is 0, first_col[row] receives that entry and it is removed; every other column
/// index is decreased by one. indptr is rewritten; returns the new nnz. This turns the
/// normalised weight matrix of a first-fixed 1-D smoother into (∂s/∂p₁.., ∂s/∂p₀) so that
/// value = W'·p[1:] + first_col·p₀ while W' is the derivative matrix (spec §3.4).
XTALSCALE_EXPORT std::size_t split_first_column(std::size_t n_rows, std::int32_t* indptr,
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
