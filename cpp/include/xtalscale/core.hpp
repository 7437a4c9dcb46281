/// @file core.hpp
/// @brief Umbrella header for the xtalscale C++ library (link target xtalscale::core).
#pragma once

#include "xtalscale/check.hpp"
#include "xtalscale/export.hpp"
#include "xtalscale/version.hpp"

namespace xtalscale {
/// Version of the compiled library (may differ from the headers if they were mixed up).
XTALSCALE_EXPORT const char* version() noexcept;
}  // namespace xtalscale
