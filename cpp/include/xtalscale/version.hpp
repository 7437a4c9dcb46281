/// @file version.hpp
/// @brief The single source of the xtalscale version (read by CMake and pyproject.toml).
#pragma once

#define XTALSCALE_VERSION_MAJOR 0
#define XTALSCALE_VERSION_MINOR 1
#define XTALSCALE_VERSION_PATCH 0
#define XTALSCALE_VERSION_STRING "0.1.0"

namespace xtalscale {
/// The library version as "major.minor.patch".
inline constexpr const char* version_string = XTALSCALE_VERSION_STRING;
}  // namespace xtalscale
