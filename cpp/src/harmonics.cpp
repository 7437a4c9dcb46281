// Real spherical harmonics for the SH absorption component (conventions in harmonics.hpp).
#include "xtalscale/harmonics.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xtalscale/check.hpp"
#include "fit_parallel.hpp"

namespace xtalscale::harmonics {
namespace {

constexpr double kPi = 3.14159265358979323846;

void require_lmax(int lmax) {
  require(lmax >= 1 && lmax <= kMaxLmax,
          "lmax must be between 1 and " + std::to_string(kMaxLmax) + " (got " +
              std::to_string(lmax) + ")");
}

/// Normalisation and √2 prefactors for every (l, |m|), indexed l*(lmax+1)+|m|. Computed once
/// per call of a table builder so the inner loops only multiply.
std::vector<double> prefactors(int lmax) {
  std::vector<double> pref(static_cast<std::size_t>((lmax + 1) * (lmax + 1)), 0.0);
  for (int l = 0; l <= lmax; ++l) {
    for (int m = 0; m <= l; ++m) {
      // (l-m)!/(l+m)! as a product, which stays accurate for every l we accept.
      double ratio = 1.0;
      for (int k = l - m + 1; k <= l + m; ++k) ratio /= static_cast<double>(k);
      const double norm = std::sqrt((2.0 * l + 1.0) / (4.0 * kPi) * ratio);
      pref[static_cast<std::size_t>(l * (lmax + 1) + m)] = m == 0 ? norm : kSqrt2Truncated * norm;
    }
  }
  return pref;
}

/// P̄_l^m(cos θ) without the Condon–Shortley phase into @p legendre ((lmax+1)² doubles,
/// index l*(lmax+1)+m).
void associated_legendre(int lmax, double theta, double* legendre) {
  const int stride = lmax + 1;
  const double x = std::cos(theta);
  const double s = std::sin(theta);
  // Diagonal P_m^m = (2m-1)!! s^m, then the upward recurrence in l for each m.
  double pmm = 1.0;
  for (int m = 0; m <= lmax; ++m) {
    if (m > 0) pmm *= (2.0 * m - 1.0) * s;
    legendre[m * stride + m] = pmm;
    if (m + 1 <= lmax) legendre[(m + 1) * stride + m] = x * (2.0 * m + 1.0) * pmm;
    for (int l = m + 2; l <= lmax; ++l) {
      legendre[l * stride + m] = ((2.0 * l - 1.0) * x * legendre[(l - 1) * stride + m] -
                                  (l + m - 1.0) * legendre[(l - 2) * stride + m]) /
                                 static_cast<double>(l - m);
    }
  }
}

/// All harmonics at one direction, given the prefactor table; legendre is scratch of
/// (lmax+1)² doubles. cos(mφ) and sin(mφ) are taken once per order m (each l of that order
/// reuses them): the same library calls on the same arguments as one call per (l, m), so the
/// same bits, with 2·lmax trigonometric calls per direction instead of lmax·(lmax+1).
void evaluate(int lmax, const double* pref, double theta, double phi, double* legendre,
              double* out) {
  const int stride = lmax + 1;
  associated_legendre(lmax, theta, legendre);
  std::array<double, kMaxLmax + 1> cos_m{}, sin_m{};
  for (int m = 1; m <= lmax; ++m) {
    cos_m[static_cast<std::size_t>(m)] = std::cos(m * phi);
    sin_m[static_cast<std::size_t>(m)] = std::sin(m * phi);
  }
  std::size_t k = 0;
  for (int l = 1; l <= lmax; ++l) {
    for (int m = -l; m <= l; ++m, ++k) {
      const int am = m < 0 ? -m : m;
      const double base = pref[l * stride + am] * legendre[l * stride + am];
      if (m > 0)
        out[k] = base * cos_m[static_cast<std::size_t>(am)];
      else if (m == 0)
        out[k] = base;
      else
        out[k] = base * sin_m[static_cast<std::size_t>(am)];
    }
  }
}

/// A Rodrigues rotation about a fixed axis (normalised here), angle set per use; the
/// arithmetic of rotate_vectors_about_axis, which every rotation here shares.
struct Rodrigues {
  double ux, uy, uz;
  double c = 1.0, s = 0.0, t = 0.0;

  Rodrigues(const double axis[3], const char* name) {
    require_finite(axis, 3, name);
    const double norm = std::sqrt(axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]);
    require(norm > 0.0, std::string(name) + " must be non-zero");
    ux = axis[0] / norm;
    uy = axis[1] / norm;
    uz = axis[2] / norm;
  }

  void set_angle(double angle) {
    c = std::cos(angle);
    s = std::sin(angle);
    t = 1.0 - c;
  }

  void apply(const double* v, double* out) const {
    const double x = v[0], y = v[1], z = v[2];
    out[0] = (c + ux * ux * t) * x + (ux * uy * t - uz * s) * y + (ux * uz * t + uy * s) * z;
    out[1] = (ux * uy * t + uz * s) * x + (c + uy * uy * t) * y + (uy * uz * t - ux * s) * z;
    out[2] = (ux * uz * t - uy * s) * x + (uy * uz * t + ux * s) * y + (c + uz * uz * t) * z;
  }
};

void require_finite_angles(const double* tp, std::size_t n, const char* name) {
  require_finite(tp, 2 * n, name);
}

}  // namespace

std::size_t n_params(int lmax) {
  require_lmax(lmax);
  return static_cast<std::size_t>(lmax * lmax + 2 * lmax);
}

void real_harmonics(int lmax, double theta, double phi, double* out) {
  require_lmax(lmax);
  require(std::isfinite(theta) && std::isfinite(phi), "theta and phi must be finite");
  const auto pref = prefactors(lmax);
  std::vector<double> legendre(pref.size());
  evaluate(lmax, pref.data(), theta, phi, legendre.data(), out);
}

void calc_theta_phi(const double* xyz, std::size_t n, double* theta_phi) {
  require_finite(xyz, 3 * n, "xyz");
  for (std::size_t i = 0; i < n; ++i) {
    const double x = xyz[3 * i], y = xyz[3 * i + 1], z = xyz[3 * i + 2];
    theta_phi[2 * i] = std::atan2(std::sqrt(x * x + y * y), z);
    theta_phi[2 * i + 1] = std::fmod(std::atan2(y, x) + 2.0 * kPi, 2.0 * kPi);
  }
}

void calc_lookup_index(const double* theta_phi, std::size_t n, double points_per_degree,
                       std::int64_t* out) {
  require(std::isfinite(points_per_degree) && points_per_degree > 0.0,
          "points_per_degree must be a positive number");
  require_finite_angles(theta_phi, n, "theta_phi");
  const double f = points_per_degree * 180.0 / kPi;
  for (std::size_t i = 0; i < n; ++i) {
    const double theta = theta_phi[2 * i], phi = theta_phi[2 * i + 1];
    if (theta < 0.0 || phi < 0.0)
      throw std::invalid_argument("theta_phi: angles must be >= 0 (row " + std::to_string(i) +
                                  ")");
    out[i] = static_cast<std::int64_t>(360.0 * points_per_degree * std::floor(theta * f) +
                                       std::floor(phi * f));
  }
}

void sph_harm_table(const double* theta_phi0, const double* theta_phi1, std::size_t n,
                    int lmax, double* out) {
  const std::size_t np = n_params(lmax);
  require_finite_angles(theta_phi0, n, "s0_theta_phi");
  require_finite_angles(theta_phi1, n, "s1_theta_phi");
  const auto pref = prefactors(lmax);
  std::vector<double> legendre(pref.size()), y0(np), y1(np);
  for (std::size_t i = 0; i < n; ++i) {
    evaluate(lmax, pref.data(), theta_phi0[2 * i], theta_phi0[2 * i + 1], legendre.data(),
             y0.data());
    evaluate(lmax, pref.data(), theta_phi1[2 * i], theta_phi1[2 * i + 1], legendre.data(),
             y1.data());
    double* row = out + i * np;
    for (std::size_t k = 0; k < np; ++k) row[k] = 0.5 * (y0[k] + y1[k]);
  }
}

std::size_t lookup_table_size(int points_per_degree) {
  require(points_per_degree >= 1 && points_per_degree <= 100,
          "points_per_degree must be between 1 and 100 (got " +
              std::to_string(points_per_degree) + ")");
  const auto ppd = static_cast<std::size_t>(points_per_degree);
  return 360 * 180 * ppd * ppd;
}

LookupFactors sph_harm_lookup_factors(int lmax, int points_per_degree) {
  LookupFactors f;
  f.lmax = lmax;
  f.points_per_degree = points_per_degree;
  f.n_params = n_params(lmax);
  const std::size_t n_items = lookup_table_size(points_per_degree);
  f.n_phi = static_cast<std::size_t>(360 * points_per_degree);
  f.n_theta = n_items / f.n_phi;
  const std::size_t np = f.n_params;
  const double step = kPi / (180.0 * points_per_degree);
  const auto pref = prefactors(lmax);
  const int stride = lmax + 1;
  // θ factors: the prefactor times the Legendre function, as evaluate() forms its base
  f.theta.resize(f.n_theta * np);
  std::vector<double> legendre(pref.size());
  for (std::size_t t = 0; t < f.n_theta; ++t) {
    associated_legendre(lmax, static_cast<double>(t) * step, legendre.data());
    double* row = f.theta.data() + t * np;
    std::size_t k = 0;
    for (int l = 1; l <= lmax; ++l)
      for (int m = -l; m <= l; ++m, ++k) {
        const auto at = static_cast<std::size_t>(l * stride + (m < 0 ? -m : m));
        row[k] = pref[at] * legendre[at];
      }
  }
  // φ factors: evaluate()'s cos(mφ) / sin(|m|φ), and 1 where it takes the base alone
  f.phi.resize(f.n_phi * np);
  for (std::size_t j = 0; j < f.n_phi; ++j) {
    const double phi = static_cast<double>(j) * step;
    double* row = f.phi.data() + j * np;
    std::size_t k = 0;
    for (int l = 1; l <= lmax; ++l)
      for (int m = -l; m <= l; ++m, ++k)
        row[k] = m > 0 ? std::cos(m * phi) : m == 0 ? 1.0 : std::sin(-m * phi);
  }
  return f;
}

void sph_harm_lookup_table(int lmax, int points_per_degree, double* out) {
  const LookupFactors f = sph_harm_lookup_factors(lmax, points_per_degree);
  const std::size_t np = f.n_params;
  for (std::size_t t = 0; t < f.n_theta; ++t) {
    const double* a = f.theta.data() + t * np;
    for (std::size_t j = 0; j < f.n_phi; ++j) {
      const double* b = f.phi.data() + j * np;
      double* row = out + (t * f.n_phi + j) * np;
      for (std::size_t k = 0; k < np; ++k) row[k] = a[k] * b[k];
    }
  }
}

void harmonics_from_lookup(const std::int64_t* i0, const std::int64_t* i1, std::size_t n,
                           const double* table, std::size_t n_rows, std::size_t row_stride,
                           std::size_t n_cols, double* out) {
  require(n_cols <= row_stride, "coefficients table has fewer columns than requested");
  for (std::size_t j = 0; j < n; ++j) {
    require_index(static_cast<std::ptrdiff_t>(i0[j]), n_rows, "s0_selection");
    require_index(static_cast<std::ptrdiff_t>(i1[j]), n_rows, "s1_selection");
  }
  for (std::size_t j = 0; j < n; ++j) {
    const double* a = table + static_cast<std::size_t>(i0[j]) * row_stride;
    const double* b = table + static_cast<std::size_t>(i1[j]) * row_stride;
    double* row = out + j * n_cols;
    for (std::size_t k = 0; k < n_cols; ++k) row[k] = (a[k] + b[k]) / 2.0;
  }
}

void lookup_sh_scales(const std::int32_t* i0, const std::int32_t* i1, std::size_t n,
                      const double* table, std::size_t n_rows, std::size_t row_stride,
                      std::size_t n_cols, const double* coef, double* scales) {
  require(n_cols <= row_stride, "coefficients table has fewer columns than requested");
  for (std::size_t j = 0; j < n; ++j) {
    require_index(i0[j], n_rows, "s0_lookup");
    require_index(i1[j], n_rows, "s1_lookup");
  }
  // Whole-grid surface when it is cheaper than n direct row reads (2·n_cols per reflection).
  if (n_rows < 2 * n) {
    std::vector<double> surface(n_rows);
    for (std::size_t r = 0; r < n_rows; ++r) {
      const double* row = table + r * row_stride;
      double acc = 0.0;
      for (std::size_t k = 0; k < n_cols; ++k) acc += row[k] * coef[k];
      surface[r] = acc;
    }
    for (std::size_t j = 0; j < n; ++j)
      scales[j] = 1.0 + (surface[static_cast<std::size_t>(i0[j])] +
                         surface[static_cast<std::size_t>(i1[j])]) / 2.0;
    return;
  }
  for (std::size_t j = 0; j < n; ++j) {
    const double* a = table + static_cast<std::size_t>(i0[j]) * row_stride;
    const double* b = table + static_cast<std::size_t>(i1[j]) * row_stride;
    double acc = 1.0;
    for (std::size_t k = 0; k < n_cols; ++k) acc += ((a[k] + b[k]) / 2.0) * coef[k];
    scales[j] = acc;
  }
}

void rotate_vectors_about_axis(const double axis[3], const double* vectors,
                               const double* angles, std::size_t n, double* out) {
  require_finite(vectors, 3 * n, "vectors");
  require_finite(angles, n, "angles");
  Rodrigues rotation(axis, "rot_axis");
  for (std::size_t i = 0; i < n; ++i) {
    // sin and cos only when the angle changes: a constant angle (align_axis_along_z) or runs
    // of equal scan angles cost one pair, with bit-identical results
    if (i == 0 || !(angles[i] == angles[i - 1])) rotation.set_angle(angles[i]);
    rotation.apply(vectors + 3 * i, out + 3 * i);
  }
}

namespace {

/// v·M for a row-major 3 × 3 M (numpy's ``v @ M``), summed left to right.
inline void row_times(const double v[3], const double* m, double out[3]) {
  for (int j = 0; j < 3; ++j) out[j] = v[0] * m[j] + v[1] * m[3 + j] + v[2] * m[6 + j];
}

/// The per-sweep constants of an AbsorptionFrame, validated once.
struct FrameMap {
  Rodrigues scan;       // about the rotation axis; angle −φ per reflection
  Rodrigues alignment;  // the fixed alignment rotation (angle set once)
  bool align = false;
  double u0[3];         // Sᵀ·u0
  const double* fixed;
  const double* setting;

  explicit FrameMap(const AbsorptionFrame& f)
      : scan(f.rotation_axis, "rotation axis"),
        alignment(alignment_rotation_axis(f).data(), "alignment rotation axis"),
        fixed(f.fixed_rotation), setting(f.setting_rotation) {
    require_finite(f.fixed_rotation, 9, "fixed rotation");
    require_finite(f.setting_rotation, 9, "setting rotation");
    require_finite(f.sample_to_source, 3, "sample-to-source direction");
    const double* a = f.align_axis;
    const double norm = std::sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2]);
    require(norm > 0.0, "the alignment axis must be non-zero");
    align = !(a[0] == 0.0 && a[1] == 0.0 && a[2] > 0.0);
    if (align) alignment.set_angle(std::acos(a[2] / norm));
    // Sᵀ·u0 (numpy's S.T @ u0): component j is Σ_k S[k][j]·u0[k]
    row_times(f.sample_to_source, setting, u0);
  }

  /// The rotation axis of the alignment: (a_y, −a_x, 0), or x when a is along ±z.
  static std::array<double, 3> alignment_rotation_axis(const AbsorptionFrame& f) {
    require_finite(f.align_axis, 3, "alignment axis");
    std::array<double, 3> axis{f.align_axis[1], -f.align_axis[0], 0.0};
    if (axis[0] == 0.0 && axis[1] == 0.0) axis[0] = 1.0;
    return axis;
  }

  /// s0c and s1c of one reflection; the scan rotation's angle must already be −φ.
  void map(const double* s1, double s0c[3], double s1c[3]) const {
    const double norm = std::sqrt(s1[0] * s1[0] + s1[1] * s1[1] + s1[2] * s1[2]);
    double unit[3] = {0.0, 0.0, 0.0};
    if (norm > 0.0)
      for (int k = 0; k < 3; ++k) unit[k] = s1[k] / norm;
    double in_setting[3], rotated[3];
    row_times(unit, setting, in_setting);
    scan.apply(in_setting, rotated);
    finish(rotated, s1c);
    scan.apply(u0, rotated);
    finish(rotated, s0c);
  }

  void finish(const double rotated[3], double out[3]) const {
    if (!align) {
      row_times(rotated, fixed, out);
      return;
    }
    double in_crystal[3];
    row_times(rotated, fixed, in_crystal);
    alignment.apply(in_crystal, out);
  }
};

/// calc_theta_phi then calc_lookup_index of one vector, θ = π mapped to the last θ row.
inline std::int64_t lookup_index(const double v[3], double ppd, double to_grid,
                                 std::int64_t n_grid) {
  const double x = v[0], y = v[1], z = v[2];
  const double theta = std::atan2(std::sqrt(x * x + y * y), z);
  const double phi = std::fmod(std::atan2(y, x) + 2.0 * kPi, 2.0 * kPi);
  auto index = static_cast<std::int64_t>(360.0 * ppd * std::floor(theta * to_grid) +
                                         std::floor(phi * to_grid));
  if (index >= n_grid) index -= static_cast<std::int64_t>(360.0 * ppd);
  return index;
}

/// atan(a) for a in [0, 1] by a fitted odd polynomial (least squares in a² on Chebyshev
/// nodes); |error| < 4.4e-8 rad (a scan of 2·10⁷ points of [0, 1] finds 4.31e-8).
inline double atan_of_unit(double a) {
  constexpr double c[8] = {0.99999924908801774,  -0.33329538038522993, 0.19943081188140169,
                           -0.1389204120085013,  0.096016563952608353, -0.055381697869513968,
                           0.021509254242404473, -0.0039602572330118858};
  const double u = a * a;
  double r = c[7];
  for (int k = 6; k >= 0; --k) r = c[k] + u * r;
  return a * r;
}

/// atan2(y, x) to within kApproxAtanError (range reduction onto [0, 1], then atan_of_unit).
inline double approx_atan2(double y, double x) {
  const double ax = std::abs(x), ay = std::abs(y);
  const double big = std::max(ax, ay), small = std::min(ax, ay);
  double r = big > 0.0 ? atan_of_unit(small / big) : 0.0;
  if (ay > ax) r = 0.5 * kPi - r;
  if (x < 0.0) r = kPi - r;
  return y < 0.0 ? -r : r;
}

/// A bound on approx_atan2's error (rad), with a wide margin over the polynomial's 4.4e-8
/// and the range reduction's few ulps.
constexpr double kApproxAtanError = 1e-6;

/// lookup_index with polynomial angles: exactly lookup_index's result, because a grid
/// coordinate that lies within the approximation's error of a grid line (where the two
/// could round apart) is recomputed with std::atan2 (about 2e-4 of directions at 2 points
/// per degree). The two atan2 calls are most of this kernel's time.
inline std::int64_t lookup_index_fast(const double v[3], double ppd, double to_grid, std::int64_t n_grid) {
  const double x = v[0], y = v[1], z = v[2];
  const double theta = approx_atan2(std::sqrt(x * x + y * y), z);
  double phi = approx_atan2(y, x);
  if (phi < 0.0) phi += 2.0 * kPi;
  // both coordinates are ≥ 0, so truncation is floor (and needs no libm call)
  const double t_theta = theta * to_grid, t_phi = phi * to_grid;
  const auto row = static_cast<std::int64_t>(t_theta), column = static_cast<std::int64_t>(t_phi);
  const double f_theta = t_theta - static_cast<double>(row), f_phi = t_phi - static_cast<double>(column);
  const double margin = kApproxAtanError * to_grid + 1e-9;
  if (f_theta < margin || f_theta > 1.0 - margin || f_phi < margin || f_phi > 1.0 - margin)
    return lookup_index(v, ppd, to_grid, n_grid);
  auto index = static_cast<std::int64_t>(360.0 * ppd) * row + column;
  if (index >= n_grid) index -= static_cast<std::int64_t>(360.0 * ppd);
  return index;
}

#if defined(__SSE2__)
/// approx_atan2 of two lanes at once: the same operations, each branch a lane-wise select.
inline __m128d approx_atan2_pair(__m128d y, __m128d x) {
  const __m128d sign_bit = _mm_set1_pd(-0.0), zero = _mm_setzero_pd();
  const __m128d ax = _mm_andnot_pd(sign_bit, x), ay = _mm_andnot_pd(sign_bit, y);
  const __m128d big = _mm_max_pd(ax, ay), small = _mm_min_pd(ax, ay);
  // atan_of_unit(small / big) where big > 0 (else 0; the quotient of that lane is unused)
  constexpr double c[8] = {0.99999924908801774,  -0.33329538038522993, 0.19943081188140169,
                           -0.1389204120085013,  0.096016563952608353, -0.055381697869513968,
                           0.021509254242404473, -0.0039602572330118858};
  const __m128d a = _mm_div_pd(small, big);
  // the polynomial in u = a² by Estrin's scheme (pairs, then pairs of pairs): a chain of 4
  // multiply-adds instead of Horner's 7; its rounding differs from atan_of_unit's by a few
  // ulp, far inside kApproxAtanError, so the lanes find the same grid cells
  const __m128d u = _mm_mul_pd(a, a), u2 = _mm_mul_pd(u, u), u4 = _mm_mul_pd(u2, u2);
  const auto pair = [&](int k) { return _mm_add_pd(_mm_set1_pd(c[k]), _mm_mul_pd(_mm_set1_pd(c[k + 1]), u)); };
  const __m128d low = _mm_add_pd(pair(0), _mm_mul_pd(pair(2), u2));
  const __m128d high = _mm_add_pd(pair(4), _mm_mul_pd(pair(6), u2));
  __m128d r = _mm_add_pd(low, _mm_mul_pd(high, u4));
  r = _mm_and_pd(_mm_mul_pd(a, r), _mm_cmpgt_pd(big, zero));
  const auto select = [](__m128d mask, __m128d when, __m128d otherwise) {
    return _mm_or_pd(_mm_and_pd(mask, when), _mm_andnot_pd(mask, otherwise));
  };
  r = select(_mm_cmpgt_pd(ay, ax), _mm_sub_pd(_mm_set1_pd(0.5 * kPi), r), r);
  r = select(_mm_cmplt_pd(x, zero), _mm_sub_pd(_mm_set1_pd(kPi), r), r);
  return select(_mm_cmplt_pd(y, zero), _mm_xor_pd(r, sign_bit), r);
}
#endif

/// lookup_index_fast of two vectors (@p a to @p ia, @p b to @p ib): with SSE2 both in the
/// lanes of one pass (the two directions of a reflection; 77 → 65 ns per reflection for the
/// absorption lookup indices), each lane's angles those of approx_atan2 to a few ulp, and a
/// lane whose grid coordinate lies within the margin of a grid line recomputed by
/// lookup_index, as lookup_index_fast does: the indices are lookup_index's, exactly.
inline void lookup_index_pair(const double a[3], const double b[3], double ppd, double to_grid, std::int64_t n_grid,
                              std::int64_t& ia, std::int64_t& ib) {
#if defined(__SSE2__)
  const __m128d x = _mm_set_pd(b[0], a[0]), y = _mm_set_pd(b[1], a[1]), z = _mm_set_pd(b[2], a[2]);
  const __m128d theta = approx_atan2_pair(_mm_sqrt_pd(_mm_add_pd(_mm_mul_pd(x, x), _mm_mul_pd(y, y))), z);
  __m128d phi = approx_atan2_pair(y, x);
  phi = _mm_add_pd(phi, _mm_and_pd(_mm_cmplt_pd(phi, _mm_setzero_pd()), _mm_set1_pd(2.0 * kPi)));
  const __m128d grid = _mm_set1_pd(to_grid);
  const __m128d t_theta = _mm_mul_pd(theta, grid), t_phi = _mm_mul_pd(phi, grid);
  // both coordinates are in [0, 360·ppd]: truncation to int32 is floor
  const __m128i row = _mm_cvttpd_epi32(t_theta), column = _mm_cvttpd_epi32(t_phi);
  const __m128d f_theta = _mm_sub_pd(t_theta, _mm_cvtepi32_pd(row));
  const __m128d f_phi = _mm_sub_pd(t_phi, _mm_cvtepi32_pd(column));
  const double m = kApproxAtanError * to_grid + 1e-9;
  const __m128d margin = _mm_set1_pd(m), upper = _mm_set1_pd(1.0 - m);
  const int near_line = _mm_movemask_pd(_mm_or_pd(_mm_or_pd(_mm_cmplt_pd(f_theta, margin), _mm_cmpgt_pd(f_theta, upper)),
                                                  _mm_or_pd(_mm_cmplt_pd(f_phi, margin), _mm_cmpgt_pd(f_phi, upper))));
  alignas(16) std::int32_t rows[4], columns[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(rows), row);
  _mm_store_si128(reinterpret_cast<__m128i*>(columns), column);
  const auto width = static_cast<std::int64_t>(360.0 * ppd);
  const auto index = [&](int lane) {
    std::int64_t i = width * rows[lane] + columns[lane];
    return i >= n_grid ? i - width : i;
  };
  ia = (near_line & 1) ? lookup_index(a, ppd, to_grid, n_grid) : index(0);
  ib = (near_line & 2) ? lookup_index(b, ppd, to_grid, n_grid) : index(1);
#else
  ia = lookup_index_fast(a, ppd, to_grid, n_grid);
  ib = lookup_index_fast(b, ppd, to_grid, n_grid);
#endif
}

constexpr std::size_t kFrameChunk = std::size_t{1} << 14;

}  // namespace

void absorption_frame_vectors(const AbsorptionFrame& frame, const double* s1, const double* phi,
                              std::size_t n, double* s0c, double* s1c) {
  require_finite(s1, 3 * n, "s1");
  require_finite(phi, n, "scan angles");
  FrameMap map(frame);
  for (std::size_t i = 0; i < n; ++i) {
    if (i == 0 || !(phi[i] == phi[i - 1])) map.scan.set_angle(-phi[i]);
    map.map(s1 + 3 * i, s0c + 3 * i, s1c + 3 * i);
  }
}

void grid_lookup_indices(const double* xyz, std::size_t n, int points_per_degree, std::int64_t* out) {
  require(points_per_degree > 0, "points_per_degree must be positive");
  require_finite(xyz, 3 * n, "xyz");
  const double ppd = static_cast<double>(points_per_degree);
  const double to_grid = ppd * 180.0 / kPi;
  const auto n_grid = static_cast<std::int64_t>(lookup_table_size(points_per_degree));
  for (std::size_t i = 0; i < n; ++i) out[i] = lookup_index_fast(xyz + 3 * i, ppd, to_grid, n_grid);
}

void absorption_lookup_indices(const AbsorptionFrame& frame, const double* s1, const double* phi,
                               std::size_t n, int points_per_degree, std::int64_t* s0_index,
                               std::int64_t* s1_index, int n_threads) {
  require(points_per_degree > 0, "points_per_degree must be positive");
  require_finite(s1, 3 * n, "s1");
  require_finite(phi, n, "scan angles");
  const FrameMap shared(frame);
  const double ppd = static_cast<double>(points_per_degree);
  const double to_grid = ppd * 180.0 / kPi;
  const auto n_grid = static_cast<std::int64_t>(lookup_table_size(points_per_degree));
  const std::size_t n_chunks = (n + kFrameChunk - 1) / kFrameChunk;
  fit::detail::parallel_for(n_chunks, n_threads, [&](std::size_t c) {
    FrameMap map = shared;  // each chunk rotates with its own angle state
    const std::size_t first = c * kFrameChunk, last = std::min(n, first + kFrameChunk);
    double v0[3], v1[3];
    for (std::size_t i = first; i < last; ++i) {
      if (i == first || !(phi[i] == phi[i - 1])) map.scan.set_angle(-phi[i]);
      map.map(s1 + 3 * i, v0, v1);
      lookup_index_pair(v0, v1, ppd, to_grid, n_grid, s0_index[i], s1_index[i]);
    }
  });
}

}  // namespace xtalscale::harmonics
