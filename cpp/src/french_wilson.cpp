// French & Wilson posterior moments by numerical integration (see french_wilson.hpp).
//
// Integrating in u = √z makes both posteriors smooth: dz = 2u du turns the centric z^(-1/2)
// singularity into a constant and the acentric density into u·exp(..). The nodes are placed as
// offsets δ = u - √h from the peak (for h > 0), so that z - h = δ(2√h + δ) keeps full precision
// for large h, where the posterior is narrow.
#include "xtalscale/french_wilson.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "xtalscale/smoother.hpp"  // exp_bounded
#include "fit_parallel.hpp"
#include "internal/kernel_support.hpp"  // simd_level

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#endif

namespace xtalscale {
namespace {

constexpr int kNodes = 16;   // Gauss–Legendre nodes per panel
constexpr int kPanels = 4;   // panels over the integration range
constexpr int kPoints = kNodes * kPanels;
// Half-width of the range in z - h: the Gaussian factor falls below e^-50 outside it. With
// 64 points the moments agree with a 512-point rule to ~3e-11 relative (measured over
// -4 <= h <= 1e6, bench/bench_merge_report.py's reference).
constexpr double kHalfWidth = 10.0;

/// The composite rule on [0, 1]: nodes and weights of all panels, in order.
struct CompositeRule {
  std::array<double, kPoints> t{};
  std::array<double, kPoints> w{};
};

// Gauss–Legendre nodes by Newton iteration on the Legendre polynomial, then tiled over panels.
CompositeRule make_rule() {
  std::array<double, kNodes> x{}, w{};
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < kNodes; ++i) {
    double xi = std::cos(pi * (i + 0.75) / (kNodes + 0.5));
    double derivative = 1.0;
    for (int iteration = 0; iteration < 100; ++iteration) {
      double p0 = 1.0, p1 = xi;
      for (int k = 2; k <= kNodes; ++k) {
        const double p2 = ((2.0 * k - 1.0) * xi * p1 - (k - 1.0) * p0) / k;
        p0 = p1;
        p1 = p2;
      }
      derivative = kNodes * (xi * p1 - p0) / (xi * xi - 1.0);
      const double step = p1 / derivative;
      xi -= step;
      if (std::abs(step) < 1e-15) break;
    }
    x[static_cast<std::size_t>(i)] = 0.5 * (1.0 - xi);
    w[static_cast<std::size_t>(i)] = 1.0 / ((1.0 - xi * xi) * derivative * derivative);
  }
  CompositeRule rule;
  for (int p = 0; p < kPanels; ++p) {
    for (int i = 0; i < kNodes; ++i) {
      const auto k = static_cast<std::size_t>(p * kNodes + i);
      rule.t[k] = (p + x[static_cast<std::size_t>(i)]) / kPanels;
      rule.w[k] = w[static_cast<std::size_t>(i)] / kPanels;
    }
  }
  return rule;
}

const CompositeRule& rule() {
  static const CompositeRule r = make_rule();
  return r;
}

/// The integration range of one h: nodes d = delta_lo + span·t_k (δ = u − √h), z − h =
/// d(2√h + d) + z_offset, and the exponent's shift peak (so that it lies in [−50, 0]).
struct Range {
  double sqrt_h, delta_lo, span, z_offset, peak;
};

Range range_of(double h) {
  const double sqrt_h = h > 0.0 ? std::sqrt(h) : 0.0;
  const double top = std::sqrt((h < 0.0 ? h * h : 0.0) + kHalfWidth * kHalfWidth);
  const double u_max = std::sqrt(h + top);
  const double z_min = h > kHalfWidth ? h - kHalfWidth : 0.0;
  const double u_min = std::sqrt(z_min);
  // δ = u - √h at the ends, written without cancellation.
  const double delta_lo = h > 0.0 ? (z_min - h) / (u_min + sqrt_h) : 0.0;
  const double delta_hi = h > 0.0 ? top / (u_max + sqrt_h) : u_max;
  return {sqrt_h, delta_lo, delta_hi - delta_lo, h > 0.0 ? 0.0 : -h, h < 0.0 ? 0.5 * h * h : 0.0};
}

/// The raw moments Σw, Σwδ, Σwδ², Σw(z−h), Σw(z−h)² of one h over the rule's nodes.
struct RawMoments {
  double m0 = 0.0, s_d = 0.0, s_dd = 0.0, s_z = 0.0, s_zz = 0.0;
};

/// The posterior moments of @p h from its raw moments.
FrenchWilsonMoments moments_of(double h, double sqrt_h, const RawMoments& m) {
  const double mean_d = m.s_d / m.m0, mean_z = m.s_z / m.m0;
  FrenchWilsonMoments out;
  out.f = sqrt_h + mean_d;
  out.sig_f = std::sqrt(std::max(m.s_dd / m.m0 - mean_d * mean_d, 0.0));
  out.j = h + mean_z;
  out.sig_j = std::sqrt(std::max(m.s_zz / m.m0 - mean_z * mean_z, 0.0));
  return out;
}

// Raw moments of δ and z - h in one pass. The acentric density carries the factor u = √h + δ
// (the Jacobian 2u is not cancelled); every exponent lies in [-50, 0], exp_bounded's range.
template <bool Centric>
FrenchWilsonMoments integrate(double h) {
  const CompositeRule& r = rule();
  const Range g = range_of(h);
  RawMoments m;
  for (std::size_t k = 0; k < static_cast<std::size_t>(kPoints); ++k) {
    const double d = g.delta_lo + g.span * r.t[k];
    const double z = d * (2.0 * g.sqrt_h + d) + g.z_offset;
    double w = r.w[k] * exp_bounded(g.peak - 0.5 * z * z);
    if constexpr (!Centric) w *= g.sqrt_h + d;
    m.m0 += w;
    m.s_d += w * d;
    m.s_dd += w * d * d;
    m.s_z += w * z;
    m.s_zz += w * z * z;
  }
  return moments_of(h, g.sqrt_h, m);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define XS_FW_SIMD 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
/// integrate() of eight values of h at once, one per lane (@p centric: a lane mask), into
/// @p out: every lane takes exactly the scalar operations in the same order (this file is
/// compiled with -ffp-contract=off, so no multiply-add is fused, as in the baseline scalar
/// build; exp_bounded written out the same way): the same bits as eight calls of integrate().
__attribute__((target("avx512f"))) void integrate8(const double* h, unsigned centric,
                                                    FrenchWilsonMoments* out) {
  const CompositeRule& r = rule();
  alignas(64) double sqrt_h[8], delta_lo[8], span[8], z_offset[8], peak[8];
  for (int l = 0; l < 8; ++l) {
    const Range g = range_of(h[l]);
    sqrt_h[l] = g.sqrt_h;
    delta_lo[l] = g.delta_lo;
    span[l] = g.span;
    z_offset[l] = g.z_offset;
    peak[l] = g.peak;
  }
  const __m512d vs = _mm512_load_pd(sqrt_h), vlo = _mm512_load_pd(delta_lo),
                vspan = _mm512_load_pd(span), voff = _mm512_load_pd(z_offset),
                vpeak = _mm512_load_pd(peak);
  const __m512d two_sqrt_h = _mm512_mul_pd(_mm512_set1_pd(2.0), vs);
  const __mmask8 acentric = static_cast<__mmask8>(~centric);
  __m512d m0 = _mm512_setzero_pd(), s_d = m0, s_dd = m0, s_z = m0, s_zz = m0;
  for (std::size_t k = 0; k < static_cast<std::size_t>(kPoints); ++k) {
    const __m512d d = _mm512_add_pd(vlo, _mm512_mul_pd(vspan, _mm512_set1_pd(r.t[k])));
    const __m512d z = _mm512_add_pd(_mm512_mul_pd(d, _mm512_add_pd(two_sqrt_h, d)), voff);
    const __m512d x = _mm512_sub_pd(vpeak, _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(0.5), z), z));
    // exp_bounded(x), its baseline operations
    const __m512d t = _mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(detail::kLog2e)),
                                    _mm512_set1_pd(detail::kRoundShifter));
    const __m512d kd = _mm512_sub_pd(t, _mm512_set1_pd(detail::kRoundShifter));
    const __m512d hi = _mm512_mul_pd(kd, _mm512_set1_pd(detail::kLn2Hi));
    const __m512d lo = _mm512_mul_pd(kd, _mm512_set1_pd(detail::kLn2Lo));
    const __m512d red = _mm512_sub_pd(_mm512_sub_pd(x, hi), lo);
    __m512d p = _mm512_set1_pd(detail::kExpPoly[0]);
    for (std::size_t c = 1; c < std::size(detail::kExpPoly); ++c)
      p = _mm512_add_pd(_mm512_mul_pd(p, red), _mm512_set1_pd(detail::kExpPoly[c]));
    const __m512i scale = _mm512_slli_epi64(
        _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023)), 52);
    __m512d w = _mm512_mul_pd(_mm512_set1_pd(r.w[k]), _mm512_mul_pd(p, _mm512_castsi512_pd(scale)));
    w = _mm512_mask_mul_pd(w, acentric, w, _mm512_add_pd(vs, d));  // acentric lanes: × (√h + δ)
    m0 = _mm512_add_pd(m0, w);
    const __m512d wd = _mm512_mul_pd(w, d), wz = _mm512_mul_pd(w, z);
    s_d = _mm512_add_pd(s_d, wd);
    s_dd = _mm512_add_pd(s_dd, _mm512_mul_pd(wd, d));
    s_z = _mm512_add_pd(s_z, wz);
    s_zz = _mm512_add_pd(s_zz, _mm512_mul_pd(wz, z));
  }
  alignas(64) double a0[8], ad[8], add[8], az[8], azz[8];
  _mm512_store_pd(a0, m0);
  _mm512_store_pd(ad, s_d);
  _mm512_store_pd(add, s_dd);
  _mm512_store_pd(az, s_z);
  _mm512_store_pd(azz, s_zz);
  for (int l = 0; l < 8; ++l)
    out[l] = moments_of(h[l], sqrt_h[l], {a0[l], ad[l], add[l], az[l], azz[l]});
}
#pragma GCC diagnostic pop
#endif

}  // namespace

FrenchWilsonMoments french_wilson_moments(double h, bool centric) {
  return centric ? integrate<true>(h) : integrate<false>(h);
}

namespace {

/// The standardised intensity h of row @p r, or NaN when the row is rejected (σ ≤ 0,
/// non-finite input, Σ = 0 or the h_min rejection).
double standardised(const double* intensity, const double* sigma, const double* expected,
                    const std::uint8_t* centric, std::size_t r, double h_min) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double i_obs = intensity[r], s = sigma[r], prior = std::abs(expected[r]);
  if (!std::isfinite(i_obs) || !std::isfinite(s) || !(s > 0.0) || std::isnan(prior) ||
      prior == 0.0)
    return nan;
  const double i_over_sigma = i_obs / s;
  const double prior_term = std::isinf(prior) ? 0.0 : s / prior;
  const double h = i_over_sigma - (centric[r] ? 0.5 * prior_term : prior_term);
  if (i_over_sigma < h_min + 0.3 || h < h_min) return nan;
  return h;
}

/// The outputs of row @p r from its moments m (units of σ and √σ).
void store_row(const FrenchWilsonMoments& m, double s, std::size_t r, double* j, double* sig_j,
               double* f, double* sig_f, std::uint8_t* valid) {
  const double root_s = std::sqrt(s);
  j[r] = m.j * s;
  sig_j[r] = m.sig_j * s;
  f[r] = m.f * root_s;
  sig_f[r] = m.sig_f * root_s;
  valid[r] = 1;
}

/// Rows [first, last) of french_wilson(): rejected rows NaN and invalid; the others' moments
/// one row at a time, or (AVX-512) eight rows at a time, the same bits.
void french_wilson_rows(const double* intensity, const double* sigma, const double* expected,
                        const std::uint8_t* centric, std::size_t first, std::size_t last,
                        double h_min, double* j, double* sig_j, double* f, double* sig_f,
                        std::uint8_t* valid) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::size_t rows[8];
  double hs[8];
  unsigned centric_lanes = 0;
  int filled = 0;
#ifdef XS_FW_SIMD
  const bool lanes = xtalscale::detail::simd_level() >= 2;
#else
  const bool lanes = false;
#endif
  for (std::size_t r = first; r < last; ++r) {
    j[r] = sig_j[r] = f[r] = sig_f[r] = nan;
    valid[r] = 0;
    const double h = standardised(intensity, sigma, expected, centric, r, h_min);
    if (std::isnan(h)) continue;
    if (!lanes) {
      store_row(french_wilson_moments(h, centric[r] != 0), sigma[r], r, j, sig_j, f, sig_f, valid);
      continue;
    }
    rows[filled] = r;
    hs[filled] = h;
    if (centric[r]) centric_lanes |= 1u << filled;
    if (++filled < 8) continue;
#ifdef XS_FW_SIMD
    FrenchWilsonMoments moments[8];
    integrate8(hs, centric_lanes, moments);
    for (int l = 0; l < 8; ++l)
      store_row(moments[l], sigma[rows[l]], rows[l], j, sig_j, f, sig_f, valid);
#endif
    filled = 0;
    centric_lanes = 0;
  }
  for (int l = 0; l < filled; ++l)  // the last few rows one at a time
    store_row(french_wilson_moments(hs[l], centric[rows[l]] != 0), sigma[rows[l]], rows[l], j,
              sig_j, f, sig_f, valid);
}

}  // namespace

void french_wilson(const double* intensity, const double* sigma, const double* expected,
                   const std::uint8_t* centric, std::size_t n, double h_min, double* j,
                   double* sig_j, double* f, double* sig_f, std::uint8_t* valid, int n_threads) {
  // ~0.6 µs per row (the 64-point quadrature): blocks of 2048 rows are ~1 ms of work each
  constexpr std::size_t kBlockRows = 2048;
  const std::size_t n_blocks = (n + kBlockRows - 1) / kBlockRows;
  fit::detail::parallel_for(n_blocks, n_threads, [&](std::size_t b) {
    const std::size_t first = b * kBlockRows;
    french_wilson_rows(intensity, sigma, expected, centric, first, std::min(n, first + kBlockRows),
                       h_min, j, sig_j, f, sig_f, valid);
  });
}

}  // namespace xtalscale
