// Normal and Student's t distribution functions (see distributions.hpp).
#include "xtalscale/distributions.hpp"

#include <cmath>
#include <limits>

namespace xtalscale::special {

namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;       // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/√(2π)

/// Acklam's rational approximation of the lower-tail quantile (relative error < 1.2e-9 over
/// (0, 1)): a start one Halley step away from full precision.
double acklam_quantile(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,
                             -2.759285104469687e+02, 1.383577518672690e+02,
                             -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02,
                             -1.556989798598866e+02, 6.680131188771972e+01,
                             -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01,
                             -2.400758277161838e+00, -2.549732539343734e+00,
                             4.374664141464968e+00, 2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01,
                             2.445134137142996e+00, 3.754408661907416e+00};
  constexpr double kLow = 0.02425;
  if (p < kLow || p > 1.0 - kLow) {
    const double q = std::sqrt(-2.0 * std::log(p < kLow ? p : 1.0 - p));
    const double x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
                     ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
    return p < kLow ? x : -x;
  }
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
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
  double x = acklam_quantile(p);
  // One Halley step (cubic convergence) takes Acklam's 1.2e-9 to rounding.
  for (int step = 0; step < 1; ++step) {
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

namespace {

/// The continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1)/(a + b + 2).
double beta_continued_fraction(double a, double b, double x) {
  constexpr double kTiny = 1e-300;
  constexpr double kEps = 1e-16;
  double c = 1.0;
  double d = 1.0 - (a + b) * x / (a + 1.0);
  d = 1.0 / (std::abs(d) < kTiny ? kTiny : d);
  double h = d;
  for (int m = 1; m <= 10000; ++m) {
    const double m2 = 2.0 * m;
    // even step
    double num = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
    d = 1.0 + num * d;
    d = 1.0 / (std::abs(d) < kTiny ? kTiny : d);
    c = 1.0 + num / c;
    c = std::abs(c) < kTiny ? kTiny : c;
    h *= d * c;
    // odd step
    num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
    d = 1.0 + num * d;
    d = 1.0 / (std::abs(d) < kTiny ? kTiny : d);
    c = 1.0 + num / c;
    c = std::abs(c) < kTiny ? kTiny : c;
    const double delta = d * c;
    h *= delta;
    if (std::abs(delta - 1.0) < kEps) break;
  }
  return h;
}

/// ln Γ(a + b) − ln Γ(a) − ln Γ(b). For b = ½ and large a the difference of two large
/// log-gammas would lose |ln Γ(a)|·ε (1e-10 relative at a = 5·10⁴): Stirling's series of the
/// difference instead, ½·ln a + a·log1p(1/(2a)) − ½ + the 1/x, 1/x³, 1/x⁵, 1/x⁷ terms at
/// x = a + ½ minus those at a (truncation below 1e-20 for a >= 100).
double log_beta_front(double a, double b) {
  if (b == 0.5 && a >= 100.0) {
    const auto series = [](double x) {
      const double r = 1.0 / x, r2 = r * r;
      return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 / 1680.0)));
    };
    return 0.5 * std::log(a) + a * std::log1p(0.5 / a) - 0.5 + (series(a + 0.5) - series(a)) -
           std::lgamma(0.5);
  }
  return std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b);
}

/// I_x(a, b) with y = 1 − x given separately (so that x near 1 keeps its precision).
double incomplete_beta_xy(double a, double b, double x, double y) {
  if (x == 0.0) return 0.0;
  if (y == 0.0) return 1.0;
  // ln x and ln y from whichever of x, y is the small one (log1p keeps the digits of the
  // other near 1; a·ln x with a ~ 10⁵ would otherwise amplify its rounding).
  const double log_x = y < 0.5 ? std::log1p(-y) : std::log(x);
  const double log_y = x < 0.5 ? std::log1p(-x) : std::log(y);
  const double log_front = log_beta_front(a, b) + a * log_x + b * log_y;
  const double front = std::exp(log_front);
  if (x < (a + 1.0) / (a + b + 2.0)) return front * beta_continued_fraction(a, b, x) / a;
  return 1.0 - front * beta_continued_fraction(b, a, y) / b;
}

/// Upper tail Q(t) = P(T > t) of Student's t for t >= 0: ½·I_x(df/2, ½), x = df/(df + t²).
double student_t_upper_tail(double df, double t) {
  const double t2 = t * t;
  return 0.5 * incomplete_beta_xy(0.5 * df, 0.5, df / (df + t2), t2 / (df + t2));
}

}  // namespace

double incomplete_beta(double a, double b, double x) noexcept {
  if (!(a > 0.0 && b > 0.0 && x >= 0.0 && x <= 1.0))
    return std::numeric_limits<double>::quiet_NaN();
  return incomplete_beta_xy(a, b, x, 1.0 - x);
}

double student_t_quantile(double df, double p) noexcept {
  constexpr double kPi = 3.14159265358979323846;
  if (!(df > 0.0) || !(p >= 0.0 && p <= 1.0)) return std::numeric_limits<double>::quiet_NaN();
  if (p == 0.0) return -std::numeric_limits<double>::infinity();
  if (p == 1.0) return std::numeric_limits<double>::infinity();
  if (p == 0.5) return 0.0;
  if (p < 0.5) return -student_t_quantile(df, 1.0 - p);  // 1 − p is exact for p >= 0.25
  const double tail = 1.0 - p;                             // exact for p >= 0.5
  if (df == 1.0) return 1.0 / std::tan(kPi * tail);  // Cauchy: cot(π(1 − p)), from the tail
  if (df == 2.0) return (2.0 * p - 1.0) / std::sqrt(2.0 * p * tail);
  // Cornish–Fisher start from the normal quantile.
  const double z = normal_quantile(p);
  const double z2 = z * z;
  double t = z + z * (z2 + 1.0) / (4.0 * df) +
             z * ((5.0 * z2 + 16.0) * z2 + 3.0) / (96.0 * df * df) +
             z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / (384.0 * df * df * df);
  if (!(t > 0.0)) t = z > 0.0 ? z : 1e-3;
  const double log_norm = std::lgamma(0.5 * (df + 1.0)) - std::lgamma(0.5 * df) -
                          0.5 * std::log(df * kPi);
  for (int it = 0; it < 100; ++it) {
    // F(t) − p = (1 − p) − Q(t); F' = density.
    const double residual = tail - student_t_upper_tail(df, t);
    const double density = std::exp(log_norm - 0.5 * (df + 1.0) * std::log1p(t * t / df));
    if (!(density > 0.0)) break;
    double step = residual / density;
    if (t - step <= 0.0) step = 0.5 * t;  // stay in the upper half
    t -= step;
    if (std::abs(step) <= 1e-15 * t) break;
  }
  return t;
}

}  // namespace xtalscale::special
