/// @file ih_table.hpp
/// @brief Observations grouped by unique reflection (or any integer key), the fit layer's table.
///
/// The table is stored as group offsets plus per-observation arrays, observations sorted by
/// group ("table order"). Model blocks (one DerivativesView per dataset or model) are mapped onto
/// table rows by a per-block row map, so a model keeps its own row order and the table keeps the
/// group order. Grouping itself (ASU mapping, key sorting) lives in grouping.hpp; this header
/// only consumes its offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/derivatives_view.hpp"
#include "xtalscale/export.hpp"

namespace xtalscale::fit {

/// Observations in table order (sorted by group). Non-owning.
struct GroupedObservations {
  std::size_t n_obs = 0;                    ///< observations (table rows)
  std::size_t n_groups = 0;                 ///< groups (unique reflections, voxels, ...)
  const std::int64_t* group_offsets = nullptr;  ///< n_groups + 1 row offsets, [0] = 0, [G] = n_obs
  const double* intensities = nullptr;      ///< I, n_obs values
  const double* weights = nullptr;          ///< w >= 0, n_obs values (0 excludes a row)
};

/// One model block as the fit kernels see it: its DerivativesView and where its rows sit in the
/// table (the C++ model block of model_block.hpp supplies the view).
struct FitBlock {
  DerivativesView view;                    ///< g and dg/dp of the block (CSR)
  const std::int64_t* table_rows = nullptr;  ///< view row r -> table row; nullptr = identity
};

/// Check a table: offsets non-decreasing from 0 to n_obs, intensities finite, weights finite and
/// >= 0. Throws std::invalid_argument naming the argument and the first bad element.
XTALSCALE_EXPORT void check_grouped_observations(const GroupedObservations& table);

/// Check model blocks against a table and a parameter count: row maps in range, every table row
/// covered by exactly one block row, CSR structure valid (columns in [0, n_cols), column_offset +
/// n_cols <= n_params), scales and derivatives finite and scales > 0. Throws
/// std::invalid_argument naming the block and the row. With @p structure false only the scales
/// (finite and > 0) and column ranges are checked: for callers that already checked these same
/// index arrays (row maps, indptr, indices) on an earlier call and that check the kernel's
/// result for finiteness (a non-finite derivative makes it non-finite), re-running the full
/// check then to name the culprit.
XTALSCALE_EXPORT void check_model_blocks(const GroupedObservations& table,
                                         const std::vector<FitBlock>& blocks,
                                         std::size_t n_params, bool structure = true);

/// True for one block whose rows are the table's rows in order (no table_rows map): its scales
/// are g in table order as they stand, and its rows need no coverage check.
XTALSCALE_EXPORT bool identity_rows(const std::vector<FitBlock>& blocks) noexcept;

/// Gather the blocks' scales into table order: @p g_table[table_rows[r]] = scales[r]. The
/// blocks' rows cover each table row once (check_model_blocks), so chunks of rows go to
/// @p n_threads threads without conflict; the result does not depend on the count.
XTALSCALE_EXPORT void gather_scales(const std::vector<FitBlock>& blocks, double* g_table,
                                    int n_threads = 1);

/// Ĩ_h = Σ w g I / Σ w g² per group (0 for a group with Σ w g² = 0); optionally S_h = Σ w g².
/// @p Ih_group has n_groups values; @p S_group may be nullptr.
XTALSCALE_EXPORT void calc_Ih(const GroupedObservations& table, const double* g_table,
                              double* Ih_group, double* S_group, int n_threads = 1);

/// Ĩ of every row of a block stored in its own row order: the group of table position l is
/// the h with offsets[h] <= l < offsets[h+1], and table position l holds block row order[l].
/// Ĩ_h = Σ w g I / Σ w g² in table order (0 where Σ w g² = 0); a non-finite I counts as 0.
/// Bit for bit calc_Ih of the table-order copies, broadcast to the rows; the rows are read
/// through @p order with the next rows' values fetched ahead (the rows of a block of several
/// datasets are interleaved in group order). Every block row must appear once in @p order
/// (checked by the binding).
XTALSCALE_EXPORT void calc_Ih_rows(std::size_t n_groups, const std::int64_t* order,
                                   const std::int64_t* offsets, const double* intensity,
                                   const double* weight, const double* g, double* Ih_rows);

/// Sum @p values (table order) within each group into @p sums (n_groups).
XTALSCALE_EXPORT void sum_in_groups(const GroupedObservations& table, const double* values,
                                    double* sums);

/// Number of threads the kernels may use (1 when built without OpenMP).
XTALSCALE_EXPORT int max_threads();

}  // namespace xtalscale::fit
