// Gaussian smoothers: every number of spec §3 / §9.1 (DIALS parity), to 1e-12.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "harness.hpp"
#include "xtalscale/smoother.hpp"

using xtalscale::GaussianSmoother1D;
using xtalscale::GaussianSmoother2D;
using xtalscale::GaussianSmoother3D;
using xtalscale::WeightMode;

namespace {
constexpr double kTol = 1e-12;  // parity tolerance: weights are within a few ulp of exp()

GaussianSmoother1D make1(double x0, double x1, std::size_t n) {
  return GaussianSmoother1D({{{x0, x1}}}, {n});
}

struct Csr {
  std::vector<double> value, sumweight, data;
  std::vector<std::int32_t> indptr, indices;
};

template <int D>
Csr multi(const xtalscale::GaussianSmoother<D>& s, const std::array<std::vector<double>, D>& c,
          const std::vector<double>& p, WeightMode mode = WeightMode::raw, bool ff = false) {
  const std::size_t n = c[0].size();
  Csr r;
  r.value.resize(n);
  r.sumweight.resize(n);
  r.indptr.resize(n + 1);
  r.indices.resize(n * s.max_row_nnz());
  r.data.resize(n * s.max_row_nnz());
  std::array<const double*, D> ptr{};
  for (int a = 0; a < D; ++a) ptr[a] = c[a].data();
  const std::size_t nnz = s.template multi_value_weight<std::int32_t>(
      n, ptr, p.data(), p.size(), r.value.data(), r.sumweight.data(), r.indptr.data(),
      r.indices.data(), r.data.data(), mode, ff);
  r.indices.resize(nnz);
  r.data.resize(nnz);
  return r;
}
}  // namespace

TEST_CASE("1D construction: values, positions, sigma, spacing (spec 3.1 [verified])") {
  const auto a = make1(0, 10, 10);
  CHECK(a.num_values() == 12);
  CHECK_CLOSE(a.sigma(), 0.7, kTol);
  CHECK_CLOSE(a.axis(0).spacing(), 1.0, kTol);
  for (int i = 0; i < 12; ++i) CHECK_CLOSE(a.axis(0).positions()[i], i - 0.5, 0.0);
  const auto b = make1(0, 2, 2);
  CHECK(b.num_values() == 3);
  CHECK_CLOSE(b.sigma(), 0.7, kTol);
  for (int i = 0; i < 3; ++i) CHECK_CLOSE(b.axis(0).positions()[i], i, 0.0);
  const auto c = make1(0, 1, 1);
  CHECK(c.num_values() == 2);
  CHECK_CLOSE(c.sigma(), 0.65, kTol);
  CHECK_CLOSE(c.axis(0).positions()[1], 1.0, 0.0);
  const auto d = make1(1, 100, 5);  // spec 9.1
  CHECK(d.num_values() == 7);
  CHECK(d.axis(0).num_samples() == 5);
  CHECK(d.axis(0).num_average() == 3);
  CHECK_CLOSE(d.axis(0).spacing(), 19.8, kTol);
  for (int i = 0; i < 7; ++i) CHECK_CLOSE(d.axis(0).positions()[i], i - 0.5, 0.0);
}

TEST_CASE("window rounds half away from zero (spec 3.2 [verified])") {
  const auto s = make1(0, 10, 10);
  const auto& ax = s.axis(0);
  const double z[6] = {0.0, 0.5, 1.0, 1.5, 9.5, 10.0};
  const int first[6] = {0, 0, 0, 1, 9, 10};
  const int count[6] = {2, 3, 3, 3, 3, 2};
  for (int k = 0; k < 6; ++k) {
    int f = -1, c = -1;
    ax.window(z[k], f, c);
    CHECK(f == first[k]);
    CHECK(c == count[k]);
  }
  CHECK(xtalscale::iround_half_away(-0.5) == -1);
  CHECK(xtalscale::iround_half_away(1.5) == 2);
  CHECK(xtalscale::iround_half_away(2.5) == 3);
  CHECK(xtalscale::iround_half_away(-2.5) == -3);
  CHECK(xtalscale::iround_half_away(0.49999999999999994) == 0);
}

TEST_CASE("1D single point value/weights (spec 9.1 [verified])") {
  const auto s = make1(0, 10, 10);
  std::vector<double> p(12);
  for (int i = 0; i < 12; ++i) p[i] = i;
  const auto r = s.value_weight({0.5}, p.data(), p.size());
  CHECK_CLOSE(r.value, 1.0, kTol);
  CHECK_CLOSE(r.sumweight, 1.259845216610119, kTol);
  CHECK(r.index.size() == 3);
  CHECK(r.index[0] == 0 && r.index[1] == 1 && r.index[2] == 2);
  CHECK_CLOSE(r.weight[0], 0.12992260830505953, kTol);
  CHECK_CLOSE(r.weight[1], 1.0, kTol);
  CHECK_CLOSE(r.weight[2], 0.12992260830505953, kTol);
  CHECK(r.weight[0] == r.weight[2]);  // DIALS's operations per weight: exact symmetry
  CHECK(r.weight[1] == 1.0);
}

TEST_CASE("first-fixed multi-point (spec 9.1 [verified]) and the intended single point") {
  const auto s = make1(0, 3, 3);
  const std::vector<double> p = {1, 2, 3, 4, 5};
  const auto r = multi<1>(s, {{{0.0, 1.2, 2.9}}}, p, WeightMode::raw, true);
  const double v[3] = {1.5, 2.7271605265578374, 4.378333884157964};
  const double sw[3] = {1.200746082396809, 1.231864988279242, 1.2193901980735347};
  for (int i = 0; i < 3; ++i) {
    CHECK_CLOSE(r.value[i], v[i], kTol);
    CHECK_CLOSE(r.sumweight[i], sw[i], kTol);
  }
  // Row 0 (window {0,1}) keeps only w1 in column 0; rows 1-2 hold three columns each.
  const std::vector<std::int32_t> indptr = {0, 1, 4, 7}, idx = {0, 0, 1, 2, 1, 2, 3};
  CHECK(r.indptr == indptr);
  CHECK(r.indices == idx);
  CHECK_CLOSE(r.data[0], std::exp(-std::pow(0.5 / 0.7, 2)), kTol);
  // Each row's stored weights are the full-row weights minus w0.
  const auto full = multi<1>(s, {{{0.0, 1.2, 2.9}}}, p);
  CHECK_CLOSE(full.data[1], r.data[0], 0.0);
  for (int k = 0; k < 6; ++k) CHECK_CLOSE(full.data[k + 2], r.data[k + 1], 0.0);
  // Single point: same value and sumweight; w_j at j-1 only (no stray entry at j).
  const auto one = s.value_weight({1.2}, p.data(), p.size(), true);
  CHECK_CLOSE(one.value, v[1], kTol);
  CHECK(one.index.size() == 3);
  CHECK(one.index[0] == 0 && one.index[2] == 2);
  CHECK_CLOSE(one.weight[0], r.data[1], 0.0);
}

TEST_CASE("2D example (spec 9.1)") {
  GaussianSmoother2D s({{{0, 1}, {0, 4}}}, {1, 4});
  CHECK(s.axis(0).num_values() == 2);
  CHECK(s.axis(1).num_values() == 6);
  CHECK(s.axis(0).num_average() == 2);
  CHECK(s.axis(1).num_average() == 3);
  CHECK(s.sigma() == 0.65);
  const std::vector<double> p = {1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6};
  const auto r = multi<2>(s, {{{0.5, 0.25}, {1.0, 0.75}}}, p);
  CHECK(r.indices.size() == 12);
  const double s2 = 0.65 * 0.65;
  const double sumw = 2 * std::exp(-2.5 / s2) + 4 * std::exp(-0.5 / s2);
  CHECK_CLOSE(r.sumweight[0], sumw, kTol);
  CHECK_CLOSE(r.value[0], (10 * std::exp(-0.5 / s2) + 2 * std::exp(-2.5 / s2)) / sumw, kTol);
  const auto one = s.value_weight({0.5, 1.0}, p.data(), p.size());
  CHECK(one.index.size() == 6);
  CHECK_CLOSE(one.value, r.value[0], kTol);
  CHECK_CLOSE(one.sumweight, sumw, kTol);
  GaussianSmoother2D b({{{0, 2}, {0, 4}}}, {2, 4});
  CHECK(b.axis(0).num_values() == 3 && b.axis(1).num_values() == 6);
  CHECK(b.axis(0).num_average() == 3 && b.axis(1).num_average() == 3);
  GaussianSmoother2D c({{{0, 4}, {0, 5}}}, {4, 5});
  CHECK(c.axis(0).num_values() == 6 && c.axis(1).num_values() == 7);
  CHECK(c.axis(0).num_average() == 3 && c.axis(1).num_average() == 3);
}

TEST_CASE("3D example (spec 9.1)") {
  GaussianSmoother3D s({{{0, 1}, {0, 3}, {0, 1}}}, {1, 3, 1});
  CHECK(s.axis(0).num_values() == 2 && s.axis(1).num_values() == 5 && s.axis(2).num_values() == 2);
  CHECK(s.axis(0).num_average() == 2 && s.axis(1).num_average() == 3 &&
        s.axis(2).num_average() == 2);
  CHECK(s.sigma() == 0.65);
  std::vector<double> p = {1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5};
  const auto r = multi<3>(s, {{{0.5, 0.25}, {1.0, 0.75}, {0.5, 0.25}}}, p);
  CHECK(r.indices.size() == 24);
  const double s2 = 0.65 * 0.65;
  const double sumw = 4 * std::exp(-2.75 / s2) + 8 * std::exp(-0.75 / s2);
  CHECK_CLOSE(r.sumweight[0], sumw, kTol);
  CHECK_CLOSE(r.value[0], (20 * std::exp(-0.75 / s2) + 4 * std::exp(-2.75 / s2)) / sumw, kTol);
  const auto one = s.value_weight({0.5, 1.0, 0.5}, p.data(), p.size());
  CHECK(one.index.size() == 12);
  CHECK_CLOSE(one.value, r.value[0], kTol);
  GaussianSmoother3D b({{{0, 1}, {0, 2}, {0, 3}}}, {1, 2, 3});
  CHECK(b.axis(0).num_values() == 2 && b.axis(1).num_values() == 3 && b.axis(2).num_values() == 5);
  CHECK(b.axis(0).num_average() == 2 && b.axis(1).num_average() == 3 &&
        b.axis(2).num_average() == 3);
}

TEST_CASE("bulk equals single point, normalised rows sum to 1, far points are safe") {
  GaussianSmoother2D s({{{0, 7}, {-3, 3}}}, {7, 4});
  std::vector<double> p(s.num_values());
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = 1.0 + 0.1 * static_cast<double>(i % 7);
  // Interior, exact half-integers, edges, and points far outside (the std::exp fallback).
  const std::vector<double> x = {0.0, 3.5, 7.0, 2.25, -40.0, 1e6, 6.99};
  const std::vector<double> y = {-3.0, 0.0, 3.0, -1.5, 0.5, -2.0, 80.0};
  const auto r = multi<2>(s, {x, y}, p);
  const auto nr = multi<2>(s, {x, y}, p, WeightMode::normalised);
  for (std::size_t k = 0; k < x.size(); ++k) {
    const auto one = s.value_weight({x[k], y[k]}, p.data(), p.size());
    CHECK_CLOSE(one.value, r.value[k], 1e-15 * (1 + std::fabs(one.value)));
    CHECK_CLOSE(one.sumweight, r.sumweight[k], 1e-15);
    CHECK(one.index.size() == static_cast<std::size_t>(r.indptr[k + 1] - r.indptr[k]));
    double rowsum = 0;
    for (auto j = nr.indptr[k]; j < nr.indptr[k + 1]; ++j) rowsum += nr.data[j];
    if (r.sumweight[k] > 0) CHECK_CLOSE(rowsum, 1.0, 1e-14);
    else CHECK(rowsum == 0.0);  // Σw underflow: derivative 0, value 0 (as DIALS)
  }
}

TEST_CASE("exp_bounded agrees with std::exp to 4e-16 relative on [-700, 700]") {
  double worst = 0;
  for (int i = -700000; i <= 700000; ++i) {
    const double x = i * 1e-3 + 1e-7 * (i % 13);
    const double e = std::exp(x);
    worst = std::fmax(worst, std::fabs(xtalscale::exp_bounded(x) - e) / e);
  }
  CHECK(worst < 4e-16);
}

TEST_CASE("value_error propagates esds: sigma_v^2 = sum (w_i/sum w)^2 sigma_i^2") {
  const auto s = make1(0, 10, 10);
  std::vector<double> p(12, 1.0), e(12);
  for (int i = 0; i < 12; ++i) e[i] = 0.01 * (i + 1);
  const double x = 0.5;
  double v = 0, err = 0;
  s.value_error(1, {&x}, p.data(), e.data(), p.size(), &v, &err);
  // weights at z = 0.5: [a, 1, a] with a = exp(-(1/0.7)^2)
  const double a = 0.12992260830505953, sw = 1 + 2 * a;
  const double expect = std::sqrt(std::pow(a / sw * 0.01, 2) + std::pow(1 / sw * 0.02, 2) +
                                  std::pow(a / sw * 0.03, 2));
  CHECK_CLOSE(v, 1.0, kTol);
  CHECK_CLOSE(err, expect, 1e-15);
}

TEST_CASE("bad input throws invalid_argument") {
  CHECK_THROWS_AS(make1(0, 10, 0), std::invalid_argument);
  CHECK_THROWS_AS(make1(10, 0, 5), std::invalid_argument);
  CHECK_THROWS_AS(make1(1, 1, 5), std::invalid_argument);
  CHECK_THROWS_AS(make1(0, std::numeric_limits<double>::infinity(), 5), std::invalid_argument);
  auto s = make1(0, 10, 10);
  CHECK_THROWS_AS(s.set_smoothing(0, -1), std::invalid_argument);
  CHECK_THROWS_AS(s.set_smoothing(6, -1), std::invalid_argument);
  CHECK_THROWS_AS(s.set_smoothing(3, 0.0), std::invalid_argument);
  CHECK_CLOSE(s.sigma(), 0.7, kTol);  // a failed call leaves the smoother unchanged
  s.set_smoothing(5, -1);
  CHECK_CLOSE(s.sigma(), 0.8, kTol);
  CHECK(s.axis(0).num_average() == 5);
  std::vector<double> p(11, 1.0);
  CHECK_THROWS_AS(s.value_weight({1.0}, p.data(), p.size()), std::invalid_argument);
  p.resize(12, 1.0);
  CHECK_THROWS_AS(s.value_weight({std::nan("")}, p.data(), p.size()), std::invalid_argument);
  const std::vector<double> x = {1.0, std::numeric_limits<double>::infinity()};
  std::vector<double> v(2);
  CHECK_THROWS_AS(s.multi_value_weight<std::int32_t>(2, {x.data()}, p.data(), p.size(), v.data(),
                                                     nullptr, nullptr, nullptr, nullptr),
                  std::invalid_argument);
  GaussianSmoother2D s2({{{0, 1}, {0, 4}}}, {1, 4});
  std::vector<double> p2(12, 1.0);
  CHECK_THROWS_AS(s2.value_weight({0.5, 1.0}, p2.data(), p2.size(), true), std::invalid_argument);
  CHECK(xtalscale::nparam_to_val(2) == 1 && xtalscale::nparam_to_val(3) == 2 &&
        xtalscale::nparam_to_val(5) == 3 && xtalscale::nparam_to_val(6) == 4);
  CHECK_THROWS_AS(xtalscale::nparam_to_val(1), std::invalid_argument);
}

XS_TEST_MAIN()
