// The one boundary header of the binding translation units: numpy array types and checks,
// read-only views of C++ buffers, and the per-area registration functions.
#pragma once

#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale::py_bind {
namespace py = pybind11;

/// C-contiguous numpy arrays of one dtype; other dtypes/layouts are converted once at the boundary.
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Int32Array = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using UInt16Array = py::array_t<std::uint16_t, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>;
using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;

/// Number of elements of an array.
inline std::size_t size_of(const py::array& a) { return static_cast<std::size_t>(a.size()); }

/// Throws std::invalid_argument naming @p name unless @p a has @p ndim dimensions.
inline void require_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) +
                                "-dimensional (got ndim=" + std::to_string(a.ndim()) + ")");
}

/// A thread-count argument: at least one.
inline void require_threads(int n_threads) {
  if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
}

/// A read-only numpy view of a container owned by @p owner (kept alive as the array's base).
template <typename Container>
py::array readonly_view(const Container& v, const py::object& owner) {
  using T = typename Container::value_type;
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()), v.data(), owner);
  a.attr("setflags")(py::arg("write") = false);
  return std::move(a);
}

/// A read-only Eigen view of a 1-D float64 array; checks ndim and (optionally) finiteness.
inline Eigen::Map<const Eigen::VectorXd> vector_view(const DoubleArray& a, const char* name,
                                                     bool check_finite = true) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-dimensional (got ndim=" +
                                std::to_string(a.ndim()) + ")");
  if (check_finite) require_finite(a.data(), static_cast<std::size_t>(a.size()), name);
  return {a.data(), static_cast<Eigen::Index>(a.size())};
}

// One registration function per area; each lives in its own bindings/<area>.cpp.
void bind_smoothers(py::module_& m);
void bind_components(py::module_& m);
void bind_refl(py::module_& m);
void bind_grouping(py::module_& m);
void bind_fit(py::module_& m);
void bind_job(py::module_& m);
void bind_model_block(py::module_& m);
void bind_merge(py::module_& m);
void bind_stats(py::module_& m);

}  // namespace xtalscale::py_bind
