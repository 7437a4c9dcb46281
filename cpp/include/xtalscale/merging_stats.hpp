/// @file merging_stats.hpp
/// @brief Merging statistics over grouped observations (cctbx iotbx.merging_statistics
///        conventions): one pass over the sorted groups, then per-shell reductions.
///
/// Input is the output of the grouping kernel (grouping.hpp): a sort permutation @c order and
/// group start offsets, so that the observations of group g are
/// @c order[offsets[g]] ... @c order[offsets[g+1]-1]. Groups are symmetry-equivalent
/// observations *without* Bijvoet separation; each observation carries a Friedel-minus flag
/// (true for the Bijvoet-minus mate of an acentric reflection) so that the anomalous
/// quantities (CC_ano, Bijvoet-separated merging) come from the same pass.
///
/// Definitions (cctbx merge_equivalents_obs, iotbx merging_stats):
///  - merged <I> is the 1/sigma^2-weighted mean over the observations whose sigma exceeds
///    sigma_dynamic_range * (largest sigma of the group); merged sigma is sqrt(1/sum w), or with
///    use_internal_variance sqrt(max(wvar/n, 1/sum w)) where wvar is the (GSL) weighted variance;
///    a single usable observation keeps its own value and sigma;
///  - R factors sum over unique reflections with multiplicity > 1:
///    Rmerge = sum|I - <I>| / sum I, Rmeas adds sqrt(n/(n-1)), Rpim sqrt(1/(n-1));
///  - <I/sigma> is the mean over merged reflections with sigma > 0;
///  - CC1/2 is the Pearson correlation of the two half-dataset means over reflections with
///    n >= 2 (half means 1/sigma^2-weighted unless weighted_halves is false); each group
///    is shuffled by a counter-based generator seeded by (seed, group) and
///    split into floor(n/2) and the rest (deterministic, independent of thread count);
///  - CC1/2 (sigma-tau) = (var_y - mean s^2)/(var_y + mean s^2) over reflections with n > 1,
///    var_y the sample variance of the merged intensities and s the internal-variance sigma;
///  - CC_ano is the correlation of the two half-dataset anomalous differences
///    (I+_1 - I-_1, I+_2 - I-_2) over acentric reflections whose I+ and I- both have >= 2
///    observations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "xtalscale/export.hpp"

namespace xtalscale {

/// Options of compute_merging_statistics.
struct MergingOptions {
  /// Merged sigma from the internal spread as well (cctbx use_internal_variance).
  bool use_internal_variance = false;
  /// Keep Bijvoet mates of acentric reflections apart (each is a unique reflection).
  bool anomalous = false;
  /// Seed of the half-dataset split (CC1/2, CC_ano).
  std::uint64_t seed = 0;
  /// Half-dataset means weighted by 1/sigma^2 (true) or plain means (false).
  bool weighted_halves = true;
  /// Observations with sigma <= this fraction of the group's largest sigma are left out of the
  /// weighted mean (cctbx's sigma_dynamic_range; they still count in n and in R).
  double sigma_dynamic_range = 1e-6;
};

/// One unique (merged) reflection per entry.
struct MergedReflections {
  std::vector<std::int64_t> group;       ///< source group index
  std::vector<std::int8_t> bijvoet;      ///< +1 I(+), -1 I(-), 0 not separated (centric or
                                         ///< non-anomalous merging)
  std::vector<double> intensity;         ///< weighted mean <I>
  std::vector<double> sigma;             ///< merged sigma (per the options)
  std::vector<double> sigma_internal;    ///< sigma with the internal variance (for sigma-tau)
  std::vector<std::int32_t> multiplicity;  ///< number of observations
  std::vector<double> half1, half2;      ///< half-dataset means (NaN when multiplicity < 2)
};

/// Sums and statistics of one resolution shell (the last entry of the result is overall).
struct ShellStatistics {
  std::int64_t n_obs = 0;          ///< observations
  std::int64_t n_uniq = 0;         ///< unique reflections
  std::int64_t n_multi = 0;        ///< unique reflections with multiplicity > 1
  std::int64_t n_bijvoet_pairs = 0;  ///< acentric reflections with both I+ and I- measured
  std::int64_t n_acentric = 0;     ///< acentric unique reflections (non-separated count)
  double sum_i = 0;                ///< sum of merged <I>
  double sum_sigma = 0;            ///< sum of merged sigma
  double sum_i_over_sigma = 0;     ///< sum of <I>/sigma over merged with sigma > 0
  std::int64_t n_i_over_sigma = 0;  ///< merged reflections with sigma > 0
  double sum_unmerged_i_over_sigma = 0;  ///< sum of I/sigma over observations with sigma > 0
  std::int64_t n_unmerged_positive_sigma = 0;  ///< observations with sigma > 0
  double r_num = 0;                ///< sum |I - <I>| (multiplicity > 1)
  double r_meas_num = 0;           ///< sum sqrt(n/(n-1)) |I - <I>|
  double r_pim_num = 0;            ///< sum sqrt(1/(n-1)) |I - <I>|
  double r_den = 0;                ///< sum I (multiplicity > 1)
  double r_merge = 0, r_meas = 0, r_pim = 0;  ///< ratios (0 when r_den == 0, as cctbx)
  double cc_half = 0;              ///< random half-split CC1/2 (0 if undefined)
  std::int64_t cc_half_n = 0;      ///< reflections in CC1/2
  double cc_half_sigma_tau = 0;    ///< sigma-tau CC1/2 (0 if undefined)
  std::int64_t cc_half_sigma_tau_n = 0;  ///< reflections in sigma-tau CC1/2
  double cc_anom = 0;              ///< half-dataset anomalous correlation (0 if undefined)
  std::int64_t cc_anom_n = 0;      ///< Bijvoet pairs in CC_ano
};

/// Result of compute_merging_statistics.
struct MergingStatistics {
  MergedReflections merged;             ///< unique reflections in group order
  std::vector<ShellStatistics> shells;  ///< n_shells entries then the overall entry
};

/// Merge grouped observations and reduce them per shell.
///
/// @param intensity, sigma  observation values (length n); sigma must be > 0 and both finite
///                          (the caller drops or flags other rows beforehand).
/// @param friedel_minus     per observation, nonzero for the Bijvoet-minus mate of an
///                          acentric reflection (may be null: all plus).
/// @param order, offsets    grouping (offsets has n_groups + 1 entries, offsets[0] == 0,
///                          offsets[n_groups] == n).
/// @param group_shell       shell of each group in [0, n_shells) or -1 to leave the group out.
/// @param group_centric     per group, nonzero if centric (may be null: all acentric).
/// Throws std::invalid_argument on inconsistent sizes, non-finite values, sigma <= 0, an order
/// entry out of range or non-monotone offsets. Thread-safe (no shared state).
XTALSCALE_EXPORT MergingStatistics compute_merging_statistics(
    const double* intensity, const double* sigma, const std::uint8_t* friedel_minus,
    std::size_t n, const std::int64_t* order, const std::int64_t* offsets,
    std::size_t n_groups, const std::int32_t* group_shell, const std::uint8_t* group_centric,
    std::size_t n_shells, const MergingOptions& options);

/// compute_merging_statistics of the same observations and shells non-anomalous (first) and
/// anomalous (second; @c options.anomalous is ignored), the same results as the two calls,
/// from one pass over the groups (the Friedel mates selected and CC_ano computed once, and a
/// centric reflection merged once for both).
XTALSCALE_EXPORT std::pair<MergingStatistics, MergingStatistics> compute_merging_statistics_both(
    const double* intensity, const double* sigma, const std::uint8_t* friedel_minus,
    std::size_t n, const std::int64_t* order, const std::int64_t* offsets,
    std::size_t n_groups, const std::int32_t* group_shell, const std::uint8_t* group_centric,
    std::size_t n_shells, const MergingOptions& options);

/// Normalised deviation of every observation from its group's weighted mean,
/// delta = sqrt((n-1)/n) (I - <I>)/sigma (the DIALS error-model definition, g = 1); NaN for
/// groups of one observation. Writes @p out (length n, input order).
XTALSCALE_EXPORT void normalised_deviations(const double* intensity, const double* sigma,
                                            std::size_t n, const std::int64_t* order,
                                            const std::int64_t* offsets, std::size_t n_groups,
                                            double* out);

/// Per-batch sums (xia2/DIALS "vs batch" plots): for each batch b in [0, n_batches) the
/// number of observations, sum |I - <I>_h| (the group's weighted mean over all its
/// observations), sum I and sum I/sigma. @p batch_index maps each observation to its batch
/// (-1 = ignore). Output arrays have n_batches entries.
XTALSCALE_EXPORT void batch_sums(const double* intensity, const double* sigma, std::size_t n,
                                 const std::int64_t* order, const std::int64_t* offsets,
                                 std::size_t n_groups, const std::int64_t* batch_index,
                                 std::size_t n_batches, std::int64_t* n_obs_out,
                                 double* sum_abs_dev_out, double* sum_i_out,
                                 double* sum_i_over_sigma_out);

/// normalised_deviations and batch_sums in one pass over the groups (one weighted mean per
/// group, the same values as the two calls). @p deviations (length n, input order) may be
/// nullptr; so may @p batch_index, and then n_batches must be 0 and the batch outputs are
/// not touched.
XTALSCALE_EXPORT void deviations_and_batch_sums(
    const double* intensity, const double* sigma, std::size_t n, const std::int64_t* order,
    const std::int64_t* offsets, std::size_t n_groups, double* deviations,
    const std::int64_t* batch_index, std::size_t n_batches, std::int64_t* n_obs_out,
    double* sum_abs_dev_out, double* sum_i_out, double* sum_i_over_sigma_out);

}  // namespace xtalscale
