// Per-group kernels of the scaling job (see group_kernels.hpp).
#include "xtalscale/group_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale {
namespace {

/// Σ w·g·I and Σ w·g² over group @p k (one summation order for every kernel below).
struct GroupWeightedSums {
  double wgI = 0.0;
  double wgg = 0.0;
};

GroupWeightedSums group_weighted_sums(const GroupLayout& layout, std::size_t k,
                                      const double* intensity, const double* weight,
                                      const double* scale) {
  GroupWeightedSums sums;
  for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) {
    const auto r = layout.order[i];
    const double wg = weight[r] * scale[r];
    sums.wgI += wg * intensity[r];
    sums.wgg += wg * scale[r];
  }
  return sums;
}

}  // namespace

void check_layout(const GroupLayout& layout) {
  require(layout.offsets != nullptr, "offsets must not be empty");
  require(layout.offsets[0] == 0, "offsets must start at 0");
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    if (layout.offsets[k + 1] < layout.offsets[k])
      throw std::invalid_argument("offsets must be non-decreasing (offset " +
                                  std::to_string(k + 1) + " is below offset " +
                                  std::to_string(k) + ")");
  }
  const auto n_sorted = static_cast<std::size_t>(layout.offsets[layout.n_groups]);
  for (std::size_t i = 0; i < n_sorted; ++i)
    require_index(static_cast<std::ptrdiff_t>(layout.order[i]), layout.n_rows, "order");
}

void sum_in_groups(const GroupLayout& layout, const double* values, double* out) {
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    double s = 0.0;
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) s += values[layout.order[i]];
    out[k] = s;
  }
}

void weighted_group_sums(const GroupLayout& layout, const double* intensity, const double* weight,
                         const double* scale, double* sum_wgI, double* sum_wgg) {
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const GroupWeightedSums sums = group_weighted_sums(layout, k, intensity, weight, scale);
    sum_wgI[k] = sums.wgI;
    sum_wgg[k] = sums.wgg;
  }
}

void normdev_leave_one_out(const GroupLayout& layout, const double* intensity, const double* weight,
                           const double* scale, double* z) {
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k], end = layout.offsets[k + 1];
    if (end - begin <= 2) {
      for (auto i = begin; i < end; ++i) z[layout.order[i]] = 0.0;
      continue;
    }
    for (auto i = begin; i < end; ++i)
      if (!(weight[layout.order[i]] > 0.0))
        throw std::invalid_argument("weights must be positive (row " +
                                    std::to_string(layout.order[i]) + ")");
    const auto [a, b] = group_weighted_sums(layout, k, intensity, weight, scale);
    for (auto i = begin; i < end; ++i) {
      const auto r = layout.order[i];
      const double wg = weight[r] * scale[r];
      const double others_wgg = b - wg * scale[r];
      // Subtracting the row from the totals is exact enough: others_wgg only vanishes when
      // every other row has zero scale, which DIALS maps to z = 1000 as well.
      if (!(others_wgg > 0.0)) {
        z[r] = 1000.0;
        continue;
      }
      const double others_mean = (a - wg * intensity[r]) / others_wgg;
      const double g = scale[r];
      z[r] = (intensity[r] - g * others_mean) / std::sqrt(1.0 / weight[r] + g * g / others_wgg);
    }
  }
}

void normdev_simple(const GroupLayout& layout, const double* intensity, const double* weight,
                    const double* scale, double* z) {
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k], end = layout.offsets[k + 1];
    const auto [a, b] = group_weighted_sums(layout, k, intensity, weight, scale);
    for (auto i = begin; i < end; ++i) {
      const auto r = layout.order[i];
      if (!(weight[r] > 0.0) || !(b > 0.0)) {
        z[r] = 0.0;
        continue;
      }
      const double g = scale[r];
      const double t = g / b;
      z[r] = (intensity[r] - g * a / b) / std::sqrt(1.0 / weight[r] + t * t);
    }
  }
}

void pick_group_outliers(const GroupLayout& layout, const double* abs_z, double zmax,
                         std::vector<std::int64_t>& outliers, std::vector<std::int64_t>& potential) {
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k], end = layout.offsets[k + 1];
    if (end - begin <= 2) continue;
    auto best = begin;
    for (auto i = begin + 1; i < end; ++i)
      if (abs_z[layout.order[i]] > abs_z[layout.order[best]]) best = i;  // first maximum wins
    if (!(abs_z[layout.order[best]] > zmax)) continue;
    outliers.push_back(layout.order[best]);
    for (auto i = begin; i < end; ++i)
      if (i != best) potential.push_back(layout.order[i]);
  }
}

void limit_outlier_weights(const GroupLayout& layout, const double* weight, double* out) {
  std::vector<double> buffer;
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k], end = layout.offsets[k + 1];
    if (begin == end) continue;
    buffer.clear();
    for (auto i = begin; i < end; ++i) buffer.push_back(weight[layout.order[i]]);
    const std::size_t n = buffer.size(), mid = n / 2;
    std::nth_element(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(mid), buffer.end());
    double median = buffer[mid];
    if (n % 2 == 0) {
      const double below = *std::max_element(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(mid));
      median = 0.5 * (median + below);
    }
    const double cap = 10.0 * median;
    for (auto i = begin; i < end; ++i) {
      const auto r = layout.order[i];
      out[r] = std::min(weight[r], cap);
    }
  }
}

std::vector<std::int64_t> select_rows_in_groups(const GroupLayout& layout, const std::uint8_t* keep,
                                                std::vector<std::int64_t>& new_order,
                                                std::vector<std::int64_t>& kept_groups) {
  std::vector<std::int64_t> offsets{0};
  new_order.clear();
  kept_groups.clear();
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto before = new_order.size();
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i)
      if (keep[layout.order[i]]) new_order.push_back(layout.order[i]);
    if (new_order.size() > before) {
      offsets.push_back(static_cast<std::int64_t>(new_order.size()));
      kept_groups.push_back(static_cast<std::int64_t>(k));
    }
  }
  return offsets;
}

void error_model_bin_moments(std::size_t n_rows, const double* numerator, const double* variance,
                             const double* intensity_sq, const std::int64_t* bin, std::size_t n_bins,
                             double b_squared, double* sum_delta, double* sum_delta_sq) {
  std::fill(sum_delta, sum_delta + n_bins, 0.0);
  std::fill(sum_delta_sq, sum_delta_sq + n_bins, 0.0);
  for (std::size_t i = 0; i < n_rows; ++i) {
    const auto k = bin[i];
    if (k < 0) continue;
    if (static_cast<std::size_t>(k) >= n_bins)
      throw std::invalid_argument("bin index " + std::to_string(k) + " at row " + std::to_string(i) +
                                  " is not below n_bins (" + std::to_string(n_bins) + ")");
    const double delta = numerator[i] / std::sqrt(variance[i] + b_squared * intensity_sq[i]);
    sum_delta[k] += delta;
    sum_delta_sq[k] += delta * delta;
  }
}

}  // namespace xtalscale
