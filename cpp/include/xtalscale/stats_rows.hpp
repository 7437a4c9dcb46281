/// @file stats_rows.hpp
/// @brief Row passes of the statistics stage: the scaled rows of a reflection table, and E² by
///        quasi-normalisation.
///
/// Each kernel does in one or two passes what a sequence of array operations did, with the
/// same IEEE operations per element (so the same bits; compiled without fused multiply-add).
#pragma once

#include <cstddef>
#include <cstdint>

#include "xtalscale/export.hpp"

namespace xtalscale {

/// Steps of the scaled-row selection, in the order they are applied; a row's code is the
/// first step it fails (kScaledKept if none).
enum ScaledRowCode : std::uint8_t {
  kScaledKept = 0,
  kScaledNotSelected = 1,      ///< id < 0 or a bad_for_scaling bit set
  kScaledBadScale = 2,         ///< inverse scale factor not > 0
  kScaledBadVariance = 3,      ///< variance not > 0
  kScaledBadPartiality = 4,    ///< partiality not > 0
  kScaledLowPartiality = 5,    ///< partiality below the threshold
  kScaledZeroIndex = 6,        ///< kept by every step but with index (0, 0, 0)
};

/// Counts of classify_scaled_rows.
struct ScaledRowCounts {
  std::int64_t n_bad = 0;  ///< rows with a bad bit set (whatever their id)
  /// rows left after each step (survivors[k]: after step k + 1 of ScaledRowCode)
  std::int64_t survivors[5] = {0, 0, 0, 0, 0};
  /// rows left after step 4 with partiality < 0.99 (candidates for combining partials)
  std::int64_t n_partial_candidates = 0;
  std::int64_t n_zero_index = 0;  ///< rows kept by steps 1-5 with index (0, 0, 0)
};

/// Classify the n rows of a table (one code per row into @p code).
/// @param id          experiment id per row (nullptr: every row has id 0)
/// @param flags       flag bits per row (nullptr: none set); @p bad_bits the bits that exclude
/// @param g, variance inverse scale factor and variance per row
/// @param partiality  per row (nullptr: no partiality steps)
/// @param hkl         (n, 3) Miller indices
XTALSCALE_EXPORT ScaledRowCounts classify_scaled_rows(
    std::size_t n, const std::int32_t* id, const std::uint64_t* flags, std::uint64_t bad_bits,
    const double* g, const double* variance, const double* partiality, double threshold,
    const std::int32_t* hkl, std::uint8_t* code);

/// Gather the rows with code kScaledKept (ascending; @p n_out of them): row number, value/g,
/// variance/(g·g) (or value and variance unscaled when !apply_inverse_scale), hkl, id as int64
/// (0 without @p id) and, if @p z is given, z[3 * row] (the frame coordinate of an (n, 3)
/// xyz column). Returns the number of kept rows written, or n_out + 1 if there are more kept
/// rows than @p n_out (nothing past n_out is written).
XTALSCALE_EXPORT std::size_t gather_scaled_rows(
    std::size_t n, const std::uint8_t* code, std::size_t n_out, const double* value,
    const double* variance, const double* g, bool apply_inverse_scale, const std::int32_t* hkl,
    const std::int32_t* id, const double* z, std::int64_t* rows_out, double* intensity_out,
    double* variance_out, std::int32_t* hkl_out, std::int64_t* dataset_out, double* z_out);

/// E² = I / (ε ⟨max(I, 0)/ε⟩_shell) with shell = clip(trunc((d*² − lo)/step), 0, n_shells − 1)
/// (0 where the denominator is not > 0), the shell means summed in row order; @p epsilon
/// one value per row.
XTALSCALE_EXPORT void quasi_normalised_e_squared(std::size_t n, const double* d_star_sq,
                                                 const double* intensity,
                                                 const std::int8_t* epsilon, double lo,
                                                 double step, std::size_t n_shells,
                                                 double* out);
/// The same with ε given as doubles.
XTALSCALE_EXPORT void quasi_normalised_e_squared(std::size_t n, const double* d_star_sq,
                                                 const double* intensity,
                                                 const double* epsilon, double lo,
                                                 double step, std::size_t n_shells,
                                                 double* out);

/// deviations_and_batch_sums (merging_stats.hpp) of observations already in group order
/// (group g is rows offsets[g] .. offsets[g+1]-1) with each group's weighted mean given
/// (@p mean, n_groups values: the merged <I> of the non-anomalous merging statistics, the
/// same value that kernel computes): delta = sqrt((m-1)/m) (I - <I>)/sigma (NaN for m = 1)
/// written to deviations[position[j]] (every position < @p n_out; nullptr: not written),
/// and per batch (@p batch_index of each row, -1 = none) the number of observations,
/// sum |I - <I>|, sum I and sum I/sigma, accumulated in row order.
/// Throws std::invalid_argument for bad offsets, a non-finite value, sigma <= 0, a position or
/// batch index out of range.
XTALSCALE_EXPORT void grouped_deviations_and_batch_sums(
    std::size_t n, const double* intensity, const double* sigma, const std::int64_t* offsets,
    std::size_t n_groups, const double* mean, const std::int64_t* position, std::size_t n_out,
    double* deviations, const std::int64_t* batch_index, std::size_t n_batches,
    std::int64_t* n_obs, double* sum_abs_dev, double* sum_i, double* sum_i_over_sigma);

/// The values at @p positions of the ascending sort of @p values (n of them, all finite;
/// every position < n): sorted[positions[k]] into @p out, exactly, without sorting them all
/// (a histogram over equal-width buckets between the minimum and maximum, then a selection
/// within the buckets holding the positions). Returns false (nothing written) if a value is
/// not finite.
XTALSCALE_EXPORT bool sorted_values_at(std::size_t n, const double* values,
                                       std::size_t n_positions, const std::int64_t* positions,
                                       double* out);

}  // namespace xtalscale
