// Bindings for the scale-component kernels (filled in by the component work).
#include "common.hpp"

namespace xtalscale::py_bind {
void bind_components(py::module_& /*m*/) {}
}  // namespace xtalscale::py_bind
