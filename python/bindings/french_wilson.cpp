// Bindings for the French–Wilson kernel: xtalscale._core.merge.
#include <cmath>
#include <cstdint>
#include <string>

#include "common.hpp"
#include "xtalscale/french_wilson.hpp"

namespace xtalscale::py_bind {
namespace {


py::tuple french_wilson_py(const DoubleArray& intensity, const DoubleArray& sigma,
                           const DoubleArray& expected, const ByteArray& centric,
                           double h_min, int n_threads) {
  // Non-finite values are allowed: those rows come back invalid (NaN), never dropped.
  vector_view(intensity, "intensity", false);
  vector_view(sigma, "sigma", false);
  vector_view(expected, "expected", false);
  if (centric.ndim() != 1) throw std::invalid_argument("centric must be 1-dimensional");
  const auto n = static_cast<std::size_t>(intensity.size());
  require_same_length(n, static_cast<std::size_t>(sigma.size()), "intensity", "sigma");
  require_same_length(n, static_cast<std::size_t>(expected.size()), "intensity", "expected");
  require_same_length(n, static_cast<std::size_t>(centric.size()), "intensity", "centric");
  require(std::isfinite(h_min), "h_min must be finite");
  require(n_threads >= 1, "n_threads must be at least 1");
  const auto shape = static_cast<py::ssize_t>(n);
  DoubleArray j(shape), sig_j(shape), f(shape), sig_f(shape);
  py::array_t<bool> valid(shape);
  static_assert(sizeof(bool) == sizeof(std::uint8_t), "bool must be one byte");
  {
    // Safe: only raw buffers owned by the arrays above are touched; no Python objects.
    py::gil_scoped_release release;
    french_wilson(intensity.data(), sigma.data(), expected.data(), centric.data(), n, h_min,
                  j.mutable_data(), sig_j.mutable_data(), f.mutable_data(),
                  sig_f.mutable_data(), reinterpret_cast<std::uint8_t*>(valid.mutable_data()),
                  n_threads);
  }
  return py::make_tuple(j, sig_j, f, sig_f, valid);
}

}  // namespace

void bind_merge(py::module_& m) {
  m.def("french_wilson", &french_wilson_py, py::arg("intensity"), py::arg("sigma"),
        py::arg("expected"), py::arg("centric"), py::arg("h_min") = -4.0,
        py::arg("n_threads") = 1,
        "French–Wilson posterior (J, σJ, F, σF, valid) per reflection, over n_threads threads "
        "(the same results for any count); see xtalscale.merge.french_wilson.");
  m.def(
      "french_wilson_moments",
      [](double h, bool centric) {
        require(std::isfinite(h), "h must be finite");
        const auto r = french_wilson_moments(h, centric);
        return py::make_tuple(r.j, r.sig_j, r.f, r.sig_f);
      },
      py::arg("h"), py::arg("centric"),
      "Posterior (E[J]/σ, sd(J)/σ, E[F]/√σ, sd(F)/√σ) for the standardised intensity h.");
}

}  // namespace xtalscale::py_bind
