// ASU mapping kernel: conditions and the operator search (values checked against gemmi).
#include <cstdint>
#include <stdexcept>

#include "harness.hpp"
#include "xtalscale/grouping.hpp"

using xtalscale::AsuCondition;

TEST_CASE("ASU conditions") {
  CHECK(xtalscale::in_asu(AsuCondition::orthorhombic, 1, 2, 3));
  CHECK(!xtalscale::in_asu(AsuCondition::orthorhombic, -1, 2, 3));
  CHECK(xtalscale::in_asu(AsuCondition::tetragonal_high, 3, 2, 0));
  CHECK(!xtalscale::in_asu(AsuCondition::tetragonal_high, 2, 3, 0));
  CHECK(xtalscale::in_asu(AsuCondition::triclinic, 0, 1, 0));
  CHECK(!xtalscale::in_asu(AsuCondition::triclinic, 0, -1, 0));
}

TEST_CASE("C2 (b unique) mapping with ISYM") {
  // C 1 2 1 primitive rotations in gemmi order: identity, then 2-fold about b.
  xtalscale::AsuSymmetry sym;
  sym.rotations = {{1, 0, 0, 0, 1, 0, 0, 0, 1}, {-1, 0, 0, 0, 1, 0, 0, 0, -1}};
  sym.condition = AsuCondition::monoclinic;
  const std::int32_t hkl[12] = {1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, 1};
  std::int32_t asu[12] = {};
  std::int32_t isym[4] = {};
  xtalscale::map_to_asu(sym, hkl, 4, asu, isym);
  for (int i = 0; i < 4; ++i) {
    CHECK(asu[3 * i] == 1 && asu[3 * i + 1] == 1 && asu[3 * i + 2] == 1);
  }
  CHECK(isym[0] == 1 && isym[1] == 3 && isym[2] == 2 && isym[3] == 4);
}

TEST_CASE("(0,0,0) and empty operator lists are rejected") {
  xtalscale::AsuSymmetry sym;
  sym.rotations = {{1, 0, 0, 0, 1, 0, 0, 0, 1}};
  const std::int32_t zero[3] = {0, 0, 0};
  std::int32_t asu[3] = {};
  std::int32_t isym[1] = {};
  CHECK_THROWS_AS(xtalscale::map_to_asu(sym, zero, 1, asu, isym), std::invalid_argument);
  xtalscale::AsuSymmetry empty;
  empty.rotations.clear();
  const std::int32_t one[3] = {1, 0, 0};
  CHECK_THROWS_AS(xtalscale::map_to_asu(empty, one, 1, asu, isym), std::invalid_argument);
}

XS_TEST_MAIN()
