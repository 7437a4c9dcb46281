#include "xtalscale/core.hpp"

namespace xtalscale {
const char* version() noexcept { return XTALSCALE_VERSION_STRING; }
}  // namespace xtalscale
