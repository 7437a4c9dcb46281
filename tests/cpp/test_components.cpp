// Component kernels and spherical harmonics, checked against closed forms.
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "harness.hpp"
#include "xtalscale/components.hpp"
#include "xtalscale/core.hpp"
#include "xtalscale/harmonics.hpp"
#include "xtalscale/model_block.hpp"

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

TEST_CASE("DIALS weight matrix: spec 9.1 weights at x = 0.5 on (0, 10) with 10 intervals") {
  xtalscale::GaussianSmoother<1> smoother({{{0.0, 10.0}}}, {10});
  const double x[2] = {0.5, 10.0};
  std::int32_t indptr[3], indices[6];
  double data[6];
  const std::size_t nnz = c::dials_weight_matrix_1d(smoother, 2, x, indptr, indices, data);
  CHECK(nnz == 5 && indptr[1] == 3);  // x = 10 is the clipped 2-point window {10, 11}
  const double sumw = 1.259845216610119;
  CHECK_CLOSE(data[0], 0.12992260830505953 / sumw, 1e-16);
  CHECK_CLOSE(data[1], 1.0 / sumw, 1e-16);
  CHECK(indices[3] == 10 && indices[4] == 11);
  const double bad[1] = {NAN};
  CHECK_THROWS_AS(c::dials_weight_matrix_1d(smoother, 1, bad, indptr, indices, data),
                  std::invalid_argument);
}


TEST_CASE("model block: product rule of two terms, including a zero scale and a fixed factor") {
  // Term A: 2 rows, 1 column (dA/dp = 1); term B: 2 rows, 2 columns; F: fixed factor 2.
  auto a = std::make_shared<xtalscale::ExternalTerm>(2, 1);
  auto b = std::make_shared<xtalscale::ExternalTerm>(2, 2);
  const double sa[2] = {2.0, 0.0}, da[2] = {1.0, 1.0};
  const std::int64_t ipa[3] = {0, 1, 2}, ipb[3] = {0, 2, 3};
  const std::int32_t ixa[2] = {0, 0}, ixb[3] = {0, 1, 1};
  const double sb[2] = {3.0, 5.0}, db[3] = {0.5, 0.25, 2.0};
  a->set(sa, ipa, ixa, da);
  b->set(sb, ipb, ixb, db);
  xtalscale::ModelBlock block(2);
  block.add_term(a);
  block.add_term(b);
  block.add_term(std::make_shared<xtalscale::FixedScalesTerm>(
                     xtalscale::HeldArray<double>::from_vector({2.0, 2.0})),
                 false);
  block.evaluate(nullptr, 0);
  const xtalscale::DerivativesView v = block.view();
  CHECK(v.n_rows == 2 && v.n_cols == 3 && v.nnz() == 5 && v.version == 1);
  CHECK_CLOSE(v.scales[0], 12.0, 0.0);
  CHECK_CLOSE(v.scales[1], 0.0, 0.0);
  // Row 0: [dA·sB·2, dB0·sA·2, dB1·sA·2] = [6, 2, 1] at columns 0, 1, 2.
  CHECK(v.indices[0] == 0 && v.indices[1] == 1 && v.indices[2] == 2);
  CHECK_CLOSE(v.values[0], 6.0, 0.0);
  CHECK_CLOSE(v.values[1], 2.0, 0.0);
  CHECK_CLOSE(v.values[2], 1.0, 0.0);
  // Row 1: sA = 0, so B's derivative vanishes but A's is sB·2 = 10.
  CHECK(v.indices[3] == 0 && v.indices[4] == 2);
  CHECK_CLOSE(v.values[3], 10.0, 0.0);
  CHECK_CLOSE(v.values[4], 0.0, 0.0);
  // A second evaluation keeps the pattern (same version).
  block.evaluate(nullptr, 0);
  CHECK(block.view().version == 1);
  CHECK_THROWS_AS(block.evaluate(nullptr, 1), std::invalid_argument);
}

TEST_CASE("model block: exp-factor and scale terms share nothing mutable") {
  auto factor = xtalscale::HeldArray<double>::from_vector({0.5, 1.0, 2.0});
  auto exp_term = std::make_shared<xtalscale::ExpFactorTerm>(factor);
  xtalscale::ModelBlock one(3), two(3);
  for (auto* block : {&one, &two}) {
    block->add_term(std::make_shared<xtalscale::ScaleFactorTerm>(3));
    block->add_term(exp_term);
  }
  const double p1[2] = {2.0, 0.1}, p2[2] = {1.0, -0.2};
  one.evaluate(p1, 2);
  two.evaluate(p2, 2);
  for (std::size_t i = 0; i < 3; ++i) {
    const double f = factor.data[i];
    CHECK_CLOSE(one.view().scales[i], 2.0 * std::exp(0.1 * f), 1e-15);
    CHECK_CLOSE(two.view().scales[i], std::exp(-0.2 * f), 1e-15);
    // d/dp0 = exp term; d/dp1 = p0·s·f.
    CHECK_CLOSE(one.view().values[2 * i], std::exp(0.1 * f), 1e-15);
    CHECK_CLOSE(one.view().values[2 * i + 1], 2.0 * std::exp(0.1 * f) * f, 1e-14);
  }
}

XS_TEST_MAIN()
