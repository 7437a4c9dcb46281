// The scaling target and its gradient over a table whose rows come from several C++ model
// blocks (several datasets whose groups span them), in one pass over chunks of whole groups
// (see model_functional_and_gradient in normal_equations.hpp). Per chunk: each model's rows
// evaluated once into per-thread scratch, g scattered to table order, the groups' f and ∂f/∂g,
// then each model's transposed product gathered back from table order, all while the chunk
// is in cache; the three-call path (g per block, the target, the transposed products) makes
// three passes over memory and evaluates every model twice.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "fit_parallel.hpp"  // parallel_for_rethrowing, thread_number
#include "internal/group_target.hpp"
#include "internal/kernel_support.hpp"  // XS_MULTIVERSION
#include "internal/large_buffers.hpp"
#include "xtalscale/check.hpp"
#include "xtalscale/normal_equations.hpp"

namespace xtalscale::fit {

namespace {

using xtalscale::detail::sized;

/// Throws unless every model fits its block, the table and the parameter vector, and the models
/// hold n_obs rows in all. Their table rows are checked by the chunks as they read them
/// (rows_in_order, tiles_model_rows); check_model_rows names a fault.
void check_models(const GroupedObservations& t, const std::vector<TableModel>& models,
                  std::size_t n_params) {
  std::size_t total = 0;
  for (std::size_t k = 0; k < models.size(); ++k) {
    const TableModel& m = models[k];
    const std::string name = "model " + std::to_string(k);
    require(m.block != nullptr, name + ": block is null");
    if (!m.block->evaluates_rows())
      throw std::logic_error(name + ": a term of its model block does not evaluate row ranges");
    require(m.n_params == m.block->n_params(),
            name + ": params must hold " + std::to_string(m.block->n_params()) + " values, got " +
                std::to_string(m.n_params));
    require_finite(m.params, m.n_params, (name + " params").c_str());
    require(m.first_row <= m.block->n_rows() && m.n_rows <= m.block->n_rows() - m.first_row,
            name + ": rows [" + std::to_string(m.first_row) + ", " +
                std::to_string(m.first_row + m.n_rows) + ") outside its block's " +
                std::to_string(m.block->n_rows()) + " rows");
    require(m.column_offset <= n_params && m.block->n_cols() <= n_params - m.column_offset,
            name + ": columns [" + std::to_string(m.column_offset) + ", " +
                std::to_string(m.column_offset + m.block->n_cols()) + ") outside n_params = " +
                std::to_string(n_params));
    require(m.n_rows == 0 || m.table_rows != nullptr, name + ": table_rows is null");
    total += m.n_rows;
  }
  require(total == t.n_obs, "the models hold " + std::to_string(total) +
                                " rows in all, the table " + std::to_string(t.n_obs) +
                                ": each table row must be one model's");
}

/// Throws, naming the fault, unless each model's table rows ascend strictly and lie in the
/// table: the serial search run only after a chunk found its rows out of order.
void check_model_rows(const GroupedObservations& t, const std::vector<TableModel>& models) {
  for (std::size_t k = 0; k < models.size(); ++k) {
    const TableModel& m = models[k];
    const std::string name = "model " + std::to_string(k);
    for (std::size_t r = 1; r < m.n_rows; ++r)
      if (m.table_rows[r] <= m.table_rows[r - 1])
        throw std::invalid_argument(name + " table_rows must ascend strictly (the model's rows "
                                    "in group order); row " + std::to_string(r) + " does not");
    for (const std::size_t r : {std::size_t{0}, m.n_rows - 1}) {
      const std::int64_t l = m.n_rows > 0 ? m.table_rows[r] : 0;
      if (m.n_rows > 0 && (l < 0 || static_cast<std::size_t>(l) >= t.n_obs))
        throw std::invalid_argument(name + " table_rows[" + std::to_string(r) + "] = " +
                                    std::to_string(l) + " outside the table's " +
                                    std::to_string(t.n_obs) + " rows");
    }
  }
}

/// Throws, naming a table row of [first, last) that is no model's or several models' (the
/// chunk's g check failed; a fault of coverage is named before that of a scale).
void check_coverage(const std::vector<TableModel>& models, std::size_t first, std::size_t last) {
  std::vector<int> owners(last - first, 0);
  for (const TableModel& m : models) {
    const std::int64_t* lo = std::lower_bound(m.table_rows, m.table_rows + m.n_rows,
                                              static_cast<std::int64_t>(first));
    for (const std::int64_t* r = lo; r != m.table_rows + m.n_rows &&
                                     static_cast<std::size_t>(*r) < last; ++r)
      ++owners[static_cast<std::size_t>(*r) - first];
  }
  for (std::size_t i = 0; i < owners.size(); ++i)
    if (owners[i] != 1)
      throw std::invalid_argument("table row " + std::to_string(first + i) + " is " +
                                  (owners[i] == 0 ? "no model's row" : "several models' row"));
}

/// The rows of model @p m among table rows [first, last): their index in the model and count
/// (consecutive in the model when its table rows ascend, which the chunk then checks).
struct ModelRows {
  std::size_t index = 0, count = 0;
  const std::int64_t* table_rows = nullptr;  ///< their table rows
  bool consecutive = false;                  ///< table rows table_rows[0], +1, ...
};

ModelRows rows_in(const TableModel& m, std::size_t first, std::size_t last) {
  // lower_bound reads only [table_rows, end) whatever the order: an unordered list is found
  // by the chunk's check (rows_in_order) or the tiling (tiles_model_rows), never read outside
  const std::int64_t* end = m.table_rows + m.n_rows;
  const std::int64_t* lo = std::lower_bound(m.table_rows, end, static_cast<std::int64_t>(first));
  const std::int64_t* hi = std::lower_bound(lo, end, static_cast<std::int64_t>(last));
  ModelRows r;
  r.index = static_cast<std::size_t>(lo - m.table_rows);
  r.count = static_cast<std::size_t>(hi - lo);
  r.table_rows = lo;
  r.consecutive = r.count > 0 && lo[r.count - 1] - lo[0] == static_cast<std::int64_t>(r.count - 1);
  return r;
}

/// Whether the rows @p r ascend strictly within table rows [first, last).
bool rows_in_order(const ModelRows& r, std::size_t first, std::size_t last) {
  std::int64_t previous = static_cast<std::int64_t>(first) - 1;
  bool ok = true;
  for (std::size_t i = 0; i < r.count; ++i) {
    ok &= r.table_rows[i] > previous;
    previous = r.table_rows[i];
  }
  return ok && (r.count == 0 || previous < static_cast<std::int64_t>(last));
}

/// Whether each model's rows found by the chunks (@p found: per chunk, per model) follow one
/// another from its first row to its last: with each chunk's rows in order within the chunk's
/// table rows (rows_in_order), every model's table rows then ascend strictly over the whole
/// table, as check_models_rows demands.
bool tiles_model_rows(const std::vector<TableModel>& models, const std::vector<ModelRows>& found,
                      std::size_t n_chunks) {
  for (std::size_t k = 0; k < models.size(); ++k) {
    std::size_t next = 0;
    for (std::size_t c = 0; c < n_chunks; ++c) {
      const ModelRows& r = found[c * models.size() + k];
      if (r.count > 0 && r.index != next) return false;
      next += r.count;
    }
    if (next != models[k].n_rows) return false;
  }
  return true;
}

/// Whether every g of the chunk is finite and > 0; @p table_ok cleared when a weight is not
/// finite and >= 0 or an intensity not finite: the chunk's three checks in one pass (as
/// product3_checked does them for one model block).
XS_MULTIVERSION bool chunk_checked(std::size_t count, const double* __restrict g,
                                   const double* __restrict w, const double* __restrict inten,
                                   bool& table_ok) {
  xtalscale::detail::RowChecks checks;
  for (std::size_t i = 0; i < count; ++i) checks.add(g[i], w[i], inten[i]);
  return checks.finish(table_ok);
}

/// A thread's buffers, reused by its chunks: per model the terms' values of the chunk's rows;
/// the chunk's g and ∂f/∂g in table order (in cache: g is copied out with streaming stores,
/// which do not read the output's old contents from memory).
struct ChunkState {
  std::vector<FusedRowsScratch> models;
  std::vector<double> g, dfdg;
};

/// One chunk: table rows [first, last), groups [h_first, h_last). f returned, the gradient share
/// into @p acc (n_params), g into those rows of @p g_table, each model's rows of the chunk into
/// @p found (per model); @p table_ok cleared when a weight or intensity of the chunk is not
/// valid (the caller names it). Returns with @p rows_ok false, before any g is written, when a
/// model's rows of the chunk do not ascend within it (the caller names the fault).
double chunk_functional_and_gradient(const GroupedObservations& t,
                                     const std::vector<TableModel>& models, std::size_t first,
                                     std::size_t last, std::size_t h_first, std::size_t h_last,
                                     ChunkState& state, double* acc, double* g_table,
                                     double* Ih_table, ModelRows* found, bool& table_ok,
                                     bool& rows_ok) {
  const std::size_t count = last - first;
  for (std::size_t k = 0; k < models.size(); ++k) {
    found[k] = rows_in(models[k], first, last);
    if (!rows_in_order(found[k], first, last)) {
      rows_ok = false;
      return 0.0;
    }
  }
  double* g = sized(state.g, count);
  std::fill(g, g + count, 0.0);  // a row no model writes stays 0: found by the g check
  for (std::size_t k = 0; k < models.size(); ++k) {
    const TableModel& m = models[k];
    const ModelRows& r = found[k];
    if (r.count == 0) continue;
    // consecutive table rows (one dataset's run) are written in place, others scattered as
    // they are formed (rows_in_order put them in [first, last))
    if (r.consecutive)
      m.block->fused_scales_rows(m.params, m.n_params, m.first_row + r.index, r.count,
                                 state.models[k],
                                 g + (r.table_rows[0] - static_cast<std::int64_t>(first)));
    else
      m.block->fused_scales_rows(m.params, m.n_params, m.first_row + r.index, r.count,
                                 state.models[k], g, r.table_rows,
                                 static_cast<std::int64_t>(first));
  }
  const double* w = t.weights + first;
  const double* inten = t.intensities + first;
  if (!chunk_checked(count, g, w, inten, table_ok)) {
    check_coverage(models, first, last);
    throw std::invalid_argument("a scale g is not finite and > 0 (table rows " +
                                std::to_string(first) + " to " + std::to_string(last - 1) + ")");
  }
  double* dfdg = sized(state.dfdg, count);
  // each row's least-squares Ĩ too, when asked (as model_normal_equations writes it)
  const double f = xtalscale::detail::groups_target(
      t.group_offsets + h_first, h_last - h_first, static_cast<std::int64_t>(first), w, inten, g,
      dfdg, Ih_table != nullptr ? Ih_table + first : nullptr);
  for (std::size_t k = 0; k < models.size(); ++k) {
    const ModelRows& r = found[k];
    if (r.count == 0) continue;
    double* model_acc = acc + models[k].column_offset;
    if (r.consecutive)
      models[k].block->fused_transpose_rows(
          dfdg + (r.table_rows[0] - static_cast<std::int64_t>(first)), state.models[k], model_acc);
    else  // each row's ∂f/∂g read from table order as the terms' coefficients are formed
      models[k].block->fused_transpose_rows(dfdg, state.models[k], model_acc, r.table_rows,
                                            static_cast<std::int64_t>(first));
  }
  xtalscale::detail::copy_streaming(g, count, g_table + first);
  return f;
}

/// The most table rows per chunk: the chunks' terms' scratch stays in L2, and a table of a few
/// hundred thousand rows still has tens of chunks to share out over the threads.
constexpr std::size_t kMaxChunkRows = 32768;

/// Table rows per chunk. One model covering the table: ModelBlock::functional_and_gradient's
/// 4096 (the same chunks, the same bits). Several: 8192 for each model, up to kMaxChunkRows,
/// so that each model evaluates some thousands of rows per call, a term's fixed cost per call
/// (such as the lookup harmonics' pass over the grid's θ rows) then being small. Measured on
/// 3 datasets' physical models, 10⁶ rows, against one model's one pass in the same run:
/// 4096 rows per model 1.08–1.10× its time, 8192 1.06×, 16384 1.06×; 4096 table rows per
/// chunk were ~1.5×.
std::size_t chunk_rows(const std::vector<TableModel>& models) {
  if (models.size() <= 1) return 4096;
  return std::min<std::size_t>(8192 * models.size(), kMaxChunkRows);
}

}  // namespace

double model_functional_and_gradient(const GroupedObservations& t,
                                     const std::vector<TableModel>& models, std::size_t n,
                                     double* gradient, double* g_table, double* Ih_table,
                                     int n_threads) {
  check_models(t, models, n);
  std::fill(gradient, gradient + n, 0.0);
  if (t.n_obs == 0) {
    check_grouped_observations(t);
    return 0.0;
  }
  const auto [rows, groups] = xtalscale::detail::group_chunks(t, chunk_rows(models));  // checks the offsets
  const std::size_t n_chunks = rows.size() - 1;
  std::vector<double> partial(n_chunks * n, 0.0), f_chunk(n_chunks, 0.0);
  std::vector<char> table_ok(n_chunks, 1), rows_ok(n_chunks, 1);
  std::vector<ModelRows> found(n_chunks * models.size());
  try {
    detail::parallel_for_rethrowing(n_chunks, n_threads, [&](std::size_t c) {
      // each thread's buffers kept from call to call (its models' term scratch, g and ∂f/∂g
      // of a chunk): fresh chunk-sized buffers per call would be new pages for the kernel to
      // clear every time (a quarter of the time of a 10⁶-row call when they were)
      thread_local ChunkState state;
      if (state.models.size() < models.size()) state.models.resize(models.size());
      bool table_fine = true, rows_fine = true;
      f_chunk[c] = chunk_functional_and_gradient(t, models, rows[c], rows[c + 1], groups[c],
                                                 groups[c + 1], state, partial.data() + c * n,
                                                 g_table, Ih_table,
                                                 found.data() + c * models.size(), table_fine,
                                                 rows_fine);
      table_ok[c] = table_fine ? 1 : 0;
      rows_ok[c] = rows_fine ? 1 : 0;
    });
  } catch (const std::invalid_argument&) {
    check_model_rows(t, models);   // a fault of the models' rows is named first,
    check_grouped_observations(t);  // then one of the table
    throw;
  }
  const bool rows_fine =
      std::all_of(rows_ok.begin(), rows_ok.end(), [](char ok) { return ok != 0; });
  if (!rows_fine || !tiles_model_rows(models, found, n_chunks)) {
    check_model_rows(t, models);  // throws, naming the fault
    throw std::invalid_argument("the models' table_rows do not ascend strictly");
  }
  for (const char ok : table_ok)
    if (!ok) check_grouped_observations(t);  // throws, naming the row
  double f = 0.0;  // in chunk order: the same bits for any thread count
  for (std::size_t c = 0; c < n_chunks; ++c) {
    f += f_chunk[c];
    for (std::size_t j = 0; j < n; ++j) gradient[j] += partial[c * n + j];
  }
  return f;
}

}  // namespace xtalscale::fit
