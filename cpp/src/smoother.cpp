// Gaussian smoothers (DIALS GaussianSmoother{,2D,3D} and GaussianSmootherFirstFixed semantics).
#include "xtalscale/smoother.hpp"

#include <algorithm>
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
  sigma_ = sigma < 0.0 ? 0.65 + 0.05 * (static_cast<double>(min_nav) - 2.0) : sigma;
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
inline bool eval_axes(const std::array<SmootherAxis, D>& axes, const double* coord, double sigma,
                      std::array<AxisWindow, D>& win) {
  for (int a = 0; a < D; ++a) {
    if (!std::isfinite(coord[a])) return false;
    axes[a].eval(axes[a].normalise(coord[a]), sigma, win[a]);
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
  eval_axes<D>(axes_, coord.data(), sigma_, win);
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
  std::array<AxisWindow, D> win;
  double coord[D];
  for (std::size_t p = 0; p < n; ++p) {
    for (int a = 0; a < D; ++a) coord[a] = coords[a][p];
    if (!eval_axes<D>(axes_, coord, sigma_, win)) {
      for (int a = 0; a < D; ++a)
        if (!std::isfinite(coord[a])) fail_non_finite(kAxisNames[a], p, coord[a]);
    }
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
  }
  return nnz;
}

template <int D>
void GaussianSmoother<D>::value_error(std::size_t n, const std::array<const double*, D>& coords,
                                      const double* values, const double* esds,
                                      std::size_t n_values, double* value_out,
                                      double* error_out) const {
  check_values(values, n_values, "values");
  if (esds) check_values(esds, n_values, "esds");
  std::array<AxisWindow, D> win;
  double coord[D];
  for (std::size_t p = 0; p < n; ++p) {
    for (int a = 0; a < D; ++a) coord[a] = coords[a][p];
    if (!eval_axes<D>(axes_, coord, sigma_, win)) {
      for (int a = 0; a < D; ++a)
        if (!std::isfinite(coord[a])) fail_non_finite(kAxisNames[a], p, coord[a]);
    }
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
  }
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
