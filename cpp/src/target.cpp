// Scaling target f = Σ w r² and its envelope-theorem gradient (see target.hpp).
#include "xtalscale/target.hpp"

#include <algorithm>
#include <vector>

#include "fit_parallel.hpp"

namespace xtalscale::fit {

namespace {

/// Per table row: Ĩ, r, and the gradient coefficient −2 w r Ĩ; returns f partials per group chunk.
double residual_pass(const GroupedObservations& t, const double* g, const double* fixed_Ih,
                     double* Ih_row, double* r_row, double* coef, int n_threads) {
  const std::size_t n_chunks = (t.n_groups + detail::kChunkRows - 1) / detail::kChunkRows;
  std::vector<double> f_chunk(n_chunks, 0.0);
  detail::parallel_for(n_chunks, n_threads, [&](std::size_t c) {
    const std::size_t h_end = std::min(t.n_groups, (c + 1) * detail::kChunkRows);
    double f = 0.0;
    for (std::size_t h = c * detail::kChunkRows; h < h_end; ++h) {
      const auto first = t.group_offsets[h];
      const auto last = t.group_offsets[h + 1];
      double ih = 0.0;
      if (!fixed_Ih) {
        const detail::GroupSums sums = detail::group_sums(t, g, h);
        ih = sums.wgg > 0.0 ? sums.wgi / sums.wgg : 0.0;
      }
      for (auto l = first; l < last; ++l) {
        if (fixed_Ih) ih = fixed_Ih[l];
        const double r = t.intensities[l] - g[l] * ih;
        const double wr = t.weights[l] * r;
        f += wr * r;
        coef[l] = -2.0 * wr * ih;
        if (Ih_row) Ih_row[l] = ih;
        if (r_row) r_row[l] = r;
      }
    }
    f_chunk[c] = f;
  });
  double f = 0.0;
  for (double v : f_chunk) f += v;  // fixed order: identical for any thread count
  return f;
}

/// gradient = Σ_rows coef[row] ∂g/∂p, via per-chunk partials over each block's own columns.
void gradient_pass(const std::vector<FitBlock>& blocks, const double* coef, std::size_t n_params,
                   double* gradient, int n_threads) {
  const auto chunks = detail::block_chunks(blocks);
  std::vector<std::size_t> start(chunks.size() + 1, 0);
  for (std::size_t c = 0; c < chunks.size(); ++c)
    start[c + 1] = start[c] + blocks[chunks[c].block].view.n_cols;
  std::vector<double> partial(start.back(), 0.0);
  detail::parallel_for(chunks.size(), n_threads, [&](std::size_t c) {
    const auto& ch = chunks[c];
    const FitBlock& block = blocks[ch.block];
    const DerivativesView& v = block.view;
    if (v.n_cols == 0) return;
    double* acc = partial.data() + start[c];
    for (std::size_t r = ch.first; r < ch.last; ++r) {
      const double k = coef[detail::table_row(block, r)];
      for (auto e = v.indptr[r]; e < v.indptr[r + 1]; ++e) acc[v.indices[e]] += k * v.values[e];
    }
  });
  std::fill(gradient, gradient + n_params, 0.0);
  for (std::size_t c = 0; c < chunks.size(); ++c) {
    const DerivativesView& v = blocks[chunks[c].block].view;
    const double* acc = partial.data() + start[c];
    for (std::size_t j = 0; j < v.n_cols; ++j) gradient[v.column_offset + j] += acc[j];
  }
}

}  // namespace

double functional_and_gradient(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                               std::size_t n_params, double* gradient, const TargetOptions& o) {
  std::vector<double> g_local;
  const double* g = o.g_out;
  if (o.g_out) {
    gather_scales(blocks, o.g_out, o.n_threads);
  } else if (identity_rows(blocks) && blocks[0].view.n_rows == t.n_obs) {
    g = blocks[0].view.scales;  // already in table order: no copy
  } else {
    g_local.resize(t.n_obs);
    gather_scales(blocks, g_local.data(), o.n_threads);
    g = g_local.data();
  }
  std::vector<double> coef_local;
  double* coef = o.dfdg_out;
  if (!coef) {
    coef_local.resize(t.n_obs);
    coef = coef_local.data();
  }
  const double f = residual_pass(t, g, o.fixed_Ih, o.Ih_out, o.residuals_out, coef, o.n_threads);
  if (gradient) gradient_pass(blocks, coef, n_params, gradient, o.n_threads);
  return f;
}

}  // namespace xtalscale::fit
