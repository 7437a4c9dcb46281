// Reciprocal-space ASU mapping (see grouping.hpp).
#include "xtalscale/grouping.hpp"

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>

#include "fit_parallel.hpp"
#include "xtalscale/check.hpp"

namespace xtalscale {

const char* asu_condition_text(AsuCondition condition) noexcept {
  switch (condition) {
    case AsuCondition::triclinic: return "l>0 or (l=0 and (h>0 or (h=0 and k>=0)))";
    case AsuCondition::monoclinic: return "k>=0 and (l>0 or (l=0 and h>=0))";
    case AsuCondition::orthorhombic: return "h>=0 and k>=0 and l>=0";
    case AsuCondition::tetragonal_low: return "l>=0 and ((h>=0 and k>0) or (h=0 and k=0))";
    case AsuCondition::tetragonal_high: return "h>=k and k>=0 and l>=0";
    case AsuCondition::trigonal_low: return "(h>=0 and k>0) or (h=0 and k=0 and l>=0)";
    case AsuCondition::trigonal_312: return "h>=k and k>=0 and (k>0 or l>=0)";
    case AsuCondition::trigonal_321: return "h>=k and k>=0 and (h>k or l>=0)";
    case AsuCondition::cubic_low: return "h>=0 and ((l>=h and k>h) or (l=h and k=h))";
    case AsuCondition::cubic_high: return "k>=l and l>=h and h>=0";
  }
  return "";
}

bool in_asu(AsuCondition c, std::int64_t h, std::int64_t k, std::int64_t l) {
  switch (c) {
    case AsuCondition::triclinic: return l > 0 || (l == 0 && (h > 0 || (h == 0 && k >= 0)));
    case AsuCondition::monoclinic: return k >= 0 && (l > 0 || (l == 0 && h >= 0));
    case AsuCondition::orthorhombic: return h >= 0 && k >= 0 && l >= 0;
    case AsuCondition::tetragonal_low: return l >= 0 && ((h >= 0 && k > 0) || (h == 0 && k == 0));
    case AsuCondition::tetragonal_high: return h >= k && k >= 0 && l >= 0;
    case AsuCondition::trigonal_low: return (h >= 0 && k > 0) || (h == 0 && k == 0 && l >= 0);
    case AsuCondition::trigonal_312: return h >= k && k >= 0 && (k > 0 || l >= 0);
    case AsuCondition::trigonal_321: return h >= k && k >= 0 && (h > k || l >= 0);
    case AsuCondition::cubic_low: return h >= 0 && ((l >= h && k > h) || (l == h && k == h));
    case AsuCondition::cubic_high: return k >= l && l >= h && h >= 0;
  }
  return false;
}

namespace {

struct Tester {
  const AsuSymmetry& s;
  bool identity;
  bool operator()(std::int64_t h, std::int64_t k, std::int64_t l) const {
    if (identity) return in_asu(s.condition, h, k, l);
    const auto& m = s.basis;
    return in_asu(s.condition, h * m[0] + k * m[3] + l * m[6], h * m[1] + k * m[4] + l * m[7],
                  h * m[2] + k * m[5] + l * m[8]);
  }
};

/// The ASU image of one index (@p row, 3 values; row @p i of the input, named in messages),
/// written to @p out (3 values); returns its ISYM.
inline std::int32_t map_row_to_asu(const AsuSymmetry& sym, const Tester& in, const std::int32_t* row,
                                   std::size_t i, std::int32_t* out) {
  const std::int64_t h = row[0], k = row[1], l = row[2];
  if (h == 0 && k == 0 && l == 0)
    throw std::invalid_argument("hkl: row " + std::to_string(i) + " is (0, 0, 0), which has no ASU image");
  for (std::size_t j = 0; j < sym.rotations.size(); ++j) {
    const auto& r = sym.rotations[j];
    // Reciprocal indices transform as the row vector h R.
    const std::int64_t a = h * r[0] + k * r[3] + l * r[6];
    const std::int64_t b = h * r[1] + k * r[4] + l * r[7];
    const std::int64_t c = h * r[2] + k * r[5] + l * r[8];
    int sign = 0;
    if (in(a, b, c)) sign = 1;
    else if (in(-a, -b, -c)) sign = -1;
    if (sign != 0) {
      out[0] = static_cast<std::int32_t>(sign * a);
      out[1] = static_cast<std::int32_t>(sign * b);
      out[2] = static_cast<std::int32_t>(sign * c);
      return static_cast<std::int32_t>(2 * j + (sign > 0 ? 1 : 2));
    }
  }
  throw std::invalid_argument("hkl: row " + std::to_string(i) + " has no image in the ASU (inconsistent symmetry)");
}

/// Rows [first, last) of map_to_asu, indexed (and named in messages) as rows of the whole
/// input.
void map_rows_to_asu(const AsuSymmetry& sym, const Tester& in, const std::int32_t* hkl, std::size_t first,
                     std::size_t last, std::int32_t* asu_out, std::int32_t* isym_out) {
  for (std::size_t i = first; i < last; ++i) isym_out[i] = map_row_to_asu(sym, in, hkl + 3 * i, i, asu_out + 3 * i);
}

/// Whether some rotation R of @p sym gives h R = −h (@p hkl: one index, 3 values).
inline bool is_centric(const AsuSymmetry& sym, const std::int32_t* hkl) {
  const std::int64_t h = hkl[0], k = hkl[1], l = hkl[2];
  for (const auto& r : sym.rotations)
    if (h * r[0] + k * r[3] + l * r[6] == -h && h * r[1] + k * r[4] + l * r[7] == -k &&
        h * r[2] + k * r[5] + l * r[8] == -l)
      return true;
  return false;
}

/// Rows [first, last) of map_to_asu_bijvoet.
void bijvoet_rows(const AsuSymmetry& sym, const Tester& in, const std::int32_t* hkl, std::size_t first,
                  std::size_t last, std::int32_t* asu_out, std::uint8_t* minus_out) {
  for (std::size_t i = first; i < last; ++i) {
    const std::int32_t isym = map_row_to_asu(sym, in, hkl + 3 * i, i, asu_out + 3 * i);
    // the centric test only where it can matter (an even ISYM: the image of −h)
    minus_out[i] = (isym % 2 == 0 && !is_centric(sym, asu_out + 3 * i)) ? 1 : 0;
  }
}

/// Rows per thread below which the per-row kernels stay on the calling thread (a parallel
/// region costs more than mapping a few thousand indices).
constexpr std::size_t kMinRowsPerThread = 1u << 15;

/// Run body(first, last) over up to @p n_threads equal contiguous row ranges of [0, n); an
/// exception is rethrown after the loop, the lowest range's (so its first bad row).
template <class Body>
void over_row_ranges(std::size_t n, int n_threads, Body body) {
  const auto wanted = static_cast<std::size_t>(std::max(1, n_threads));
  const std::size_t nt = std::max<std::size_t>(1, std::min(wanted, n / kMinRowsPerThread));
  fit::detail::parallel_for_rethrowing(nt, static_cast<int>(nt), [&](std::size_t t) {
    body(n * t / nt, n * (t + 1) / nt);
  });
}

/// map_to_asu's checks of the symmetry, and its ASU tester.
Tester checked_tester(const AsuSymmetry& sym) {
  require(!sym.rotations.empty(), "symmetry: at least one rotation is required");
  require(static_cast<int>(sym.condition) >= 0 && static_cast<int>(sym.condition) <= 9,
          "symmetry: unknown ASU condition");
  const std::array<std::int64_t, 9> id{1, 0, 0, 0, 1, 0, 0, 0, 1};
  return Tester{sym, sym.basis == id};
}

/// centric_flags of rows [first, last).
void centric_rows(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t first, std::size_t last,
                  std::uint8_t* out) {
  for (std::size_t i = first; i < last; ++i) out[i] = is_centric(sym, hkl + 3 * i) ? 1 : 0;
}

}  // namespace

void map_to_asu(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                std::int32_t* asu_out, std::int32_t* isym_out) {
  map_rows_to_asu(sym, checked_tester(sym), hkl, 0, n, asu_out, isym_out);
}

void map_to_asu(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                std::int32_t* asu_out, std::int32_t* isym_out, int n_threads) {
  const Tester in = checked_tester(sym);
  over_row_ranges(n, n_threads, [&](std::size_t first, std::size_t last) {
    map_rows_to_asu(sym, in, hkl, first, last, asu_out, isym_out);
  });
}

void map_to_asu_bijvoet(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n, std::int32_t* asu_out,
                        std::uint8_t* minus_out, int n_threads) {
  const Tester in = checked_tester(sym);
  over_row_ranges(n, n_threads, [&](std::size_t first, std::size_t last) {
    bijvoet_rows(sym, in, hkl, first, last, asu_out, minus_out);
  });
}

void centric_flags(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                   std::uint8_t* out, int n_threads) {
  over_row_ranges(n, n_threads, [&](std::size_t first, std::size_t last) {
    centric_rows(sym, hkl, first, last, out);
  });
}

void centric_flags(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                   std::uint8_t* out) {
  centric_rows(sym, hkl, 0, n, out);
}

namespace {

/// Stable LSD radix sort of unsigned keys in [0, range], then group boundaries.
std::vector<std::int64_t> radix_group(std::vector<std::uint64_t>& k, std::uint64_t range,
                                      std::int64_t* order, std::int64_t* group_index) {
  const std::size_t n = k.size();
  std::vector<std::uint64_t> k_tmp(n);
  std::vector<std::int64_t> idx(n), idx_tmp(n);
  for (std::size_t i = 0; i < n; ++i) idx[i] = static_cast<std::int64_t>(i);
  constexpr int kBits = 11;
  constexpr std::size_t kBuckets = std::size_t{1} << kBits;
  std::vector<std::size_t> count(kBuckets);
  // Each pass is a stable counting sort on one 11-bit digit; only digits below the key
  // range's highest set bit need a pass.
  for (int shift = 0; shift < 64 && (range >> shift) != 0; shift += kBits) {
    std::fill(count.begin(), count.end(), std::size_t{0});
    for (std::size_t i = 0; i < n; ++i) ++count[(k[i] >> shift) & (kBuckets - 1)];
    std::size_t sum = 0;
    for (auto& c : count) {
      const std::size_t c0 = c;
      c = sum;
      sum += c0;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t pos = count[(k[i] >> shift) & (kBuckets - 1)]++;
      k_tmp[pos] = k[i];
      idx_tmp[pos] = idx[i];
    }
    k.swap(k_tmp);
    idx.swap(idx_tmp);
  }
  std::vector<std::int64_t> offsets;
  std::int64_t group = -1;
  for (std::size_t i = 0; i < n; ++i) {
    if (i == 0 || k[i] != k[i - 1]) {
      ++group;
      offsets.push_back(static_cast<std::int64_t>(i));
    }
    order[i] = idx[i];
    group_index[idx[i]] = group;
  }
  offsets.push_back(static_cast<std::int64_t>(n));
  return offsets;
}

/// The number of contiguous row parts over_row_ranges splits @p n rows into.
inline std::size_t row_parts(std::size_t n, int n_threads) {
  const auto wanted = static_cast<std::size_t>(std::max(1, n_threads));
  return std::max<std::size_t>(1, std::min(wanted, n / kMinRowsPerThread));
}

/// Group boundaries of keys in [0, range] by one counting sort, for key ranges not much
/// larger than the row count: no per-row temporaries (the keys are recomputed by @p key_of),
/// only range-sized arrays. Stable, so the order is the radix sort's. With several threads
/// each contiguous part of the rows counts its own keys, and a part's rows of a key are
/// placed after the earlier parts' rows of that key: the same order as one pass.
template <class KeyOf>
std::vector<std::int64_t> counting_group(std::size_t n, std::uint64_t range, KeyOf key_of,
                                         std::int64_t* order, std::int64_t* group_index, int n_threads) {
  const std::size_t n_keys = static_cast<std::size_t>(range) + 1;
  const std::size_t parts = row_parts(n, n_threads);
  // per part: its counts of each key, then the next position of its rows of that key
  std::vector<std::vector<std::int64_t>> next(parts);
  fit::detail::parallel_for(parts, static_cast<int>(parts), [&](std::size_t p) {
    next[p].assign(n_keys, 0);
    for (std::size_t i = n * p / parts, last = n * (p + 1) / parts; i < last; ++i) ++next[p][key_of(i)];
  });
  std::vector<std::int64_t> rank(n_keys, -1);  // group of each present key
  std::vector<std::int64_t> offsets;
  std::int64_t position = 0, group = 0;
  for (std::size_t key = 0; key < n_keys; ++key) {
    const std::int64_t start = position;
    for (std::size_t p = 0; p < parts; ++p) {
      const std::int64_t count = next[p][key];
      next[p][key] = position;
      position += count;
    }
    if (position == start) continue;
    offsets.push_back(start);
    rank[key] = group++;
  }
  offsets.push_back(static_cast<std::int64_t>(n));
  fit::detail::parallel_for(parts, static_cast<int>(parts), [&](std::size_t p) {
    std::int64_t* mine = next[p].data();
    for (std::size_t i = n * p / parts, last = n * (p + 1) / parts; i < last; ++i) {
      const std::uint64_t key = key_of(i);
      order[mine[key]++] = static_cast<std::int64_t>(i);
      group_index[i] = rank[key];
    }
  });
  return offsets;
}

/// Whether counting_group suits a key range: at most two keys per row (or 2^16 keys), and 2^26
/// at most, so that its two range-sized arrays (16 B per key) take no more than the radix
/// sort's per-row buffers (32 B per row).
inline bool counting_suits(std::size_t n, std::uint64_t range) {
  return range < std::max<std::uint64_t>(2 * static_cast<std::uint64_t>(n), 1u << 16) &&
         range < (std::uint64_t{1} << 26);
}

}  // namespace

void counting_order(const std::int64_t* keys, std::size_t n, std::size_t n_keys,
                    std::int64_t* order, std::int64_t* offsets) {
  const auto limit = static_cast<std::int64_t>(n_keys);
  std::fill(offsets, offsets + n_keys + 1, std::int64_t{0});
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t k = keys[i];
    if (k < 0 || k >= limit)
      throw std::invalid_argument("key " + std::to_string(k) + " at position " +
                                  std::to_string(i) + " is outside [0, " +
                                  std::to_string(n_keys) + ")");
    ++offsets[k + 1];
  }
  for (std::size_t k = 0; k < n_keys; ++k) offsets[k + 1] += offsets[k];
  std::vector<std::int64_t> next(offsets, offsets + n_keys);
  for (std::size_t i = 0; i < n; ++i) order[next[keys[i]]++] = static_cast<std::int64_t>(i);
}

std::vector<std::int64_t> group_keys(const std::int64_t* keys, std::size_t n,
                                     std::int64_t* order, std::int64_t* group_index) {
  if (n == 0) return {0};
  const auto [lo_it, hi_it] = std::minmax_element(keys, keys + n);
  // Shift to unsigned so that the order of the keys is the order of the digits.
  const std::uint64_t lo = static_cast<std::uint64_t>(*lo_it);
  const std::uint64_t range = static_cast<std::uint64_t>(*hi_it) - lo;
  if (counting_suits(n, range))
    return counting_group(n, range, [&](std::size_t i) { return static_cast<std::uint64_t>(keys[i]) - lo; },
                          order, group_index, 1);
  std::vector<std::uint64_t> k(n);
  for (std::size_t i = 0; i < n; ++i) k[i] = static_cast<std::uint64_t>(keys[i]) - lo;
  return radix_group(k, static_cast<std::uint64_t>(*hi_it) - lo, order, group_index);
}

std::vector<std::int64_t> group_miller_indices(const std::int32_t* hkl, std::size_t n,
                                               std::int64_t* order,
                                               std::int64_t* group_index) {
  return group_miller_indices(hkl, n, order, group_index, 1);
}

std::vector<std::int64_t> group_miller_indices(const std::int32_t* hkl, std::size_t n, std::int64_t* order,
                                               std::int64_t* group_index, int n_threads) {
  if (n == 0) return {0};
  // each part's component ranges, then their union
  const std::size_t parts = row_parts(n, n_threads);
  std::vector<std::array<std::int64_t, 6>> part_range(parts);
  fit::detail::parallel_for(parts, static_cast<int>(parts), [&](std::size_t p) {
    const std::size_t first = n * p / parts, last = n * (p + 1) / parts;
    std::array<std::int64_t, 6> r{hkl[3 * first], hkl[3 * first + 1], hkl[3 * first + 2],
                                  hkl[3 * first], hkl[3 * first + 1], hkl[3 * first + 2]};
    for (std::size_t i = first; i < last; ++i)
      for (std::size_t c = 0; c < 3; ++c) {
        const std::int64_t v = hkl[3 * i + c];
        r[c] = std::min(r[c], v);
        r[3 + c] = std::max(r[3 + c], v);
      }
    part_range[p] = r;
  });
  std::int64_t lo[3], hi[3];
  for (std::size_t c = 0; c < 3; ++c) {
    lo[c] = part_range[0][c];
    hi[c] = part_range[0][3 + c];
    for (const auto& r : part_range) {
      lo[c] = std::min(lo[c], r[c]);
      hi[c] = std::max(hi[c], r[3 + c]);
    }
  }
  // Mixed-radix key from the actual ranges: lexicographic (h, k, l) order, few bits.
  const std::uint64_t s1 = static_cast<std::uint64_t>(hi[1] - lo[1] + 1);
  const std::uint64_t s2 = static_cast<std::uint64_t>(hi[2] - lo[2] + 1);
  const std::uint64_t s0 = static_cast<std::uint64_t>(hi[0] - lo[0] + 1);
  require(s0 <= (std::uint64_t{1} << 21) && s1 <= (std::uint64_t{1} << 21) &&
              s2 <= (std::uint64_t{1} << 21),
          "hkl: index range too large (more than 2^21 distinct values per component)");
  const auto key_of = [&](std::size_t i) {
    const auto h = static_cast<std::uint64_t>(hkl[3 * i] - lo[0]);
    const auto kk = static_cast<std::uint64_t>(hkl[3 * i + 1] - lo[1]);
    const auto l = static_cast<std::uint64_t>(hkl[3 * i + 2] - lo[2]);
    return (h * s1 + kk) * s2 + l;
  };
  const std::uint64_t range = s0 * s1 * s2 - 1;
  if (counting_suits(n, range)) return counting_group(n, range, key_of, order, group_index, n_threads);
  std::vector<std::uint64_t> k(n);
  for (std::size_t i = 0; i < n; ++i) k[i] = key_of(i);
  return radix_group(k, range, order, group_index);
}

namespace {

/// Lexicographic comparison of two (h, k, l), the second negated when @p negate_b.
int compare_keys(const std::int32_t* a, const std::int32_t* b, bool negate_b) {
  for (int c = 0; c < 3; ++c) {
    const std::int64_t x = a[c];
    const std::int64_t y = negate_b ? -static_cast<std::int64_t>(b[c]) : b[c];
    if (x != y) return x < y ? -1 : 1;
  }
  return 0;
}

}  // namespace

std::vector<std::int64_t> split_bijvoet_groups(const std::int64_t* order, const std::int64_t* offsets,
                                               std::size_t n_groups, const std::int32_t* keys,
                                               const std::uint8_t* minus, std::int64_t* out_order) {
  // the flags in grouped order (one gather; every later pass is sequential), and per group
  // whether it has unflagged (plus) and flagged (minus) rows
  std::vector<std::uint8_t> flag(static_cast<std::size_t>(offsets[n_groups]));
  for (std::size_t i = 0; i < flag.size(); ++i) flag[i] = minus[order[i]] != 0;
  std::vector<std::uint8_t> has_plus(n_groups, 0), has_minus(n_groups, 0);
  for (std::size_t g = 0; g < n_groups; ++g)
    for (auto i = offsets[g]; i < offsets[g + 1]; ++i) (flag[static_cast<std::size_t>(i)] ? has_minus[g] : has_plus[g]) = 1;
  std::vector<std::int64_t> out_offsets{0};
  std::size_t written = 0;
  auto emit = [&](std::size_t g, std::uint8_t flagged) {
    for (auto i = offsets[g]; i < offsets[g + 1]; ++i)
      if (flag[static_cast<std::size_t>(i)] == flagged) out_order[written++] = order[i];
  };
  // plus halves ascending (groups 0, 1, ...); minus halves ascending by negated key (groups
  // n-1, n-2, ...); merge the two runs
  std::size_t p = 0, m = n_groups;
  auto next_plus = [&]() { while (p < n_groups && !has_plus[p]) ++p; };
  auto next_minus = [&]() { while (m > 0 && !has_minus[m - 1]) --m; };
  next_plus();
  next_minus();
  while (p < n_groups || m > 0) {
    int c;
    if (p >= n_groups) c = 1;
    else if (m == 0) c = -1;
    else c = compare_keys(keys + 3 * p, keys + 3 * (m - 1), true);
    if (c < 0) {
      emit(p, 0);
      ++p;
    } else if (c > 0) {
      emit(m - 1, 1);
      --m;
    } else {
      // a key equal to another group's negated key (not for indices in one ASU): one group,
      // its rows in input order, as a sort of the signed indices would give
      const std::size_t start = written;
      emit(p, 0);
      const std::size_t middle = written;
      emit(m - 1, 1);
      std::inplace_merge(out_order + start, out_order + middle, out_order + written);
      ++p;
      --m;
    }
    out_offsets.push_back(static_cast<std::int64_t>(written));
    next_plus();
    next_minus();
  }
  return out_offsets;
}

}  // namespace xtalscale
