/// @file harmonics.hpp
/// @brief Real spherical harmonics with DIALS's absorption-surface conventions.
///
/// Conventions (spec §2.5): parameters are ordered l = 1..lmax and, within each l,
/// m = -l..l, so there are lmax² + 2·lmax of them. The real harmonic is
///   m > 0: √2 · N_lm · P̄_l^m(cos θ) · cos(mφ)
///   m = 0: N_l0 · P_l(cos θ)
///   m < 0: √2 · N_l|m| · P̄_l^|m|(cos θ) · sin(|m|φ)
/// with P̄ the associated Legendre function *without* the Condon–Shortley phase (DIALS
/// multiplies boost's phased Y_l^m by (-1)^m, which cancels it) and √2 *truncated* to
/// 1.414213562 as in DIALS. All arrays are row-major; vectors are packed xyz triples and
/// angle pairs are packed (θ, φ).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xtalscale/export.hpp"

namespace xtalscale::harmonics {

/// √2 as DIALS writes it (truncated); part of the parity contract.
inline constexpr double kSqrt2Truncated = 1.414213562;

/// Largest lmax accepted (factorials stay exact in double far beyond this).
inline constexpr int kMaxLmax = 30;

/// Number of absorption parameters for @p lmax: lmax² + 2·lmax. Throws unless 1 <= lmax <= 30.
XTALSCALE_EXPORT std::size_t n_params(int lmax);

/// Evaluate every real harmonic (l = 1..lmax, m = -l..l) at one direction into
/// out[0..n_params(lmax)). θ is the polar angle from +z, φ the azimuth (radians).
XTALSCALE_EXPORT void real_harmonics(int lmax, double theta, double phi, double* out);

/// (θ, φ) of n vectors: θ = atan2(√(x²+y²), z) ∈ [0, π], φ = (atan2(y, x) + 2π) mod 2π.
XTALSCALE_EXPORT void calc_theta_phi(const double* xyz, std::size_t n, double* theta_phi);

/// Nearest-lower grid index of n (θ, φ) pairs on a grid with @p points_per_degree:
/// int(360·ppd·floor(θ·ppd·180/π) + floor(φ·ppd·180/π)). Throws std::invalid_argument
/// for non-finite or negative angles and for a non-positive ppd.
XTALSCALE_EXPORT void calc_lookup_index(const double* theta_phi, std::size_t n,
                                        double points_per_degree, std::int64_t* out);

/// Exact per-reflection table: out is n × n_params(lmax) (row-major), each row the mean of the
/// harmonics at the two directions (θ₀,φ₀) and (θ₁,φ₁). Throws on non-finite angles.
XTALSCALE_EXPORT void sph_harm_table(const double* theta_phi0, const double* theta_phi1,
                                     std::size_t n, int lmax, double* out);

/// Number of grid points of the lookup table: 360·180·ppd².
XTALSCALE_EXPORT std::size_t lookup_table_size(int points_per_degree);

/// The separable factors of the lookup grid: every harmonic is a function of θ times a
/// function of φ, so grid point i = t·n_phi + j (θ row t, φ column j) holds, for every k,
/// table[i, k] = theta[t·n_params + k] · phi[j·n_params + k] exactly (the product
/// sph_harm_lookup_table forms, so the same bits). theta holds √2·N·P̄ (N·P for m = 0), phi
/// cos(mφ) for m > 0, sin(|m|φ) for m < 0 and 1 for m = 0 (a product with 1 is exact).
/// Together 8·(n_theta + n_phi)·n_params bytes (207 KB for lmax 4 at 2 points per degree,
/// against the table's 50 MB): small enough to stay in cache while rows are formed from them.
struct XTALSCALE_EXPORT LookupFactors {
  int lmax = 0;               ///< largest l
  int points_per_degree = 0;  ///< grid points per degree on both axes
  std::size_t n_params = 0;   ///< harmonics per grid point: n_params(lmax)
  std::size_t n_theta = 0;    ///< θ rows: 180·ppd
  std::size_t n_phi = 0;      ///< φ columns: 360·ppd
  std::vector<double> theta;  ///< n_theta × n_params, row-major: the θ factors
  std::vector<double> phi;    ///< n_phi × n_params, row-major: the φ factors

  /// Grid points: n_theta·n_phi (lookup_table_size(points_per_degree)).
  std::size_t grid_size() const noexcept { return n_theta * n_phi; }
};

/// The factors of the lookup grid for @p lmax and @p points_per_degree (see LookupFactors).
/// Throws std::invalid_argument unless 1 <= lmax <= 30 and 1 <= points_per_degree <= 100.
XTALSCALE_EXPORT LookupFactors sph_harm_lookup_factors(int lmax, int points_per_degree);

/// Lookup table, row-major lookup_table_size(ppd) × n_params(lmax): row i holds the full
/// harmonics (no ½) at θ = floor(i / (360·ppd))·π/(180·ppd), φ = (i mod 360·ppd)·π/(180·ppd),
/// formed as the products of sph_harm_lookup_factors() (equal to real_harmonics() at those
/// angles, the same operations on the same operands).
XTALSCALE_EXPORT void sph_harm_lookup_table(int lmax, int points_per_degree, double* out);

/// Averages of two table rows per reflection: out[j, k] = (table[i0[j], k] + table[i1[j], k])/2
/// for k < n_cols. @p table has @p n_rows rows of @p row_stride doubles (row_stride >= n_cols).
/// Throws std::out_of_range (naming s0_selection / s1_selection) for an index past the table.
XTALSCALE_EXPORT void harmonics_from_lookup(const std::int64_t* i0, const std::int64_t* i1,
                                            std::size_t n, const double* table,
                                            std::size_t n_rows, std::size_t row_stride,
                                            std::size_t n_cols, double* out);

/// SH scales straight from the lookup table, without materialising the harmonic matrix:
/// scales[j] = 1 + Σ_k coef[k]·(table[i0[j], k] + table[i1[j], k])/2 for k < n_cols.
/// For large n the surface is first evaluated on the whole grid (one n_rows × n_cols pass),
/// so each reflection costs two reads from an n_rows-long array; small n read the rows
/// directly. Both equal the materialised path (sh_scales on harmonics_from_lookup's rows) up
/// to rounding. Indices are validated as in harmonics_from_lookup.
XTALSCALE_EXPORT void lookup_sh_scales(const std::int32_t* i0, const std::int32_t* i1,
                                       std::size_t n, const double* table, std::size_t n_rows,
                                       std::size_t row_stride, std::size_t n_cols,
                                       const double* coef, double* scales);

/// Rodrigues rotation of n vectors about one axis (normalised here) by per-vector angles
/// (radians, right-handed). Throws for a zero-length axis or non-finite input.
XTALSCALE_EXPORT void rotate_vectors_about_axis(const double axis[3], const double* vectors,
                                                const double* angles, std::size_t n,
                                                double* out);

/// The geometry that takes a rotation sweep's beam directions into the frame DIALS evaluates
/// the absorption harmonics in (its scaler factory): with R = S·Rot(axis, φ)·F,
/// s0c = Rᵀ·u0 and s1c = Rᵀ·s1/|s1| (zero where |s1| = 0), then the fixed rotation about
/// (a_y, −a_x, 0) by acos(a_z/|a|) that takes @p align_axis onto +z (none when it is +z).
struct AbsorptionFrame {
  double rotation_axis[3];     ///< goniometer rotation axis (datum); any non-zero length
  double fixed_rotation[9];    ///< F, row-major
  double setting_rotation[9];  ///< S, row-major
  double sample_to_source[3];  ///< unit vector u0 from the sample to the source (lab frame)
  double align_axis[3];        ///< rotated onto +z at the end; DIALS uses (1, 0, 0)
};

/// (s0c, s1c) of n reflections (each n × 3, row-major) from their scattered-beam vectors
/// @p s1 (n × 3) and scan angles @p phi (radians). The same arithmetic, in the same order, as
/// the numpy composition it replaces (normalise, ·S, Rodrigues by −φ, ·F, align), so the
/// results are those bits whenever the matrix products are exact (S = F = 1, the usual case).
/// Throws std::invalid_argument for non-finite input or a zero rotation or alignment axis.
XTALSCALE_EXPORT void absorption_frame_vectors(const AbsorptionFrame& frame, const double* s1,
                                               const double* phi, std::size_t n, double* s0c,
                                               double* s1c);

/// Lookup-grid indices of n vectors (n × 3): calc_theta_phi then calc_lookup_index, with
/// θ = π (one row past the grid, where DIALS reads out of bounds) mapped to the last θ row.
/// Throws std::invalid_argument for non-finite vectors or a non-positive @p points_per_degree.
XTALSCALE_EXPORT void grid_lookup_indices(const double* xyz, std::size_t n, int points_per_degree,
                                          std::int64_t* out);

/// Lookup-grid indices of (s0c, s1c) of n reflections in one pass, without storing the
/// vectors: absorption_frame_vectors then grid_lookup_indices per reflection. Rows are split over up to
/// @p n_threads threads; each row's result does not depend on the split.
XTALSCALE_EXPORT void absorption_lookup_indices(const AbsorptionFrame& frame, const double* s1,
                                                const double* phi, std::size_t n,
                                                int points_per_degree, std::int64_t* s0_index,
                                                std::int64_t* s1_index, int n_threads = 1);

}  // namespace xtalscale::harmonics
