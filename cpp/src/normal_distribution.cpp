// Normal quantile and cumulative distribution (see normal_distribution.hpp).
#include "xtalscale/normal_distribution.hpp"

#include <cmath>
#include <limits>

namespace xtalscale::special {

namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;       // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/√(2π)

/// A&S 26.2.23: the upper-tail quantile x with Q(x) = q, for 0 < q <= 0.5 (|error| < 4.5e-4).
double upper_tail_start(double q) {
  const double t = std::sqrt(-2.0 * std::log(q));
  return t - (2.515517 + t * (0.802853 + t * 0.010328)) /
                 (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)));
}

}  // namespace

double normal_quantile(double p) noexcept {
  if (!(p >= 0.0 && p <= 1.0)) return std::numeric_limits<double>::quiet_NaN();
  if (p == 0.0) return -std::numeric_limits<double>::infinity();
  if (p == 1.0) return std::numeric_limits<double>::infinity();
  const bool central = p >= 0.25 && p <= 0.75;
  const bool upper = p > 0.5;
  const double tail = upper ? 1.0 - p : p;  // exact for p >= 0.5 (Sterbenz)
  const double centred = p - 0.5;            // exact in the central region
  double x = upper_tail_start(tail);
  if (!upper) x = -x;
  for (int step = 0; step < 3; ++step) {
    // Residual Φ(x) − p, formed without cancellation of its leading digits.
    double r;
    if (central)
      r = 0.5 * std::erf(x * kSqrt1_2) - centred;
    else if (upper)
      r = tail - 0.5 * std::erfc(x * kSqrt1_2);  // Φ(x) − p = (1 − p) − Q(x)
    else
      r = 0.5 * std::erfc(-x * kSqrt1_2) - tail;
    const double density = kInvSqrt2Pi * std::exp(-0.5 * x * x);
    if (!(density > 0.0)) break;  // beyond the representable tail: keep the estimate
    const double u = r / density;
    x -= u / (1.0 + 0.5 * x * u);  // Halley: f'' = −x·f'
  }
  return x;
}

void normal_quantile(std::size_t n, const double* p, double* out) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = normal_quantile(p[i]);
}

void normal_cdf(std::size_t n, const double* x, double* out) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = 0.5 * std::erfc(-x[i] * kSqrt1_2);
}

void erf(std::size_t n, const double* x, double* out) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = std::erf(x[i]);
}

}  // namespace xtalscale::special
