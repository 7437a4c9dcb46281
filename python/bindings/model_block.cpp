// Bindings for model blocks and their terms (_core.model_block). Arrays handed to a term are
// held, not copied: the term keeps the numpy array alive (HeldArray's owner), so a component's
// read-only buffers are shared. The block's outputs are read-only numpy views of its shared
// buffers (a view keeps its buffer alive across a pattern rebuild).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <Python.h>

#include "common.hpp"
#include "xtalscale/model_block.hpp"

namespace xtalscale::py_bind {
namespace {


/// A numpy array as a HeldArray: the term keeps a reference to the (converted) array.
template <typename T>
HeldArray<T> held(const py::array_t<T, py::array::c_style | py::array::forcecast>& a) {
  auto* ref = new py::object(a);
  std::shared_ptr<const void> owner(ref, [](const void* p) {
    if (!Py_IsInitialized()) return;  // interpreter gone: nothing left to release
    py::gil_scoped_acquire gil;
    delete static_cast<const py::object*>(p);
  });
  return HeldArray<T>{a.data(), static_cast<std::size_t>(a.size()), std::move(owner)};
}

template <typename T>
HeldArray<T> held_optional(const std::optional<py::array_t<T, py::array::c_style | py::array::forcecast>>& a) {
  return a ? held<T>(*a) : HeldArray<T>{};
}

/// A read-only numpy view of a shared buffer, keeping the buffer alive.
template <typename T>
py::array shared_view(const std::shared_ptr<std::vector<T>>& buffer) {
  auto* keep = new std::shared_ptr<std::vector<T>>(buffer);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<std::vector<T>>*>(p); });
  py::array_t<T> a(static_cast<py::ssize_t>(buffer->size()), buffer->data(), owner);
  a.attr("setflags")(py::arg("write") = false);
  return std::move(a);
}

void require_1d(const py::array& a, const char* name) { require_ndim(a, 1, name); }

std::shared_ptr<HarmonicsTerm> harmonics_term(const py::array& harmonics) {
  if (harmonics.ndim() != 2)
    throw std::invalid_argument("harmonics must be a 2-D (n_rows, n_params) array");
  const auto n_params = static_cast<std::size_t>(harmonics.shape(1));
  if (py::isinstance<py::array_t<float>>(harmonics))
    return std::make_shared<HarmonicsTerm>(held<float>(FloatArray::ensure(harmonics)), n_params);
  const DoubleArray h = DoubleArray::ensure(harmonics);
  require(static_cast<bool>(h), "harmonics must be a float32 or float64 array");
  require_finite(h.data(), static_cast<std::size_t>(h.size()), "harmonics");
  return std::make_shared<HarmonicsTerm>(held<double>(h), n_params);
}

/// A grid-index array held by a LookupHarmonicsTerm: int32 as given (held, not converted, so
/// that no wider index is cut to 32 bits unseen), one dimension.
HeldArray<std::int32_t> held_grid_indices(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<std::int32_t>>(a))
    throw py::type_error(std::string(name) + " must be an int32 array");
  require_1d(a, name);
  return held<std::int32_t>(Int32Array::ensure(a));
}

std::shared_ptr<LookupHarmonicsTerm> lookup_harmonics_term(
    std::shared_ptr<harmonics::LookupFactors> factors, const py::array& s0_lookup,
    const py::array& s1_lookup, std::size_t n_params, const std::string& path) {
  using Path = LookupHarmonicsTerm::Path;
  Path chosen = Path::automatic;
  if (path == "rows")
    chosen = Path::rows;
  else if (path == "grid")
    chosen = Path::grid;
  else
    require(path == "auto", "path must be 'auto', 'rows' or 'grid', got '" + path + "'");
  HeldArray<std::int32_t> s0 = held_grid_indices(s0_lookup, "s0_lookup");
  HeldArray<std::int32_t> s1 = held_grid_indices(s1_lookup, "s1_lookup");
  py::gil_scoped_release release;  // the indices are checked row by row
  return std::make_shared<LookupHarmonicsTerm>(std::move(factors), std::move(s0), std::move(s1),
                                               n_params, chosen);
}

/// The term's scales alone (scales_rows over every row), copied: no harmonic row is stored.
DoubleArray lookup_harmonics_scales(const LookupHarmonicsTerm& t, const DoubleArray& p) {
  require_1d(p, "parameters");
  require(static_cast<std::size_t>(p.size()) == t.n_params(),
          "parameters must hold " + std::to_string(t.n_params()) + " values");
  DoubleArray out(static_cast<py::ssize_t>(t.n_rows()));
  double* o = out.mutable_data();
  const double* params = p.data();
  py::gil_scoped_release release;
  TermScratch scratch;
  const double* s = t.scales_rows(params, 0, t.n_rows(), scratch);
  std::copy(s, s + t.n_rows(), o);
  return out;
}

std::shared_ptr<LeanSmoothTerm> lean_smooth_term(const DoubleArray& x, double x_shift,
                                                 std::array<double, 2> x_range,
                                                 std::size_t n_intervals, std::size_t num_average,
                                                 double sigma, const UInt16Array& window,
                                                 const DoubleArray& q, bool first_fixed,
                                                 const std::optional<DoubleArray>& b_factor) {
  require_1d(x, "x");
  require_finite(x.data(), static_cast<std::size_t>(x.size()), "x");
  GaussianSmoother<1> smoother({{x_range}}, {n_intervals});
  smoother.set_smoothing(num_average, sigma);
  return std::make_shared<LeanSmoothTerm>(smoother, held<double>(x), x_shift,
                                          held<std::uint16_t>(window), held<double>(q),
                                          first_fixed, held_optional<double>(b_factor));
}

template <int D>
std::shared_ptr<GridSmoothTerm<D>> grid_smooth_term(const GaussianSmoother<D>& smoother,
                                                    const std::vector<DoubleArray>& coords) {
  require(coords.size() == static_cast<std::size_t>(D),
          "coords must hold one array per smoother axis (" + std::to_string(D) + ")");
  std::array<HeldArray<double>, D> held_coords;
  for (int a = 0; a < D; ++a) {
    require_1d(coords[a], "coords");
    held_coords[a] = held<double>(coords[a]);
  }
  py::gil_scoped_release release;  // the pattern count reads every row
  return std::make_shared<GridSmoothTerm<D>>(smoother, std::move(held_coords));
}

void external_set(ExternalTerm& t, const DoubleArray& scales, const Int64Array& indptr,
                  const Int32Array& indices, const DoubleArray& values) {
  require_1d(scales, "scales");
  require(static_cast<std::size_t>(scales.size()) == t.n_rows(),
          "scales must have one value per row (" + std::to_string(t.n_rows()) + ")");
  require(indptr.ndim() == 1 && static_cast<std::size_t>(indptr.size()) == t.n_rows() + 1,
          "derivatives must have one row per reflection (indptr of n_rows + 1)");
  require(indices.size() == values.size(), "derivatives indices and values differ in length");
  require(indptr.data()[t.n_rows()] == static_cast<std::int64_t>(values.size()),
          "derivatives indptr must end at the number of stored values");
  t.set(scales.data(), indptr.data(), indices.data(), values.data());
}

void external_set_dense(ExternalTerm& t, const DoubleArray& scales, const DoubleArray& dense) {
  require_1d(scales, "scales");
  require(static_cast<std::size_t>(scales.size()) == t.n_rows(),
          "scales must have one value per row (" + std::to_string(t.n_rows()) + ")");
  require(dense.ndim() == 2 && static_cast<std::size_t>(dense.shape(0)) == t.n_rows() &&
              static_cast<std::size_t>(dense.shape(1)) == t.n_cols(),
          "derivatives must have shape (n_rows, n_cols) = (" + std::to_string(t.n_rows()) +
              ", " + std::to_string(t.n_cols()) + ")");
  t.set_dense(scales.data(), dense.data());
}

py::tuple term_pattern(const ModelTerm& t) {
  Int64Array indptr(static_cast<py::ssize_t>(t.n_rows() + 1));
  Int32Array indices(static_cast<py::ssize_t>(t.nnz()));
  t.pattern(indptr.mutable_data(), indices.mutable_data());
  return py::make_tuple(indptr, indices);
}

py::tuple term_evaluate(const ModelTerm& t, const DoubleArray& p) {
  require_1d(p, "parameters");
  require(static_cast<std::size_t>(p.size()) == t.n_params(),
          "parameters must hold " + std::to_string(t.n_params()) + " values");
  TermScratch scratch;
  const TermValues v = t.evaluate(p.data(), scratch);
  DoubleArray scales(static_cast<py::ssize_t>(t.n_rows()));
  std::copy(v.scales, v.scales + t.n_rows(), scales.mutable_data());
  DoubleArray values(static_cast<py::ssize_t>(t.nnz()));
  double* o = values.mutable_data();
  for (std::size_t k = 0; k < t.nnz(); ++k)
    o[k] = v.values_f32 != nullptr ? static_cast<double>(v.values_f32[k]) : v.values[k];
  return py::make_tuple(scales, values);
}

void block_evaluate(ModelBlock& b, const DoubleArray& params, int n_threads) {
  require_1d(params, "params");
  require_threads(n_threads);
  const double* p = params.data();
  const auto n = static_cast<std::size_t>(params.size());
  py::gil_scoped_release release;  // the terms hold converted buffers only
  b.evaluate(p, n, n_threads);
}

void block_evaluate_scales(ModelBlock& b, const DoubleArray& params, int n_threads) {
  require_1d(params, "params");
  require_threads(n_threads);
  const double* p = params.data();
  const auto n = static_cast<std::size_t>(params.size());
  py::gil_scoped_release release;
  b.evaluate_scales(p, n, n_threads);
}

DoubleArray block_transpose_product(ModelBlock& b, const DoubleArray& params,
                                    const DoubleArray& coefficients, int n_threads) {
  require_1d(params, "params");
  require_threads(n_threads);
  require_1d(coefficients, "coefficients");
  if (static_cast<std::size_t>(coefficients.size()) != b.n_rows())
    throw std::invalid_argument("coefficients must have one value per row (" +
                                std::to_string(b.n_rows()) + "), got " +
                                std::to_string(coefficients.size()));
  DoubleArray out(static_cast<py::ssize_t>(b.n_cols()));
  const double* p = params.data();
  const auto n = static_cast<std::size_t>(params.size());
  const double* c = coefficients.data();
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    b.transpose_product(p, n, c, o, n_threads);
  }
  return out;
}

/// A read-only view of @p v (count values) kept valid by the Python scratch object @p owner
/// until that scratch's next evaluate_rows.
template <class T>
py::array scratch_view(const std::vector<T>& v, std::size_t count, const py::object& owner) {
  py::array_t<T> a(static_cast<py::ssize_t>(count), v.data(), owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

void block_evaluate_rows(const ModelBlock& b, const DoubleArray& params, std::size_t first,
                         std::size_t count, RowsScratch& scratch) {
  require_1d(params, "params");
  const double* p = params.data();
  const auto n = static_cast<std::size_t>(params.size());
  py::gil_scoped_release release;
  b.evaluate_rows(p, n, first, count, scratch);
}

py::tuple block_functional_and_gradient(ModelBlock& b, const DoubleArray& params,
                                        const Int64Array& offsets, const DoubleArray& intensities,
                                        const DoubleArray& weights, int n_threads) {
  require_1d(params, "params");
  require_threads(n_threads);
  require_1d(offsets, "group_offsets");
  require_1d(intensities, "intensities");
  require_1d(weights, "weights");
  require(offsets.size() >= 1, "group_offsets must have n_groups + 1 values");
  fit::GroupedObservations t;
  t.n_obs = static_cast<std::size_t>(intensities.size());
  t.n_groups = static_cast<std::size_t>(offsets.size()) - 1;
  t.group_offsets = offsets.data();
  t.intensities = intensities.data();
  t.weights = weights.data();
  require(static_cast<std::size_t>(weights.size()) == t.n_obs,
          "weights must have one value per intensity");
  // the rest of the table's check is the block's, on rows it reads anyway (no pass of its own)
  DoubleArray gradient(static_cast<py::ssize_t>(b.n_cols()));
  const double* p = params.data();
  const auto n = static_cast<std::size_t>(params.size());
  double* out = gradient.mutable_data();
  double f = 0.0;
  {
    py::gil_scoped_release release;
    f = b.functional_and_gradient(p, n, t, out, n_threads);
  }
  return py::make_tuple(f, gradient);
}

/// The blocks and their parameter vectors as the core's lists (the arrays stay owned by the
/// caller's @p params, the blocks by its @p blocks, for the call).
struct BlockLists {
  std::vector<ModelBlock*> blocks;
  std::vector<const double*> params;
  std::vector<std::size_t> n_params;
};

BlockLists block_lists(const std::vector<std::shared_ptr<ModelBlock>>& blocks,
                       const std::vector<DoubleArray>& params) {
  if (params.size() != blocks.size())
    throw std::invalid_argument("params must hold one array per block (" +
                                std::to_string(blocks.size()) + "), got " +
                                std::to_string(params.size()));
  BlockLists out;
  for (std::size_t k = 0; k < blocks.size(); ++k) {
    require_1d(params[k], "params");
    out.blocks.push_back(blocks[k].get());
    out.params.push_back(params[k].data());
    out.n_params.push_back(static_cast<std::size_t>(params[k].size()));
  }
  return out;
}

py::tuple blocks_evaluate_scales(const std::vector<std::shared_ptr<ModelBlock>>& blocks,
                                 const std::vector<DoubleArray>& params, bool stop_at_bad,
                                 int n_threads) {
  require_threads(n_threads);
  const BlockLists l = block_lists(blocks, params);
  std::size_t rows = 0;
  for (const auto* b : l.blocks) rows += b != nullptr ? b->n_rows() : 0;
  DoubleArray g(static_cast<py::ssize_t>(rows));
  double* out = g.mutable_data();
  bool usable = true;
  {
    py::gil_scoped_release release;  // the blocks' terms hold converted buffers only
    usable = evaluate_scales_of_blocks(l.blocks, l.params, l.n_params, out, stop_at_bad, n_threads);
  }
  return py::make_tuple(g, usable);
}

void blocks_evaluate(const std::vector<std::shared_ptr<ModelBlock>>& blocks,
                     const std::vector<DoubleArray>& params, int n_threads) {
  require_threads(n_threads);
  const BlockLists l = block_lists(blocks, params);
  py::gil_scoped_release release;
  evaluate_blocks(l.blocks, l.params, l.n_params, n_threads);
}

DoubleArray blocks_transpose_product(const std::vector<std::shared_ptr<ModelBlock>>& blocks,
                                     const std::vector<DoubleArray>& params,
                                     const DoubleArray& coefficients, int n_threads) {
  require_threads(n_threads);
  require_1d(coefficients, "coefficients");
  const BlockLists l = block_lists(blocks, params);
  std::size_t rows = 0, cols = 0;
  for (const auto* b : l.blocks) {
    rows += b != nullptr ? b->n_rows() : 0;
    cols += b != nullptr ? b->n_cols() : 0;
  }
  if (static_cast<std::size_t>(coefficients.size()) != rows)
    throw std::invalid_argument("coefficients must have one value per row of the blocks (" +
                                std::to_string(rows) + "), got " +
                                std::to_string(coefficients.size()));
  DoubleArray out(static_cast<py::ssize_t>(cols));
  const double* c = coefficients.data();
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    transpose_product_of_blocks(l.blocks, l.params, l.n_params, c, o, n_threads);
  }
  return out;
}

}  // namespace

void bind_model_block(py::module_& m) {
  py::class_<ModelTerm, std::shared_ptr<ModelTerm>>(
      m, "ModelTerm", "One scale component of a model block: scales s_c and ∂s_c/∂p_c.")
      .def_property_readonly("n_rows", &ModelTerm::n_rows)
      .def_property_readonly("n_cols", &ModelTerm::n_cols)
      .def_property_readonly("n_params", &ModelTerm::n_params)
      .def_property_readonly("dense", &ModelTerm::dense)
      .def_property_readonly("nnz", &ModelTerm::nnz)
      .def_property_readonly("pattern_version", &ModelTerm::pattern_version)
      .def_property_readonly("nbytes", &ModelTerm::nbytes)
      .def("pattern", &term_pattern, "(indptr int64, indices int32) of ∂s/∂p.")
      .def("evaluate", &term_evaluate, py::arg("parameters"),
           "(scales, derivative values in pattern order), copied (for tests and debugging).");
  py::class_<ScaleFactorTerm, ModelTerm, std::shared_ptr<ScaleFactorTerm>>(
      m, "ScaleFactorTerm", "s = p0, ds/dp0 = 1.")
      .def(py::init<std::size_t>(), py::arg("n_rows"));
  py::class_<ExpFactorTerm, ModelTerm, std::shared_ptr<ExpFactorTerm>>(
      m, "ExpFactorTerm", "s = exp(p0·factor), ds/dp0 = s·factor (factor held, not copied).")
      .def(py::init([](const DoubleArray& factor) {
             require_1d(factor, "factor");
             return std::make_shared<ExpFactorTerm>(held<double>(factor));
           }),
           py::arg("factor"));
  py::class_<SmoothTerm, ModelTerm, std::shared_ptr<SmoothTerm>>(
      m, "SmoothTerm", "s = W·p, or exp((W·p)·b_factor) with a b_factor, from a WeightMatrix.")
      .def(py::init([](std::shared_ptr<components::WeightMatrix> w,
                       const std::optional<DoubleArray>& b_factor) {
             if (b_factor) require_1d(*b_factor, "b_factor");
             return std::make_shared<SmoothTerm>(std::move(w), held_optional<double>(b_factor));
           }),
           py::arg("weights"), py::arg("b_factor") = py::none());
  py::class_<LeanSmoothTerm, ModelTerm, std::shared_ptr<LeanSmoothTerm>>(
      m, "LeanSmoothTerm",
      "A 1-D smooth component from held window records (smooth_1d_prepare's window, q); x is "
      "read here, not held (only the far rows' coordinates are copied).")
      .def(py::init(&lean_smooth_term), py::arg("x"), py::arg("x_shift"), py::arg("x_range"),
           py::arg("n_intervals"), py::arg("num_average"), py::arg("sigma"), py::arg("window"),
           py::arg("q"), py::arg("first_fixed") = false, py::arg("b_factor") = py::none());
  py::class_<GridSmoothTerm<2>, ModelTerm, std::shared_ptr<GridSmoothTerm<2>>>(
      m, "GridSmoothTerm2D",
      "A 2-D smooth component from its normalised coordinates (weights recomputed per call).")
      .def(py::init(&grid_smooth_term<2>), py::arg("smoother"), py::arg("coords"));
  py::class_<GridSmoothTerm<3>, ModelTerm, std::shared_ptr<GridSmoothTerm<3>>>(
      m, "GridSmoothTerm3D",
      "A 3-D smooth component from its normalised coordinates (weights recomputed per call).")
      .def(py::init(&grid_smooth_term<3>), py::arg("smoother"), py::arg("coords"));
  py::class_<HarmonicsTerm, ModelTerm, std::shared_ptr<HarmonicsTerm>>(
      m, "HarmonicsTerm", "s = 1 + H·c, ds/dc = H for a held (n_rows, n_params) block.")
      .def(py::init(&harmonics_term), py::arg("harmonics"));
  py::class_<LookupHarmonicsTerm, ModelTerm, std::shared_ptr<LookupHarmonicsTerm>>(
      m, "LookupHarmonicsTerm",
      "s = 1 + h·c, ds/dc = h with h = (T[s0] + T[s1]) / 2 of the lookup table T, formed per\n"
      "row from the grid's separable factors (LookupFactors): the int32 grid indices are held\n"
      "(not copied). Rows equal harmonics_from_lookup's bit for bit. path 'grid' (or 'auto'\n"
      "with enough rows) forms the scales and the transposed product through sums over the\n"
      "grid's theta rows (the scales then differ from 'rows' in the last bits).")
      .def(py::init(&lookup_harmonics_term), py::arg("factors"), py::arg("s0_lookup"),
           py::arg("s1_lookup"), py::arg("n_params"), py::arg("path") = "auto")
      .def_property_readonly("by_grid", &LookupHarmonicsTerm::by_grid,
                             "True when the term goes by the grid's theta rows (path 'grid').")
      .def("scales", &lookup_harmonics_scales, py::arg("parameters"),
           "The scales 1 + h·c of every row (the model block's bits), without storing h.")
      .def_property_readonly("factors", [](const LookupHarmonicsTerm& t) {
        return std::const_pointer_cast<harmonics::LookupFactors>(t.factors());
      });
  py::class_<FixedScalesTerm, ModelTerm, std::shared_ptr<FixedScalesTerm>>(
      m, "FixedScalesTerm", "Fixed scales without parameters (held, not copied).")
      .def(py::init([](const DoubleArray& scales) {
             require_1d(scales, "scales");
             return std::make_shared<FixedScalesTerm>(held<double>(scales));
           }),
           py::arg("scales"));
  py::class_<ExternalTerm, ModelTerm, std::shared_ptr<ExternalTerm>>(
      m, "ExternalTerm",
      "A component evaluated in Python: set(scales, indptr, indices, values) or\n"
      "set_dense(scales, derivatives) before each ModelBlock.evaluate (values are copied).")
      .def(py::init<std::size_t, std::size_t>(), py::arg("n_rows"), py::arg("n_cols"))
      .def("set", &external_set, py::arg("scales"), py::arg("indptr"), py::arg("indices"),
           py::arg("values"))
      .def("set_dense", &external_set_dense, py::arg("scales"), py::arg("derivatives"))
      .def_property_readonly("is_set", &ExternalTerm::is_set);
  py::class_<RowsScratch>(
      m, "RowsScratch",
      "Reusable buffers of ModelBlock.evaluate_rows: g and dg/dp (CSR, block columns) of the\n"
      "last row range evaluated into it. g/indptr/indices/values are read-only views that the\n"
      "next evaluate_rows with this scratch overwrites (copy them to keep them).")
      .def(py::init<>())
      .def_property_readonly("g", [](py::object self) {
        const auto& s = self.cast<const RowsScratch&>();
        return scratch_view(s.g, s.g.size(), self);
      })
      .def_property_readonly("indptr", [](py::object self) {
        const auto& s = self.cast<const RowsScratch&>();
        return scratch_view(s.indptr, s.g.size() + (s.indptr.empty() ? 0 : 1), self);
      })
      .def_property_readonly("indices", [](py::object self) {
        const auto& s = self.cast<const RowsScratch&>();
        const auto nnz = s.indptr.empty() ? 0 : static_cast<std::size_t>(s.indptr[s.g.size()]);
        return scratch_view(s.indices, nnz, self);
      })
      .def_property_readonly("values", [](py::object self) {
        const auto& s = self.cast<const RowsScratch&>();
        const auto nnz = s.indptr.empty() ? 0 : static_cast<std::size_t>(s.indptr[s.g.size()]);
        return scratch_view(s.values, nnz, self);
      });
  py::class_<ModelBlock, std::shared_ptr<ModelBlock>>(
      m, "ModelBlock",
      "g = Π s_c and ∂g/∂p (CSR) of one model over one block of observations; the C++ object\n"
      "behind the fit layer's DerivativesView. evaluate(params) runs every term and the product\n"
      "rule without the GIL; scales/indptr/indices/values are read-only views of its buffers\n"
      "(values and scales are rewritten in place by each evaluate).")
      .def(py::init<std::size_t>(), py::arg("n_rows"))
      .def("add_term", &ModelBlock::add_term, py::arg("term"), py::arg("active") = true)
      .def("evaluate", &block_evaluate, py::arg("params"), py::arg("n_threads") = 1,
           "g and dg/dp at params (row chunks over up to n_threads threads when every term\n"
           "evaluates row ranges; the same values for any count).")
      .def_property_readonly("n_rows", &ModelBlock::n_rows)
      .def_property_readonly("n_cols", &ModelBlock::n_cols)
      .def_property_readonly("n_params", &ModelBlock::n_params)
      .def_property_readonly("n_terms", &ModelBlock::n_terms)
      .def_property_readonly("version", &ModelBlock::version)
      .def_property_readonly("evaluated", &ModelBlock::evaluated)
      .def("evaluates_rows", &ModelBlock::evaluates_rows,
           "True when every term evaluates row ranges (chunked g, transposed products and\n"
           "variances without per-row buffers).")
      .def_property_readonly("nbytes", &ModelBlock::nbytes)
      .def("evaluate_scales", &block_evaluate_scales, py::arg("params"), py::arg("n_threads") = 1,
           "g only at params (no derivatives, no pattern): for residuals at a trial point.")
      .def("transpose_product", &block_transpose_product, py::arg("params"), py::arg("coefficients"),
           py::arg("n_threads") = 1,
           "J(params)^T · coefficients (n_cols values) without forming dg/dp: the gradient of a\n"
           "target through g (coefficients = df/dg per row). Writes g as evaluate_scales does.")
      .def("functional_and_gradient", &block_functional_and_gradient, py::arg("params"),
           py::arg("group_offsets"), py::arg("intensities"), py::arg("weights"),
           py::arg("n_threads") = 1,
           "(f, df/dp) of the scaling target f = sum w (I - g Ih)^2 at params, in one pass, for\n"
           "a table (group offsets, I, w) whose rows are this block's rows in order: each chunk\n"
           "of whole groups is evaluated once for g, Ih, df/dg and the transposed product. The\n"
           "same as evaluate_scales, fit.functional_and_scale_gradient and transpose_product,\n"
           "to rounding; identical for any n_threads. Writes g as evaluate_scales does.")
      .def("evaluate_rows", &block_evaluate_rows, py::arg("params"), py::arg("first"),
           py::arg("count"), py::arg("scratch"),
           "g and dg/dp of rows [first, first + count) into scratch (a RowsScratch, reused from\n"
           "call to call), without touching the block's own buffers: evaluate()'s values of\n"
           "these rows, bit for bit (the chunk the fused normal equations and the row\n"
           "variances evaluate).")
      .def("release_values", &ModelBlock::release_values, py::arg("pattern") = false,
           "Free the derivative values and the terms' scratch, keeping g (and the pattern unless\n"
           "pattern=True); the next evaluate allocates (and builds) them again: for blocks\n"
           "evaluated and consumed one after another.")
      .def_property("column_offset", &ModelBlock::column_offset, &ModelBlock::set_column_offset)
      .def("term", &ModelBlock::term_ptr, py::arg("index"))
      .def("active", &ModelBlock::active, py::arg("index"))
      .def("column_start", &ModelBlock::column_start, py::arg("index"))
      .def("parameter_start", &ModelBlock::parameter_start, py::arg("index"))
      .def_property_readonly("scales",
                             [](const ModelBlock& b) { return shared_view(b.buffers().scales); })
      .def_property_readonly("indptr",
                             [](const ModelBlock& b) { return shared_view(b.buffers().indptr); })
      .def_property_readonly("indices",
                             [](const ModelBlock& b) { return shared_view(b.buffers().indices); })
      .def_property_readonly("values",
                             [](const ModelBlock& b) { return shared_view(b.buffers().values); });
  m.def("evaluate_scales_of_blocks", &blocks_evaluate_scales, py::arg("blocks"), py::arg("params"),
        py::arg("stop_at_bad") = false, py::arg("n_threads") = 1,
        "(g, usable): g of several distinct blocks (block k at params[k]) concatenated in block\n"
        "order, in one call without the GIL; the blocks over up to n_threads threads, each on\n"
        "one thread (the same values for any count, and as each block's evaluate_scales).\n"
        "usable: every g finite and > 0. stop_at_bad: blocks not started once a g is found\n"
        "unusable are skipped (their rows of g unwritten; discard the point).");
  m.def("evaluate_blocks", &blocks_evaluate, py::arg("blocks"), py::arg("params"),
        py::arg("n_threads") = 1,
        "evaluate() of several distinct blocks (block k at params[k]: g and dg/dp in its own\n"
        "buffers) in one call without the GIL; blocks over up to n_threads threads, each on one\n"
        "thread (the same values for any count).");
  m.def("transpose_product_of_blocks", &blocks_transpose_product, py::arg("blocks"),
        py::arg("params"), py::arg("coefficients"), py::arg("n_threads") = 1,
        "J^T c of several distinct blocks in one call: block k's transpose_product at params[k]\n"
        "with the coefficients of its rows (the blocks' rows one after another), its n_cols\n"
        "values after the previous blocks'. Threads as evaluate_scales_of_blocks; writes each\n"
        "block's g as transpose_product does.");
}

}  // namespace xtalscale::py_bind
