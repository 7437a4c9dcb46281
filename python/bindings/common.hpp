// Shared helpers for the binding translation units: numpy views and per-area registration.
#pragma once

#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Eigen/Core>

#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale::py_bind {
namespace py = pybind11;

/// A C-contiguous float64 numpy array; other dtypes/layouts are converted once at the boundary.
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

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
