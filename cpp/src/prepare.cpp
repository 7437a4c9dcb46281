// The scaling job's input filter and initial intensities (see prepare.hpp): one pass over the
// rows, the same IEEE operations per element as the array formulation it replaces.
#include "xtalscale/prepare.hpp"

#include <cmath>
#include <stdexcept>

namespace xtalscale {

namespace {

/// The reasons' slots in FilterCounts.
enum FilterSlot : std::size_t {
  kNegativeId = 0,
  kZeroIndex = 1,
  kNotIntegrated = 2,
  kFirstMethod = 3,  // per method m: kFirstMethod + 2m (σ² ≤ 0), kFirstMethod + 2m + 1 (I/σ low)
  kBadQe = 7,
  kLowPartiality = 8,
};

}  // namespace

FilterCounts filter_unfit_rows(std::size_t n, const std::uint64_t* flags, const std::int32_t* id,
                               const std::int32_t* hkl, const IntegratedColumns* methods,
                               std::size_t n_methods, const double* qe, const double* partiality,
                               double partiality_cutoff, double min_isigi, std::uint8_t* bad) {
  if (n_methods < 1 || n_methods > 2) throw std::invalid_argument("filter_unfit_rows: one or two methods");
  for (std::size_t m = 0; m < n_methods; ++m)
    if (methods[m].value == nullptr || methods[m].variance == nullptr)
      throw std::invalid_argument("filter_unfit_rows: every chosen method needs its I and variance");
  FilterCounts counts{};
  for (std::size_t i = 0; i < n; ++i) {
    bool unfit = false;
    if (id != nullptr && id[i] < 0) {
      ++counts[kNegativeId];
      unfit = true;
    }
    if (hkl != nullptr && (hkl[3 * i] | hkl[3 * i + 1] | hkl[3 * i + 2]) == 0) {
      ++counts[kZeroIndex];
      unfit = true;
    }
    bool integrated = flags == nullptr;
    for (std::size_t m = 0; m < n_methods; ++m) {
      const bool on = flags == nullptr || (flags[i] & methods[m].flag) != 0;
      integrated = integrated || on;
      if (!on) continue;
      const double var = methods[m].variance[i];
      const double value = methods[m].value[i];
      if (!(var > 0.0)) {
        ++counts[kFirstMethod + 2 * m];
        unfit = true;
      } else if (value / std::sqrt(var) < min_isigi) {
        ++counts[kFirstMethod + 2 * m + 1];
        unfit = true;
      }
      if (!std::isfinite(value)) unfit = true;  // (counted under no reason, as DIALS)
    }
    if (!integrated) {
      ++counts[kNotIntegrated];
      unfit = true;
    }
    if (qe != nullptr && !(qe[i] > 0.0)) {
      ++counts[kBadQe];
      unfit = true;
    }
    if (partiality != nullptr && partiality[i] < partiality_cutoff) {
      ++counts[kLowPartiality];
      unfit = true;
    }
    bad[i] = unfit ? 1 : 0;
  }
  return counts;
}

void choose_initial_intensities(std::size_t n, InitialIntensities kind, const double* correction,
                                const double* prf_value, const double* prf_variance,
                                const double* sum_value, const double* sum_variance,
                                const double* partiality, const double* partiality_inv_variance,
                                const std::uint64_t* flags, std::uint64_t prf_flag, double* intensity,
                                double* variance, std::uint8_t* not_positive) {
  if (correction == nullptr) throw std::invalid_argument("choose_initial_intensities: the correction is required");
  const bool profile = kind == InitialIntensities::profile;
  if (profile && (prf_value == nullptr || prf_variance == nullptr))
    throw std::invalid_argument("choose_initial_intensities: profile needs the profile columns");
  if (!profile && (sum_value == nullptr || sum_variance == nullptr))
    throw std::invalid_argument("choose_initial_intensities: sum and combine need the summation columns");
  const bool prf_where_fitted = kind == InitialIntensities::combine && prf_value != nullptr &&
                                prf_variance != nullptr && flags != nullptr;
  for (std::size_t i = 0; i < n; ++i) {
    const double c = correction[i];
    double value, var;
    if (profile) {
      value = prf_value[i] * c;
      var = prf_variance[i] * (c * c);
    } else {
      const double p = partiality != nullptr ? partiality[i] : 1.0;
      const double inv_p = p > 0.0 ? 1.0 / p : 1.0;
      const double sum_c = sum_value[i] * c;
      value = sum_c * inv_p;
      const double c_over_p = c * inv_p;
      var = sum_variance[i] * (c_over_p * c_over_p);
      if (partiality_inv_variance != nullptr) var = var + (sum_c * sum_c) * partiality_inv_variance[i];
      if (prf_where_fitted && (flags[i] & prf_flag) != 0) {
        value = prf_value[i] * c;
        var = prf_variance[i] * (c * c);
      }
    }
    intensity[i] = std::isfinite(value) ? value : 0.0;
    variance[i] = std::isfinite(var) ? var : 0.0;
    not_positive[i] = var > 0.0 ? 0 : 1;
  }
}

}  // namespace xtalscale
