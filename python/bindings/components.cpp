// Bindings for the scale-component kernels and spherical harmonics (_core.components).
// Inputs are converted once at the boundary (c_style | forcecast); outputs are fresh numpy
// arrays written in place by the kernels. The GIL is released around each kernel: by then
// every Python object has been converted and the kernels only touch raw buffers.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "internal/large_buffers.hpp"
#include "xtalscale/components.hpp"
#include "xtalscale/harmonics.hpp"
#include "xtalscale/smoother.hpp"

namespace xtalscale::py_bind {
namespace {


/// An (n, k) float64 array (or a flat one of length n*k, as flex vec3 columns may arrive).
std::size_t rows_of(const DoubleArray& a, py::ssize_t k, const char* name) {
  if (a.ndim() == 2 && a.shape(1) == k) return static_cast<std::size_t>(a.shape(0));
  throw std::invalid_argument(std::string(name) + " must have shape (n, " + std::to_string(k) +
                              ")");
}

/// Structural checks of a CSR triple produced by smoother_weights (kept cheap: O(n)).
void check_csr32(const Int32Array& indptr, const Int32Array& indices, const DoubleArray& data) {
  require_ndim(indptr, 1, "indptr");
  require_ndim(indices, 1, "indices");
  require_ndim(data, 1, "data");
  require(indptr.size() >= 1, "indptr must have n_rows + 1 entries");
  require_same_length(size_of(indices), size_of(data), "indices", "data");
  const std::int32_t* ip = indptr.data();
  require(ip[0] == 0, "indptr must start at 0");
  for (py::ssize_t i = 0; i + 1 < indptr.size(); ++i)
    require(ip[i + 1] >= ip[i], "indptr must be non-decreasing");
  require(static_cast<std::size_t>(ip[indptr.size() - 1]) == size_of(data),
          "indptr must end at len(data)");
}

void check_columns(const Int32Array& indices, std::size_t n_cols, const char* what) {
  const std::int32_t* ix = indices.data();
  for (py::ssize_t k = 0; k < indices.size(); ++k)
    require_index(ix[k], n_cols, what);
}

/// Optional first-column vector (first-fixed smoother) of length n_rows, or nullptr.
const double* optional_column(const std::optional<DoubleArray>& col, std::size_t n_rows) {
  if (!col) return nullptr;
  require_ndim(*col, 1, "first_col");
  require_same_length(size_of(*col), n_rows, "first_col", "rows");
  return col->data();
}

/// Normalised weight matrix of a D-dim smoother over n points, as an owning WeightMatrix.
template <int D>
components::WeightMatrix weight_matrix_d(const std::vector<DoubleArray>& coords,
                                         const std::vector<std::array<double, 2>>& ranges,
                                         const std::vector<std::size_t>& intervals,
                                         std::size_t num_average, double sigma, bool first_fixed) {
  static const char* const kNames[3] = {"x", "y", "z"};
  std::array<std::array<double, 2>, D> r{};
  std::array<std::size_t, D> iv{};
  std::array<const double*, D> cptr{};
  const std::size_t n = size_of(coords[0]);
  for (int a = 0; a < D; ++a) {
    require_ndim(coords[a], 1, kNames[a]);
    require_same_length(size_of(coords[a]), n, kNames[a], "x");
    r[a] = ranges[a];
    iv[a] = intervals[a];
    cptr[a] = coords[a].data();
  }
  GaussianSmoother<D> smoother(r, iv);
  smoother.set_smoothing(num_average, sigma);
  const std::size_t capacity = n * smoother.max_row_nnz();
  require(capacity < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
          "too many weight entries for 32-bit CSR indices; split the reflections into blocks");
  const std::size_t n_values = smoother.num_values();
  auto indptr = xtalscale::detail::large_vector<std::int32_t>(n + 1);
  auto indices = xtalscale::detail::large_vector<std::int32_t>(capacity);
  auto data = xtalscale::detail::large_vector<double>(capacity);
  std::vector<double> first_col(first_fixed ? n : 0);
  {
    py::gil_scoped_release release;  // pure C++ over converted buffers
    // Exactness policy (components.hpp, dials_weight_matrix_1d): 1-D blocks keep DIALS's
    // operations; 2-D/3-D go through the smoother's bulk kernel. first_fixed is applied below,
    // so that p₀'s weights are kept in first_col.
    std::size_t nnz = 0;
    if constexpr (D == 1) {
      nnz = components::dials_weight_matrix_1d(smoother, n, cptr[0], indptr.data(),
                                               indices.data(), data.data());
    } else {
      const std::vector<double> zeros(n_values, 0.0);  // values are not computed here
      nnz = smoother.template multi_value_weight<std::int32_t>(
          n, cptr, zeros.data(), n_values, nullptr, nullptr, indptr.data(), indices.data(),
          data.data(), WeightMode::normalised);
    }
    if (first_fixed)
      nnz = components::split_first_column(n, indptr.data(), indices.data(), data.data(),
                                           first_col.data());
    indices.resize(nnz);
    data.resize(nnz);
    if (nnz * 10 < capacity * 9) {  // the window bound overshot: do not hold the slack
      indices.shrink_to_fit();
      data.shrink_to_fit();
    }
  }
  return components::WeightMatrix(n, first_fixed ? n_values - 1 : n_values, std::move(indptr),
                                  std::move(indices), std::move(data), std::move(first_col),
                                  first_fixed);
}

components::WeightMatrix weight_matrix(const std::vector<DoubleArray>& coords,
                                       const std::vector<std::array<double, 2>>& ranges,
                                       const std::vector<std::size_t>& intervals,
                                       std::size_t num_average, double sigma, bool first_fixed) {
  const std::size_t d = coords.size();
  require(d >= 1 && d <= 3, "coords must hold 1, 2 or 3 coordinate arrays");
  require(ranges.size() == d && intervals.size() == d,
          "one range and one interval count per coordinate array are required");
  require(!first_fixed || d == 1, "first_fixed is only defined for a 1-D smoother");
  if (d == 1) return weight_matrix_d<1>(coords, ranges, intervals, num_average, sigma, first_fixed);
  if (d == 2) return weight_matrix_d<2>(coords, ranges, intervals, num_average, sigma, false);
  return weight_matrix_d<3>(coords, ranges, intervals, num_average, sigma, false);
}


DoubleArray wm_values(const components::WeightMatrix& w, const DoubleArray& p) {
  auto pv = vector_view(p, "parameters");
  require(static_cast<std::size_t>(pv.size()) == w.n_params(),
          "parameters must have " + std::to_string(w.n_params()) + " values (got " +
              std::to_string(pv.size()) + ")");
  DoubleArray out(static_cast<py::ssize_t>(w.n_rows()));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    w.values(pv.data(), o);
  }
  return out;
}

py::tuple wm_b_scales(const components::WeightMatrix& w, const DoubleArray& p,
                      const DoubleArray& factor, bool derivatives) {
  auto pv = vector_view(p, "parameters");
  require(static_cast<std::size_t>(pv.size()) == w.n_params(),
          "parameters must have " + std::to_string(w.n_params()) + " values (got " +
              std::to_string(pv.size()) + ")");
  auto f = vector_view(factor, "factor");
  require_same_length(static_cast<std::size_t>(f.size()), w.n_rows(), "factor", "rows");
  DoubleArray scales(static_cast<py::ssize_t>(w.n_rows()));
  py::object d_data = py::none();
  double* dptr = nullptr;
  if (derivatives) {
    DoubleArray d(static_cast<py::ssize_t>(w.nnz()));
    dptr = d.mutable_data();
    d_data = d;
  }
  double* s = scales.mutable_data();
  {
    py::gil_scoped_release release;
    w.b_scales(pv.data(), f.data(), s, dptr);
  }
  return py::make_tuple(scales, d_data);
}

py::tuple smoother_weights(const std::vector<DoubleArray>& coords,
                           const std::vector<std::array<double, 2>>& ranges,
                           const std::vector<std::size_t>& intervals, std::size_t num_average,
                           double sigma, bool first_fixed) {
  py::object owner = py::cast(weight_matrix(coords, ranges, intervals, num_average, sigma,
                                            first_fixed));
  const auto& w = owner.cast<const components::WeightMatrix&>();
  py::object first = first_fixed ? py::object(readonly_view(w.first_col(), owner)) : py::none();
  return py::make_tuple(readonly_view(w.indptr(), owner), readonly_view(w.indices(), owner),
                        readonly_view(w.data(), owner), first);
}

DoubleArray csr_matvec(const Int32Array& indptr, const Int32Array& indices,
                       const DoubleArray& data, const DoubleArray& p,
                       const std::optional<DoubleArray>& first_col, double p0) {
  check_csr32(indptr, indices, data);
  auto pv = vector_view(p, "parameters");
  check_columns(indices, static_cast<std::size_t>(pv.size()), "indices");
  const std::size_t n_rows = size_of(indptr) - 1;
  const double* fc = optional_column(first_col, n_rows);
  DoubleArray out(static_cast<py::ssize_t>(n_rows));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::csr_matvec(n_rows, indptr.data(), indices.data(), data.data(), pv.data(), fc,
                           p0, o);
  }
  return out;
}

DoubleArray bin_coordinates(const py::array_t<double>& values, double start, double width,
                            bool inverse_square) {
  require_ndim(values, 1, "values");
  require(std::isfinite(start) && std::isfinite(width) && width != 0.0,
          "start must be finite and width finite and non-zero");
  require(values.strides(0) % static_cast<py::ssize_t>(sizeof(double)) == 0,
          "values must be an array of float64 with a whole-element stride");
  const std::size_t n = static_cast<std::size_t>(values.shape(0));
  const std::ptrdiff_t stride = values.strides(0) / static_cast<py::ssize_t>(sizeof(double));
  DoubleArray out(static_cast<py::ssize_t>(n));
  const double* v = values.data();
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::bin_coordinates(n, v, stride, start, width, inverse_square, o);
  }
  return out;
}

py::tuple exp_scales(const DoubleArray& factor, double coef, bool derivatives) {
  auto f = vector_view(factor, "factor");
  require(std::isfinite(coef), "parameter must be finite");
  const std::size_t n = static_cast<std::size_t>(f.size());
  DoubleArray scales(static_cast<py::ssize_t>(n));
  py::object derivs = py::none();
  double* dptr = nullptr;
  if (derivatives) {
    DoubleArray d(static_cast<py::ssize_t>(n));
    dptr = d.mutable_data();
    derivs = d;
  }
  double* s = scales.mutable_data();
  {
    py::gil_scoped_release release;
    components::exp_scales(n, f.data(), coef, s, dptr);
  }
  return py::make_tuple(scales, derivs);
}

py::tuple smooth_b_scales(const Int32Array& indptr, const Int32Array& indices,
                          const DoubleArray& data, const DoubleArray& p,
                          const DoubleArray& factor, const std::optional<DoubleArray>& first_col,
                          double p0, bool derivatives) {
  check_csr32(indptr, indices, data);
  auto pv = vector_view(p, "parameters");
  check_columns(indices, static_cast<std::size_t>(pv.size()), "indices");
  const std::size_t n_rows = size_of(indptr) - 1;
  auto f = vector_view(factor, "factor");
  require_same_length(static_cast<std::size_t>(f.size()), n_rows, "factor", "rows");
  const double* fc = optional_column(first_col, n_rows);
  DoubleArray scales(static_cast<py::ssize_t>(n_rows));
  py::object d_data = py::none();
  double* dptr = nullptr;
  if (derivatives) {
    DoubleArray d(data.size());
    dptr = d.mutable_data();
    d_data = d;
  }
  double* s = scales.mutable_data();
  {
    py::gil_scoped_release release;
    components::smooth_b_scales(n_rows, indptr.data(), indices.data(), data.data(), pv.data(),
                                fc, p0, f.data(), s, dptr);
  }
  return py::make_tuple(scales, d_data);
}

DoubleArray row_multiply(const Int64Array& indptr, const DoubleArray& data, const DoubleArray& v) {
  require_ndim(indptr, 1, "indptr");
  require_ndim(data, 1, "data");
  auto vv = vector_view(v, "v", false);
  require(indptr.size() >= 1, "indptr must have n_rows + 1 entries");
  const std::size_t n_rows = size_of(indptr) - 1;
  require_same_length(static_cast<std::size_t>(vv.size()), n_rows, "v", "matrix rows");
  const std::int64_t* ip = indptr.data();
  require(ip[0] == 0 && static_cast<std::size_t>(ip[n_rows]) == size_of(data),
          "indptr must run from 0 to len(data)");
  for (std::size_t i = 0; i < n_rows; ++i) require(ip[i + 1] >= ip[i], "indptr must be sorted");
  DoubleArray out(data.size());
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::row_multiply(n_rows, ip, data.data(), vv.data(), o);
  }
  return out;
}

DoubleArray sh_scales(const DoubleArray& harmonics, const DoubleArray& coef) {
  require_ndim(harmonics, 2, "harmonic_values");
  auto c = vector_view(coef, "parameters");
  const auto n = static_cast<std::size_t>(harmonics.shape(0));
  const auto np = static_cast<std::size_t>(harmonics.shape(1));
  require_same_length(static_cast<std::size_t>(c.size()), np, "parameters",
                      "harmonic_values columns");
  DoubleArray out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::sh_scales(n, np, harmonics.data(), c.data(), o);
  }
  return out;
}

// ------------------------------------------------------------------ harmonics

DoubleArray calc_theta_phi(const DoubleArray& xyz) {
  const std::size_t n = rows_of(xyz, 3, "xyz");
  DoubleArray out({static_cast<py::ssize_t>(n), py::ssize_t{2}});
  double* o = out.mutable_data();
  const double* in = xyz.data();
  {
    py::gil_scoped_release release;
    harmonics::calc_theta_phi(in, n, o);
  }
  return out;
}

Int64Array calc_lookup_index(const DoubleArray& theta_phi, double points_per_degree) {
  const std::size_t n = rows_of(theta_phi, 2, "theta_phi");
  Int64Array out(static_cast<py::ssize_t>(n));
  std::int64_t* o = out.mutable_data();
  const double* in = theta_phi.data();
  {
    py::gil_scoped_release release;
    harmonics::calc_lookup_index(in, n, points_per_degree, o);
  }
  return out;
}

DoubleArray sph_harm_table(const DoubleArray& tp0, const DoubleArray& tp1, int lmax) {
  const std::size_t n = rows_of(tp0, 2, "s0_theta_phi");
  require_same_length(n, rows_of(tp1, 2, "s1_theta_phi"), "s0_theta_phi", "s1_theta_phi");
  const std::size_t np = harmonics::n_params(lmax);
  DoubleArray out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(np)});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::sph_harm_table(tp0.data(), tp1.data(), n, lmax, o);
  }
  return out;
}

DoubleArray sph_harm_lookup_table(int lmax, int points_per_degree) {
  const std::size_t np = harmonics::n_params(lmax);
  const std::size_t n_items = harmonics::lookup_table_size(points_per_degree);
  DoubleArray out({static_cast<py::ssize_t>(n_items), static_cast<py::ssize_t>(np)});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::sph_harm_lookup_table(lmax, points_per_degree, o);
  }
  return out;
}

/// A read-only (rows, cols) numpy view of a factors table, keeping the factors alive.
py::array factor_view(const std::shared_ptr<harmonics::LookupFactors>& f,
                      const std::vector<double>& table, std::size_t rows) {
  py::array_t<double> a({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(f->n_params)},
                        table.data(), py::cast(f));
  a.attr("setflags")(py::arg("write") = false);
  return std::move(a);
}

void bind_lookup_factors(py::module_& m) {
  using harmonics::LookupFactors;
  py::class_<LookupFactors, std::shared_ptr<LookupFactors>>(
      m, "LookupFactors",
      "The lookup grid's separable factors: table[t*n_phi + j, k] = theta_factors[t, k] *\n"
      "phi_factors[j, k] exactly (see sph_harm_lookup_factors).")
      .def_readonly("lmax", &LookupFactors::lmax)
      .def_readonly("points_per_degree", &LookupFactors::points_per_degree)
      .def_readonly("n_params", &LookupFactors::n_params)
      .def_readonly("n_theta", &LookupFactors::n_theta)
      .def_readonly("n_phi", &LookupFactors::n_phi)
      .def_property_readonly("grid_size", &LookupFactors::grid_size)
      .def_property_readonly("nbytes", [](const LookupFactors& f) {
        return (f.theta.size() + f.phi.size()) * sizeof(double);
      })
      .def_property_readonly("theta_factors", [](const std::shared_ptr<LookupFactors>& f) {
        return factor_view(f, f->theta, f->n_theta);
      })
      .def_property_readonly("phi_factors", [](const std::shared_ptr<LookupFactors>& f) {
        return factor_view(f, f->phi, f->n_phi);
      });
  m.def("sph_harm_lookup_factors", [](int lmax, int points_per_degree) {
          return std::make_shared<LookupFactors>(
              harmonics::sph_harm_lookup_factors(lmax, points_per_degree));
        },
        py::arg("lmax"), py::arg("points_per_degree"),
        "The (n_theta, n_params) and (n_phi, n_params) factor tables of the lookup grid,\n"
        "whose products are sph_harm_lookup_table's entries bit for bit.");
}

/// Checks a lookup-table call (two row-index arrays, a 2-D coefficients table, the number of
/// columns wanted) and returns {n, table rows, table row stride}.
template <typename IndexArray>
std::array<std::size_t, 3> check_lookup(const IndexArray& i0, const IndexArray& i1,
                                        const char* name0, const char* name1,
                                        const DoubleArray& table, std::size_t n_cols) {
  require_ndim(i0, 1, name0);
  require_ndim(i1, 1, name1);
  require_same_length(size_of(i0), size_of(i1), name0, name1);
  require_ndim(table, 2, "coefficients table");
  const auto n_rows = static_cast<std::size_t>(table.shape(0));
  const auto stride = static_cast<std::size_t>(table.shape(1));
  require(n_cols <= stride, "n_params exceeds the columns of the coefficients table (" +
                                std::to_string(n_cols) + " > " + std::to_string(stride) + ")");
  return {size_of(i0), n_rows, stride};
}

DoubleArray harmonics_from_lookup(const Int64Array& i0, const Int64Array& i1,
                                  const DoubleArray& table, std::size_t n_cols) {
  const auto [n, n_rows, stride] =
      check_lookup(i0, i1, "s0_selection", "s1_selection", table, n_cols);
  DoubleArray out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(n_cols)});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::harmonics_from_lookup(i0.data(), i1.data(), n, table.data(), n_rows, stride,
                                     n_cols, o);
  }
  return out;
}

DoubleArray lookup_sh_scales(const Int32Array& i0, const Int32Array& i1, const DoubleArray& table,
                             const DoubleArray& coef) {
  auto c = vector_view(coef, "parameters");
  const auto n_cols = static_cast<std::size_t>(c.size());
  const auto [n, n_rows, stride] = check_lookup(i0, i1, "s0_lookup", "s1_lookup", table, n_cols);
  DoubleArray out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::lookup_sh_scales(i0.data(), i1.data(), n, table.data(), n_rows, stride, n_cols,
                                c.data(), o);
  }
  return out;
}


/// A caller-provided output array: exactly @p dtype, C-contiguous, writeable, 1-D, >= n long.
template <typename T>
T* output_buffer(const py::object& obj, std::size_t n, const char* name) {
  if (!py::isinstance<py::array_t<T>>(obj))
    throw std::invalid_argument(std::string(name) + " must be a numpy array of dtype " +
                         py::str(py::dtype::of<T>()).cast<std::string>());
  auto a = obj.cast<py::array_t<T>>();
  require(a.ndim() == 1, std::string(name) + " must be 1-dimensional");
  require((a.flags() & py::array::c_style) != 0, std::string(name) + " must be C-contiguous");
  require(a.writeable(), std::string(name) + " must be writeable");
  require(static_cast<std::size_t>(a.size()) >= n,
          std::string(name) + " must hold at least " + std::to_string(n) + " entries (got " +
              std::to_string(a.size()) + ")");
  return a.mutable_data();
}

/// @p given when it is a valid output buffer of at least @p len entries, or a new array
/// when it is None.
template <typename T>
py::object output_or_new(const py::object& given, std::size_t len, const char* name) {
  if (given.is_none()) return py::object(py::array_t<T>(static_cast<py::ssize_t>(len)));
  output_buffer<T>(given, len, name);
  return given;
}

/// The CSR output arrays of a lean 1-D smoother call (objects returned to Python, and their
/// data pointers; null where the kernel must not write).
struct CsrOutput {
  py::object indptr = py::none(), indices = py::none(), data = py::none();
  std::int32_t* ip = nullptr;
  std::int32_t* ix = nullptr;
  double* dd = nullptr;
};

/// New or caller-given CSR arrays for n rows of at most @p capacity entries in all.
CsrOutput csr_output(const py::object& indptr_out, const py::object& indices_out,
                     const py::object& data_out, std::size_t n, std::size_t capacity) {
  CsrOutput o;
  o.indptr = output_or_new<std::int32_t>(indptr_out, n + 1, "indptr_out");
  o.indices = output_or_new<std::int32_t>(indices_out, capacity, "indices_out");
  o.data = output_or_new<double>(data_out, capacity, "data_out");
  o.ip = output_buffer<std::int32_t>(o.indptr, n + 1, "indptr_out");
  o.ix = output_buffer<std::int32_t>(o.indices, capacity, "indices_out");
  o.dd = output_buffer<double>(o.data, capacity, "data_out");
  return o;
}

/// The smoother of a lean 1-D component call.
GaussianSmoother<1> lean_smoother(std::array<double, 2> range, std::size_t n_intervals,
                                  std::size_t num_average, double sigma) {
  GaussianSmoother<1> smoother({range}, {n_intervals});
  smoother.set_smoothing(num_average, sigma);
  return smoother;
}

/// Checks the parameter count against the smoother and returns the CSR capacity for n rows
/// (which must fit 32-bit indices).
std::size_t lean_csr_capacity(const GaussianSmoother<1>& smoother, std::size_t n_params,
                              std::size_t n) {
  require(n_params == smoother.num_values(),
          "parameters must have " + std::to_string(smoother.num_values()) + " values (got " +
              std::to_string(n_params) + ")");
  const std::size_t capacity = n * smoother.max_row_nnz();
  require(capacity < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
          "too many weight entries for 32-bit CSR indices; split the reflections into blocks");
  return capacity;
}

/// The data of an optional per-reflection factor of length n (null when absent).
const double* optional_column(const std::optional<DoubleArray>& column, std::size_t n,
                              const char* name) {
  if (!column) return nullptr;
  require_ndim(*column, 1, name);
  require_same_length(size_of(*column), n, name, "x");
  return column->data();
}

py::tuple smooth_1d_prepare(const DoubleArray& x, double x_shift, std::array<double, 2> range,
                            std::size_t n_intervals, std::size_t num_average, double sigma) {
  require_ndim(x, 1, "x");
  require(std::isfinite(x_shift), "x_shift must be finite");
  const GaussianSmoother<1> smoother = lean_smoother(range, n_intervals, num_average, sigma);
  const std::size_t n = size_of(x);
  py::array_t<std::uint16_t> window(static_cast<py::ssize_t>(n));
  DoubleArray q(static_cast<py::ssize_t>(n));
  std::uint16_t* w = window.mutable_data();
  double* qq = q.mutable_data();
  {
    py::gil_scoped_release release;
    components::smooth_1d_prepare(smoother, n, x.data(), x_shift, w, qq);
  }
  return py::make_tuple(window, q);
}

py::tuple smooth_1d_apply(const DoubleArray& x, double x_shift, std::array<double, 2> range,
                          std::size_t n_intervals, std::size_t num_average, double sigma,
                          const py::array_t<std::uint16_t, py::array::c_style>& window,
                          const DoubleArray& q, const DoubleArray& p, bool first_fixed,
                          const std::optional<DoubleArray>& factor, bool derivatives,
                          const py::object& scales_out, const py::object& indptr_out,
                          const py::object& indices_out, const py::object& data_out,
                          bool write_pattern) {
  require_ndim(x, 1, "x");
  require(std::isfinite(x_shift), "x_shift must be finite");
  auto pv = vector_view(p, "parameters");
  const std::size_t n = size_of(x);
  require_ndim(window, 1, "window");
  require_ndim(q, 1, "q");
  require_same_length(size_of(window), n, "window", "x");
  require_same_length(size_of(q), n, "q", "x");
  const double* dptr = optional_column(factor, n, "factor");
  const GaussianSmoother<1> smoother = lean_smoother(range, n_intervals, num_average, sigma);
  const std::size_t capacity =
      lean_csr_capacity(smoother, static_cast<std::size_t>(pv.size()), n);
  {  // windows must fit this smoother (they index the parameters)
    const std::uint16_t* w = window.data();
    const auto nv = smoother.num_values();
    bool bad = false;
    for (std::size_t i = 0; i < n; ++i)
      bad |= static_cast<std::size_t>(w[i] >> 3) + (w[i] & 7u) > nv || (w[i] & 7u) > 5u;
    require(!bad, "window does not fit the smoother: prepare it with the same settings");
  }
  py::object scales = output_or_new<double>(scales_out, n, "scales_out");
  double* s = output_buffer<double>(scales, n, "scales_out");
  CsrOutput csr;
  if (derivatives && !write_pattern) {
    // The pattern buffers hold an earlier call's pattern: returned as they are, never touched.
    require(!indptr_out.is_none() && !indices_out.is_none(),
            "indptr_out and indices_out must be given with write_pattern=False");
    csr.indptr = indptr_out;
    csr.indices = indices_out;
    csr.data = output_or_new<double>(data_out, capacity, "data_out");
    csr.dd = output_buffer<double>(csr.data, capacity, "data_out");
  } else if (derivatives) {
    csr = csr_output(indptr_out, indices_out, data_out, n, capacity);
  }
  std::size_t nnz = 0;
  {
    py::gil_scoped_release release;
    nnz = components::smooth_1d_apply(smoother, n, x.data(), x_shift, window.data(), q.data(),
                                      pv.data(), static_cast<std::size_t>(pv.size()),
                                      first_fixed, dptr, s, csr.ip, csr.ix, csr.dd, write_pattern);
  }
  return py::make_tuple(scales, csr.indptr, csr.indices, csr.data, nnz);
}


DoubleArray sh_scales_f32(const FloatArray& h, const DoubleArray& coef) {
  require_ndim(h, 2, "harmonic_values");
  auto c = vector_view(coef, "parameters");
  require(h.shape(1) == c.size(), "harmonic_values must have one column per parameter (" +
                                      std::to_string(c.size()) + ")");
  const auto n = static_cast<std::size_t>(h.shape(0));
  DoubleArray out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::sh_scales_f32(n, static_cast<std::size_t>(c.size()), h.data(), c.data(), o);
  }
  return out;
}

FloatArray harmonics_from_lookup_f32(const Int32Array& i0, const Int32Array& i1,
                                     const DoubleArray& table, std::size_t n_params) {
  const auto [n, n_rows, stride] =
      check_lookup(i0, i1, "s0_lookup", "s1_lookup", table, n_params);
  FloatArray out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(n_params)});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    components::harmonics_from_lookup_f32(i0.data(), i1.data(), n, table.data(), n_rows, stride,
                                          n_params, o);
  }
  return out;
}

DoubleArray rotate_vectors_about_axis(const DoubleArray& axis, const DoubleArray& vectors,
                                      const DoubleArray& angles) {
  require(axis.size() == 3, "rot_axis must hold exactly one 3-vector");
  const std::size_t n = rows_of(vectors, 3, "vectors");
  require_ndim(angles, 1, "angles");
  require_same_length(n, size_of(angles), "vectors", "angles");
  DoubleArray out({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::rotate_vectors_about_axis(axis.data(), vectors.data(), angles.data(), n, o);
  }
  return out;
}

Int64Array grid_lookup_indices(const DoubleArray& xyz, int points_per_degree) {
  const std::size_t n = rows_of(xyz, 3, "xyz");
  Int64Array out(static_cast<py::ssize_t>(n));
  std::int64_t* o = out.mutable_data();
  const double* in = xyz.data();
  {
    py::gil_scoped_release release;
    harmonics::grid_lookup_indices(in, n, points_per_degree, o);
  }
  return out;
}

/// The AbsorptionFrame of the Python arguments (3-vectors and row-major 3 × 3 matrices).
harmonics::AbsorptionFrame absorption_frame(const DoubleArray& rotation_axis,
                                            const DoubleArray& fixed_rotation,
                                            const DoubleArray& setting_rotation,
                                            const DoubleArray& sample_to_source,
                                            const DoubleArray& align_axis) {
  harmonics::AbsorptionFrame f{};
  const auto copy = [](const DoubleArray& a, std::size_t size, double* out, const char* name) {
    require(static_cast<std::size_t>(a.size()) == size,
            std::string(name) + (size == 3 ? " must hold one 3-vector" : " must be a 3 x 3 matrix"));
    const DoubleArray c = a.attr("reshape")(-1).cast<DoubleArray>();
    std::copy(c.data(), c.data() + size, out);
  };
  copy(rotation_axis, 3, f.rotation_axis, "rotation_axis");
  copy(fixed_rotation, 9, f.fixed_rotation, "fixed_rotation");
  copy(setting_rotation, 9, f.setting_rotation, "setting_rotation");
  copy(sample_to_source, 3, f.sample_to_source, "sample_to_source");
  copy(align_axis, 3, f.align_axis, "align_axis");
  return f;
}

py::tuple absorption_frame_vectors(const DoubleArray& rotation_axis, const DoubleArray& fixed,
                                   const DoubleArray& setting, const DoubleArray& source,
                                   const DoubleArray& align_axis, const DoubleArray& s1,
                                   const DoubleArray& phi) {
  const auto frame = absorption_frame(rotation_axis, fixed, setting, source, align_axis);
  const std::size_t n = rows_of(s1, 3, "s1");
  require_ndim(phi, 1, "phi");
  require_same_length(n, size_of(phi), "s1", "phi");
  DoubleArray s0c({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  DoubleArray s1c({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  double* o0 = s0c.mutable_data();
  double* o1 = s1c.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::absorption_frame_vectors(frame, s1.data(), phi.data(), n, o0, o1);
  }
  return py::make_tuple(s0c, s1c);
}

py::tuple absorption_lookup_indices(const DoubleArray& rotation_axis, const DoubleArray& fixed,
                                    const DoubleArray& setting, const DoubleArray& source,
                                    const DoubleArray& align_axis, const DoubleArray& s1,
                                    const DoubleArray& phi, int points_per_degree,
                                    int n_threads) {
  const auto frame = absorption_frame(rotation_axis, fixed, setting, source, align_axis);
  const std::size_t n = rows_of(s1, 3, "s1");
  require_ndim(phi, 1, "phi");
  require_same_length(n, size_of(phi), "s1", "phi");
  Int64Array i0(static_cast<py::ssize_t>(n)), i1(static_cast<py::ssize_t>(n));
  std::int64_t* o0 = i0.mutable_data();
  std::int64_t* o1 = i1.mutable_data();
  {
    py::gil_scoped_release release;
    harmonics::absorption_lookup_indices(frame, s1.data(), phi.data(), n, points_per_degree, o0,
                                         o1, n_threads);
  }
  return py::make_tuple(i0, i1);
}

DoubleArray real_harmonics(int lmax, double theta, double phi) {
  DoubleArray out(static_cast<py::ssize_t>(harmonics::n_params(lmax)));
  harmonics::real_harmonics(lmax, theta, phi, out.mutable_data());
  return out;
}

}  // namespace

void bind_components(py::module_& m) {
  using components::WeightMatrix;
  py::class_<WeightMatrix, std::shared_ptr<WeightMatrix>>(m, "WeightMatrix",
                           "Normalised smoother weights of one block (CSR, built once).")
      .def_property_readonly("shape",
                             [](const WeightMatrix& w) {
                               return py::make_tuple(w.n_rows(), w.n_cols());
                             })
      .def_property_readonly("n_params", &WeightMatrix::n_params)
      .def_property_readonly("nnz", &WeightMatrix::nnz)
      .def_property_readonly("nbytes", &WeightMatrix::nbytes)
      .def_property_readonly("fixed_first", &WeightMatrix::fixed_first)
      .def_property_readonly(
          "indptr", [](py::object self) { return readonly_view(self.cast<const WeightMatrix&>().indptr(), self); })
      .def_property_readonly(
          "indices", [](py::object self) { return readonly_view(self.cast<const WeightMatrix&>().indices(), self); })
      .def_property_readonly(
          "data", [](py::object self) { return readonly_view(self.cast<const WeightMatrix&>().data(), self); })
      .def_property_readonly("first_col",
                             [](py::object self) -> py::object {
                               const auto& w = self.cast<const WeightMatrix&>();
                               if (!w.fixed_first()) return py::none();
                               return readonly_view(w.first_col(), self);
                             })
      .def("values", &wm_values, py::arg("parameters"),
           "Σ_j w_ij p_j for the full parameter vector (p₀ included when it is fixed).")
      .def("b_scales", &wm_b_scales, py::arg("parameters"), py::arg("factor"),
           py::arg("derivatives") = true,
           "(exp(value·factor), derivative values data·scale·factor or None).");
  m.def("weight_matrix", &weight_matrix, py::arg("coords"), py::arg("ranges"),
        py::arg("intervals"), py::arg("num_average") = 3, py::arg("sigma") = -1.0,
        py::arg("first_fixed") = false,
        "The block's normalised smoother weights as a WeightMatrix (spec §2.6–2.9, §3).");
  m.def("smoother_weights", &smoother_weights, py::arg("coords"), py::arg("ranges"),
        py::arg("intervals"), py::arg("num_average") = 3, py::arg("sigma") = -1.0,
        py::arg("first_fixed") = false,
        "Normalised Gaussian-smoother weights w/Σw as CSR (indptr, indices, data, first_col);\n"
        "with first_fixed, column 0 is moved to the dense first_col and the others shift down.");
  m.def("csr_matvec", &csr_matvec, py::arg("indptr"), py::arg("indices"), py::arg("data"),
        py::arg("parameters"), py::arg("first_col") = py::none(), py::arg("p0") = 0.0,
        "Row-wise weighted sums W·p (+ first_col·p0).");
  m.def("bin_coordinates", &bin_coordinates, py::arg("values"), py::arg("start"),
        py::arg("width"), py::arg("inverse_square") = false,
        "(v - start)/width per element (v = 1/x² with inverse_square), in one pass over a\n"
        "possibly strided float64 column (e.g. xyz[:, 0]).");
  m.def("exp_scales", &exp_scales, py::arg("factor"), py::arg("coef"),
        py::arg("derivatives") = true, "(exp(coef·factor), exp(coef·factor)·factor or None).");
  m.def("smooth_b_scales", &smooth_b_scales, py::arg("indptr"), py::arg("indices"),
        py::arg("data"), py::arg("parameters"), py::arg("factor"),
        py::arg("first_col") = py::none(), py::arg("p0") = 0.0, py::arg("derivatives") = true,
        "Smoothed B-factor scales exp(W·p·factor) and the row-multiplied CSR data.");
  m.def("row_multiply", &row_multiply, py::arg("indptr"), py::arg("data"), py::arg("v"),
        "CSR data with each row multiplied by v[row].");
  m.def("sh_scales", &sh_scales, py::arg("harmonic_values"), py::arg("parameters"),
        "1 + H·C for a row-major (n, n_params) harmonic matrix H.");
  m.def("calc_theta_phi", &calc_theta_phi, py::arg("xyz"));
  m.def("calc_lookup_index", &calc_lookup_index, py::arg("theta_phi"),
        py::arg("points_per_degree"));
  m.def("sph_harm_table", &sph_harm_table, py::arg("s0_theta_phi"), py::arg("s1_theta_phi"),
        py::arg("lmax"), "Exact (n, lmax²+2·lmax) table of averaged real harmonics.");
  m.def("sph_harm_lookup_table", &sph_harm_lookup_table, py::arg("lmax"),
        py::arg("points_per_degree"), "(360·180·ppd², n_params) grid of real harmonics.");
  bind_lookup_factors(m);
  m.def("harmonics_from_lookup", &harmonics_from_lookup, py::arg("s0_selection"),
        py::arg("s1_selection"), py::arg("table"), py::arg("n_params"));
  m.def("lookup_sh_scales", &lookup_sh_scales, py::arg("s0_lookup"), py::arg("s1_lookup"),
        py::arg("table"), py::arg("parameters"),
        "SH scales 1 + C·(T[i0] + T[i1])/2 straight from the lookup table.");
  m.def("smooth_1d_prepare", &smooth_1d_prepare, py::arg("x"), py::arg("x_shift"),
        py::arg("range"), py::arg("n_intervals"), py::arg("num_average"), py::arg("sigma"),
        "Held-window data (window uint16, q float64; 10 B/point) for smooth_1d_apply.");
  m.def("smooth_1d_apply", &smooth_1d_apply, py::arg("x"), py::arg("x_shift"), py::arg("range"),
        py::arg("n_intervals"), py::arg("num_average"), py::arg("sigma"), py::arg("window"),
        py::arg("q"), py::arg("parameters"), py::arg("first_fixed") = false,
        py::arg("factor") = py::none(), py::arg("derivatives") = true,
        py::arg("scales_out") = py::none(), py::arg("indptr_out") = py::none(),
        py::arg("indices_out") = py::none(), py::arg("data_out") = py::none(),
        py::arg("write_pattern") = true,
        "Lean 1-D smooth component with windows and q from smooth_1d_prepare (no exponential per row); "
        "the smoothed-B form takes factor = 1/(2d^2) instead of d. write_pattern=False leaves "
        "indptr_out/indices_out untouched (they hold an earlier call's pattern for the same "
        "windows) and writes only scales and data.");
  m.def("sh_scales_f32", &sh_scales_f32, py::arg("harmonic_values"), py::arg("parameters"),
        "1 + H @ parameters for a float32 (n, n_params) block, accumulated in double.");
  m.def("harmonics_from_lookup_f32", &harmonics_from_lookup_f32, py::arg("s0_lookup"),
        py::arg("s1_lookup"), py::arg("table"), py::arg("n_params"),
        "Float32 (n, n_params) block of lookup-table harmonics (mean of the two rows).");
  m.def("rotate_vectors_about_axis", &rotate_vectors_about_axis, py::arg("rot_axis"),
        py::arg("vectors"), py::arg("angles"));
  m.def("grid_lookup_indices", &grid_lookup_indices, py::arg("xyz"), py::arg("points_per_degree"),
        "Lookup-grid indices of (n, 3) vectors: calc_lookup_index(calc_theta_phi(xyz)) with the\n"
        "polar angle pi (one row past the grid) mapped to the last row.");
  m.def("absorption_frame_vectors", &absorption_frame_vectors, py::arg("rotation_axis"),
        py::arg("fixed_rotation"), py::arg("setting_rotation"), py::arg("sample_to_source"),
        py::arg("align_axis"), py::arg("s1"), py::arg("phi"),
        "(s0c, s1c), each (n, 3): the crystal-frame directions the absorption surface reads\n"
        "(R = S·Rot(axis, phi)·F; s0c = Rᵀ·u0, s1c = Rᵀ·s1/|s1|), aligned so that align_axis\n"
        "points along +z ((0, 0, 1): no alignment).");
  m.def("absorption_lookup_indices", &absorption_lookup_indices, py::arg("rotation_axis"),
        py::arg("fixed_rotation"), py::arg("setting_rotation"), py::arg("sample_to_source"),
        py::arg("align_axis"), py::arg("s1"), py::arg("phi"), py::arg("points_per_degree"),
        py::arg("n_threads") = 1,
        "(s0_lookup, s1_lookup) int64 grid indices of absorption_frame_vectors' directions,\n"
        "in one pass without storing the vectors.");
  m.def("real_harmonics", &real_harmonics, py::arg("lmax"), py::arg("theta"), py::arg("phi"),
        "Real harmonics (l=1..lmax, m=-l..l) at one direction, DIALS conventions.");
  m.def("n_sph_harm_params", &harmonics::n_params, py::arg("lmax"));
}

}  // namespace xtalscale::py_bind
