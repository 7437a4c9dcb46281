// scitbx single-buffered base-256 codec (legacy DIALS pickles); see base256.hpp.
#include "xtalscale/base256.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace xtalscale::base256 {
namespace {

[[noreturn]] void fail(const char* what, std::size_t pos, const std::string& problem) {
  throw std::invalid_argument(std::string(what) + ": " + problem + " at byte " +
                              std::to_string(pos));
}

// x * 2^k. For k in the normal range this is one multiplication by an exactly-built power of
// two (exact for the integer mantissas used here); otherwise std::ldexp handles the edges.
inline double scale_by_power_of_two(double x, int k) {
  if (k >= -1022 && k <= 1023) {
    const std::uint64_t bits = static_cast<std::uint64_t>(k + 1023) << 52;
    double p;
    std::memcpy(&p, &bits, sizeof p);
    return x * p;
  }
  return std::ldexp(x, k);
}

// One base-256 integer: returns the magnitude and sets `negative`. The length byte's low 7
// bits count itself plus the magnitude bytes; 0 encodes the value zero in one byte.
inline std::uint64_t read_int(const std::uint8_t* data, std::size_t size, std::size_t& pos,
                              bool& negative, const char* what) {
  if (pos >= size) fail(what, pos, "truncated data (expected an integer)");
  const std::uint8_t head = data[pos];
  const std::size_t len = head & 0x7FU;
  negative = head > 128;
  if (len == 0) {
    ++pos;
    return 0;
  }
  if (len - 1 > 8) fail(what, pos, "integer longer than 8 bytes");
  if (pos + len > size) fail(what, pos, "truncated data (integer runs past the end)");
  std::uint64_t value = 0;
  for (std::size_t k = len - 1; k >= 1; --k) value = (value << 8) | data[pos + k];
  pos += len;
  return value;
}

inline double read_double(const std::uint8_t* data, std::size_t size, std::size_t& pos,
                          const char* what) {
  if (pos >= size) fail(what, pos, "truncated data (expected a double)");
  const std::size_t start = pos;
  const std::uint8_t head = data[pos];
  const std::size_t len = head & 0x7FU;
  if (len == 0) {
    ++pos;
    return 0.0;
  }
  if (len - 1 > 8) fail(what, pos, "double mantissa longer than 8 bytes");
  if (pos + len > size) fail(what, pos, "truncated data (double runs past the end)");
  // Mantissa bytes are successive base-256 fraction digits, most significant first. Gather
  // them into one integer M, so value = M * 2^(e - 8*(len-1)): exact for everything scitbx
  // writes (at most 53 significant bits), and far cheaper than a digit-by-digit division.
  std::uint64_t mantissa = 0;
  for (std::size_t k = 1; k < len; ++k) mantissa = (mantissa << 8) | data[pos + k];
  pos += len;
  bool exp_negative = false;
  const std::uint64_t e = read_int(data, size, pos, exp_negative, what);
  if (e > 1100) fail(what, start, "double exponent out of range");
  const int exponent = (exp_negative ? -static_cast<int>(e) : static_cast<int>(e)) -
                       8 * static_cast<int>(len - 1);
  const double value = scale_by_power_of_two(static_cast<double>(mantissa), exponent);
  return head > 128 ? -value : value;
}

template <typename Out, typename Fn>
void decode_loop(std::size_t n, void* out, Fn&& one) {
  Out* o = static_cast<Out*>(out);
  for (std::size_t i = 0; i < n; ++i) o[i] = one();
}

inline void write_uint(std::string& s, std::uint64_t magnitude, bool negative) {
  if (magnitude == 0) {
    s.push_back('\0');
    return;
  }
  unsigned char digits[8];
  std::size_t n = 0;
  while (magnitude != 0) {
    digits[n++] = static_cast<unsigned char>(magnitude & 0xFFU);
    magnitude >>= 8;
  }
  s.push_back(static_cast<char>((negative ? 128 : 0) + n + 1));
  s.append(reinterpret_cast<const char*>(digits), n);
}

inline void write_int(std::string& s, std::int64_t v) {
  // Magnitude of the most negative value is computed in unsigned arithmetic to avoid overflow.
  const bool neg = v < 0;
  const std::uint64_t mag = neg ? (~static_cast<std::uint64_t>(v) + 1U) : static_cast<std::uint64_t>(v);
  write_uint(s, mag, neg);
}

inline void write_double(std::string& s, double v) {
  if (!std::isfinite(v)) throw std::invalid_argument("base-256 encoding: value is not finite");
  if (v == 0.0) {
    s.push_back('\0');
    return;
  }
  const bool neg = v < 0;
  int e = 0;
  double f = std::frexp(neg ? -v : v, &e);
  const std::size_t head = s.size();
  s.push_back('\0');
  std::size_t n = 0;
  for (; n < sizeof(double);) {
    f *= 256.0;
    const int d = static_cast<int>(f);
    s.push_back(static_cast<char>(d));
    ++n;
    f -= d;
    if (f == 0.0) break;
  }
  s[head] = static_cast<char>((neg ? 128 : 0) + n + 1);
  write_int(s, e);
}

}  // namespace

std::uint64_t decode_count(const std::uint8_t* data, std::size_t size, std::size_t& pos,
                           const char* what) {
  bool negative = false;
  const std::uint64_t n = read_int(data, size, pos, negative, what);
  if (negative) fail(what, 0, "negative element count");
  return n;
}

void decode_values(const std::uint8_t* data, std::size_t size, std::size_t& pos_io, Scalar kind,
                   std::size_t n_values, void* out, const char* what) {
  // Work on a local cursor (kept in a register), published back once at the end.
  std::size_t pos = pos_io;
  struct Publish {
    std::size_t& dst;
    const std::size_t& src;
    ~Publish() { dst = src; }
  } publish{pos_io, pos};
  switch (kind) {
    case Scalar::Float64:
      decode_loop<double>(n_values, out, [&] { return read_double(data, size, pos, what); });
      return;
    case Scalar::Int32:
      decode_loop<std::int32_t>(n_values, out, [&] {
        bool neg = false;
        const std::size_t at = pos;
        const std::uint64_t m = read_int(data, size, pos, neg, what);
        if (m > (neg ? 2147483648ULL : 2147483647ULL)) fail(what, at, "value does not fit int32");
        return static_cast<std::int32_t>(neg ? -static_cast<std::int64_t>(m)
                                             : static_cast<std::int64_t>(m));
      });
      return;
    case Scalar::UInt64:
      decode_loop<std::uint64_t>(n_values, out, [&] {
        bool neg = false;
        const std::size_t at = pos;
        const std::uint64_t m = read_int(data, size, pos, neg, what);
        if (neg && m != 0) fail(what, at, "negative value in an unsigned column");
        return m;
      });
      return;
    case Scalar::Bool:
      decode_loop<bool>(n_values, out, [&] {
        if (pos >= size) fail(what, pos, "truncated data (expected a bool)");
        const std::uint8_t c = data[pos];
        if (c != '0' && c != '1') fail(what, pos, "bool byte is neither '0' nor '1'");
        ++pos;
        return c == '1';
      });
      return;
  }
  throw std::invalid_argument(std::string(what) + ": unknown scalar kind");
}

std::string encode(Scalar kind, const void* values, std::size_t n_elements,
                   std::size_t n_components) {
  std::string s;
  const std::size_t n = n_elements * n_components;
  s.reserve(16 + n * (kind == Scalar::Float64 ? 10 : kind == Scalar::Bool ? 1 : 3));
  write_uint(s, n_elements, false);
  switch (kind) {
    case Scalar::Float64: {
      const double* v = static_cast<const double*>(values);
      for (std::size_t i = 0; i < n; ++i) write_double(s, v[i]);
      break;
    }
    case Scalar::Int32: {
      const std::int32_t* v = static_cast<const std::int32_t*>(values);
      for (std::size_t i = 0; i < n; ++i) write_int(s, v[i]);
      break;
    }
    case Scalar::UInt64: {
      const std::uint64_t* v = static_cast<const std::uint64_t*>(values);
      for (std::size_t i = 0; i < n; ++i) write_uint(s, v[i], false);
      break;
    }
    case Scalar::Bool: {
      const bool* v = static_cast<const bool*>(values);
      for (std::size_t i = 0; i < n; ++i) s.push_back(v[i] ? '1' : '0');
      break;
    }
  }
  return s;
}

}  // namespace xtalscale::base256
