// The xtalscale._core extension module: registers each area's bindings.
#include "common.hpp"
#include "xtalscale/core.hpp"
#include "internal/kernel_support.hpp"
#include "internal/large_buffers.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "xtalscale compiled core (Eigen/C++17). Use the xtalscale package, not this module.";
  m.attr("__version__") = xtalscale::version();
  m.def("huge_pages", &xtalscale::detail::huge_pages_enabled,
        "Whether large per-reflection buffers ask for transparent huge pages (default off; "
        "the environment variable XTALSCALE_HUGE_PAGES=1 turns it on at import).");
  m.def("set_huge_pages", &xtalscale::detail::set_huge_pages, pybind11::arg("enabled"),
        "Turn the huge-page advice for large buffers on or off (buffers allocated from now on). "
        "It pays where freed buffers are re-allocated in a loop; on a virtual machine whose "
        "huge pages are fresh host memory, first touch is ~5x slower, hence off by default.");
  m.def("simd_level", &xtalscale::detail::simd_level,
        "The hand-vectorised kernels in use: 2 AVX-512, 1 AVX2+FMA, 0 plain loops (the normal "
        "matrix, the scale variances, the float32 harmonics). Every level gives the same bits.");
  m.def("set_simd_level", &xtalscale::detail::set_simd_level, pybind11::arg("level"),
        "Use at most this level from now on (clamped to what the CPU runs); returns the level in "
        "use. For testing the narrower kernels on a wide CPU.");
  auto smoothers = m.def_submodule("smoothers", "Gaussian smoothers (DIALS/Aimless SmoothedValue)");
  xtalscale::py_bind::bind_smoothers(smoothers);
  auto components = m.def_submodule("components", "Scale-component kernels");
  xtalscale::py_bind::bind_components(components);
  auto refl = m.def_submodule("refl", "Reflection-file codecs (legacy DIALS pickle payloads)");
  xtalscale::py_bind::bind_refl(refl);
  auto grouping = m.def_submodule("grouping", "Reciprocal ASU mapping kernel");
  xtalscale::py_bind::bind_grouping(grouping);
  auto fit = m.def_submodule("fit", "Fit kernels: Ih table, target, normal equations");
  xtalscale::py_bind::bind_fit(fit);
  auto job = m.def_submodule("job", "Per-group kernels of the scaling job (outliers, sums)");
  xtalscale::py_bind::bind_job(job);
  auto model_block = m.def_submodule(
      "model_block", "Model blocks: g and dg/dp of a model's components (the fit contract)");
  xtalscale::py_bind::bind_model_block(model_block);
  auto merge = m.def_submodule("merge", "Merging kernels (French–Wilson truncation)");
  xtalscale::py_bind::bind_merge(merge);
  auto stats = m.def_submodule("stats", "Merging-statistics kernels");
  xtalscale::py_bind::bind_stats(stats);
}
