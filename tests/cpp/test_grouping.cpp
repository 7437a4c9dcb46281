// ASU mapping kernel: conditions and the operator search (values checked against gemmi).
#include <cstdint>
#include <stdexcept>
#include <vector>

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

TEST_CASE("group_miller_indices: signed lexicographic groups, stable rows") {
  // (1,0,0) (0,0,1) (1,0,0) (-2,5,5) (0,0,1) (0,-1,3)
  const std::int32_t hkl[18] = {1, 0, 0, 0, 0, 1, 1, 0, 0, -2, 5, 5, 0, 0, 1, 0, -1, 3};
  std::int64_t order[6] = {};
  std::int64_t group[6] = {};
  const auto offsets = xtalscale::group_miller_indices(hkl, 6, order, group);
  // groups: (-2,5,5) < (0,-1,3) < (0,0,1) < (1,0,0)
  const std::int64_t want_order[6] = {3, 5, 1, 4, 0, 2};
  const std::int64_t want_group[6] = {3, 2, 3, 0, 2, 1};
  for (int i = 0; i < 6; ++i) {
    CHECK(order[i] == want_order[i]);
    CHECK(group[i] == want_group[i]);
  }
  CHECK(offsets.size() == 5 && offsets[0] == 0 && offsets[1] == 1 && offsets[2] == 2 &&
        offsets[3] == 4 && offsets[4] == 6);
}

TEST_CASE("map_to_asu_bijvoet: map_to_asu's indices, minus = even ISYM of an acentric index") {
  // C 1 2 1: (1,1,1) -> ISYM 1, (-1,1,-1) -> 3, (-1,-1,-1) -> 2, (1,-1,1) -> 4; (1,0,1) with its
  // mate (-1,0,-1) is centric (the 2-fold about b gives -h), so never a minus mate
  xtalscale::AsuSymmetry sym;
  sym.rotations = {{1, 0, 0, 0, 1, 0, 0, 0, 1}, {-1, 0, 0, 0, 1, 0, 0, 0, -1}};
  sym.condition = AsuCondition::monoclinic;
  const std::int32_t hkl[18] = {1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, 1, 1, 0, 1, -1, 0, -1};
  std::int32_t asu[18] = {}, reference[18] = {}, isym[6] = {};
  std::uint8_t minus[6] = {};
  xtalscale::map_to_asu(sym, hkl, 6, reference, isym);
  xtalscale::map_to_asu_bijvoet(sym, hkl, 6, asu, minus, 2);
  for (int i = 0; i < 18; ++i) CHECK(asu[i] == reference[i]);
  const std::uint8_t want[6] = {0, 0, 1, 1, 0, 0};
  for (int i = 0; i < 6; ++i) CHECK(minus[i] == want[i]);
  const std::int32_t zero[3] = {0, 0, 0};
  CHECK_THROWS_AS(xtalscale::map_to_asu_bijvoet(sym, zero, 1, asu, minus, 2), std::invalid_argument);
}

TEST_CASE("group_miller_indices: the same grouping on any number of threads") {
  std::vector<std::int32_t> hkl(3 * 200000);
  std::uint64_t state = 12345;
  for (auto& v : hkl) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    v = static_cast<std::int32_t>((state >> 33) % 41) - 20;
  }
  const std::size_t n = hkl.size() / 3;
  std::vector<std::int64_t> order1(n), group1(n), order(n), group(n);
  const auto offsets1 = xtalscale::group_miller_indices(hkl.data(), n, order1.data(), group1.data());
  for (int threads : {2, 3, 8}) {
    const auto offsets = xtalscale::group_miller_indices(hkl.data(), n, order.data(), group.data(), threads);
    CHECK(offsets == offsets1);
    CHECK(order == order1);
    CHECK(group == group1);
  }
}

TEST_CASE("group_keys handles negative and extreme keys") {
  const std::int64_t keys[5] = {INT64_MAX, -5, INT64_MIN, -5, 0};
  std::int64_t order[5] = {};
  std::int64_t group[5] = {};
  const auto offsets = xtalscale::group_keys(keys, 5, order, group);
  const std::int64_t want_order[5] = {2, 1, 3, 4, 0};
  for (int i = 0; i < 5; ++i) CHECK(order[i] == want_order[i]);
  CHECK(group[1] == 1 && group[3] == 1 && group[0] == 3 && offsets.size() == 5);
  const auto empty = xtalscale::group_keys(keys, 0, order, group);
  CHECK(empty.size() == 1 && empty[0] == 0);
}

XS_TEST_MAIN()
