/// @file french_wilson.hpp
/// @brief French & Wilson (1978) posterior estimates of intensity and amplitude.
///
/// For a measured intensity I with standard deviation σ and a Wilson prior with mean Σ, the
/// posterior of the true intensity J ≥ 0 is, with z = J/σ,
///   acentric: p(z) ∝ exp(-(z - h)²/2),           h = I/σ - σ/Σ
///   centric:  p(z) ∝ z^(-1/2) exp(-(z - h)²/2),   h = I/σ - σ/(2Σ)
/// The posterior mean and standard deviation of J and of F = √J are integrated numerically
/// (64-point composite Gauss–Legendre in u = √z, where both integrands are smooth) for every h: no
/// lookup tables and no switch to an asymptotic form at large h. A flat positive prior is
/// Σ = +∞ with the acentric form.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xtalscale {

/// Posterior moments of one reflection in units of σ (J/σ, σ_J/σ) and √σ (F/√σ, σ_F/√σ).
struct FrenchWilsonMoments {
  double j = 0.0;      ///< E[J]/σ
  double sig_j = 0.0;  ///< sd(J)/σ
  double f = 0.0;      ///< E[√J]/√σ
  double sig_f = 0.0;  ///< sd(√J)/√σ
};

/// Posterior moments for the standardised intensity @p h (see the file comment).
FrenchWilsonMoments french_wilson_moments(double h, bool centric);

/// French–Wilson estimates for @p n reflections.
///
/// @param intensity, sigma   merged I and σ(I)
/// @param expected           prior mean intensity Σ per reflection (|Σ| is used, as dials
///                           does for a shell with a negative median; +∞ = flat prior)
/// @param centric            1 for centric reflections
/// @param h_min              reflections with h < h_min or I/σ < h_min + 0.3 are rejected
///                           (French & Wilson's and dials' -4)
/// @param j, sig_j, f, sig_f outputs (NaN where rejected)
/// @param valid              output: 1 where estimated; 0 for σ ≤ 0, non-finite input,
///                           Σ = 0 or the h_min rejection
/// @param n_threads          threads over blocks of rows (OpenMP; each row is computed alone,
///                           so the results are the same for any count)
void french_wilson(const double* intensity, const double* sigma, const double* expected,
                   const std::uint8_t* centric, std::size_t n, double h_min, double* j,
                   double* sig_j, double* f, double* sig_f, std::uint8_t* valid,
                   int n_threads = 1);

}  // namespace xtalscale
