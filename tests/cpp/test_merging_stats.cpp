// Merging-statistics kernel on a hand-computed set (same numbers as the Python test).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "harness.hpp"
#include "xtalscale/merging_stats.hpp"

namespace {
// Group 0: I = 10, 12, 14 (sigma 1, 1, 2; the last is a Bijvoet-minus mate);
// group 1: 20, 22 (sigma 2, 2); group 2: 5 (sigma 1). Observations in input order.
const std::vector<double> kI{10, 12, 14, 20, 22, 5};
const std::vector<double> kSigma{1, 1, 2, 2, 2, 1};
const std::vector<std::uint8_t> kMinus{0, 0, 1, 0, 0, 0};
const std::vector<std::int64_t> kOrder{0, 1, 2, 3, 4, 5};
const std::vector<std::int64_t> kOffsets{0, 3, 5, 6};
const std::vector<std::int32_t> kShell{0, 0, 0};

bool same(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

xtalscale::MergingStatistics run(const xtalscale::MergingOptions& opt) {
  return xtalscale::compute_merging_statistics(kI.data(), kSigma.data(), kMinus.data(), 6,
                                               kOrder.data(), kOffsets.data(), 3,
                                               kShell.data(), nullptr, 1, opt);
}
}  // namespace

TEST_CASE("weighted means, R factors and counts") {
  const auto r = run({});
  const auto& m = r.merged;
  CHECK(m.intensity.size() == 3);
  CHECK_CLOSE(m.intensity[0], 25.5 / 2.25, 1e-12);
  CHECK_CLOSE(m.sigma[0], std::sqrt(1 / 2.25), 1e-12);
  CHECK_CLOSE(m.sigma_internal[0], 1.0, 1e-12);
  CHECK_CLOSE(m.sigma_internal[1], std::sqrt(2.0), 1e-12);
  const auto& o = r.shells[1];  // overall
  CHECK(o.n_obs == 6 && o.n_uniq == 3 && o.n_multi == 2);
  const double mean0 = 25.5 / 2.25;
  const double dev0 = std::fabs(10 - mean0) + std::fabs(12 - mean0) + std::fabs(14 - mean0);
  CHECK_CLOSE(o.r_merge, (dev0 + 2.0) / 78.0, 1e-12);
  CHECK_CLOSE(o.r_meas, (std::sqrt(1.5) * dev0 + std::sqrt(2.0) * 2.0) / 78.0, 1e-12);
  CHECK_CLOSE(o.r_pim, (std::sqrt(0.5) * dev0 + 2.0) / 78.0, 1e-12);
  const double var_y = (21.0 - mean0) * (21.0 - mean0) / 2, var_e = 1.5;
  CHECK_CLOSE(o.cc_half_sigma_tau, (var_y - var_e) / (var_y + var_e), 1e-12);
}

TEST_CASE("anomalous separation and determinism") {
  xtalscale::MergingOptions opt;
  opt.anomalous = true;
  const auto a = run(opt);
  CHECK(a.merged.intensity.size() == 4);
  CHECK(a.shells[1].n_bijvoet_pairs == 1 && a.shells[1].n_acentric == 3);
  const auto b = run(opt);
  CHECK(a.merged.half1[0] == b.merged.half1[0]);
}

TEST_CASE("bad arguments throw") {
  const std::vector<double> bad_sigma{1, 1, 0, 2, 2, 1};
  CHECK_THROWS_AS(xtalscale::compute_merging_statistics(
                      kI.data(), bad_sigma.data(), nullptr, 6, kOrder.data(), kOffsets.data(),
                      3, kShell.data(), nullptr, 1, {}),
                  std::invalid_argument);
  const std::vector<std::int64_t> bad_offsets{0, 3, 5, 7};
  CHECK_THROWS_AS(xtalscale::compute_merging_statistics(
                      kI.data(), kSigma.data(), nullptr, 6, kOrder.data(), bad_offsets.data(), 3,
                      kShell.data(), nullptr, 1, {}),
                  std::invalid_argument);
  const std::vector<std::int32_t> bad_shell{0, 1, 0};
  CHECK_THROWS_AS(xtalscale::compute_merging_statistics(
                      kI.data(), kSigma.data(), nullptr, 6, kOrder.data(), kOffsets.data(), 3,
                      bad_shell.data(), nullptr, 1, {}),
                  std::invalid_argument);
}

TEST_CASE("observations in group order read in place give the same sums as through order") {
  // The same observations stored shuffled (read through a permutation) and in group order
  // (identity order, read in place): every merged value and shell sum is equal.
  const std::vector<std::int64_t> shuffled_order{4, 0, 5, 2, 1, 3};  // position j <- row
  std::vector<double> I(6), s(6);
  std::vector<std::uint8_t> minus(6);
  std::vector<std::int64_t> order(6);
  for (std::size_t j = 0; j < 6; ++j) {
    const auto row = static_cast<std::size_t>(shuffled_order[j]);
    I[row] = kI[j];
    s[row] = kSigma[j];
    minus[row] = kMinus[j];
    order[j] = shuffled_order[j];
  }
  for (const bool anomalous : {false, true}) {
    xtalscale::MergingOptions opt;
    opt.anomalous = anomalous;
    const auto in_place = run(opt);
    const auto gathered = xtalscale::compute_merging_statistics(
        I.data(), s.data(), minus.data(), 6, order.data(), kOffsets.data(), 3, kShell.data(),
        nullptr, 1, opt);
    CHECK(in_place.merged.intensity == gathered.merged.intensity);
    CHECK(in_place.merged.sigma == gathered.merged.sigma);
    for (std::size_t u = 0; u < in_place.merged.half1.size(); ++u)
      CHECK(same(in_place.merged.half1[u], gathered.merged.half1[u]));
    CHECK(in_place.shells[1].r_merge == gathered.shells[1].r_merge);
    CHECK(in_place.shells[1].cc_half == gathered.shells[1].cc_half);
  }
  std::vector<double> in_place(6), through_order(6);
  xtalscale::normalised_deviations(kI.data(), kSigma.data(), 6, kOrder.data(), kOffsets.data(),
                                   3, in_place.data());
  xtalscale::normalised_deviations(I.data(), s.data(), 6, order.data(), kOffsets.data(), 3,
                                   through_order.data());
  for (std::size_t j = 0; j < 5; ++j)
    CHECK(in_place[j] == through_order[static_cast<std::size_t>(shuffled_order[j])]);
}

XS_TEST_MAIN()
