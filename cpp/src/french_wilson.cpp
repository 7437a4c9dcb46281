// French & Wilson posterior moments by numerical integration (see french_wilson.hpp).
//
// Integrating in u = √z makes both posteriors smooth: dz = 2u du turns the centric z^(-1/2)
// singularity into a constant and the acentric density into u·exp(..). The nodes are placed as
// offsets δ = u - √h from the peak (for h > 0), so that z - h = δ(2√h + δ) keeps full precision
// for large h, where the posterior is narrow.
#include "xtalscale/french_wilson.hpp"

#include <array>
#include <cmath>
#include <limits>

namespace xtalscale {
namespace {

constexpr int kNodes = 16;   // Gauss–Legendre nodes per panel
constexpr int kPanels = 8;   // panels over the integration range
constexpr int kPoints = kNodes * kPanels;
// Half-width of the range in z - h: the Gaussian factor falls below e^-50 outside it.
constexpr double kHalfWidth = 10.0;

struct GaussLegendre {
  std::array<double, kNodes> x{};  // nodes on [0, 1]
  std::array<double, kNodes> w{};  // weights on [0, 1]
};

// Nodes and weights of the kNodes-point rule: Newton iteration on the Legendre polynomial.
GaussLegendre make_rule() {
  GaussLegendre rule;
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < kNodes; ++i) {
    double x = std::cos(pi * (i + 0.75) / (kNodes + 0.5));
    double derivative = 1.0;
    for (int iteration = 0; iteration < 100; ++iteration) {
      double p0 = 1.0, p1 = x;
      for (int k = 2; k <= kNodes; ++k) {
        const double p2 = ((2.0 * k - 1.0) * x * p1 - (k - 1.0) * p0) / k;
        p0 = p1;
        p1 = p2;
      }
      derivative = kNodes * (x * p1 - p0) / (x * x - 1.0);
      const double step = p1 / derivative;
      x -= step;
      if (std::abs(step) < 1e-15) break;
    }
    rule.x[static_cast<std::size_t>(i)] = 0.5 * (1.0 - x);
    rule.w[static_cast<std::size_t>(i)] = 1.0 / ((1.0 - x * x) * derivative * derivative);
  }
  return rule;
}

const GaussLegendre& rule() {
  static const GaussLegendre r = make_rule();
  return r;
}

}  // namespace

FrenchWilsonMoments french_wilson_moments(double h, bool centric) {
  const GaussLegendre& gl = rule();
  const double sqrt_h = h > 0.0 ? std::sqrt(h) : 0.0;
  // The range in z - h where the Gaussian factor exceeds e^-50 of its peak.
  const double top = std::sqrt((h < 0.0 ? h * h : 0.0) + kHalfWidth * kHalfWidth);
  const double u_max = std::sqrt(h + top);
  const double z_min = h > kHalfWidth ? h - kHalfWidth : 0.0;
  const double u_min = std::sqrt(z_min);
  // δ = u - √h at the ends, written without cancellation.
  const double delta_lo = h > 0.0 ? (z_min - h) / (u_min + sqrt_h) : 0.0;
  const double delta_hi = h > 0.0 ? top / (u_max + sqrt_h) : u_max;
  const double z_offset = h > 0.0 ? 0.0 : -h;  // z - h = δ(2√h + δ) + z_offset
  const double peak = h < 0.0 ? 0.5 * h * h : 0.0;
  const double panel = (delta_hi - delta_lo) / kPanels;

  std::array<double, kPoints> delta{}, dz{}, weight{};
  double m0 = 0.0, m_delta = 0.0, m_dz = 0.0;
  for (int p = 0; p < kPanels; ++p) {
    for (int i = 0; i < kNodes; ++i) {
      const auto k = static_cast<std::size_t>(p * kNodes + i);
      const double d = delta_lo + panel * (p + gl.x[static_cast<std::size_t>(i)]);
      const double z_minus_h = d * (2.0 * sqrt_h + d) + z_offset;
      double w = gl.w[static_cast<std::size_t>(i)] * std::exp(peak - 0.5 * z_minus_h * z_minus_h);
      if (!centric) w *= sqrt_h + d;  // acentric: the Jacobian 2u is not cancelled
      delta[k] = d;
      dz[k] = z_minus_h;
      weight[k] = w;
      m0 += w;
      m_delta += w * d;
      m_dz += w * z_minus_h;
    }
  }
  m_delta /= m0;
  m_dz /= m0;
  double var_delta = 0.0, var_dz = 0.0;
  for (std::size_t k = 0; k < static_cast<std::size_t>(kPoints); ++k) {
    const double a = delta[k] - m_delta, b = dz[k] - m_dz;
    var_delta += weight[k] * a * a;
    var_dz += weight[k] * b * b;
  }
  FrenchWilsonMoments out;
  out.f = sqrt_h + m_delta;
  out.sig_f = std::sqrt(var_delta / m0);
  out.j = h + m_dz;
  out.sig_j = std::sqrt(var_dz / m0);
  return out;
}

void french_wilson(const double* intensity, const double* sigma, const double* expected,
                   const std::uint8_t* centric, std::size_t n, double h_min, double* j,
                   double* sig_j, double* f, double* sig_f, std::uint8_t* valid) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (std::size_t r = 0; r < n; ++r) {
    const double i_obs = intensity[r], s = sigma[r], prior = std::abs(expected[r]);
    j[r] = sig_j[r] = f[r] = sig_f[r] = nan;
    valid[r] = 0;
    if (!std::isfinite(i_obs) || !std::isfinite(s) || !(s > 0.0) || std::isnan(prior) ||
        prior == 0.0)
      continue;
    const double i_over_sigma = i_obs / s;
    const double prior_term = std::isinf(prior) ? 0.0 : s / prior;
    const double h = i_over_sigma - (centric[r] ? 0.5 * prior_term : prior_term);
    if (i_over_sigma < h_min + 0.3 || h < h_min) continue;
    const FrenchWilsonMoments m = french_wilson_moments(h, centric[r] != 0);
    const double root_s = std::sqrt(s);
    j[r] = m.j * s;
    sig_j[r] = m.sig_j * s;
    f[r] = m.f * root_s;
    sig_f[r] = m.sig_f * root_s;
    valid[r] = 1;
  }
}

}  // namespace xtalscale
