// Reciprocal-space ASU mapping (see grouping.hpp).
#include "xtalscale/grouping.hpp"

#include <stdexcept>
#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale {

bool in_asu(AsuCondition c, std::int64_t h, std::int64_t k, std::int64_t l) {
  switch (c) {
    case AsuCondition::triclinic: return l > 0 || (l == 0 && (h > 0 || (h == 0 && k >= 0)));
    case AsuCondition::monoclinic: return k >= 0 && (l > 0 || (l == 0 && h >= 0));
    case AsuCondition::orthorhombic: return h >= 0 && k >= 0 && l >= 0;
    case AsuCondition::tetragonal_low: return l >= 0 && ((h >= 0 && k > 0) || (h == 0 && k == 0));
    case AsuCondition::tetragonal_high: return h >= k && k >= 0 && l >= 0;
    case AsuCondition::trigonal_low: return (h >= 0 && k > 0) || (h == 0 && k == 0 && l >= 0);
    case AsuCondition::trigonal_312: return h >= k && k >= 0 && (k > 0 || l >= 0);
    case AsuCondition::trigonal_321: return h >= k && k >= 0 && (h > k || l >= 0);
    case AsuCondition::cubic_low: return h >= 0 && ((l >= h && k > h) || (l == h && k == h));
    case AsuCondition::cubic_high: return k >= l && l >= h && h >= 0;
  }
  return false;
}

namespace {

struct Tester {
  const AsuSymmetry& s;
  bool identity;
  bool operator()(std::int64_t h, std::int64_t k, std::int64_t l) const {
    if (identity) return in_asu(s.condition, h, k, l);
    const auto& m = s.basis;
    return in_asu(s.condition, h * m[0] + k * m[3] + l * m[6], h * m[1] + k * m[4] + l * m[7],
                  h * m[2] + k * m[5] + l * m[8]);
  }
};

}  // namespace

void map_to_asu(const AsuSymmetry& sym, const std::int32_t* hkl, std::size_t n,
                std::int32_t* asu_out, std::int32_t* isym_out) {
  require(!sym.rotations.empty(), "symmetry: at least one rotation is required");
  require(static_cast<int>(sym.condition) >= 0 && static_cast<int>(sym.condition) <= 9,
          "symmetry: unknown ASU condition");
  const std::array<std::int64_t, 9> id{1, 0, 0, 0, 1, 0, 0, 0, 1};
  const Tester in{sym, sym.basis == id};
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t h = hkl[3 * i], k = hkl[3 * i + 1], l = hkl[3 * i + 2];
    if (h == 0 && k == 0 && l == 0)
      throw std::invalid_argument("hkl: row " + std::to_string(i) +
                                  " is (0, 0, 0), which has no ASU image");
    bool found = false;
    for (std::size_t j = 0; j < sym.rotations.size() && !found; ++j) {
      const auto& r = sym.rotations[j];
      // Reciprocal indices transform as the row vector h R.
      const std::int64_t a = h * r[0] + k * r[3] + l * r[6];
      const std::int64_t b = h * r[1] + k * r[4] + l * r[7];
      const std::int64_t c = h * r[2] + k * r[5] + l * r[8];
      int sign = 0;
      if (in(a, b, c)) sign = 1;
      else if (in(-a, -b, -c)) sign = -1;
      if (sign != 0) {
        asu_out[3 * i] = static_cast<std::int32_t>(sign * a);
        asu_out[3 * i + 1] = static_cast<std::int32_t>(sign * b);
        asu_out[3 * i + 2] = static_cast<std::int32_t>(sign * c);
        isym_out[i] = static_cast<std::int32_t>(2 * j + (sign > 0 ? 1 : 2));
        found = true;
      }
    }
    if (!found)
      throw std::invalid_argument("hkl: row " + std::to_string(i) +
                                  " has no image in the ASU (inconsistent symmetry)");
  }
}

}  // namespace xtalscale
