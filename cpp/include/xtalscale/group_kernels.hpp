/// @file group_kernels.hpp
/// @brief Per-group kernels of the scaling job: sums, leave-one-out and simple normalised
/// deviations, the outlier pick, DIALS's outlier-weight cap and group-subset compaction.
///
/// Observations are grouped as the data layer groups them (xtalscale::group_miller_indices):
/// @p order lists the rows group by group and group @c k holds
/// order[offsets[k]] .. order[offsets[k+1]-1]; per-observation arrays are indexed by row.
/// Every function validates its arguments (std::invalid_argument / std::out_of_range naming
/// the argument), loops once over the groups and is deterministic. Callers release the GIL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/export.hpp"

namespace xtalscale {

/// A grouping as plain pointers: @p n_rows observations in @p n_groups groups.
struct GroupLayout {
  const std::int64_t* order = nullptr;    ///< rows, group by group (n_sorted entries)
  const std::int64_t* offsets = nullptr;  ///< n_groups + 1 offsets into @c order
  std::size_t n_groups = 0;
  std::size_t n_rows = 0;  ///< length of every per-row array (rows index these)
};

/// Check offsets (start 0, non-decreasing) and that every order entry is a valid row.
XTALSCALE_EXPORT void check_layout(const GroupLayout& layout);

/// out[row] = the group holding @p row (for every row of the layout's order; −1 for a row in
/// none), with the groups written in order (prefetching the scattered writes).
XTALSCALE_EXPORT void group_of_rows(const GroupLayout& layout, std::int64_t* out);

/// out[k] = Σ values[row] over the rows of group k.
XTALSCALE_EXPORT void sum_in_groups(const GroupLayout& layout, const double* values, double* out);

/// Per group: Σ w g I and Σ w g² (the weighted least-squares mean is their ratio).
XTALSCALE_EXPORT void weighted_group_sums(const GroupLayout& layout, const double* intensity,
                                          const double* weight, const double* scale,
                                          double* sum_wgI, double* sum_wgg);

/// DIALS's standard (leave-one-out) normalised deviation of every row in a group with more
/// than two members:  z = (I − g·Σ'wgI/Σ'wgg) / sqrt(1/w + g²/Σ'wgg), Σ' over the others;
/// z = 1000 where Σ'wgg is zero; z = 0 for rows of groups with ≤ 2 members.
/// Throws std::invalid_argument if a weight in such a group is not positive.
XTALSCALE_EXPORT void normdev_leave_one_out(const GroupLayout& layout, const double* intensity,
                                            const double* weight, const double* scale,
                                            double* z);

/// DIALS's simple normalised deviation, the reflection included in the mean:
/// z = (I − g·ΣwgI/Σwgg) / sqrt(1/w + (g/Σwgg)²) (DIALS's denominator, spec §11.17).
XTALSCALE_EXPORT void normdev_simple(const GroupLayout& layout, const double* intensity,
                                     const double* weight, const double* scale, double* z);

/// In every group with more than two members, the row of largest |z| is an outlier if that
/// exceeds @p zmax, and the group's other rows become potential outliers (the next round's
/// candidates). Outliers are appended in group order.
XTALSCALE_EXPORT void pick_group_outliers(const GroupLayout& layout, const double* abs_z,
                                          double zmax, std::vector<std::int64_t>& outliers,
                                          std::vector<std::int64_t>& potential);

/// DIALS's limit_outlier_weights: each weight capped at 10 × its group's median weight (the
/// median of an even count is the mean of the two central values).
XTALSCALE_EXPORT void limit_outlier_weights(const GroupLayout& layout, const double* weight,
                                            double* out);

/// Keep the rows with keep[row] != 0: writes the compacted order to @p new_order and returns
/// the new offsets (empty groups dropped) and, in @p kept_groups, each new group's old index.
XTALSCALE_EXPORT std::vector<std::int64_t> select_rows_in_groups(
    const GroupLayout& layout, const std::uint8_t* keep, std::vector<std::int64_t>& new_order,
    std::vector<std::int64_t>& kept_groups);

/// DIALS's standard outlier rejection in one call: in every group of more than two rows the
/// row of largest |z| (leave-one-out normalised deviation, weights capped as in
/// limit_outlier_weights) is an outlier if |z| > @p zmax; the group is then looked at again
/// without it, until it yields none. Returns the outlier rows in DIALS's detection order
/// (round by round, groups in order within a round) -- the same rows as iterating
/// limit_outlier_weights, normdev_leave_one_out, pick_group_outliers and a regrouping to the
/// potential outliers. Throws std::invalid_argument if a weight in a tested group is not positive.
/// Groups are worked on in fixed chunks over @p n_threads threads; the result is the same for
/// any thread count.
XTALSCALE_EXPORT std::vector<std::int64_t> standard_outlier_rows(const GroupLayout& layout,
                                                                 const double* intensity,
                                                                 const double* weight,
                                                                 const double* scale, double zmax,
                                                                 int n_threads = 1);

/// select_rows_in_groups with the rows renumbered to the subset: @p new_order holds positions
/// among the kept rows (row r becomes the number of kept rows before it), so the subset's
/// per-row arrays are the kept rows in their original order. Returns the new offsets. The
/// kept rows' positions come from a bit index of @p keep (no per-row array); with several
/// threads, fixed ranges of groups are counted and then placed by prefix sums (the same
/// grouping for any thread count).
XTALSCALE_EXPORT std::vector<std::int64_t> subset_grouping(const GroupLayout& layout,
                                                           const std::uint8_t* keep,
                                                           std::vector<std::int64_t>& new_order,
                                                           int n_threads = 1);

/// DIALS's filter of the data the basic error model is fitted to, on the rows with
/// considered[row] != 0, group by group (Ĩ with weights 1/σ²): the group's mean I/σ² > 0.85;
/// rows with Ĩ·g > @p min_Ih and I > 0.001 in groups of more than one row; groups still of more
/// than one row; groups whose internal variance ratio Σ(I/g − Ĩ)²/(n−1) / mean(σ²/g²) is below
/// max(50, largest Ĩ of those groups / 40). Writes keep[row] = 1 for the rows that pass and,
/// for those rows, their group's Ĩ and row count after the filter to @p group_mean and
/// @p group_size (other entries are left as they were). Ranges of groups go to up to
/// @p n_threads threads; the result does not depend on the split.
XTALSCALE_EXPORT void error_model_filter(const GroupLayout& layout, const double* intensity,
                                         const double* variance, const double* scale,
                                         const std::uint8_t* considered, double min_Ih,
                                         std::uint8_t* keep, double* group_mean, double* group_size,
                                         int n_threads = 1);

/// The error model's δ = deviation / σ' with σ' = a·sqrt(σ² + (b·I)²)/g, row by row (in the
/// operation order of xtalscale.job.error_model.calc_sigmaprime / calc_deltahl), in fixed
/// ranges of rows over up to @p n_threads threads.
XTALSCALE_EXPORT void error_model_normalised_deviations(std::size_t n_rows, const double* deviation,
                                                        const double* variance, const double* intensity,
                                                        const double* scale, double a, double b,
                                                        double* delta, int n_threads = 1);

/// out[i] = values[rows[i]] for i < @p n_out (numpy's take), in fixed ranges over up to
/// @p n_threads threads. Returns the first i whose row is not in [0, @p n_values) (nothing
/// is written from the range holding it on), or −1.
XTALSCALE_EXPORT std::int64_t gather_values(std::size_t n_values, const double* values, std::size_t n_out,
                                            const std::int64_t* rows, double* out, int n_threads = 1);

/// The basic error model's variances σ'² = (a·a)·(σ² + (b·I)²) and weights 1/σ'², row by row
/// (the operation order of xtalscale.error_model.BasicErrorModel.update_variances and of
/// numpy's 1 / σ'²), in fixed ranges of rows over up to @p n_threads threads.
XTALSCALE_EXPORT void error_model_variances(std::size_t n_rows, const double* variance, const double* intensity,
                                            double a, double b, double* updated, double* weight,
                                            int n_threads = 1);

/// The normalisation sums of E²: sums[k] = Σ max(I, 0)/ε over the rows with bin[row] = k, in
/// row order (numpy's bincount of those terms). Bins must be in [0, n_bins).
XTALSCALE_EXPORT void esq_bin_sums(std::size_t n_rows, const double* scaled_intensity, const double* epsilon,
                                   const std::int64_t* bin, std::size_t n_bins, double* sums);

/// E² = I / (ε · N) with N = group_norm[group[row]] (0 where N is not positive).
XTALSCALE_EXPORT void esq_values(std::size_t n_rows, const double* scaled_intensity, const double* epsilon,
                                 const std::int64_t* group, const double* group_norm, double* esq);

/// esq_bin_sums of the scaled intensities I/g (each I/g formed as numpy forms it: the same
/// sums as esq_bin_sums(I / g, ...)), without the array of I/g.
XTALSCALE_EXPORT void esq_scaled_bin_sums(std::size_t n_rows, const double* intensity, const double* scale,
                                          const double* epsilon, const std::int64_t* bin, std::size_t n_bins,
                                          double* sums);

/// The rows (ascending) whose E² of esq_values(I / g, ...) exceeds @p threshold, without the
/// arrays of I/g and E². Rows go over @p n_threads threads in fixed chunks (the same rows for
/// any thread count).
XTALSCALE_EXPORT std::vector<std::int64_t> esq_rows_above(std::size_t n_rows, const double* intensity,
                                                          const double* scale, const double* epsilon,
                                                          const std::int64_t* group, const double* group_norm,
                                                          double threshold, int n_threads = 1);

/// Per-group sums of Rmeas on scaled intensities I/g with σ = sqrt(max(σ², 0))/g, over the
/// rows with σ > 0 and I/σ > 1: their count, Σ|I/g − Ĩ| (Ĩ weighted by 1/σ²) and Σ I/g.
XTALSCALE_EXPORT void rmeas_group_sums(const GroupLayout& layout, const double* intensity,
                                       const double* variance, const double* scale,
                                       std::int64_t* n_used, double* abs_deviation, double* total);

/// Per-bin sums of the error model's normalised deviations δ = K / sqrt(σ² + b²·I²) and of δ²
/// (the b refinement's one pass per trial b). Rows with bin[row] < 0 are in no bin; bin
/// indices must be below @p n_bins. Writes n_bins values to @p sum_delta and @p sum_delta_sq.
/// Rows are summed in fixed parts of 2¹⁶ (over up to @p n_threads threads) whose sums are added
/// in part order: the same bits for any thread count, and row order within one part.
XTALSCALE_EXPORT void error_model_bin_moments(std::size_t n_rows, const double* numerator,
                                              const double* variance, const double* intensity_sq,
                                              const std::int64_t* bin, std::size_t n_bins,
                                              double b_squared, double* sum_delta,
                                              double* sum_delta_sq, int n_threads = 1);

/// The b of the error model minimising the binned-variance objective
/// Σ_k w_k [(0.5 − v_k)² + 1/v_k − 1.25] (v_k the variance of δ in bin k, at least 1e-12) by a
/// golden-section search on [@p lo, @p hi] to width @p tol: every step as
/// xtalscale.job.error_model._golden_section does it with the objective as its numpy form
/// computes it (per-bin sums from error_model_bin_moments, numpy's summation of the terms),
/// so the result is the same to the bit. @p counts and @p weights have n_bins entries (the
/// rows per bin and the normalised bin weights). Returns the midpoint of the last bracket.
XTALSCALE_EXPORT double error_model_search_b(std::size_t n_rows, const double* numerator,
                                             const double* variance, const double* intensity_sq,
                                             const std::int64_t* bin, std::size_t n_bins,
                                             const double* counts, const double* weights, double lo,
                                             double hi, double tol, int n_threads = 1);

}  // namespace xtalscale
