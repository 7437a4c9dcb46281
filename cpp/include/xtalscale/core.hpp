/// @file core.hpp
/// @brief Umbrella header for the xtalscale C++ library (link target xtalscale::core): includes
/// every public header.
///
/// Namespaces: types shared across areas live in `xtalscale` (smoothers, the ASU/grouping
/// kernels, DerivativesView, ModelBlock and its terms, the checks); kernels that belong to one
/// area live in `xtalscale::<area>` (`components`, `harmonics`, `base256`, `fit`: Ih table,
/// target, normal equations); implementation
/// details in `xtalscale::detail`.
#pragma once

#include "xtalscale/base256.hpp"
#include "xtalscale/check.hpp"
#include "xtalscale/components.hpp"
#include "xtalscale/derivatives_view.hpp"
#include "xtalscale/export.hpp"
#include "xtalscale/grouping.hpp"
#include "xtalscale/harmonics.hpp"
#include "xtalscale/ih_table.hpp"
#include "xtalscale/model_block.hpp"
#include "xtalscale/normal_equations.hpp"
#include "xtalscale/smoother.hpp"
#include "xtalscale/target.hpp"
#include "xtalscale/version.hpp"

namespace xtalscale {
/// Version of the compiled library (may differ from the headers if they were mixed up).
XTALSCALE_EXPORT const char* version() noexcept;
}  // namespace xtalscale
