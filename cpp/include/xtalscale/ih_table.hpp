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

/// One dataset's rows of an Ih-table block, as build_block reads them (non-owning). The
/// dataset has n_selected "selected" rows; the block holds n_rows of them, @p rows.
struct BlockSource {
  std::size_t n_rows = 0;                     ///< the dataset's rows in the block
  const std::int64_t* rows = nullptr;         ///< n_rows selected rows, in group order
  std::size_t n_selected = 0;                 ///< selected rows (rows lie in [0, n_selected))
  /// groups_per_row: the group number of each block row (n_rows values, read in order); else
  /// of each selected row (n_selected values). build_block's group_map maps them to the block's.
  const std::int64_t* groups = nullptr;
  bool groups_per_row = false;
  const std::int64_t* column_rows = nullptr;  ///< n_selected rows of the columns; nullptr = identity
  std::size_t n_column_rows = 0;              ///< rows of each column
  const std::int64_t* loc_indices = nullptr;  ///< n_selected values; nullptr = the column row
  /// float64 columns of n_column_rows values: [0] intensity, [1] variance,
  /// [2] inverse scale factor, then any extras
  std::vector<const double*> columns;
};

/// The arrays of one block (caller-allocated; n = the sources' rows, G = n_groups).
struct BlockArrays {
  std::vector<double*> columns;              ///< n values each, as BlockSource::columns
  std::int64_t* loc_indices = nullptr;       ///< n
  std::vector<std::int64_t*> selections;     ///< per source its n_rows loc indices (or nullptr)
  std::int64_t* dataset_id = nullptr;        ///< n: the source of every row
  std::int64_t* group_ids = nullptr;         ///< n: block group of every row
  double* weights = nullptr;                 ///< n: 1/σ² (0 for an excluded row)
  std::uint8_t* exclusion = nullptr;         ///< n: 0, 1 (σ² not finite and > 0), 2 (I not finite)
  std::int64_t* order = nullptr;             ///< n: rows stably sorted by group (table order)
  std::int64_t* offsets = nullptr;           ///< G + 1: start of each group in order
  std::int64_t* table_rows = nullptr;        ///< n: inverse of order
  double* Ih = nullptr;                      ///< n: Ĩ of every row (calc_Ih_rows)
};

/// Fill one Ih-table block from its datasets' rows, source after source: gather the columns
/// (column[column_rows[r]]) and the loc indices, the dataset and group of every row, the weights
/// and exclusion codes, the stable group order, and Ĩ (calc_Ih_rows, g = the inverse scale
/// factors). Two passes over the rows plus Ĩ's. @p group_map (n_map values) maps the sources'
/// group numbers to the block's [0, n_groups); nullptr = identity.
/// @throws std::invalid_argument naming the source and row of the first row, column row, group
/// out of range, or a non-finite weight or inverse scale factor (outputs are then partial).
XTALSCALE_EXPORT void build_block(const std::vector<BlockSource>& sources, const std::int64_t* group_map,
                                  std::size_t n_map, std::size_t n_groups, const BlockArrays& out);

/// Sum @p values (table order) within each group into @p sums (n_groups).
XTALSCALE_EXPORT void sum_in_groups(const GroupedObservations& table, const double* values,
                                    double* sums);

/// Number of threads the kernels may use (1 when built without OpenMP).
XTALSCALE_EXPORT int max_threads();

}  // namespace xtalscale::fit
