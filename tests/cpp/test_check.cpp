// Boundary validation helpers shared by every entry point.
#include <limits>
#include <stdexcept>

#include "harness.hpp"
#include "xtalscale/core.hpp"

TEST_CASE("require_finite rejects NaN and inf") {
  const double ok[3] = {1.0, -2.0, 0.0};
  xtalscale::require_finite(ok, 3, "ok");
  const double bad[2] = {1.0, std::numeric_limits<double>::quiet_NaN()};
  CHECK_THROWS_AS(xtalscale::require_finite(bad, 2, "x"), std::invalid_argument);
  const double inf[1] = {std::numeric_limits<double>::infinity()};
  CHECK_THROWS_AS(xtalscale::require_finite(inf, 1, "x"), std::invalid_argument);
}

TEST_CASE("require_index and require_same_length") {
  CHECK_THROWS_AS(xtalscale::require_index(3, 3, "i"), std::out_of_range);
  CHECK_THROWS_AS(xtalscale::require_index(-1, 3, "i"), std::out_of_range);
  xtalscale::require_index(2, 3, "i");
  CHECK_THROWS_AS(xtalscale::require_same_length(2, 3, "a", "b"), std::invalid_argument);
}

TEST_CASE("library version matches the headers") {
  CHECK(std::string(xtalscale::version()) == XTALSCALE_VERSION_STRING);
}

XS_TEST_MAIN()
