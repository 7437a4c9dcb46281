/// @file smoother.hpp
/// @brief DIALS-exact Gaussian smoothers in 1, 2 and 3 dimensions (Aimless `SmoothedValue` design).
///
/// A smoother holds a regular grid of *values* (parameters) along each axis and evaluates a smooth
/// function at any coordinate as the Gaussian-weighted mean of the values in a small window:
///
///     value(x) = Σ_i w_i p_i / Σ_i w_i,     w_i = exp(−((z − pos_i)/σ)²),     z = (x − x0)/spacing
///
/// The layout rules are those of DIALS `GaussianSmoother{,2D,3D}` and `GaussianSmootherFirstFixed`
/// (see `docs/dials_scaling_spec.md` §3):
///  * `num_intervals` n > 0 gives `num_values` 2 (n = 1), 3 (n = 2) or n + 2 (n ≥ 3);
///  * `spacing = (x1 − x0)/n` must be > 0;
///  * positions are `0, 1, ...` when there are fewer than 4 values, otherwise `i − 0.5`;
///  * the window of a normalised coordinate z is all values when there are at most 3, otherwise
///    `[iround(z − naverage/2) + 1, +naverage)` clipped to at least 2 values at either end, where
///    `iround` rounds half **away from zero**;
///  * the default σ is `0.65 + 0.05·(naverage − 2)`; in 2D/3D it uses the smallest per-axis
///    naverage.
///
/// In 2D and 3D the weight of a grid value is the product of the per-axis 1D weights (equal to
/// `exp(−Σ_a Δ_a²/σ²)`), and values are stored with x fastest: `index = i + j·nx + k·nx·ny`.
///
/// Two levels of API are offered:
///  * `SmootherAxis` — the per-axis layout with inline `window()` / `eval()` helpers, for
///    kernels that want to fuse the smoother into their own per-reflection loop;
///  * `GaussianSmoother<D>` — whole smoothers with a single-point `value_weight()` and a bulk
///    `multi_value_weight()` that writes values, sums of weights and a row-major CSR matrix
///    of raw weights (or of ∂value/∂p = w/Σw) straight into caller-provided buffers.
///
/// Example (a scale component's kernel: values and ∂s/∂p for n reflections):
/// @code
///   xtalscale::GaussianSmoother1D s({{{0.0, 36.0}}}, {nparam_to_val(n_params)});
///   std::vector<double> value(n), data(n * s.max_row_nnz());
///   std::vector<std::int32_t> indptr(n + 1), indices(n * s.max_row_nnz());
///   const std::size_t nnz = s.multi_value_weight<std::int32_t>(
///       n, {x}, params.data(), params.size(), value.data(), nullptr, indptr.data(),
///       indices.data(), data.data(), xtalscale::WeightMode::normalised);
/// @endcode
///
/// All objects are immutable during evaluation (const methods, no shared scratch), so one smoother
/// can be evaluated from many threads at once.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xtalscale/check.hpp"
#include "xtalscale/export.hpp"

namespace xtalscale {

/// Largest number of values in one axis window (DIALS limits naverage to 1..5).
constexpr int kMaxAxisWindow = 5;

/// Round half away from zero (boost `iround`), e.g. −0.5 → −1, 1.5 → 2, 2.5 → 3.
/// Valid for |v| < 2^52; callers clamp larger arguments first.
inline std::int64_t iround_half_away(double v) noexcept {
  auto t = static_cast<std::int64_t>(v);  // truncates toward zero
  const double frac = v - static_cast<double>(t);  // exact for |v| < 2^52
  // Branch-free: for random coordinates a branch here would mispredict half the time.
  return t + static_cast<std::int64_t>(frac >= 0.5) - static_cast<std::int64_t>(frac <= -0.5);
}

namespace detail {

/// 1.5·2^52: for |v| < 2^51, the low bits of t = v + kRoundShifter hold round(v), and
/// t − kRoundShifter is round(v) as a double.
constexpr double kRoundShifter = 6755399441055744.0;

/// Horner evaluation of c[0]·r^(N−1) + ... + c[N−1] (highest degree first).
template <std::size_t N>
inline double horner(double r, const double (&c)[N]) noexcept {
  double p = c[0];
  for (std::size_t i = 1; i < N; ++i) p = p * r + c[i];
  return p;
}

/// p·2^k, where t = k + kRoundShifter (so −1022 <= k <= 1023 gives a normal scale).
inline double times_pow2(double p, double t) noexcept {
  std::uint64_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  const std::uint64_t scale_bits = (tb + 1023u) << 52;  // 2^k: the exponent field k + 1023
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

/// exp_bounded's reduction constants: log₂e and ln 2 split in two (the high part's low 32
/// bits zero, so that k·kLn2Hi is exact).
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;

/// Near-minimax (Chebyshev-fitted) degree-11 polynomial for e^r on |r| <= ln2/2, absolute
/// error 3.2e-18 (0.03 ulp): as accurate as the degree-13 Taylor series, two FMAs cheaper.
constexpr double kExpPoly[12] = {
    2.5110037605963777e-08, 2.763263963904103e-07, 2.755724091857897e-06,
    2.4801485482328494e-05, 0.00019841269890047113, 0.0013888888952314775,
    0.008333333333319601,   0.0416666666664881,     0.1666666666666668,
    0.5000000000000019,     1.0,                    1.0};

/// The same fit for 2^r on |r| <= 1/2 (error 3.2e-18).
constexpr double kExp2Poly[12] = {
    4.4558179083360645e-10, 7.074194297288521e-09, 1.0178057087733941e-07,
    1.3215432535912375e-06, 1.5252733841556773e-05, 0.00015403530463724353,
    0.001333355814640647,   0.009618129107587256,  0.055504108664821625,
    0.24022650695910158,    0.6931471805599453,    1.0};

}  // namespace detail

/// exp(x) for |x| <= 700 (so the result is a normal number), to within ~2 ulp of std::exp.
///
/// Branch-free (Cody–Waite reduction x = k·ln2 + r, |r| <= ln2/2, then detail::kExpPoly), so
/// it inlines and pipelines where std::exp is a libm call. The caller guarantees the range;
/// the bulk kernels fall back to std::exp outside it.
inline double exp_bounded(double x) noexcept {
  const double t = x * detail::kLog2e + detail::kRoundShifter;
  const double kd = t - detail::kRoundShifter;
  const double r = (x - kd * detail::kLn2Hi) - kd * detail::kLn2Lo;
  return detail::times_pow2(detail::horner(r, detail::kExpPoly), t);
}

/// 2^u for −1000 <= u <= 0 (a normal result), to within ~1 ulp.
///
/// u = k + r with k = round(u), |r| <= 1/2 (exact), then detail::kExp2Poly for 2^r. With
/// u = −(d·√log₂e/σ)² it gives the Gaussian exp(−(d/σ)²) with one fewer multiplication and no
/// Cody–Waite reduction, which is what the bulk smoother kernels use.
inline double exp2_bounded(double u) noexcept {
  const double t = u + detail::kRoundShifter;
  const double kd = t - detail::kRoundShifter;
  const double r = u - kd;  // exact (Sterbenz)
  return detail::times_pow2(detail::horner(r, detail::kExp2Poly), t);
}

/// The Gaussian of one smoother: its width σ (normalised units) and a = 1/σ².
struct GaussianKernel {
  double sigma = 0.7;         ///< Gaussian width in normalised units
  double a = 1.0 / 0.49;      ///< 1/σ²
  /// Set σ and a.
  void set(double s) noexcept {
    sigma = s;
    a = 1.0 / (s * s);
  }
};

/// The weights of one axis at one coordinate: values `first .. first+count−1` with weights `w[k]`.
struct AxisWindow {
  int first = 0;                       ///< index of the first value in the window
  int count = 0;                       ///< number of values in the window (2..5, or all if ≤ 3)
  std::array<double, kMaxAxisWindow> w{};  ///< raw Gaussian weights exp(−((z − pos)/σ)²)
};

/// Layout of one smoother axis: DIALS `GaussianSmoother` without the parameter values.
class XTALSCALE_EXPORT SmootherAxis {
 public:
  /// Build the axis for the coordinate range [x0, x1] split into @p num_intervals intervals.
  /// @param name names the range argument in error messages (e.g. "x_range").
  /// @throws std::invalid_argument if num_intervals == 0, x0/x1 are not finite or x1 <= x0.
  SmootherAxis(double x0, double x1, std::size_t num_intervals, const char* name = "x_range");

  /// Set the window size: naverage = min(num_average, num_values()), which must lie in 1..5.
  /// @throws std::invalid_argument otherwise.
  void set_average(std::size_t num_average);

  std::size_t num_values() const noexcept { return nvalues_; }   ///< number of values on this axis
  std::size_t num_samples() const noexcept { return nsample_; }  ///< number of intervals
  std::size_t num_average() const noexcept { return naverage_; } ///< window size naverage
  double spacing() const noexcept { return spacing_; }           ///< (x1 − x0)/num_intervals
  double x0() const noexcept { return x0_; }                     ///< start of the range
  /// Positions of the values in normalised units (0,1,2 or −0.5,0.5,...).
  const std::vector<double>& positions() const noexcept { return positions_; }
  /// Largest possible window on this axis (the nnz bound per axis).
  int max_window() const noexcept {
    if (nvalues_ <= 3) return static_cast<int>(nvalues_);
    return static_cast<int>(naverage_ < 2 ? 2 : naverage_);
  }

  /// Normalised coordinate z = (x − x0)/spacing (a division, as DIALS, so window edges match).
  double normalise(double x) const noexcept { return (x - x0_) / spacing_; }

  /// The index window [first, first+count) for normalised coordinate @p z (§3.2 of the spec).
  void window(double z, int& first, int& count) const noexcept {
    if (nvalues_ <= 3) {
      first = 0;
      count = static_cast<int>(nvalues_);
      return;
    }
    // Beyond ±2^30 the window is pinned to an end anyway; clamping keeps iround exact.
    const double zc = z < -1073741824.0 ? -1073741824.0 : (z > 1073741824.0 ? 1073741824.0 : z);
    const auto nv = static_cast<std::int64_t>(nvalues_);
    std::int64_t i1 = iround_half_away(zc - half_) + 1;
    std::int64_t i2 = i1 + static_cast<std::int64_t>(naverage_);
    if (i1 < 0) {
      i1 = 0;
      if (i2 < 2) i2 = 2;
    }
    if (i2 > nv) {
      i2 = nv;
      if (i1 > nv - 2) i1 = nv - 2;
    }
    first = static_cast<int>(i1);
    count = static_cast<int>(i2 - i1);
  }

  /// Fill @p out with the window and raw weights at normalised coordinate @p z for width @p sigma.
  void eval(double z, double sigma, AxisWindow& out) const noexcept {
    window(z, out.first, out.count);
    const double* pos = positions_.data() + out.first;
    for (int k = 0; k < out.count; ++k) {
      const double ds = (z - pos[k]) / sigma;
      out.w[k] = std::exp(-ds * ds);
    }
  }

 private:
  double x0_;
  double spacing_;
  double half_ = 1.5;
  std::size_t nsample_;
  std::size_t nvalues_;
  std::size_t naverage_ = 3;
  std::vector<double> positions_;
};

/// What a bulk evaluation writes into the CSR data array.
enum class WeightMode {
  raw,         ///< raw Gaussian weights w_i (DIALS `multi_value_weight`)
  normalised,  ///< w_i/Σw = ∂value/∂p_i (0 for a row whose Σw is 0)
};

/// The result of a single-point evaluation: value, Σw and the sparse weight row.
struct SinglePoint {
  double value = 0.0;      ///< Σ w p / Σ w (0 when Σw == 0, as DIALS)
  double sumweight = 0.0;  ///< Σ w over the window (always includes p0)
  std::vector<std::int64_t> index;  ///< column of each weight, ascending
  std::vector<double> weight;       ///< raw weight of each column
};

/// A DIALS Gaussian smoother in @p D = 1, 2 or 3 dimensions.
///
/// Construction takes one (x0, x1, num_intervals) triple per axis. The default smoothing is
/// `set_smoothing(3, -1)`. Methods are const and allocation-free in the bulk path.
template <int D>
class XTALSCALE_EXPORT GaussianSmoother {
  static_assert(D >= 1 && D <= 3, "GaussianSmoother supports 1, 2 or 3 dimensions");

 public:
  /// Axis ranges `ranges[a] = {x0, x1}` and interval counts per axis.
  /// @throws std::invalid_argument for a zero interval count or an empty/reversed/non-finite range.
  GaussianSmoother(const std::array<std::array<double, 2>, D>& ranges,
                   const std::array<std::size_t, D>& num_intervals);

  /// DIALS `set_smoothing`: per axis naverage = min(num_average, nvalues) in 1..5; sigma < 0 picks
  /// the default 0.65 + 0.05·(min naverage − 2).
  /// @throws std::invalid_argument if a naverage is outside 1..5, or sigma is 0 or not finite.
  void set_smoothing(std::size_t num_average, double sigma);

  /// Bulk methods read coordinate a of point p as `coords[a][p] − shift[a]` (computed as
  /// written, so the same double as a stored shifted copy): a component whose coordinates are
  /// its data minus their minimum (DIALS's normalisation) need not store the shifted copy.
  /// Default 0 (coordinates used as given).
  /// @throws std::invalid_argument for a non-finite shift.
  void set_coordinate_shift(const std::array<double, D>& shift);
  const std::array<double, D>& coordinate_shift() const noexcept { return shift_; }

  const SmootherAxis& axis(int a) const { return axes_.at(static_cast<std::size_t>(a)); }
  double sigma() const noexcept { return kernel_.sigma; }
  /// σ and 1/σ².
  const GaussianKernel& kernel() const noexcept { return kernel_; }
  /// Total number of values (product over axes), the length of a parameter vector.
  std::size_t num_values() const noexcept { return ntotal_; }
  /// Upper bound on the non-zeros of one weight row (product of the per-axis window bounds).
  std::size_t max_row_nnz() const noexcept;

  /// Single-point evaluation at @p coord (D coordinates) with @p n_values parameter values
  /// (a one-point multi_value_weight(), so both agree exactly).
  /// With @p first_fixed (1D only) the weight row drops column 0 and shifts the others down by
  /// one (intended DIALS behaviour; DIALS's own single-point version also writes a stray entry).
  /// @throws std::invalid_argument for wrong n_values, non-finite input, or first_fixed in 2D/3D.
  SinglePoint value_weight(const std::array<double, D>& coord, const double* values,
                           std::size_t n_values, bool first_fixed = false) const;

  /// Bulk evaluation at @p n points; `coords[a][p]` is coordinate a of point p.
  ///
  /// Writes `value_out[p]`, `sumweight_out[p]`, and a CSR matrix of n rows and
  /// `num_values()` columns (`num_values() − 1` with @p first_fixed, 1D only): `indptr[0..n]`,
  /// `indices`/`data` of capacity at least `n * max_row_nnz()`. Columns within a row are
  /// ascending. Entries past the returned nnz (up to the capacity) are scratch: rows are
  /// written at a fixed width and then trimmed. Any of value_out, sumweight_out may be null to
  /// skip them; if `data` is null only the values are computed (indptr/indices are ignored).
  ///
  /// With WeightMode::normalised the data are w_i·(1/Σw) — DIALS's `row_multiply(weight,
  /// 1/sumweight)`, i.e. ∂value/∂p_i — ready to use as a derivative matrix.
  ///
  /// Numerics: the window and z = (x − x0)/spacing use DIALS's operations, so windows are
  /// DIALS's exactly. A per-axis weight exp(−((z − pos)/σ)²) is evaluated as 2^(−u²) with
  /// u = (z − pos)·√log₂e/σ (exp2_bounded); symmetric windows still give equal weights and the
  /// centre weight is still exactly 1. In 2D/3D a grid weight is the product of the axis
  /// weights (DIALS takes one exp of the summed exponent). Each weight is within
  /// ~1e-15·(1 + E) relative of DIALS's exp(−E), the size of the rounding DIALS's own formula
  /// carries; Σw (a product of per-axis sums in 2D/3D) and values agree to ~1e-15.
  /// value_weight() runs this same code, so single- and multi-point evaluations agree bit for
  /// bit. Performance: chunks of 128 points, vectorised window and weight passes (also
  /// compiled for AVX2+FMA and picked at run time on x86-64 Linux, so the last bit of a value
  /// may differ between machines); outputs beyond 32 MB are written with streaming stores. No
  /// allocation per point; a few kB of scratch per call.
  /// @return the number of non-zeros written (= indptr[n]).
  /// @throws std::invalid_argument for wrong n_values, non-finite values or coordinates
  ///         (the message names coordinate "x", "y" or "z" and the element); outputs may then
  ///         be partly written.
  template <typename Index>
  std::size_t multi_value_weight(std::size_t n, const std::array<const double*, D>& coords,
                                 const double* values, std::size_t n_values, double* value_out,
                                 double* sumweight_out, Index* indptr, Index* indices,
                                 double* data, WeightMode mode = WeightMode::raw,
                                 bool first_fixed = false) const;

  /// The CSR pattern multi_value_weight() writes for these points (no weights written): row
  /// starts @p indptr (n + 1) and column indices @p indices (ascending within a row). Either may
  /// be null, e.g. both to count the non-zeros first.
  /// @return the number of non-zeros.
  /// @throws std::invalid_argument for a non-finite coordinate.
  std::size_t weight_pattern(std::size_t n, const std::array<const double*, D>& coords,
                             std::int64_t* indptr, std::int32_t* indices) const;

  /// Values (@p value_out, may be null) and the normalised weights ∂value/∂p in the order of
  /// weight_pattern(), without writing the pattern itself: for a holder that keeps the
  /// pattern once and rewrites only the numbers. @p data needs capacity nnz + kMaxAxisWindow
  /// (rows are written at a fixed width, then trimmed). Same numbers as multi_value_weight()
  /// with WeightMode::normalised.
  /// @throws std::invalid_argument for wrong n_values, non-finite values or coordinates.
  void multi_value_derivatives(std::size_t n, const std::array<const double*, D>& coords,
                               const double* values, std::size_t n_values, double* value_out,
                               double* data) const;

  /// Values and propagated errors at @p n points: σ_v² = Σ_i (w_i/Σw)² σ_i² (esds may be null → 0).
  void value_error(std::size_t n, const std::array<const double*, D>& coords,
                   const double* values, const double* esds, std::size_t n_values,
                   double* value_out, double* error_out) const;

 private:
  void check_values(const double* values, std::size_t n_values, const char* name) const;
  std::array<SmootherAxis, D> axes_;
  std::size_t ntotal_ = 0;
  GaussianKernel kernel_;
  std::array<double, D> shift_{};
};

extern template class GaussianSmoother<1>;
extern template class GaussianSmoother<2>;
extern template class GaussianSmoother<3>;

using GaussianSmoother1D = GaussianSmoother<1>;  ///< DIALS GaussianSmoother / FirstFixed
using GaussianSmoother2D = GaussianSmoother<2>;  ///< DIALS GaussianSmoother2D
using GaussianSmoother3D = GaussianSmoother<3>;  ///< DIALS GaussianSmoother3D

/// Convert a number of smoother values to DIALS's number of intervals
/// (`SmoothMixin.nparam_to_val`): n − 1 for n ∈ {2, 3}, n − 2 for n ≥ 4.
/// @throws std::invalid_argument for n < 2.
XTALSCALE_EXPORT std::size_t nparam_to_val(std::size_t n_params);

}  // namespace xtalscale
