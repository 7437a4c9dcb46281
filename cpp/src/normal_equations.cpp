// Normal equations with Ĩ eliminated, assembled per group without a Jacobian (see
// normal_equations.hpp). The groups are cut into fixed contiguous parts (a function of the data
// only); each part is read once, in table order, into a thread-private upper-triangle matrix
// (per observation the k x k rank-1 term, per group the rank-1/2 Schur correction over the union
// of its columns), and the parts are added to the result in part order, so the summation order
// of every matrix element is the same for any thread count.
#include "xtalscale/normal_equations.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

#include "fit_parallel.hpp"

namespace xtalscale::fit {

namespace {

/// Per table row: the weight of the observation term (w Ĩ²), the rhs coefficient (w r Ĩ), the
/// b coefficient (w g Ĩ) and the e coefficient (w r); per group 1/S (0 when S = 0 or the group
/// has one observation, whose terms cancel exactly).
struct RowTerms {
  std::vector<double> obs, rhs, b, e, inv_s;
  double r_sq = 0.0;
};

RowTerms row_terms(const GroupedObservations& t, const double* g, const double* fixed_Ih) {
  RowTerms rt;
  rt.obs.assign(t.n_obs, 0.0);
  rt.rhs.assign(t.n_obs, 0.0);
  rt.b.assign(t.n_obs, 0.0);
  rt.e.assign(t.n_obs, 0.0);
  rt.inv_s.assign(t.n_groups, 0.0);
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    const auto first = t.group_offsets[h];
    const auto last = t.group_offsets[h + 1];
    const detail::GroupSums sums = detail::group_sums(t, g, h);
    const double s = sums.wgg;
    const double ls_ih = s > 0.0 ? sums.wgi / s : 0.0;
    const bool eliminate = !fixed_Ih && s > 0.0 && last - first > 1;
    if (eliminate) rt.inv_s[h] = 1.0 / s;
    for (auto l = first; l < last; ++l) {
      const double ih = fixed_Ih ? fixed_Ih[l] : ls_ih;
      const double r = t.intensities[l] - g[l] * ih;
      const double w = t.weights[l];
      rt.r_sq += w * r * r;
      if (!fixed_Ih && !eliminate) continue;  // singleton or empty group: no information on p
      rt.obs[l] = w * ih * ih;
      rt.rhs[l] = w * r * ih;
      rt.b[l] = w * g[l] * ih;
      rt.e[l] = w * r;
    }
  }
  return rt;
}

/// Call body(l, c, d) for every derivative entry of the observations of group @p h: the
/// observation's table row l, the global parameter column c and the derivative d.
template <class Body>
inline void for_each_group_derivative(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                                      const std::vector<std::int32_t>& src_block,
                                      const std::vector<std::int64_t>& src_row, std::size_t h,
                                      Body body) {
  for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
    const DerivativesView& v = blocks[static_cast<std::size_t>(src_block[l])].view;
    const auto r = static_cast<std::size_t>(src_row[l]);
    if (v.n_cols == 0) continue;
    for (auto k = v.indptr[r]; k < v.indptr[r + 1]; ++k)
      body(l, v.column_offset + static_cast<std::size_t>(v.indices[k]), v.values[k]);
  }
}

/// Index of the lowest set bit of a non-zero word.
inline std::size_t lowest_bit(std::uint64_t x) {
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long index = 0;
  _BitScanForward64(&index, x);
  return static_cast<std::size_t>(index);
#else
  return static_cast<std::size_t>(__builtin_ctzll(x));
#endif
}

/// Contiguous group ranges ("parts") with roughly equal observation counts. The number of parts
/// depends only on the data (never on the thread count), so the fixed-order reduction of the
/// part sums gives bit-identical results for any thread count. Parts are large enough that the
/// O(n²) zeroing and reduction of a part's private matrix stays small against its O(N k²) work.
std::vector<std::size_t> group_parts(const GroupedObservations& t, std::size_t n) {
  constexpr std::size_t kMaxParts = 64;
  constexpr std::size_t kMinObsPerPart = 4096;
  const double n_sq = static_cast<double>(n) * static_cast<double>(n);
  const double by_reduction = static_cast<double>(t.n_obs) * 16.0 / std::max(1.0, n_sq);
  std::size_t parts = std::min(kMaxParts, std::max<std::size_t>(1, t.n_obs / kMinObsPerPart));
  parts = std::min(parts, std::max<std::size_t>(1, static_cast<std::size_t>(by_reduction)));
  parts = std::min(parts, std::max<std::size_t>(1, t.n_groups));
  std::vector<std::size_t> bounds{0};
  for (std::size_t p = 1; p < parts; ++p) {
    const auto target = static_cast<std::int64_t>(t.n_obs * p / parts);
    const auto it = std::lower_bound(t.group_offsets, t.group_offsets + t.n_groups + 1, target);
    bounds.push_back(std::max(bounds.back(), static_cast<std::size_t>(it - t.group_offsets)));
  }
  bounds.push_back(t.n_groups);
  return bounds;
}

/// Private per-thread state: a part's upper-triangle matrix and rhs, the dense scatter arrays
/// of the group sums b and e (size n, zero outside the touched columns), a column bitmap that
/// yields the touched columns in ascending order without sorting, and row scratch.
struct PartWorkspace {
  static constexpr Eigen::Index kBatch = 32;  ///< groups per batched rank-k update
  std::size_t n;
  /// Scaled group vectors b/√S (schur: batch_b column per group) or, for dials, the pairs
  /// (e, b)/√S in batch_b and (e, −b)/√S in batch_e; zero outside rows [batch_min, batch_max].
  /// Their −B Bᵀ (+ E Eᵀ) is applied as one blocked rank-k update per kBatch groups.
  Eigen::MatrixXd batch_b, batch_e;
  Eigen::Index batch_used = 0;
  std::size_t batch_min = 0, batch_max = 0, batch_widest = 0;
  std::vector<double> matrix, rhs, b, e, a, row;
  std::vector<std::uint64_t> bits;
  std::vector<std::size_t> col, run_end, touched, touched_end, seg_first, seg_last, obs_first,
      obs_last;
  explicit PartWorkspace(std::size_t n_params)
      : n(n_params), batch_b(Eigen::MatrixXd::Zero(static_cast<Eigen::Index>(n_params), 2 * kBatch)),
        batch_e(Eigen::MatrixXd::Zero(static_cast<Eigen::Index>(n_params), 2 * kBatch)),
        matrix(n_params * n_params, 0.0), rhs(n_params, 0.0), b(n_params, 0.0),
        e(n_params, 0.0), row(n_params, 0.0), bits((n_params + 63) / 64, 0) {}
};

/// One observation: rhs += cr a, upper(matrix) += c a aᵀ (contiguous within column runs), and,
/// when the group is eliminated, the scatter b += cb a, e += ce a with the columns marked.
inline void observation_update(PartWorkspace& ws, const DerivativesView& v, std::size_t r,
                               double c, double cr, double cb, double ce, bool eliminate,
                               std::size_t& col_min, std::size_t& col_max) {
  const auto first = v.indptr[r];
  const auto k = static_cast<std::size_t>(v.indptr[r + 1] - first);
  if (k == 0) return;
  const std::size_t off = v.column_offset;
  ws.a.resize(k);
  ws.col.resize(k);
  ws.run_end.resize(k);
  double* __restrict av = ws.a.data();
  std::size_t* __restrict cv = ws.col.data();
  for (std::size_t q = 0; q < k; ++q) {
    av[q] = v.values[first + static_cast<std::int64_t>(q)];
    cv[q] = off + static_cast<std::size_t>(v.indices[first + static_cast<std::int64_t>(q)]);
  }
  const std::size_t n = ws.n;
  if (c != 0.0 || cr != 0.0) {
    // The row scattered densely (zero elsewhere) and cut into segments of ascending columns
    // with gaps of at most kObsGap merged: few long contiguous loops, the gaps add exact zeros.
    constexpr std::size_t kObsGap = 4;
    double* __restrict row = ws.row.data();
    std::size_t* __restrict seg_of = ws.run_end.data();
    ws.obs_first.clear();
    ws.obs_last.clear();
    for (std::size_t q = 0; q < k; ++q) {
      row[cv[q]] = av[q];
      if (q == 0 || cv[q] - cv[q - 1] > kObsGap) {
        ws.obs_first.push_back(cv[q]);
        ws.obs_last.push_back(cv[q] + 1);
      }
      ws.obs_last.back() = cv[q] + 1;
      seg_of[q] = ws.obs_first.size() - 1;
    }
    const std::size_t n_seg = ws.obs_first.size();
    const std::size_t* seg_first = ws.obs_first.data();
    const std::size_t* seg_last = ws.obs_last.data();
    double* __restrict matrix = ws.matrix.data();
    double* __restrict rhs = ws.rhs.data();
    for (std::size_t e1 = 0; e1 < k; ++e1) {
      const std::size_t c1 = cv[e1];
      rhs[c1] += cr * av[e1];
      const double ca1 = c * av[e1];
      double* __restrict out = matrix + c1 * n;
      for (std::size_t sg = seg_of[e1]; sg < n_seg; ++sg) {
        const std::size_t to = seg_last[sg];
        for (std::size_t q = sg == seg_of[e1] ? c1 : seg_first[sg]; q < to; ++q)
          out[q] += ca1 * row[q];
      }
    }
    for (std::size_t q = 0; q < k; ++q) row[cv[q]] = 0.0;
  }
  if (!eliminate) return;
  double* __restrict b = ws.b.data();
  double* __restrict e = ws.e.data();
  std::uint64_t* __restrict bits = ws.bits.data();
  for (std::size_t q = 0; q < k; ++q) {
    const std::size_t cq = cv[q];
    b[cq] += cb * av[q];
    e[cq] += ce * av[q];
    bits[cq >> 6] |= std::uint64_t{1} << (cq & 63);
    col_min = std::min(col_min, cq);  // no assumption that a row's columns are sorted
    col_max = std::max(col_max, cq);
  }
}

/// Apply the batched group corrections: upper(matrix) += −B Bᵀ (+ E Eᵀ for dials) over the
/// rows/columns the batch touches, as a blocked rank-k update; then clear the batch.
void flush_batch(PartWorkspace& ws, bool dials) {
  if (ws.batch_used == 0) return;
  const auto lo = static_cast<Eigen::Index>(ws.batch_min);
  const auto len = static_cast<Eigen::Index>(ws.batch_max - ws.batch_min + 1);
  const auto n = static_cast<Eigen::Index>(ws.n);
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<RowMajor, 0, Eigen::OuterStride<>> sub(ws.matrix.data() + lo * n + lo, len, len,
                                                    Eigen::OuterStride<>(n));
  const Eigen::Index used = ws.batch_used;
  if (dials) {  // E Eᵀ − B Bᵀ as one product [E B] [E −B]ᵀ
    auto left = ws.batch_b.block(lo, 0, len, 2 * used);
    auto right = ws.batch_e.block(lo, 0, len, 2 * used);
    sub.triangularView<Eigen::Upper>() += left * right.transpose();
    left.setZero();
    right.setZero();
  } else {
    auto bb = ws.batch_b.block(lo, 0, len, used);
    sub.selfadjointView<Eigen::Upper>().rankUpdate(bb, -1.0);
    bb.setZero();
  }
  ws.batch_used = 0;
  ws.batch_widest = 0;
}

/// The group's rank-1 (schur) or rank-2 (dials) correction −(b bᵀ − [dials] e eᵀ)/S over the
/// touched columns (ascending, from the bitmap), upper triangle only; clears b, e and the bits.
inline void group_update(PartWorkspace& ws, double inv_s, bool dials, std::size_t col_min,
                         std::size_t col_max) {
  ws.touched.clear();
  std::uint64_t* bits = ws.bits.data();
  for (std::size_t word = col_min >> 6; word <= (col_max >> 6); ++word) {
    std::uint64_t x = bits[word];
    bits[word] = 0;
    while (x) {
      ws.touched.push_back((word << 6) + lowest_bit(x));
      x &= x - 1;
    }
  }
  const std::size_t m = ws.touched.size();
  const std::size_t* tc = ws.touched.data();
  double* __restrict b = ws.b.data();
  double* __restrict e = ws.e.data();
  // Dense enough (touched columns fill at least half their span, as one or a few datasets'
  // blocks do): queue it for the blocked rank-k update, flushing first if it would widen the
  // batch's span beyond twice its widest group. Sparse spread (many datasets): rank-1 now.
  const std::size_t span = col_max - col_min + 1;
  if (2 * m >= span) {
    if (ws.batch_used > 0) {
      const std::size_t merged = std::max(ws.batch_max, col_max) - std::min(ws.batch_min, col_min) + 1;
      if (merged > 2 * std::max(ws.batch_widest, span)) flush_batch(ws, dials);
    }
    const double root = std::sqrt(inv_s);
    const Eigen::Index col = ws.batch_used++;
    if (dials) {  // columns 2 col, 2 col + 1: left (e, b), right (e, −b)
      for (std::size_t i = 0; i < m; ++i) {
        const auto ci = static_cast<Eigen::Index>(tc[i]);
        const double bs = b[tc[i]] * root;
        const double es = e[tc[i]] * root;
        ws.batch_b(ci, 2 * col) = es;
        ws.batch_b(ci, 2 * col + 1) = bs;
        ws.batch_e(ci, 2 * col) = es;
        ws.batch_e(ci, 2 * col + 1) = -bs;
      }
    } else {
      for (std::size_t i = 0; i < m; ++i)
        ws.batch_b(static_cast<Eigen::Index>(tc[i]), col) = b[tc[i]] * root;
    }
    if (col == 0) {
      ws.batch_min = col_min;
      ws.batch_max = col_max;
    } else {
      ws.batch_min = std::min(ws.batch_min, col_min);
      ws.batch_max = std::max(ws.batch_max, col_max);
    }
    ws.batch_widest = std::max(ws.batch_widest, span);
    if (ws.batch_used == PartWorkspace::kBatch) flush_batch(ws, dials);
  } else {
    // Segments: touched columns with gaps of at most kGap merged. b and e are zero in the gaps,
    // so updating them adds exact zeros; long contiguous loops beat many short runs.
    constexpr std::size_t kGap = 8;
    ws.touched_end.resize(m);  // here: the segment index of each touched column
    ws.seg_first.clear();
    ws.seg_last.clear();
    for (std::size_t i = 0; i < m; ++i) {
      if (i == 0 || tc[i] - tc[i - 1] > kGap) {
        ws.seg_first.push_back(tc[i]);
        ws.seg_last.push_back(tc[i] + 1);
      }
      ws.seg_last.back() = tc[i] + 1;
      ws.touched_end[i] = ws.seg_first.size() - 1;
    }
    const std::size_t n_seg = ws.seg_first.size();
    const std::size_t n = ws.n;
    double* __restrict matrix = ws.matrix.data();
    for (std::size_t i = 0; i < m; ++i) {
      const std::size_t ci = tc[i];
      const double bi = b[ci] * inv_s;
      const double ei = e[ci] * inv_s;
      double* __restrict out = matrix + ci * n;
      for (std::size_t sg = ws.touched_end[i]; sg < n_seg; ++sg) {
        const std::size_t from = sg == ws.touched_end[i] ? ci : ws.seg_first[sg];
        const std::size_t to = ws.seg_last[sg];
        if (dials) {
          for (std::size_t q = from; q < to; ++q) out[q] += ei * e[q] - bi * b[q];
        } else {
          for (std::size_t q = from; q < to; ++q) out[q] -= bi * b[q];
        }
      }
    }
  }
  for (std::size_t i = 0; i < m; ++i) {
    b[tc[i]] = 0.0;
    e[tc[i]] = 0.0;
  }
}

/// All terms of the groups [g_first, g_last) into the workspace (zeroed by the caller): every
/// observation is read once, in table order, and each group's sums are formed once.
void part_terms(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                const std::vector<std::int32_t>& src_block, const std::vector<std::int64_t>& src_row,
                const RowTerms& rt, bool dials, bool fixed, std::size_t g_first, std::size_t g_last,
                PartWorkspace& ws) {
  for (std::size_t h = g_first; h < g_last; ++h) {
    const double inv_s = rt.inv_s[h];
    const bool eliminate = !fixed && inv_s != 0.0;
    if (!fixed && !eliminate) continue;  // singleton or empty group: no terms (see row_terms)
    std::size_t col_min = ws.n, col_max = 0;
    for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
      const DerivativesView& v = blocks[static_cast<std::size_t>(src_block[l])].view;
      if (v.n_cols == 0) continue;
      observation_update(ws, v, static_cast<std::size_t>(src_row[l]), rt.obs[l], rt.rhs[l],
                         rt.b[l], rt.e[l], eliminate, col_min, col_max);
    }
    if (eliminate && col_min <= col_max) group_update(ws, inv_s, dials, col_min, col_max);
  }
  flush_batch(ws, dials);
}

}  // namespace

NormalEquationsSummary normal_equations(const GroupedObservations& t,
                                        const std::vector<FitBlock>& blocks, std::size_t n,
                                        double* matrix, double* rhs, NormalMatrixKind kind,
                                        const double* fixed_Ih, int n_threads) {
  std::vector<double> g(t.n_obs);
  gather_scales(blocks, g.data());
  const RowTerms rt = row_terms(t, g.data(), fixed_Ih);
  std::vector<std::int32_t> src_block(t.n_obs, 0);
  std::vector<std::int64_t> src_row(t.n_obs, 0);
  for (std::size_t b = 0; b < blocks.size(); ++b)
    for (std::size_t r = 0; r < blocks[b].view.n_rows; ++r) {
      const std::size_t row = detail::table_row(blocks[b], r);
      src_block[row] = static_cast<std::int32_t>(b);
      src_row[row] = static_cast<std::int64_t>(r);
    }
  std::fill(matrix, matrix + n * n, 0.0);
  std::fill(rhs, rhs + n, 0.0);
  if (n == 0) return {rt.r_sq, t.n_obs};
  const auto parts = group_parts(t, n);
  const std::size_t n_parts = parts.size() - 1;
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(n_parts)));
  const bool dials = kind == NormalMatrixKind::dials;
  const bool fixed = fixed_Ih != nullptr;
  // Each part is summed into a thread's private workspace, then added to the result in part
  // order (ordered region): the summation order of every element is independent of nt.
  auto add_part = [&](PartWorkspace& ws) {
    for (std::size_t i = 0; i < n; ++i) {
      const double* __restrict src = ws.matrix.data() + i * n;
      double* __restrict dst = matrix + i * n;
      for (std::size_t j = i; j < n; ++j) dst[j] += src[j];
      rhs[i] += ws.rhs[i];
    }
  };
  auto run_part = [&](PartWorkspace& ws, std::size_t p) {
    std::fill(ws.matrix.begin(), ws.matrix.end(), 0.0);
    std::fill(ws.rhs.begin(), ws.rhs.end(), 0.0);
    part_terms(t, blocks, src_block, src_row, rt, dials, fixed, parts[p], parts[p + 1], ws);
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    PartWorkspace ws(n);
    const auto count = static_cast<std::int64_t>(n_parts);
#pragma omp for ordered schedule(static, 1)
    for (std::int64_t p = 0; p < count; ++p) {
      run_part(ws, static_cast<std::size_t>(p));
#pragma omp ordered
      add_part(ws);
    }
  }
#else
  {
    PartWorkspace ws(n);
    for (std::size_t p = 0; p < n_parts; ++p) {
      run_part(ws, p);
      add_part(ws);
    }
  }
#endif
  for (std::size_t i = 0; i < n; ++i)  // mirror the upper triangle
    for (std::size_t j = i + 1; j < n; ++j) matrix[j * n + i] = matrix[i * n + j];
  return {rt.r_sq, t.n_obs};
}

void normal_matrix_diagonal(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                            std::size_t n, double* diagonal, const double* fixed_Ih) {
  std::vector<double> g(t.n_obs);
  gather_scales(blocks, g.data());
  const RowTerms rt = row_terms(t, g.data(), fixed_Ih);
  std::fill(diagonal, diagonal + n, 0.0);
  std::vector<std::int32_t> src_block(t.n_obs, 0);
  std::vector<std::int64_t> src_row(t.n_obs, 0);
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const DerivativesView& v = blocks[b].view;
    for (std::size_t r = 0; r < v.n_rows; ++r) {
      const std::size_t row = detail::table_row(blocks[b], r);
      src_block[row] = static_cast<std::int32_t>(b);
      src_row[row] = static_cast<std::int64_t>(r);
      for (auto e = v.indptr[r]; e < v.indptr[r + 1]; ++e)
        diagonal[v.column_offset + static_cast<std::size_t>(v.indices[e])] +=
            rt.obs[row] * v.values[e] * v.values[e];
    }
  }
  if (fixed_Ih) return;
  std::vector<double> bsum(n, 0.0);
  std::vector<std::size_t> touched;
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    if (rt.inv_s[h] == 0.0) continue;
    touched.clear();
    for_each_group_derivative(t, blocks, src_block, src_row, h, [&](auto l, std::size_t c, double d) {
      if (bsum[c] == 0.0) touched.push_back(c);
      bsum[c] += rt.b[l] * d;
      if (bsum[c] == 0.0) bsum[c] = 1e-300;  // keep it marked as touched
    });
    for (std::size_t c : touched) {
      diagonal[c] -= bsum[c] * bsum[c] * rt.inv_s[h];
      bsum[c] = 0.0;
    }
  }
}

void row_quadratic_forms(std::size_t n_rows, const std::int64_t* indptr,
                         const std::int32_t* indices, const double* values, std::size_t n,
                         const double* V, double* out, int n_threads) {
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(std::max<std::size_t>(n_rows, 1))));
  detail::per_thread(nt, [&](int th, int) {
    const std::size_t lo = n_rows * static_cast<std::size_t>(th) / static_cast<std::size_t>(nt);
    const std::size_t hi = n_rows * static_cast<std::size_t>(th + 1) / static_cast<std::size_t>(nt);
    for (std::size_t r = lo; r < hi; ++r) {
      double acc = 0.0;
      for (auto a = indptr[r]; a < indptr[r + 1]; ++a) {
        const double* Va = V + static_cast<std::size_t>(indices[a]) * n;
        double inner = 0.0;
        for (auto b = indptr[r]; b < indptr[r + 1]; ++b) inner += Va[indices[b]] * values[b];
        acc += values[a] * inner;
      }
      out[r] = acc;
    }
  });
}

}  // namespace xtalscale::fit
