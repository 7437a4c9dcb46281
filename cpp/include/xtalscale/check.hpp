/// @file check.hpp
/// @brief Argument validation shared by every public entry point.
///
/// Every function reachable from Python validates its inputs with these helpers. They throw
/// std::invalid_argument (ValueError in Python) or std::out_of_range (IndexError in Python)
/// with a message that names the offending argument, so nothing crashes on bad input.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace xtalscale {

/// Throw std::invalid_argument(message) unless @p condition holds.
inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

/// The same for a literal message: no std::string is made unless the check fails (checks run
/// per element in loops, where building the message every time cost more than the work).
/// A message built by concatenation is built before the call whatever the outcome: write such
/// checks inside loops as `if (!condition) throw ...` (or XS_REQUIRE).
inline void require(bool condition, const char* message) {
  if (!condition) throw std::invalid_argument(message);
}

/// Throw std::out_of_range unless 0 <= index < size; @p what names the index argument.
inline void require_index(std::ptrdiff_t index, std::size_t size, const char* what) {
  if (index < 0 || static_cast<std::size_t>(index) >= size)
    throw std::out_of_range(std::string(what) + ": index " + std::to_string(index) +
                            " is out of range for size " + std::to_string(size));
}

/// Throw std::invalid_argument unless the two lengths agree.
inline void require_same_length(std::size_t a, std::size_t b, const char* name_a,
                                const char* name_b) {
  if (a != b)
    throw std::invalid_argument(std::string(name_a) + " and " + name_b +
                                " must have the same length (got " + std::to_string(a) +
                                " and " + std::to_string(b) + ")");
}

/// The bit tests of the checks below, on a double's 64-bit pattern @p b: the sign bit of the
/// result is set when the value fails. finite_flag: NaN or infinite (exponent all ones ⇔
/// adding one unit of the exponent carries into the sign bit).
constexpr std::uint64_t finite_flag(std::uint64_t b) noexcept {
  return (b & 0x7FF0000000000000ULL) + (std::uint64_t{1} << 52);
}

/// Not finite and > 0: the positive finite doubles are the bit patterns 1 …
/// 0x7FEFFFFFFFFFFFFF (sign bit of: b (negative or −0), b + 2⁵² (inf/NaN), b − 1 (+0)).
constexpr std::uint64_t positive_finite_flag(std::uint64_t b) noexcept {
  return b | (b + (std::uint64_t{1} << 52)) | (b - 1);
}

/// Not finite and >= 0 (−0 passes, as `v >= 0` holds for it): sign bit of b with a nonzero
/// magnitude (negative), or of finite_flag.
constexpr std::uint64_t non_negative_finite_flag(std::uint64_t b) noexcept {
  const std::uint64_t magnitude = b << 1;  // 0 for ±0 only
  return (b & (magnitude | (0 - magnitude))) | finite_flag(b);
}

/// Whether no value's 64-bit pattern gives a word with the sign bit set under @p test: the
/// integer form of the finiteness and sign tests below, ORed over the values in a loop that
/// the compiler vectorises (a comparison of doubles does not, under GCC's default
/// -ftrapping-math).
template <class BitTest>
inline bool no_flagged_bits(const double* values, std::size_t n, BitTest test) noexcept {
  std::uint64_t any_bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t bits;
    std::memcpy(&bits, values + i, sizeof bits);
    any_bad |= test(bits);
  }
  return (any_bad >> 63) == 0;
}

/// True when none of the @p n values is NaN or infinite (exponent all ones ⇔ adding one unit
/// of the exponent carries into the sign bit); no element is named (callers that need one
/// search again, as require_finite does).
inline bool all_finite(const double* values, std::size_t n) noexcept {
  return no_flagged_bits(values, n, finite_flag);
}

/// Throw std::invalid_argument if any of the @p n values is NaN or infinite.
///
/// Every array crossing the boundary is checked, some 10⁸ values per scaling job: blocks of
/// values are tested with all_finite, and only a block that fails is searched for the element
/// the message names.
inline void require_finite(const double* values, std::size_t n, const char* name) {
  constexpr std::size_t kBlock = 256;
  for (std::size_t start = 0; start < n; start += kBlock) {
    const std::size_t end = n - start < kBlock ? n : start + kBlock;
    if (all_finite(values + start, end - start)) continue;
    for (std::size_t i = start; i < end; ++i)
      if (!std::isfinite(values[i]))
        throw std::invalid_argument(std::string(name) + " must be finite (element " +
                                    std::to_string(i) + " is " + std::to_string(values[i]) + ")");
  }
}

/// True when every one of the @p n values is finite and > 0 (scales, factors): the positive
/// finite doubles are the bit patterns 1 … 0x7FEFFFFFFFFFFFFF. Callers search the values again
/// to name a failing element.
inline bool all_positive_finite(const double* values, std::size_t n) noexcept {
  return no_flagged_bits(values, n, positive_finite_flag);
}

/// True when every one of the @p n values is finite and >= 0 (−0 included, as `v >= 0`
/// holds for it).
inline bool all_non_negative_finite(const double* values, std::size_t n) noexcept {
  return no_flagged_bits(values, n, non_negative_finite_flag);
}

/// Throw std::invalid_argument unless @p offsets (n_groups + 1 entries) start at 0 and never
/// decrease: the group boundaries of a grouping (messages are built only on failure).
inline void require_group_offsets(const std::int64_t* offsets, std::size_t n_groups) {
  require(offsets != nullptr, "offsets are required");
  require(offsets[0] == 0, "offsets must start at 0");
  for (std::size_t k = 0; k < n_groups; ++k) {
    if (offsets[k + 1] < offsets[k])
      throw std::invalid_argument("offsets must be non-decreasing (offset " +
                                  std::to_string(k + 1) + " is below offset " +
                                  std::to_string(k) + ")");
  }
}

}  // namespace xtalscale
