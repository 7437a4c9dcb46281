// Ih table kernels: validation, scale gathering, Ĩ and group sums (see ih_table.hpp).
#include "xtalscale/ih_table.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fit_parallel.hpp"
#include "internal/row_prefetch.hpp"
#include "xtalscale/check.hpp"

namespace xtalscale::fit {

namespace {

std::string block_name(std::size_t b) { return "block " + std::to_string(b); }

// Build the message only on failure: these checks run once per element on every call.
#define XS_REQUIRE(cond, msg)                         \
  do {                                                \
    if (!(cond)) throw std::invalid_argument(msg);    \
  } while (0)

void check_csr(const FitBlock& block, std::size_t b, std::size_t n_params) {
  const DerivativesView& v = block.view;
  XS_REQUIRE(v.column_offset + v.n_cols <= n_params,
          block_name(b) + ": column_offset + n_cols = " + std::to_string(v.column_offset + v.n_cols) +
              " exceeds the parameter count " + std::to_string(n_params));
  XS_REQUIRE(v.n_rows == 0 || v.scales != nullptr, block_name(b) + ": scales missing");
  if (v.n_cols == 0 && v.indptr == nullptr) return;  // a block with no active parameters
  XS_REQUIRE(v.indptr != nullptr, block_name(b) + ": indptr missing");
  XS_REQUIRE(v.indptr[0] == 0, block_name(b) + ": indptr[0] must be 0");
  for (std::size_t r = 0; r < v.n_rows; ++r) {
    const std::int64_t lo = v.indptr[r];
    const std::int64_t hi = v.indptr[r + 1];
    XS_REQUIRE(hi >= lo, block_name(b) + ": indptr decreases at row " + std::to_string(r));
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int32_t c = v.indices[e];
      XS_REQUIRE(c >= 0 && static_cast<std::size_t>(c) < v.n_cols,
              block_name(b) + ": column index " + std::to_string(c) + " out of range at row " +
                  std::to_string(r));
      XS_REQUIRE(e == lo || c > v.indices[e - 1],
              block_name(b) + ": column indices must be strictly increasing within a row (row " +
                  std::to_string(r) + "); pass a canonical CSR matrix");
      XS_REQUIRE(std::isfinite(v.values[e]),
              block_name(b) + ": derivative not finite at row " + std::to_string(r));
    }
  }
}

}  // namespace

void check_grouped_observations(const GroupedObservations& t) {
  XS_REQUIRE(t.group_offsets != nullptr, "group_offsets missing");
  XS_REQUIRE(t.group_offsets[0] == 0, "group_offsets[0] must be 0");
  for (std::size_t h = 0; h < t.n_groups; ++h)
    XS_REQUIRE(t.group_offsets[h + 1] >= t.group_offsets[h],
            "group_offsets must be non-decreasing (group " + std::to_string(h) + ")");
  XS_REQUIRE(static_cast<std::size_t>(t.group_offsets[t.n_groups]) == t.n_obs,
          "group_offsets must end at the observation count " + std::to_string(t.n_obs));
  require_finite(t.intensities, t.n_obs, "intensities");
  if (all_non_negative_finite(t.weights, t.n_obs)) return;  // else find the element to name
  require_finite(t.weights, t.n_obs, "weights");
  for (std::size_t i = 0; i < t.n_obs; ++i)
    XS_REQUIRE(t.weights[i] >= 0.0, "weights must be >= 0 (row " + std::to_string(i) + ")");
}

namespace {

void check_values(const FitBlock& block, std::size_t b, std::size_t n_params) {
  const DerivativesView& v = block.view;
  XS_REQUIRE(v.column_offset + v.n_cols <= n_params,
             block_name(b) + ": column_offset + n_cols exceeds the parameter count " +
                 std::to_string(n_params));
  // Derivative values are not scanned here (an O(nnz) pass as long as the gradient pass itself):
  // a non-finite derivative makes the kernel's result non-finite, and the binding then runs the
  // full check to name it.
  if (all_positive_finite(v.scales, v.n_rows)) return;  // else find the row to name
  for (std::size_t r = 0; r < v.n_rows; ++r)
    XS_REQUIRE(std::isfinite(v.scales[r]) && v.scales[r] > 0.0,
               block_name(b) + ": scale at row " + std::to_string(r) + " is " +
                   std::to_string(v.scales[r]) + " (scales must be finite and > 0)");
}

}  // namespace

bool identity_rows(const std::vector<FitBlock>& blocks) noexcept {
  return blocks.size() == 1 && blocks[0].table_rows == nullptr;
}

void check_model_blocks(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                        std::size_t n_params, bool structure) {
  if (!structure) {
    std::size_t total = 0;
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      check_values(blocks[b], b, n_params);
      total += blocks[b].view.n_rows;
    }
    XS_REQUIRE(total == t.n_obs, "the model blocks cover " + std::to_string(total) +
                                     " rows but the table has " + std::to_string(t.n_obs));
    return;
  }
  if (identity_rows(blocks) && blocks[0].view.n_rows == t.n_obs) {  // no row map to check
    check_csr(blocks[0], 0, n_params);
    check_values(blocks[0], 0, n_params);
    return;
  }
  std::vector<unsigned char> covered(t.n_obs, 0);
  std::size_t total = 0;
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const FitBlock& block = blocks[b];
    const DerivativesView& v = block.view;
    check_csr(block, b, n_params);
    for (std::size_t r = 0; r < v.n_rows; ++r) {
      const std::int64_t row = block.table_rows ? block.table_rows[r] : static_cast<std::int64_t>(r);
      XS_REQUIRE(row >= 0 && static_cast<std::size_t>(row) < t.n_obs,
              block_name(b) + ": table row " + std::to_string(row) + " out of range at row " +
                  std::to_string(r));
      XS_REQUIRE(!covered[static_cast<std::size_t>(row)],
              block_name(b) + ": table row " + std::to_string(row) + " is mapped twice");
      covered[static_cast<std::size_t>(row)] = 1;
      const double g = v.scales[r];
      XS_REQUIRE(std::isfinite(g) && g > 0.0,
              block_name(b) + ": scale at row " + std::to_string(r) + " is " + std::to_string(g) +
                  " (scales must be finite and > 0)");
    }
    total += v.n_rows;
  }
  XS_REQUIRE(total == t.n_obs, "the model blocks cover " + std::to_string(total) +
                                " rows but the table has " + std::to_string(t.n_obs));
}

void gather_scales(const std::vector<FitBlock>& blocks, double* g_table, int n_threads) {
  const auto chunks = detail::block_chunks(blocks);
  detail::parallel_for(chunks.size(), n_threads, [&](std::size_t c) {
    const auto& ch = chunks[c];
    const FitBlock& block = blocks[ch.block];
    for (std::size_t r = ch.first; r < ch.last; ++r)
      g_table[detail::table_row(block, r)] = block.view.scales[r];
  });
}

void calc_Ih(const GroupedObservations& t, const double* g, double* Ih, double* S, int n_threads) {
  const std::size_t n_chunks = (t.n_groups + detail::kChunkRows - 1) / detail::kChunkRows;
  detail::parallel_for(n_chunks, n_threads, [&](std::size_t c) {
    const std::size_t h_end = std::min(t.n_groups, (c + 1) * detail::kChunkRows);
    for (std::size_t h = c * detail::kChunkRows; h < h_end; ++h) {
      const detail::GroupSums sums = detail::group_sums(t, g, h);
      Ih[h] = sums.wgg > 0.0 ? sums.wgi / sums.wgg : 0.0;
      if (S) S[h] = sums.wgg;
    }
  });
}

void calc_Ih_rows(std::size_t n_groups, const std::int64_t* order, const std::int64_t* offsets,
                  const double* intensity, const double* weight, const double* g, double* Ih_rows) {
  xtalscale::detail::RowPrefetcher prefetch(order, offsets[n_groups], {intensity, weight, g});
  for (std::size_t h = 0; h < n_groups; ++h) {
    const std::int64_t begin = offsets[h], end = offsets[h + 1];
    prefetch.ahead_of(end);
    // the same operations in the same order as group_sums over the table-order copies
    double wgg = 0.0, wgi = 0.0;
    for (auto l = begin; l < end; ++l) {
      const auto r = order[l];
      const double I = std::isfinite(intensity[r]) ? intensity[r] : 0.0;
      const double wg = weight[r] * g[r];
      wgg += wg * g[r];
      wgi += wg * I;
    }
    const double Ih = wgg > 0.0 ? wgi / wgg : 0.0;
    for (auto l = begin; l < end; ++l) Ih_rows[order[l]] = Ih;
  }
}

namespace {

[[noreturn]] void bad_block_row(std::size_t s, std::size_t i, const std::string& what) {
  throw std::invalid_argument("source " + std::to_string(s) + ", block row " + std::to_string(i) + ": " + what);
}

// Rows gathered per chunk (each field of a chunk in its own loop): small enough for the
// chunk's row maps to stay in L1.
constexpr std::size_t kGatherChunk = 256;

}  // namespace

void build_block(const std::vector<BlockSource>& sources, const std::int64_t* group_map, std::size_t n_map,
                 std::size_t n_groups, const BlockArrays& out) {
  const std::size_t n_cols = out.columns.size();
  XS_REQUIRE(n_cols >= 3, "build_block needs the intensity, variance and inverse scale factor columns");
  for (std::size_t s = 0; s < sources.size(); ++s)
    XS_REQUIRE(sources[s].columns.size() == n_cols,
               "source " + std::to_string(s) + " has " + std::to_string(sources[s].columns.size()) +
                   " columns, expected " + std::to_string(n_cols));
  std::int64_t* const counts = out.offsets;  // counts of group h at [h + 1], then the offsets
  std::fill(counts, counts + n_groups + 1, std::int64_t{0});
  const auto limit = static_cast<std::int64_t>(n_groups);
  // The rows are read in chunks, each field in its own tight loop: the reads of a loop are
  // independent (scattered over the columns), so many cache misses are in flight at once.
  std::int64_t col_row[kGatherChunk];
  std::int64_t sel_group[kGatherChunk];
  std::size_t o = 0;  // block row
  // pass 1: gather every row (source after source), its weight and code; count its group
  for (std::size_t s = 0; s < sources.size(); ++s) {
    const BlockSource& src = sources[s];
    const std::int64_t* cmap = src.column_rows;
    const std::int64_t* loc = src.loc_indices;
    const auto n_sel = static_cast<std::int64_t>(src.n_selected);
    const auto n_colrows = static_cast<std::int64_t>(src.n_column_rows);
    std::int64_t* sel_out = s < out.selections.size() ? out.selections[s] : nullptr;
    const auto id = static_cast<std::int64_t>(s);
    for (std::size_t i0 = 0; i0 < src.n_rows; i0 += kGatherChunk) {
      const std::size_t m = std::min(kGatherChunk, src.n_rows - i0);
      const std::int64_t* rows = src.rows + i0;
      for (std::size_t j = 0; j < m; ++j)
        if (rows[j] < 0 || rows[j] >= n_sel)
          bad_block_row(s, i0 + j, "row " + std::to_string(rows[j]) + " is outside [0, " + std::to_string(n_sel) + ")");
      if (cmap) {
        for (std::size_t j = 0; j < m; ++j) col_row[j] = cmap[rows[j]];
        for (std::size_t j = 0; j < m; ++j)
          if (col_row[j] < 0 || col_row[j] >= n_colrows)
            bad_block_row(s, i0 + j, "column row " + std::to_string(col_row[j]) + " is outside [0, " +
                                         std::to_string(n_colrows) + ")");
      } else {
        for (std::size_t j = 0; j < m; ++j) col_row[j] = rows[j];  // n_selected <= n_column_rows
      }
      std::int64_t* lo = out.loc_indices + o;
      if (loc) {
        for (std::size_t j = 0; j < m; ++j) lo[j] = loc[rows[j]];
      } else {
        for (std::size_t j = 0; j < m; ++j) lo[j] = col_row[j];
      }
      if (sel_out) std::copy(lo, lo + m, sel_out + i0);
      std::int64_t* gid = out.group_ids + o;
      const std::int64_t* grp = sel_group;
      if (src.groups_per_row) {
        grp = src.groups + i0;  // read in order
      } else {
        for (std::size_t j = 0; j < m; ++j) sel_group[j] = src.groups[rows[j]];
      }
      if (group_map) {
        for (std::size_t j = 0; j < m; ++j) {
          const std::int64_t g = grp[j];
          if (g < 0 || static_cast<std::size_t>(g) >= n_map)
            bad_block_row(s, i0 + j, "group number " + std::to_string(g) + " is outside [0, " + std::to_string(n_map) + ")");
          gid[j] = group_map[g];
        }
      } else {
        std::copy(grp, grp + m, gid);
      }
      for (std::size_t j = 0; j < m; ++j) {
        const std::int64_t h = gid[j];
        if (h < 0 || h >= limit)
          bad_block_row(s, i0 + j, "block group " + std::to_string(h) + " is outside [0, " + std::to_string(n_groups) + ")");
        ++counts[h + 1];
      }
      std::fill(out.dataset_id + o, out.dataset_id + o + m, id);
      for (std::size_t c = 0; c < n_cols; ++c) {
        const double* in = src.columns[c];
        double* dst = out.columns[c] + o;
        for (std::size_t j = 0; j < m; ++j) dst[j] = in[col_row[j]];
      }
      // weights and exclusion codes: σ² not finite and > 0 → 1, I not finite → 2 (wins)
      const double* I = out.columns[0] + o;
      const double* V = out.columns[1] + o;
      const double* g = out.columns[2] + o;
      for (std::size_t j = 0; j < m; ++j) {
        const bool bad_i = !std::isfinite(I[j]);
        const bool bad_v = !(std::isfinite(V[j]) && V[j] > 0.0);
        const double w = (bad_i || bad_v) ? 0.0 : 1.0 / V[j];
        out.weights[o + j] = w;
        out.exclusion[o + j] = static_cast<std::uint8_t>(bad_i ? 2 : (bad_v ? 1 : 0));
      }
      if (!all_finite(out.weights + o, m) || !all_finite(g, m)) {
        for (std::size_t j = 0; j < m; ++j) {
          if (!std::isfinite(out.weights[o + j]))
            bad_block_row(s, i0 + j, "weight 1/variance is not finite (variance " + std::to_string(V[j]) + ")");
          if (!std::isfinite(g[j]))
            bad_block_row(s, i0 + j, "inverse scale factor " + std::to_string(g[j]) + " is not finite");
        }
      }
      o += m;
    }
  }
  // pass 2: the stable group order (a counting sort) and its inverse
  for (std::size_t h = 0; h < n_groups; ++h) counts[h + 1] += counts[h];
  const std::int64_t* offsets = counts;
  std::vector<std::int64_t> next(offsets, offsets + n_groups);
  for (std::size_t k = 0; k < o; ++k) {
    const std::int64_t pos = next[static_cast<std::size_t>(out.group_ids[k])]++;
    out.order[pos] = static_cast<std::int64_t>(k);
    out.table_rows[k] = pos;
  }
  // Ĩ: the one kernel every block's Ĩ goes through
  calc_Ih_rows(n_groups, out.order, offsets, out.columns[0], out.weights, out.columns[2], out.Ih);
}

void sum_in_groups(const GroupedObservations& t, const double* values, double* sums) {
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    double s = 0.0;
    for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) s += values[l];
    sums[h] = s;
  }
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace xtalscale::fit
