// scitbx base-256 codec (legacy DIALS pickles): exact round trips and untrusted-input checks.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.hpp"
#include "xtalscale/base256.hpp"

namespace b256 = xtalscale::base256;

namespace {
const std::uint8_t* bytes(const std::string& s) {
  return reinterpret_cast<const std::uint8_t*>(s.data());
}
}  // namespace

TEST_CASE("doubles round-trip bit-exactly, including extremes") {
  const std::vector<double> v{0.0, 1.0, -1.0, 0.1, 3.141592653589793, -1e-300,
                              std::numeric_limits<double>::denorm_min(),
                              std::numeric_limits<double>::max(), -2.2250738585072014e-308};
  const std::string s = b256::encode(b256::Scalar::Float64, v.data(), v.size(), 1);
  std::size_t pos = 0;
  CHECK(b256::decode_count(bytes(s), s.size(), pos, "t") == v.size());
  std::vector<double> out(v.size());
  b256::decode_values(bytes(s), s.size(), pos, b256::Scalar::Float64, v.size(), out.data(), "t");
  CHECK(pos == s.size());
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(out[i] == v[i]);
}

TEST_CASE("known scitbx encodings") {
  // count 2 -> 0x02 0x02; 5308 -> length byte 3, then 0xBC 0x14 (little-endian); -1 -> 0x82 0x01; 1.0 -> 0x02 0x80 0x01 0x01
  const std::int32_t ints[2] = {5308, -1};
  const std::string s = b256::encode(b256::Scalar::Int32, ints, 2, 1);
  CHECK(s == std::string("\x02\x02\x03\xbc\x14\x82\x01", 7));
  const double one = 1.0;
  CHECK(b256::encode(b256::Scalar::Float64, &one, 1, 1) == std::string("\x02\x01\x02\x80\x02\x01", 6));
}

TEST_CASE("truncated and oversize input is rejected, never over-read") {
  const std::string trunc("\x09\x01\x02", 3);  // claims an 8-byte mantissa, has 2 bytes
  double d = 0;
  std::size_t pos = 0;
  CHECK_THROWS_AS(b256::decode_values(bytes(trunc), trunc.size(), pos, b256::Scalar::Float64, 1,
                                      &d, "t"),
                  std::invalid_argument);
  const std::string big("\x06\x00\x00\x00\x00\x01", 6);  // 2^32 does not fit int32
  std::int32_t i = 0;
  pos = 0;
  CHECK_THROWS_AS(b256::decode_values(bytes(big), big.size(), pos, b256::Scalar::Int32, 1, &i, "t"),
                  std::invalid_argument);
  const std::string badbool("x", 1);
  bool b = false;
  pos = 0;
  CHECK_THROWS_AS(b256::decode_values(bytes(badbool), 1, pos, b256::Scalar::Bool, 1, &b, "t"),
                  std::invalid_argument);
  pos = 0;
  CHECK_THROWS_AS(b256::decode_count(bytes(std::string()), 0, pos, "t"), std::invalid_argument);
}

XS_TEST_MAIN()
