// Bindings for the Gaussian smoothers (filled in by the smoother work).
#include "common.hpp"

namespace xtalscale::py_bind {
void bind_smoothers(py::module_& /*m*/) {}
}  // namespace xtalscale::py_bind
