// Per-group kernels of the scaling job (see group_kernels.hpp).
#include "xtalscale/group_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "fit_parallel.hpp"
#include "internal/row_prefetch.hpp"
#include "xtalscale/check.hpp"

namespace xtalscale {
namespace {

// The per-row loops of the b search and of the leave-one-out deviations are dominated by
// sqrt and division; they are written branch-free so that they vectorise (this file is built
// with -fno-math-errno and -fno-trapping-math, so sqrt needs no error path and a lane's result
// may be computed and then not chosen, and with -ffp-contract=off, so that no build fuses a
// multiply-add and changes a bit). Wider vectors gain nothing here: the divider
// handles the same number of values per cycle.

/// Σ w·g·I and Σ w·g² over group @p k (one summation order for every kernel below).
struct GroupWeightedSums {
  double wgI = 0.0;
  double wgg = 0.0;
};

GroupWeightedSums weighted_sums_of_rows(const std::int64_t* rows, std::size_t n_members,
                                        const double* intensity, const double* weight,
                                        const double* scale) {
  GroupWeightedSums sums;
  for (std::size_t i = 0; i < n_members; ++i) {
    const auto r = rows[i];
    const double wg = weight[r] * scale[r];
    sums.wgI += wg * intensity[r];
    sums.wgg += wg * scale[r];
  }
  return sums;
}

GroupWeightedSums group_weighted_sums(const GroupLayout& layout, std::size_t k,
                                      const double* intensity, const double* weight,
                                      const double* scale) {
  const auto begin = layout.offsets[k];
  return weighted_sums_of_rows(layout.order + begin, static_cast<std::size_t>(layout.offsets[k + 1] - begin),
                               intensity, weight, scale);
}

/// One group's rows with their I, w and g copied next to each other. A group's rows are
/// scattered over the per-row arrays; the repeated passes of the outlier rounds then run on
/// these short contiguous copies (indexed by position, through @c positions = 0, 1, ...).
struct GatheredGroup {
  std::vector<std::int64_t> rows;
  std::vector<double> intensity, weight, scale;
  std::vector<std::int64_t> positions;

  void gather(const std::int64_t* group_rows, std::size_t n_members, const double* I, const double* w,
              const double* g) {
    rows.assign(group_rows, group_rows + n_members);
    intensity.resize(n_members);
    weight.resize(n_members);
    scale.resize(n_members);
    for (std::size_t i = 0; i < n_members; ++i) {
      const auto r = group_rows[i];
      intensity[i] = I[r];
      weight[i] = w[r];
      scale[i] = g[r];
    }
    while (positions.size() < n_members) positions.push_back(static_cast<std::int64_t>(positions.size()));
  }

  void erase(std::size_t i) {
    const auto at = static_cast<std::ptrdiff_t>(i);
    rows.erase(rows.begin() + at);
    intensity.erase(intensity.begin() + at);
    weight.erase(weight.begin() + at);
    scale.erase(scale.begin() + at);
  }
};

/// z of DIALS's leave-one-out deviation for contiguous rows, given the group's Σwgi = @p a
/// and Σwgg = @p b (1000 where the other rows have no weight). Branch-free, so it vectorises.
void leave_one_out_contiguous(std::size_t n, const double* __restrict intensity,
                                                      const double* __restrict weight,
                                                      const double* __restrict scale, double a, double b,
                                                      double* __restrict z) {
  for (std::size_t i = 0; i < n; ++i) {
    const double g = scale[i];
    const double wg = weight[i] * g;
    const double others_wgg = b - wg * g;
    // Subtracting the row from the totals is exact enough: others_wgg only vanishes when
    // every other row has zero scale, which DIALS maps to z = 1000 as well.
    const double others_mean = (a - wg * intensity[i]) / others_wgg;
    const double value = (intensity[i] - g * others_mean) / std::sqrt(1.0 / weight[i] + g * g / others_wgg);
    z[i] = others_wgg > 0.0 ? value : 1000.0;
  }
}

/// The leave-one-out normalised deviations of a gathered group with weights @p weight (per
/// position) written to z[position]; 0 for groups of two rows or fewer.
void leave_one_out_of_group(const GatheredGroup& group, const double* weight, double* z) {
  const std::size_t m = group.rows.size();
  if (m <= 2) {
    std::fill(z, z + m, 0.0);
    return;
  }
  for (std::size_t i = 0; i < m; ++i)
    if (!(weight[i] > 0.0))
      throw std::invalid_argument("weights must be positive (row " + std::to_string(group.rows[i]) + ")");
  const auto [a, b] = weighted_sums_of_rows(group.positions.data(), m, group.intensity.data(), weight,
                                            group.scale.data());
  leave_one_out_contiguous(m, group.intensity.data(), weight, group.scale.data(), a, b, z);
}

/// One group's weights capped at 10 x the group's median weight, written to out[row].
void cap_weights_of_rows(const std::int64_t* rows, std::size_t n_members, const double* weight,
                         double* out, std::vector<double>& buffer) {
  if (n_members == 0) return;
  // When the largest weight is at most 10 x the smallest, no weight reaches 10 x the median
  // (median >= smallest): the weights stay as they are and the median is not needed.
  double smallest = weight[rows[0]], largest = smallest;
  for (std::size_t i = 1; i < n_members; ++i) {
    smallest = std::min(smallest, weight[rows[i]]);
    largest = std::max(largest, weight[rows[i]]);
  }
  if (smallest >= 0.0 && largest <= 10.0 * smallest) {
    for (std::size_t i = 0; i < n_members; ++i) out[rows[i]] = weight[rows[i]];
    return;
  }
  buffer.clear();
  for (std::size_t i = 0; i < n_members; ++i) buffer.push_back(weight[rows[i]]);
  const std::size_t mid = n_members / 2;
  std::nth_element(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(mid), buffer.end());
  double median = buffer[mid];
  if (n_members % 2 == 0) {
    const double below = *std::max_element(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(mid));
    median = 0.5 * (median + below);
  }
  const double cap = 10.0 * median;
  for (std::size_t i = 0; i < n_members; ++i) out[rows[i]] = std::min(weight[rows[i]], cap);
}

/// The weights of a gathered group capped at 10 x its median (cap_weights_of_rows): the
/// group's own weights when none reaches the cap (the usual case: no copy), else @p capped.
const double* capped_weights(const GatheredGroup& group, std::vector<double>& capped, std::vector<double>& buffer) {
  const std::size_t m = group.rows.size();
  const double* w = group.weight.data();
  double smallest = w[0], largest = w[0];
  for (std::size_t i = 1; i < m; ++i) {
    smallest = std::min(smallest, w[i]);
    largest = std::max(largest, w[i]);
  }
  if (smallest >= 0.0 && largest <= 10.0 * smallest) return w;  // cap_weights_of_rows's shortcut
  capped.resize(m);
  cap_weights_of_rows(group.positions.data(), m, w, capped.data(), buffer);
  return capped.data();
}

/// Position of the largest |z[i]| of @p n values (the first maximum wins): what
/// position_of_largest gives on the magnitudes, without forming them.
std::size_t position_of_largest_magnitude(const double* z, std::size_t n) {
  std::size_t best = 0;
  double largest = std::abs(z[0]);
  for (std::size_t i = 1; i < n; ++i) {
    const double magnitude = std::abs(z[i]);
    if (magnitude > largest) {
      best = i;
      largest = magnitude;
    }
  }
  return best;
}

/// Position (in @p rows) of the largest values[row]; the first maximum wins.
std::size_t position_of_largest(const std::int64_t* rows, std::size_t n_members, const double* values) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < n_members; ++i)
    if (values[rows[i]] > values[rows[best]]) best = i;
  return best;
}

}  // namespace

void check_layout(const GroupLayout& layout) {
  require_group_offsets(layout.offsets, layout.n_groups);
  const auto n_sorted = static_cast<std::size_t>(layout.offsets[layout.n_groups]);
  for (std::size_t i = 0; i < n_sorted; ++i)
    require_index(static_cast<std::ptrdiff_t>(layout.order[i]), layout.n_rows, "order");
}

void group_of_rows(const GroupLayout& layout, std::int64_t* out) {
  std::fill(out, out + layout.n_rows, std::int64_t{-1});
  constexpr std::int64_t kAhead = 32;  // rows ahead whose slot is fetched for writing
  const std::int64_t end = layout.offsets[layout.n_groups];
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) {
      if (i + kAhead < end) __builtin_prefetch(out + layout.order[i + kAhead], 1);
      out[layout.order[i]] = static_cast<std::int64_t>(k);
    }
  }
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
  GatheredGroup group;
  std::vector<double> z_group;
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k];
    group.gather(layout.order + begin, static_cast<std::size_t>(layout.offsets[k + 1] - begin), intensity, weight,
                 scale);
    z_group.resize(group.rows.size());
    leave_one_out_of_group(group, group.weight.data(), z_group.data());
    for (std::size_t i = 0; i < group.rows.size(); ++i) z[group.rows[i]] = z_group[i];
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
    const auto best = begin + static_cast<std::int64_t>(position_of_largest(
                                  layout.order + begin, static_cast<std::size_t>(end - begin), abs_z));
    if (!(abs_z[layout.order[best]] > zmax)) continue;
    outliers.push_back(layout.order[best]);
    for (auto i = begin; i < end; ++i)
      if (i != best) potential.push_back(layout.order[i]);
  }
}

void limit_outlier_weights(const GroupLayout& layout, const double* weight, double* out) {
  std::vector<double> buffer;
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto begin = layout.offsets[k];
    cap_weights_of_rows(layout.order + begin, static_cast<std::size_t>(layout.offsets[k + 1] - begin),
                        weight, out, buffer);
  }
}

namespace {

/// DIALS's standard rejection on groups [first, last): each group alone until it yields no
/// outlier; the outliers appended to by_round[round] in group order.
/// The standard rejection of groups [first, last). Returns the first row (in group order) of
/// a tested group whose weight is not positive, or -1; the groups before it are done.
std::int64_t standard_outliers_of_groups(const GroupLayout& layout, std::size_t first, std::size_t last,
                                         const double* intensity, const double* weight, const double* scale,
                                         double zmax, std::vector<std::vector<std::int64_t>>& by_round) {
  GatheredGroup group;
  std::vector<double> capped, z, buffer;
  detail::RowPrefetcher prefetch(layout.order, layout.offsets[layout.n_groups], {intensity, weight, scale});
  for (std::size_t k = first; k < last; ++k) {
    const auto begin = layout.offsets[k];
    const auto n_members = static_cast<std::size_t>(layout.offsets[k + 1] - begin);
    prefetch.ahead_of(layout.offsets[k + 1]);
    if (n_members <= 2) continue;
    group.gather(layout.order + begin, n_members, intensity, weight, scale);
    for (std::size_t i = 0; i < n_members; ++i)
      if (!(group.weight[i] > 0.0)) return group.rows[i];
    for (std::size_t round = 0; group.rows.size() > 2; ++round) {
      const std::size_t m = group.rows.size();
      // the weights were checked positive (and the cap, 10 x their median, is positive): the
      // capped ones need no check again
      const double* w = capped_weights(group, capped, buffer);
      const auto [a, b] = weighted_sums_of_rows(group.positions.data(), m, group.intensity.data(), w,
                                                group.scale.data());
      z.resize(m);
      leave_one_out_contiguous(m, group.intensity.data(), w, group.scale.data(), a, b, z.data());
      const std::size_t best = position_of_largest_magnitude(z.data(), m);
      if (!(std::abs(z[best]) > zmax)) break;
      if (by_round.size() <= round) by_round.resize(round + 1);
      by_round[round].push_back(group.rows[best]);
      group.erase(best);
    }
  }
  return -1;
}

/// Groups per work chunk of the threaded standard rejection (fixed: the merged result does
/// not depend on the thread count).
constexpr std::size_t kOutlierChunkGroups = 4096;

}  // namespace

std::vector<std::int64_t> standard_outlier_rows(const GroupLayout& layout, const double* intensity,
                                                const double* weight, const double* scale, double zmax,
                                                int n_threads) {
  // Each group is worked on alone until it yields no outlier: a round of DIALS's loop only
  // touches the groups that had an outlier in the round before, and every quantity (weight
  // cap, leave-one-out means, the pick) is per group. Outliers are kept per round so that
  // the result is in DIALS's detection order (round by round, groups in order). Groups go in
  // fixed chunks (over threads); the chunks' rounds are joined in chunk order, so the result
  // is the serial one for any thread count.
  // A weight that is not positive in a tested group throws, naming the first such row in
  // group order (as a serial check before the work would): each chunk stops at its first,
  // and the earliest chunk's is reported. The weights are checked as each group is gathered
  // (a separate pass would read every weight once more, in random order).
  const std::size_t n_chunks = (layout.n_groups + kOutlierChunkGroups - 1) / kOutlierChunkGroups;
  std::vector<std::vector<std::vector<std::int64_t>>> found(n_chunks);
  std::vector<std::int64_t> bad_row(n_chunks, -1);
  fit::detail::parallel_for(n_chunks, n_threads, [&](std::size_t c) {
    bad_row[c] = standard_outliers_of_groups(layout, c * kOutlierChunkGroups,
                                             std::min(layout.n_groups, (c + 1) * kOutlierChunkGroups), intensity,
                                             weight, scale, zmax, found[c]);
  });
  for (const std::int64_t row : bad_row)
    if (row >= 0) throw std::invalid_argument("weights must be positive (row " + std::to_string(row) + ")");
  std::vector<std::int64_t> outliers;
  for (std::size_t round = 0;; ++round) {
    bool any = false;
    for (const auto& chunk : found) {
      if (round >= chunk.size()) continue;
      any = true;
      outliers.insert(outliers.end(), chunk[round].begin(), chunk[round].end());
    }
    if (!any) break;
  }
  return outliers;
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

namespace {

/// Groups per part of the threaded subset_grouping: fixed, though any split gives the same
/// integers.
constexpr std::size_t kSubsetPartGroups = 4096;

/// The kept rows of a per-row byte mask as bits, with the number of kept rows before each
/// 64-row word: whether a row is kept, and its position among the kept rows, from two small
/// arrays (1/64 of the mask's size each) instead of a per-row array of positions.
class KeptRows {
 public:
  KeptRows(std::size_t n_rows, const std::uint8_t* keep, int n_threads)
      : bits_((n_rows + 63) / 64, 0), before_(bits_.size() + 1, 0) {
    constexpr std::size_t kWordsPerPart = 1024;
    const std::size_t n_words = bits_.size();
    const std::size_t n_parts = (n_words + kWordsPerPart - 1) / kWordsPerPart;
    fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
      for (std::size_t w = p * kWordsPerPart, end = std::min(n_words, (p + 1) * kWordsPerPart); w < end; ++w) {
        std::uint64_t word = 0;
        for (std::size_t r = 64 * w, last = std::min(n_rows, 64 * w + 64); r < last; ++r)
          word |= static_cast<std::uint64_t>(keep[r] != 0) << (r - 64 * w);
        bits_[w] = word;
        before_[w + 1] = __builtin_popcountll(word);
      }
    });
    for (std::size_t w = 0; w < n_words; ++w) before_[w + 1] += before_[w];
  }

  bool kept(std::int64_t row) const { return ((bits_[static_cast<std::size_t>(row) >> 6] >> (row & 63)) & 1U) != 0; }

  /// The number of kept rows before @p row.
  std::int64_t rank(std::int64_t row) const {
    const auto w = static_cast<std::size_t>(row) >> 6;
    const std::uint64_t below = (std::uint64_t{1} << (row & 63)) - 1;
    return before_[w] + __builtin_popcountll(bits_[w] & below);
  }

 private:
  std::vector<std::uint64_t> bits_;
  std::vector<std::int64_t> before_;
};

/// subset_grouping on one thread: one pass over the groups.
std::vector<std::int64_t> serial_subset_grouping(const GroupLayout& layout, const KeptRows& kept,
                                                 std::vector<std::int64_t>& new_order) {
  std::vector<std::int64_t> offsets{0};
  new_order.clear();
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    const auto before = new_order.size();
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i)
      if (kept.kept(layout.order[i])) new_order.push_back(kept.rank(layout.order[i]));
    if (new_order.size() > before) offsets.push_back(static_cast<std::int64_t>(new_order.size()));
  }
  return offsets;
}

}  // namespace

std::vector<std::int64_t> subset_grouping(const GroupLayout& layout, const std::uint8_t* keep,
                                          std::vector<std::int64_t>& new_order, int n_threads) {
  // row r of the layout is row kept.rank(r) of the subset (kept rows keep their relative order)
  const KeptRows kept(layout.n_rows, keep, n_threads);
  if (n_threads <= 1 || layout.n_groups <= kSubsetPartGroups) return serial_subset_grouping(layout, kept, new_order);
  // parts of groups: their kept rows and non-empty groups counted, then written in place
  const std::size_t n_parts = (layout.n_groups + kSubsetPartGroups - 1) / kSubsetPartGroups;
  std::vector<std::int64_t> rows_before(n_parts + 1, 0), groups_before(n_parts + 1, 0);
  const auto groups_of = [&](std::size_t p) {
    return std::make_pair(p * kSubsetPartGroups, std::min(layout.n_groups, (p + 1) * kSubsetPartGroups));
  };
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    const auto [k_first, k_end] = groups_of(p);
    std::int64_t rows = 0, groups = 0;
    for (std::size_t k = k_first; k < k_end; ++k) {
      std::int64_t in_group = 0;
      for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) in_group += kept.kept(layout.order[i]) ? 1 : 0;
      rows += in_group;
      groups += in_group > 0 ? 1 : 0;
    }
    rows_before[p + 1] = rows;
    groups_before[p + 1] = groups;
  });
  for (std::size_t p = 0; p < n_parts; ++p) {
    rows_before[p + 1] += rows_before[p];
    groups_before[p + 1] += groups_before[p];
  }
  new_order.assign(static_cast<std::size_t>(rows_before[n_parts]), 0);
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(groups_before[n_parts]) + 1, 0);
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    const auto [k_first, k_end] = groups_of(p);
    auto at = static_cast<std::size_t>(rows_before[p]);
    auto group = static_cast<std::size_t>(groups_before[p]);
    for (std::size_t k = k_first; k < k_end; ++k) {
      const std::size_t before = at;
      for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) {
        const auto r = layout.order[i];
        if (kept.kept(r)) new_order[at++] = kept.rank(r);
      }
      if (at > before) offsets[++group] = static_cast<std::int64_t>(at);
    }
  });
  return offsets;
}

namespace {

/// Rows of one group that pass a filter step, in group order (the buffer is reused).
void rows_where(const std::int64_t* rows, std::size_t n_members, const std::uint8_t* keep,
                std::vector<std::int64_t>& out) {
  out.clear();
  for (std::size_t i = 0; i < n_members; ++i)
    if (keep[rows[i]]) out.push_back(rows[i]);
}

/// Ĩ of some rows with weights 1/σ²: Σ w g I / Σ w g² (0 where Σ w g² is 0).
double inverse_variance_mean(const std::vector<std::int64_t>& rows, const double* intensity,
                             const double* variance, const double* scale) {
  double wgI = 0.0, wgg = 0.0;
  for (const auto r : rows) {
    const double wg = (1.0 / variance[r]) * scale[r];
    wgI += wg * intensity[r];
    wgg += wg * scale[r];
  }
  return wgg > 0.0 ? wgI / wgg : 0.0;
}

}  // namespace

void error_model_filter(const GroupLayout& layout, const double* intensity, const double* variance,
                        const double* scale, const std::uint8_t* considered, double min_Ih,
                        std::uint8_t* keep, double* group_mean, double* group_size, int n_threads) {
  std::fill(keep, keep + layout.n_rows, std::uint8_t{0});
  std::vector<double> ratio(layout.n_groups, 0.0);
  std::vector<std::uint8_t> reached_ratio(layout.n_groups, 0);  // groups that got to step 4
  // Groups are independent up to the largest Ĩ (a maximum: exact in any order), so fixed
  // ranges of groups go to the threads, each with its own scratch and maximum.
  constexpr std::size_t kGroupsPerPart = 4096;
  const std::size_t n_parts = (layout.n_groups + kGroupsPerPart - 1) / kGroupsPerPart;
  std::vector<double> part_max(n_parts, -std::numeric_limits<double>::infinity());
  std::vector<std::uint8_t> part_any(n_parts, 0);
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t part) {
    std::vector<std::int64_t> rows, passed;
    detail::RowPrefetcher prefetch(layout.order, layout.offsets[layout.n_groups], {intensity, variance, scale},
                                   considered);
    const std::size_t k_end = std::min(layout.n_groups, (part + 1) * kGroupsPerPart);
    for (std::size_t k = part * kGroupsPerPart; k < k_end; ++k) {
      const auto begin = layout.offsets[k];
      prefetch.ahead_of(layout.offsets[k + 1]);
      rows_where(layout.order + begin, static_cast<std::size_t>(layout.offsets[k + 1] - begin), considered, rows);
      if (rows.empty()) continue;
      // 1. the group's mean I/σ² above 0.85
      double isigsq = 0.0;
      for (const auto r : rows) isigsq += intensity[r] / variance[r];
      if (!(isigsq / static_cast<double>(rows.size()) > 0.85)) continue;
      // 2. rows with Ĩg > min_Ih and I > 0.001, in groups of more than one row
      if (rows.size() < 2) continue;
      const double Ih = inverse_variance_mean(rows, intensity, variance, scale);
      passed.clear();
      for (const auto r : rows)
        if (Ih * scale[r] > min_Ih && intensity[r] > 0.001) passed.push_back(r);
      // 3. groups still of more than one row
      if (passed.size() < 2) continue;
      // 4. the internal variance ratio (its cutoff depends on the largest Ĩ of all groups)
      const double Ih_passed = inverse_variance_mean(passed, intensity, variance, scale);
      const double n = static_cast<double>(passed.size());
      double dev2 = 0.0, mean_var = 0.0;
      for (const auto r : passed) {
        const double d = intensity[r] / scale[r] - Ih_passed;
        dev2 += d * d;
        mean_var += variance[r] / (scale[r] * scale[r]);
      }
      dev2 /= n - 1.0;
      mean_var /= n;
      reached_ratio[k] = 1;
      ratio[k] = mean_var > 0.0 ? dev2 / mean_var : std::numeric_limits<double>::infinity();
      part_max[part] = part_any[part] ? std::max(part_max[part], Ih_passed) : Ih_passed;
      part_any[part] = 1;
      for (const auto r : passed) {  // provisional: step 4 below
        keep[r] = 1;
        group_mean[r] = Ih_passed;
        group_size[r] = n;
      }
    }
  });
  double max_Ih = -std::numeric_limits<double>::infinity();
  bool any = false;
  for (std::size_t part = 0; part < n_parts; ++part) {
    if (!part_any[part]) continue;
    max_Ih = any ? std::max(max_Ih, part_max[part]) : part_max[part];
    any = true;
  }
  if (!any) return;
  const double cutoff = std::max(50.0, max_Ih / 40.0);
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    if (!reached_ratio[k] || ratio[k] < cutoff) continue;
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) keep[layout.order[i]] = 0;
  }
}

std::int64_t gather_values(std::size_t n_values, const double* values, std::size_t n_out, const std::int64_t* rows,
                           double* out, int n_threads) {
  constexpr std::size_t kRowsPerPart = std::size_t{1} << 16;
  const std::size_t n_parts = (n_out + kRowsPerPart - 1) / kRowsPerPart;
  std::vector<std::int64_t> bad(n_parts, -1);
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    const std::size_t end = std::min(n_out, (p + 1) * kRowsPerPart);
    for (std::size_t i = p * kRowsPerPart; i < end; ++i) {
      const auto r = rows[i];
      if (r < 0 || static_cast<std::size_t>(r) >= n_values) {
        bad[p] = static_cast<std::int64_t>(i);
        return;
      }
      out[i] = values[r];
    }
  });
  for (const auto i : bad)
    if (i >= 0) return i;
  return -1;
}

void error_model_variances(std::size_t n_rows, const double* variance, const double* intensity, double a,
                           double b, double* updated, double* weight, int n_threads) {
  constexpr std::size_t kRowsPerPart = std::size_t{1} << 16;
  const double a_squared = a * a;  // Python's a * a * (...): the square first
  const std::size_t n_parts = (n_rows + kRowsPerPart - 1) / kRowsPerPart;
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    const std::size_t end = std::min(n_rows, (p + 1) * kRowsPerPart);
    for (std::size_t r = p * kRowsPerPart; r < end; ++r) {
      const double bI = b * intensity[r];
      const double v = a_squared * (variance[r] + bI * bI);
      updated[r] = v;
      weight[r] = 1.0 / v;
    }
  });
}

namespace {

/// A row's term of its resolution bin's mean I/ε (negative intensities count as 0).
inline double esq_bin_term(double scaled_intensity, double epsilon) {
  return std::max(scaled_intensity, 0.0) / epsilon;
}

/// E² = I / (ε N) of a row whose group's normalisation is @p norm (0 where N is not > 0).
inline double esq_of(double scaled_intensity, double epsilon, double norm) {
  return norm > 0.0 ? scaled_intensity / (epsilon * norm) : 0.0;
}

}  // namespace

void esq_bin_sums(std::size_t n_rows, const double* scaled_intensity, const double* epsilon,
                  const std::int64_t* bin, std::size_t n_bins, double* sums) {
  std::fill(sums, sums + n_bins, 0.0);
  for (std::size_t r = 0; r < n_rows; ++r) sums[bin[r]] += esq_bin_term(scaled_intensity[r], epsilon[r]);
}

void esq_values(std::size_t n_rows, const double* scaled_intensity, const double* epsilon, const std::int64_t* group,
                const double* group_norm, double* esq) {
  for (std::size_t r = 0; r < n_rows; ++r) esq[r] = esq_of(scaled_intensity[r], epsilon[r], group_norm[group[r]]);
}

void esq_scaled_bin_sums(std::size_t n_rows, const double* intensity, const double* scale, const double* epsilon,
                         const std::int64_t* bin, std::size_t n_bins, double* sums) {
  std::fill(sums, sums + n_bins, 0.0);
  for (std::size_t r = 0; r < n_rows; ++r) sums[bin[r]] += esq_bin_term(intensity[r] / scale[r], epsilon[r]);
}

std::vector<std::int64_t> esq_rows_above(std::size_t n_rows, const double* intensity, const double* scale,
                                         const double* epsilon, const std::int64_t* group,
                                         const double* group_norm, double threshold, int n_threads) {
  constexpr std::size_t kRowsPerChunk = 65536;  // fixed: the result does not depend on the threads
  const std::size_t n_chunks = (n_rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<std::vector<std::int64_t>> found(n_chunks);
  fit::detail::parallel_for(n_chunks, n_threads, [&](std::size_t c) {
    const std::size_t end = std::min(n_rows, (c + 1) * kRowsPerChunk);
    for (std::size_t r = c * kRowsPerChunk; r < end; ++r) {
      if (esq_of(intensity[r] / scale[r], epsilon[r], group_norm[group[r]]) > threshold)
        found[c].push_back(static_cast<std::int64_t>(r));
    }
  });
  std::vector<std::int64_t> rows;
  for (const auto& part : found) rows.insert(rows.end(), part.begin(), part.end());
  return rows;
}

void rmeas_group_sums(const GroupLayout& layout, const double* intensity, const double* variance,
                      const double* scale, std::int64_t* n_used, double* abs_deviation, double* total) {
  std::vector<double> scaled;
  for (std::size_t k = 0; k < layout.n_groups; ++k) {
    scaled.clear();
    double w_sum = 0.0, wI_sum = 0.0;
    for (auto i = layout.offsets[k]; i < layout.offsets[k + 1]; ++i) {
      const auto r = layout.order[i];
      const double s = std::sqrt(std::max(variance[r], 0.0)) / scale[r];
      const double I = intensity[r] / scale[r];
      if (!(s > 0.0) || !(I / s > 1.0)) continue;
      const double w = 1.0 / (s * s);
      w_sum += w;
      wI_sum += w * I;
      scaled.push_back(I);
    }
    n_used[k] = static_cast<std::int64_t>(scaled.size());
    double dev = 0.0, sum = 0.0;
    if (!scaled.empty()) {
      const double mean = wI_sum / w_sum;
      for (const double I : scaled) {
        dev += std::abs(I - mean);
        sum += I;
      }
    }
    abs_deviation[k] = dev;
    total[k] = sum;
  }
}

namespace {

/// delta[i] = numerator[i] / sqrt(variance[i] + b² · intensity_sq[i]).
void error_model_deltas(std::size_t n, const double* __restrict numerator,
                                                const double* __restrict variance,
                                                const double* __restrict intensity_sq, double b_squared,
                                                double* __restrict delta) {
  for (std::size_t i = 0; i < n; ++i) delta[i] = numerator[i] / std::sqrt(variance[i] + b_squared * intensity_sq[i]);
}

}  // namespace

namespace {

/// Rows per part of the per-bin sums: fixed, so that the parts' sums (added in part order)
/// do not depend on the thread count; up to one part the sums are the serial ones.
constexpr std::size_t kMomentPartRows = std::size_t{1} << 16;

/// The per-bin sums of δ and δ² of rows [first, last) added into @p sum_delta and
/// @p sum_delta_sq (bins already checked); δ of a chunk is computed vectorised, then added in
/// row order.
void part_moments(std::size_t first, std::size_t last, const double* numerator, const double* variance,
                  const double* intensity_sq, const std::int64_t* bin, double b_squared, double* sum_delta,
                  double* sum_delta_sq) {
  constexpr std::size_t chunk = 2048;
  double delta[chunk];
  for (std::size_t start = first; start < last; start += chunk) {
    const std::size_t m = std::min(chunk, last - start);
    error_model_deltas(m, numerator + start, variance + start, intensity_sq + start, b_squared, delta);
    const std::int64_t* bins = bin + start;
    for (std::size_t j = 0; j < m; ++j) {
      if (bins[j] < 0) continue;
      sum_delta[bins[j]] += delta[j];
      sum_delta_sq[bins[j]] += delta[j] * delta[j];
    }
  }
}

/// The per-bin sums of δ and δ² (bins already checked): parts of kMomentPartRows rows over
/// up to @p n_threads threads, their sums added in part order.
void bin_moments(std::size_t n_rows, const double* numerator, const double* variance, const double* intensity_sq,
                 const std::int64_t* bin, std::size_t n_bins, double b_squared, double* sum_delta,
                 double* sum_delta_sq, int n_threads, std::vector<double>& partial) {
  std::fill(sum_delta, sum_delta + n_bins, 0.0);
  std::fill(sum_delta_sq, sum_delta_sq + n_bins, 0.0);
  const std::size_t n_parts = (n_rows + kMomentPartRows - 1) / kMomentPartRows;
  if (n_parts <= 1) {
    part_moments(0, n_rows, numerator, variance, intensity_sq, bin, b_squared, sum_delta, sum_delta_sq);
    return;
  }
  partial.assign(2 * n_bins * n_parts, 0.0);
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    double* s = partial.data() + 2 * n_bins * p;
    part_moments(p * kMomentPartRows, std::min(n_rows, (p + 1) * kMomentPartRows), numerator, variance,
                 intensity_sq, bin, b_squared, s, s + n_bins);
  });
  for (std::size_t p = 0; p < n_parts; ++p) {
    const double* s = partial.data() + 2 * n_bins * p;
    for (std::size_t k = 0; k < n_bins; ++k) {
      sum_delta[k] += s[k];
      sum_delta_sq[k] += s[n_bins + k];
    }
  }
}

void check_bins(std::size_t n_rows, const std::int64_t* bin, std::size_t n_bins) {
  for (std::size_t i = 0; i < n_rows; ++i)
    if (bin[i] >= 0 && static_cast<std::size_t>(bin[i]) >= n_bins)
      throw std::invalid_argument("bin index " + std::to_string(bin[i]) + " at row " + std::to_string(i) +
                                  " is not below n_bins (" + std::to_string(n_bins) + ")");
}

/// numpy's float64 sum of a contiguous array (numpy/_core/src/umath/loops_utils.h.src,
/// pairwise_sum: 8 running sums below 128 values, halves above), so that the objective below
/// has exactly the value of its numpy form.
double numpy_sum(const double* a, std::size_t n) {
  if (n < 8) {
    double res = 0.0;
    for (std::size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (std::size_t j = 0; j < 8; ++j) r[j] = a[j];
    std::size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (std::size_t j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  std::size_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_sum(a, n2) + numpy_sum(a + n2, n - n2);
}

/// delta[i] = deviation[i] / (a · sqrt(variance[i] + (b · intensity[i])²) / scale[i]).
void error_model_scaled_deltas(std::size_t n, const double* __restrict deviation,
                                                       const double* __restrict variance,
                                                       const double* __restrict intensity,
                                                       const double* __restrict scale, double a, double b,
                                                       double* __restrict delta) {
  for (std::size_t i = 0; i < n; ++i) {
    const double bI = b * intensity[i];
    delta[i] = deviation[i] / (a * std::sqrt(variance[i] + bI * bI) / scale[i]);
  }
}

}  // namespace

void error_model_normalised_deviations(std::size_t n_rows, const double* deviation, const double* variance,
                                       const double* intensity, const double* scale, double a, double b,
                                       double* delta, int n_threads) {
  const std::size_t n_parts = (n_rows + kMomentPartRows - 1) / kMomentPartRows;
  fit::detail::parallel_for(n_parts, n_threads, [&](std::size_t p) {
    const std::size_t first = p * kMomentPartRows;
    const std::size_t m = std::min(n_rows, first + kMomentPartRows) - first;
    error_model_scaled_deltas(m, deviation + first, variance + first, intensity + first, scale + first, a, b,
                              delta + first);
  });
}

void error_model_bin_moments(std::size_t n_rows, const double* numerator, const double* variance,
                             const double* intensity_sq, const std::int64_t* bin, std::size_t n_bins,
                             double b_squared, double* sum_delta, double* sum_delta_sq, int n_threads) {
  check_bins(n_rows, bin, n_bins);
  std::vector<double> partial;
  bin_moments(n_rows, numerator, variance, intensity_sq, bin, n_bins, b_squared, sum_delta, sum_delta_sq,
              n_threads, partial);
}

namespace {

/// Brent's bounded minimisation of a unimodal @p f on [lo, hi] (golden-section steps with
/// parabolic interpolation when it falls inside the bracket), to an absolute x tolerance of
/// about @p tol; step for step as xtalscale.job.error_model._bounded_brent_minimum. Smooth
/// objectives take 10-15 evaluations where a golden-section search takes 28 at tol 1e-6.
template <class F>
double bounded_brent_minimum(F&& f, double lo, double hi, double tol) {
  const double golden = 0.5 * (3.0 - std::sqrt(5.0));
  const double sqrt_eps = std::sqrt(2.220446049250313e-16);
  double a = lo, b = hi;
  double x = a + golden * (b - a), w = x, v = x;
  double fx = f(x), fw = fx, fv = fx;
  double d = 0.0, e = 0.0;
  for (;;) {
    const double xm = 0.5 * (a + b);
    const double tol1 = sqrt_eps * std::abs(x) + tol / 3.0;
    const double tol2 = 2.0 * tol1;
    if (std::abs(x - xm) <= tol2 - 0.5 * (b - a)) break;
    bool golden_step = true;
    if (std::abs(e) > tol1) {  // a parabola through x, w, v
      const double r = (x - w) * (fx - fv);
      double q = (x - v) * (fx - fw);
      double p = (x - v) * q - (x - w) * r;
      q = 2.0 * (q - r);
      if (q > 0.0) p = -p;
      q = std::abs(q);
      const double e_before = e;
      e = d;
      if (std::abs(p) < std::abs(0.5 * q * e_before) && p > q * (a - x) && p < q * (b - x)) {
        d = p / q;
        const double u = x + d;
        if (u - a < tol2 || b - u < tol2) d = xm >= x ? tol1 : -tol1;
        golden_step = false;
      }
    }
    if (golden_step) {
      e = x >= xm ? a - x : b - x;
      d = golden * e;
    }
    const double u = x + (std::abs(d) >= tol1 ? d : (d >= 0.0 ? tol1 : -tol1));
    const double fu = f(u);
    if (fu <= fx) {
      (u >= x ? a : b) = x;
      v = w;
      fv = fw;
      w = x;
      fw = fx;
      x = u;
      fx = fu;
    } else {
      (u < x ? a : b) = u;
      if (fu <= fw || w == x) {
        v = w;
        fv = fw;
        w = u;
        fw = fu;
      } else if (fu <= fv || v == x || v == w) {
        v = u;
        fv = fu;
      }
    }
  }
  return x;
}

}  // namespace

double error_model_search_b(std::size_t n_rows, const double* numerator, const double* variance,
                            const double* intensity_sq, const std::int64_t* bin, std::size_t n_bins,
                            const double* counts, const double* weights, double lo, double hi, double tol,
                            int n_threads) {
  check_bins(n_rows, bin, n_bins);
  std::vector<double> sum(n_bins), sum_sq(n_bins), terms(n_bins), partial;
  // Σ_k w_k [(0.5 − v_k)² + 1/v_k − 1.25], v_k = max(mean(δ²) − mean(δ)², 1e-12), in the
  // operation order of the numpy definition
  const auto objective = [&](double b) {
    bin_moments(n_rows, numerator, variance, intensity_sq, bin, n_bins, b * b, sum.data(), sum_sq.data(),
                n_threads, partial);
    for (std::size_t k = 0; k < n_bins; ++k) {
      const double mean = sum[k] / counts[k];
      const double spread = sum_sq[k] / counts[k] - mean * mean;
      const double v = std::isnan(spread) ? spread : std::max(spread, 1e-12);  // np.maximum keeps NaN
      const double dv = 0.5 - v;
      terms[k] = weights[k] * ((dv * dv + 1.0 / v) - 1.25);
    }
    return numpy_sum(terms.data(), n_bins);
  };
  return bounded_brent_minimum(objective, lo, hi, tol);
}

}  // namespace xtalscale
