// Component kernels and spherical harmonics, checked against closed forms.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "harness.hpp"
#include "xtalscale/components.hpp"
#include "xtalscale/core.hpp"
#include "xtalscale/harmonics.hpp"

namespace h = xtalscale::harmonics;
namespace c = xtalscale::components;

static const double kPi = 3.14159265358979323846;

TEST_CASE("real harmonics follow DIALS's conventions for l = 1 and 2") {
  const double theta = 0.7, phi = 2.1;
  std::vector<double> y(h::n_params(2));
  CHECK(y.size() == 8);
  h::real_harmonics(2, theta, phi, y.data());
  const double n1 = std::sqrt(3.0 / (4.0 * kPi));
  // No Condon–Shortley phase, truncated √2: Y_1,±1 = 1.414213562·N·sinθ·{sin,cos}φ.
  CHECK_CLOSE(y[0], h::kSqrt2Truncated * std::sqrt(3.0 / (8.0 * kPi)) * std::sin(theta) *
                        std::sin(phi),
              1e-15);
  CHECK_CLOSE(y[1], n1 * std::cos(theta), 1e-15);
  CHECK_CLOSE(y[2], h::kSqrt2Truncated * std::sqrt(3.0 / (8.0 * kPi)) * std::sin(theta) *
                        std::cos(phi),
              1e-15);
  const double p20 = 0.5 * (3.0 * std::cos(theta) * std::cos(theta) - 1.0);
  CHECK_CLOSE(y[5], std::sqrt(5.0 / (4.0 * kPi)) * p20, 1e-15);
  // (2, 2): N = √(5/(96π)), P_2^2 = 3 sin²θ.
  CHECK_CLOSE(y[7], h::kSqrt2Truncated * std::sqrt(5.0 / (96.0 * kPi)) * 3.0 *
                        std::sin(theta) * std::sin(theta) * std::cos(2.0 * phi),
              1e-15);
  CHECK_THROWS_AS(h::n_params(0), std::invalid_argument);
  CHECK_THROWS_AS(h::real_harmonics(2, NAN, 0.0, y.data()), std::invalid_argument);
}

TEST_CASE("sph_harm_table averages the two directions") {
  const double tp0[2] = {kPi / 2, 0.0}, tp1[2] = {kPi / 4, kPi};
  std::vector<double> out(8);
  h::sph_harm_table(tp0, tp1, 1, 2, out.data());
  CHECK_CLOSE(out[1], std::sqrt(3.0 / (8.0 * kPi)) / 2.0, 1e-15);
  CHECK_CLOSE(out[5], -std::sqrt(5.0 / (256.0 * kPi)), 1e-15);
}

TEST_CASE("lookup index and table access") {
  const double tp[8] = {0.001, 0.0, 3.141, 2 * 3.141, 0.001, 2 * 3.141, 3.141, 0.0};
  std::int64_t idx[4];
  h::calc_lookup_index(tp, 4, 2.0, idx);
  CHECK(idx[0] == 0 && idx[1] == 259199 && idx[2] == 719 && idx[3] == 258480);
  const double table[6] = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0};  // 3 rows × 2 cols
  const std::int64_t a[2] = {0, 2}, b[2] = {1, 2};
  double out[2];
  h::harmonics_from_lookup(a, b, 2, table, 3, 2, 1, out);
  CHECK_CLOSE(out[0], 2.0, 0.0);
  CHECK_CLOSE(out[1], 5.0, 0.0);
  const std::int64_t past[1] = {3};
  CHECK_THROWS_AS(h::harmonics_from_lookup(past, past, 1, table, 3, 2, 1, out), std::out_of_range);
}

TEST_CASE("Rodrigues rotation about a non-unit axis") {
  const double axis[3] = {0.0, 0.0, 3.0}, v[3] = {1.0, 0.0, 0.0}, ang[1] = {kPi / 2};
  double out[3];
  h::rotate_vectors_about_axis(axis, v, ang, 1, out);
  CHECK_CLOSE(out[0], 0.0, 1e-16);
  CHECK_CLOSE(out[1], 1.0, 1e-16);
  const double zero[3] = {0.0, 0.0, 0.0};
  CHECK_THROWS_AS(h::rotate_vectors_about_axis(zero, v, ang, 1, out), std::invalid_argument);
}

TEST_CASE("split_first_column moves column 0 out and shifts the rest") {
  // rows: {0:0.2, 1:0.5, 2:0.3}, {1:0.6, 2:0.4}, {0:1.0, 1:0.0}
  std::int32_t indptr[4] = {0, 3, 5, 7};
  std::int32_t indices[7] = {0, 1, 2, 1, 2, 0, 1};
  double data[7] = {0.2, 0.5, 0.3, 0.6, 0.4, 1.0, 0.0};
  double first[3];
  const std::size_t nnz = c::split_first_column(3, indptr, indices, data, first);
  CHECK(nnz == 5);
  CHECK(indptr[1] == 2 && indptr[2] == 4 && indptr[3] == 5);
  CHECK(indices[0] == 0 && indices[1] == 1 && indices[4] == 0);
  CHECK_CLOSE(first[0], 0.2, 0.0);
  CHECK_CLOSE(first[1], 0.0, 0.0);
  CHECK_CLOSE(first[2], 1.0, 0.0);
  const double p[2] = {10.0, 100.0};
  double v[3];
  c::csr_matvec(3, indptr, indices, data, p, first, 2.0, v);
  CHECK_CLOSE(v[0], 0.2 * 2.0 + 0.5 * 10.0 + 0.3 * 100.0, 1e-13);
  CHECK_CLOSE(v[1], 0.6 * 10.0 + 0.4 * 100.0, 1e-13);
  CHECK_CLOSE(v[2], 2.0, 1e-15);
}

TEST_CASE("exp and smoothed-B kernels give scales and derivatives") {
  const double f[2] = {0.5, 0.125};  // 1/(2d²) for d = 1, 2
  double s[2], ds[2];
  c::exp_scales(2, f, 2.0, s, ds);
  CHECK_CLOSE(s[0], std::exp(1.0), 1e-15);
  CHECK_CLOSE(ds[1], std::exp(0.25) * 0.125, 1e-15);
  const std::int32_t indptr[3] = {0, 2, 3}, indices[3] = {0, 1, 1};
  const double w[3] = {0.25, 0.75, 1.0}, p[2] = {4.0, 8.0};
  double d_data[3];
  c::smooth_b_scales(2, indptr, indices, w, p, nullptr, 0.0, f, s, d_data);
  CHECK_CLOSE(s[0], std::exp(7.0 * 0.5), 1e-13);
  CHECK_CLOSE(d_data[1], 0.75 * s[0] * 0.5, 1e-13);
  CHECK_CLOSE(d_data[2], s[1] * 0.125, 1e-15);
}

TEST_CASE("SH scales and CSR validation") {
  const double hv[4] = {0.2, 0.2, 0.1, -0.3}, coef[2] = {0.1, 0.1};
  double s[2];
  c::sh_scales(2, 2, hv, coef, s);
  CHECK_CLOSE(s[0], 1.04, 1e-15);
  CHECK_CLOSE(s[1], 0.98, 1e-15);
  const std::int64_t ip[3] = {0, 1, 2}, ix[2] = {0, 5};
  CHECK_THROWS_AS(c::validate_csr(2, 3, ip, ix, 2, "m"), std::out_of_range);
  const std::int64_t bad_ip[3] = {0, 2, 1};
  CHECK_THROWS_AS(c::validate_csr(2, 3, bad_ip, ix, 1, "m"), std::invalid_argument);
}

TEST_CASE("WeightMatrix: fixed first parameter and the Eigen view") {
  // Two rows over three parameters; p0 is fixed, so the matrix holds p1, p2 only.
  c::WeightMatrix w(2, 2, {0, 2, 3}, {0, 1, 1}, {0.5, 0.25, 0.4}, {0.25, 0.6}, true);
  CHECK(w.n_params() == 3 && w.fixed_first() && w.nnz() == 3);
  const double p[3] = {2.0, 4.0, 8.0};
  double v[2];
  w.values(p, v);
  CHECK_CLOSE(v[0], 0.25 * 2.0 + 0.5 * 4.0 + 0.25 * 8.0, 1e-15);
  CHECK_CLOSE(v[1], 0.6 * 2.0 + 0.4 * 8.0, 1e-15);
  Eigen::Vector2d free(4.0, 8.0);
  const Eigen::VectorXd dv = w.as_eigen() * free;  // derivative matrix times free parameters
  CHECK_CLOSE(dv[0] + 0.25 * 2.0, v[0], 1e-15);
  CHECK_CLOSE(w.as_eigen().coeff(1, 1), 0.4, 0.0);
  CHECK_THROWS_AS(c::WeightMatrix(2, 2, {0, 2, 3}, {0, 5, 1}, {0.5, 0.25, 0.4}, {}, false),
                  std::out_of_range);
  CHECK_THROWS_AS(c::WeightMatrix(2, 2, {0, 2, 3}, {0, 1, 1}, {0.5, 0.25, 0.4}, {}, true),
                  std::invalid_argument);
}

TEST_CASE("product rule of two components, including a zero scale") {
  // Component A: 2 rows, 1 column (dA/dp = 1); component B: 2 rows, 2 columns.
  const double sa[2] = {2.0, 0.0}, sb[2] = {3.0, 5.0};
  const std::int32_t ipa[3] = {0, 1, 2}, ixa[2] = {0, 0};
  const double da[2] = {1.0, 1.0};
  const std::int64_t ipb[3] = {0, 2, 3};
  const std::int32_t ixb[3] = {0, 1, 1};
  const double db[3] = {0.5, 0.25, 2.0};
  c::ComponentBlock blocks[2];
  blocks[0].scales = sa;
  blocks[0].indptr32 = ipa;
  blocks[0].indices = ixa;
  blocks[0].data = da;
  blocks[1].scales = sb;
  blocks[1].indptr64 = ipb;
  blocks[1].indices = ixb;
  blocks[1].data = db;
  blocks[1].col_offset = 1;
  std::int64_t indptr[3];
  CHECK(c::product_rule_indptr(2, blocks, 2, indptr) == 5);
  std::int32_t indices[5];
  double data[5], g[2];
  c::product_rule_fill<std::int32_t>(2, blocks, 2, indptr, indices, data, g);
  CHECK_CLOSE(g[0], 6.0, 0.0);
  CHECK_CLOSE(g[1], 0.0, 0.0);
  // Row 0: [dA·sB, dB0·sA, dB1·sA] = [3, 1, 0.5] at columns 0, 1, 2.
  CHECK(indices[0] == 0 && indices[1] == 1 && indices[2] == 2);
  CHECK_CLOSE(data[0], 3.0, 0.0);
  CHECK_CLOSE(data[1], 1.0, 0.0);
  CHECK_CLOSE(data[2], 0.5, 0.0);
  // Row 1: sA = 0, so B's derivative vanishes but A's is sB = 5.
  CHECK(indices[3] == 0 && indices[4] == 2);
  CHECK_CLOSE(data[3], 5.0, 0.0);
  CHECK_CLOSE(data[4], 0.0, 0.0);
}

TEST_CASE("DIALS weight matrix: spec 9.1 weights at x = 0.5 on (0, 10) with 10 intervals") {
  xtalscale::GaussianSmoother<1> smoother({{{0.0, 10.0}}}, {10});
  const double x[2] = {0.5, 10.0};
  std::int32_t indptr[3], indices[6];
  double data[6];
  const std::size_t nnz = c::dials_weight_matrix<1>(smoother, 2, {x}, indptr, indices, data);
  CHECK(nnz == 5 && indptr[1] == 3);  // x = 10 is the clipped 2-point window {10, 11}
  const double sumw = 1.259845216610119;
  CHECK_CLOSE(data[0], 0.12992260830505953 / sumw, 1e-16);
  CHECK_CLOSE(data[1], 1.0 / sumw, 1e-16);
  CHECK(indices[3] == 10 && indices[4] == 11);
  const double bad[1] = {NAN};
  CHECK_THROWS_AS(c::dials_weight_matrix<1>(smoother, 1, {bad}, indptr, indices, data),
                  std::invalid_argument);
}

XS_TEST_MAIN()
