// Model blocks: the scale components' terms and the product rule g = Π s_c, ∂g/∂p (the only
// implementation of the product rule; the Python product_rule and calc_sf_variances use it).
#include "xtalscale/model_block.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>

#include "xtalscale/check.hpp"
#include "fit_parallel.hpp"  // parallel_for, thread_number (OpenMP optional)
#include "internal/group_target.hpp"
#include "internal/kernel_support.hpp"  // with_window_width
#include "internal/large_buffers.hpp"
#include "internal/lean_fused.hpp"

namespace xtalscale {

namespace {

using detail::sized;

/// u_t = (c·s_a)·s_b for each of three terms t (a < b the other two): the products of
/// ModelBlock::rows_fused_transpose's per-term passes, in one pass over the rows.
XS_MULTIVERSION void others_products3(std::size_t count, const double* __restrict c,
                      const double* __restrict s0, const double* __restrict s1,
                      const double* __restrict s2, double* __restrict u0,
                      double* __restrict u1, double* __restrict u2) {
  for (std::size_t i = 0; i < count; ++i) {
    u0[i] = (c[i] * s1[i]) * s2[i];
    u1[i] = (c[i] * s0[i]) * s2[i];
    u2[i] = (c[i] * s0[i]) * s1[i];
  }
}

/// others_products3 with row i's c read at c[rows[i] − base] (a caller's table order).
XS_MULTIVERSION void others_products3_gathered(std::size_t count, const double* __restrict c,
                                               const std::int64_t* __restrict rows,
                                               std::int64_t base, const double* __restrict s0,
                                               const double* __restrict s1,
                                               const double* __restrict s2,
                                               double* __restrict u0, double* __restrict u1,
                                               double* __restrict u2) {
  for (std::size_t i = 0; i < count; ++i) {
    const double ci = c[rows[i] - base];
    u0[i] = (ci * s1[i]) * s2[i];
    u1[i] = (ci * s0[i]) * s2[i];
    u2[i] = (ci * s0[i]) * s1[i];
  }
}

/// ModelBlock::product_of_scales's physical-model products, row i's into g[rows[i] − base].
XS_MULTIVERSION void product3_scattered(std::size_t count, const double* __restrict s0,
                                        const double* __restrict s1, const double* __restrict s2,
                                        const std::int64_t* __restrict rows, std::int64_t base,
                                        double* __restrict g) {
  for (std::size_t i = 0; i < count; ++i) g[rows[i] - base] = (s0[i] * s1[i]) * s2[i];
}

/// The first pass of a physical model's chunk in ModelBlock::functional_and_gradient: g =
/// (s0·s1)·s2 (product_of_scales's products) and, in the same pass, the chunk's checks
/// (all_positive_finite of g; all_non_negative_finite of the weights @p w and all_finite of
/// the intensities @p inten, into @p table_ok). Returns whether every g is finite and > 0.
XS_MULTIVERSION bool product3_checked(std::size_t count, const double* __restrict s0,
                                      const double* __restrict s1, const double* __restrict s2,
                                      const double* __restrict w, const double* __restrict inten,
                                      double* __restrict g, bool& table_ok) {
  detail::RowChecks checks;
  for (std::size_t i = 0; i < count; ++i) {
    const double gi = (s0[i] * s1[i]) * s2[i];
    g[i] = gi;
    checks.add(gi, w[i], inten[i]);
  }
  return checks.finish(table_ok);
}

void check_held(const void* data, std::size_t size, std::size_t n, const char* name) {
  require(size == n, std::string(name) + " must have one value per row (" + std::to_string(n) +
                         "), got " + std::to_string(size));
  require(n == 0 || data != nullptr, std::string(name) + " is null");
}

/// Checks a CSR pattern (n_rows × n_cols, ascending columns within a row); returns its nnz.
/// Messages are built only on failure.
std::size_t check_pattern(std::size_t n_rows, std::size_t n_cols, const std::int64_t* indptr,
                          const std::int32_t* indices) {
  const auto fail = [](const std::string& problem) {
    throw std::invalid_argument("derivatives " + problem);
  };
  if (indptr[0] != 0) fail("indptr must start at 0");
  const auto limit = static_cast<std::int64_t>(n_cols);
  for (std::size_t i = 0; i < n_rows; ++i) {
    if (indptr[i + 1] < indptr[i]) fail("indptr must be non-decreasing");
    for (std::int64_t q = indptr[i]; q < indptr[i + 1]; ++q) {
      if (indices[q] < 0 || indices[q] >= limit)
        fail("indices must lie in [0, n_cols) (got " + std::to_string(indices[q]) + " in row " +
             std::to_string(i) + ")");
      if (q > indptr[i] && indices[q] <= indices[q - 1])
        fail("indices must be ascending within a row (row " + std::to_string(i) + ")");
    }
  }
  return static_cast<std::size_t>(indptr[n_rows]);
}

}  // namespace

// ------------------------------------------------------------------------------- terms

ModelTerm::~ModelTerm() = default;

void ModelTerm::pattern(std::int64_t* indptr, std::int32_t* indices) const {
  pattern_rows(0, n_rows_, indptr, indices);  // dense: every column of every row
}

void ModelTerm::add_transpose_product(const TermValues& v, const double* u, double* out) const {
  const std::size_t n = n_rows_;
  if (n_cols_ == 0) return;
  // dense rows and terms that serve row ranges: all rows as one range (evaluate()'s values
  // are those of evaluate_rows(0, n)); other sparse terms through their pattern()
  if (dense_ || evaluates_rows()) return add_transpose_product_rows(v, 0, n, u, out);
  std::vector<std::int64_t> indptr(n + 1);
  std::vector<std::int32_t> indices(nnz());
  pattern(indptr.data(), indices.data());
  for (std::size_t i = 0; i < n; ++i)
    for (std::int64_t q = indptr[i]; q < indptr[i + 1]; ++q) out[indices[q]] += u[i] * v.values[q];
}

TermValues ModelTerm::evaluate_rows(const double*, std::size_t, std::size_t, TermScratch&) const {
  throw std::logic_error("this term does not evaluate row ranges");
}

const double* ModelTerm::scales_rows(const double* p, std::size_t first, std::size_t count,
                                     TermScratch& scratch) const {
  return evaluate_rows(p, first, count, scratch).scales;
}

void ModelTerm::add_transpose_product_rows(const TermValues& v, std::size_t first,
                                           std::size_t count, const double* u,
                                           double* out) const {
  require(dense_, "a sparse term must override add_transpose_product_rows");
  (void)first;
  if (v.values_f32 != nullptr)
    components::dense_transpose_product(count, n_cols_, v.values_f32, u, out);
  else if (v.values != nullptr)
    components::dense_transpose_product(count, n_cols_, v.values, u, out);
}

void ModelTerm::full_pattern(std::size_t n_rows, std::size_t n_cols, std::int64_t* indptr,
                             std::int32_t* indices) {
  for (std::size_t i = 0; i <= n_rows; ++i) indptr[i] = static_cast<std::int64_t>(i * n_cols);
  for (std::size_t i = 0; i < n_rows; ++i)
    for (std::size_t k = 0; k < n_cols; ++k) indices[i * n_cols + k] = static_cast<std::int32_t>(k);
}

void ModelTerm::pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                             std::int32_t* indices) const {
  require(dense_, "a sparse term must override pattern_rows");
  (void)first;
  full_pattern(count, n_cols_, indptr, indices);
}

std::size_t ModelTerm::nnz_rows(std::size_t first, std::size_t count) const {
  if (dense_) return count * n_cols_;
  // a sparse term without a cheaper count: its pattern of the rows, built into temporaries
  std::vector<std::int64_t> indptr(count + 1);
  std::vector<std::int32_t> indices(count * std::max<std::size_t>(n_cols_, 1));
  pattern_rows(first, count, indptr.data(), indices.data());
  return static_cast<std::size_t>(indptr[count]);
}

std::int64_t ModelTerm::column_runs(std::size_t, std::size_t, std::int32_t*,
                                    std::int32_t*) const {
  return -1;
}

TermValues ModelTerm::fused_rows(const double* p, std::size_t first, std::size_t count,
                                 TermScratch& scratch) const {
  return evaluate_rows(p, first, count, scratch);
}

void ModelTerm::fused_transpose_rows(const TermValues& v, std::size_t first, std::size_t count,
                                     const double* u, double* out, TermScratch&) const {
  add_transpose_product_rows(v, first, count, u, out);
}

ScaleFactorTerm::ScaleFactorTerm(std::size_t n_rows)
    : ModelTerm(n_rows, 1, 1, true), ones_(n_rows, 1.0) {}

TermValues ScaleFactorTerm::evaluate(const double* p, TermScratch& scratch) const {
  require_finite(p, 1, "parameters");
  double* s = sized(scratch.scales, n_rows());
  std::fill(s, s + n_rows(), p[0]);
  return {s, ones_.data(), nullptr};
}

std::size_t ScaleFactorTerm::nbytes() const { return ones_.size() * 8; }

TermValues ScaleFactorTerm::evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                          TermScratch& scratch) const {
  require_finite(p, 1, "parameters");
  double* s = sized(scratch.scales, count);
  std::fill(s, s + count, p[0]);
  return {s, ones_.data() + first, nullptr};
}

ExpFactorTerm::ExpFactorTerm(HeldArray<double> factor)
    : ModelTerm(factor.size, 1, 1, true),
      factor_(std::move(factor)) {
  require_finite(factor_.data, factor_.size, "factor");
}

TermValues ExpFactorTerm::evaluate(const double* p, TermScratch& scratch) const {
  require_finite(p, 1, "parameters");
  double* s = sized(scratch.scales, n_rows());
  double* d = sized(scratch.values, n_rows());
  components::exp_scales(n_rows(), factor_.data, p[0], s, d);
  return {s, d, nullptr};
}

std::size_t ExpFactorTerm::nbytes() const { return factor_.size * 8; }

TermValues ExpFactorTerm::evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                        TermScratch& scratch) const {
  require_finite(p, 1, "parameters");
  double* s = sized(scratch.scales, count);
  double* d = sized(scratch.values, count);
  components::exp_scales(count, factor_.data + first, p[0], s, d);
  return {s, d, nullptr};
}

const double* ExpFactorTerm::scales_rows(const double* p, std::size_t first, std::size_t count,
                                         TermScratch& scratch) const {
  require_finite(p, 1, "parameters");
  double* s = sized(scratch.scales, count);
  components::exp_scales(count, factor_.data + first, p[0], s, nullptr);
  return s;
}

SmoothTerm::SmoothTerm(std::shared_ptr<const components::WeightMatrix> weights,
                       HeldArray<double> b_factor)
    : ModelTerm(weights ? weights->n_rows() : 0, weights ? weights->n_cols() : 0,
                weights ? weights->n_params() : 0, false),
      w_(std::move(weights)),
      factor_(std::move(b_factor)) {
  require(w_ != nullptr, "weights must not be null");
  nnz_ = w_->nnz();
  if (factor_.data != nullptr || factor_.size != 0) {
    check_held(factor_.data, factor_.size, n_rows(), "b_factor");
    require_finite(factor_.data, factor_.size, "b_factor");
  }
}

TermValues SmoothTerm::evaluate(const double* p, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, n_rows());
  if (factor_.data == nullptr) {  // linear: ∂s/∂p is W itself
    w_->values(p, s);
    return {s, w_->data().data(), nullptr};
  }
  double* d = sized(scratch.values, nnz_);
  w_->b_scales(p, factor_.data, s, d);
  return {s, d, nullptr};
}

std::size_t SmoothTerm::nbytes() const { return w_->nbytes() + factor_.size * 8; }

TermValues SmoothTerm::evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                     TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  const auto& ip = w_->indptr();
  if (factor_.data == nullptr) {  // linear: the rows' stored weights are the derivatives
    w_->values_rows(p, first, count, s);
    return {s, w_->data().data() + ip[first], nullptr};
  }
  double* d = sized(scratch.values, static_cast<std::size_t>(ip[first + count] - ip[first]));
  w_->b_scales_rows(p, factor_.data, first, count, s, d);
  return {s, d, nullptr};
}

void SmoothTerm::add_transpose_product_rows(const TermValues& v, std::size_t first,
                                            std::size_t count, const double* u,
                                            double* out) const {
  const auto& ip = w_->indptr();
  const auto& ix = w_->indices();
  const auto base = ip[first];
  for (std::size_t i = 0; i < count; ++i)
    for (auto q = ip[first + i]; q < ip[first + i + 1]; ++q) out[ix[q]] += u[i] * v.values[q - base];
}

std::size_t SmoothTerm::nnz_rows(std::size_t first, std::size_t count) const {
  const auto& ip = w_->indptr();  // the held row starts: no row is visited
  return static_cast<std::size_t>(ip[first + count] - ip[first]);
}

void SmoothTerm::pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                              std::int32_t* indices) const {
  const auto& ip = w_->indptr();
  const auto& ix = w_->indices();
  const auto base = ip[first];
  for (std::size_t i = 0; i <= count; ++i) indptr[i] = ip[first + i] - base;
  std::copy(ix.begin() + base, ix.begin() + ip[first + count], indices);
}

LeanSmoothTerm::LeanSmoothTerm(const GaussianSmoother<1>& smoother, HeldArray<double> x,
                               double x_shift, HeldArray<std::uint16_t> window,
                               HeldArray<double> q, bool first_fixed, HeldArray<double> b_factor)
    : ModelTerm(x.size, smoother.num_values() - (first_fixed ? 1 : 0), smoother.num_values(),
                false),
      smoother_(smoother),
      x_shift_(x_shift),
      window_(std::move(window)),
      q_(std::move(q)),
      first_fixed_(first_fixed),
      factor_(std::move(b_factor)) {
  check_held(window_.data, window_.size, n_rows(), "window");
  check_held(q_.data, q_.size, n_rows(), "q");
  for (std::size_t i = 0; i < n_rows(); ++i) {
    if (!std::isnan(q_.data[i])) continue;
    far_rows_.push_back(i);
    far_x_.push_back(x.data[i]);
  }
  if (factor_.data != nullptr || factor_.size != 0) {
    check_held(factor_.data, factor_.size, n_rows(), "b_factor");
    // checked once here, as the other terms' held data, not again by every evaluation
    require(all_positive_finite(factor_.data, factor_.size), "b_factor must be finite and positive");
  }
  require(n_rows() < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) /
                         std::max<std::size_t>(smoother_.max_row_nnz(), 1),
          "too many rows for a lean smoother term; split the block");
  // The kernels index the parameters and their accumulators by the window records: each
  // window must lie within the smoother's values and its bound.
  const int width = smoother_.axis(0).max_window();
  const auto n_values = static_cast<int>(smoother_.num_values());
  for (std::size_t i = 0; i < n_rows(); ++i) {
    const int f = components::window_first(window_.data[i]);
    const int c = components::window_count(window_.data[i]);
    if (c > width || f + c > n_values)
      throw std::invalid_argument("window record of row " + std::to_string(i) +
                                  " lies outside the smoother's values");
  }
  // The window records fix the pattern: a row holds its window's columns (column 0 dropped
  // with a fixed first parameter), as smooth_1d_apply writes them.
  std::size_t nnz = 0;
  for (std::size_t i = 0; i < n_rows(); ++i) nnz += row_columns(i).second;
  nnz_ = nnz;
}

std::pair<int, std::size_t> LeanSmoothTerm::row_columns(std::size_t i) const {
  int first = components::window_first(window_.data[i]);
  int count = components::window_count(window_.data[i]);
  if (first_fixed_) {  // column j of the full parameters is column j − 1; p₀ has none
    if (first == 0 && count > 0) {
      first = 1;
      --count;
    }
    --first;
  }
  return {first, static_cast<std::size_t>(count)};
}

const double* LeanSmoothTerm::x_rows(std::size_t first, std::size_t count,
                                     TermScratch& scratch) const {
  const auto lo = std::lower_bound(far_rows_.begin(), far_rows_.end(), first);
  if (lo == far_rows_.end() || *lo >= first + count) return q_.data + first;  // never read
  double* x = sized(scratch.aux, count);
  for (auto it = lo; it != far_rows_.end() && *it < first + count; ++it)
    x[*it - first] = far_x_[static_cast<std::size_t>(it - far_rows_.begin())];
  return x;
}

TermValues LeanSmoothTerm::evaluate(const double* p, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, n_rows());
  // rows may be written at the full window width and trimmed: room for the last one's overhang
  double* d = sized(scratch.values, nnz_ + kMaxAxisWindow);
  components::fused::smooth_1d_apply_prechecked(smoother_, n_rows(), x_rows(0, n_rows(), scratch),
                                             x_shift_, window_.data, q_.data, p, first_fixed_,
                                             factor_.data, s, d);
  return {s, d, nullptr};
}

TermValues LeanSmoothTerm::evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                         TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  double* d = sized(scratch.values, count * std::max<std::size_t>(smoother_.max_row_nnz(), 1));
  components::fused::smooth_1d_apply_prechecked(smoother_, count, x_rows(first, count, scratch),
                                             x_shift_, window_.data + first, q_.data + first, p,
                                             first_fixed_,
                                             factor_.data ? factor_.data + first : nullptr, s, d);
  return {s, d, nullptr};
}

const double* LeanSmoothTerm::scales_rows(const double* p, std::size_t first, std::size_t count,
                                          TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  components::fused::smooth_1d_apply_prechecked(smoother_, count, x_rows(first, count, scratch),
                                             x_shift_, window_.data + first, q_.data + first, p,
                                             first_fixed_,
                                             factor_.data ? factor_.data + first : nullptr, s,
                                             nullptr);
  return s;
}

namespace {

/// LeanSmoothTerm's transposed product for a window bound W: every row adds W products (those
/// past its window +0.0, chosen without a branch) into a copy of @p out padded by W columns,
/// so no row waits on a mispredicted window length. Each column still sums its rows' products
/// in row order, the same bits as adding the window's products alone (out never holds −0.0
/// after a sum, and x + (+0.0) = x otherwise). Reads up to W − 1 values past a row's own,
/// within the evaluation's buffer (sized for rows written at the full width).
template <int W>
void lean_transpose_rows(std::size_t count, const std::uint16_t* window, bool first_fixed,
                         const double* values, const double* u, double* out, std::size_t n_cols) {
  std::vector<double> acc(n_cols + W + 1);  // acc[1 + c] for column c ∈ [−1, n_cols + W)
  std::copy(out, out + n_cols, acc.begin() + 1);
  const int skip = first_fixed ? 1 : 0;
  std::size_t q = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const int f = components::window_first(window[i]), cnt = components::window_count(window[i]);
    const int dropped = f < skip ? 1 : 0;  // column 0 of a fixed first parameter: no column
    const int n = std::max(cnt - dropped, 0);
    double* a = acc.data() + 1 + (f - skip + dropped);
    const double ui = u[i];
    for (int k = 0; k < W; ++k) {
      const double product = ui * values[q + static_cast<std::size_t>(k)];
      a[k] += k < n ? product : 0.0;
    }
    q += static_cast<std::size_t>(n);
  }
  std::copy(acc.begin() + 1, acc.begin() + 1 + static_cast<std::ptrdiff_t>(n_cols), out);
}

}  // namespace

void LeanSmoothTerm::add_transpose_product_rows(const TermValues& v, std::size_t first,
                                                std::size_t count, const double* u,
                                                double* out) const {
  const int width = smoother_.axis(0).max_window();
  detail::with_window_width<1>(width, [&](auto w) {
    lean_transpose_rows<decltype(w)::value>(count, window_.data + first, first_fixed_, v.values,
                                            u, out, n_cols());
  });
}

TermValues LeanSmoothTerm::fused_rows(const double* p, std::size_t first, std::size_t count,
                                      TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  const int stride = components::fused::lean_fused_stride(smoother_.axis(0).max_window());
  double* wn = sized(scratch.values, count * static_cast<std::size_t>(stride));
  components::fused::lean_fused_rows(smoother_, count, x_rows(first, count, scratch),
                                     window_.data + first,
                                     q_.data + first, p,
                                     factor_.data ? factor_.data + first : nullptr, s, wn);
  return {s, wn, nullptr};
}

void LeanSmoothTerm::fused_transpose_rows(const TermValues& v, std::size_t first,
                                          std::size_t count, const double* u, double* out,
                                          TermScratch& scratch) const {
  components::fused::lean_fused_transpose(smoother_.axis(0).max_window(), count,
                                          window_.data + first, v.values, u, v.scales,
                                          factor_.data ? factor_.data + first : nullptr,
                                          n_params(), first_fixed_, out, scratch.aux);
}

std::size_t LeanSmoothTerm::nnz_rows(std::size_t first, std::size_t count) const {
  std::size_t nnz = 0;  // one window record per row, no column written
  for (std::size_t i = 0; i < count; ++i) nnz += row_columns(first + i).second;
  return nnz;
}

void LeanSmoothTerm::pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                                  std::int32_t* indices) const {
  // Read from the window records alone (no weights computed): the same rows smooth_1d_apply
  // writes, column by column in ascending order.
  std::int64_t nnz = 0;
  indptr[0] = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const auto [col, n_cols] = row_columns(first + i);
    for (std::size_t k = 0; k < n_cols; ++k) indices[nnz++] = col + static_cast<std::int32_t>(k);
    indptr[i + 1] = nnz;
  }
}

std::int64_t LeanSmoothTerm::column_runs(std::size_t first, std::size_t count,
                                         std::int32_t* run_first, std::int32_t* run_length) const {
  std::int64_t nnz = 0;  // row_columns() of every row, as pattern_rows() writes them
  for (std::size_t i = 0; i < count; ++i) {
    const auto [col, n_cols] = row_columns(first + i);
    run_first[i] = col;
    run_length[i] = static_cast<std::int32_t>(n_cols);
    nnz += static_cast<std::int64_t>(n_cols);
  }
  return nnz;
}

std::size_t LeanSmoothTerm::nbytes() const {
  return window_.size * 2 + q_.size * 8 + factor_.size * 8 + far_rows_.size() * 16;
}

template <int D>
GridSmoothTerm<D>::GridSmoothTerm(const GaussianSmoother<D>& smoother,
                                  std::array<HeldArray<double>, D> coords)
    : ModelTerm(coords[0].size, smoother.num_values(), smoother.num_values(), false),
      smoother_(smoother),
      coords_(std::move(coords)) {
  static const char* const kNames[3] = {"x", "y", "z"};
  for (int a = 0; a < D; ++a) check_held(coords_[a].data, coords_[a].size, n_rows(), kNames[a]);
  require(n_rows() < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) /
                         std::max<std::size_t>(smoother_.max_row_nnz(), 1),
          "too many rows for a smoother term; split the block");
  nnz_ = smoother_.weight_pattern(n_rows(), coordinate_pointers(), nullptr, nullptr);
}

template <int D>
std::array<const double*, D> GridSmoothTerm<D>::coordinate_pointers() const {
  std::array<const double*, D> ptrs{};
  for (int a = 0; a < D; ++a) ptrs[a] = coords_[a].data;
  return ptrs;
}

template <int D>
void GridSmoothTerm<D>::pattern(std::int64_t* indptr, std::int32_t* indices) const {
  smoother_.weight_pattern(n_rows(), coordinate_pointers(), indptr, indices);
}

template <int D>
TermValues GridSmoothTerm<D>::evaluate(const double* p, TermScratch& scratch) const {
  double* s = sized(scratch.scales, n_rows());
  // Rows are written at a fixed width and trimmed: room for the last row's overhang.
  double* d = sized(scratch.values, nnz_ + kMaxAxisWindow);
  smoother_.multi_value_derivatives(n_rows(), coordinate_pointers(), p, n_params(), s, d);
  return {s, d, nullptr};
}

template <int D>
std::size_t GridSmoothTerm<D>::nbytes() const {
  return D * n_rows() * 8;
}

template class GridSmoothTerm<2>;
template class GridSmoothTerm<3>;

HarmonicsTerm::HarmonicsTerm(HeldArray<double> harmonics, std::size_t n_params)
    : ModelTerm(n_params ? harmonics.size / n_params : 0, n_params, n_params, true),
      h64_(std::move(harmonics)) {
  require(n_params > 0 && h64_.size % n_params == 0,
          "harmonics must hold n_rows × n_params values");
}

HarmonicsTerm::HarmonicsTerm(HeldArray<float> harmonics, std::size_t n_params)
    : ModelTerm(n_params ? harmonics.size / n_params : 0, n_params, n_params, true),
      h32_(std::move(harmonics)) {
  require(n_params > 0 && h32_.size % n_params == 0,
          "harmonics must hold n_rows × n_params values");
}

TermValues HarmonicsTerm::evaluate(const double* p, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, n_rows());
  if (h32_.data != nullptr) {
    components::sh_scales_f32(n_rows(), n_params(), h32_.data, p, s);
    return {s, nullptr, h32_.data};
  }
  components::sh_scales(n_rows(), n_params(), h64_.data, p, s);
  return {s, h64_.data, nullptr};
}

std::size_t HarmonicsTerm::nbytes() const { return h64_.size * 8 + h32_.size * 4; }

TermValues HarmonicsTerm::evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                        TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  const std::size_t c = n_params();
  if (h32_.data != nullptr) {
    components::sh_scales_f32(count, c, h32_.data + first * c, p, s);
    return {s, nullptr, h32_.data + first * c};
  }
  components::sh_scales(count, c, h64_.data + first * c, p, s);
  return {s, h64_.data + first * c, nullptr};
}

FixedScalesTerm::FixedScalesTerm(HeldArray<double> scales)
    : ModelTerm(scales.size, 0, 0, true), scales_(std::move(scales)) {
  require_finite(scales_.data, scales_.size, "scales");
}

TermValues FixedScalesTerm::evaluate(const double*, TermScratch&) const {
  return {scales_.data, nullptr, nullptr};
}

std::size_t FixedScalesTerm::nbytes() const { return scales_.size * 8; }

TermValues FixedScalesTerm::evaluate_rows(const double*, std::size_t first, std::size_t,
                                          TermScratch&) const {
  return {scales_.data + first, nullptr, nullptr};
}

ExternalTerm::ExternalTerm(std::size_t n_rows, std::size_t n_cols)
    : ModelTerm(n_rows, n_cols, 0, false), scales_(n_rows), indptr_(n_rows + 1, 0) {}

void ExternalTerm::take_pattern(std::vector<std::int64_t> indptr,
                                std::vector<std::int32_t> indices) {
  if (indptr != indptr_ || indices != indices_) {
    indptr_ = std::move(indptr);
    indices_ = std::move(indices);
    nnz_ = indices_.size();
    ++pattern_version_;
  }
}

void ExternalTerm::set(const double* scales, const std::int64_t* indptr,
                       const std::int32_t* indices, const double* values) {
  const std::size_t n = n_rows();
  require_finite(scales, n, "scales");
  const std::size_t nnz = check_pattern(n, n_cols(), indptr, indices);
  require_finite(values, nnz, "derivatives");
  take_pattern(std::vector<std::int64_t>(indptr, indptr + n + 1),
               std::vector<std::int32_t>(indices, indices + nnz));
  std::copy(scales, scales + n, scales_.begin());
  values_.assign(values, values + nnz);
  is_set_ = true;
}

void ExternalTerm::set_dense(const double* scales, const double* derivatives) {
  const std::size_t n = n_rows(), c = n_cols();
  require_finite(scales, n, "scales");
  require_finite(derivatives, n * c, "derivatives");
  if (nnz_ != n * c || indptr_[n] != static_cast<std::int64_t>(n * c)) {
    std::vector<std::int64_t> ip(n + 1);
    std::vector<std::int32_t> ix(n * c);
    full_pattern(n, c, ip.data(), ix.data());
    take_pattern(std::move(ip), std::move(ix));
  }
  std::copy(scales, scales + n, scales_.begin());
  values_.assign(derivatives, derivatives + n * c);
  is_set_ = true;
}

void ExternalTerm::pattern(std::int64_t* indptr, std::int32_t* indices) const {
  std::copy(indptr_.begin(), indptr_.end(), indptr);
  std::copy(indices_.begin(), indices_.end(), indices);
}

TermValues ExternalTerm::evaluate(const double*, TermScratch&) const {
  require(is_set_, "an external term must be set before the block is evaluated");
  return {scales_.data(), values_.data(), nullptr};
}

void ExternalTerm::add_transpose_product(const TermValues& v, const double* u, double* out) const {
  for (std::size_t i = 0; i < n_rows(); ++i)
    for (std::int64_t q = indptr_[i]; q < indptr_[i + 1]; ++q) out[indices_[q]] += u[i] * v.values[q];
}

std::size_t ExternalTerm::nbytes() const {
  return (scales_.size() + values_.size() + indptr_.size()) * 8 + indices_.size() * 4;
}

// ------------------------------------------------------------------------------- block

namespace {
/// Rows per chunk of the chunked paths: the terms' chunk scratch (a few values per row per
/// term) stays in L2 and is reused by every chunk and every call.
constexpr std::size_t kChunkRows = 4096;

/// Rows per chunk for a pass whose outputs are per row (no value depends on the chunking):
/// kChunkRows on one thread; on more, the smallest whole multiple of @p n_threads chunks of at
/// most kChunkRows rows, of equal length, so that the threads get equal shares (a 20 000-row
/// block is 6 chunks of 3334 rows, 3 : 3 on two threads, rather than 5 of 4096, 3 : 2).
/// A block with fewer than kMinThreadRows rows per thread is one serial pass: waking a worker
/// costs more than it saves on so few rows (a 60-sweep job's streamed blocks hold ~1000 rows
/// of each sweep, and their thousands of two-way splits made its minimisation slower on two
/// threads than on one).
constexpr std::size_t kMinThreadRows = 2048;

std::size_t balanced_chunk_rows(std::size_t n_rows, int n_threads) {
  const std::size_t n_chunks = (n_rows + kChunkRows - 1) / kChunkRows;
  if (n_threads <= 1 || n_chunks == 0) return kChunkRows;
  const auto nt = static_cast<std::size_t>(n_threads);
  if (n_rows < nt * kMinThreadRows) return std::max<std::size_t>(n_rows, 1);
  const std::size_t balanced = (n_chunks + nt - 1) / nt * nt;
  return std::max<std::size_t>(1, (n_rows + balanced - 1) / balanced);
}
}  // namespace

ModelBlock::ModelBlock(std::size_t n_rows) : n_rows_(n_rows) {
  out_.scales = std::make_shared<std::vector<double>>(n_rows, 1.0);
  out_.indptr = std::make_shared<std::vector<std::int64_t>>(n_rows + 1, 0);
  out_.indices = std::make_shared<std::vector<std::int32_t>>();
  out_.values = std::make_shared<std::vector<double>>();
}

void ModelBlock::add_term(std::shared_ptr<ModelTerm> term, bool active) {
  require(term != nullptr, "term must not be null");
  require(term->n_rows() == n_rows_, "term has " + std::to_string(term->n_rows()) +
                                         " rows but the block has " + std::to_string(n_rows_));
  col_start_.push_back(n_cols_);
  param_start_.push_back(n_params_);
  if (active) n_cols_ += term->n_cols();
  n_params_ += term->n_params();
  require(n_cols_ < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
          "too many columns for 32-bit column indices");
  terms_.push_back(std::move(term));
  active_.push_back(active);
  built_ = false;
}

bool ModelBlock::pattern_stale() const {
  if (!built_) return true;
  for (std::size_t t = 0; t < terms_.size(); ++t)
    if (active_[t] && terms_[t]->pattern_version() != built_versions_[t]) return true;
  return false;
}

void ModelBlock::build_pattern(int n_threads) {
  if (!chunked()) {
    build_pattern_whole();
    return;
  }
  // Three passes instead of one serial walk (which cost more than the evaluation itself):
  // (1) each chunk's nnz per term, counted in parallel without writing a column (window
  // records, held row starts, or a constant per row); (2) a prefix sum over the chunks, serial
  // but per chunk, not per row; (3) each chunk writes its rows at its offsets, in parallel. The
  // chunks are fixed by the rows alone and every entry is written once, by its own chunk, so
  // the arrays are the serial construction's for any thread count.
  const std::size_t n = n_rows_, k = terms_.size();
  const std::size_t chunk_rows = balanced_chunk_rows(n, n_threads);  // any chunking: same arrays
  const std::size_t n_chunks = (n + chunk_rows - 1) / chunk_rows;
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(n_chunks)));
  row_starts_.assign(k, {});
  built_versions_.assign(k, 0);
  std::vector<bool> sparse(k, false);
  for (std::size_t t = 0; t < k; ++t) {
    built_versions_[t] = terms_[t]->pattern_version();
    sparse[t] = active_[t] && !terms_[t]->dense();
    if (!sparse[t]) continue;
    detail::resize_large(row_starts_[t], n + 1);
  }
  // offsets[c·(k + 1) + t]: term t's entries before chunk c; column k: the block's
  const std::size_t w = k + 1;
  std::vector<std::int64_t> offsets((n_chunks + 1) * w, 0);
  std::vector<std::string> failure(n_chunks);
  const auto run = [&](auto&& body) {  // parallel over the chunks, exceptions collected
    fit::detail::parallel_for(n_chunks, nt, [&](std::size_t c) {
      try {  // no exception may leave an OpenMP region
        body(c, c * chunk_rows, std::min(chunk_rows, n - c * chunk_rows));
      } catch (const std::exception& e) {
        failure[c] = e.what();
      }
    });
    for (const auto& f : failure)
      if (!f.empty()) throw std::invalid_argument(f);
  };
  run([&](std::size_t c, std::size_t first, std::size_t count) {
    std::int64_t* row = offsets.data() + (c + 1) * w;
    for (std::size_t t = 0; t < k; ++t) {
      if (!active_[t]) continue;
      row[t] = static_cast<std::int64_t>(terms_[t]->nnz_rows(first, count));
      row[k] += row[t];
    }
  });
  for (std::size_t c = 0; c < n_chunks; ++c)
    for (std::size_t j = 0; j < w; ++j) offsets[(c + 1) * w + j] += offsets[c * w + j];
  const auto nnz = static_cast<std::size_t>(offsets[n_chunks * w + k]);
  auto indptr = std::make_shared<std::vector<std::int64_t>>(detail::large_vector<std::int64_t>(n + 1));
  auto indices = std::make_shared<std::vector<std::int32_t>>(detail::large_vector<std::int32_t>(nnz));
  for (std::size_t t = 0; t < k; ++t)
    if (sparse[t]) row_starts_[t][0] = 0;
  (*indptr)[0] = 0;
  // per thread: the sparse terms' pattern of one chunk (row starts from 0, columns), reused
  struct ChunkPattern {
    std::vector<std::vector<std::int64_t>> indptr;
    std::vector<std::vector<std::int32_t>> indices;
  };
  std::vector<ChunkPattern> local(static_cast<std::size_t>(nt));
  for (auto& l : local) {
    l.indptr.resize(k);
    l.indices.resize(k);
  }
  run([&](std::size_t c, std::size_t first, std::size_t count) {
    ChunkPattern& l = local[static_cast<std::size_t>(fit::detail::thread_number())];
    const std::int64_t* before = offsets.data() + c * w;
    const std::int64_t* after = before + w;
    std::vector<const std::int64_t*> starts(k, nullptr);
    std::vector<const std::int32_t*> columns(k, nullptr);
    for (std::size_t t = 0; t < k; ++t) {
      if (!sparse[t]) continue;
      const std::int64_t chunk_nnz = after[t] - before[t];
      l.indptr[t].resize(count + 1);
      // the room pattern_rows() writes: this term's counted entries (its column count per
      // row at most, which would be far more for wide smoothers)
      l.indices[t].resize(static_cast<std::size_t>(chunk_nnz));
      terms_[t]->pattern_rows(first, count, l.indptr[t].data(), l.indices[t].data());
      require(l.indptr[t][count] == chunk_nnz, "a term's pattern_rows disagrees with nnz_rows");
      std::int64_t* global = row_starts_[t].data() + first;
      for (std::size_t i = 1; i <= count; ++i) global[i] = before[t] + l.indptr[t][i];
      starts[t] = l.indptr[t].data();
      columns[t] = l.indices[t].data();
    }
    pattern_of_rows(count, starts, columns, before[k], indptr->data() + first, indices->data());
  });
  out_.indptr = std::move(indptr);
  out_.indices = std::move(indices);
  out_.values = std::make_shared<std::vector<double>>(detail::large_vector<double>(nnz));
  built_ = true;
  ++version_;
}

void ModelBlock::build_pattern_whole() {
  const std::size_t n = n_rows_, k = terms_.size();
  row_starts_.assign(k, {});
  built_versions_.assign(k, 0);
  std::vector<std::vector<std::int32_t>> term_indices(k);
  for (std::size_t t = 0; t < k; ++t) {
    built_versions_[t] = terms_[t]->pattern_version();
    if (!active_[t] || terms_[t]->dense()) continue;
    detail::resize_large(row_starts_[t], n + 1);
    detail::resize_large(term_indices[t], terms_[t]->nnz());
    terms_[t]->pattern(row_starts_[t].data(), term_indices[t].data());
  }
  std::vector<const std::int64_t*> starts(k, nullptr);
  std::vector<const std::int32_t*> columns(k, nullptr);
  for (std::size_t t = 0; t < k; ++t) {
    if (row_starts_[t].empty()) continue;
    starts[t] = row_starts_[t].data();
    columns[t] = term_indices[t].data();
  }
  auto indptr = std::make_shared<std::vector<std::int64_t>>(detail::large_vector<std::int64_t>(n + 1));
  (*indptr)[0] = 0;
  pattern_of_rows(n, starts, columns, 0, indptr->data(), nullptr);
  const auto nnz = static_cast<std::size_t>((*indptr)[n]);
  auto indices = std::make_shared<std::vector<std::int32_t>>(detail::large_vector<std::int32_t>(nnz));
  pattern_of_rows(n, starts, columns, 0, indptr->data(), indices->data());
  out_.indptr = std::move(indptr);
  out_.indices = std::move(indices);
  out_.values = std::make_shared<std::vector<double>>(detail::large_vector<double>(nnz));
  built_ = true;
  ++version_;
}

void ModelBlock::pattern_of_rows(std::size_t count, const std::vector<const std::int64_t*>& starts,
                                 const std::vector<const std::int32_t*>& columns,
                                 std::int64_t origin, std::int64_t* indptr,
                                 std::int32_t* indices) const {
  const std::size_t k = terms_.size();
  std::int64_t at = origin;
  for (std::size_t i = 0; i < count; ++i) {
    for (std::size_t t = 0; t < k; ++t) {
      if (!active_[t]) continue;
      const auto offset = static_cast<std::int32_t>(col_start_[t]);
      if (terms_[t]->dense()) {
        const std::size_t c = terms_[t]->n_cols();
        if (indices != nullptr)
          for (std::size_t q = 0; q < c; ++q) indices[at + static_cast<std::int64_t>(q)] = offset + static_cast<std::int32_t>(q);
        at += static_cast<std::int64_t>(c);
      } else {
        const std::int64_t a = starts[t][i], b = starts[t][i + 1], base = starts[t][0];
        if (indices != nullptr)
          for (std::int64_t q = a; q < b; ++q) indices[at + (q - a)] = offset + columns[t][q - base];
        at += b - a;
      }
    }
    indptr[i + 1] = at;
  }
}

void ModelBlock::product_rule(const std::vector<TermValues>& tv, std::size_t count,
                              const std::vector<const std::int64_t*>& starts,
                              const std::int64_t* row_ptr, double* g, double* values) const {
  const std::size_t k = terms_.size();
  constexpr std::size_t kStack = 16;
  std::vector<double> heap(k > kStack ? k + 1 : 0);
  double prefix_stack[kStack + 1];
  double* prefix = k > kStack ? heap.data() : prefix_stack;
  for (std::size_t j = 0; j < count; ++j) {
    prefix[0] = 1.0;
    for (std::size_t t = 0; t < k; ++t) prefix[t + 1] = prefix[t] * tv[t].scales[j];
    g[j] = prefix[k];
    // Walk the terms backwards with a running suffix product: others = prefix·suffix, so a
    // zero scale is handled without dividing.
    double suffix = 1.0;
    std::int64_t end = row_ptr[j + 1];
    for (std::size_t t = k; t-- > 0;) {
      const double others = prefix[t] * suffix;
      suffix *= tv[t].scales[j];
      if (!active_[t]) continue;
      const ModelTerm& term = *terms_[t];
      if (term.dense()) {
        const std::size_t c = term.n_cols();
        const std::int64_t start = end - static_cast<std::int64_t>(c);
        if (tv[t].values_f32 != nullptr) {
          const float* row = tv[t].values_f32 + j * c;
          for (std::size_t q = 0; q < c; ++q) values[start + q] = static_cast<double>(row[q]) * others;
        } else {
          const double* row = tv[t].values + j * c;
          for (std::size_t q = 0; q < c; ++q) values[start + q] = row[q] * others;
        }
        end = start;
      } else {
        const std::int64_t a = starts[t][j], b = starts[t][j + 1];
        const std::int64_t start = end - (b - a);
        const double* v = tv[t].values - starts[t][0];
        for (std::int64_t q = a; q < b; ++q) values[start + (q - a)] = v[q] * others;
        end = start;
      }
    }
  }
}

void ModelBlock::fill(const std::vector<TermValues>& tv, std::size_t first, std::size_t count) {
  std::vector<const std::int64_t*> starts(terms_.size(), nullptr);
  for (std::size_t t = 0; t < terms_.size(); ++t)
    if (active_[t] && !terms_[t]->dense()) starts[t] = row_starts_[t].data() + first;
  product_rule(tv, count, starts, out_.indptr->data() + first, out_.scales->data() + first,
               out_.values->data());
}

void ModelBlock::check_params(const double* params, std::size_t n_params) const {
  require(n_params == n_params_, "params must hold " + std::to_string(n_params_) +
                                     " values (every term's parameters), got " +
                                     std::to_string(n_params));
  require_finite(params, n_params, "params");
}

void ModelBlock::start_chunks(const double* params, std::size_t n_params) {
  check_params(params, n_params);
  // one chunk's scratch per term and, last, the block's own chunk workspace, reused
  scratch_.resize(terms_.size() + 1);
  term_values_.clear();
}

void ModelBlock::evaluate_terms(const double* params, std::size_t n_params) {
  check_params(params, n_params);
  scratch_.resize(terms_.size());
  term_values_.resize(terms_.size());
  for (std::size_t t = 0; t < terms_.size(); ++t)
    term_values_[t] = terms_[t]->evaluate(params + param_start_[t], scratch_[t]);
}

void ModelBlock::free_scratch() {
  std::vector<TermScratch>().swap(scratch_);
  std::vector<std::vector<TermScratch>>().swap(thread_scratch_);
  term_values_.clear();
}

template <class Body>
void ModelBlock::for_each_chunk(const double* params, int n_threads, Body body, ChunkValues what,
                                const std::vector<std::size_t>* bounds, std::size_t chunk_rows) {
  if (chunk_rows == 0) chunk_rows = kChunkRows;
  const std::size_t n_chunks = bounds ? bounds->size() - 1 : (n_rows_ + chunk_rows - 1) / chunk_rows;
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(n_chunks)));
  const auto chunk = [&](std::size_t c, std::vector<TermScratch>& scratch) {
    const std::size_t first = bounds ? (*bounds)[c] : c * chunk_rows;
    const std::size_t count = bounds ? (*bounds)[c + 1] - first : std::min(chunk_rows, n_rows_ - first);
    std::vector<TermValues> tv(terms_.size());
    for (std::size_t t = 0; t < terms_.size(); ++t) {
      const double* p = params + param_start_[t];
      if (what == ChunkValues::scales)
        tv[t].scales = terms_[t]->scales_rows(p, first, count, scratch[t]);
      else if (what == ChunkValues::fused)
        tv[t] = terms_[t]->fused_rows(p, first, count, scratch[t]);
      else
        tv[t] = terms_[t]->evaluate_rows(p, first, count, scratch[t]);
    }
    body(c, first, count, tv, scratch);
  };
  if (nt == 1) {  // the block's own scratch, kept for the next call
    for (std::size_t c = 0; c < n_chunks; ++c) chunk(c, scratch_);
    return;
  }
  // per-thread scratch kept from call to call (as the block's own on one thread): fresh
  // chunk-sized buffers per call would be new pages for the kernel to clear every time
  auto& scratch = thread_scratch_;
  if (scratch.size() < static_cast<std::size_t>(nt)) scratch.resize(static_cast<std::size_t>(nt));
  for (auto& s : scratch) s.resize(terms_.size() + 1);
  std::vector<std::string> failure(n_chunks);
  fit::detail::parallel_for(n_chunks, nt, [&](std::size_t c) {
    try {  // no exception may leave an OpenMP region
      chunk(c, scratch[static_cast<std::size_t>(fit::detail::thread_number())]);
    } catch (const std::exception& e) {
      failure[c] = e.what();
    }
  });
  for (const auto& f : failure)
    if (!f.empty()) throw std::invalid_argument(f);
}

void ModelBlock::product_of_scales(const std::vector<TermValues>& tv, std::size_t count,
                                   double* g) const {
  if (terms_.size() == 3) {  // a physical model: one pass, the same products (1·s₀ = s₀)
    const double *__restrict s0 = tv[0].scales, *__restrict s1 = tv[1].scales,
                             *__restrict s2 = tv[2].scales;
    for (std::size_t i = 0; i < count; ++i) g[i] = (s0[i] * s1[i]) * s2[i];
    return;
  }
  std::fill(g, g + count, 1.0);
  for (std::size_t t = 0; t < terms_.size(); ++t)  // the same product order as fill()
    for (std::size_t i = 0; i < count; ++i) g[i] *= tv[t].scales[i];
}

void ModelBlock::evaluate(const double* params, std::size_t n_params, int n_threads) {
  const bool by_chunks = chunked();
  if (by_chunks) {  // the terms' values one chunk at a time, in reused scratch
    start_chunks(params, n_params);
  } else {
    evaluate_terms(params, n_params);
  }
  if (pattern_stale()) {
    build_pattern(n_threads);
  } else if (out_.values->size() != out_.indices->size()) {  // released: allocate again
    out_.values = std::make_shared<std::vector<double>>(detail::large_vector<double>(out_.indices->size()));
  }
  if (by_chunks) {
    for_each_chunk(params, n_threads, [&](std::size_t, std::size_t first, std::size_t count, const std::vector<TermValues>& tv, std::vector<TermScratch>&) {
      fill(tv, first, count);  // rows [first, first + count) only: chunks never share an entry
    }, ChunkValues::all, nullptr, balanced_chunk_rows(n_rows_, n_threads));
  } else {
    fill(term_values_, 0, n_rows_);
  }
  evaluated_ = true;
}

bool ModelBlock::chunked() const {
  for (const auto& t : terms_)
    if (!t->evaluates_rows()) return false;
  return true;
}

bool ModelBlock::evaluates_rows() const { return chunked(); }

namespace {

/// One term of a row range as ModelBlock::evaluate_rows's assembly reads it, copied out of
/// the terms and the scratch once per call (no per-row look-up through the term objects).
struct RowTerm {
  enum Kind : int { inactive, dense, dense_f32, runs, pattern };
  Kind kind = inactive;
  std::int32_t offset = 0;  ///< the block column of the term's column 0
  std::int32_t n_cols = 0;  ///< dense: columns of every row
  const double* scales = nullptr;
  const double* values = nullptr;  ///< dense: row-major; sparse: the rows' entries in order
  const float* values_f32 = nullptr;
  const std::int32_t* run_first = nullptr;   ///< runs: each row's first (term) column
  const std::int32_t* run_length = nullptr;  ///< runs: each row's number of columns
  const std::int64_t* starts = nullptr;      ///< pattern: row starts (from 0)
  const std::int32_t* columns = nullptr;     ///< pattern: the term's columns
};

/// Grown when needed, never shrunk (see RowsScratch).
template <class T>
T* room(std::vector<T>& v, std::size_t n) {
  if (v.size() < n) detail::resize_large(v, n);
  return v.data();
}

/// The multipliers of the product rule for @p count rows: g into @p g and, for each term t,
/// others_t = prefix_t·suffix_t (prefix_t = ((1·s₀)·s₁)·…·s_{t−1}, suffix_t the product of
/// the later terms' scales taken from the last term backwards from 1) into
/// @p others[t·count + j]; @p suffix room for count values. The operations of
/// product_rule() on each row, in its order (so the same bits), but term by term over all the
/// rows, which vectorises.
XS_MULTIVERSION void product_multipliers(const RowTerm* terms, std::size_t k, std::size_t count,
                                         double* __restrict g, double* __restrict others,
                                         double* __restrict suffix) {
  std::fill(g, g + count, 1.0);
  for (std::size_t t = 0; t < k; ++t) {
    const double* __restrict s = terms[t].scales;
    double* __restrict o = others + t * count;
    for (std::size_t j = 0; j < count; ++j) {
      o[j] = g[j];
      g[j] *= s[j];
    }
  }
  std::fill(suffix, suffix + count, 1.0);
  for (std::size_t t = k; t-- > 0;) {
    const double* __restrict s = terms[t].scales;
    double* __restrict o = others + t * count;
    for (std::size_t j = 0; j < count; ++j) {
      o[j] *= suffix[j];
      suffix[j] *= s[j];
    }
  }
}

/// @p n derivatives @p v times @p o into @p out, their columns @p c0, c0 + 1, … into @p col.
XS_ALWAYS_INLINE void scaled_entries(const double* __restrict v, double o, std::int32_t c0,
                                     std::int64_t n, std::int32_t* __restrict col,
                                     double* __restrict out) {
  for (std::int64_t q = 0; q < n; ++q) {
    col[q] = c0 + static_cast<std::int32_t>(q);
    out[q] = v[q] * o;
  }
}

/// The pattern and ∂g/∂p of @p count rows in one pass over the rows (row j's entries written
/// with their columns, term after term, as pattern_of_rows() and product_rule() write them),
/// each term's derivatives times its multiplier @p others[t·count + j] (product_multipliers()).
XS_MULTIVERSION void assemble_rows(const RowTerm* terms, std::size_t k, std::size_t count,
                                   const double* __restrict others, std::int64_t* positions,
                                   std::int64_t* __restrict indptr,
                                   std::int32_t* __restrict indices,
                                   double* __restrict values) {
  for (std::size_t t = 0; t < k; ++t) positions[t] = 0;
  std::int64_t at = 0;
  indptr[0] = 0;
  for (std::size_t j = 0; j < count; ++j) {
    for (std::size_t t = 0; t < k; ++t) {
      const RowTerm& r = terms[t];
      const double o = others[t * count + j];
      std::int32_t* col = indices + at;
      double* out = values + at;
      switch (r.kind) {
        case RowTerm::inactive:
          break;
        case RowTerm::dense:
          scaled_entries(r.values + j * static_cast<std::size_t>(r.n_cols), o, r.offset,
                         r.n_cols, col, out);
          at += r.n_cols;
          break;
        case RowTerm::dense_f32: {
          const float* row = r.values_f32 + j * static_cast<std::size_t>(r.n_cols);
          for (std::int32_t q = 0; q < r.n_cols; ++q) {
            col[q] = r.offset + q;
            out[q] = static_cast<double>(row[q]) * o;
          }
          at += r.n_cols;
          break;
        }
        case RowTerm::runs: {
          const std::int32_t n = r.run_length[j];
          scaled_entries(r.values + positions[t], o, r.offset + r.run_first[j], n, col, out);
          positions[t] += n;
          at += n;
          break;
        }
        case RowTerm::pattern: {
          const std::int64_t a = r.starts[j], n = r.starts[j + 1] - a;
          for (std::int64_t q = 0; q < n; ++q) {
            col[q] = r.offset + r.columns[a + q];
            out[q] = r.values[a + q] * o;
          }
          at += n;
          break;
        }
      }
    }
    indptr[j + 1] = at;
  }
}

}  // namespace

void ModelBlock::evaluate_rows(const double* params, std::size_t n_params, std::size_t first,
                               std::size_t count, RowsScratch& s) const {
  if (!chunked()) throw std::logic_error("a term of this block does not evaluate row ranges");
  check_params(params, n_params);
  require(first <= n_rows_ && count <= n_rows_ - first, "rows out of range");
  const std::size_t k = terms_.size();
  s.terms.resize(k);
  s.term_values.resize(k);
  s.term_indptr.resize(k);
  s.term_indices.resize(k);
  s.term_lengths.resize(k);
  // The rows' pattern is known before any value is formed: dense terms' from their column
  // count, a run term's from its rows' runs (window records: two values a row), other sparse
  // terms' from pattern_rows(). So nnz is counted without a pass over the block's rows, and
  // one pass writes the columns and the values together.
  constexpr std::size_t kStack = 16;
  RowTerm stack_terms[kStack];
  std::vector<RowTerm> heap_terms(k > kStack ? k : 0);
  RowTerm* rt = k > kStack ? heap_terms.data() : stack_terms;
  std::size_t nnz = 0;
  for (std::size_t t = 0; t < k; ++t) {
    const ModelTerm& term = *terms_[t];
    const TermValues v = term.evaluate_rows(params + param_start_[t], first, count, s.terms[t]);
    s.term_values[t] = v;
    RowTerm& r = rt[t];
    r = RowTerm{};
    r.scales = v.scales;
    if (!active_[t]) continue;
    r.offset = static_cast<std::int32_t>(col_start_[t]);
    r.values = v.values;
    if (term.dense()) {
      r.kind = v.values_f32 != nullptr ? RowTerm::dense_f32 : RowTerm::dense;
      r.n_cols = static_cast<std::int32_t>(term.n_cols());
      r.values_f32 = v.values_f32;
      nnz += count * term.n_cols();
      continue;
    }
    std::int32_t* run_first = room(s.term_indices[t], count);
    std::int32_t* run_length = room(s.term_lengths[t], count);
    const std::int64_t run_nnz = term.column_runs(first, count, run_first, run_length);
    if (run_nnz >= 0) {
      r.kind = RowTerm::runs;
      r.run_first = run_first;
      r.run_length = run_length;
      nnz += static_cast<std::size_t>(run_nnz);
      continue;
    }
    r.kind = RowTerm::pattern;
    std::int64_t* starts = room(s.term_indptr[t], count + 1);
    std::int32_t* columns = room(s.term_indices[t], count * std::max<std::size_t>(term.n_cols(), 1));
    term.pattern_rows(first, count, starts, columns);
    r.starts = starts;
    r.columns = columns;
    nnz += static_cast<std::size_t>(starts[count]);
  }
  s.indptr.resize(count + 1);
  s.g.resize(count);
  double* others = room(s.work, (k + 1) * count);  // k rows of multipliers, then the suffixes
  product_multipliers(rt, k, count, s.g.data(), others, others + k * count);
  std::int64_t positions_stack[kStack];
  std::vector<std::int64_t> heap_positions(k > kStack ? k : 0);
  std::int64_t* positions = k > kStack ? heap_positions.data() : positions_stack;
  assemble_rows(rt, k, count, others, positions, s.indptr.data(), room(s.indices, nnz),
                room(s.values, nnz));
}

void ModelBlock::scales_by_chunks(const double* params, int n_threads) {
  double* g = out_.scales->data();
  for_each_chunk(params, n_threads, [&](std::size_t, std::size_t first, std::size_t count, const std::vector<TermValues>& tv, std::vector<TermScratch>&) {
    product_of_scales(tv, count, g + first);
  }, ChunkValues::scales, nullptr, balanced_chunk_rows(n_rows_, n_threads));  // per-row g: any chunking
}

void ModelBlock::transpose_product_by_chunks(const double* params, const double* coefficients,
                                             double* out, int n_threads) {
  double* g = out_.scales->data();
  // each chunk's sums apart, then added in chunk order: the same bits for any thread count
  std::vector<double> partial(((n_rows_ + kChunkRows - 1) / kChunkRows) * n_cols_, 0.0);
  for_each_chunk(params, n_threads, [&](std::size_t c, std::size_t first, std::size_t count, const std::vector<TermValues>& tv, std::vector<TermScratch>& scratch) {
    rows_fused_transpose(tv, first, count, coefficients + first, g + first, false,
                         partial.data() + c * n_cols_, scratch);
  }, ChunkValues::fused);
  for (std::size_t c = 0; c * n_cols_ < partial.size(); ++c)
    for (std::size_t j = 0; j < n_cols_; ++j) out[j] += partial[c * n_cols_ + j];
}

void ModelBlock::evaluate_scales(const double* params, std::size_t n_params, int n_threads) {
  if (chunked()) {  // chunk scratch, reused: no per-row array is allocated
    start_chunks(params, n_params);
    scales_by_chunks(params, n_threads);
    evaluated_ = false;
    return;
  }
  evaluate_terms(params, n_params);
  product_of_scales(term_values_, n_rows_, out_.scales->data());
  evaluated_ = false;
  // the terms' scratch is not needed until the next evaluation: a caller evaluating many
  // blocks for g alone (a streamed trial step) holds none of it
  free_scratch();
}

void ModelBlock::transpose_product(const double* params, std::size_t n_params,
                                   const double* coefficients, double* out, int n_threads) {
  require_finite(coefficients, n_rows_, "coefficients");
  if (chunked()) {
    start_chunks(params, n_params);
    std::fill(out, out + n_cols_, 0.0);
    transpose_product_by_chunks(params, coefficients, out, n_threads);
    evaluated_ = false;
    return;
  }
  evaluate_terms(params, n_params);
  std::fill(out, out + n_cols_, 0.0);
  rows_transpose_product(term_values_, 0, n_rows_, true, coefficients, out_.scales->data(), out);
  evaluated_ = false;
  free_scratch();
}

void ModelBlock::rows_transpose_product(const std::vector<TermValues>& tv, std::size_t first,
                                        std::size_t count, bool whole, const double* coefficients,
                                        double* g, double* acc) const {
  const std::size_t k = terms_.size();
  product_of_scales(tv, count, g);
  std::vector<double> u(count);
  for (std::size_t t = 0; t < k; ++t) {
    if (!active_[t] || terms_[t]->n_cols() == 0) continue;
    // u = c · Π of the other terms' scales (no division: a zero scale is exact)
    std::copy(coefficients, coefficients + count, u.begin());
    for (std::size_t o = 0; o < k; ++o) {
      if (o == t) continue;
      for (std::size_t i = 0; i < count; ++i) u[i] *= tv[o].scales[i];
    }
    if (whole)
      terms_[t]->add_transpose_product(tv[t], u.data(), acc + col_start_[t]);
    else
      terms_[t]->add_transpose_product_rows(tv[t], first, count, u.data(), acc + col_start_[t]);
  }
}

void ModelBlock::rows_fused_transpose(const std::vector<TermValues>& tv, std::size_t first,
                                      std::size_t count, const double* coefficients, double* g,
                                      bool g_known, double* acc,
                                      std::vector<TermScratch>& scratch,
                                      const std::int64_t* c_rows, std::int64_t c_row_base) const {
  const std::size_t k = terms_.size();
  if (!g_known) product_of_scales(tv, count, g);
  if (c_rows != nullptr && k != 3) {  // the coefficients gathered once for the per-term passes
    double* gathered = sized(scratch[k].scales, count);
    for (std::size_t i = 0; i < count; ++i) gathered[i] = coefficients[c_rows[i] - c_row_base];
    coefficients = gathered;
    c_rows = nullptr;
  }
  // u_t = c · Π of the other terms' scales in ascending term order (no division: a zero
  // scale is exact), in the block's workspace (see start_chunks)
  if (k == 3) {  // a physical model: the three u in one pass over the rows, the same products
    double* u = sized(scratch[k].aux, 3 * count);
    if (c_rows != nullptr)
      others_products3_gathered(count, coefficients, c_rows, c_row_base, tv[0].scales,
                                tv[1].scales, tv[2].scales, u, u + count, u + 2 * count);
    else
      others_products3(count, coefficients, tv[0].scales, tv[1].scales, tv[2].scales, u,
                       u + count, u + 2 * count);
    for (std::size_t t = 0; t < k; ++t)
      if (active_[t] && terms_[t]->n_cols() > 0)
        terms_[t]->fused_transpose_rows(tv[t], first, count, u + t * count,
                                        acc + col_start_[t], scratch[t]);
    return;
  }
  double* u = sized(scratch[k].aux, count);
  for (std::size_t t = 0; t < k; ++t) {
    if (!active_[t] || terms_[t]->n_cols() == 0) continue;
    std::copy(coefficients, coefficients + count, u);
    for (std::size_t o = 0; o < k; ++o) {
      if (o == t) continue;
      const double* so = tv[o].scales;
      for (std::size_t i = 0; i < count; ++i) u[i] *= so[i];
    }
    terms_[t]->fused_transpose_rows(tv[t], first, count, u, acc + col_start_[t], scratch[t]);
  }
}

namespace detail {

/// Chunks of whole groups for ModelBlock::functional_and_gradient: row bounds (from 0 to
/// n_obs) and the matching group bounds. A chunk ends at the first group end at least
/// @p chunk_rows (0: kChunkRows) rows after its start, so a group longer than that is a chunk of its own. The
/// walk checks the offsets (from 0, non-decreasing, ending at n_obs) before any row is read
/// through them; check_grouped_observations names a fault.
std::pair<std::vector<std::size_t>, std::vector<std::size_t>> group_chunks(
    const fit::GroupedObservations& t, std::size_t chunk_rows) {
  if (chunk_rows == 0) chunk_rows = kChunkRows;
  std::vector<std::size_t> rows{0}, groups{0};
  const std::int64_t* off = t.group_offsets;
  bool ok = off != nullptr && off[0] == 0;
  for (std::size_t h = 0; ok && h < t.n_groups; ++h) {
    ok = off[h + 1] >= off[h];
    const auto end = static_cast<std::size_t>(off[h + 1]);
    if (end - rows.back() >= chunk_rows || h + 1 == t.n_groups) {
      rows.push_back(end);
      groups.push_back(h + 1);
    }
  }
  if (!ok || rows.back() != t.n_obs) {
    fit::check_grouped_observations(t);  // throws, naming the fault
    throw std::invalid_argument("group_offsets do not describe the observations");
  }
  return {rows, groups};
}

/// The target kernel's operations (residual_pass) on @p n_groups groups (@p off: their
/// offsets, rows counted from @p base): f returned, ∂f/∂g into @p dfdg (and each row's Ĩ into
/// @p ih_rows, when given: the Ĩ formed here, not a second pass of sums); each group's f summed
/// apart, then added (no chain of dependent adds over all rows). Not vectorised: a group holds
/// a few rows, and a vectorised loop's set-up (an odd row, a group of one, an overlap check)
/// adds branches that follow the group lengths, mispredicted about once a group. The
/// operations are the same either way (no fused multiply-add in this file's plain build).
__attribute__((optimize("no-tree-vectorize"))) double groups_target(
    const std::int64_t* off, std::size_t n_groups, std::int64_t base, const double* __restrict w,
    const double* __restrict inten, const double* __restrict g, double* __restrict dfdg,
    double* __restrict ih_rows) {
  double f = 0.0;
  for (std::size_t h = 0; h < n_groups; ++h) {
    const auto a = static_cast<std::size_t>(off[h] - base);
    const auto b = static_cast<std::size_t>(off[h + 1] - base);
    double wgg = 0.0, wgi = 0.0;
    for (std::size_t l = a; l < b; ++l) {  // fit::detail::group_sums's order
      const double wg = w[l] * g[l];
      wgg += wg * g[l];
      wgi += wg * inten[l];
    }
    const double ih = wgg > 0.0 ? wgi / wgg : 0.0;
    double fh = 0.0;
    for (std::size_t l = a; l < b; ++l) {
      const double r = inten[l] - g[l] * ih;
      const double wr = w[l] * r;
      fh += wr * r;
      dfdg[l] = -2.0 * wr * ih;
    }
    if (ih_rows != nullptr) std::fill(ih_rows + a, ih_rows + b, ih);
    f += fh;
  }
  return f;
}

}  // namespace detail

double ModelBlock::chunk_functional_and_gradient(const std::vector<TermValues>& tv,
                                                 std::size_t first, std::size_t count,
                                                 const fit::GroupedObservations& t,
                                                 std::size_t group_first, std::size_t group_last,
                                                 double* acc, std::vector<TermScratch>& scratch,
                                                 bool& table_ok) const {
  // g in the workspace, which stays in cache, and copied out at the end by stores that do not
  // first read the block's buffer from memory (the copy is its only use in this call)
  TermScratch& ws = scratch[terms_.size()];
  double* g = sized(ws.scales, count);
  const double* inten = t.intensities + first;
  const double* w = t.weights + first;
  bool g_ok;
  if (terms_.size() == 3) {  // a physical model: g and every check of the chunk in one pass
    g_ok = product3_checked(count, tv[0].scales, tv[1].scales, tv[2].scales, w, inten, g,
                            table_ok);
  } else {
    product_of_scales(tv, count, g);
    g_ok = all_positive_finite(g, count);
    // the table's check, on rows now in cache (the binding no longer reads them beforehand)
    if (!all_non_negative_finite(w, count) || !all_finite(inten, count)) table_ok = false;
  }
  if (!g_ok)
    throw std::invalid_argument("a scale g is not finite and > 0 (rows " + std::to_string(first) +
                                " to " + std::to_string(first + count - 1) + ")");
  // The target kernel's operations (residual_pass) on these groups, ∂f/∂g kept for the chunk;
  // each group's f summed apart, then added (no chain of dependent adds over all rows).
  double* dfdg = sized(ws.values, count);
  const double f = detail::groups_target(t.group_offsets + group_first, group_last - group_first,
                                 static_cast<std::int64_t>(first), w, inten, g, dfdg);
  rows_fused_transpose(tv, first, count, dfdg, g, true, acc, scratch);
  detail::copy_streaming(g, count, out_.scales->data() + first);
  return f;
}

double ModelBlock::functional_and_gradient(const double* params, std::size_t n_params,
                                           const fit::GroupedObservations& table,
                                           double* gradient, int n_threads) {
  if (!chunked()) throw std::logic_error("a term of this block does not evaluate row ranges");
  require(table.n_obs == n_rows_, "the table must have one row per block row (" +
                                      std::to_string(n_rows_) + "), got " +
                                      std::to_string(table.n_obs));
  start_chunks(params, n_params);
  evaluated_ = false;
  std::fill(gradient, gradient + n_cols_, 0.0);
  if (n_rows_ == 0) {
    fit::check_grouped_observations(table);
    return 0.0;
  }
  const auto [rows, groups] = detail::group_chunks(table);  // checks the offsets
  const std::size_t n_chunks = rows.size() - 1;
  std::vector<double> partial(n_chunks * n_cols_, 0.0), f_chunk(n_chunks, 0.0);
  std::vector<char> table_ok(n_chunks, 1);
  try {
    for_each_chunk(params, n_threads, [&](std::size_t c, std::size_t first, std::size_t count, const std::vector<TermValues>& tv, std::vector<TermScratch>& scratch) {
      bool ok = true;
      f_chunk[c] = chunk_functional_and_gradient(tv, first, count, table, groups[c], groups[c + 1],
                                                 partial.data() + c * n_cols_, scratch, ok);
      table_ok[c] = ok ? 1 : 0;
    }, ChunkValues::fused, &rows);
  } catch (const std::invalid_argument&) {
    fit::check_grouped_observations(table);  // a fault of the table is named first
    throw;
  }
  for (const char ok : table_ok)
    if (!ok) fit::check_grouped_observations(table);  // throws, naming the row
  double f = 0.0;  // in chunk order: the same bits for any thread count
  for (std::size_t c = 0; c < n_chunks; ++c) {
    f += f_chunk[c];
    for (std::size_t j = 0; j < n_cols_; ++j) gradient[j] += partial[c * n_cols_ + j];
  }
  return f;
}

void ModelBlock::fused_scales_rows(const double* params, std::size_t n_params, std::size_t first,
                                   std::size_t count, FusedRowsScratch& s, double* g,
                                   const std::int64_t* g_rows, std::int64_t g_row_base) const {
  if (!chunked()) throw std::logic_error("a term of this block does not evaluate row ranges");
  check_params(params, n_params);
  require(first <= n_rows_ && count <= n_rows_ - first, "rows out of range");
  const std::size_t k = terms_.size();
  s.terms.resize(k + 1);  // the terms', then rows_fused_transpose's workspace
  s.values.resize(k);
  s.first = first;
  s.count = 0;  // nothing valid until every term has its values
  for (std::size_t t = 0; t < k; ++t)  // for_each_chunk's ChunkValues::fused
    s.values[t] = terms_[t]->fused_rows(params + param_start_[t], first, count, s.terms[t]);
  s.count = count;
  if (g_rows == nullptr) {
    product_of_scales(s.values, count, g);
  } else if (k == 3) {
    product3_scattered(count, s.values[0].scales, s.values[1].scales, s.values[2].scales, g_rows,
                       g_row_base, g);
  } else {  // formed in the block's workspace, then scattered
    double* own = sized(s.terms[k].scales, count);
    product_of_scales(s.values, count, own);
    for (std::size_t i = 0; i < count; ++i) g[g_rows[i] - g_row_base] = own[i];
  }
}

void ModelBlock::fused_transpose_rows(const double* coefficients, FusedRowsScratch& s,
                                      double* acc, const std::int64_t* c_rows,
                                      std::int64_t c_row_base) const {
  if (s.values.size() != terms_.size() || s.terms.size() != terms_.size() + 1)
    throw std::logic_error("fused_transpose_rows: the scratch holds no rows of this block");
  if (s.count == 0) return;
  // g is not read when known (g_known): the terms' scales are in s.values
  rows_fused_transpose(s.values, s.first, s.count, coefficients, nullptr, true, acc, s.terms,
                       c_rows, c_row_base);
}

void ModelBlock::release_values(bool pattern) {
  out_.values = std::make_shared<std::vector<double>>();
  free_scratch();
  evaluated_ = false;
  if (pattern) {
    out_.indptr = std::make_shared<std::vector<std::int64_t>>(n_rows_ + 1, 0);
    out_.indices = std::make_shared<std::vector<std::int32_t>>();
    std::vector<std::vector<std::int64_t>>().swap(row_starts_);
    built_ = false;
  }
}

DerivativesView ModelBlock::view() const {
  DerivativesView v;
  v.n_rows = n_rows_;
  v.n_cols = n_cols_;
  v.column_offset = column_offset_;
  v.version = version_;
  if (!evaluated_) return v;
  v.scales = out_.scales->data();
  v.indptr = out_.indptr->data();
  v.indices = out_.indices->data();
  v.values = out_.values->data();
  return v;
}

std::size_t ModelBlock::nbytes() const noexcept {
  std::size_t b = out_.scales->size() * 8 + out_.indptr->size() * 8 + out_.indices->size() * 4 +
                  out_.values->size() * 8;
  for (const auto& r : row_starts_) b += r.size() * 8;
  for (const auto& s : scratch_) b += (s.scales.size() + s.values.size()) * 8;
  for (const auto& thread : thread_scratch_)
    for (const auto& s : thread) b += (s.scales.size() + s.values.size()) * 8;
  return b;
}

namespace {

/// Throws unless @p blocks are distinct and non-null and the lists have one entry per block
/// (two threads must never evaluate one block at once).
void check_block_list(const std::vector<ModelBlock*>& blocks, std::size_t n_params_lists,
                      std::size_t n_counts) {
  if (n_params_lists != blocks.size() || n_counts != blocks.size())
    throw std::invalid_argument("one parameter vector per block is needed");
  std::vector<const ModelBlock*> sorted(blocks.begin(), blocks.end());
  std::sort(sorted.begin(), sorted.end());
  if (!sorted.empty() && sorted.front() == nullptr)
    throw std::invalid_argument("a block is null");
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    throw std::invalid_argument("a block appears twice (blocks are evaluated concurrently)");
}

}  // namespace

bool evaluate_scales_of_blocks(const std::vector<ModelBlock*>& blocks,
                               const std::vector<const double*>& params,
                               const std::vector<std::size_t>& n_params, double* out,
                               bool stop_at_bad, int n_threads) {
  check_block_list(blocks, params.size(), n_params.size());
  const std::size_t n = blocks.size();
  std::vector<std::size_t> first(n + 1, 0);
  for (std::size_t k = 0; k < n; ++k) first[k + 1] = first[k] + blocks[k]->n_rows();
  std::vector<char> bad(n, 0);
  std::atomic<bool> stop{false};
  fit::detail::parallel_for_rethrowing(n, n_threads, [&](std::size_t k) {
    if (stop.load(std::memory_order_relaxed)) return;
    blocks[k]->evaluate_scales(params[k], n_params[k], 1);
    const double* g = blocks[k]->buffers().scales->data();
    const std::size_t rows = blocks[k]->n_rows();
    double* o = out + first[k];
    bool usable = true;
    for (std::size_t i = 0; i < rows; ++i) {
      o[i] = g[i];
      // NaN fails both comparisons
      usable = usable && g[i] > 0.0 && g[i] < std::numeric_limits<double>::infinity();
    }
    if (!usable) {
      bad[k] = 1;
      if (stop_at_bad) stop.store(true, std::memory_order_relaxed);
    }
  });
  // a skipped block is only ever skipped after some block was found bad: the answer does not
  // depend on which blocks ran
  return std::find(bad.begin(), bad.end(), 1) == bad.end();
}

void evaluate_blocks(const std::vector<ModelBlock*>& blocks,
                     const std::vector<const double*>& params,
                     const std::vector<std::size_t>& n_params, int n_threads) {
  check_block_list(blocks, params.size(), n_params.size());
  fit::detail::parallel_for_rethrowing(blocks.size(), n_threads, [&](std::size_t k) {
    blocks[k]->evaluate(params[k], n_params[k], 1);
  });
}

void transpose_product_of_blocks(const std::vector<ModelBlock*>& blocks,
                                 const std::vector<const double*>& params,
                                 const std::vector<std::size_t>& n_params,
                                 const double* coefficients, double* out, int n_threads) {
  check_block_list(blocks, params.size(), n_params.size());
  const std::size_t n = blocks.size();
  std::vector<std::size_t> row(n + 1, 0), col(n + 1, 0);
  for (std::size_t k = 0; k < n; ++k) {
    row[k + 1] = row[k] + blocks[k]->n_rows();
    col[k + 1] = col[k] + blocks[k]->n_cols();
  }
  fit::detail::parallel_for_rethrowing(n, n_threads, [&](std::size_t k) {
    blocks[k]->transpose_product(params[k], n_params[k], coefficients + row[k], out + col[k], 1);
  });
}

}  // namespace xtalscale
