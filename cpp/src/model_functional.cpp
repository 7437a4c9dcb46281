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

#include "fit_parallel.hpp"  // parallel_for_rethrowing, thread_number, group_sums
#include "internal/group_target.hpp"
#include "internal/large_buffers.hpp"
#include "xtalscale/check.hpp"
#include "xtalscale/normal_equations.hpp"

namespace xtalscale::fit {

namespace {

using xtalscale::detail::sized;

/// Throws unless every model fits its block, the table and the parameter vector, and its table
/// rows lie in the table and ascend strictly; and the models hold n_obs rows in all (with
/// ascending rows, each table row then belongs to one model exactly when every row is some
/// model's: what the chunks check, as an unwritten g).
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
    // ascending from a first row >= 0 to a last row < n_obs: every row lies in the table
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
    total += m.n_rows;
  }
  require(total == t.n_obs, "the models hold " + std::to_string(total) +
                                " rows in all, the table " + std::to_string(t.n_obs) +
                                ": each table row must be one model's");
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

/// A thread's buffers, reused by its chunks: per model the terms' values of the chunk's rows;
/// ∂f/∂g in table order; a model's rows' g or coefficients when they are not consecutive
/// table rows (then scattered or gathered). (g is written into the output rows.)
struct ChunkState {
  std::vector<FusedRowsScratch> models;
  std::vector<double> dfdg, model_rows;
};

/// The rows of model @p m among table rows [first, last): their index in the model and count
/// (consecutive in the model: its table rows ascend).
struct ModelRows {
  std::size_t index = 0, count = 0;
  const std::int64_t* table_rows = nullptr;  ///< their table rows
  bool consecutive = false;                  ///< table rows table_rows[0], +1, ...
};

ModelRows rows_in(const TableModel& m, std::size_t first, std::size_t last) {
  const std::int64_t* end = m.table_rows + m.n_rows;
  const std::int64_t* lo = std::lower_bound(m.table_rows, end, static_cast<std::int64_t>(first));
  const std::int64_t* hi = std::lower_bound(lo, end, static_cast<std::int64_t>(last));
  ModelRows r;
  r.index = static_cast<std::size_t>(lo - m.table_rows);
  r.count = static_cast<std::size_t>(hi - lo);
  r.table_rows = lo;
  r.consecutive = r.count > 0 && static_cast<std::size_t>(lo[r.count - 1] - lo[0]) == r.count - 1;
  return r;
}

/// One chunk: table rows [first, last), groups [h_first, h_last). f returned, the gradient share
/// into @p acc (n_params), g into those rows of @p g_table; @p table_ok cleared when a weight or intensity of
/// the chunk is not valid (the caller names it).
double chunk_functional_and_gradient(const GroupedObservations& t,
                                     const std::vector<TableModel>& models, std::size_t first,
                                     std::size_t last, std::size_t h_first, std::size_t h_last,
                                     ChunkState& state, double* acc, double* g_table,
                                     bool& table_ok) {
  const std::size_t count = last - first;
  // g straight into the output rows (the chunks' rows are disjoint): no copy at the end
  double* g = g_table + first;
  std::fill(g, g + count, 0.0);  // a row no model writes stays 0: found by the g check
  std::vector<ModelRows> rows(models.size());
  for (std::size_t k = 0; k < models.size(); ++k) {
    const TableModel& m = models[k];
    rows[k] = rows_in(m, first, last);
    const ModelRows& r = rows[k];
    if (r.count == 0) continue;
    // consecutive table rows (one dataset's run) are written in place, others scattered
    double* gm = r.consecutive ? g + (r.table_rows[0] - static_cast<std::int64_t>(first))
                               : sized(state.model_rows, r.count);
    m.block->fused_scales_rows(m.params, m.n_params, m.first_row + r.index, r.count,
                               state.models[k], gm);
    if (!r.consecutive)
      for (std::size_t i = 0; i < r.count; ++i)
        g[static_cast<std::size_t>(r.table_rows[i]) - first] = gm[i];
  }
  const double* w = t.weights + first;
  const double* inten = t.intensities + first;
  if (!all_non_negative_finite(w, count) || !all_finite(inten, count)) table_ok = false;
  if (!all_positive_finite(g, count)) {
    check_coverage(models, first, last);
    throw std::invalid_argument("a scale g is not finite and > 0 (table rows " +
                                std::to_string(first) + " to " + std::to_string(last - 1) + ")");
  }
  double* dfdg = sized(state.dfdg, count);
  const double f = xtalscale::detail::groups_target(t.group_offsets + h_first, h_last - h_first,
                                         static_cast<std::int64_t>(first), w, inten, g, dfdg);
  for (std::size_t k = 0; k < models.size(); ++k) {
    const ModelRows& r = rows[k];
    if (r.count == 0) continue;
    const double* c = dfdg + (r.table_rows[0] - static_cast<std::int64_t>(first));
    if (!r.consecutive) {
      double* gathered = sized(state.model_rows, r.count);
      for (std::size_t i = 0; i < r.count; ++i)
        gathered[i] = dfdg[static_cast<std::size_t>(r.table_rows[i]) - first];
      c = gathered;
    }
    models[k].block->fused_transpose_rows(c, state.models[k], acc + models[k].column_offset);
  }
  return f;
}

/// The most table rows per chunk: the chunks' terms' scratch stays in L2, and a table of a few
/// hundred thousand rows still has tens of chunks to share out over the threads.
constexpr std::size_t kMaxChunkRows = 32768;

/// Table rows per chunk: ModelBlock::functional_and_gradient's 4096 for each model, up to
/// kMaxChunkRows. One model covering the table is then chunked as there (the same bits), and
/// each of a few models evaluates about as many rows per call: a term's fixed cost per call,
/// such as the lookup harmonics' pass over the grid's θ rows, is not paid once per model for a
/// fraction of the rows (3 datasets' physical models, 10⁶ rows: ~30 ns/obs at 4096 table rows
/// per chunk, ~23 at 12288 to 32768).
std::size_t chunk_rows(const std::vector<TableModel>& models) {
  return std::min<std::size_t>(4096 * std::max<std::size_t>(models.size(), 1), kMaxChunkRows);
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
  std::vector<char> table_ok(n_chunks, 1);
  try {
    detail::parallel_for_rethrowing(n_chunks, n_threads, [&](std::size_t c) {
      // each thread's buffers kept from call to call (its models' term scratch, g and ∂f/∂g
      // of a chunk): fresh chunk-sized buffers per call would be new pages for the kernel to
      // clear every time (a quarter of the time of a 10⁶-row call when they were)
      thread_local ChunkState state;
      if (state.models.size() < models.size()) state.models.resize(models.size());
      bool ok = true;
      f_chunk[c] = chunk_functional_and_gradient(t, models, rows[c], rows[c + 1], groups[c],
                                                 groups[c + 1], state, partial.data() + c * n,
                                                 g_table, ok);
      table_ok[c] = ok ? 1 : 0;
    });
  } catch (const std::invalid_argument&) {
    check_grouped_observations(t);  // a fault of the table is named first
    throw;
  }
  for (const char ok : table_ok)
    if (!ok) check_grouped_observations(t);  // throws, naming the row
  double f = 0.0;  // in chunk order: the same bits for any thread count
  for (std::size_t c = 0; c < n_chunks; ++c) {
    f += f_chunk[c];
    for (std::size_t j = 0; j < n; ++j) gradient[j] += partial[c * n + j];
  }
  if (Ih_table != nullptr)  // as model_normal_equations writes it
    for (std::size_t h = 0; h < t.n_groups; ++h) {
      const detail::GroupSums sums = detail::group_sums(t, g_table, h);
      const double ih = sums.wgg > 0.0 ? sums.wgi / sums.wgg : 0.0;
      std::fill(Ih_table + t.group_offsets[h], Ih_table + t.group_offsets[h + 1], ih);
    }
  return f;
}

}  // namespace xtalscale::fit
