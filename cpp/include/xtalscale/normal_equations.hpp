/// @file normal_equations.hpp
/// @brief Gauss–Newton normal equations of the scaling target with Ĩ eliminated, no Jacobian.
///
/// With a_l = ∂g_l/∂p, S_h = Σ_{l∈h} w g², b_h = Σ_{l∈h} w g Ĩ a_l and e_h = Σ_{l∈h} w r a_l:
///   - joint (p, Ĩ) Gauss–Newton with Ĩ eliminated (Schur complement; equal to Kaufman's variable
///     projection):          N = Σ_l w Ĩ² a_l a_lᵀ − Σ_h b_h b_hᵀ / S_h
///   - DIALS's Jacobian (Golub–Pereyra, J_l = −Ĩ a_l − g_l ∂Ĩ_h/∂p) gives   N + Σ_h e_h e_hᵀ / S_h
///   - right-hand side (both):  rhs = −Jᵀ W r = Σ_l w r Ĩ a_l   (Σ_{l∈h} w g r = 0 at the LS Ĩ)
///   - fixed Ĩ:                 N = Σ_l w Ĩ² a_l a_lᵀ
/// Cost O(N k²) + O(G u²) (u = parameters touched by a group), against O(N u²) for JᵀWJ.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/export.hpp"
#include "xtalscale/ih_table.hpp"
#include "xtalscale/model_block.hpp"

namespace xtalscale::fit {

/// Which normal matrix to build.
enum class NormalMatrixKind : int {
  schur = 0,  ///< Ĩ eliminated (Kaufman); the matrix of a joint (p, Ĩ) Gauss–Newton step
  dials = 1,  ///< JᵀWJ of DIALS's full Jacobian (adds Σ e eᵀ/S), for parity
};

/// Result scalars of a normal-equations build.
struct NormalEquationsSummary {
  double r_sq = 0.0;          ///< Σ w r²
  std::size_t n_equations = 0;  ///< table rows (every row counts, as DIALS's add_equations)
  /// model_normal_equations only: false when some evaluated g was not finite and > 0 (the
  /// matrix and rhs are then meaningless; the caller rejects the point)
  bool scales_usable = true;
};

/// Build the dense normal matrix (n_params x n_params, row-major, both triangles written) into
/// @p matrix and the right-hand side −JᵀWr into @p rhs. @p fixed_Ih (table order) switches to
/// the fixed-Ĩ target. The groups are cut into contiguous parts fixed by the data alone; each
/// part is summed into a thread-private matrix and the parts are added in part order, so every
/// element is summed in the same order for any @p n_threads: results are bit-identical.
/// @p accumulate: add this table's terms to @p matrix and @p rhs instead of overwriting them,
/// the matrix's terms unfolded (in either triangle): for a table in blocks, call once per block
/// into one matrix, then fold_normal_matrix once (no per-block matrix is made and added).
XTALSCALE_EXPORT NormalEquationsSummary normal_equations(
    const GroupedObservations& table, const std::vector<FitBlock>& blocks,
    std::size_t n_params, double* matrix, double* rhs,
    NormalMatrixKind kind = NormalMatrixKind::schur, const double* fixed_Ih = nullptr,
    int n_threads = 1, bool accumulate = false);

/// One model block's rows in a table, for model_normal_equations and
/// model_functional_and_gradient: the block's rows
/// [first_row, first_row + n_rows), evaluated at @p params, are the table rows @p table_rows.
struct TableModel {
  const ModelBlock* block = nullptr;  ///< needs evaluates_rows()
  const double* params = nullptr;     ///< block->n_params() values
  std::size_t n_params = 0;           ///< length of params
  std::size_t first_row = 0;          ///< first block row used
  std::size_t n_rows = 0;             ///< block rows used
  std::size_t column_offset = 0;      ///< global parameter of the block's column 0
  /// table row of each used row (n_rows values), strictly ascending: the model's rows are in
  /// group order, so that the rows of a run of groups are consecutive rows of the model
  const std::int64_t* table_rows = nullptr;
};

/// normal_equations of a table whose rows come from C++ model blocks, without forming any
/// block's ∂g/∂p: the groups are cut into the parts normal_equations uses, each part into
/// chunks of whole groups of about 1024 rows; per chunk each model's rows are evaluated into
/// per-thread scratch (ModelBlock::evaluate_rows) and the chunk's terms added at once, while
/// the derivatives are in cache. A part's terms are summed exactly as normal_equations sums
/// them (the chunks only split its group loop), so the result is the same bits for any
/// @p n_threads and the same bits as normal_equations on the blocks' evaluate() output.
/// Writes g of every table row into @p g_table (n_obs values) and, with Ĩ eliminated, each
/// row's least-squares Ĩ into @p Ih_table (optional, n_obs values). The models' rows must
/// cover each table row once (checked by the caller, as are the parameter counts, row ranges
/// and columns). summary.scales_usable is false when some g is not finite and > 0.
/// @throws std::invalid_argument as ModelBlock::evaluate_rows.
XTALSCALE_EXPORT NormalEquationsSummary model_normal_equations(
    const GroupedObservations& table, const std::vector<TableModel>& models,
    std::size_t n_params, double* matrix, double* rhs, double* g_table, double* Ih_table = nullptr,
    NormalMatrixKind kind = NormalMatrixKind::schur, const double* fixed_Ih = nullptr,
    int n_threads = 1, bool accumulate = false);

/// The scaling target f = Σ w (I − g Ĩ)² (Ĩ per group, held: the envelope theorem) and its
/// gradient ∂f/∂p into @p gradient (n_params values, written) of a table whose rows come from
/// several C++ model blocks (e.g. one per dataset, groups spanning datasets), in one pass and
/// without forming any ∂g/∂p: per chunk of whole groups (ModelBlock::functional_and_gradient's
/// chunks, fixed by the groups) each model's rows of the chunk are evaluated once
/// (ModelBlock::fused_scales_rows), their g scattered to table order, the chunk's groups give
/// f and ∂f/∂g, and each model's transposed product (ModelBlock::fused_transpose_rows) goes
/// into its columns [column_offset, column_offset + n_cols) of the chunk's gradient. Chunks go
/// over up to @p n_threads threads; their sums are added in chunk order: the same bits for any
/// thread count. Equal to g per block, the target's ∂f/∂g and each block's transposed product
/// to rounding, and to ModelBlock::functional_and_gradient bit for bit for one model covering
/// the table in order. Writes g of every table row into @p g_table (n_obs values) and, when
/// @p Ih_table is given, each row's least-squares Ĩ (as model_normal_equations). The chunks
/// hold 4096 table rows for one model, 8192 per model for several (at most 32768); each
/// thread keeps its chunk buffers from call to call (fresh pages per call cost the kernel's
/// clearing). A model's rows not consecutive in the table have their g written to, and their
/// ∂f/∂g read from, table order in the passes that form them (no gathered copies). The
/// models' rows are checked here, by the chunks as they read them (no serial pass over them):
/// each chunk's rows of a model ascend within the chunk and the chunks' rows follow one another
/// over the model's rows; with n_obs rows in all, a row no model holds is then found by the
/// chunk's g check.
/// @throws std::invalid_argument for a null block, a parameter count or a row or column range
/// that does not fit, table rows that are out of range, not strictly ascending or that do not
/// cover each table row once, non-finite parameters, weights or intensities, or a scale g that
/// is not finite and > 0; std::logic_error for a block whose terms do not evaluate row ranges.
XTALSCALE_EXPORT double model_functional_and_gradient(const GroupedObservations& table,
                                                      const std::vector<TableModel>& models,
                                                      std::size_t n_params, double* gradient,
                                                      double* g_table, double* Ih_table = nullptr,
                                                      int n_threads = 1);

/// Make a matrix accumulated by normal_equations(..., accumulate = true) symmetric: each
/// element's two triangle terms added and mirrored (n x n, row-major).
XTALSCALE_EXPORT void fold_normal_matrix(std::size_t n, double* matrix);

/// Diagonal of the Ĩ-eliminated normal matrix (kind schur; obs term only with @p fixed_Ih) into
/// @p diagonal (n_params): O(N k) + O(G u), no P x P storage. Used to precondition L-BFGS.
XTALSCALE_EXPORT void normal_matrix_diagonal(const GroupedObservations& table,
                                             const std::vector<FitBlock>& blocks,
                                             std::size_t n_params, double* diagonal,
                                             const double* fixed_Ih = nullptr);

/// diag(J V Jᵀ) of a CSR matrix J (@p n_rows rows, columns < @p n) and a dense symmetric V
/// (n x n, row-major; a non-symmetric V acts through its symmetric part) into @p out (n_rows):
/// var(g_i) = Σ_ab J_ia V_ab J_ib, O(k²) per row, no N x n temporary. The columns nearly every
/// row holds (such as a model's absorption harmonics) are done four rows at a time in register
/// tiles. Rows are independent, so the result is identical for any @p n_threads. Column
/// indices must be < n (checked by the caller).
XTALSCALE_EXPORT void row_quadratic_forms(std::size_t n_rows, const std::int64_t* indptr,
                                          const std::int32_t* indices, const double* values,
                                          std::size_t n, const double* V, double* out,
                                          int n_threads = 1);

/// var(g_i) = J_i V J_iᵀ and g_i of every row of a model block whose terms evaluate row ranges
/// (ModelBlock::evaluates_rows), without forming ∂g/∂p: rows go in equal chunks of at most
/// 4096 (a whole multiple of @p n_threads of them), each
/// chunk's derivatives evaluated into per-thread scratch (ModelBlock::evaluate_rows) and
/// reduced by row_quadratic_forms. @p V is n_cols x n_cols in the block's column layout,
/// @p variances and @p g have n_rows values. Rows are independent: identical for any
/// @p n_threads; equal to row_quadratic_forms on evaluate()'s matrix, bit for bit.
/// @throws std::invalid_argument as ModelBlock::evaluate_rows.
XTALSCALE_EXPORT void model_row_variances(const ModelBlock& block, const double* params,
                                          std::size_t n_params, const double* V,
                                          double* variances, double* g, int n_threads = 1);

/// model_row_variances of several blocks of one model (the same parameters and column layout,
/// such as its data blocks) in one call, each row's results written to its own position:
/// row r of block b to @p variances and @p g at rows[b][r]. Every block is cut into the
/// chunks model_row_variances cuts it into, and the chunks of all blocks are shared out
/// over @p n_threads threads: the values are model_row_variances' bit for bit, for any
/// @p n_threads. @p rows (null: the single block's rows in order, @p n_blocks must be 1)
/// must address distinct positions of the outputs (checked by the caller).
/// @throws std::invalid_argument if the blocks' column counts differ, or as
/// ModelBlock::evaluate_rows.
XTALSCALE_EXPORT void model_row_variances_into(std::size_t n_blocks,
                                               const ModelBlock* const* blocks,
                                               const double* params, std::size_t n_params,
                                               const double* V, const std::int64_t* const* rows,
                                               double* variances, double* g, int n_threads = 1);

/// x ← (L Lᵀ)⁻¹ x: the solution of L Lᵀ x = b given the Cholesky factor @p lower (n x n,
/// row-major, lower triangle read, diagonal non-zero) and b in @p x (n values), by forward and
/// back substitution: O(n²), where a general solver on each triangle costs O(n³).
XTALSCALE_EXPORT void cholesky_solve(std::size_t n, const double* lower, double* x);

}  // namespace xtalscale::fit
