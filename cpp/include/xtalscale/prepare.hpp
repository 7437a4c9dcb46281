/// @file prepare.hpp
/// @brief The scaling job's input filter and initial intensity choice (DIALS's
/// filter_bad_reflections and choose_initial_scaling_intensities, spec §8.2) as one pass over
/// the rows each, instead of some thirty array operations.
///
/// Every column is optional (a null pointer: the table lacks it) except where stated; the
/// arithmetic is the elementwise IEEE operations of the array formulation, in the same order,
/// so the results are bit for bit those of xtalscale.job.prepare's numpy reference.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "xtalscale/export.hpp"

namespace xtalscale {

/// One integration method's columns for the filter: its flag bit and its I and σ².
struct IntegratedColumns {
  std::uint64_t flag = 0;            ///< the row was integrated by this method when flags & flag
  const double* value = nullptr;     ///< I (required)
  const double* variance = nullptr;  ///< σ² (required)
};

/// The rows a filter rejects, per reason: [0] negative experiment id, [1] Miller index
/// (0, 0, 0), [2] integrated by none of the chosen methods, then per chosen method
/// [3 + 2m] σ² ≤ 0 (or NaN) and [4 + 2m] I/σ < min_isigi, then [7] qe ≤ 0 (or NaN) and
/// [8] partiality < cutoff. A row counts under every reason it meets.
using FilterCounts = std::array<std::int64_t, 9>;

/// Flag in @p bad (n bytes, 0/1) the rows unfit for scaling: negative @p id; @p hkl
/// (n × 3) equal to (0, 0, 0); flags holding none of the @p n_methods chosen methods' bits
/// (every row counts as integrated without @p flags); for each chosen method, among the rows
/// holding its bit, σ² ≤ 0, I/σ < @p min_isigi (σ² > 0) or a non-finite I; @p qe ≤ 0;
/// @p partiality < @p partiality_cutoff. Returns the counts per reason (FilterCounts).
/// @p n_methods is 1 or 2. Thread-safe.
XTALSCALE_EXPORT FilterCounts filter_unfit_rows(std::size_t n, const std::uint64_t* flags,
                                                const std::int32_t* id, const std::int32_t* hkl,
                                                const IntegratedColumns* methods, std::size_t n_methods,
                                                const double* qe, const double* partiality,
                                                double partiality_cutoff, double min_isigi,
                                                std::uint8_t* bad);

/// Which intensities choose_initial_intensities() starts from.
enum class InitialIntensities {
  profile,  ///< I_prf·c, σ²_prf·c²
  sum,      ///< I_sum·c/p, σ²_sum·(c/p)² (+ (I_sum·c)²·var(1/p))
  combine,  ///< as sum, with the profile values where the row was profile-fitted
};

/// The job's starting I and σ² of @p n rows, with the prescaling correction @p correction
/// (required) and 1/partiality (only where p > 0; 1 without @p partiality): see
/// InitialIntensities. @p partiality_inv_variance adds (I_sum·c)²·var(1/p) to σ²;
/// with @p kind combine, @p flags & @p prf_flag (without flags: no row) picks the profile
/// values (@p prf_value, @p prf_variance; required for profile). Writes I and σ² with
/// non-finite values replaced by 0 to @p intensity and @p variance, and to @p not_positive
/// whether σ² (before that replacement) is not > 0. Thread-safe.
XTALSCALE_EXPORT void choose_initial_intensities(
    std::size_t n, InitialIntensities kind, const double* correction, const double* prf_value,
    const double* prf_variance, const double* sum_value, const double* sum_variance,
    const double* partiality, const double* partiality_inv_variance, const std::uint64_t* flags,
    std::uint64_t prf_flag, double* intensity, double* variance, std::uint8_t* not_positive);

}  // namespace xtalscale
