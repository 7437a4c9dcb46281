// Bindings for the Gaussian smoothers: xtalscale._core.smoothers.Smoother1D/2D/3D.
//
// These are the raw kernels; xtalscale.smoothing wraps them in the DIALS-shaped classes.
// Outputs are allocated in C++ and handed to numpy without copying (capsule-owned vectors).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.hpp"
#include "xtalscale/smoother.hpp"
#include "internal/large_buffers.hpp"

namespace xtalscale::py_bind {
namespace {

/// An uninitialised heap buffer: the kernels write every element they expose, so zero-filling
/// (as std::vector does) would only add a pass over memory. Large buffers are 2 MiB aligned and,
/// on Linux, advised as transparent huge pages: first-touch page faults on fresh output memory
/// otherwise cost more than the smoother kernel itself (measured on a 2-core VM: 4 kB faults
/// tripled the time of a 3D evaluation).
struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

template <typename T>
Buffer<T> buffer(std::size_t n) {
  const std::size_t bytes = std::max<std::size_t>(n, 1) * sizeof(T);
  constexpr std::size_t huge = std::size_t(2) << 20;
  void* p = nullptr;
  if (bytes >= 2 * huge) {
    if (posix_memalign(&p, huge, (bytes + huge - 1) / huge * huge) != 0) p = nullptr;
    xtalscale::detail::advise_huge_pages(p, (bytes + huge - 1) / huge * huge);  // advice only
  } else {
    p = std::malloc(bytes);
  }
  if (!p) throw std::bad_alloc();
  return Buffer<T>(static_cast<T*>(p));
}

/// Hand a buffer to numpy without copying: the capsule owns it. Only the first @p n elements
/// are exposed (the bulk kernels over-allocate by at most the edge rows' missing entries).
template <typename T>
py::array_t<T> to_numpy(Buffer<T>&& buf, std::size_t n) {
  T* raw = buf.release();
  py::capsule owner(raw, [](void* q) { std::free(q); });
  return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, raw,
                        owner);
}

/// Same for a (small) vector.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())},
                        {static_cast<py::ssize_t>(sizeof(T))}, owned->data(), owner);
}

const char* const kAxis[3] = {"x", "y", "z"};

/// Validate D coordinate arrays (1-D, equal lengths) and return their data pointers.
template <int D>
std::array<const double*, D> coord_pointers(const std::array<DoubleArray, D>& coords,
                                            std::size_t& n) {
  std::array<const double*, D> ptrs{};
  for (int a = 0; a < D; ++a) {
    const auto& c = coords[static_cast<std::size_t>(a)];
    require_ndim(c, 1, kAxis[a]);
    const auto len = static_cast<std::size_t>(c.size());
    if (a == 0) n = len;
    else require_same_length(n, len, kAxis[0], kAxis[a]);
    ptrs[static_cast<std::size_t>(a)] = c.data();
  }
  return ptrs;
}

/// Check a 1-D parameter vector (length and finiteness are checked by the C++ core).
inline const DoubleArray& params_1d(const DoubleArray& a, const char* name) {
  require_ndim(a, 1, name);
  return a;
}

template <int D, typename Index>
py::tuple multi_impl(const GaussianSmoother<D>& s, std::size_t n,
                     const std::array<const double*, D>& ptrs, const DoubleArray& values,
                     bool normalised, bool first_fixed, bool want_matrix) {
  const std::size_t cap = want_matrix ? n * s.max_row_nnz() : 0;
  auto value = buffer<double>(n);
  auto sumweight = buffer<double>(n);
  auto data = buffer<double>(cap);
  auto indices = buffer<Index>(cap);
  auto indptr = buffer<Index>(want_matrix ? n + 1 : 0);
  std::size_t nnz = 0;
  {
    // Safe: only C++ buffers and numpy data pointers kept alive by the caller are touched.
    py::gil_scoped_release release;
    nnz = s.template multi_value_weight<Index>(
        n, ptrs, values.data(), static_cast<std::size_t>(values.size()), value.get(),
        sumweight.get(), want_matrix ? indptr.get() : nullptr,
        want_matrix ? indices.get() : nullptr, want_matrix ? data.get() : nullptr,
        normalised ? WeightMode::normalised : WeightMode::raw, first_fixed);
  }
  auto v = to_numpy(std::move(value), n);
  auto sw = to_numpy(std::move(sumweight), n);
  if (!want_matrix) return py::make_tuple(v, sw, py::none(), py::none(), py::none());
  return py::make_tuple(v, sw, to_numpy(std::move(data), nnz), to_numpy(std::move(indices), nnz),
                        to_numpy(std::move(indptr), n + 1));
}

/// A writable, C-contiguous output array of exactly dtype T and at least @p min_len elements.
/// No conversion: a converted copy would be written and then lost.
template <typename T>
T* out_ptr(py::array& a, std::size_t min_len, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a) || a.ndim() != 1 ||
      !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(name) + " must be a writable, contiguous 1-D " +
                                py::str(py::dtype::of<T>()).cast<std::string>() + " array");
  if (static_cast<std::size_t>(a.size()) < min_len)
    throw std::invalid_argument(std::string(name) + " must have at least " +
                                std::to_string(min_len) + " elements (got " +
                                std::to_string(a.size()) + ")");
  return static_cast<T*>(a.mutable_data());
}

template <int D, typename Index>
std::size_t into_impl(const GaussianSmoother<D>& s, std::size_t n,
                      const std::array<const double*, D>& ptrs, const DoubleArray& values,
                      double* value, double* sumweight, py::array& indptr, py::array& indices,
                      double* data, bool normalised, bool first_fixed) {
  Index* ip = out_ptr<Index>(indptr, n + 1, "indptr");
  Index* ix = out_ptr<Index>(indices, n * s.max_row_nnz(), "indices");
  if (n * s.max_row_nnz() > static_cast<std::size_t>(std::numeric_limits<Index>::max()))
    throw std::invalid_argument("indptr/indices dtype is too small for this many non-zeros");
  py::gil_scoped_release release;  // pure C++ on buffers the caller keeps alive
  return s.template multi_value_weight<Index>(
      n, ptrs, values.data(), static_cast<std::size_t>(values.size()), value, sumweight, ip, ix,
      data, normalised ? WeightMode::normalised : WeightMode::raw, first_fixed);
}

template <int D>
void bind_smoother(py::module_& m, const char* name, const char* doc) {
  using S = GaussianSmoother<D>;
  py::class_<S>(m, name, doc)
      .def(py::init([](const std::array<std::array<double, 2>, D>& ranges,
                       const std::array<std::int64_t, D>& num_intervals) {
             std::array<std::size_t, D> n{};
             for (int a = 0; a < D; ++a) {
               const auto k = num_intervals[static_cast<std::size_t>(a)];
               if (k <= 0)
                 throw std::invalid_argument(std::string("num_intervals for ") + kAxis[a] +
                                             "_range must be > 0 (got " + std::to_string(k) + ")");
               n[static_cast<std::size_t>(a)] = static_cast<std::size_t>(k);
             }
             return S(ranges, n);
           }),
           py::arg("ranges"), py::arg("num_intervals"),
           "Per-axis (x0, x1) ranges and numbers of intervals.")
      .def(
          "set_smoothing",
          [](S& s, std::int64_t num_average, double sigma) {
            if (num_average < 1)
              throw std::invalid_argument("num_average must be between 1 and 5 (got " +
                                          std::to_string(num_average) + ")");
            s.set_smoothing(static_cast<std::size_t>(num_average), sigma);
          },
          py::arg("num_average"), py::arg("sigma"))
      .def_property(
          "coordinate_shift", [](const S& s) { return s.coordinate_shift(); },
          [](S& s, const std::array<double, D>& shift) { s.set_coordinate_shift(shift); },
          "Per-axis shift: bulk methods read coordinate x as x - shift (default zeros).")
      .def_property_readonly("num_values", &S::num_values)
      .def_property_readonly("sigma", &S::sigma)
      .def_property_readonly("max_row_nnz", &S::max_row_nnz)
      .def("axis_num_values", [](const S& s, int a) { return s.axis(a).num_values(); })
      .def("axis_num_samples", [](const S& s, int a) { return s.axis(a).num_samples(); })
      .def("axis_num_average", [](const S& s, int a) { return s.axis(a).num_average(); })
      .def("axis_spacing", [](const S& s, int a) { return s.axis(a).spacing(); })
      .def("axis_positions",
           [](const S& s, int a) {
             const auto& p = s.axis(a).positions();
             return py::array_t<double>(static_cast<py::ssize_t>(p.size()), p.data());
           })
      .def(
          "value_weight",
          [](const S& s, const std::array<double, D>& coord, const DoubleArray& values,
             bool first_fixed) {
            const auto& v = params_1d(values, "values");
            SinglePoint r = s.value_weight(coord, v.data(), static_cast<std::size_t>(v.size()),
                                           first_fixed);
            return py::make_tuple(r.value, to_numpy(std::move(r.index)),
                                  to_numpy(std::move(r.weight)), r.sumweight);
          },
          py::arg("coord"), py::arg("values"), py::arg("first_fixed") = false,
          "Single point: (value, column indices, raw weights, sumweight).")
      .def(
          "multi_value_weight",
          [](const S& s, const std::array<DoubleArray, D>& coords, const DoubleArray& values,
             bool normalised, bool first_fixed, bool want_matrix) {
            std::size_t n = 0;
            const auto ptrs = coord_pointers<D>(coords, n);
            const auto& v = params_1d(values, "values");
            // 32-bit indices while they fit (what scipy picks itself, so it does not copy).
            const std::size_t bound = n * s.max_row_nnz();
            if (bound < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) &&
                s.num_values() < static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
              return multi_impl<D, std::int32_t>(s, n, ptrs, v, normalised, first_fixed,
                                                 want_matrix);
            return multi_impl<D, std::int64_t>(s, n, ptrs, v, normalised, first_fixed,
                                               want_matrix);
          },
          py::arg("coords"), py::arg("values"), py::arg("normalised") = false,
          py::arg("first_fixed") = false, py::arg("want_matrix") = true,
          "Bulk: (value, sumweight, data, indices, indptr) with a row-major CSR weight matrix.")
      .def(
          "values",
          [](const S& s, const std::array<DoubleArray, D>& coords, const DoubleArray& values) {
            std::size_t n = 0;
            const auto ptrs = coord_pointers<D>(coords, n);
            const auto& v = params_1d(values, "values");
            auto value = buffer<double>(n);
            {
              py::gil_scoped_release release;  // pure C++ on buffers owned above
              s.template multi_value_weight<std::int32_t>(
                  n, ptrs, v.data(), static_cast<std::size_t>(v.size()), value.get(), nullptr,
                  nullptr, nullptr, nullptr);
            }
            return to_numpy(std::move(value), n);
          },
          py::arg("coords"), py::arg("values"),
          "Bulk values Σwp/Σw only (no weights kept): the value column of multi_value_weight.")
      .def(
          "multi_value_weight_into",
          [](const S& s, const std::array<DoubleArray, D>& coords, const DoubleArray& values,
             py::array value, py::array sumweight, py::array indptr, py::array indices,
             py::array data, bool normalised, bool first_fixed) {
            std::size_t n = 0;
            const auto ptrs = coord_pointers<D>(coords, n);
            const auto& v = params_1d(values, "values");
            double* vo = out_ptr<double>(value, n, "value");
            double* so = out_ptr<double>(sumweight, n, "sumweight");
            double* d = out_ptr<double>(data, n * s.max_row_nnz(), "data");
            if (py::isinstance<py::array_t<std::int32_t>>(indptr))
              return into_impl<D, std::int32_t>(s, n, ptrs, v, vo, so, indptr, indices, d,
                                                normalised, first_fixed);
            return into_impl<D, std::int64_t>(s, n, ptrs, v, vo, so, indptr, indices, d,
                                              normalised, first_fixed);
          },
          py::arg("coords"), py::arg("values"), py::arg("value"), py::arg("sumweight"),
          py::arg("indptr"), py::arg("indices"), py::arg("data"), py::arg("normalised") = false,
          py::arg("first_fixed") = false,
          "Bulk evaluation into preallocated arrays (indices/data of at least n*max_row_nnz);\n"
          "returns nnz. For repeated evaluation without allocation (refinement loops, benchmarks).")
      .def(
          "value_error",
          [](const S& s, const std::array<DoubleArray, D>& coords, const DoubleArray& values,
             const std::optional<DoubleArray>& esds) {
            std::size_t n = 0;
            const auto ptrs = coord_pointers<D>(coords, n);
            const auto& v = params_1d(values, "values");
            const double* e = nullptr;
            if (esds) {
              params_1d(*esds, "esds");
              if (esds->size() != v.size())
                throw std::invalid_argument("esds must have length " + std::to_string(v.size()) +
                                            " (the number of smoother values), got " +
                                            std::to_string(esds->size()));
              e = esds->data();
            }
            auto value = buffer<double>(n);
            auto error = buffer<double>(n);
            {
              py::gil_scoped_release release;  // pure C++ on buffers owned above
              s.value_error(n, ptrs, v.data(), e, static_cast<std::size_t>(v.size()),
                            value.get(), error.get());
            }
            return py::make_tuple(to_numpy(std::move(value), n), to_numpy(std::move(error), n));
          },
          py::arg("coords"), py::arg("values"), py::arg("esds") = py::none(),
          "Values and errors sigma_v = sqrt(sum (w_i/sum w)^2 sigma_i^2).");
}

}  // namespace

void bind_smoothers(py::module_& m) {
  bind_smoother<1>(m, "Smoother1D", "DIALS 1D Gaussian smoother kernel (incl. first-fixed).");
  bind_smoother<2>(m, "Smoother2D", "DIALS 2D Gaussian smoother kernel.");
  bind_smoother<3>(m, "Smoother3D", "DIALS 3D Gaussian smoother kernel.");
  m.def("nparam_to_val", &nparam_to_val, py::arg("n_params"),
        "DIALS SmoothMixin.nparam_to_val: n-1 for n in {2,3}, n-2 for n >= 4.");
}

}  // namespace xtalscale::py_bind
