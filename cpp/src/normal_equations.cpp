// Normal equations with Ĩ eliminated, assembled per group without a Jacobian (see
// normal_equations.hpp). Threads own disjoint row ranges [lo, hi) of the upper triangle: each
// thread walks every observation and group but only writes its own rows, so the summation order
// of every matrix element is the same for any thread count.
#include "xtalscale/normal_equations.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

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

/// Row ranges with roughly equal upper-triangle area.
std::vector<std::size_t> row_split(std::size_t n, int n_threads) {
  std::vector<std::size_t> bounds{0};
  const double total = 0.5 * static_cast<double>(n) * static_cast<double>(n + 1);
  double acc = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    acc += static_cast<double>(n - i);
    if (bounds.size() < static_cast<std::size_t>(n_threads) &&
        acc >= total * static_cast<double>(bounds.size()) / n_threads)
      bounds.push_back(i + 1);
  }
  while (bounds.size() <= static_cast<std::size_t>(n_threads)) bounds.push_back(n);
  bounds.back() = n;
  return bounds;
}

/// Σ_l c_l a_l a_lᵀ (rows lo..hi) and the rhs, in block/row order. Each row's entries are
/// copied to contiguous local arrays and split into runs of consecutive columns (a smoother
/// window, the harmonics block): within a run the update is a contiguous, vectorisable loop.
/// The order of additions into each matrix element is unchanged (row by row).
void observation_terms(const std::vector<FitBlock>& blocks, const RowTerms& rt, std::size_t n,
                       std::size_t lo, std::size_t hi, double* __restrict matrix,
                       double* __restrict rhs) {
  std::vector<double> a;
  std::vector<std::size_t> col, run_end;
  for (const FitBlock& block : blocks) {
    const DerivativesView& v = block.view;
    const std::size_t off = v.column_offset;
    if (v.n_cols == 0 || off >= hi || off + v.n_cols <= lo) continue;
    for (std::size_t r = 0; r < v.n_rows; ++r) {
      const std::size_t row = detail::table_row(block, r);
      const double c = rt.obs[row];
      const double cr = rt.rhs[row];
      if (c == 0.0 && cr == 0.0) continue;
      const auto first = v.indptr[r];
      const auto k = static_cast<std::size_t>(v.indptr[r + 1] - first);
      a.resize(k);
      col.resize(k);
      run_end.resize(k);
      double* __restrict av = a.data();
      std::size_t* __restrict cv = col.data();
      for (std::size_t e = 0; e < k; ++e) {
        av[e] = v.values[first + static_cast<std::int64_t>(e)];
        cv[e] = off + static_cast<std::size_t>(v.indices[first + static_cast<std::int64_t>(e)]);
      }
      // run_end[e]: one past the last entry of the consecutive-column run containing e
      for (std::size_t e = k; e-- > 0;)
        run_end[e] = (e + 1 < k && cv[e + 1] == cv[e] + 1) ? run_end[e + 1] : e + 1;
      std::size_t e1 = 0;
      while (e1 < k && cv[e1] < lo) ++e1;
      for (; e1 < k && cv[e1] < hi; ++e1) {
        const std::size_t c1 = cv[e1];
        rhs[c1] += cr * av[e1];
        const double ca1 = c * av[e1];
        double* __restrict out = matrix + c1 * n;
        for (std::size_t e2 = e1; e2 < k;) {
          const std::size_t end = run_end[e2];
          double* __restrict o = out + cv[e2];
          const double* __restrict src = av + e2;
          const std::size_t len = end - e2;
          for (std::size_t t = 0; t < len; ++t) o[t] += ca1 * src[t];
          e2 = end;
        }
      }
    }
  }
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

/// − Σ_h (b bᵀ − [dials] e eᵀ)/S for rows lo..hi, in group order.
void group_terms(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                 const std::vector<std::int32_t>& src_block, const std::vector<std::int64_t>& src_row,
                 const RowTerms& rt, bool dials, std::size_t n, std::size_t lo, std::size_t hi,
                 double* matrix) {
  std::vector<double> b(n, 0.0), e(n, 0.0);
  std::vector<unsigned char> seen(n, 0);
  std::vector<std::size_t> touched, run_end;
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    const double inv_s = rt.inv_s[h];
    if (inv_s == 0.0) continue;
    touched.clear();
    for_each_group_derivative(t, blocks, src_block, src_row, h, [&](auto l, std::size_t c, double d) {
      if (!seen[c]) {
        seen[c] = 1;
        touched.push_back(c);
      }
      b[c] += rt.b[l] * d;
      e[c] += rt.e[l] * d;
    });
    std::sort(touched.begin(), touched.end());
    // runs of consecutive columns: the rank-1 update is contiguous (vectorisable) within a run
    const std::size_t m = touched.size();
    run_end.resize(m);
    for (std::size_t i = m; i-- > 0;)
      run_end[i] = (i + 1 < m && touched[i + 1] == touched[i] + 1) ? run_end[i + 1] : i + 1;
    for (std::size_t i = 0; i < m; ++i) {
      const std::size_t ci = touched[i];
      if (ci < lo || ci >= hi) continue;
      const double bi = b[ci] * inv_s;
      const double ei = e[ci] * inv_s;
      double* __restrict out = matrix + ci * n;
      for (std::size_t j = i; j < m;) {
        const std::size_t first_col = touched[j];
        const std::size_t len = run_end[j] - j;
        double* __restrict o = out + first_col;
        const double* __restrict bj = b.data() + first_col;
        const double* __restrict ej = e.data() + first_col;
        if (dials) {
          for (std::size_t q = 0; q < len; ++q) o[q] += ei * ej[q] - bi * bj[q];
        } else {
          for (std::size_t q = 0; q < len; ++q) o[q] -= bi * bj[q];
        }
        j = run_end[j];
      }
    }
    for (std::size_t c : touched) {
      b[c] = 0.0;
      e[c] = 0.0;
      seen[c] = 0;
    }
  }
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
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(std::max<std::size_t>(n, 1))));
  const auto bounds = row_split(n, nt);
  const bool dials = kind == NormalMatrixKind::dials;
  detail::per_thread(nt, [&](int th, int) {
    const std::size_t lo = bounds[static_cast<std::size_t>(th)];
    const std::size_t hi = bounds[static_cast<std::size_t>(th) + 1];
    if (lo >= hi) return;
    observation_terms(blocks, rt, n, lo, hi, matrix, rhs);
    if (!fixed_Ih) group_terms(t, blocks, src_block, src_row, rt, dials, n, lo, hi, matrix);
  });
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

}  // namespace xtalscale::fit
