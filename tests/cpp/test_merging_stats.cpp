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

XS_TEST_MAIN()
