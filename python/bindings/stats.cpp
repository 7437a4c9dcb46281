// Bindings for the merging-statistics kernels: xtalscale._core.stats.
//
// xtalscale.stats.merging groups the observations (xtalscale.symmetry), assigns shells and
// calls these; every kernel runs with the GIL released on numpy buffers.
#include <cstdint>
#include <string>

#include "common.hpp"
#include "xtalscale/merging_stats.hpp"
#include "xtalscale/distributions.hpp"

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

py::tuple merging_statistics_py(const DoubleArray& intensity, const DoubleArray& sigma,
                                const py::object& friedel_minus, const Int64Array& order,
                                const Int64Array& offsets, const Int32Array& group_shell,
                                const py::object& group_centric, std::size_t n_shells,
                                bool use_internal_variance, bool anomalous, std::uint64_t seed,
                                double sigma_dynamic_range, bool weighted_halves) {
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
  MergingStatistics result;
  {
    // Safe: only raw buffers of the arrays held above are read; no Python objects touched.
    py::gil_scoped_release release;
    result = compute_merging_statistics(intensity.data(), sigma.data(), minus_ptr, n,
                                        order.data(), offsets.data(), n_groups,
                                        group_shell.data(), centric_ptr, n_shells, opt);
  }
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
