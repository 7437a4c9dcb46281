// Gaussian smoothers (DIALS GaussianSmoother{,2D,3D} and GaussianSmootherFirstFixed semantics).
#include "xtalscale/smoother.hpp"

#include <algorithm>
#include <memory>
#include <string>

namespace xtalscale {

namespace {

const char* const kAxisNames[3] = {"x", "y", "z"};
const char* const kRangeNames[3] = {"x_range", "y_range", "z_range"};

[[noreturn]] void fail_non_finite(const char* name, std::size_t index, double v) {
  throw std::invalid_argument(std::string(name) + " must be finite (element " +
                              std::to_string(index) + " is " + std::to_string(v) + ")");
}

}  // namespace

// ------------------------------------------------------------------------------- SmootherAxis

SmootherAxis::SmootherAxis(double x0, double x1, std::size_t num_intervals, const char* name)
    : x0_(x0), spacing_(0.0), nsample_(num_intervals), nvalues_(0) {
  const std::string n(name);
  require(num_intervals > 0, "num_intervals for " + n + " must be > 0 (got 0)");
  require(std::isfinite(x0) && std::isfinite(x1),
          n + " must be finite (got [" + std::to_string(x0) + ", " + std::to_string(x1) + "])");
  require(x1 > x0, n + " must be increasing and non-empty (got [" + std::to_string(x0) + ", " +
                       std::to_string(x1) + "])");
  nvalues_ = num_intervals == 1 ? 2 : (num_intervals == 2 ? 3 : num_intervals + 2);
  spacing_ = (x1 - x0) / static_cast<double>(num_intervals);
  require(spacing_ > 0.0 && std::isfinite(spacing_),
          n + ": spacing (x1 - x0)/num_intervals must be positive and finite");
  positions_.resize(nvalues_);
  // Fewer than 4 values sit on integer positions; otherwise the first value is at -0.5.
  const double offset = nvalues_ < 4 ? 0.0 : -0.5;
  for (std::size_t i = 0; i < nvalues_; ++i) positions_[i] = static_cast<double>(i) + offset;
  set_average(3);
}

void SmootherAxis::set_average(std::size_t num_average) {
  const std::size_t nav = std::min(num_average, nvalues_);
  require(nav >= 1 && nav <= 5, "num_average must be between 1 and 5 (got " +
                                    std::to_string(num_average) + ")");
  naverage_ = nav;
  half_ = static_cast<double>(nav) / 2.0;  // a real half: 1.5 for naverage 3
}

// --------------------------------------------------------------------------- GaussianSmoother

namespace {
template <int D>
std::array<SmootherAxis, D> make_axes(const std::array<std::array<double, 2>, D>& ranges,
                                      const std::array<std::size_t, D>& num_intervals) {
  if constexpr (D == 1) {
    return {SmootherAxis(ranges[0][0], ranges[0][1], num_intervals[0], kRangeNames[0])};
  } else if constexpr (D == 2) {
    return {SmootherAxis(ranges[0][0], ranges[0][1], num_intervals[0], kRangeNames[0]),
            SmootherAxis(ranges[1][0], ranges[1][1], num_intervals[1], kRangeNames[1])};
  } else {
    return {SmootherAxis(ranges[0][0], ranges[0][1], num_intervals[0], kRangeNames[0]),
            SmootherAxis(ranges[1][0], ranges[1][1], num_intervals[1], kRangeNames[1]),
            SmootherAxis(ranges[2][0], ranges[2][1], num_intervals[2], kRangeNames[2])};
  }
}
}  // namespace

template <int D>
GaussianSmoother<D>::GaussianSmoother(const std::array<std::array<double, 2>, D>& ranges,
                                      const std::array<std::size_t, D>& num_intervals)
    : axes_(make_axes<D>(ranges, num_intervals)) {
  ntotal_ = 1;
  for (const auto& ax : axes_) ntotal_ *= ax.num_values();
  set_smoothing(3, -1.0);
}

template <int D>
void GaussianSmoother<D>::set_smoothing(std::size_t num_average, double sigma) {
  require(std::isfinite(sigma), "sigma must be finite (got " + std::to_string(sigma) + ")");
  require(sigma != 0.0, "sigma cannot be zero");
  // Validate every axis before changing any, so a failed call leaves the smoother unchanged.
  std::size_t min_nav = 5;
  for (const auto& ax : axes_) {
    const std::size_t nav = std::min(num_average, ax.num_values());
    require(nav >= 1 && nav <= 5, "num_average must be between 1 and 5 (got " +
                                      std::to_string(num_average) + ")");
    min_nav = std::min(min_nav, nav);
  }
  for (auto& ax : axes_) ax.set_average(num_average);
  kernel_.set(sigma < 0.0 ? 0.65 + 0.05 * (static_cast<double>(min_nav) - 2.0) : sigma);
}

template <int D>
std::size_t GaussianSmoother<D>::max_row_nnz() const noexcept {
  std::size_t n = 1;
  for (const auto& ax : axes_) n *= static_cast<std::size_t>(ax.max_window());
  return n;
}

template <int D>
void GaussianSmoother<D>::check_values(const double* values, std::size_t n_values,
                                       const char* name) const {
  if (n_values != ntotal_)
    throw std::invalid_argument(std::string(name) + " must have length " +
                                std::to_string(ntotal_) + " (the number of smoother values), got " +
                                std::to_string(n_values));
  require(values != nullptr || n_values == 0, std::string(name) + " is null");
  require_finite(values, n_values, name);
}

namespace {

/// Evaluate the per-axis windows of one point; returns false if a coordinate is not finite.
template <int D>
inline bool eval_axes(const std::array<SmootherAxis, D>& axes, const double* coord,
                      const GaussianKernel& g, std::array<AxisWindow, D>& win) {
  for (int a = 0; a < D; ++a) {
    if (!std::isfinite(coord[a])) return false;
    axes[a].eval_fast(axes[a].normalise(coord[a]), g, win[a]);
  }
  return true;
}

/// Visit the tensor-product window in ascending column order: f(column, weight).
template <int D, typename F>
inline void for_each_weight(const std::array<SmootherAxis, D>& axes,
                            const std::array<AxisWindow, D>& win, F&& f) {
  if constexpr (D == 1) {
    for (int i = 0; i < win[0].count; ++i) f(std::int64_t(win[0].first + i), win[0].w[i]);
  } else if constexpr (D == 2) {
    const auto nx = static_cast<std::int64_t>(axes[0].num_values());
    for (int j = 0; j < win[1].count; ++j) {
      const std::int64_t row = (win[1].first + j) * nx + win[0].first;
      const double wy = win[1].w[j];
      for (int i = 0; i < win[0].count; ++i) f(row + i, win[0].w[i] * wy);
    }
  } else {
    const auto nx = static_cast<std::int64_t>(axes[0].num_values());
    const auto nxy = nx * static_cast<std::int64_t>(axes[1].num_values());
    for (int k = 0; k < win[2].count; ++k) {
      const double wz = win[2].w[k];
      const std::int64_t plane = (win[2].first + k) * nxy + win[0].first;
      for (int j = 0; j < win[1].count; ++j) {
        const std::int64_t row = plane + (win[1].first + j) * nx;
        const double wyz = win[1].w[j] * wz;
        for (int i = 0; i < win[0].count; ++i) f(row + i, win[0].w[i] * wyz);
      }
    }
  }
}

}  // namespace

template <int D>
SinglePoint GaussianSmoother<D>::value_weight(const std::array<double, D>& coord,
                                              const double* values, std::size_t n_values,
                                              bool first_fixed) const {
  require(!first_fixed || D == 1, "first_fixed is only defined for the 1D smoother");
  check_values(values, n_values, "values");
  std::array<AxisWindow, D> win;
  for (int a = 0; a < D; ++a)
    if (!std::isfinite(coord[a])) fail_non_finite(kAxisNames[a], 0, coord[a]);
  eval_axes<D>(axes_, coord.data(), kernel_, win);
  SinglePoint out;
  double sumwv = 0.0;
  // Intended first-fixed behaviour: w_j goes to column j-1 for j >= 1 and w_0 is dropped from
  // the row (it still counts in value and sumweight). DIALS's single-point version also writes
  // w_j at column j, leaving a stray (possibly out-of-bounds) entry; we do not reproduce that.
  for_each_weight<D>(axes_, win, [&](std::int64_t col, double w) {
    sumwv += w * values[col];
    out.sumweight += w;
    if (first_fixed) {
      if (col == 0) return;
      --col;
    }
    out.index.push_back(col);
    out.weight.push_back(w);
  });
  out.value = out.sumweight > 0.0 ? sumwv / out.sumweight : 0.0;
  return out;
}

// ------------------------------------------------------------------------- bulk evaluation
//
// Points are processed in chunks. Per axis, a first pass computes the window and the two
// exponent arguments of the product form (GaussianKernel) for every point of the chunk, and a
// second pass evaluates all exponentials; both loops are branch-free so the compiler vectorises
// them. On x86-64 Linux with GCC they are also compiled for AVX2+FMA and picked at run time;
// FMA may change the last bit of a weight relative to the baseline build (both are within a few
// ulp of exp(-((z - pos)/sigma)^2)). A final scalar pass assembles rows and the CSR output.

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define XS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define XS_MULTIVERSION
#endif
// GCC will not if-convert FP comparisons under -ftrapping-math (the default), which blocks
// vectorising the window pass. We never inspect FP exception flags, and values are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#define XS_NO_TRAPPING __attribute__((optimize("no-trapping-math")))
#else
#define XS_NO_TRAPPING
#endif

namespace {

constexpr int kChunk = 256;

/// Per-axis constants for the vectorised window pass.
struct AxisParams {
  double x0, spacing, half, offset, a;
  std::int32_t nvalues, naverage;
};

/// One axis of one chunk: windows, exponentials of the product form, and a fast-path flag.
/// Window bounds are kept as doubles so the preparation loop is all-double and vectorises.
struct AxisChunk {
  alignas(64) double e[kChunk];      // exp(-a d^2)
  alignas(64) double q[kChunk];      // exp(2 a d)
  alignas(64) double first[kChunk];  // window start (an integer value)
  alignas(64) double count[kChunk];  // window size (an integer value)
  alignas(64) double slow[kChunk];   // 1: outside the product form's safe range
};

/// Product-form exponent arguments of distance @p d, or 0 with slow = 1 where unsafe.
/// Safe means every factor stays a normal number: e^-ad² >= e^-600 and e^(2ad·k) <= e^600.
XS_NO_TRAPPING inline void product_args(double d, double a, AxisChunk& c, int i) {
  const double ad2 = a * d * d;
  const double two_ad = 2.0 * a * d;
  // Bitwise | (not ||) keeps the loop free of branches; inputs are finite (checked earlier).
  const bool bad = (ad2 > 600.0) | (two_ad > 150.0) | (two_ad < -150.0);
  c.slow[i] = bad ? 1.0 : 0.0;
  c.e[i] = bad ? 0.0 : -ad2;
  c.q[i] = bad ? 0.0 : two_ad;
}

/// In-place exp of the chunk's product-form arguments (kept apart from the no-trapping-math
/// functions: GCC does not inline across differing optimisation attributes).
XS_MULTIVERSION
void exp_chunk(AxisChunk& c, int m) {
  for (int i = 0; i < m; ++i) c.e[i] = exp_bounded(c.e[i]);
  for (int i = 0; i < m; ++i) c.q[i] = exp_bounded(c.q[i]);
}

/// Windows and exponent arguments of @p m points (m <= kChunk) on an axis with > 3 values.
XS_MULTIVERSION XS_NO_TRAPPING
void prepare_axis(const double* __restrict x, int m, const AxisParams& p, AxisChunk& c) {
  constexpr double lim = 1073741824.0;  // |z| clamp: beyond it the window is pinned anyway
  const double nv = p.nvalues;
  const double nav = p.naverage;
  for (int i = 0; i < m; ++i) {
    const double z = (x[i] - p.x0) / p.spacing;
    double zc = z < -lim ? -lim : z;
    zc = zc > lim ? lim : zc;
    // iround(zc - half): round half away from zero, written branch-free in doubles.
    const double v = zc - p.half;
    const double t = std::trunc(v);
    const double frac = v - t;
    double i1 = t + (frac >= 0.5 ? 1.0 : 0.0) - (frac <= -0.5 ? 1.0 : 0.0) + 1.0;
    double i2 = i1 + nav;
    const bool low = i1 < 0.0;
    i1 = low ? 0.0 : i1;
    i2 = (low & (i2 < 2.0)) ? 2.0 : i2;
    const bool high = i2 > nv;
    i2 = high ? nv : i2;
    i1 = (high & (i1 > nv - 2.0)) ? nv - 2.0 : i1;
    c.first[i] = i1;
    c.count[i] = i2 - i1;
    product_args(z - (i1 + p.offset), p.a, c, i);
  }
}

/// Same for an axis of at most 3 values: the window is always all of them.
XS_MULTIVERSION XS_NO_TRAPPING
void prepare_small_axis(const double* __restrict x, int m, const AxisParams& p, AxisChunk& c) {
  for (int i = 0; i < m; ++i) {
    c.first[i] = 0.0;
    c.count[i] = p.nvalues;
    product_args((x[i] - p.x0) / p.spacing, p.a, c, i);  // positions start at 0
  }
}

/// Evaluates chunks of points and hands each point's per-axis windows to a callback.
template <int D>
class ChunkEvaluator {
 public:
  ChunkEvaluator(const std::array<SmootherAxis, D>& axes, const GaussianKernel& g)
      : axes_(axes), g_(g) {
    for (int a = 0; a < D; ++a) {
      const auto& ax = axes[a];
      params_[a] = {ax.x0(), ax.spacing(), static_cast<double>(ax.num_average()) / 2.0,
                    ax.positions()[0], g.a, static_cast<std::int32_t>(ax.num_values()),
                    static_cast<std::int32_t>(ax.num_average())};
    }
  }

  /// Call f(p, win) for every point p in [0, n); throws for a non-finite coordinate.
  template <typename F>
  void run(std::size_t n, const std::array<const double*, D>& coords, F&& f) {
    std::array<AxisWindow, D> win;
    for (std::size_t base = 0; base < n; base += kChunk) {
      const int m = static_cast<int>(std::min<std::size_t>(kChunk, n - base));
      for (int a = 0; a < D; ++a) {
        const double* x = coords[a] + base;
        for (int i = 0; i < m; ++i)
          if (!std::isfinite(x[i])) fail_non_finite(kAxisNames[a], base + i, x[i]);
        if (params_[a].nvalues <= 3) prepare_small_axis(x, m, params_[a], chunk_[a]);
        else prepare_axis(x, m, params_[a], chunk_[a]);
        exp_chunk(chunk_[a], m);
      }
      for (int i = 0; i < m; ++i) {
        for (int a = 0; a < D; ++a) expand(a, coords[a][base + i], i, win[a]);
        f(base + i, win);
      }
    }
  }

 private:
  void expand(int a, double x, int i, AxisWindow& w) const {
    const AxisChunk& c = chunk_[a];
    if (c.slow[i] != 0.0) {  // far outside the range: direct exponentials (rare)
      axes_[a].eval(axes_[a].normalise(x), g_.sigma, w);
      return;
    }
    w.first = static_cast<int>(c.first[i]);
    w.count = static_cast<int>(c.count[i]);
    const double q = c.q[i];
    double t = c.e[i];
    for (int k = 0; k < w.count; ++k) {
      w.w[k] = t * g_.c[k];
      t *= q;
    }
  }

  const std::array<SmootherAxis, D>& axes_;
  const GaussianKernel& g_;
  std::array<AxisParams, D> params_;
  std::array<AxisChunk, D> chunk_;
};

}  // namespace

template <int D>
template <typename Index>
std::size_t GaussianSmoother<D>::multi_value_weight(
    std::size_t n, const std::array<const double*, D>& coords, const double* values,
    std::size_t n_values, double* value_out, double* sumweight_out, Index* indptr, Index* indices,
    double* data, WeightMode mode, bool first_fixed) const {
  require(!first_fixed || D == 1, "first_fixed is only defined for the 1D smoother");
  check_values(values, n_values, "values");
  const bool want_matrix = data != nullptr;
  require(!want_matrix || (indptr != nullptr && indices != nullptr),
          "indptr and indices must be given with data");
  const bool normalised = mode == WeightMode::normalised;
  const std::int64_t shift = first_fixed ? 1 : 0;
  std::size_t nnz = 0;
  if (want_matrix) indptr[0] = 0;
  auto evaluator = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_);  // ~10 kB: keep off the stack
  evaluator->run(n, coords, [&](std::size_t p, const std::array<AxisWindow, D>& win) {
    double sumw = 0.0, sumwv = 0.0;
    const std::size_t row_start = nnz;
    for_each_weight<D>(axes_, win, [&](std::int64_t col, double w) {
      sumw += w;
      sumwv += w * values[col];
      if (!want_matrix || col < shift) return;  // first-fixed drops column 0
      indices[nnz] = static_cast<Index>(col - shift);
      data[nnz] = w;
      ++nnz;
    });
    if (want_matrix) {
      if (normalised) {
        // Σw underflows only far outside the range; the derivative is then 0, not NaN.
        const double inv = sumw > 0.0 ? 1.0 / sumw : 0.0;
        for (std::size_t k = row_start; k < nnz; ++k) data[k] *= inv;
      }
      indptr[p + 1] = static_cast<Index>(nnz);
    }
    if (value_out) value_out[p] = sumw > 0.0 ? sumwv / sumw : 0.0;
    if (sumweight_out) sumweight_out[p] = sumw;
  });
  return nnz;
}

template <int D>
void GaussianSmoother<D>::value_error(std::size_t n, const std::array<const double*, D>& coords,
                                      const double* values, const double* esds,
                                      std::size_t n_values, double* value_out,
                                      double* error_out) const {
  check_values(values, n_values, "values");
  if (esds) check_values(esds, n_values, "esds");
  auto evaluator = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_);
  evaluator->run(n, coords, [&](std::size_t p, const std::array<AxisWindow, D>& win) {
    double sumw = 0.0, sumwv = 0.0, sumw2s2 = 0.0;
    for_each_weight<D>(axes_, win, [&](std::int64_t col, double w) {
      sumw += w;
      sumwv += w * values[col];
      if (esds) sumw2s2 += w * w * esds[col] * esds[col];
    });
    const bool ok = sumw > 0.0;
    if (value_out) value_out[p] = ok ? sumwv / sumw : 0.0;
    // σ_v² = Σ (w_i/Σw)² σ_i² = (Σ w_i² σ_i²)/(Σw)²
    if (error_out) error_out[p] = ok ? std::sqrt(sumw2s2) / sumw : 0.0;
  });
}

std::size_t nparam_to_val(std::size_t n_params) {
  require(n_params >= 2, "n_params must be >= 2 (got " + std::to_string(n_params) + ")");
  return n_params <= 3 ? n_params - 1 : n_params - 2;
}

template class GaussianSmoother<1>;
template class GaussianSmoother<2>;
template class GaussianSmoother<3>;

#define XS_INSTANTIATE_MVW(D, I)                                                          \
  template XTALSCALE_EXPORT std::size_t GaussianSmoother<D>::multi_value_weight<I>(     \
      std::size_t, const std::array<const double*, D>&, const double*, std::size_t,       \
      double*, double*, I*, I*, double*, WeightMode, bool) const;
XS_INSTANTIATE_MVW(1, std::int32_t)
XS_INSTANTIATE_MVW(1, std::int64_t)
XS_INSTANTIATE_MVW(2, std::int32_t)
XS_INSTANTIATE_MVW(2, std::int64_t)
XS_INSTANTIATE_MVW(3, std::int32_t)
XS_INSTANTIATE_MVW(3, std::int64_t)
#undef XS_INSTANTIATE_MVW

}  // namespace xtalscale
