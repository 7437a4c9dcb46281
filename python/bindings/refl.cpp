// Bindings for reflection-file codecs (legacy DIALS pickle column payloads).
#include <cstring>

#include "common.hpp"
#include "xtalscale/base256.hpp"

namespace xtalscale::py_bind {
namespace {

base256::Scalar scalar_kind(const std::string& kind) {
  if (kind == "double") return base256::Scalar::Float64;
  if (kind == "int") return base256::Scalar::Int32;
  if (kind == "size_t") return base256::Scalar::UInt64;
  if (kind == "bool") return base256::Scalar::Bool;
  throw std::invalid_argument("kind must be one of 'double', 'int', 'size_t', 'bool' (got '" +
                              kind + "')");
}

py::dtype dtype_for(base256::Scalar k) {
  switch (k) {
    case base256::Scalar::Float64: return py::dtype::of<double>();
    case base256::Scalar::Int32: return py::dtype::of<std::int32_t>();
    case base256::Scalar::UInt64: return py::dtype::of<std::uint64_t>();
    case base256::Scalar::Bool: return py::dtype::of<bool>();
  }
  throw std::invalid_argument("unknown scalar kind");
}

py::array decode_column(const py::bytes& payload, const std::string& kind, std::size_t ncomp,
                        const std::string& what) {
  const auto k = scalar_kind(kind);
  require(ncomp >= 1 && ncomp <= 9, "ncomp must be between 1 and 9 (got " +
                                        std::to_string(ncomp) + ")");
  char* raw = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(payload.ptr(), &raw, &size) != 0) throw py::error_already_set();
  const auto* data = reinterpret_cast<const std::uint8_t*>(raw);
  const auto n_bytes = static_cast<std::size_t>(size);
  std::size_t pos = 0;
  const std::uint64_t n = base256::decode_count(data, n_bytes, pos, what.c_str());
  // Every value takes at least one byte: reject impossible counts before allocating.
  if (n > (n_bytes - pos) / ncomp)
    throw std::invalid_argument(what + ": element count " + std::to_string(n) +
                                " exceeds the " + std::to_string(n_bytes) +
                                "-byte payload (truncated or corrupt)");
  std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(n)};
  if (ncomp > 1) shape.push_back(static_cast<py::ssize_t>(ncomp));
  py::array out(dtype_for(k), shape);
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    base256::decode_values(data, n_bytes, pos, k, static_cast<std::size_t>(n) * ncomp, dst,
                           what.c_str());
  }
  if (pos != n_bytes)
    throw std::invalid_argument(what + ": " + std::to_string(n_bytes - pos) +
                                " unexpected trailing bytes after " + std::to_string(n) +
                                " elements");
  return out;
}

py::bytes encode_column(const py::object& values, const std::string& kind) {
  const auto k = scalar_kind(kind);
  // ensure() goes through numpy's __array__ protocol, so flex arrays arrive without a copy.
  py::array arr = py::array::ensure(values, py::array::c_style);
  require(static_cast<bool>(arr), "values must be convertible to a C-contiguous array");
  require(arr.dtype().is(dtype_for(k)), "values dtype does not match kind '" + kind + "'");
  require(arr.ndim() == 1 || arr.ndim() == 2, "values must be 1-D or 2-D");
  const std::size_t n = arr.ndim() == 0 ? 0 : static_cast<std::size_t>(arr.shape(0));
  const std::size_t ncomp = arr.ndim() == 2 ? static_cast<std::size_t>(arr.shape(1)) : 1;
  std::string s;
  {
    py::gil_scoped_release release;
    s = base256::encode(k, arr.data(), n, ncomp);
  }
  return py::bytes(s);
}

// Address of the buffer a float64 entry point receives: lets tests prove that flex arrays
// reach C++ without a copy through the project's standard DoubleArray conversion.
std::uintptr_t data_address(const DoubleArray& a) {
  return reinterpret_cast<std::uintptr_t>(a.data());
}

}  // namespace

void bind_refl(py::module_& m) {
  m.def("decode_base256_column", &decode_column, py::arg("payload"), py::arg("kind"),
        py::arg("ncomp") = 1, py::arg("what") = "column",
        "Decode one scitbx single-buffered flex payload (legacy DIALS pickle column).\n\n"
        "Returns an array of shape (n,) or (n, ncomp) with dtype float64, int32, uint64 or\n"
        "bool. Raises ValueError naming `what` on truncated or corrupt input.");
  m.def("encode_base256_column", &encode_column, py::arg("values"), py::arg("kind"),
        "Encode a 1-D or (n, ncomp) array as a scitbx single-buffered flex payload.");
  m.def("data_address", &data_address, py::arg("values"),
        "Address of the float64 buffer a C++ entry point sees (diagnostic for zero-copy tests).");
}

}  // namespace xtalscale::py_bind
