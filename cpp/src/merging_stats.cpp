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

// A set of observations laid out contiguously: values, sigmas and weights 1/sigma^2.
struct Obs {
  const double* I;
  const double* s;
  const double* w;
  std::size_t m;
};

// Weighted merge of one set of observations (cctbx merge_equivalents_obs).
struct Merged {
  double mean = 0, sigma = 0, sigma_internal = 0;
};

Merged merge(const Obs& o, const MergingOptions& opt) {
  Merged r;
  double max_sigma = 0;
  for (std::size_t i = 0; i < o.m; ++i) max_sigma = std::max(max_sigma, o.s[i]);
  const double threshold = opt.sigma_dynamic_range > 0 ? max_sigma * opt.sigma_dynamic_range : 0;
  double sw = 0, swx = 0, sww = 0, last_sigma = 0, last_value = 0;
  std::size_t used = 0;
  for (std::size_t i = 0; i < o.m; ++i) {
    if (!(o.s[i] > threshold)) continue;
    const double w = o.w[i];
    sw += w;
    swx += w * o.I[i];
    sww += w * w;
    last_sigma = o.s[i];
    last_value = o.I[i];
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
  for (std::size_t i = 0; i < o.m; ++i) {
    if (!(o.s[i] > threshold)) continue;
    const double d = o.I[i] - r.mean;
    sdev += d * d * o.w[i];
  }
  // GSL's weighted variance (scitbx mean_and_variance::gsl_stats_wvariance).
  const double denom = sw * sw - sww;
  const double wvar = denom > 0 ? sw / denom * sdev : 0.0;
  const double external = 1.0 / sw;
  r.sigma_internal = std::sqrt(std::max(wvar / static_cast<double>(used), external));
  r.sigma = opt.use_internal_variance ? r.sigma_internal : std::sqrt(external);
  return r;
}

// Random half split of o (m >= 2): a partial Fisher-Yates shuffle of positions picks
// floor(m/2) observations for the first half; returns the means (1/sigma^2-weighted if asked)
// of that half and of the rest. perm is scratch of at least m entries.
void half_means(const Obs& o, SplitMix64 gen, bool weighted, std::uint32_t* perm, double& h1,
                double& h2) {
  const std::size_t m = o.m, split = m / 2;
  for (std::size_t i = 0; i < m; ++i) perm[i] = static_cast<std::uint32_t>(i);
  double sw1 = 0, swx1 = 0;
  for (std::size_t i = 0; i < split; ++i) {
    std::swap(perm[i], perm[i + gen.below(m - i)]);
    const std::uint32_t k = perm[i];
    const double w = weighted ? o.w[k] : 1.0;
    sw1 += w;
    swx1 += w * o.I[k];
  }
  h1 = swx1 / sw1;
  double sw2 = 0, swx2 = 0;
  for (std::size_t i = split; i < m; ++i) {
    const std::uint32_t k = perm[i];
    const double w = weighted ? o.w[k] : 1.0;
    sw2 += w;
    swx2 += w * o.I[k];
  }
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

// Observations in group order (contiguous per group), validated on the way. When the
// caller's arrays are in group order already (order is the identity), the values are read
// in place and only the weights are stored.
struct Sorted {
  const double* I = nullptr;
  const double* s = nullptr;
  const double* w = nullptr;
  const std::uint8_t* minus = nullptr;  // nullptr: no Friedel flags
  std::vector<double> I_store, s_store, w_store;
  std::vector<std::uint8_t> minus_store;
};

void check_offsets(std::size_t n, const std::int64_t* offsets, std::size_t n_groups) {
  require_group_offsets(offsets, n_groups);
  require(offsets[n_groups] == static_cast<std::int64_t>(n),
          "offsets[-1] must equal the number of observations (" + std::to_string(n) + ")");
  // (messages are built only on failure: this loop runs once per group)
  for (std::size_t g = 0; g < n_groups; ++g) {
    if (offsets[g + 1] - offsets[g] >= (std::int64_t{1} << 31))
      throw std::invalid_argument("group " + std::to_string(g) +
                                  " has 2^31 or more observations");
  }
}

void check_observation(const double* I, const double* s, std::int64_t i) {
  const double v = I[i], si = s[i];
  if (!std::isfinite(v))
    throw std::invalid_argument("intensity must be finite (element " + std::to_string(i) + ")");
  if (!(std::isfinite(si) && si > 0))
    throw std::invalid_argument("sigma must be finite and > 0 (element " + std::to_string(i) +
                                " is " + std::to_string(si) + ")");
}

Sorted gather(const double* I, const double* s, const std::uint8_t* minus, std::size_t n,
              const std::int64_t* order, const std::int64_t* offsets, std::size_t n_groups) {
  require(n == 0 || (I != nullptr && s != nullptr && order != nullptr),
          "intensity, sigma and order are required");
  check_offsets(n, offsets, n_groups);
  Sorted out;
  out.w_store.resize(n);
  bool identity = true;
  for (std::size_t j = 0; j < n && identity; ++j) identity = order[j] == static_cast<std::int64_t>(j);
  if (identity) {
    for (std::size_t j = 0; j < n; ++j) {
      check_observation(I, s, static_cast<std::int64_t>(j));
      out.w_store[j] = 1.0 / (s[j] * s[j]);
    }
    out.I = I;
    out.s = s;
    out.minus = minus;  // (any nonzero flag counts as minus, as below)
    out.w = out.w_store.data();
    if (minus != nullptr) {
      bool only_01 = true;
      for (std::size_t j = 0; j < n && only_01; ++j) only_01 = minus[j] <= 1;
      if (!only_01) {
        out.minus_store.assign(minus, minus + n);
        for (auto& f : out.minus_store) f = f != 0;
        out.minus = out.minus_store.data();
      }
    }
    return out;
  }
  out.I_store.resize(n);
  out.s_store.resize(n);
  if (minus != nullptr) out.minus_store.resize(n);
  for (std::size_t j = 0; j < n; ++j) {
    const std::int64_t i = order[j];
    require_index(i, n, "order");
    check_observation(I, s, i);
    out.I_store[j] = I[i];
    out.s_store[j] = s[i];
    out.w_store[j] = 1.0 / (s[i] * s[i]);
    if (minus != nullptr) out.minus_store[j] = minus[i] != 0;
  }
  out.I = out.I_store.data();
  out.s = out.s_store.data();
  out.w = out.w_store.data();
  out.minus = minus != nullptr ? out.minus_store.data() : nullptr;
  return out;
}

// Copy the observations of one group with the given Friedel flag into buffers.
void select_mate(const Sorted& d, std::size_t b, std::size_t e, std::uint8_t flag,
                 std::vector<double>& I, std::vector<double>& s, std::vector<double>& w) {
  I.clear();
  s.clear();
  w.clear();
  for (std::size_t j = b; j < e; ++j) {
    if (d.minus[j] != flag) continue;
    I.push_back(d.I[j]);
    s.push_back(d.s[j]);
    w.push_back(d.w[j]);
  }
}

}  // namespace

namespace {

// One unique reflection's merge, half means and sums (the same for every pass that counts it).
struct Unique {
  std::size_t group;
  std::int8_t bijvoet;
  std::size_t m;
  Merged r;
  double h1, h2, abs_dev, sum_i, unmerged_ios;
};

// One mode's (anomalous or not) accumulation over the groups.
struct Pass {
  MergingStatistics out;
  std::vector<ShellWork> work;
  std::vector<std::int32_t> uniq_shell;
  std::vector<AnomPair> pairs;
  bool anomalous;

  Pass(std::size_t n_shells, std::size_t n_groups, bool anomalous_)
      : work(n_shells + 1), anomalous(anomalous_) {
    out.shells.assign(n_shells + 1, ShellStatistics{});
    MergedReflections& mr = out.merged;
    const std::size_t reserve = n_groups + (anomalous ? n_groups / 2 : 0);
    for (auto* v : {&mr.intensity, &mr.sigma, &mr.sigma_internal, &mr.half1, &mr.half2})
      v->reserve(reserve);
    mr.group.reserve(reserve);
    mr.bijvoet.reserve(reserve);
    mr.multiplicity.reserve(reserve);
    uniq_shell.reserve(reserve);
  }

  // Record a unique reflection and accumulate its shell sums.
  void add(const Unique& u, std::int32_t shell) {
    MergedReflections& mr = out.merged;
    const std::size_t m = u.m;
    const Merged& r = u.r;
    mr.group.push_back(static_cast<std::int64_t>(u.group));
    mr.bijvoet.push_back(u.bijvoet);
    mr.intensity.push_back(r.mean);
    mr.sigma.push_back(r.sigma);
    mr.sigma_internal.push_back(r.sigma_internal);
    mr.multiplicity.push_back(static_cast<std::int32_t>(m));
    mr.half1.push_back(u.h1);
    mr.half2.push_back(u.h2);
    uniq_shell.push_back(shell);
    if (shell < 0) return;
    const std::size_t overall = out.shells.size() - 1;
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
      st.sum_unmerged_i_over_sigma += u.unmerged_ios;
      st.n_unmerged_positive_sigma += static_cast<std::int64_t>(m);
      if (m > 1) {
        const double dm = static_cast<double>(m);
        st.n_multi += 1;
        st.r_num += u.abs_dev;
        st.r_meas_num += std::sqrt(dm / (dm - 1.0)) * u.abs_dev;
        st.r_pim_num += std::sqrt(1.0 / (dm - 1.0)) * u.abs_dev;
        st.r_den += u.sum_i;
        work[k].cc_half.add_mean(u.h1, u.h2);
        work[k].sum_y += r.mean;
        work[k].sum_s2 += r.sigma_internal * r.sigma_internal;
      }
    }
  }

  // Second pass: centred sums for the correlations and the sigma-tau variance; the ratios.
  void finish() {
    const std::size_t n_shells = out.shells.size() - 1, overall = n_shells;
    const MergedReflections& mr = out.merged;
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
        const double dy =
            mr.intensity[u] - work[k].sum_y / static_cast<double>(out.shells[k].n_multi);
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
  }
};

// The merging statistics of one or two passes (non-anomalous and/or anomalous, the options
// otherwise alike) in one loop over the groups: the Friedel mates are selected, the CC_ano
// half means made and every unique reflection merged once for the passes that count it.
std::vector<MergingStatistics> compute_passes(
    const double* I, const double* s, const std::uint8_t* minus, std::size_t n,
    const std::int64_t* order, const std::int64_t* offsets, std::size_t n_groups,
    const std::int32_t* group_shell, const std::uint8_t* group_centric, std::size_t n_shells,
    const MergingOptions& opt, const std::vector<bool>& modes) {
  require(n_groups == 0 || group_shell != nullptr, "group_shell is required");
  for (std::size_t g = 0; g < n_groups; ++g)
    if (group_shell[g] < -1 || group_shell[g] >= static_cast<std::int64_t>(n_shells))
      throw std::invalid_argument("group_shell: group " + std::to_string(g) + " has shell " +
                                  std::to_string(group_shell[g]) + ", outside [-1, " +
                                  std::to_string(n_shells) + ")");
  const Sorted d = gather(I, s, minus, n, order, offsets, n_groups);
  std::vector<Pass> passes;
  passes.reserve(modes.size());
  for (bool anomalous : modes) passes.emplace_back(n_shells, n_groups, anomalous);

  std::vector<double> pI, ps, pw, mI, ms, mw;  // I(+) and I(-) of the current group
  std::vector<std::uint32_t> perm;

  // Merge one set of observations into a unique reflection (merge, sums, half means).
  auto make_unique = [&](std::size_t g, std::int8_t bijvoet, const Obs& o, std::uint64_t sub) {
    Unique u{g, bijvoet, o.m, merge(o, opt), kNaN, kNaN, 0, 0, 0};
    for (std::size_t i = 0; i < o.m; ++i) {
      u.abs_dev += std::fabs(o.I[i] - u.r.mean);
      u.sum_i += o.I[i];
      u.unmerged_ios += o.I[i] / o.s[i];
    }
    if (o.m >= 2) {
      if (perm.size() < o.m) perm.resize(o.m);
      half_means(o, stream(opt.seed, g, sub), opt.weighted_halves, perm.data(), u.h1, u.h2);
    }
    return u;
  };

  for (std::size_t g = 0; g < n_groups; ++g) {
    const auto b = static_cast<std::size_t>(offsets[g]), e = static_cast<std::size_t>(offsets[g + 1]);
    if (e == b) continue;
    const std::int32_t shell = group_shell[g];
    const bool centric = group_centric != nullptr && group_centric[g] != 0;
    const Obs all{d.I + b, d.s + b, d.w + b, e - b};
    if (centric || d.minus == nullptr) {
      const Unique u = make_unique(g, 0, all, 0);
      for (Pass& p : passes) p.add(u, shell);
      continue;
    }
    select_mate(d, b, e, 0, pI, ps, pw);
    select_mate(d, b, e, 1, mI, ms, mw);
    const Obs plus{pI.data(), ps.data(), pw.data(), pI.size()};
    const Obs minus_o{mI.data(), ms.data(), mw.data(), mI.size()};
    if (shell >= 0) {
      for (Pass& p : passes) {
        for (std::size_t k : {static_cast<std::size_t>(shell), n_shells}) {
          p.out.shells[k].n_acentric += 1;
          if (plus.m > 0 && minus_o.m > 0) p.out.shells[k].n_bijvoet_pairs += 1;
        }
      }
    }
    if (plus.m >= 2 && minus_o.m >= 2) {
      double p1, p2, m1, m2;
      if (perm.size() < e - b) perm.resize(e - b);
      half_means(plus, stream(opt.seed, g, 3), opt.weighted_halves, perm.data(), p1, p2);
      half_means(minus_o, stream(opt.seed, g, 4), opt.weighted_halves, perm.data(), m1, m2);
      for (Pass& p : passes) p.pairs.push_back({shell, p1 - m1, p2 - m2});
    }
    for (Pass& p : passes) {
      if (!p.anomalous) {
        p.add(make_unique(g, 0, all, 0), shell);
      } else {
        if (plus.m > 0) p.add(make_unique(g, 1, plus, 1), shell);
        if (minus_o.m > 0) p.add(make_unique(g, -1, minus_o, 2), shell);
      }
    }
  }
  std::vector<MergingStatistics> out;
  out.reserve(passes.size());
  for (Pass& p : passes) {
    p.finish();
    out.push_back(std::move(p.out));
  }
  return out;
}

}  // namespace

MergingStatistics compute_merging_statistics(
    const double* I, const double* s, const std::uint8_t* minus, std::size_t n,
    const std::int64_t* order, const std::int64_t* offsets, std::size_t n_groups,
    const std::int32_t* group_shell, const std::uint8_t* group_centric, std::size_t n_shells,
    const MergingOptions& opt) {
  return std::move(compute_passes(I, s, minus, n, order, offsets, n_groups, group_shell,
                                  group_centric, n_shells, opt, {opt.anomalous})[0]);
}

std::pair<MergingStatistics, MergingStatistics> compute_merging_statistics_both(
    const double* I, const double* s, const std::uint8_t* minus, std::size_t n,
    const std::int64_t* order, const std::int64_t* offsets, std::size_t n_groups,
    const std::int32_t* group_shell, const std::uint8_t* group_centric, std::size_t n_shells,
    const MergingOptions& opt) {
  auto both = compute_passes(I, s, minus, n, order, offsets, n_groups, group_shell,
                             group_centric, n_shells, opt, {false, true});
  return {std::move(both[0]), std::move(both[1])};
}

void normalised_deviations(const double* I, const double* s, std::size_t n,
                           const std::int64_t* order, const std::int64_t* offsets,
                           std::size_t n_groups, double* out) {
  deviations_and_batch_sums(I, s, n, order, offsets, n_groups, out, nullptr, 0, nullptr,
                            nullptr, nullptr, nullptr);
}

void batch_sums(const double* I, const double* s, std::size_t n, const std::int64_t* order,
                const std::int64_t* offsets, std::size_t n_groups,
                const std::int64_t* batch_index, std::size_t n_batches, std::int64_t* n_obs,
                double* sum_abs_dev, double* sum_i, double* sum_ios) {
  require(batch_index != nullptr || n == 0, "batch_index is required");
  deviations_and_batch_sums(I, s, n, order, offsets, n_groups, nullptr, batch_index, n_batches,
                            n_obs, sum_abs_dev, sum_i, sum_ios);
}

void deviations_and_batch_sums(const double* I, const double* s, std::size_t n,
                               const std::int64_t* order, const std::int64_t* offsets,
                               std::size_t n_groups, double* deviations,
                               const std::int64_t* batch_index, std::size_t n_batches,
                               std::int64_t* n_obs, double* sum_abs_dev, double* sum_i,
                               double* sum_ios) {
  const Sorted d = gather(I, s, nullptr, n, order, offsets, n_groups);
  require(batch_index != nullptr || n_batches == 0,
          "n_batches must be 0 without batch_index");
  if (batch_index != nullptr) {
    for (std::size_t i = 0; i < n; ++i)
      if (batch_index[i] < -1 || batch_index[i] >= static_cast<std::int64_t>(n_batches))
        throw std::invalid_argument("batch_index: element " + std::to_string(i) +
                                    " is outside [-1, n_batches)");
    std::fill(n_obs, n_obs + n_batches, 0);
    std::fill(sum_abs_dev, sum_abs_dev + n_batches, 0.0);
    std::fill(sum_i, sum_i + n_batches, 0.0);
    std::fill(sum_ios, sum_ios + n_batches, 0.0);
  }
  const MergingOptions opt;
  for (std::size_t g = 0; g < n_groups; ++g) {
    const auto b = static_cast<std::size_t>(offsets[g]), e = static_cast<std::size_t>(offsets[g + 1]);
    const std::size_t m = e - b;
    if (m == 0) continue;
    const double mean = merge(Obs{d.I + b, d.s + b, d.w + b, m}, opt).mean;
    if (deviations != nullptr) {
      if (m == 1) {
        deviations[order[b]] = kNaN;
      } else {
        const double f = std::sqrt((static_cast<double>(m) - 1.0) / static_cast<double>(m));
        for (std::size_t j = b; j < e; ++j) deviations[order[j]] = f * (d.I[j] - mean) / d.s[j];
      }
    }
    if (batch_index == nullptr) continue;
    for (std::size_t j = b; j < e; ++j) {
      const std::int64_t k = batch_index[order[j]];
      if (k < 0) continue;
      n_obs[k] += 1;
      sum_abs_dev[k] += std::fabs(d.I[j] - mean);
      sum_i[k] += d.I[j];
      sum_ios[k] += d.I[j] / d.s[j];
    }
  }
}

}  // namespace xtalscale
