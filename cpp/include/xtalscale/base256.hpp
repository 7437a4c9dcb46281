/// @file base256.hpp
/// @brief Codec for the scitbx "single buffered" base-256 encoding used by legacy DIALS pickles.
///
/// Legacy (Python 2) DIALS reflection-table pickles store each flex column as a byte string:
/// a base-256 element count followed by the values, each written as a variable-length
/// base-256 number (integers: a length byte whose high bit is the sign, then little-endian
/// magnitude bytes; doubles: a signed length byte, big-endian-fraction mantissa bytes and a
/// base-256 integer exponent; bools: the characters '1'/'0'). Fixed-size vector elements
/// (vec3, miller index, int6, ...) store their components one after another.
///
/// Every decoder validates the input as untrusted: a truncated buffer, an over-long number
/// or a value that does not fit the target type raises std::invalid_argument naming
/// @p what and the byte offset; nothing reads past the buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "xtalscale/export.hpp"

namespace xtalscale::base256 {

/// The scalar type of the values in one encoded column.
enum class Scalar { Int32, UInt64, Float64, Bool };

/// Decode the leading element count of an encoded column; @p pos is advanced past it.
XTALSCALE_EXPORT std::uint64_t decode_count(const std::uint8_t* data, std::size_t size, std::size_t& pos,
                           const char* what);

/// Decode @p n_values scalars of type @p kind starting at @p pos into @p out (which must hold
/// n_values elements of the matching C type: int32_t, uint64_t, double or bool).
/// @p pos is advanced past the last value.
XTALSCALE_EXPORT void decode_values(const std::uint8_t* data, std::size_t size, std::size_t& pos, Scalar kind,
                   std::size_t n_values, void* out, const char* what);

/// Encode @p n_elements elements of @p n_components scalars each (count prefix + values),
/// exactly as scitbx writes them, so DIALS/cctbx can read the result.
XTALSCALE_EXPORT std::string encode(Scalar kind, const void* values, std::size_t n_elements,
                   std::size_t n_components);

}  // namespace xtalscale::base256
