// Gaussian smoothers (DIALS GaussianSmoother{,2D,3D} and GaussianSmootherFirstFixed semantics).
#include "xtalscale/smoother.hpp"
#include "internal/kernel_support.hpp"  // XS_MULTIVERSION, with_window_width

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

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
void GaussianSmoother<D>::set_coordinate_shift(const std::array<double, D>& shift) {
  for (int a = 0; a < D; ++a)
    require(std::isfinite(shift[a]), std::string("coordinate shift of axis ") + kAxisNames[a] +
                                         " must be finite");
  shift_ = shift;
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

// ------------------------------------------------------------------------- bulk evaluation
//
// Points are processed in chunks of kChunk. Per axis, a first pass computes every point's
// window (with DIALS's operations) and a second pass its weights 2^-((z - pos)·√log2e/σ)^2
// = exp(-((z - pos)/σ)^2) with exp2_bounded (symmetric windows give identical weights and the
// centre weight is exactly 1); both loops are branch-free so the compiler vectorises them. On
// x86-64 Linux with GCC these passes are also compiled for AVX2+FMA and picked at run time.
// The sums are vectorised (1D) or done per point, and rows are written per point (write_row).
// (Hand-written AVX2 passes for the sums and rows were retired: on the array model's set-up
// and evaluation they gained 2-3 %, within the bench's noise.)
// smoother.cpp is compiled with -fno-trapping-math (see CMakeLists.txt): GCC does not
// if-convert floating-point comparisons otherwise.

// XS_MULTIVERSION (AVX2+FMA clones) comes from internal/kernel_support.hpp. The width switches
// of the multiversioned dispatchers below stay written out: a lambda would be a separate
// function that the target clones do not cover.

namespace {

constexpr int kChunk = 128;  // points per chunk: a 3D chunk (3 × 9 arrays × 1 kB) stays in L1/L2

/// Per-axis constants for the vectorised passes.
struct AxisParams {
  double x0, spacing, half, offset, sigma;
  double inv_sigma;  // 1/σ
  double gauss_scale;  // √log₂e/σ: exp(−(d/σ)²) = 2^(−(d·gauss_scale)²)
  std::int32_t nvalues, naverage;
  int max_window;    // weight rows computed per point (rows past the window are 0)
  int min_window;    // every window holds at least this many values (all of ≤ 3, else min(naverage, 2))
  double half_rows;  // (max_window − 1)/2: from a window's first row to the centre of its rows
};

/// One axis of one chunk: windows, offsets into them, weights and a fast-path flag.
/// Window bounds are kept as doubles so the window pass is all-double and vectorises.
struct AxisChunk {
  alignas(64) double d[kChunk];      // z − position of the window's first value (grid units)
  alignas(64) double first[kChunk];  // window start (an integer value)
  alignas(64) double count[kChunk];  // window size (an integer value)
  alignas(64) double w[kMaxAxisWindow][kChunk];  // w[k][i]: weight of value first+k at point i
  int n_slow = 0;  // number of slow points in the chunk (most chunks have none)
};

/// A point's window on one axis, reading the weights from a chunk (stride kChunk). Reading
/// them from memory written a whole pass earlier avoids store-forwarding stalls.
struct WinRef {
  int first;
  int count;
  const double* w;
  double wt(int k) const { return w[k * kChunk]; }
};

/// True for a slow point: the exponent (d/σ)² of a computed weight row (the window, and rows
/// up to max_window) would leave exp2_bounded's range (only far outside the smoother's range),
/// or the coordinate is not finite (NaN fails the test). @p d is the offset from the window's
/// first position. The farthest computed row is |d − half_rows| + half_rows away; 26.2² = 686
/// stays below 693, the largest (d/σ)² for which exp2_bounded's argument is in range.
inline bool is_slow(double d, const AxisParams& p) {
  return !((std::abs(d - p.half_rows) + p.half_rows) * p.inv_sigma <= 26.2);
}

/// How a window is clipped at the ends of an axis: all values (at most 3), DIALS's rule in
/// min/max form (naverage >= 2), or DIALS's rule as written (naverage 1).
enum class Clip { all_values, min_max, dials };

/// Windows of @p m points (m <= kChunk), the offsets into them and the number of slow points
/// (see is_slow; the caller finds them again and reports non-finite coordinates).
template <Clip kClip>
inline void window_pass(const double* __restrict x, int m, const AxisParams& p, AxisChunk& c) {
  constexpr double lim = 1073741824.0;  // |z| clamp: beyond it the window is pinned anyway
  const double nv = p.nvalues;
  const double nav = p.naverage;
  // A 64-bit counter: the same lane width as the doubles, so no packing in the vector loop.
  std::int64_t n_slow = 0;
  for (int i = 0; i < m; ++i) {
    const double z = (x[i] - p.x0) / p.spacing;
    double zc = z;
    if constexpr (kClip != Clip::min_max) {  // min/max clipping is exact for any finite z
      zc = zc < -lim ? -lim : zc;
      zc = zc > lim ? lim : zc;
    }
    // iround(zc - half): round half away from zero, written branch-free in doubles.
    const double v = zc - p.half;
    const double t = std::trunc(v);
    const double frac = v - t;
    double i1 = t + (frac >= 0.5 ? 1.0 : 0.0) - (frac <= -0.5 ? 1.0 : 0.0) + 1.0;
    double i2 = i1 + nav;
    if constexpr (kClip == Clip::all_values) {  // at most 3 values: the window is all of them
      i1 = 0.0;
      i2 = nv;
    } else if constexpr (kClip == Clip::min_max) {
      // DIALS's clipping (below) for naverage >= 2 and nvalues >= 4: fewer operations.
      i2 = std::min(std::max(i2, 2.0), nv);
      i1 = std::max(std::min(i1, nv - 2.0), 0.0);
    } else {
      const bool low = i1 < 0.0;
      i1 = low ? 0.0 : i1;
      i2 = (low & (i2 < 2.0)) ? 2.0 : i2;
      const bool high = i2 > nv;
      i2 = high ? nv : i2;
      i1 = (high & (i1 > nv - 2.0)) ? nv - 2.0 : i1;
    }
    const double d = z - (i1 + p.offset);  // from the window's first position
    c.d[i] = d;
    c.first[i] = i1;
    c.count[i] = i2 - i1;
    n_slow += is_slow(d, p) ? 1 : 0;
  }
  c.n_slow = static_cast<int>(n_slow);
}
XS_MULTIVERSION
void window_pass(const double* __restrict x, int m, const AxisParams& p, AxisChunk& c) {
  // One loop per clipping rule: GCC does not unswitch a loop body this large by itself.
  if (p.nvalues <= 3) return window_pass<Clip::all_values>(x, m, p, c);
  if (p.naverage >= 2) return window_pass<Clip::min_max>(x, m, p, c);
  return window_pass<Clip::dials>(x, m, p, c);
}

/// The window weights w[k][i] = exp(-((z - pos_k)/σ)²) for k < max_window (as 2^-u², see
/// exp2_bounded); rows past a point's window get weight 0 (so row loops can run a fixed
/// width). Slow points get meaningless values here and are redone by the caller.
XS_MULTIVERSION
void weights_pass(AxisChunk& c, int m, const AxisParams& p) {
  for (int k = 0; k < p.max_window; ++k) {
    double* __restrict wk = c.w[k];
    const bool masked = k >= p.min_window;  // loop-invariant: the loop is unswitched
    for (int i = 0; i < m; ++i) {
      // (z − pos_k)/σ in base-2 units, as (z − pos_0 − k)·√log₂e/σ: exact for a point on a
      // position (symmetric windows give equal weights, the centre weight is exactly 1).
      const double ds2 = (c.d[i] - k) * p.gauss_scale;
      const double w = exp2_bounded(-ds2 * ds2);
      wk[i] = (masked && k >= c.count[i]) ? 0.0 : w;
    }
  }
}

/// 1D: Σw and Σw·p of a chunk at the fixed width @p W (weights past the window are 0 and
/// @p values is padded), vectorised over points.
template <int W>
void sums_pass_1d(const AxisChunk& c, int m, const double* __restrict values,
                  double* __restrict sumw, double* __restrict sumwv) {
  for (int i = 0; i < m; ++i) {
    const auto first = static_cast<std::int32_t>(c.first[i]);
    double s = 0.0, sv = 0.0;
    for (int k = 0; k < W; ++k) {
      s += c.w[k][i];
      sv += c.w[k][i] * values[first + k];
    }
    sumw[i] = s;
    sumwv[i] = sv;
  }
}
XS_MULTIVERSION
void sums_pass_1d(const AxisChunk& c, int m, int width, const double* __restrict values,
                  double* __restrict sumw, double* __restrict sumwv) {
  switch (width) {
    case 2: return sums_pass_1d<2>(c, m, values, sumw, sumwv);
    case 3: return sums_pass_1d<3>(c, m, values, sumw, sumwv);
    case 4: return sums_pass_1d<4>(c, m, values, sumw, sumwv);
    default: return sums_pass_1d<5>(c, m, values, sumw, sumwv);
  }
}

/// 1D rows of a chunk in which every window has the full width W (all but the chunks at the
/// ends of the range): row i is entries [nnz0 + i·W, nnz0 + (i+1)·W). Written point-major from
/// the weight-major chunk; GCC vectorises the interleave. @p scale is 1/Σw per point (kNorm).
template <int W, typename Index, bool kNorm>
inline void full_rows_1d(const AxisChunk& c, int m, const double* __restrict scale,
                         Index* __restrict indices, double* __restrict data,
                         Index* __restrict indptr_next, Index nnz0) {
  for (int i = 0; i < m; ++i) {
    const double f = kNorm ? scale[i] : 1.0;
    const auto col0 = static_cast<Index>(c.first[i]);
    for (int k = 0; k < W; ++k) {
      data[i * W + k] = kNorm ? c.w[k][i] * f : c.w[k][i];
      indices[i * W + k] = col0 + static_cast<Index>(k);
    }
    indptr_next[i] = nnz0 + static_cast<Index>((i + 1) * W);
  }
}
template <typename Index, bool kNorm>
XS_MULTIVERSION void full_rows_1d(const AxisChunk& c, int m, int width, const double* scale,
                                  Index* indices, double* data, Index* indptr_next, Index nnz0) {
  switch (width) {
    case 2: return full_rows_1d<2, Index, kNorm>(c, m, scale, indices, data, indptr_next, nnz0);
    case 3: return full_rows_1d<3, Index, kNorm>(c, m, scale, indices, data, indptr_next, nnz0);
    case 4: return full_rows_1d<4, Index, kNorm>(c, m, scale, indices, data, indptr_next, nnz0);
    default: return full_rows_1d<5, Index, kNorm>(c, m, scale, indices, data, indptr_next, nnz0);
  }
}

/// out[i] = 1/v[i], or 0 where v[i] is 0 (a row whose weights all underflowed).
XS_MULTIVERSION
void reciprocals(const double* __restrict v, int m, double* __restrict out) {
  for (int i = 0; i < m; ++i) out[i] = v[i] > 0.0 ? 1.0 / v[i] : 0.0;
}

/// The smallest window in a chunk (vectorised).
XS_MULTIVERSION
double min_count(const AxisChunk& c, int m) {
  double lo = c.count[0];
  for (int i = 1; i < m; ++i) lo = c.count[i] < lo ? c.count[i] : lo;
  return lo;
}

/// value = Σwp/Σw (0 when Σw = 0, as DIALS) for a chunk, vectorised.
XS_MULTIVERSION
void finish_values(const double* __restrict sumw, const double* __restrict sumwv, int m,
                   double* __restrict value_out) {
  for (int i = 0; i < m; ++i) value_out[i] = sumw[i] > 0.0 ? sumwv[i] / sumw[i] : 0.0;
}


/// Evaluates chunks of points and hands each point's per-axis windows to a callback.
template <int D>
class ChunkEvaluator {
 public:
  ChunkEvaluator(const std::array<SmootherAxis, D>& axes, const GaussianKernel& g,
                 const std::array<double, D>& shift)
      : axes_(axes), g_(g), shift_(shift) {
    for (int a = 0; a < D; ++a) {
      const auto& ax = axes[a];
      params_[a] = {ax.x0(), ax.spacing(), static_cast<double>(ax.num_average()) / 2.0,
                    ax.positions()[0], g.sigma, 1.0 / g.sigma,
                    std::sqrt(1.4426950408889634) / g.sigma,
                    static_cast<std::int32_t>(ax.num_values()),
                    static_cast<std::int32_t>(ax.num_average()),
                    ax.max_window(),
                    ax.num_values() <= 3 ? static_cast<int>(ax.num_values())
                                         : static_cast<int>(std::min<std::size_t>(ax.num_average(), 2)),
                    0.5 * (ax.max_window() - 1)};
    }
    // Rows at and past an axis's max_window are never computed but are read as zeros by
    // fixed-width loops (value_error runs width 5).
    // Windows past a chunk's end are read (never used) by the 4-wide 1D path: keep them valid.
    for (auto& c : chunk_) {
      std::memset(c.w, 0, sizeof c.w);
      std::memset(c.first, 0, sizeof c.first);
      std::memset(c.count, 0, sizeof c.count);
    }
  }

  /// Call f(p, i, win) for every point p in [0, n) (i = p − chunk start), then
  /// done(base, m) after each chunk of m points; throws for a non-finite coordinate.
  template <typename F, typename G>
  void run(std::size_t n, const std::array<const double*, D>& coords, F&& f, G&& done) {
    run(n, coords, [](std::size_t, int) { return false; }, f, done);
  }

  /// As above, with ready(base, m) called once a chunk's windows and weights are in place
  /// (see chunk()); it returns true when it has done the chunk's work itself, and f is then
  /// not called for the chunk's points.
  template <typename R, typename F, typename G>
  void run(std::size_t n, const std::array<const double*, D>& coords, R&& ready, F&& f,
           G&& done) {
    std::array<WinRef, D> win;
    for (std::size_t base = 0; base < n; base += kChunk) {
      const int m = static_cast<int>(std::min<std::size_t>(kChunk, n - base));
      for (int a = 0; a < D; ++a) {
        const double* x = coords[a] + base;
        if (shift_[a] != 0.0) {  // read x − shift, the same double as a stored shifted copy
          for (int i = 0; i < m; ++i) shifted_[i] = x[i] - shift_[a];
          x = shifted_;
        }
        AxisChunk& c = chunk_[a];
        window_pass(x, m, params_[a], c);
        weights_pass(c, m, params_[a]);
        if (c.n_slow > 0)  // non-finite, or far outside the range: direct exponentials (rare)
          for (int i = 0; i < m; ++i)
            if (is_slow(c.d[i], params_[a])) {
              if (!std::isfinite(x[i])) fail_non_finite(kAxisNames[a], base + i, x[i]);
              fix_slow(a, x[i], i);
            }
      }
      if (!ready(base, m)) {
        for (int i = 0; i < m; ++i) {
          for (int a = 0; a < D; ++a) {
            const AxisChunk& c = chunk_[a];
            win[a] = {static_cast<int>(c.first[i]), static_cast<int>(c.count[i]), &c.w[0][i]};
          }
          f(base + i, i, win);
        }
      }
      done(base, m);
    }
  }

  /// The current chunk of axis @p a.
  const AxisChunk& chunk(int a) const { return chunk_[a]; }
  /// The current chunks of all axes.
  const std::array<AxisChunk, D>& chunks() const { return chunk_; }

 private:
  /// Far outside the range (rare): direct exponentials instead of the product form.
  void fix_slow(int a, double x, int i) {
    AxisWindow w;
    axes_[a].eval(axes_[a].normalise(x), g_.sigma, w);
    AxisChunk& c = chunk_[a];
    c.first[i] = w.first;
    c.count[i] = w.count;
    for (int k = 0; k < kMaxAxisWindow; ++k) c.w[k][i] = k < w.count ? w.w[k] : 0.0;
  }

  const std::array<SmootherAxis, D>& axes_;
  const GaussianKernel& g_;
  std::array<double, D> shift_;
  alignas(64) double shifted_[kChunk];
  std::array<AxisParams, D> params_;
  std::array<AxisChunk, D> chunk_;
};

}  // namespace

namespace {

/// Σw and Σw·p of one point (with kSquared: Σw² and Σw²·p). In 2D/3D Σw is the product of
/// the per-axis sums and Σw·p is nested per axis: short dependency chains instead of one 9- or
/// 27-term chain, equal to the flat sums up to rounding (a few ulp).
///
/// The x loops run the fixed width @p W (the axis's largest window): weights past the window
/// are zero, and @p values is padded so the reads past the last value stay in bounds.
template <int D, int W, bool kSquared = false>
inline void point_sums(const std::array<WinRef, D>& win, const double* values, std::int64_t nx,
                       std::int64_t nxy, double& sumw, double& sumwv) {
  const auto wt = [](const WinRef& r, int k) {
    const double w = r.wt(k);
    return kSquared ? w * w : w;
  };
  const WinRef& wx = win[0];
  double sx = 0.0;
  for (int i = 0; i < W; ++i) sx += wt(wx, i);
  if constexpr (D == 1) {
    double s = 0.0;
    for (int i = 0; i < W; ++i) s += wt(wx, i) * values[wx.first + i];
    sumw = sx;
    sumwv = s;
  } else {
    const WinRef& wy = win[1];
    double sy = 0.0;
    for (int j = 0; j < wy.count; ++j) sy += wt(wy, j);
    const auto plane_sum = [&](const double* v) {  // Σ_j wy_j Σ_i wx_i v[j·nx + i]
      double s = 0.0;
      for (int j = 0; j < wy.count; ++j) {
        const double* row = v + (wy.first + j) * nx + wx.first;
        double r = 0.0;
        for (int i = 0; i < W; ++i) r += wt(wx, i) * row[i];
        s += wt(wy, j) * r;
      }
      return s;
    };
    if constexpr (D == 2) {
      sumw = sx * sy;
      sumwv = plane_sum(values);
    } else {
      const WinRef& wz = win[2];
      double sz = 0.0, s = 0.0;
      for (int k = 0; k < wz.count; ++k) {
        sz += wt(wz, k);
        s += wt(wz, k) * plane_sum(values + (wz.first + k) * nxy);
      }
      sumw = sx * sy * sz;
      sumwv = s;
    }
  }
}

/// Store helpers for the CSR arrays. kStream uses non-temporal stores (x86-64): a large
/// output is written once and not read back soon, so bypassing the cache saves the
/// read-for-ownership traffic that otherwise halves the store bandwidth.
template <bool kStream, typename T>
inline void put(T* p, T v) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (kStream) {
    if constexpr (sizeof(T) == 8) {
      long long bits;
      std::memcpy(&bits, &v, 8);
      _mm_stream_si64(reinterpret_cast<long long*>(p), bits);
    } else {
      int bits;
      std::memcpy(&bits, &v, 4);
      _mm_stream_si32(reinterpret_cast<int*>(p), bits);
    }
    return;
  }
#endif
  *p = v;
}

/// Write one CSR row: weights (times @p scale when normalised) in ascending column order.
/// Each x run is written at the fixed width @p W and the cursor then advances by the true
/// count, so entries past the window are overwritten by the next run (the buffers hold
/// n·max_row_nnz entries, enough for the last row's overhang). With kFirstFixed (1D) column 0
/// is dropped and the others move down by one.
template <int D, int W, typename Index, bool kNormalised, bool kFirstFixed, bool kStream,
          bool kPattern = true>
inline std::size_t write_row(const std::array<WinRef, D>& win, std::int64_t nx, std::int64_t nxy,
                             double scale, Index* __restrict indices, double* __restrict data,
                             std::size_t nnz) {
  const WinRef& wx = win[0];
  const double f = kNormalised ? scale : 1.0;
  if constexpr (D == 1) {
    // First-fixed with the window at 0: entry k goes to nnz + k − 1; entry 0 is written at nnz
    // first and then overwritten by entry 1, so it is dropped.
    const int drop = kFirstFixed && wx.first == 0 ? 1 : 0;
    const std::int64_t col0 = wx.first - (kFirstFixed ? 1 : 0);
    Index* ix = kPattern ? indices + nnz : nullptr;
    double* d = data + nnz;
    if constexpr (kPattern) put<kStream>(ix, static_cast<Index>(col0));
    put<kStream>(d, kNormalised ? wx.wt(0) * f : wx.wt(0));
    if constexpr (kPattern) ix -= drop;
    d -= drop;
    for (int i = 1; i < W; ++i) {
      if constexpr (kPattern) put<kStream>(ix + i, static_cast<Index>(col0 + i));
      put<kStream>(d + i, kNormalised ? wx.wt(i) * f : wx.wt(i));
    }
    return nnz + static_cast<std::size_t>(wx.count - drop);
  } else {
    const WinRef& wy = win[1];
    const int nk = D == 3 ? win[2].count : 1;
    double wxs[W];
    for (int i = 0; i < W; ++i) wxs[i] = wx.wt(i);
    for (int k = 0; k < nk; ++k) {
      double wz = f;
      std::int64_t plane = wx.first;
      if constexpr (D == 3) {
        wz = win[2].wt(k) * f;
        plane += (win[2].first + k) * nxy;
      }
      for (int j = 0; j < wy.count; ++j) {
        const double wyz = wy.wt(j) * wz;
        const std::int64_t row = plane + (wy.first + j) * nx;
        for (int i = 0; i < W; ++i) {
          if constexpr (kPattern) put<kStream>(indices + nnz + i, static_cast<Index>(row + i));
          put<kStream>(data + nnz + i, wxs[i] * wyz);
        }
        nnz += static_cast<std::size_t>(wx.count);
      }
    }
  }
  return nnz;
}

/// The parameter values followed by zeros: fixed-width x loops read up to 3 past the end.
inline std::vector<double> padded_values(const double* values, std::size_t n) {
  std::vector<double> v(values, values + n);
  v.resize(n + kMaxAxisWindow, 0.0);
  return v;
}

/// The bulk loop, specialised on what is written so the per-point code has no mode branches.
template <int D, int W, typename Index, bool kMatrix, bool kNormalised, bool kFirstFixed,
          bool kStream, bool kPattern = true>
std::size_t bulk(ChunkEvaluator<D>& ev, std::size_t n, const std::array<const double*, D>& coords,
                 const double* values, std::int64_t nx, std::int64_t nxy,
                 double* value_out, double* sumweight_out, Index* indptr, Index* indices,
                 double* data) {
  std::size_t nnz = 0;
  if constexpr (kMatrix && kPattern) indptr[0] = 0;
  alignas(64) double sw[kChunk];
  alignas(64) double swv[kChunk];
  // Σw goes straight to the caller's array when there is one (no per-chunk copy).
  const auto sumw_of_chunk = [&](std::size_t base) { return sumweight_out ? sumweight_out + base : sw; };
  alignas(64) double inv_sw[kChunk];
  ev.run(
      n, coords,
      [&](std::size_t base, int m) {
        bool rows_written = false;  // by the vectorised 1D path: no per-point work left
        if constexpr (D == 1) {  // 1D sums, and rows of full windows, vectorised per chunk
          const AxisChunk& c = ev.chunk(0);
          double* sumw = sumw_of_chunk(base);
          sums_pass_1d(c, m, W, values, sumw, swv);
          if constexpr (kMatrix && kPattern && !kFirstFixed) {
            if (min_count(c, m) == W) {
              if constexpr (kNormalised) reciprocals(sumw, m, inv_sw);
              full_rows_1d<Index, kNormalised>(c, m, W, inv_sw, indices + nnz, data + nnz,
                                                indptr + base + 1, static_cast<Index>(nnz));
              nnz += static_cast<std::size_t>(m) * W;
              rows_written = true;
            }
          }
        }
        return rows_written || (D == 1 && !kMatrix);  // 1D values-only: nothing per point
      },
      [&](std::size_t p, int i, const std::array<WinRef, D>& win) {
        double& sw_p = sumweight_out ? sumweight_out[p] : sw[i];
        if constexpr (D > 1) point_sums<D, W>(win, values, nx, nxy, sw_p, swv[i]);
        if constexpr (kMatrix) {
          // As DIALS's row_multiply(weight, 1/sumweight); a row with Σw = 0 (far outside the
          // range, every weight underflowed) gets derivative 0 rather than NaN.
          const double scale = kNormalised ? (sw_p > 0.0 ? 1.0 / sw_p : 0.0) : 1.0;
          nnz = write_row<D, W, Index, kNormalised, kFirstFixed, kStream, kPattern>(
              win, nx, nxy, scale, indices, data, nnz);
          if constexpr (kPattern) indptr[p + 1] = static_cast<Index>(nnz);
        }
      },
      [&](std::size_t base, int m) {
        if (value_out)
          finish_values(sumw_of_chunk(base), swv, m, value_out + base);
      });
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (kStream) _mm_sfence();  // order the streamed stores before returning
#endif
  return nnz;
}

}  // namespace

namespace {
/// nx·ny, the stride of z in the flat value index (nx in 1D, unused there).
template <int D>
std::int64_t plane_size(const std::array<SmootherAxis, D>& axes) {
  const auto nx = static_cast<std::int64_t>(axes[0].num_values());
  if constexpr (D >= 2) return nx * static_cast<std::int64_t>(axes[1].num_values());
  return nx;
}
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
  const auto nx = static_cast<std::int64_t>(axes_[0].num_values());
  const std::int64_t nxy = plane_size<D>(axes_);
  auto ev = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_, shift_);  // ~10 kB/axis: off the stack
  const std::vector<double> padded = padded_values(values, n_values);
  const bool norm = mode == WeightMode::normalised;
  // Non-temporal stores (per-point path only: the AVX2 paths write in place) for wide rows
  // (3D: up to 27 entries) and outputs far larger than the caches: measured 15% faster in 3D,
  // no gain in 1D and 5% slower in 2D.
  const bool stream = want_matrix && max_row_nnz() >= 16 &&
                      n * max_row_nnz() * (sizeof(Index) + 8) > (std::size_t(32) << 20);
  const auto go = [&](auto width, auto matrix, auto normalised, auto fixed) {
    constexpr int kW = decltype(width)::value;
    constexpr bool kM = decltype(matrix)::value, kN = decltype(normalised)::value,
                   kF = decltype(fixed)::value;
    if (kM && stream)
      return bulk<D, kW, Index, kM, kN, kF, true>(*ev, n, coords, padded.data(), nx, nxy,
                                                  value_out, sumweight_out,
                                                  indptr, indices, data);
    return bulk<D, kW, Index, kM, kN, kF, false>(*ev, n, coords, padded.data(), nx, nxy,
                                                 value_out, sumweight_out,
                                                 indptr, indices, data);
  };
  const auto modes = [&](auto width) -> std::size_t {
    using T = std::true_type;
    using F = std::false_type;
    if (!want_matrix) return go(width, F{}, F{}, F{});
    if constexpr (D == 1) {
      if (first_fixed) return norm ? go(width, T{}, T{}, T{}) : go(width, T{}, F{}, T{});
    }
    return norm ? go(width, T{}, T{}, F{}) : go(width, T{}, F{}, F{});
  };
  // The x window width as a compile-time constant, so the innermost loops are fully unrolled.
  return detail::with_window_width<2>(axes_[0].max_window(), modes);
}

template <int D>
std::size_t GaussianSmoother<D>::weight_pattern(std::size_t n,
                                                const std::array<const double*, D>& coords,
                                                std::int64_t* indptr,
                                                std::int32_t* indices) const {
  const auto nx = static_cast<std::int64_t>(axes_[0].num_values());
  const std::int64_t nxy = plane_size<D>(axes_);
  auto ev = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_, shift_);
  std::int64_t nnz = 0;
  if (indptr) indptr[0] = 0;
  // The rows write_row() writes: z outer, then y, then the x run (ascending columns).
  ev->run(
      n, coords,
      [&](std::size_t p, int, const std::array<WinRef, D>& win) {
        const int nk = D == 3 ? win[D - 1].count : 1;
        const int nj = D >= 2 ? win[1].count : 1;
        for (int k = 0; k < nk; ++k) {
          const std::int64_t plane = D == 3 ? (win[D - 1].first + k) * nxy : 0;
          for (int j = 0; j < nj; ++j) {
            const std::int64_t row = plane + (D >= 2 ? (win[D >= 2 ? 1 : 0].first + j) * nx : 0) +
                                     win[0].first;
            if (indices)
              for (int i = 0; i < win[0].count; ++i)
                indices[nnz + i] = static_cast<std::int32_t>(row + i);
            nnz += win[0].count;
          }
        }
        if (indptr) indptr[p + 1] = nnz;
      },
      [](std::size_t, int) {});
  return static_cast<std::size_t>(nnz);
}

template <int D>
void GaussianSmoother<D>::multi_value_derivatives(std::size_t n,
                                                  const std::array<const double*, D>& coords,
                                                  const double* values, std::size_t n_values,
                                                  double* value_out, double* data) const {
  check_values(values, n_values, "values");
  require(data != nullptr, "data must be given");
  const auto nx = static_cast<std::int64_t>(axes_[0].num_values());
  const std::int64_t nxy = plane_size<D>(axes_);
  auto ev = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_, shift_);
  const std::vector<double> padded = padded_values(values, n_values);
  // Plain stores: the caller (a model block) reads the rows back at once, so streaming them
  // past the cache gained nothing (measured on the 3-D absorption term at 10⁶ rows).
  const auto go = [&](auto width) -> std::size_t {
    constexpr int kW = decltype(width)::value;
    return bulk<D, kW, std::int32_t, true, true, false, false, false>(
        *ev, n, coords, padded.data(), nx, nxy, value_out, nullptr, nullptr, nullptr, data);
  };
  detail::with_window_width<2>(axes_[0].max_window(), go);
}

template <int D>
SinglePoint GaussianSmoother<D>::value_weight(const std::array<double, D>& coord,
                                              const double* values, std::size_t n_values,
                                              bool first_fixed) const {
  // One-point bulk evaluation, so single- and multi-point results agree bit for bit.
  // Intended first-fixed behaviour: w_j goes to column j-1 for j >= 1 and w_0 is dropped from
  // the row (it still counts in value and sumweight). DIALS's single-point version also writes
  // w_j at column j, leaving a stray (possibly out-of-bounds) entry; we do not reproduce that.
  std::array<const double*, D> ptrs{};
  for (int a = 0; a < D; ++a) ptrs[a] = &coord[a];
  SinglePoint out;
  const std::size_t cap = max_row_nnz();
  out.index.resize(cap);
  out.weight.resize(cap);
  std::int64_t indptr[2];
  const std::size_t nnz = multi_value_weight<std::int64_t>(
      1, ptrs, values, n_values, &out.value, &out.sumweight, indptr, out.index.data(),
      out.weight.data(), WeightMode::raw, first_fixed);
  out.index.resize(nnz);
  out.weight.resize(nnz);
  return out;
}

template <int D>
void GaussianSmoother<D>::value_error(std::size_t n, const std::array<const double*, D>& coords,
                                      const double* values, const double* esds,
                                      std::size_t n_values, double* value_out,
                                      double* error_out) const {
  check_values(values, n_values, "values");
  if (esds) check_values(esds, n_values, "esds");
  const auto nx = static_cast<std::int64_t>(axes_[0].num_values());
  const std::int64_t nxy = plane_size<D>(axes_);
  // σ_v² = Σ (w_i/Σw)² σ_i² = (Σ w_i² σ_i²)/(Σw)²: the same nested sums with squared weights
  // and σ² as the "values".
  const std::vector<double> vals = padded_values(values, n_values);
  std::vector<double> var(n_values + kMaxAxisWindow, 0.0);
  if (esds)
    for (std::size_t i = 0; i < n_values; ++i) var[i] = esds[i] * esds[i];
  auto ev = std::make_unique<ChunkEvaluator<D>>(axes_, kernel_, shift_);
  ev->run(
      n, coords,
      [&](std::size_t p, int, const std::array<WinRef, D>& win) {
        double sumw, sumwv, sumw2, sumw2s2;
        // Width 5 covers every window; weights past the window are zero.
        point_sums<D, kMaxAxisWindow>(win, vals.data(), nx, nxy, sumw, sumwv);
        point_sums<D, kMaxAxisWindow, true>(win, var.data(), nx, nxy, sumw2, sumw2s2);
        const bool ok = sumw > 0.0;
        if (value_out) value_out[p] = ok ? sumwv / sumw : 0.0;
        if (error_out) error_out[p] = ok ? std::sqrt(sumw2s2) / sumw : 0.0;
      },
      [](std::size_t, int) {});
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
