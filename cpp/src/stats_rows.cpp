// Row passes of the statistics stage (see stats_rows.hpp).
#include "xtalscale/stats_rows.hpp"

#include "xtalscale/check.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <cstdint>
#include <vector>

namespace xtalscale {

ScaledRowCounts classify_scaled_rows(std::size_t n, const std::int32_t* id,
                                     const std::uint64_t* flags, std::uint64_t bad_bits,
                                     const double* g, const double* variance,
                                     const double* partiality, double threshold,
                                     const std::int32_t* hkl, std::uint8_t* code) {
  ScaledRowCounts c;
  std::int64_t failed[7] = {0, 0, 0, 0, 0, 0, 0};  // rows per code
  for (std::size_t i = 0; i < n; ++i) {
    const bool bad = flags != nullptr && (flags[i] & bad_bits) != 0;
    c.n_bad += bad ? 1 : 0;
    std::uint8_t k = kScaledKept;
    if (bad || (id != nullptr && id[i] < 0)) {
      k = kScaledNotSelected;
    } else if (!(g[i] > 0)) {
      k = kScaledBadScale;
    } else if (!(variance[i] > 0)) {
      k = kScaledBadVariance;
    } else if (partiality != nullptr && !(partiality[i] > 0)) {
      k = kScaledBadPartiality;
    } else {
      if (partiality != nullptr && partiality[i] < 0.99) ++c.n_partial_candidates;
      if (partiality != nullptr && !(partiality[i] >= threshold)) {
        k = kScaledLowPartiality;
      } else if ((hkl[3 * i] | hkl[3 * i + 1] | hkl[3 * i + 2]) == 0) {
        k = kScaledZeroIndex;
      }
    }
    code[i] = k;
    ++failed[k];
  }
  std::int64_t left = static_cast<std::int64_t>(n);
  for (int step = 0; step < 5; ++step) {
    left -= failed[step + 1];
    c.survivors[step] = left;
  }
  c.n_zero_index = failed[kScaledZeroIndex];
  return c;
}

std::size_t gather_scaled_rows(std::size_t n, const std::uint8_t* code, std::size_t n_out,
                        const double* value, const double* variance, const double* g,
                        bool apply_inverse_scale, const std::int32_t* hkl,
                        const std::int32_t* id, const double* z, std::int64_t* rows_out,
                        double* intensity_out, double* variance_out, std::int32_t* hkl_out,
                        std::int64_t* dataset_out, double* z_out) {
  std::size_t j = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (code[i] != kScaledKept) continue;
    if (j == n_out) return n_out + 1;  // (more kept rows than room for them)
    rows_out[j] = static_cast<std::int64_t>(i);
    if (apply_inverse_scale) {
      const double gi = g[i];
      intensity_out[j] = value[i] / gi;
      variance_out[j] = variance[i] / (gi * gi);
    } else {
      intensity_out[j] = value[i];
      variance_out[j] = variance[i];
    }
    hkl_out[3 * j] = hkl[3 * i];
    hkl_out[3 * j + 1] = hkl[3 * i + 1];
    hkl_out[3 * j + 2] = hkl[3 * i + 2];
    dataset_out[j] = id != nullptr ? static_cast<std::int64_t>(id[i]) : 0;
    if (z != nullptr) z_out[j] = z[3 * i];
    ++j;
  }
  return j;
}

namespace {

template <typename Eps>
void e_squared(std::size_t n, const double* dss, const double* I, const Eps* eps, double lo,
               double step, std::size_t n_shells, double* out) {
  if (n == 0 || n_shells == 0) return;
  const auto top = static_cast<std::int64_t>(n_shells) - 1;
  std::vector<double> sums(n_shells, 0.0);
  std::vector<std::int64_t> counts(n_shells, 0);
  std::vector<std::uint8_t> shell_small;
  std::vector<std::int32_t> shell_large;
  const bool small = n_shells <= 256;
  if (small) shell_small.resize(n); else shell_large.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double q = (dss[i] - lo) / step;
    // numpy's unsafe cast truncates; a NaN or a value beyond int64 becomes INT64_MIN there,
    // and the clip makes every negative value 0
    std::int64_t s = (q >= 0 && q < 9223372036854775808.0) ? static_cast<std::int64_t>(q) : 0;
    s = std::min(s, top);
    if (small) shell_small[i] = static_cast<std::uint8_t>(s);
    else shell_large[i] = static_cast<std::int32_t>(s);
    const double e = static_cast<double>(eps[i]);
    sums[static_cast<std::size_t>(s)] += std::max(I[i], 0.0) / e;  // (NaN stays NaN)
    counts[static_cast<std::size_t>(s)] += 1;
  }
  std::vector<double> mean(n_shells);
  for (std::size_t k = 0; k < n_shells; ++k)
    mean[k] = counts[k] > 0 ? sums[k] / static_cast<double>(std::max<std::int64_t>(counts[k], 1))
                            : 1.0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t s = small ? shell_small[i] : static_cast<std::size_t>(shell_large[i]);
    const double norm = mean[s] * static_cast<double>(eps[i]);
    out[i] = norm > 0 ? I[i] / norm : 0.0;
  }
}

}  // namespace

void quasi_normalised_e_squared(std::size_t n, const double* d_star_sq, const double* intensity,
                                const std::int8_t* epsilon, double lo, double step,
                                std::size_t n_shells, double* out) {
  e_squared(n, d_star_sq, intensity, epsilon, lo, step, n_shells, out);
}

void quasi_normalised_e_squared(std::size_t n, const double* d_star_sq, const double* intensity,
                                const double* epsilon, double lo, double step,
                                std::size_t n_shells, double* out) {
  e_squared(n, d_star_sq, intensity, epsilon, lo, step, n_shells, out);
}

void grouped_deviations_and_batch_sums(std::size_t n, const double* I, const double* s,
                                       const std::int64_t* offsets, std::size_t n_groups,
                                       const double* mean, const std::int64_t* position,
                                       std::size_t n_out, double* deviations,
                                       const std::int64_t* batch_index, std::size_t n_batches,
                                       std::int64_t* n_obs, double* sum_abs_dev, double* sum_i,
                                       double* sum_ios) {
  require_group_offsets(offsets, n_groups);
  require(offsets[n_groups] == static_cast<std::int64_t>(n),
          "offsets[-1] must equal the number of observations (" + std::to_string(n) + ")");
  for (std::size_t j = 0; j < n; ++j) {
    if (!std::isfinite(I[j]))
      throw std::invalid_argument("intensity must be finite (element " + std::to_string(j) + ")");
    if (!(std::isfinite(s[j]) && s[j] > 0))
      throw std::invalid_argument("sigma must be finite and > 0 (element " + std::to_string(j) + ")");
    if (position != nullptr) require_index(position[j], n_out, "position");
    if (batch_index != nullptr && (batch_index[j] < -1 ||
                                   batch_index[j] >= static_cast<std::int64_t>(n_batches)))
      throw std::invalid_argument("batch_index: element " + std::to_string(j) +
                                  " is outside [-1, n_batches)");
  }
  if (batch_index != nullptr) {
    std::fill(n_obs, n_obs + n_batches, 0);
    std::fill(sum_abs_dev, sum_abs_dev + n_batches, 0.0);
    std::fill(sum_i, sum_i + n_batches, 0.0);
    std::fill(sum_ios, sum_ios + n_batches, 0.0);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (std::size_t g = 0; g < n_groups; ++g) {
    const auto b = static_cast<std::size_t>(offsets[g]), e = static_cast<std::size_t>(offsets[g + 1]);
    const std::size_t m = e - b;
    if (m == 0) continue;
    const double mu = mean[g];
    if (deviations != nullptr) {
      if (m == 1) {
        deviations[position[b]] = nan;
      } else {
        const double f = std::sqrt((static_cast<double>(m) - 1.0) / static_cast<double>(m));
        for (std::size_t j = b; j < e; ++j) deviations[position[j]] = f * (I[j] - mu) / s[j];
      }
    }
    if (batch_index == nullptr) continue;
    for (std::size_t j = b; j < e; ++j) {
      const std::int64_t k = batch_index[j];
      if (k < 0) continue;
      n_obs[k] += 1;
      sum_abs_dev[k] += std::fabs(I[j] - mu);
      sum_i[k] += I[j];
      sum_ios[k] += I[j] / s[j];
    }
  }
}

bool sorted_values_at(std::size_t n, const double* values, std::size_t n_positions,
                      const std::int64_t* positions, double* out) {
  if (n_positions == 0) return true;
  for (std::size_t k = 0; k < n_positions; ++k) require_index(positions[k], n, "positions");
  double lo = values[0], hi = values[0];
  bool finite = true;
  for (std::size_t i = 0; i < n; ++i) {
    const double v = values[i];
    finite = finite && std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!finite) return false;
  if (!(hi > lo)) {  // every value the same
    std::fill(out, out + n_positions, lo);
    return true;
  }
  // bucket(v) = min(B - 1, floor((v - lo) * scale)): non-decreasing in v (each step rounds
  // monotonically), so the values of a bucket lie between those of the buckets around it and
  // sorted[p] is the (p - values in lower buckets)-th smallest of p's bucket
  const std::size_t n_buckets = std::max<std::size_t>(1, std::min<std::size_t>(n / 64, std::size_t{1} << 14));
  const double scale = static_cast<double>(n_buckets) / (hi - lo);
  const auto bucket_of = [&](double v) {
    const double x = (v - lo) * scale;
    const auto b = x >= static_cast<double>(n_buckets) ? n_buckets - 1 : static_cast<std::size_t>(x);
    return b;
  };
  std::vector<std::int64_t> start(n_buckets + 1, 0);
  for (std::size_t i = 0; i < n; ++i) ++start[bucket_of(values[i]) + 1];
  for (std::size_t b = 0; b < n_buckets; ++b) start[b + 1] += start[b];
  // the buckets holding a position, each given a slot
  std::vector<std::int64_t> slot(n_buckets, -1);
  std::vector<std::size_t> slot_bucket;
  std::vector<std::size_t> bucket_of_position(n_positions);
  for (std::size_t k = 0; k < n_positions; ++k) {
    const auto b = static_cast<std::size_t>(
        std::upper_bound(start.begin(), start.end(), positions[k]) - start.begin() - 1);
    bucket_of_position[k] = b;
    if (slot[b] < 0) {
      slot[b] = static_cast<std::int64_t>(slot_bucket.size());
      slot_bucket.push_back(b);
    }
  }
  std::vector<std::vector<double>> held(slot_bucket.size());
  for (std::size_t t = 0; t < slot_bucket.size(); ++t)
    held[t].reserve(static_cast<std::size_t>(start[slot_bucket[t] + 1] - start[slot_bucket[t]]));
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t t = slot[bucket_of(values[i])];
    if (t >= 0) held[static_cast<std::size_t>(t)].push_back(values[i]);
  }
  for (auto& h : held) std::sort(h.begin(), h.end());
  for (std::size_t k = 0; k < n_positions; ++k) {
    const std::size_t b = bucket_of_position[k];
    const auto rank = static_cast<std::size_t>(positions[k] - start[b]);
    out[k] = held[static_cast<std::size_t>(slot[b])][rank];
  }
  return true;
}

}  // namespace xtalscale
