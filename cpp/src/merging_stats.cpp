// Merging statistics over grouped observations (see merging_stats.hpp).
#include "xtalscale/merging_stats.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// splitmix64: a counter-based generator, so every group gets its own reproducible stream
// (seeded by the user seed, the group index and a sub-stream), whatever order groups are
// processed in.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform integer in [0, bound) for bound < 2^32 by 32-bit multiply-shift (bias below
  // bound/2^32, far below anything a statistic could see for group sizes).
  std::size_t below(std::size_t bound) {
    return static_cast<std::size_t>(((next() >> 32) * static_cast<std::uint64_t>(bound)) >> 32);
  }
};

SplitMix64 stream(std::uint64_t seed, std::size_t group, std::uint64_t sub) {
  SplitMix64 g{seed * 0xD1B54A32D192ED03ULL + 0x8CB92BA72F3D8DD7ULL * (group + 1) + sub};
  g.next();
  return g;
}

// Weighted merge of one set of observations (cctbx merge_equivalents_obs).
struct Merged {
  double mean = 0, sigma = 0, sigma_internal = 0;
};

Merged merge(const std::int64_t* idx, std::size_t m, const double* I, const double* s,
             const MergingOptions& opt) {
  Merged r;
  double max_sigma = 0;
  for (std::size_t i = 0; i < m; ++i) max_sigma = std::max(max_sigma, s[idx[i]]);
  const double threshold = opt.sigma_dynamic_range > 0 ? max_sigma * opt.sigma_dynamic_range : 0;
  double sw = 0, swx = 0, sww = 0, last_sigma = 0, last_value = 0;
  std::size_t used = 0;
  for (std::size_t i = 0; i < m; ++i) {
    const double si = s[idx[i]];
    if (!(si > threshold)) continue;
    const double w = 1.0 / (si * si);
    sw += w;
    swx += w * I[idx[i]];
    sww += w * w;
    last_sigma = si;
    last_value = I[idx[i]];
    ++used;
  }
  if (used == 0) return r;  // cctbx: mean 0, sigma 0
  if (used == 1) {
    r.mean = last_value;
    r.sigma = r.sigma_internal = last_sigma;
    return r;
  }
  r.mean = swx / sw;
  double sdev = 0;
  for (std::size_t i = 0; i < m; ++i) {
    const double si = s[idx[i]];
    if (!(si > threshold)) continue;
    const double d = I[idx[i]] - r.mean;
    sdev += d * d / (si * si);
  }
  // GSL's weighted variance (scitbx mean_and_variance::gsl_stats_wvariance).
  const double denom = sw * sw - sww;
  const double wvar = denom > 0 ? sw / denom * sdev : 0.0;
  const double external = 1.0 / sw;
  r.sigma_internal = std::sqrt(std::max(wvar / static_cast<double>(used), external));
  r.sigma = opt.use_internal_variance ? r.sigma_internal : std::sqrt(external);
  return r;
}

// Shuffle idx[0..m) with the generator and return the means (1/sigma^2-weighted if asked) of
// the first floor(m/2) and of the remaining observations.
void half_means(std::int64_t* idx, std::size_t m, const double* I, const double* s,
                SplitMix64 gen, bool weighted, double& h1, double& h2) {
  for (std::size_t i = m - 1; i > 0; --i) std::swap(idx[i], idx[gen.below(i + 1)]);
  const std::size_t split = m / 2;
  double sw1 = 0, swx1 = 0, sw2 = 0, swx2 = 0;
  for (std::size_t i = 0; i < m; ++i) {
    const double w = weighted ? 1.0 / (s[idx[i]] * s[idx[i]]) : 1.0;
    if (i < split) {
      sw1 += w;
      swx1 += w * I[idx[i]];
    } else {
      sw2 += w;
      swx2 += w * I[idx[i]];
    }
  }
  h1 = swx1 / sw1;
  h2 = swx2 / sw2;
}

// Pearson correlation accumulated in two passes (means first) for accuracy.
struct Correlation {
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  std::int64_t n = 0;
  void add_mean(double x, double y) {
    sx += x;
    sy += y;
    ++n;
  }
  void add_centered(double x, double y) {
    const double dx = x - sx / static_cast<double>(n), dy = y - sy / static_cast<double>(n);
    sxx += dx * dx;
    syy += dy * dy;
    sxy += dx * dy;
  }
  // cctbx linear_correlation: 0 when not well defined.
  double coefficient() const {
    if (n < 2 || !(sxx > 0) || !(syy > 0)) return 0.0;
    return sxy / std::sqrt(sxx * syy);
  }
};

struct ShellWork {
  Correlation cc_half, cc_anom;
  double sum_y = 0, sum_yy_c = 0, sum_s2 = 0;  // sigma-tau
};

struct AnomPair {
  std::int32_t shell;
  double d1, d2;
};

void validate(const double* I, const double* s, std::size_t n, const std::int64_t* order,
              const std::int64_t* offsets, std::size_t n_groups) {
  require(n == 0 || (I != nullptr && s != nullptr && order != nullptr),
          "intensity, sigma and order are required");
  require(offsets != nullptr, "offsets are required");
  require(offsets[0] == 0, "offsets[0] must be 0");
  require(offsets[n_groups] == static_cast<std::int64_t>(n),
          "offsets[-1] must equal the number of observations (" + std::to_string(n) + ")");
  for (std::size_t g = 0; g < n_groups; ++g)
    require(offsets[g + 1] >= offsets[g], "offsets must be non-decreasing (group " +
                                              std::to_string(g) + ")");
  for (std::size_t i = 0; i < n; ++i) {
    require_index(order[i], n, "order");
    if (!std::isfinite(I[i]))
      throw std::invalid_argument("intensity must be finite (element " + std::to_string(i) +
                                  ")");
    if (!(std::isfinite(s[i]) && s[i] > 0))
      throw std::invalid_argument("sigma must be finite and > 0 (element " + std::to_string(i) +
                                  " is " + std::to_string(s[i]) + ")");
  }
}

}  // namespace

MergingStatistics compute_merging_statistics(
    const double* I, const double* s, const std::uint8_t* minus, std::size_t n,
    const std::int64_t* order, const std::int64_t* offsets, std::size_t n_groups,
    const std::int32_t* group_shell, const std::uint8_t* group_centric, std::size_t n_shells,
    const MergingOptions& opt) {
  validate(I, s, n, order, offsets, n_groups);
  require(n_groups == 0 || group_shell != nullptr, "group_shell is required");
  for (std::size_t g = 0; g < n_groups; ++g)
    require(group_shell[g] >= -1 && group_shell[g] < static_cast<std::int64_t>(n_shells),
            "group_shell: group " + std::to_string(g) + " has shell " +
                std::to_string(group_shell[g]) + ", outside [-1, " + std::to_string(n_shells) +
                ")");
  MergingStatistics out;
  out.shells.assign(n_shells + 1, ShellStatistics{});
  std::vector<ShellWork> work(n_shells + 1);
  std::vector<std::int32_t> uniq_shell;
  std::vector<AnomPair> pairs;
  MergedReflections& mr = out.merged;
  const std::size_t reserve = n_groups + (opt.anomalous ? n_groups / 2 : 0);
  for (auto* v : {&mr.intensity, &mr.sigma, &mr.sigma_internal, &mr.half1, &mr.half2})
    v->reserve(reserve);
  mr.group.reserve(reserve);
  mr.bijvoet.reserve(reserve);
  mr.multiplicity.reserve(reserve);
  uniq_shell.reserve(reserve);

  std::vector<std::int64_t> all, plus, minus_obs, scratch;
  const std::size_t overall = n_shells;

  // Merge one set of observations into a unique reflection and accumulate its shell sums.
  auto add_unique = [&](std::size_t g, std::int8_t bijvoet, std::vector<std::int64_t>& idx,
                        std::int32_t shell, std::uint64_t sub) {
    const std::size_t m = idx.size();
    const Merged r = merge(idx.data(), m, I, s, opt);
    double h1 = kNaN, h2 = kNaN;
    double abs_dev = 0, sum_i = 0, unmerged_ios = 0;
    for (std::size_t i = 0; i < m; ++i) {
      abs_dev += std::fabs(I[idx[i]] - r.mean);
      sum_i += I[idx[i]];
      unmerged_ios += I[idx[i]] / s[idx[i]];
    }
    if (m >= 2) {
      scratch.assign(idx.begin(), idx.end());
      half_means(scratch.data(), m, I, s, stream(opt.seed, g, sub), opt.weighted_halves, h1, h2);
    }
    mr.group.push_back(static_cast<std::int64_t>(g));
    mr.bijvoet.push_back(bijvoet);
    mr.intensity.push_back(r.mean);
    mr.sigma.push_back(r.sigma);
    mr.sigma_internal.push_back(r.sigma_internal);
    mr.multiplicity.push_back(static_cast<std::int32_t>(m));
    mr.half1.push_back(h1);
    mr.half2.push_back(h2);
    uniq_shell.push_back(shell);
    if (shell < 0) return;
    for (std::size_t k : {static_cast<std::size_t>(shell), overall}) {
      ShellStatistics& st = out.shells[k];
      st.n_obs += static_cast<std::int64_t>(m);
      st.n_uniq += 1;
      st.sum_i += r.mean;
      st.sum_sigma += r.sigma;
      if (r.sigma > 0) {
        st.sum_i_over_sigma += r.mean / r.sigma;
        st.n_i_over_sigma += 1;
      }
      st.sum_unmerged_i_over_sigma += unmerged_ios;
      st.n_unmerged_positive_sigma += static_cast<std::int64_t>(m);
      if (m > 1) {
        const double dm = static_cast<double>(m);
        st.n_multi += 1;
        st.r_num += abs_dev;
        st.r_meas_num += std::sqrt(dm / (dm - 1.0)) * abs_dev;
        st.r_pim_num += std::sqrt(1.0 / (dm - 1.0)) * abs_dev;
        st.r_den += sum_i;
        work[k].cc_half.add_mean(h1, h2);
        work[k].sum_y += r.mean;
        work[k].sum_s2 += r.sigma_internal * r.sigma_internal;
      }
    }
  };

  for (std::size_t g = 0; g < n_groups; ++g) {
    const std::int64_t b = offsets[g], e = offsets[g + 1];
    if (e == b) continue;
    const std::int32_t shell = group_shell[g];
    const bool centric = group_centric != nullptr && group_centric[g] != 0;
    all.assign(order + b, order + e);
    if (centric || minus == nullptr) {
      add_unique(g, 0, all, shell, 0);
      continue;
    }
    plus.clear();
    minus_obs.clear();
    for (std::int64_t i : all) (minus[i] ? minus_obs : plus).push_back(i);
    if (shell >= 0) {
      for (std::size_t k : {static_cast<std::size_t>(shell), overall}) {
        out.shells[k].n_acentric += 1;
        if (!plus.empty() && !minus_obs.empty()) out.shells[k].n_bijvoet_pairs += 1;
      }
    }
    if (plus.size() >= 2 && minus_obs.size() >= 2) {
      double p1, p2, m1, m2;
      scratch.assign(plus.begin(), plus.end());
      half_means(scratch.data(), plus.size(), I, s, stream(opt.seed, g, 3), opt.weighted_halves, p1, p2);
      scratch.assign(minus_obs.begin(), minus_obs.end());
      half_means(scratch.data(), minus_obs.size(), I, s, stream(opt.seed, g, 4), opt.weighted_halves, m1, m2);
      pairs.push_back({shell, p1 - m1, p2 - m2});
    }
    if (!opt.anomalous) {
      add_unique(g, 0, all, shell, 0);
    } else {
      if (!plus.empty()) add_unique(g, 1, plus, shell, 1);
      if (!minus_obs.empty()) add_unique(g, -1, minus_obs, shell, 2);
    }
  }

  // Second pass: centred sums for the correlations and the sigma-tau variance.
  for (const AnomPair& p : pairs) {
    if (p.shell < 0) continue;
    for (std::size_t k : {static_cast<std::size_t>(p.shell), overall})
      work[k].cc_anom.add_mean(p.d1, p.d2);
  }
  for (const AnomPair& p : pairs) {
    if (p.shell < 0) continue;
    for (std::size_t k : {static_cast<std::size_t>(p.shell), overall})
      work[k].cc_anom.add_centered(p.d1, p.d2);
  }
  for (std::size_t u = 0; u < uniq_shell.size(); ++u) {
    if (uniq_shell[u] < 0 || mr.multiplicity[u] < 2) continue;
    for (std::size_t k : {static_cast<std::size_t>(uniq_shell[u]), overall}) {
      work[k].cc_half.add_centered(mr.half1[u], mr.half2[u]);
      const double dy = mr.intensity[u] - work[k].sum_y / static_cast<double>(out.shells[k].n_multi);
      work[k].sum_yy_c += dy * dy;
    }
  }
  for (std::size_t k = 0; k <= n_shells; ++k) {
    ShellStatistics& st = out.shells[k];
    const ShellWork& w = work[k];
    if (st.r_den != 0) {
      st.r_merge = st.r_num / st.r_den;
      st.r_meas = st.r_meas_num / st.r_den;
      st.r_pim = st.r_pim_num / st.r_den;
    }
    st.cc_half = w.cc_half.coefficient();
    st.cc_half_n = w.cc_half.n;
    st.cc_anom = w.cc_anom.coefficient();
    st.cc_anom_n = w.cc_anom.n;
    st.cc_half_sigma_tau_n = st.n_multi;
    if (st.n_multi >= 2) {
      const double var_y = w.sum_yy_c / static_cast<double>(st.n_multi - 1);
      const double var_e = w.sum_s2 / static_cast<double>(st.n_multi);
      if (var_y + var_e > 0) st.cc_half_sigma_tau = (var_y - var_e) / (var_y + var_e);
    }
  }
  return out;
}

void normalised_deviations(const double* I, const double* s, std::size_t n,
                           const std::int64_t* order, const std::int64_t* offsets,
                           std::size_t n_groups, double* out) {
  validate(I, s, n, order, offsets, n_groups);
  const MergingOptions opt;
  for (std::size_t g = 0; g < n_groups; ++g) {
    const std::int64_t b = offsets[g], e = offsets[g + 1];
    const std::size_t m = static_cast<std::size_t>(e - b);
    if (m == 0) continue;
    if (m == 1) {
      out[order[b]] = kNaN;
      continue;
    }
    const double mean = merge(order + b, m, I, s, opt).mean;
    const double f = std::sqrt((static_cast<double>(m) - 1.0) / static_cast<double>(m));
    for (std::int64_t j = b; j < e; ++j) out[order[j]] = f * (I[order[j]] - mean) / s[order[j]];
  }
}

void batch_sums(const double* I, const double* s, std::size_t n, const std::int64_t* order,
                const std::int64_t* offsets, std::size_t n_groups,
                const std::int64_t* batch_index, std::size_t n_batches, std::int64_t* n_obs,
                double* sum_abs_dev, double* sum_i, double* sum_ios) {
  validate(I, s, n, order, offsets, n_groups);
  for (std::size_t i = 0; i < n; ++i)
    require(batch_index[i] >= -1 && batch_index[i] < static_cast<std::int64_t>(n_batches),
            "batch_index: element " + std::to_string(i) + " is outside [-1, n_batches)");
  std::fill(n_obs, n_obs + n_batches, 0);
  std::fill(sum_abs_dev, sum_abs_dev + n_batches, 0.0);
  std::fill(sum_i, sum_i + n_batches, 0.0);
  std::fill(sum_ios, sum_ios + n_batches, 0.0);
  const MergingOptions opt;
  for (std::size_t g = 0; g < n_groups; ++g) {
    const std::int64_t b = offsets[g], e = offsets[g + 1];
    if (e == b) continue;
    const double mean = merge(order + b, static_cast<std::size_t>(e - b), I, s, opt).mean;
    for (std::int64_t j = b; j < e; ++j) {
      const std::int64_t i = order[j];
      const std::int64_t k = batch_index[i];
      if (k < 0) continue;
      n_obs[k] += 1;
      sum_abs_dev[k] += std::fabs(I[i] - mean);
      sum_i[k] += I[i];
      sum_ios[k] += I[i] / s[i];
    }
  }
}

}  // namespace xtalscale
