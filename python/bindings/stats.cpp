// Bindings for the merging-statistics kernels: xtalscale._core.stats.
//
// xtalscale.stats.merging groups the observations (xtalscale.symmetry), assigns shells and
// calls these; every kernel runs with the GIL released on numpy buffers.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "common.hpp"
#include "xtalscale/merging_stats.hpp"
#include "xtalscale/distributions.hpp"
#include "xtalscale/stats_rows.hpp"

namespace xtalscale::py_bind {
namespace {


template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

void check_grouping(const DoubleArray& intensity, const DoubleArray& sigma,
                    const Int64Array& order, const Int64Array& offsets) {
  require_ndim(intensity, 1, "intensity");
  require_ndim(sigma, 1, "sigma");
  require_ndim(order, 1, "order");
  require_ndim(offsets, 1, "offsets");
  require_same_length(static_cast<std::size_t>(intensity.size()),
                      static_cast<std::size_t>(sigma.size()), "intensity", "sigma");
  require_same_length(static_cast<std::size_t>(intensity.size()),
                      static_cast<std::size_t>(order.size()), "intensity", "order");
  require(offsets.size() >= 1, "offsets must have at least one entry (n_groups + 1)");
}

py::dict shell_dict(const std::vector<ShellStatistics>& shells) {
  const auto ns = static_cast<py::ssize_t>(shells.size());
  auto col_i = [&](auto member) {
    py::array_t<std::int64_t> a(ns);
    for (py::ssize_t k = 0; k < ns; ++k) a.mutable_data()[k] = shells[static_cast<std::size_t>(k)].*member;
    return a;
  };
  auto col_d = [&](auto member) {
    py::array_t<double> a(ns);
    for (py::ssize_t k = 0; k < ns; ++k) a.mutable_data()[k] = shells[static_cast<std::size_t>(k)].*member;
    return a;
  };
  py::dict d;
  d["n_obs"] = col_i(&ShellStatistics::n_obs);
  d["n_uniq"] = col_i(&ShellStatistics::n_uniq);
  d["n_multi"] = col_i(&ShellStatistics::n_multi);
  d["n_bijvoet_pairs"] = col_i(&ShellStatistics::n_bijvoet_pairs);
  d["n_acentric"] = col_i(&ShellStatistics::n_acentric);
  d["sum_i"] = col_d(&ShellStatistics::sum_i);
  d["sum_sigma"] = col_d(&ShellStatistics::sum_sigma);
  d["sum_i_over_sigma"] = col_d(&ShellStatistics::sum_i_over_sigma);
  d["n_i_over_sigma"] = col_i(&ShellStatistics::n_i_over_sigma);
  d["sum_unmerged_i_over_sigma"] = col_d(&ShellStatistics::sum_unmerged_i_over_sigma);
  d["n_unmerged_positive_sigma"] = col_i(&ShellStatistics::n_unmerged_positive_sigma);
  d["r_num"] = col_d(&ShellStatistics::r_num);
  d["r_meas_num"] = col_d(&ShellStatistics::r_meas_num);
  d["r_pim_num"] = col_d(&ShellStatistics::r_pim_num);
  d["r_den"] = col_d(&ShellStatistics::r_den);
  d["r_merge"] = col_d(&ShellStatistics::r_merge);
  d["r_meas"] = col_d(&ShellStatistics::r_meas);
  d["r_pim"] = col_d(&ShellStatistics::r_pim);
  d["cc_half"] = col_d(&ShellStatistics::cc_half);
  d["cc_half_n"] = col_i(&ShellStatistics::cc_half_n);
  d["cc_half_sigma_tau"] = col_d(&ShellStatistics::cc_half_sigma_tau);
  d["cc_half_sigma_tau_n"] = col_i(&ShellStatistics::cc_half_sigma_tau_n);
  d["cc_anom"] = col_d(&ShellStatistics::cc_anom);
  d["cc_anom_n"] = col_i(&ShellStatistics::cc_anom_n);
  return d;
}

py::tuple merged_dict_and_shells(const MergingStatistics& result) {
  const MergedReflections& m = result.merged;
  py::dict merged;
  merged["group"] = to_numpy(m.group);
  merged["bijvoet"] = to_numpy(m.bijvoet);
  merged["intensity"] = to_numpy(m.intensity);
  merged["sigma"] = to_numpy(m.sigma);
  merged["sigma_internal"] = to_numpy(m.sigma_internal);
  merged["multiplicity"] = to_numpy(m.multiplicity);
  merged["half1"] = to_numpy(m.half1);
  merged["half2"] = to_numpy(m.half2);
  return py::make_tuple(merged, shell_dict(result.shells));
}

/// merging_statistics (both = false: one pass with @p anomalous) or
/// merging_statistics_both (both = true: the non-anomalous and anomalous passes).
py::tuple merging_statistics_impl(const DoubleArray& intensity, const DoubleArray& sigma,
                                  const py::object& friedel_minus, const Int64Array& order,
                                  const Int64Array& offsets, const Int32Array& group_shell,
                                  const py::object& group_centric, std::size_t n_shells,
                                  bool use_internal_variance, bool anomalous, std::uint64_t seed,
                                  double sigma_dynamic_range, bool weighted_halves, bool both) {
  check_grouping(intensity, sigma, order, offsets);
  require_ndim(group_shell, 1, "group_shell");
  const auto n = static_cast<std::size_t>(intensity.size());
  const auto n_groups = static_cast<std::size_t>(offsets.size() - 1);
  require_same_length(static_cast<std::size_t>(group_shell.size()), n_groups, "group_shell",
                      "offsets[:-1]");
  require(std::isfinite(sigma_dynamic_range) && sigma_dynamic_range >= 0,
          "sigma_dynamic_range must be finite and >= 0");
  ByteArray minus, centric;
  const std::uint8_t* minus_ptr = nullptr;
  const std::uint8_t* centric_ptr = nullptr;
  if (!friedel_minus.is_none()) {
    minus = friedel_minus.cast<ByteArray>();
    require_ndim(minus, 1, "friedel_minus");
    require_same_length(static_cast<std::size_t>(minus.size()), n, "friedel_minus", "intensity");
    minus_ptr = minus.data();
  }
  if (!group_centric.is_none()) {
    centric = group_centric.cast<ByteArray>();
    require_ndim(centric, 1, "group_centric");
    require_same_length(static_cast<std::size_t>(centric.size()), n_groups, "group_centric",
                        "offsets[:-1]");
    centric_ptr = centric.data();
  }
  MergingOptions opt;
  opt.use_internal_variance = use_internal_variance;
  opt.anomalous = anomalous;
  opt.seed = seed;
  opt.sigma_dynamic_range = sigma_dynamic_range;
  opt.weighted_halves = weighted_halves;
  if (both) {
    std::pair<MergingStatistics, MergingStatistics> result;
    {
      // Safe: only raw buffers of the arrays held above are read; no Python objects touched.
      py::gil_scoped_release release;
      result = compute_merging_statistics_both(intensity.data(), sigma.data(), minus_ptr, n,
                                               order.data(), offsets.data(), n_groups,
                                               group_shell.data(), centric_ptr, n_shells, opt);
    }
    return py::make_tuple(merged_dict_and_shells(result.first),
                          merged_dict_and_shells(result.second));
  }
  MergingStatistics result;
  {
    // Safe: only raw buffers of the arrays held above are read; no Python objects touched.
    py::gil_scoped_release release;
    result = compute_merging_statistics(intensity.data(), sigma.data(), minus_ptr, n,
                                        order.data(), offsets.data(), n_groups,
                                        group_shell.data(), centric_ptr, n_shells, opt);
  }
  return merged_dict_and_shells(result);
}

py::tuple merging_statistics_py(const DoubleArray& intensity, const DoubleArray& sigma,
                                const py::object& friedel_minus, const Int64Array& order,
                                const Int64Array& offsets, const Int32Array& group_shell,
                                const py::object& group_centric, std::size_t n_shells,
                                bool use_internal_variance, bool anomalous, std::uint64_t seed,
                                double sigma_dynamic_range, bool weighted_halves) {
  return merging_statistics_impl(intensity, sigma, friedel_minus, order, offsets, group_shell,
                                 group_centric, n_shells, use_internal_variance, anomalous, seed,
                                 sigma_dynamic_range, weighted_halves, false);
}

py::tuple merging_statistics_both_py(const DoubleArray& intensity, const DoubleArray& sigma,
                                     const py::object& friedel_minus, const Int64Array& order,
                                     const Int64Array& offsets, const Int32Array& group_shell,
                                     const py::object& group_centric, std::size_t n_shells,
                                     bool use_internal_variance, std::uint64_t seed,
                                     double sigma_dynamic_range, bool weighted_halves) {
  return merging_statistics_impl(intensity, sigma, friedel_minus, order, offsets, group_shell,
                                 group_centric, n_shells, use_internal_variance, false, seed,
                                 sigma_dynamic_range, weighted_halves, true);
}

py::array_t<double> normalised_deviations_py(const DoubleArray& intensity,
                                             const DoubleArray& sigma, const Int64Array& order,
                                             const Int64Array& offsets) {
  check_grouping(intensity, sigma, order, offsets);
  const auto n = static_cast<std::size_t>(intensity.size());
  py::array_t<double> out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;  // raw buffers only
    normalised_deviations(intensity.data(), sigma.data(), n, order.data(), offsets.data(),
                          static_cast<std::size_t>(offsets.size() - 1), o);
  }
  return out;
}

/// Per-batch sums (and, with @p with_deviations, the per-observation normalised deviations)
/// in one kernel pass: the checks, outputs and call behind both bindings below.
py::tuple batch_sums_impl(const DoubleArray& intensity, const DoubleArray& sigma,
                          const Int64Array& order, const Int64Array& offsets,
                          const Int64Array& batch_index, std::size_t n_batches,
                          bool with_deviations) {
  check_grouping(intensity, sigma, order, offsets);
  require_ndim(batch_index, 1, "batch_index");
  const auto n = static_cast<std::size_t>(intensity.size());
  require_same_length(static_cast<std::size_t>(batch_index.size()), n, "batch_index",
                      "intensity");
  const auto nb = static_cast<py::ssize_t>(n_batches);
  py::array_t<double> deviations(with_deviations ? static_cast<py::ssize_t>(n) : 0);
  py::array_t<std::int64_t> n_obs(nb);
  py::array_t<double> abs_dev(nb), sum_i(nb), sum_ios(nb);
  double* dev = with_deviations ? deviations.mutable_data() : nullptr;
  std::int64_t* p0 = n_obs.mutable_data();
  double* p1 = abs_dev.mutable_data();
  double* p2 = sum_i.mutable_data();
  double* p3 = sum_ios.mutable_data();
  {
    py::gil_scoped_release release;  // raw buffers only
    deviations_and_batch_sums(intensity.data(), sigma.data(), n, order.data(), offsets.data(),
                              static_cast<std::size_t>(offsets.size() - 1), dev,
                              batch_index.data(), n_batches, p0, p1, p2, p3);
  }
  if (with_deviations) return py::make_tuple(deviations, n_obs, abs_dev, sum_i, sum_ios);
  return py::make_tuple(n_obs, abs_dev, sum_i, sum_ios);
}

py::tuple batch_sums_py(const DoubleArray& intensity, const DoubleArray& sigma,
                        const Int64Array& order, const Int64Array& offsets,
                        const Int64Array& batch_index, std::size_t n_batches) {
  return batch_sums_impl(intensity, sigma, order, offsets, batch_index, n_batches, false);
}

py::tuple deviations_and_batch_sums_py(const DoubleArray& intensity, const DoubleArray& sigma,
                                       const Int64Array& order, const Int64Array& offsets,
                                       const Int64Array& batch_index, std::size_t n_batches) {
  return batch_sums_impl(intensity, sigma, order, offsets, batch_index, n_batches, true);
}

using UInt64Array = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;
using Int8Array = py::array_t<std::int8_t, py::array::c_style | py::array::forcecast>;

/// A 1-D array of n values of type A from an optional argument (None: an empty array).
template <typename A>
A optional_column(const py::object& o, std::size_t n, const char* name) {
  if (o.is_none()) return A(0);
  A a = o.cast<A>();
  require_ndim(a, 1, name);
  require_same_length(size_of(a), n, name, "g");
  return a;
}

py::tuple classify_scaled_rows_py(const py::object& id, const py::object& flags,
                                  std::uint64_t bad_bits, const DoubleArray& g,
                                  const DoubleArray& variance, const py::object& partiality,
                                  double threshold, const Int32Array& hkl) {
  require_ndim(g, 1, "g");
  require_ndim(variance, 1, "variance");
  const std::size_t n = size_of(g);
  require_same_length(size_of(variance), n, "variance", "g");
  require(hkl.ndim() == 2 && hkl.shape(1) == 3, "hkl must have shape (n, 3)");
  require_same_length(static_cast<std::size_t>(hkl.shape(0)), n, "hkl", "g");
  require(std::isfinite(threshold), "threshold must be finite");
  const auto ids = optional_column<Int32Array>(id, n, "id");
  const auto fl = optional_column<UInt64Array>(flags, n, "flags");
  const auto part = optional_column<DoubleArray>(partiality, n, "partiality");
  const std::int32_t* id_p = id.is_none() ? nullptr : ids.data();
  const std::uint64_t* fl_p = flags.is_none() ? nullptr : fl.data();
  const double* part_p = partiality.is_none() ? nullptr : part.data();
  ByteArray code(static_cast<py::ssize_t>(n));
  std::uint8_t* c = code.mutable_data();
  ScaledRowCounts counts;
  {
    py::gil_scoped_release release;  // raw buffers only
    counts = classify_scaled_rows(n, id_p, fl_p, bad_bits, g.data(), variance.data(), part_p,
                                  threshold, hkl.data(), c);
  }
  py::dict d;
  d["n_bad"] = counts.n_bad;
  py::list survivors;
  for (std::int64_t v : counts.survivors) survivors.append(v);
  d["survivors"] = survivors;
  d["n_partial_candidates"] = counts.n_partial_candidates;
  d["n_zero_index"] = counts.n_zero_index;
  return py::make_tuple(code, d);
}

py::tuple gather_scaled_rows_py(const ByteArray& code, std::size_t n_out, const DoubleArray& value,
                                const DoubleArray& variance, const DoubleArray& g,
                                bool apply_inverse_scale, const Int32Array& hkl,
                                const py::object& id, const py::object& xyz) {
  require_ndim(code, 1, "code");
  const std::size_t n = size_of(code);
  for (const auto* a : {&value, &variance, &g}) {
    require_ndim(*a, 1, "value, variance and g");
    require_same_length(size_of(*a), n, "value, variance and g", "code");
  }
  require(hkl.ndim() == 2 && hkl.shape(1) == 3, "hkl must have shape (n, 3)");
  require_same_length(static_cast<std::size_t>(hkl.shape(0)), n, "hkl", "code");
  require(n_out <= n, "n_out must not exceed the number of rows");
  Int32Array ids = id.is_none() ? Int32Array(0) : id.cast<Int32Array>();
  if (!id.is_none()) {
    require_ndim(ids, 1, "id");
    require_same_length(size_of(ids), n, "id", "code");
  }
  DoubleArray xyz_a = xyz.is_none() ? DoubleArray(0) : xyz.cast<DoubleArray>();
  if (!xyz.is_none())
    require(xyz_a.ndim() == 2 && xyz_a.shape(1) == 3 && static_cast<std::size_t>(xyz_a.shape(0)) == n,
            "xyz must have shape (n, 3)");
  const auto m = static_cast<py::ssize_t>(n_out);
  Int64Array rows(m), dataset(m);
  DoubleArray intensity(m), var_out(m), z(xyz.is_none() ? 0 : m);
  Int32Array hkl_out({m, py::ssize_t{3}});
  const std::int32_t* id_p = id.is_none() ? nullptr : ids.data();
  const double* z_p = xyz.is_none() ? nullptr : xyz_a.data() + 2;
  double* z_o = xyz.is_none() ? nullptr : z.mutable_data();
  std::size_t written = 0;
  {
    py::gil_scoped_release release;  // raw buffers only
    written = gather_scaled_rows(n, code.data(), n_out, value.data(), variance.data(), g.data(),
                                 apply_inverse_scale, hkl.data(), id_p, z_p, rows.mutable_data(),
                                 intensity.mutable_data(), var_out.mutable_data(),
                                 hkl_out.mutable_data(), dataset.mutable_data(), z_o);
  }
  if (written != n_out)
    throw std::invalid_argument("n_out (" + std::to_string(n_out) +
                                ") is not the number of kept rows in code");
  return py::make_tuple(rows, intensity, var_out, hkl_out, dataset,
                        xyz.is_none() ? py::object(py::none()) : py::object(z));
}

DoubleArray quasi_normalised_e_squared_py(const DoubleArray& d_star_sq, const DoubleArray& intensity,
                                          const py::array& epsilon, double lo, double step,
                                          std::size_t n_shells) {
  require_ndim(d_star_sq, 1, "d_star_sq");
  require_ndim(intensity, 1, "intensity");
  const std::size_t n = size_of(intensity);
  require_same_length(size_of(d_star_sq), n, "d_star_sq", "intensity");
  require(epsilon.ndim() == 1 && size_of(epsilon) == n,
          "epsilon must be 1-dimensional with one value per intensity");
  require(n_shells >= 1, "n_shells must be >= 1");
  require(std::isfinite(lo) && std::isfinite(step) && step > 0,
          "lo and step must be finite and step > 0");
  DoubleArray out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  if (epsilon.dtype().is(py::dtype::of<std::int8_t>())) {
    const Int8Array eps = epsilon.cast<Int8Array>();
    py::gil_scoped_release release;  // raw buffers only
    quasi_normalised_e_squared(n, d_star_sq.data(), intensity.data(), eps.data(), lo, step,
                               n_shells, o);
  } else {
    const DoubleArray eps = epsilon.cast<DoubleArray>();
    py::gil_scoped_release release;  // raw buffers only
    quasi_normalised_e_squared(n, d_star_sq.data(), intensity.data(), eps.data(), lo, step,
                               n_shells, o);
  }
  return out;
}

py::tuple grouped_deviations_and_batch_sums_py(const DoubleArray& intensity,
                                                const DoubleArray& sigma,
                                                const Int64Array& offsets, const DoubleArray& mean,
                                                const Int64Array& position, std::size_t n_out,
                                                const Int64Array& batch_index,
                                                std::size_t n_batches) {
  for (const auto* a : {&intensity, &sigma, &mean}) require_ndim(*a, 1, "intensity, sigma and mean");
  require_ndim(offsets, 1, "offsets");
  require_ndim(position, 1, "position");
  require_ndim(batch_index, 1, "batch_index");
  const std::size_t n = size_of(intensity);
  require_same_length(size_of(sigma), n, "sigma", "intensity");
  require_same_length(size_of(position), n, "position", "intensity");
  require_same_length(size_of(batch_index), n, "batch_index", "intensity");
  require(offsets.size() >= 1, "offsets must have at least one entry (n_groups + 1)");
  const auto n_groups = static_cast<std::size_t>(offsets.size() - 1);
  require_same_length(size_of(mean), n_groups, "mean", "offsets[:-1]");
  py::array_t<double> deviations(static_cast<py::ssize_t>(n_out));
  const auto nb = static_cast<py::ssize_t>(n_batches);
  py::array_t<std::int64_t> n_obs(nb);
  py::array_t<double> abs_dev(nb), sum_i(nb), sum_ios(nb);
  double* dev = deviations.mutable_data();
  std::int64_t* p0 = n_obs.mutable_data();
  double* p1 = abs_dev.mutable_data();
  double* p2 = sum_i.mutable_data();
  double* p3 = sum_ios.mutable_data();
  {
    py::gil_scoped_release release;  // raw buffers only
    std::fill(dev, dev + n_out, std::numeric_limits<double>::quiet_NaN());  // (rows not given)
    grouped_deviations_and_batch_sums(n, intensity.data(), sigma.data(), offsets.data(), n_groups,
                                      mean.data(), position.data(), n_out, dev,
                                      batch_index.data(), n_batches, p0, p1, p2, p3);
  }
  return py::make_tuple(deviations, n_obs, abs_dev, sum_i, sum_ios);
}

py::object sorted_values_at_py(const DoubleArray& values, const Int64Array& positions) {
  require_ndim(values, 1, "values");
  require_ndim(positions, 1, "positions");
  const std::size_t n = size_of(values), m = size_of(positions);
  DoubleArray out(static_cast<py::ssize_t>(m));
  bool ok = true;
  {
    py::gil_scoped_release release;  // raw buffers only
    ok = sorted_values_at(n, values.data(), m, positions.data(), out.mutable_data());
  }
  if (!ok) return py::none();
  return std::move(out);
}

/// out = f(values) element-wise for any-shaped float64 input, the GIL released.
template <void (*F)(std::size_t, const double*, double*) noexcept>
DoubleArray elementwise(const DoubleArray& values) {
  DoubleArray out(std::vector<py::ssize_t>(values.shape(), values.shape() + values.ndim()));
  const std::size_t n = static_cast<std::size_t>(values.size());
  const double* in = values.data();
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    F(n, in, o);
  }
  return out;
}

}  // namespace

void bind_stats(py::module_& m) {
  m.def("normal_quantile", &elementwise<&special::normal_quantile>, py::arg("p"),
        "Standard normal quantile (scipy's ndtri), element-wise: -inf at 0, inf at 1, NaN\n"
        "outside [0, 1].");
  m.def("normal_cdf", &elementwise<&special::normal_cdf>, py::arg("x"),
        "Standard normal cumulative distribution, element-wise.");
  m.def("erf", &elementwise<&special::erf>, py::arg("x"), "erf(x), element-wise.");
  m.def("student_t_quantile", &special::student_t_quantile, py::arg("df"), py::arg("p"),
        "Student's t quantile (scipy's stdtrit(df, p)): t with P(T <= t) = p.");
  m.def("classify_scaled_rows", &classify_scaled_rows_py, py::arg("id"), py::arg("flags"),
        py::arg("bad_bits"), py::arg("g"), py::arg("variance"), py::arg("partiality"),
        py::arg("threshold"), py::arg("hkl"),
        "(code, counts): the first selection step each table row fails (0: kept, 6: kept\n"
        "but index (0, 0, 0)) and the counts (n_bad, survivors per step, ...).");
  m.def("gather_scaled_rows", &gather_scaled_rows_py, py::arg("code"), py::arg("n_out"),
        py::arg("value"), py::arg("variance"), py::arg("g"), py::arg("apply_inverse_scale"),
        py::arg("hkl"), py::arg("id"), py::arg("xyz"),
        "(rows, I, V, hkl, dataset, z) of the rows with code 0 (n_out of them).");
  m.def("quasi_normalised_e_squared", &quasi_normalised_e_squared_py, py::arg("d_star_sq"),
        py::arg("intensity"), py::arg("epsilon"), py::arg("lo"), py::arg("step"),
        py::arg("n_shells"), "E^2 by quasi-normalisation in equal-width d*^2 shells.");
  m.def("grouped_deviations_and_batch_sums", &grouped_deviations_and_batch_sums_py,
        py::arg("intensity"), py::arg("sigma"), py::arg("offsets"), py::arg("mean"),
        py::arg("position"), py::arg("n_out"), py::arg("batch_index"), py::arg("n_batches"),
        "deviations_and_batch_sums of rows in group order with each group's mean given:\n"
        "(deviations (n_out, NaN where no row is placed), n_obs, sum|I-<I>|, sum I, sum I/s).");
  m.def("sorted_values_at", &sorted_values_at_py, py::arg("values"), py::arg("positions"),
        "np.sort(values)[positions] exactly without a full sort; None if a value is not\n"
        "finite.");
  m.def("merging_statistics_both", &merging_statistics_both_py, py::arg("intensity"),
        py::arg("sigma"), py::arg("friedel_minus"), py::arg("order"), py::arg("offsets"),
        py::arg("group_shell"), py::arg("group_centric"), py::arg("n_shells"),
        py::arg("use_internal_variance") = false, py::arg("seed") = 0,
        py::arg("sigma_dynamic_range") = 1e-6, py::arg("weighted_halves") = true,
        "merging_statistics non-anomalous and anomalous of the same shells in one pass over\n"
        "the groups: ((merged, shells), (merged, shells)), the same as the two calls.");
  m.def("merging_statistics", &merging_statistics_py, py::arg("intensity"), py::arg("sigma"),
        py::arg("friedel_minus"), py::arg("order"), py::arg("offsets"), py::arg("group_shell"),
        py::arg("group_centric"), py::arg("n_shells"), py::arg("use_internal_variance") = false,
        py::arg("anomalous") = false, py::arg("seed") = 0, py::arg("sigma_dynamic_range") = 1e-6,
        py::arg("weighted_halves") = true,
        "Merge grouped observations and reduce them per shell (iotbx conventions).\n\n"
        "Returns (merged, shells): merged is a dict of per-unique arrays (group, bijvoet,\n"
        "intensity, sigma, sigma_internal, multiplicity, half1, half2); shells a dict of\n"
        "per-shell arrays of length n_shells + 1 (the last entry is overall).");
  m.def("normalised_deviations", &normalised_deviations_py, py::arg("intensity"),
        py::arg("sigma"), py::arg("order"), py::arg("offsets"),
        "sqrt((n-1)/n) (I - <I>)/sigma per observation (input order; NaN for singletons).");
  m.def("batch_sums", &batch_sums_py, py::arg("intensity"), py::arg("sigma"), py::arg("order"),
        py::arg("offsets"), py::arg("batch_index"), py::arg("n_batches"),
        "Per-batch (n_obs, sum |I - <I>|, sum I, sum I/sigma).");
  m.def("deviations_and_batch_sums", &deviations_and_batch_sums_py, py::arg("intensity"),
        py::arg("sigma"), py::arg("order"), py::arg("offsets"), py::arg("batch_index"),
        py::arg("n_batches"),
        "normalised_deviations and batch_sums in one pass (one weighted mean per group):\n"
        "(deviations, n_obs, sum |I - <I>|, sum I, sum I/sigma).");
}

}  // namespace xtalscale::py_bind
