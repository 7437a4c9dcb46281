/// @file target.hpp
/// @brief The scaling target f = Σ w (I − g Ĩ)² and its gradient in one streaming pass.
///
/// Envelope theorem: Ĩ_h = argmin_Ĩ Σ_{l∈h} w (I − g Ĩ)², so ∂f/∂Ĩ_h = 0 and the total derivative
/// df/dp = ∂f/∂p + Σ_h ∂f/∂Ĩ_h · ∂Ĩ_h/∂p reduces to its first term:
///     ∂f/∂p_j = Σ_l −2 w_l r_l Ĩ_h(l) ∂g_l/∂p_j.
/// DIALS computes the second term explicitly (it is zero up to rounding); this kernel omits it,
/// which is exact whenever Ĩ is recomputed from the same g and w (always, here). With a fixed
/// (reference) Ĩ the same formula is the exact gradient of the fixed-Ĩ target.
#pragma once

#include <cstddef>
#include <vector>

#include "xtalscale/export.hpp"
#include "xtalscale/ih_table.hpp"

namespace xtalscale::fit {

/// Optional per-call inputs and outputs of the target kernels. Output pointers may be nullptr.
struct TargetOptions {
  const double* fixed_Ih = nullptr;  ///< table order; when set Ĩ is not recomputed (targeted scaling)
  double* Ih_out = nullptr;          ///< Ĩ per table row (n_obs)
  double* residuals_out = nullptr;   ///< r = I − g Ĩ per table row (n_obs)
  double* g_out = nullptr;           ///< g per table row (n_obs)
  double* dfdg_out = nullptr;        ///< ∂f/∂g = −2 w r Ĩ per table row (n_obs): with a model's
                                     ///< transposed product, the gradient without ∂g/∂p
  int n_threads = 1;                 ///< threads; results are identical for any value
};

/// f = Σ w r² over all rows and, if @p gradient is not nullptr, df/dp (n_params values, written,
/// not accumulated). Blocks must have passed check_model_blocks. Deterministic: partial sums
/// are formed over fixed row chunks (independent of n_threads) and reduced in chunk order.
XTALSCALE_EXPORT double functional_and_gradient(const GroupedObservations& table,
                                                const std::vector<FitBlock>& blocks,
                                                std::size_t n_params, double* gradient,
                                                const TargetOptions& options = {});

}  // namespace xtalscale::fit
