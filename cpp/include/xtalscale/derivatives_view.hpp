/// @file derivatives_view.hpp
/// @brief The contract between a scaling model and the fit layer (target, normal equations).
///
/// A model block (one dataset's observations after selection, in the Ih table's row order)
/// hands the fit layer its inverse scale factors g and the derivatives ∂g/∂p as a CSR matrix:
/// one row per observation, one column per *active* parameter of that model. The fit layer
/// never sees components, smoothers or Python objects, only this view. Several blocks (datasets,
/// threads, MPI ranks) each give their own view; `column_offset` places a block's parameters in
/// the global parameter vector, so shared components are expressed by blocks whose columns overlap.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xtalscale {

/// A non-owning view of one model block's scales and derivatives (row-major CSR, scipy's
/// canonical form: 64-bit row offsets, 32-bit column indices sorted within each row).
struct DerivativesView {
  std::size_t n_rows = 0;            ///< observations in the block
  std::size_t n_cols = 0;            ///< active parameters of the block's model
  std::size_t column_offset = 0;     ///< first global parameter index of column 0
  const double* scales = nullptr;    ///< g, n_rows values (must be finite and > 0 to be used)
  const std::int64_t* indptr = nullptr;   ///< n_rows + 1 row offsets into indices/values
  const std::int32_t* indices = nullptr;  ///< column of each stored derivative, in [0, n_cols)
  const double* values = nullptr;         ///< ∂g_i/∂p_j for each stored entry
  std::uint64_t version = 0;  ///< bumped by the owner whenever the sparsity pattern changes

  /// Number of stored derivative entries.
  std::size_t nnz() const { return indptr ? static_cast<std::size_t>(indptr[n_rows]) : 0; }
};

}  // namespace xtalscale
