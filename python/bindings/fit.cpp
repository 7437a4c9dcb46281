// Bindings for the fit kernels: xtalscale._core.fit (Ih table, target, normal equations).
//
// A model block arrives as a tuple (scales, indptr, indices, values, n_cols, column_offset,
// table_rows | None): numpy arrays of the right dtype are used in place (no copy). Everything
// is validated before the GIL is released; the kernels only touch raw buffers.
// check_structure=False skips the O(nnz) index checks (row-map coverage, column ranges and
// order) for callers passing the very index arrays an earlier call checked; values are always
// checked.
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "xtalscale/ih_table.hpp"
#include "xtalscale/model_block.hpp"
#include "xtalscale/normal_equations.hpp"
#include "xtalscale/target.hpp"

namespace xtalscale::py_bind {
namespace {

using namespace xtalscale::fit;  // NOLINT: the fit kernels' types and functions


/// Arrays of one call, kept alive while the kernels run.
struct CallData {
  Int64Array offsets;
  DoubleArray intensities, weights;
  std::vector<DoubleArray> scales, values;
  std::vector<Int64Array> indptr, rows;
  std::vector<Int32Array> indices;
  GroupedObservations table;
  std::vector<FitBlock> blocks;
};

void require_1d(const py::array& a, std::size_t n, const std::string& name) {
  if (a.ndim() != 1 || static_cast<std::size_t>(a.size()) != n)
    throw std::invalid_argument(name + " must be 1-dimensional with " + std::to_string(n) +
                                " values (got shape with " + std::to_string(a.size()) + " values)");
}

void load_table(CallData& d, const Int64Array& offsets, const DoubleArray& intensities,
                const DoubleArray& weights) {
  if (offsets.ndim() != 1 || offsets.size() < 1)
    throw std::invalid_argument("group_offsets must be 1-dimensional with n_groups + 1 values");
  d.offsets = offsets;
  d.intensities = intensities;
  d.weights = weights;
  const auto n = static_cast<std::size_t>(intensities.size());
  require_1d(intensities, n, "intensities");
  require_1d(weights, n, "weights");
  d.table.n_obs = n;
  d.table.n_groups = static_cast<std::size_t>(offsets.size()) - 1;
  d.table.group_offsets = d.offsets.data();
  d.table.intensities = d.intensities.data();
  d.table.weights = d.weights.data();
  check_grouped_observations(d.table);
}

/// @p derivatives false: the kernel reads the blocks' scales alone, so a block without
/// columns gets no derivative arrays in its view (neither checked nor read).
void load_blocks(CallData& d, const py::list& blocks, std::size_t n_params, bool structure,
                 bool derivatives = true) {
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const std::string name = "block " + std::to_string(b);
    auto item = blocks[b].cast<py::tuple>();
    if (item.size() != 7)
      throw std::invalid_argument(name + ": expected (scales, indptr, indices, values, n_cols, "
                                         "column_offset, table_rows)");
    d.scales.push_back(item[0].cast<DoubleArray>());
    d.indptr.push_back(item[1].cast<Int64Array>());
    d.indices.push_back(item[2].cast<Int32Array>());
    d.values.push_back(item[3].cast<DoubleArray>());
    const auto n_rows = static_cast<std::size_t>(d.scales.back().size());
    require_1d(d.scales.back(), n_rows, name + " scales");
    require_1d(d.indptr.back(), n_rows + 1, name + " indptr");
    const auto nnz = static_cast<std::size_t>(d.indptr.back().data()[n_rows]);
    require_1d(d.indices.back(), nnz, name + " indices");
    require_1d(d.values.back(), nnz, name + " values");
    const auto n_cols = item[4].cast<std::int64_t>();
    const auto offset = item[5].cast<std::int64_t>();
    if (n_cols < 0 || offset < 0)
      throw std::invalid_argument(name + ": n_cols and column_offset must be >= 0");
    FitBlock mb;
    mb.view.n_rows = n_rows;
    mb.view.n_cols = static_cast<std::size_t>(n_cols);
    mb.view.column_offset = static_cast<std::size_t>(offset);
    mb.view.scales = d.scales.back().data();
    mb.view.indptr = d.indptr.back().data();
    mb.view.indices = d.indices.back().data();
    mb.view.values = d.values.back().data();
    if (!derivatives && n_cols == 0) mb.view.indptr = nullptr;  // so not scanned (check_csr)
    if (!item[6].is_none()) {
      d.rows.push_back(item[6].cast<Int64Array>());
      require_1d(d.rows.back(), n_rows, name + " table_rows");
      mb.table_rows = d.rows.back().data();
    }
    d.blocks.push_back(mb);
  }
  check_model_blocks(d.table, d.blocks, n_params, structure);
}

/// A kernel result was not finite: name the non-finite derivative (full check), or report the
/// overflow of finite inputs.
[[noreturn]] void explain_non_finite(const CallData& d, std::size_t n_params) {
  check_model_blocks(d.table, d.blocks, n_params, true);
  throw std::invalid_argument(
      "the target or its derivatives overflowed (non-finite result from finite inputs)");
}

const double* optional_rows(const std::optional<DoubleArray>& a, std::size_t n, const char* name) {
  if (!a) return nullptr;
  require_1d(*a, n, name);
  require_finite(a->data(), n, name);
  return a->data();
}

py::tuple functional_and_gradient_py(const Int64Array& offsets, const DoubleArray& intensities,
                                     const DoubleArray& weights, const py::list& blocks,
                                     std::int64_t n_params, bool gradient,
                                     const std::optional<DoubleArray>& fixed_Ih, bool rows,
                                     int n_threads, bool check_structure) {
  if (n_params < 0) throw std::invalid_argument("n_params must be >= 0");
  CallData d;
  load_table(d, offsets, intensities, weights);
  load_blocks(d, blocks, static_cast<std::size_t>(n_params), check_structure);
  const auto n = static_cast<py::ssize_t>(d.table.n_obs);
  TargetOptions o;
  o.fixed_Ih = optional_rows(fixed_Ih, d.table.n_obs, "fixed_Ih");
  o.n_threads = n_threads;
  DoubleArray grad(gradient ? n_params : 0);
  DoubleArray ih(rows ? n : 0), res(rows ? n : 0), g(rows ? n : 0);
  if (rows) {
    o.Ih_out = ih.mutable_data();
    o.residuals_out = res.mutable_data();
    o.g_out = g.mutable_data();
  }
  double* gp = gradient ? grad.mutable_data() : nullptr;
  double f = 0.0;
  {
    py::gil_scoped_release release;  // only raw buffers held by `d` and the outputs are used
    f = functional_and_gradient(d.table, d.blocks, static_cast<std::size_t>(n_params), gp, o);
  }
  bool finite = std::isfinite(f);
  for (std::int64_t j = 0; gp && j < n_params; ++j) finite = finite && std::isfinite(gp[j]);
  if (!finite) explain_non_finite(d, static_cast<std::size_t>(n_params));
  return py::make_tuple(f, gradient ? py::object(grad) : py::object(py::none()),
                        rows ? py::object(py::make_tuple(ih, res, g)) : py::object(py::none()));
}

py::tuple functional_and_scale_gradient_py(const Int64Array& offsets, const DoubleArray& intensities,
                                           const DoubleArray& weights, const py::list& blocks,
                                           const std::optional<DoubleArray>& fixed_Ih,
                                           int n_threads) {
  CallData d;
  load_table(d, offsets, intensities, weights);
  load_blocks(d, blocks, 0, true, false);
  const auto n = static_cast<py::ssize_t>(d.table.n_obs);
  TargetOptions o;
  o.fixed_Ih = optional_rows(fixed_Ih, d.table.n_obs, "fixed_Ih");
  o.n_threads = n_threads;
  DoubleArray dfdg(n), ih(n);
  o.dfdg_out = dfdg.mutable_data();
  o.Ih_out = ih.mutable_data();
  double f = 0.0;
  {
    py::gil_scoped_release release;
    f = functional_and_gradient(d.table, d.blocks, 0, nullptr, o);
  }
  if (!std::isfinite(f)) explain_non_finite(d, 0);
  return py::make_tuple(f, dfdg, ih);
}

/// A caller's float64 array of @p shape that a kernel may write in place (C-contiguous,
/// writeable, not copied): the accumulators of normal_equations(..., out=...).
py::array_t<double> writable_doubles(const py::object& obj, const std::vector<py::ssize_t>& shape,
                                     const char* name) {
  if (!py::isinstance<py::array_t<double>>(obj))
    throw std::invalid_argument(std::string(name) + " must be a float64 numpy array");
  auto a = py::reinterpret_borrow<py::array_t<double>>(obj);
  const bool c_contiguous = (a.flags() & py::array::c_style) != 0;
  if (!c_contiguous || !a.writeable())
    throw std::invalid_argument(std::string(name) + " must be C-contiguous and writeable");
  bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (std::size_t k = 0; same && k < shape.size(); ++k) same = a.shape(static_cast<py::ssize_t>(k)) == shape[k];
  if (!same) {
    std::string expected;
    for (const py::ssize_t extent : shape)
      expected += (expected.empty() ? "" : ", ") + std::to_string(extent);
    throw std::invalid_argument(std::string(name) + " has the wrong shape (expected (" + expected + "))");
  }
  return a;
}

/// Throws unless the @p bytes at @p out share no memory with @p input (@p input_name): a
/// kernel writing @p out while it reads @p input would read its own results.
void require_apart(const void* out, std::size_t bytes, const py::array& input, const char* out_name,
                   const char* input_name) {
  const auto a = reinterpret_cast<std::uintptr_t>(out);
  const auto b = reinterpret_cast<std::uintptr_t>(input.data());
  const auto input_bytes = static_cast<std::size_t>(input.nbytes());
  if (bytes > 0 && input_bytes > 0 && a < b + input_bytes && b < a + bytes)
    throw std::invalid_argument(std::string(out_name) + " must not share memory with " + input_name);
}

/// The matrix kind named @p kind ("schur" or "dials"), after checking @p n_params >= 0.
NormalMatrixKind checked_matrix_kind(const std::string& kind, std::int64_t n_params) {
  if (n_params < 0) throw std::invalid_argument("n_params must be >= 0");
  if (kind != "schur" && kind != "dials")
    throw std::invalid_argument("kind must be 'schur' or 'dials' (got '" + kind + "')");
  return kind == "dials" ? NormalMatrixKind::dials : NormalMatrixKind::schur;
}

/// The (matrix, rhs) a normal-equations build writes: the caller's @p out pair (added to in
/// place) or, for None, new arrays.
std::pair<py::array_t<double>, py::array_t<double>> normal_equations_outputs(const py::object& out,
                                                                             py::ssize_t p) {
  if (out.is_none()) return {py::array_t<double>({p, p}), py::array_t<double>(p)};
  const auto pair = out.cast<py::tuple>();
  if (pair.size() != 2) throw std::invalid_argument("out must be a (matrix, rhs) pair");
  return {writable_doubles(pair[0], {p, p}, "out matrix"), writable_doubles(pair[1], {p}, "out rhs")};
}

/// Whether Σ w r², the right-hand side and the matrix of a build are all finite.
bool normal_equations_finite(const py::array_t<double>& matrix, const py::array_t<double>& rhs,
                             const NormalEquationsSummary& s) {
  const auto p = rhs.size();
  if (!std::isfinite(s.r_sq)) return false;
  for (py::ssize_t j = 0; j < p; ++j)
    if (!std::isfinite(rhs.data()[j])) return false;
  for (py::ssize_t j = 0; j < p * p; ++j)
    if (!std::isfinite(matrix.data()[j])) return false;
  return true;
}

py::tuple normal_equations_py(const Int64Array& offsets, const DoubleArray& intensities,
                              const DoubleArray& weights, const py::list& blocks,
                              std::int64_t n_params, const std::string& kind,
                              const std::optional<DoubleArray>& fixed_Ih, int n_threads,
                              bool check_structure, const py::object& out) {
  const NormalMatrixKind matrix_kind = checked_matrix_kind(kind, n_params);
  CallData d;
  load_table(d, offsets, intensities, weights);
  load_blocks(d, blocks, static_cast<std::size_t>(n_params), check_structure);
  const double* fixed = optional_rows(fixed_Ih, d.table.n_obs, "fixed_Ih");
  const auto p = static_cast<py::ssize_t>(n_params);
  const bool accumulate = !out.is_none();
  auto [matrix, rhs] = normal_equations_outputs(out, p);
  NormalEquationsSummary s;
  {
    py::gil_scoped_release release;
    s = normal_equations(d.table, d.blocks, static_cast<std::size_t>(n_params),
                         matrix.mutable_data(), rhs.mutable_data(),
                         matrix_kind, fixed, n_threads, accumulate);
  }
  if (!normal_equations_finite(matrix, rhs, s)) explain_non_finite(d, static_cast<std::size_t>(n_params));
  return py::make_tuple(matrix, rhs, s.r_sq, s.n_equations);
}

/// The models of model_normal_equations_py, checked, with the arrays they point into.
struct TableModels {
  std::vector<DoubleArray> params;
  std::vector<Int64Array> rows;
  std::vector<TableModel> models;
};

/// Load (block, params, first_row, column_offset, table_rows) tuples: each block evaluates row
/// ranges, its parameters are finite and of its count, its rows [first_row, first_row +
/// len(table_rows)) lie within it, its columns within n_params, and the table rows of each
/// model ascend strictly while all the models' rows cover each table row once.
/// With @p check_rows false the table rows are not read (a kernel that checks them itself).
TableModels load_table_models(const py::list& items, std::size_t n_obs, std::size_t n_params,
                              bool check_rows = true) {
  TableModels d;
  std::vector<char> covered(check_rows ? n_obs : 0, 0);
  for (std::size_t k = 0; k < items.size(); ++k) {
    const std::string name = "model " + std::to_string(k);
    auto item = items[k].cast<py::tuple>();
    if (item.size() != 5)
      throw std::invalid_argument(name + ": expected (block, params, first_row, column_offset, table_rows)");
    if (!py::isinstance<ModelBlock>(item[0]))
      throw py::type_error(name + ": block must be a ModelBlock (xtalscale._core.model_block)");
    TableModel m;
    m.block = item[0].cast<const ModelBlock*>();
    if (!m.block->evaluates_rows())
      throw std::invalid_argument(name + ": a term of its model block does not evaluate row ranges");
    d.params.push_back(item[1].cast<DoubleArray>());
    require_1d(d.params.back(), m.block->n_params(), name + " params");
    require_finite(d.params.back().data(), m.block->n_params(), (name + " params").c_str());
    m.params = d.params.back().data();
    m.n_params = m.block->n_params();
    const auto first_row = item[2].cast<std::int64_t>();
    const auto offset = item[3].cast<std::int64_t>();
    if (first_row < 0 || offset < 0)
      throw std::invalid_argument(name + ": first_row and column_offset must be >= 0");
    d.rows.push_back(item[4].cast<Int64Array>());
    const Int64Array& rows = d.rows.back();
    if (rows.ndim() != 1) throw std::invalid_argument(name + " table_rows must be 1-dimensional");
    m.first_row = static_cast<std::size_t>(first_row);
    m.n_rows = static_cast<std::size_t>(rows.size());
    if (m.first_row > m.block->n_rows() || m.n_rows > m.block->n_rows() - m.first_row)
      throw std::invalid_argument(name + ": rows [" + std::to_string(m.first_row) + ", " +
                                  std::to_string(m.first_row + m.n_rows) + ") outside its block's " +
                                  std::to_string(m.block->n_rows()) + " rows");
    m.column_offset = static_cast<std::size_t>(offset);
    if (m.column_offset + m.block->n_cols() > n_params)
      throw std::invalid_argument(name + ": columns [" + std::to_string(m.column_offset) + ", " +
                                  std::to_string(m.column_offset + m.block->n_cols()) +
                                  ") outside n_params = " + std::to_string(n_params));
    m.table_rows = rows.data();
    for (std::size_t r = 0; check_rows && r < m.n_rows; ++r) {
      const std::int64_t l = m.table_rows[r];
      if (l < 0 || static_cast<std::size_t>(l) >= n_obs)
        throw std::invalid_argument(name + " table_rows[" + std::to_string(r) + "] = " +
                                    std::to_string(l) + " outside the table's " +
                                    std::to_string(n_obs) + " rows");
      if (r > 0 && l <= m.table_rows[r - 1])
        throw std::invalid_argument(name + " table_rows must ascend strictly (the model's rows in "
                                           "group order); row " + std::to_string(r) + " does not");
      if (covered[static_cast<std::size_t>(l)]++)
        throw std::invalid_argument(name + ": table row " + std::to_string(l) +
                                    " is also another model's row");
    }
    d.models.push_back(m);
  }
  for (std::size_t l = 0; check_rows && l < n_obs; ++l)
    if (!covered[l])
      throw std::invalid_argument("table row " + std::to_string(l) + " is no model's row");
  return d;
}

py::tuple model_normal_equations_py(const Int64Array& offsets, const DoubleArray& intensities,
                                    const DoubleArray& weights, const py::list& models,
                                    std::int64_t n_params, const std::string& kind,
                                    const std::optional<DoubleArray>& fixed_Ih, int n_threads,
                                    const py::object& out) {
  const NormalMatrixKind matrix_kind = checked_matrix_kind(kind, n_params);
  require_threads(n_threads);
  CallData d;
  load_table(d, offsets, intensities, weights);
  const TableModels tm = load_table_models(models, d.table.n_obs, static_cast<std::size_t>(n_params));
  const double* fixed = optional_rows(fixed_Ih, d.table.n_obs, "fixed_Ih");
  const auto p = static_cast<py::ssize_t>(n_params);
  const bool accumulate = !out.is_none();
  auto [matrix, rhs] = normal_equations_outputs(out, p);
  const auto n_obs = static_cast<py::ssize_t>(d.table.n_obs);
  DoubleArray g(n_obs);
  std::optional<DoubleArray> ih;
  if (!fixed) ih.emplace(n_obs);
  NormalEquationsSummary s;
  {
    py::gil_scoped_release release;
    s = model_normal_equations(d.table, tm.models, static_cast<std::size_t>(n_params),
                               matrix.mutable_data(), rhs.mutable_data(), g.mutable_data(),
                               ih ? ih->mutable_data() : nullptr,
                               matrix_kind, fixed, n_threads, accumulate);
  }
  // with finite scales, a non-finite result is a derivative's or an overflow
  if (s.scales_usable && !normal_equations_finite(matrix, rhs, s))
    throw std::invalid_argument("the normal equations are not finite: a model's derivatives are "
                                "not finite, or the terms overflowed");
  return py::make_tuple(matrix, rhs, s.r_sq, s.n_equations, g,
                        ih ? py::object(*ih) : py::object(py::none()), s.scales_usable);
}

py::tuple model_functional_and_gradient_py(const Int64Array& offsets, const DoubleArray& intensities,
                                           const DoubleArray& weights, const py::list& models,
                                           std::int64_t n_params, bool Ih, int n_threads,
                                           const py::object& g_out) {
  if (n_params < 0) throw std::invalid_argument("n_params must be >= 0");
  require_threads(n_threads);
  CallData d;
  load_table(d, offsets, intensities, weights);
  // the kernel checks the table rows (ascending, in the table, each row one model's) itself,
  // the coverage on the way through its chunks: no pass over them here
  const TableModels tm = load_table_models(models, d.table.n_obs, static_cast<std::size_t>(n_params), false);
  const auto n_obs = static_cast<py::ssize_t>(d.table.n_obs);
  DoubleArray grad(n_params);
  // g into the caller's array when given (an engine calling f+g every step reuses it: a fresh
  // n_obs array is ~1 ns/obs of new pages per call at 10⁶ rows)
  py::array_t<double> g = g_out.is_none() ? py::array_t<double>(n_obs)
                                          : writable_doubles(g_out, {n_obs}, "g_out");
  if (!g_out.is_none()) {  // g is written while the chunks read the table
    const auto bytes = static_cast<std::size_t>(g.nbytes());
    require_apart(g.data(), bytes, intensities, "g_out", "the intensities");
    require_apart(g.data(), bytes, weights, "g_out", "the weights");
  }
  std::optional<DoubleArray> ih;
  if (Ih) ih.emplace(n_obs);
  double f = 0.0;
  {
    py::gil_scoped_release release;
    f = model_functional_and_gradient(d.table, tm.models, static_cast<std::size_t>(n_params),
                                      grad.mutable_data(), g.mutable_data(),
                                      ih ? ih->mutable_data() : nullptr, n_threads);
  }
  bool finite = std::isfinite(f);
  for (std::int64_t j = 0; j < n_params; ++j) finite = finite && std::isfinite(grad.data()[j]);
  if (!finite)
    throw std::invalid_argument("the target or its gradient is not finite: a model's derivatives "
                                "are not finite, or the sums overflowed");
  return py::make_tuple(f, grad, g, ih ? py::object(*ih) : py::object(py::none()));
}

void fold_normal_matrix_py(const py::object& matrix) {
  if (!py::isinstance<py::array>(matrix)) throw std::invalid_argument("matrix must be a numpy array");
  const auto n = py::reinterpret_borrow<py::array>(matrix).shape(0);
  auto m = writable_doubles(matrix, {n, n}, "matrix");
  py::gil_scoped_release release;
  fold_normal_matrix(static_cast<std::size_t>(n), m.mutable_data());
}

DoubleArray normal_matrix_diagonal_py(const Int64Array& offsets, const DoubleArray& intensities,
                                      const DoubleArray& weights, const py::list& blocks,
                                      std::int64_t n_params, const std::optional<DoubleArray>& fixed_Ih,
                                      bool check_structure) {
  if (n_params < 0) throw std::invalid_argument("n_params must be >= 0");
  CallData d;
  load_table(d, offsets, intensities, weights);
  load_blocks(d, blocks, static_cast<std::size_t>(n_params), check_structure);
  const double* fixed = optional_rows(fixed_Ih, d.table.n_obs, "fixed_Ih");
  DoubleArray diag(n_params);
  {
    py::gil_scoped_release release;
    normal_matrix_diagonal(d.table, d.blocks, static_cast<std::size_t>(n_params),
                           diag.mutable_data(), fixed);
  }
  return diag;
}

DoubleArray cholesky_solve_py(const DoubleArray& lower, const DoubleArray& rhs) {
  if (lower.ndim() != 2 || lower.shape(0) != lower.shape(1))
    throw std::invalid_argument("lower must be a square 2-dimensional array");
  const auto n = static_cast<std::size_t>(lower.shape(0));
  require_1d(rhs, n, "rhs");
  require_finite(lower.data(), n * n, "lower");
  require_finite(rhs.data(), n, "rhs");
  DoubleArray x(static_cast<py::ssize_t>(n));
  std::copy(rhs.data(), rhs.data() + n, x.mutable_data());
  {
    py::gil_scoped_release release;
    cholesky_solve(n, lower.data(), x.mutable_data());
  }
  return x;
}

DoubleArray row_quadratic_forms_py(const Int64Array& indptr, const Int32Array& indices,
                                   const DoubleArray& values, const DoubleArray& V, int n_threads) {
  if (indptr.ndim() != 1 || indptr.size() < 1)
    throw std::invalid_argument("indptr must be 1-dimensional with n_rows + 1 values");
  const auto n_rows = static_cast<std::size_t>(indptr.size() - 1);
  const std::int64_t* ip = indptr.data();
  if (ip[0] != 0) throw std::invalid_argument("indptr must start at 0");
  for (std::size_t r = 0; r < n_rows; ++r)
    if (ip[r + 1] < ip[r]) throw std::invalid_argument("indptr must be non-decreasing");
  const auto nnz = static_cast<std::size_t>(ip[n_rows]);
  require_1d(indices, nnz, "indices");
  require_1d(values, nnz, "values");
  if (V.ndim() != 2 || V.shape(0) != V.shape(1))
    throw std::invalid_argument("V must be a square 2-dimensional array");
  const auto n = static_cast<std::size_t>(V.shape(0));
  for (std::size_t e = 0; e < nnz; ++e)
    if (indices.data()[e] < 0 || static_cast<std::size_t>(indices.data()[e]) >= n)
      throw std::invalid_argument("indices: column " + std::to_string(indices.data()[e]) +
                                  " outside V's " + std::to_string(n) + " columns");
  DoubleArray out(static_cast<py::ssize_t>(n_rows));
  {
    py::gil_scoped_release release;
    row_quadratic_forms(n_rows, ip, indices.data(), values.data(), n, V.data(),
                        out.mutable_data(), n_threads);
  }
  return out;
}

py::tuple model_row_variances_py(const ModelBlock& block, const DoubleArray& params,
                                 const DoubleArray& V, int n_threads) {
  if (params.ndim() != 1) throw std::invalid_argument("params must be 1-dimensional");
  const auto n = static_cast<py::ssize_t>(block.n_cols());
  if (V.ndim() != 2 || V.shape(0) != n || V.shape(1) != n)
    throw std::invalid_argument("V must have shape (" + std::to_string(n) + ", " +
                                std::to_string(n) + "): the block's columns");
  require_finite(V.data(), static_cast<std::size_t>(n * n), "V");
  if (!block.evaluates_rows())
    throw std::invalid_argument("a term of this model block does not evaluate row ranges");
  require_threads(n_threads);
  const auto rows = static_cast<py::ssize_t>(block.n_rows());
  DoubleArray var(rows), g(rows);
  const double* p = params.data();
  const auto np_ = static_cast<std::size_t>(params.size());
  const double* v = V.data();
  double* vo = var.mutable_data();
  double* go = g.mutable_data();
  {
    py::gil_scoped_release release;
    model_row_variances(block, p, np_, v, vo, go, n_threads);
  }
  return py::make_tuple(var, g);
}

void model_row_variances_into_py(const std::vector<std::shared_ptr<ModelBlock>>& blocks,
                                  const DoubleArray& params, const DoubleArray& V,
                                  const std::vector<Int64Array>& rows, const py::object& variances,
                                  const py::object& g, int n_threads) {
  if (params.ndim() != 1) throw std::invalid_argument("params must be 1-dimensional");
  require_threads(n_threads);
  if (rows.size() != blocks.size())
    throw std::invalid_argument("rows must hold one array per block (got " +
                                std::to_string(rows.size()) + " for " +
                                std::to_string(blocks.size()) + " blocks)");
  if (blocks.empty()) return;
  for (const auto& b : blocks) {
    if (!b) throw std::invalid_argument("blocks must be ModelBlocks (got None)");
    if (!b->evaluates_rows())
      throw std::invalid_argument("a term of this model block does not evaluate row ranges");
    if (b->n_cols() != blocks[0]->n_cols())
      throw std::invalid_argument("the blocks must have the same columns (one model's blocks)");
  }
  const auto n = static_cast<py::ssize_t>(blocks[0]->n_cols());
  if (V.ndim() != 2 || V.shape(0) != n || V.shape(1) != n)
    throw std::invalid_argument("V must have shape (" + std::to_string(n) + ", " +
                                std::to_string(n) + "): the blocks' columns");
  require_finite(V.data(), static_cast<std::size_t>(n * n), "V");
  if (!py::isinstance<py::array_t<double>>(variances) || py::array(variances).ndim() != 1)
    throw std::invalid_argument("variances must be a 1-dimensional float64 numpy array");
  const auto n_out = py::array(variances).shape(0);
  auto var_out = writable_doubles(variances, {n_out}, "variances");
  auto g_out = writable_doubles(g, {n_out}, "g");
  // every output position named once: the threads then never write the same entry
  std::vector<char> taken(static_cast<std::size_t>(n_out), 0);
  std::vector<const ModelBlock*> block_ptrs;
  std::vector<const std::int64_t*> row_ptrs;
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const std::string name = "rows[" + std::to_string(b) + "]";
    require_1d(rows[b], blocks[b]->n_rows(), name.c_str());
    const std::int64_t* r = rows[b].data();
    for (std::size_t i = 0; i < blocks[b]->n_rows(); ++i) {
      if (r[i] < 0 || r[i] >= n_out)
        throw std::invalid_argument(name + ": position " + std::to_string(r[i]) +
                                    " outside the outputs' " + std::to_string(n_out) + " rows");
      char& t = taken[static_cast<std::size_t>(r[i])];
      if (t) throw std::invalid_argument(name + ": position " + std::to_string(r[i]) + " named twice");
      t = 1;
    }
    block_ptrs.push_back(blocks[b].get());
    row_ptrs.push_back(r);
  }
  const double* p = params.data();
  const auto np_ = static_cast<std::size_t>(params.size());
  const double* v = V.data();
  double* vo = var_out.mutable_data();
  double* go = g_out.mutable_data();
  {
    py::gil_scoped_release release;
    model_row_variances_into(block_ptrs.size(), block_ptrs.data(), p, np_, v, row_ptrs.data(),
                             vo, go, n_threads);
  }
}

py::tuple calc_Ih_py(const Int64Array& offsets, const DoubleArray& intensities,
                     const DoubleArray& weights, const DoubleArray& g, int n_threads) {
  CallData d;
  load_table(d, offsets, intensities, weights);
  require_1d(g, d.table.n_obs, "g");
  require_finite(g.data(), d.table.n_obs, "g");
  const auto G = static_cast<py::ssize_t>(d.table.n_groups);
  DoubleArray ih(G), s(G);
  {
    py::gil_scoped_release release;
    calc_Ih(d.table, g.data(), ih.mutable_data(), s.mutable_data(), n_threads);
  }
  return py::make_tuple(ih, s);
}

DoubleArray calc_Ih_rows_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensities,
                            const DoubleArray& weights, const DoubleArray& g) {
  const auto n = static_cast<std::size_t>(intensities.size());
  require_1d(intensities, n, "intensities");
  require_1d(weights, n, "weights");
  require_1d(g, n, "g");
  require_1d(order, n, "order");
  if (offsets.ndim() != 1 || offsets.size() < 1)
    throw std::invalid_argument("group_offsets must be 1-dimensional with n_groups + 1 values");
  const std::int64_t* off = offsets.data();
  const auto n_groups = static_cast<std::size_t>(offsets.size()) - 1;
  // (messages are built only on failure: these loops run at every evaluation of a fit)
  require_group_offsets(off, n_groups);
  require(static_cast<std::size_t>(off[n_groups]) == n,
          "group_offsets must end at the row count " + std::to_string(n));
  // order must be a permutation of the rows: every Ĩ is then written once
  std::vector<std::uint8_t> seen(n, 0);
  const std::int64_t* o = order.data();
  for (std::size_t i = 0; i < n; ++i) {
    if (o[i] < 0 || static_cast<std::size_t>(o[i]) >= n)
      throw std::invalid_argument("order[" + std::to_string(i) + "] is not a row (0.." + std::to_string(n) + ")");
    if (seen[static_cast<std::size_t>(o[i])])
      throw std::invalid_argument("order holds row " + std::to_string(o[i]) + " twice");
    seen[static_cast<std::size_t>(o[i])] = 1;
  }
  require_finite(weights.data(), n, "weights");
  require_finite(g.data(), n, "g");
  for (std::size_t i = 0; i < n; ++i)
    if (!(weights.data()[i] >= 0.0))
      throw std::invalid_argument("weights must be >= 0 (row " + std::to_string(i) + ")");
  DoubleArray out(static_cast<py::ssize_t>(n));
  {
    py::gil_scoped_release release;
    calc_Ih_rows(n_groups, o, off, intensities.data(), weights.data(), g.data(), out.mutable_data());
  }
  return out;
}

DoubleArray sum_in_groups_py(const Int64Array& offsets, const DoubleArray& values) {
  if (offsets.ndim() != 1 || offsets.size() < 1)
    throw std::invalid_argument("group_offsets must be 1-dimensional with n_groups + 1 values");
  const auto n = static_cast<std::size_t>(values.size());
  require_1d(values, n, "values");
  GroupedObservations t;
  t.n_obs = n;
  t.n_groups = static_cast<std::size_t>(offsets.size()) - 1;
  t.group_offsets = offsets.data();
  std::vector<double> ones(0);
  t.intensities = values.data();
  t.weights = values.data();
  require(offsets.data()[0] == 0, "group_offsets[0] must be 0");
  for (std::size_t h = 0; h < t.n_groups; ++h)
    require(offsets.data()[h + 1] >= offsets.data()[h], "group_offsets must be non-decreasing");
  require(static_cast<std::size_t>(offsets.data()[t.n_groups]) == n,
          "group_offsets must end at len(values)");
  DoubleArray out(static_cast<py::ssize_t>(t.n_groups));
  sum_in_groups(t, values.data(), out.mutable_data());
  return out;
}

/// A 1-D index array: any integer dtype (converted to int64 once), else TypeError.
Int64Array index_array(const py::handle& h, const std::string& name) {
  if (!py::isinstance<py::array>(h)) throw py::type_error(name + " must be a numpy integer array");
  const auto a = py::reinterpret_borrow<py::array>(h);
  if (a.dtype().kind() != 'i' && a.dtype().kind() != 'u')
    throw py::type_error(name + " must have an integer dtype (got " + std::string(py::str(a.dtype())) + ")");
  if (a.ndim() != 1) throw std::invalid_argument(name + " must be 1-dimensional");
  return Int64Array::ensure(a);
}

/// A 1-D float column: any floating dtype (converted to float64 once), else TypeError.
DoubleArray float_column(const py::handle& h, const std::string& name) {
  if (!py::isinstance<py::array>(h)) throw py::type_error(name + " must be a numpy float array");
  const auto a = py::reinterpret_borrow<py::array>(h);
  if (a.dtype().kind() != 'f')
    throw py::type_error(name + " must have a floating dtype (got " + std::string(py::str(a.dtype())) + ")");
  if (a.ndim() != 1) throw std::invalid_argument(name + " must be 1-dimensional");
  return DoubleArray::ensure(a);
}

py::tuple build_ih_block_py(const py::list& sources, const std::optional<py::object>& group_map_in,
                            std::int64_t n_groups) {
  if (n_groups < 0) throw std::invalid_argument("n_groups must be >= 0");
  if (sources.empty()) throw std::invalid_argument("sources must hold at least one dataset");
  std::vector<Int64Array> keep_int;  // the converted arrays, alive until the kernel is done
  std::vector<DoubleArray> keep_float;
  keep_int.reserve(4 * sources.size() + 1);
  const std::int64_t* group_map = nullptr;
  std::size_t n_map = 0;
  if (group_map_in && !group_map_in->is_none()) {
    keep_int.push_back(index_array(*group_map_in, "group_map"));
    group_map = keep_int.back().data();
    n_map = size_of(keep_int.back());
  }
  std::vector<BlockSource> srcs(sources.size());
  std::size_t n = 0, n_cols = 0;
  for (std::size_t s = 0; s < srcs.size(); ++s) {
    const std::string where = "sources[" + std::to_string(s) + "]";
    if (!py::isinstance<py::tuple>(sources[s]) || py::len(sources[s]) != 7)
      throw py::type_error(where + " must be a tuple (rows, n_selected, groups, groups_per_row, column_rows | None, "
                           "loc_indices | None, columns)");
    const auto t = py::reinterpret_borrow<py::tuple>(sources[s]);
    BlockSource& src = srcs[s];
    keep_int.push_back(index_array(t[0], where + " rows"));
    src.rows = keep_int.back().data();
    src.n_rows = size_of(keep_int.back());
    const auto n_selected = t[1].cast<std::int64_t>();
    if (n_selected < 0) throw std::invalid_argument(where + ": n_selected must be >= 0");
    src.n_selected = static_cast<std::size_t>(n_selected);
    src.groups_per_row = t[3].cast<bool>();
    keep_int.push_back(index_array(t[2], where + " groups"));
    src.groups = keep_int.back().data();
    const std::size_t want_groups = src.groups_per_row ? src.n_rows : src.n_selected;
    if (size_of(keep_int.back()) != want_groups)
      throw std::invalid_argument(where + ": groups must hold " + std::to_string(want_groups) + " values (got " +
                                  std::to_string(size_of(keep_int.back())) + ")");
    if (!t[4].is_none()) {
      keep_int.push_back(index_array(t[4], where + " column_rows"));
      src.column_rows = keep_int.back().data();
      if (size_of(keep_int.back()) != src.n_selected)
        throw std::invalid_argument(where + ": column_rows must hold n_selected = " + std::to_string(src.n_selected) +
                                    " values");
    }
    if (!t[5].is_none()) {
      keep_int.push_back(index_array(t[5], where + " loc_indices"));
      src.loc_indices = keep_int.back().data();
      if (size_of(keep_int.back()) != src.n_selected)
        throw std::invalid_argument(where + ": loc_indices must hold n_selected = " + std::to_string(src.n_selected) +
                                    " values");
    }
    const auto cols = t[6].cast<py::sequence>();
    if (s == 0) n_cols = py::len(cols);
    if (py::len(cols) != n_cols || n_cols < 3)
      throw std::invalid_argument(where + ": columns must hold the same number (>= 3: intensity, variance, "
                                  "inverse scale factor, extras) for every source");
    for (std::size_t c = 0; c < n_cols; ++c) {
      keep_float.push_back(float_column(cols[c], where + " column " + std::to_string(c)));
      const std::size_t len = size_of(keep_float.back());
      if (c == 0) src.n_column_rows = len;
      if (len != src.n_column_rows)
        throw std::invalid_argument(where + ": its columns must have one length (column " + std::to_string(c) +
                                    " has " + std::to_string(len) + ", column 0 " +
                                    std::to_string(src.n_column_rows) + ")");
      src.columns.push_back(keep_float.back().data());
    }
    if (!src.column_rows && src.n_selected > src.n_column_rows)
      throw std::invalid_argument(where + ": without column_rows the columns need n_selected rows");
    n += src.n_rows;
  }
  const auto N = static_cast<py::ssize_t>(n);
  py::list columns_out, selections_out;
  BlockArrays out;
  for (std::size_t c = 0; c < n_cols; ++c) {
    DoubleArray a(N);
    out.columns.push_back(a.mutable_data());
    columns_out.append(a);
  }
  for (const BlockSource& src : srcs) {
    Int64Array a(static_cast<py::ssize_t>(src.n_rows));
    out.selections.push_back(a.mutable_data());
    selections_out.append(a);
  }
  Int64Array loc(N), dataset_id(N), group_ids(N), order(N), table_rows(N);
  Int64Array offsets(static_cast<py::ssize_t>(n_groups + 1));
  DoubleArray weights(N), Ih(N);
  ByteArray exclusion(N);
  out.loc_indices = loc.mutable_data();
  out.dataset_id = dataset_id.mutable_data();
  out.group_ids = group_ids.mutable_data();
  out.weights = weights.mutable_data();
  out.exclusion = exclusion.mutable_data();
  out.order = order.mutable_data();
  out.offsets = offsets.mutable_data();
  out.table_rows = table_rows.mutable_data();
  out.Ih = Ih.mutable_data();
  {
    py::gil_scoped_release release;  // raw buffers of the arrays held above
    build_block(srcs, group_map, n_map, static_cast<std::size_t>(n_groups), out);
  }
  return py::make_tuple(columns_out, loc, selections_out, dataset_id, group_ids, weights, exclusion, order, offsets,
                        table_rows, Ih);
}

}  // namespace

void bind_fit(py::module_& m) {
  m.def("functional_and_gradient", &functional_and_gradient_py, py::arg("group_offsets"),
        py::arg("intensities"), py::arg("weights"), py::arg("blocks"), py::arg("n_params"),
        py::arg("gradient") = true, py::arg("fixed_Ih") = py::none(), py::arg("rows") = false,
        py::arg("n_threads") = 1, py::arg("check_structure") = true,
        "f = sum w (I - g Ih)^2 and its envelope-theorem gradient; returns (f, gradient|None, "
        "(Ih, residuals, g)|None) in table order.");
  m.def("functional_and_scale_gradient", &functional_and_scale_gradient_py,
        py::arg("group_offsets"), py::arg("intensities"), py::arg("weights"), py::arg("blocks"),
        py::arg("fixed_Ih") = py::none(), py::arg("n_threads") = 1,
        "f = sum w (I - g Ih)^2 and df/dg = -2 w r Ih per table row (envelope theorem: Ih held),\n"
        "from the blocks' scales alone (their derivatives are not read; give n_cols = 0):\n"
        "returns (f, df/dg, Ih) in table order. With a model's transposed product\n"
        "(ModelBlock.transpose_product) this is f+g without dg/dp.");
  m.def("normal_equations", &normal_equations_py, py::arg("group_offsets"), py::arg("intensities"),
        py::arg("weights"), py::arg("blocks"), py::arg("n_params"), py::arg("kind") = "schur",
        py::arg("fixed_Ih") = py::none(), py::arg("n_threads") = 1, py::arg("check_structure") = true,
        py::arg("out") = py::none(),
        "Normal matrix (Ih eliminated) and rhs -J^T W r: returns (matrix, rhs, r_sq, n_equations).\n"
        "out=(matrix, rhs): add this table's terms to those float64 arrays instead (the matrix\n"
        "unfolded: call fold_normal_matrix once after the last block); they are returned.");
  m.def("model_normal_equations", &model_normal_equations_py, py::arg("group_offsets"),
        py::arg("intensities"), py::arg("weights"), py::arg("models"), py::arg("n_params"),
        py::arg("kind") = "schur", py::arg("fixed_Ih") = py::none(), py::arg("n_threads") = 1,
        py::arg("out") = py::none(),
        "normal_equations with the blocks' rows evaluated chunk by chunk from C++ model blocks,\n"
        "no dg/dp formed. models: (ModelBlock, params, first_row, column_offset, table_rows)\n"
        "tuples, table_rows strictly ascending. Returns (matrix, rhs, r_sq, n_equations, g, Ih |\n"
        "None, scales_usable), g and Ih per table row (Ih None with fixed_Ih); scales_usable\n"
        "False when some g is not finite and > 0 (the matrix is then meaningless).");
  m.def("model_functional_and_gradient", &model_functional_and_gradient_py,
        py::arg("group_offsets"), py::arg("intensities"), py::arg("weights"), py::arg("models"),
        py::arg("n_params"), py::arg("Ih") = false, py::arg("n_threads") = 1,
        py::arg("g_out") = py::none(),
        "f = sum w (I - g Ih)^2 and its gradient (Ih held) in one pass over chunks of whole\n"
        "groups, the table's rows from several C++ model blocks (e.g. one per dataset, groups\n"
        "spanning datasets), no dg/dp formed. models: as model_normal_equations takes them,\n"
        "(ModelBlock, params, first_row, column_offset, table_rows) tuples, table_rows strictly\n"
        "ascending, covering each table row once. Returns (f, gradient, g, Ih | None), g and Ih\n"
        "(with Ih=True) per table row (g written into g_out, a writable float64 array of one\n"
        "value per table row, when given); the same bits for any n_threads.");
  m.def("fold_normal_matrix", &fold_normal_matrix_py, py::arg("matrix"),
        "Make a matrix accumulated by normal_equations(out=...) symmetric, in place.");
  m.def("normal_matrix_diagonal", &normal_matrix_diagonal_py, py::arg("group_offsets"),
        py::arg("intensities"), py::arg("weights"), py::arg("blocks"), py::arg("n_params"),
        py::arg("fixed_Ih") = py::none(), py::arg("check_structure") = true,
        "Diagonal of the Ih-eliminated normal matrix (no P x P storage): an L-BFGS preconditioner.");
  m.def("cholesky_solve", &cholesky_solve_py, py::arg("lower"), py::arg("rhs"),
        "x with L L^T x = rhs, L the lower Cholesky factor (n x n, lower triangle read): forward\n"
        "and back substitution, O(n^2).");
  m.def("row_quadratic_forms", &row_quadratic_forms_py, py::arg("indptr"), py::arg("indices"),
        py::arg("values"), py::arg("V"), py::arg("n_threads") = 1,
        "diag(J V J^T) of a CSR matrix J (indptr int64, indices int32, values) and a dense V.");
  m.def("model_row_variances", &model_row_variances_py, py::arg("block"), py::arg("params"),
        py::arg("V"), py::arg("n_threads") = 1,
        "(var g, g) of every row of a model block (ModelBlock) at params with V (n_cols x n_cols,\n"
        "the block's columns), without forming dg/dp: 4096-row chunks reduced by row_quadratic_forms.");
  m.def("model_row_variances_into", &model_row_variances_into_py, py::arg("blocks"),
        py::arg("params"), py::arg("V"), py::arg("rows"), py::arg("variances"), py::arg("g"),
        py::arg("n_threads") = 1,
        "model_row_variances of several blocks of one model (the same params and V) in one call:\n"
        "row r of blocks[b] written to variances and g (float64, C-contiguous, writeable) at\n"
        "rows[b][r] (distinct positions). Each block's values are model_row_variances' bit for\n"
        "bit; the chunks of all blocks shared over n_threads (identical for any count).");
  m.def("calc_Ih", &calc_Ih_py, py::arg("group_offsets"), py::arg("intensities"),
        py::arg("weights"), py::arg("g"), py::arg("n_threads") = 1,
        "Per group Ih = sum wgI / sum wg^2 (0 if the sum is 0) and S = sum wg^2.");
  m.def("calc_Ih_rows", &calc_Ih_rows_py, py::arg("order"), py::arg("group_offsets"), py::arg("intensities"),
        py::arg("weights"), py::arg("g"),
        "Ĩ of every row of a block in its own row order (table position l holds row order[l]):\n"
        "calc_Ih of the table-order copies (non-finite I as 0), broadcast to the rows, bit for bit.");
  m.def("build_ih_block", &build_ih_block_py, py::arg("sources"), py::arg("group_map"), py::arg("n_groups"),
        "One Ih-table block in one pass. sources: per dataset (rows, n_selected, groups, groups_per_row,\n"
        "column_rows | None, loc_indices | None, columns): its block rows (selected rows, group order), the\n"
        "group of each selected row or of each block row (groups_per_row), mapped by group_map\n"
        "(None = identity), the columns' row and the loc index of each selected row (None: the column\n"
        "row), and whole float columns [intensity, variance, inverse scale factor, extras...].\n"
        "Returns (columns, loc_indices, selections, dataset_id, group_ids, weights, exclusion, order,\n"
        "offsets, table_rows, Ih): IhTableBlock's arrays (Ih as calc_Ih_rows, bit for bit).");
  m.def("sum_in_groups", &sum_in_groups_py, py::arg("group_offsets"), py::arg("values"),
        "Sum values (table order) within each group.");
  m.def("max_threads", &max_threads, "Threads available to the fit kernels (1 without OpenMP).");
}

}  // namespace xtalscale::py_bind
