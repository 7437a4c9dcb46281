// Bindings for the scaling job's per-group kernels: xtalscale._core.job.
//
// Every function takes the grouping as (order, offsets) int64 arrays (xtalscale.symmetry's
// Grouping) plus per-row float64 arrays, validates them, and runs with the GIL released.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "xtalscale/group_kernels.hpp"
#include "xtalscale/prepare.hpp"

namespace xtalscale::py_bind {
namespace {


GroupLayout layout_of(const Int64Array& order, const Int64Array& offsets, std::size_t n_rows) {
  if (order.ndim() != 1) throw std::invalid_argument("order must be 1-dimensional");
  if (offsets.ndim() != 1 || offsets.size() < 1)
    throw std::invalid_argument("offsets must be 1-dimensional with at least one entry");
  GroupLayout layout;
  layout.order = order.data();
  layout.offsets = offsets.data();
  layout.n_groups = static_cast<std::size_t>(offsets.size() - 1);
  layout.n_rows = n_rows;
  if (offsets.data()[layout.n_groups] != order.size())
    throw std::invalid_argument("the last offset (" + std::to_string(offsets.data()[layout.n_groups]) +
                                ") must equal the length of order (" + std::to_string(order.size()) + ")");
  check_layout(layout);
  return layout;
}

const double* row_array(const DoubleArray& a, std::size_t n_rows, const char* name, bool finite = true) {
  vector_view(a, name, finite);
  if (static_cast<std::size_t>(a.size()) != n_rows)
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(n_rows) +
                                " entries (got " + std::to_string(a.size()) + ")");
  return a.data();
}

DoubleArray new_doubles(std::size_t n) { return DoubleArray({static_cast<py::ssize_t>(n)}); }

/// The (grouping, intensity, weight, scale) arguments of the intensity kernels, checked.
struct IntensityRows {
  GroupLayout layout;
  std::size_t n;
  const double* I;
  const double* w;
  const double* g;
};

IntensityRows intensity_rows(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                             const DoubleArray& weight, const DoubleArray& scale) {
  const auto n = static_cast<std::size_t>(intensity.size());
  return {layout_of(order, offsets, n), n, row_array(intensity, n, "intensity"),
          row_array(weight, n, "weight"), row_array(scale, n, "scale")};
}

Int64Array to_array(const std::vector<std::int64_t>& v) {
  Int64Array out({static_cast<py::ssize_t>(v.size())});
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

Int64Array group_of_rows_py(const Int64Array& order, const Int64Array& offsets) {
  const auto n = static_cast<std::size_t>(order.size());
  const auto layout = layout_of(order, offsets, n);
  Int64Array out({static_cast<py::ssize_t>(n)});
  std::int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    group_of_rows(layout, o);
  }
  return out;
}

DoubleArray sum_in_groups_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& values) {
  const auto n = static_cast<std::size_t>(values.size());
  const auto layout = layout_of(order, offsets, n);
  const double* v = row_array(values, n, "values");
  auto out = new_doubles(layout.n_groups);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    sum_in_groups(layout, v, o);
  }
  return out;
}

py::tuple weighted_group_sums_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                                 const DoubleArray& weight, const DoubleArray& scale) {
  const IntensityRows in = intensity_rows(order, offsets, intensity, weight, scale);
  auto a = new_doubles(in.layout.n_groups), b = new_doubles(in.layout.n_groups);
  double* pa = a.mutable_data();
  double* pb = b.mutable_data();
  {
    py::gil_scoped_release release;
    weighted_group_sums(in.layout, in.I, in.w, in.g, pa, pb);
  }
  return py::make_tuple(a, b);
}

template <void (*Kernel)(const GroupLayout&, const double*, const double*, const double*, double*)>
DoubleArray normdev_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                       const DoubleArray& weight, const DoubleArray& scale) {
  const IntensityRows in = intensity_rows(order, offsets, intensity, weight, scale);
  auto z = new_doubles(in.n);
  double* pz = z.mutable_data();
  std::fill(pz, pz + in.n, 0.0);  // rows outside the grouping keep z = 0
  {
    py::gil_scoped_release release;
    Kernel(in.layout, in.I, in.w, in.g, pz);
  }
  return z;
}

py::tuple pick_group_outliers_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& abs_z,
                                 double zmax) {
  const auto n = static_cast<std::size_t>(abs_z.size());
  const auto layout = layout_of(order, offsets, n);
  const double* z = row_array(abs_z, n, "abs_z", false);
  std::vector<std::int64_t> outliers, potential;
  {
    py::gil_scoped_release release;
    pick_group_outliers(layout, z, zmax, outliers, potential);
  }
  return py::make_tuple(to_array(outliers), to_array(potential));
}

DoubleArray limit_outlier_weights_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& weight) {
  const auto n = static_cast<std::size_t>(weight.size());
  const auto layout = layout_of(order, offsets, n);
  const double* w = row_array(weight, n, "weight");
  auto out = new_doubles(n);
  double* o = out.mutable_data();
  std::copy(w, w + n, o);
  {
    py::gil_scoped_release release;
    limit_outlier_weights(layout, w, o);
  }
  return out;
}

py::tuple select_rows_in_groups_py(const Int64Array& order, const Int64Array& offsets, const BoolArray& keep) {
  if (keep.ndim() != 1) throw std::invalid_argument("keep must be 1-dimensional");
  const auto n = static_cast<std::size_t>(keep.size());
  const auto layout = layout_of(order, offsets, n);
  const auto* k = reinterpret_cast<const std::uint8_t*>(keep.data());
  std::vector<std::int64_t> new_order, kept, new_offsets;
  {
    py::gil_scoped_release release;
    new_offsets = select_rows_in_groups(layout, k, new_order, kept);
  }
  return py::make_tuple(to_array(new_order), to_array(new_offsets), to_array(kept));
}

Int64Array standard_outlier_rows_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                                    const DoubleArray& weight, const DoubleArray& scale, double zmax, int n_threads) {
  const IntensityRows in = intensity_rows(order, offsets, intensity, weight, scale);
  if (!std::isfinite(zmax) || zmax <= 0) throw std::invalid_argument("zmax must be positive and finite");
  require_threads(n_threads);
  std::vector<std::int64_t> outliers;
  {
    py::gil_scoped_release release;
    outliers = standard_outlier_rows(in.layout, in.I, in.w, in.g, zmax, n_threads);
  }
  return to_array(outliers);
}

const std::uint8_t* row_mask(const BoolArray& mask, std::size_t n_rows, const char* name) {
  if (mask.ndim() != 1 || static_cast<std::size_t>(mask.size()) != n_rows)
    throw std::invalid_argument(std::string(name) + " must be a 1-dimensional bool array of " +
                                std::to_string(n_rows) + " entries");
  return reinterpret_cast<const std::uint8_t*>(mask.data());
}

py::tuple subset_grouping_py(const Int64Array& order, const Int64Array& offsets, const BoolArray& keep,
                             int n_threads) {
  const auto n = static_cast<std::size_t>(keep.size());
  const auto* k = row_mask(keep, n, "keep");
  const auto layout = layout_of(order, offsets, n);
  require_threads(n_threads);
  std::vector<std::int64_t> new_order, new_offsets;
  {
    py::gil_scoped_release release;
    new_offsets = subset_grouping(layout, k, new_order, n_threads);
  }
  return py::make_tuple(to_array(new_order), to_array(new_offsets));
}

py::array gather_values_py(const DoubleArray& values, const Int64Array& rows, const py::object& out, int n_threads) {
  if (values.ndim() != 1) throw std::invalid_argument("values must be 1-dimensional");
  if (rows.ndim() != 1) throw std::invalid_argument("rows must be 1-dimensional");
  require_threads(n_threads);
  const auto n = static_cast<std::size_t>(rows.size());
  py::array result;
  if (out.is_none()) {
    result = new_doubles(n);
  } else {
    // written in place: the caller's own float64 array, never a converted copy
    if (!py::isinstance<py::array>(out)) throw std::invalid_argument("out must be a numpy array");
    result = py::reinterpret_borrow<py::array>(out);
    if (!result.dtype().is(py::dtype::of<double>()) || result.ndim() != 1 ||
        static_cast<std::size_t>(result.size()) != n || !(result.flags() & py::array::c_style) ||
        !result.writeable())
      throw std::invalid_argument("out must be a writeable contiguous float64 array of " + std::to_string(n) +
                                  " entries");
  }
  const double* v = values.data();
  const std::int64_t* r = rows.data();
  auto* o = static_cast<double*>(result.mutable_data());
  std::int64_t bad = -1;
  {
    py::gil_scoped_release release;
    bad = gather_values(static_cast<std::size_t>(values.size()), v, n, r, o, n_threads);
  }
  if (bad >= 0)
    throw py::index_error("rows: index " + std::to_string(r[bad]) + " at position " + std::to_string(bad) +
                          " is out of range for " + std::to_string(values.size()) + " values");
  return result;
}

py::tuple error_model_variances_py(const DoubleArray& variance, const DoubleArray& intensity, double a, double b,
                                   int n_threads) {
  const auto n = static_cast<std::size_t>(variance.size());
  // any values, as the numpy formula takes them (the callers check the results)
  const double* V = row_array(variance, n, "variance", false);
  const double* I = row_array(intensity, n, "intensity", false);
  if (!std::isfinite(a) || !std::isfinite(b)) throw std::invalid_argument("a and b must be finite");
  require_threads(n_threads);
  auto updated = new_doubles(n), weight = new_doubles(n);
  double* pu = updated.mutable_data();
  double* pw = weight.mutable_data();
  {
    py::gil_scoped_release release;
    error_model_variances(n, V, I, a, b, pu, pw, n_threads);
  }
  return py::make_tuple(updated, weight);
}

py::tuple error_model_filter_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                                const DoubleArray& variance, const DoubleArray& scale, const BoolArray& considered,
                                double min_Ih, int n_threads) {
  const auto n = static_cast<std::size_t>(intensity.size());
  const auto layout = layout_of(order, offsets, n);
  // only the considered rows are checked: the others are never read
  const double* I = row_array(intensity, n, "intensity", false);
  const double* V = row_array(variance, n, "variance", false);
  const double* g = row_array(scale, n, "scale", false);
  const auto* c = row_mask(considered, n, "considered");
  for (std::size_t r = 0; r < n; ++r) {
    if (!c[r]) continue;
    if (!std::isfinite(I[r]) || !std::isfinite(g[r]))
      throw std::invalid_argument("intensity and scale must be finite (row " + std::to_string(r) + ")");
    if (!(V[r] > 0.0) || !std::isfinite(V[r]))
      throw std::invalid_argument("variance must be positive and finite (row " + std::to_string(r) + ")");
  }
  if (!std::isfinite(min_Ih)) throw std::invalid_argument("min_Ih must be finite");
  BoolArray keep({static_cast<py::ssize_t>(n)});
  auto mean = new_doubles(n), size = new_doubles(n);
  auto* out = reinterpret_cast<std::uint8_t*>(keep.mutable_data());
  double* pm = mean.mutable_data();
  double* ps = size.mutable_data();
  {
    py::gil_scoped_release release;
    std::fill(pm, pm + n, 0.0);
    std::fill(ps, ps + n, 0.0);
    error_model_filter(layout, I, V, g, c, min_Ih, out, pm, ps, n_threads);
  }
  return py::make_tuple(keep, mean, size);
}

DoubleArray error_model_normalised_deviations_py(const DoubleArray& deviation, const DoubleArray& variance,
                                                 const DoubleArray& intensity, const DoubleArray& scale, double a,
                                                 double b, int n_threads) {
  const auto n = static_cast<std::size_t>(deviation.size());
  const double* dev = row_array(deviation, n, "deviation");
  const double* v = row_array(variance, n, "variance");
  const double* I = row_array(intensity, n, "intensity");
  const double* g = row_array(scale, n, "scale");
  if (!std::isfinite(a) || !std::isfinite(b)) throw std::invalid_argument("a and b must be finite");
  require_threads(n_threads);
  auto delta = new_doubles(n);
  double* out = delta.mutable_data();
  {
    py::gil_scoped_release release;
    error_model_normalised_deviations(n, dev, v, I, g, a, b, out, n_threads);
  }
  return delta;
}

const std::int64_t* index_array(const Int64Array& index, std::size_t n_rows, std::size_t bound, const char* name) {
  if (index.ndim() != 1 || static_cast<std::size_t>(index.size()) != n_rows)
    throw std::invalid_argument(std::string(name) + " must be 1-dimensional with " + std::to_string(n_rows) +
                                " entries");
  const std::int64_t* p = index.data();
  for (std::size_t r = 0; r < n_rows; ++r) require_index(static_cast<std::ptrdiff_t>(p[r]), bound, name);
  return p;
}

DoubleArray esq_bin_sums_py(const DoubleArray& scaled_intensity, const DoubleArray& epsilon, const Int64Array& bin,
                            std::size_t n_bins) {
  const auto n = static_cast<std::size_t>(scaled_intensity.size());
  const double* x = row_array(scaled_intensity, n, "scaled_intensity", false);
  const double* eps = row_array(epsilon, n, "epsilon");
  const std::int64_t* b = index_array(bin, n, n_bins, "bin");
  auto sums = new_doubles(n_bins);
  double* out = sums.mutable_data();
  {
    py::gil_scoped_release release;
    esq_bin_sums(n, x, eps, b, n_bins, out);
  }
  return sums;
}

DoubleArray esq_values_py(const DoubleArray& scaled_intensity, const DoubleArray& epsilon, const Int64Array& group,
                          const DoubleArray& group_norm) {
  const auto n = static_cast<std::size_t>(scaled_intensity.size());
  const double* x = row_array(scaled_intensity, n, "scaled_intensity", false);
  const double* eps = row_array(epsilon, n, "epsilon");
  const auto n_groups = static_cast<std::size_t>(group_norm.size());
  const double* norm = row_array(group_norm, n_groups, "group_norm", false);
  const std::int64_t* g = index_array(group, n, n_groups, "group");
  auto esq = new_doubles(n);
  double* out = esq.mutable_data();
  {
    py::gil_scoped_release release;
    esq_values(n, x, eps, g, norm, out);
  }
  return esq;
}

DoubleArray esq_scaled_bin_sums_py(const DoubleArray& intensity, const DoubleArray& scale, const DoubleArray& epsilon,
                                   const Int64Array& bin, std::size_t n_bins) {
  const auto n = static_cast<std::size_t>(intensity.size());
  const double* I = row_array(intensity, n, "intensity", false);
  const double* g = row_array(scale, n, "scale", false);
  const double* eps = row_array(epsilon, n, "epsilon");
  const std::int64_t* b = index_array(bin, n, n_bins, "bin");
  auto sums = new_doubles(n_bins);
  double* out = sums.mutable_data();
  {
    py::gil_scoped_release release;
    esq_scaled_bin_sums(n, I, g, eps, b, n_bins, out);
  }
  return sums;
}

Int64Array esq_rows_above_py(const DoubleArray& intensity, const DoubleArray& scale, const DoubleArray& epsilon,
                             const Int64Array& group, const DoubleArray& group_norm, double threshold, int n_threads) {
  const auto n = static_cast<std::size_t>(intensity.size());
  const double* I = row_array(intensity, n, "intensity", false);
  const double* g = row_array(scale, n, "scale", false);
  const double* eps = row_array(epsilon, n, "epsilon");
  const auto n_groups = static_cast<std::size_t>(group_norm.size());
  const double* norm = row_array(group_norm, n_groups, "group_norm", false);
  const std::int64_t* grp = index_array(group, n, n_groups, "group");
  require_threads(n_threads);
  std::vector<std::int64_t> rows;
  {
    py::gil_scoped_release release;
    rows = esq_rows_above(n, I, g, eps, grp, norm, threshold, n_threads);
  }
  return to_array(rows);
}

py::tuple rmeas_group_sums_py(const Int64Array& order, const Int64Array& offsets, const DoubleArray& intensity,
                              const DoubleArray& variance, const DoubleArray& scale) {
  const auto n = static_cast<std::size_t>(intensity.size());
  const auto layout = layout_of(order, offsets, n);
  // non-finite I or σ² only make a row unusable (as in the numpy definition); g must be finite
  const double* I = row_array(intensity, n, "intensity", false);
  const double* V = row_array(variance, n, "variance", false);
  const double* g = row_array(scale, n, "scale");
  Int64Array n_used({static_cast<py::ssize_t>(layout.n_groups)});
  auto dev = new_doubles(layout.n_groups), total = new_doubles(layout.n_groups);
  std::int64_t* pn = n_used.mutable_data();
  double* pd = dev.mutable_data();
  double* pt = total.mutable_data();
  {
    py::gil_scoped_release release;
    rmeas_group_sums(layout, I, V, g, pn, pd, pt);
  }
  return py::make_tuple(n_used, dev, total);
}

py::tuple error_model_bin_moments_py(const DoubleArray& numerator, const DoubleArray& variance,
                                     const DoubleArray& intensity_sq, const Int64Array& bin,
                                     std::size_t n_bins, double b_squared, int n_threads) {
  const auto n = static_cast<std::size_t>(numerator.size());
  const double* k = row_array(numerator, n, "numerator");
  const double* v = row_array(variance, n, "variance");
  const double* i2 = row_array(intensity_sq, n, "intensity_sq");
  if (bin.ndim() != 1 || static_cast<std::size_t>(bin.size()) != n)
    throw std::invalid_argument("bin must be 1-dimensional with " + std::to_string(n) + " entries");
  if (!std::isfinite(b_squared) || b_squared < 0)
    throw std::invalid_argument("b_squared must be finite and >= 0");
  auto sum = new_doubles(n_bins), sum_sq = new_doubles(n_bins);
  double* s = sum.mutable_data();
  double* s2 = sum_sq.mutable_data();
  const std::int64_t* b = bin.data();
  {
    py::gil_scoped_release release;
    error_model_bin_moments(n, k, v, i2, b, n_bins, b_squared, s, s2, n_threads);
  }
  return py::make_tuple(sum, sum_sq);
}

double error_model_search_b_py(const DoubleArray& numerator, const DoubleArray& variance,
                               const DoubleArray& intensity_sq, const Int64Array& bin, const DoubleArray& counts,
                               const DoubleArray& weights, double lo, double hi, double tol, int n_threads) {
  const auto n = static_cast<std::size_t>(numerator.size());
  const double* k = row_array(numerator, n, "numerator");
  const double* v = row_array(variance, n, "variance");
  const double* i2 = row_array(intensity_sq, n, "intensity_sq");
  if (bin.ndim() != 1 || static_cast<std::size_t>(bin.size()) != n)
    throw std::invalid_argument("bin must be 1-dimensional with " + std::to_string(n) + " entries");
  const auto n_bins = static_cast<std::size_t>(counts.size());
  const double* c = row_array(counts, n_bins, "counts");
  const double* w = row_array(weights, n_bins, "weights");
  for (std::size_t b = 0; b < n_bins; ++b)
    if (!(c[b] > 0)) throw std::invalid_argument("counts must be positive");
  if (!std::isfinite(lo) || !std::isfinite(hi) || !(lo <= hi))
    throw std::invalid_argument("lo and hi must be finite with lo <= hi");
  if (!std::isfinite(tol) || !(tol > 0)) throw std::invalid_argument("tol must be positive and finite");
  const std::int64_t* b = bin.data();
  double best = 0.0;
  {
    py::gil_scoped_release release;
    best = error_model_search_b(n, k, v, i2, b, n_bins, c, w, lo, hi, tol, n_threads);
  }
  return best;
}

// ------------------------------------------------------------------ input preparation
using UInt64Array = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

/// The data of an optional float64 column of @p n rows, or nullptr for None (any finiteness).
const double* optional_row_array(const std::optional<DoubleArray>& a, std::size_t n, const char* name) {
  return a ? row_array(*a, n, name, false) : nullptr;
}

/// The data of an optional integer column of @p n rows, or nullptr for None.
template <class Array>
auto optional_int_rows(const std::optional<Array>& a, std::size_t n, const char* name) -> decltype(a->data()) {
  if (!a) return nullptr;
  if (a->ndim() != 1 || static_cast<std::size_t>(a->size()) != n)
    throw std::invalid_argument(std::string(name) + " must be 1-dimensional with " + std::to_string(n) + " entries");
  return a->data();
}

py::tuple filter_unfit_rows_py(const py::list& methods, const std::optional<UInt64Array>& flags,
                               const std::optional<Int32Array>& id, const std::optional<Int32Array>& hkl,
                               const std::optional<DoubleArray>& qe, const std::optional<DoubleArray>& partiality,
                               double partiality_cutoff, double min_isigi) {
  if (methods.size() < 1 || methods.size() > 2)
    throw std::invalid_argument("methods must hold one or two (flag, value, variance) tuples");
  std::vector<DoubleArray> held;  // the methods' columns, alive while their pointers are used
  std::vector<IntegratedColumns> chosen;
  std::size_t n = 0;
  for (const auto& item : methods) {
    const auto t = item.cast<py::tuple>();
    if (t.size() != 3) throw std::invalid_argument("each method is a (flag, value, variance) tuple");
    if (t[1].is_none() || t[2].is_none()) throw std::invalid_argument("a method's value and variance are required");
    held.push_back(t[1].cast<DoubleArray>());
    held.push_back(t[2].cast<DoubleArray>());
    if (chosen.empty()) n = static_cast<std::size_t>(held.front().size());
    IntegratedColumns c;
    c.flag = t[0].cast<std::uint64_t>();
    c.value = row_array(held[held.size() - 2], n, "value", false);
    c.variance = row_array(held.back(), n, "variance", false);
    chosen.push_back(c);
  }
  const std::uint64_t* f = optional_int_rows(flags, n, "flags");
  const std::int32_t* ids = optional_int_rows(id, n, "id");
  const std::int32_t* indices = nullptr;
  if (hkl) {
    if (hkl->ndim() != 2 || hkl->shape(1) != 3 || static_cast<std::size_t>(hkl->shape(0)) != n)
      throw std::invalid_argument("hkl must have shape (" + std::to_string(n) + ", 3)");
    indices = hkl->data();
  }
  const double* q = optional_row_array(qe, n, "qe");
  const double* p = optional_row_array(partiality, n, "partiality");
  py::array_t<bool> bad(static_cast<py::ssize_t>(n));
  auto* out = reinterpret_cast<std::uint8_t*>(bad.mutable_data());
  FilterCounts counts{};
  {
    py::gil_scoped_release release;
    counts = filter_unfit_rows(n, f, ids, indices, chosen.data(), chosen.size(), q, p, partiality_cutoff,
                               min_isigi, out);
  }
  py::list numbers;
  for (auto c : counts) numbers.append(c);
  return py::make_tuple(bad, numbers);
}

py::tuple choose_initial_intensities_py(const std::string& kind, const DoubleArray& correction,
                                        const std::optional<DoubleArray>& prf_value,
                                        const std::optional<DoubleArray>& prf_variance,
                                        const std::optional<DoubleArray>& sum_value,
                                        const std::optional<DoubleArray>& sum_variance,
                                        const std::optional<DoubleArray>& partiality,
                                        const std::optional<DoubleArray>& partiality_inv_variance,
                                        const std::optional<UInt64Array>& flags, std::uint64_t prf_flag) {
  InitialIntensities which;
  if (kind == "profile") which = InitialIntensities::profile;
  else if (kind == "sum") which = InitialIntensities::sum;
  else if (kind == "combine") which = InitialIntensities::combine;
  else throw std::invalid_argument("kind must be profile, sum or combine (got " + kind + ")");
  const auto n = static_cast<std::size_t>(correction.size());
  const double* c = row_array(correction, n, "correction", false);
  const double* pv = optional_row_array(prf_value, n, "prf_value");
  const double* pvar = optional_row_array(prf_variance, n, "prf_variance");
  const double* sv = optional_row_array(sum_value, n, "sum_value");
  const double* svar = optional_row_array(sum_variance, n, "sum_variance");
  const double* p = optional_row_array(partiality, n, "partiality");
  const double* piv = optional_row_array(partiality_inv_variance, n, "partiality_inv_variance");
  const std::uint64_t* f = optional_int_rows(flags, n, "flags");
  DoubleArray intensity(static_cast<py::ssize_t>(n));
  DoubleArray variance(static_cast<py::ssize_t>(n));
  py::array_t<bool> not_positive(static_cast<py::ssize_t>(n));
  double* i_out = intensity.mutable_data();
  double* v_out = variance.mutable_data();
  auto* np_out = reinterpret_cast<std::uint8_t*>(not_positive.mutable_data());
  {
    py::gil_scoped_release release;
    choose_initial_intensities(n, which, c, pv, pvar, sv, svar, p, piv, f, prf_flag, i_out, v_out, np_out);
  }
  return py::make_tuple(intensity, variance, not_positive);
}

}  // namespace

void bind_job(py::module_& m) {
  m.def("filter_unfit_rows", &filter_unfit_rows_py, py::arg("methods"), py::arg("flags"), py::arg("id"),
        py::arg("hkl"), py::arg("qe"), py::arg("partiality"), py::arg("partiality_cutoff"), py::arg("min_isigi"),
        "Rows unfit for scaling (DIALS's filter_bad_reflections) in one pass.\n\n"
        "methods: one or two (flag bit, I, variance) of the chosen integration methods; flags,\n"
        "id, hkl (n, 3), qe, partiality: columns or None. Returns (bad bool (n,), counts):\n"
        "rows per reason [negative id, hkl (0,0,0), not integrated, per method (variance <= 0,\n"
        "I/sigma < min_isigi), qe <= 0, partiality < cutoff].");
  m.def("choose_initial_intensities", &choose_initial_intensities_py, py::arg("kind"), py::arg("correction"),
        py::arg("prf_value"), py::arg("prf_variance"), py::arg("sum_value"), py::arg("sum_variance"),
        py::arg("partiality"), py::arg("partiality_inv_variance"), py::arg("flags"), py::arg("prf_flag"),
        "The job's starting I and variance (DIALS's choose_initial_scaling_intensities) in one\n"
        "pass: kind profile, sum or combine; optional columns may be None. Returns (intensity,\n"
        "variance, not_positive): non-finite values as 0, and whether the variance was not > 0.");
  m.def("error_model_search_b", &error_model_search_b_py, py::arg("numerator"), py::arg("variance"),
        py::arg("intensity_sq"), py::arg("bin"), py::arg("counts"), py::arg("weights"), py::arg("lo"),
        py::arg("hi"), py::arg("tol"), py::arg("n_threads") = 1,
        "The error model's b: a golden-section search on [lo, hi] (to width tol) of the binned-variance\n"
        "objective sum_k weights[k] * ((0.5 - v_k)**2 + 1/v_k - 1.25), v_k the variance of\n"
        "delta = numerator / sqrt(variance + b**2 * intensity_sq) in bin k (counts[k] rows), exactly\n"
        "as the Python search with the numpy objective.");
  m.def("error_model_bin_moments", &error_model_bin_moments_py, py::arg("numerator"), py::arg("variance"),
        py::arg("intensity_sq"), py::arg("bin"), py::arg("n_bins"), py::arg("b_squared"),
        py::arg("n_threads") = 1,
        "Per-bin sums of delta = numerator / sqrt(variance + b_squared * intensity_sq) and of delta**2\n"
        "(rows with bin < 0 are in no bin). Returns (sum_delta, sum_delta_sq). Summed in fixed parts\n"
        "of 2**16 rows (threads share the parts): the same bits for any n_threads.");
  m.def("standard_outlier_rows", &standard_outlier_rows_py, py::arg("order"), py::arg("offsets"),
        py::arg("intensity"), py::arg("weight"), py::arg("scale"), py::arg("zmax"), py::arg("n_threads") = 1,
        "DIALS's standard (iterative leave-one-out) outlier rejection in one call: the outlier rows in\n"
        "detection order (round by round, groups in order). Weights are capped at 10 x the group median\n"
        "each round; weights in tested groups must be positive.");
  m.def("subset_grouping", &subset_grouping_py, py::arg("order"), py::arg("offsets"), py::arg("keep"),
        py::arg("n_threads") = 1,
        "The grouping of the rows with keep[row], renumbered to the subset (row i of the subset is the\n"
        "i-th kept row): returns (order, offsets); empty groups are dropped, group order is kept.\n"
        "Over n_threads threads (the same grouping for any count).");
  m.def("gather_values", &gather_values_py, py::arg("values"), py::arg("rows"), py::arg("out") = py::none(),
        py::arg("n_threads") = 1,
        "values[rows] (numpy's take of float64 values by int64 rows) into out (a writeable contiguous float64\n"
        "array of len(rows)) or a new array, over n_threads threads (GIL released). Raises IndexError\n"
        "for a row out of range.");
  m.def("error_model_variances", &error_model_variances_py, py::arg("variance"), py::arg("intensity"),
        py::arg("a"), py::arg("b"), py::arg("n_threads") = 1,
        "The basic error model's variances a*a*(variance + (b*intensity)**2) and their weights 1/variance',\n"
        "row by row as numpy forms them (bit for bit), over n_threads threads. Returns (variance', weight).");
  m.def("error_model_filter", &error_model_filter_py, py::arg("order"), py::arg("offsets"), py::arg("intensity"),
        py::arg("variance"), py::arg("scale"), py::arg("considered"), py::arg("min_Ih"),
        py::arg("n_threads") = 1,
        "DIALS's filter of the error model's data on the considered rows (group mean I/sigma^2 > 0.85,\n"
        "Ih*g > min_Ih, I > 0.001, multiplicity > 1, variance ratio cut). Returns (keep, Ih, n): the rows\n"
        "kept and, for them, their group's Ih (weights 1/sigma^2) and row count after the filter (0\n"
        "elsewhere).");
  m.def("error_model_normalised_deviations", &error_model_normalised_deviations_py, py::arg("deviation"),
        py::arg("variance"), py::arg("intensity"), py::arg("scale"), py::arg("a"), py::arg("b"),
        py::arg("n_threads") = 1,
        "delta = deviation / (a * sqrt(variance + (b * intensity)**2) / scale), row by row (the\n"
        "error model's normalised deviations with the sigma-free part given), over n_threads threads.");
  m.def("esq_bin_sums", &esq_bin_sums_py, py::arg("scaled_intensity"), py::arg("epsilon"), py::arg("bin"),
        py::arg("n_bins"),
        "Per bin, sum of max(I, 0) / epsilon over its rows in row order (numpy's bincount of those terms).");
  m.def("esq_values", &esq_values_py, py::arg("scaled_intensity"), py::arg("epsilon"), py::arg("group"),
        py::arg("group_norm"),
        "E^2 = I / (epsilon * group_norm[group]) per row (0 where the norm is not positive).");
  m.def("esq_scaled_bin_sums", &esq_scaled_bin_sums_py, py::arg("intensity"), py::arg("scale"), py::arg("epsilon"),
        py::arg("bin"), py::arg("n_bins"),
        "esq_bin_sums of the scaled intensities intensity / scale (the same sums), without forming them.");
  m.def("esq_rows_above", &esq_rows_above_py, py::arg("intensity"), py::arg("scale"), py::arg("epsilon"),
        py::arg("group"), py::arg("group_norm"), py::arg("threshold"), py::arg("n_threads") = 1,
        "The rows (ascending) whose E^2 = (intensity / scale) / (epsilon * group_norm[group]) (0 where the\n"
        "norm is not positive) exceeds threshold: esq_values of intensity / scale compared, in one pass\n"
        "(over n_threads threads; the same rows for any count).");
  m.def("rmeas_group_sums", &rmeas_group_sums_py, py::arg("order"), py::arg("offsets"), py::arg("intensity"),
        py::arg("variance"), py::arg("scale"),
        "Per group, over the rows with sigma > 0 and I/sigma > 1 of the scaled data I/g, sigma/g: (count,\n"
        "sum |I/g - weighted mean|, sum I/g): the pieces of Rmeas.");
  m.def("group_of_rows", &group_of_rows_py, py::arg("order"), py::arg("offsets"),
        "The group of every row of a grouping (rows order[offsets[k]:offsets[k+1]] in group k; a row\n"
        "of the order array in no group gets -1).");
  m.def("sum_in_groups", &sum_in_groups_py, py::arg("order"), py::arg("offsets"), py::arg("values"),
        "Per-group sums of a per-row array: out[k] = sum(values[order[offsets[k]:offsets[k+1]]]).");
  m.def("weighted_group_sums", &weighted_group_sums_py, py::arg("order"), py::arg("offsets"),
        py::arg("intensity"), py::arg("weight"), py::arg("scale"),
        "Per group (sum w*g*I, sum w*g*g); their ratio is the group's weighted mean.");
  m.def("normdev_leave_one_out", &normdev_py<normdev_leave_one_out>, py::arg("order"), py::arg("offsets"),
        py::arg("intensity"), py::arg("weight"), py::arg("scale"),
        "DIALS's standard leave-one-out normalised deviations (0 for groups of <= 2 rows, 1000 where\n"
        "the other rows have no weight). Weights in groups of > 2 rows must be positive.");
  m.def("normdev_simple", &normdev_py<normdev_simple>, py::arg("order"), py::arg("offsets"),
        py::arg("intensity"), py::arg("weight"), py::arg("scale"),
        "DIALS's simple normalised deviations (the row included in its group mean).");
  m.def("pick_group_outliers", &pick_group_outliers_py, py::arg("order"), py::arg("offsets"), py::arg("abs_z"),
        py::arg("zmax"),
        "In each group of > 2 rows: the row of largest |z| if above zmax. Returns (outlier rows in\n"
        "group order, the other rows of those groups).");
  m.def("limit_outlier_weights", &limit_outlier_weights_py, py::arg("order"), py::arg("offsets"),
        py::arg("weight"), "Weights capped at 10 x their group's median (DIALS).");
  m.def("select_rows_in_groups", &select_rows_in_groups_py, py::arg("order"), py::arg("offsets"),
        py::arg("keep"),
        "Compact a grouping to the rows with keep[row]: returns (order, offsets, old group index of\n"
        "each kept group); empty groups are dropped.");
}

}  // namespace xtalscale::py_bind
