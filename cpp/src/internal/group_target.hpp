// The chunking and group pass shared by ModelBlock::functional_and_gradient (one model, one
// dataset) and fit::model_functional_and_gradient (several models in one table): one
// definition (in model_block.cpp), so that both sum the same chunks with the same operations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "xtalscale/ih_table.hpp"

namespace xtalscale::detail {

/// Chunks of whole groups of the one-pass f+g: row bounds (from 0 to n_obs) and the matching
/// group bounds. A chunk ends at the first group end at least @p chunk_rows rows after its
/// start (0: 4096, ModelBlock::functional_and_gradient's; a longer group is a chunk of its
/// own): fixed by the data alone, never by the thread count.
/// @throws std::invalid_argument (naming the fault) for offsets that do not describe the rows.
std::pair<std::vector<std::size_t>, std::vector<std::size_t>> group_chunks(
    const fit::GroupedObservations& table, std::size_t chunk_rows = 0);

/// The target kernel's operations on @p n_groups groups (@p off: their offsets, rows counted
/// from @p base; @p w, @p inten, @p g, @p dfdg and @p ih indexed from that row): f returned,
/// ∂f/∂g = −2 w r Ĩ per row into @p dfdg (Ĩ of each group held: the envelope theorem) and,
/// when @p ih is given, each row's Ĩ (fit::detail::group_sums's order: calc_Ih's bits).
double groups_target(const std::int64_t* off, std::size_t n_groups, std::int64_t base,
                     const double* w, const double* inten, const double* g, double* dfdg,
                     double* ih = nullptr);

}  // namespace xtalscale::detail
