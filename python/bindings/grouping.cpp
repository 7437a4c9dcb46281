// Bindings for the ASU-mapping kernel: xtalscale._core.grouping.
//
// xtalscale.symmetry builds the operator list and condition from gemmi and calls map_to_asu;
// outputs are fresh numpy arrays filled in place with the GIL released.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"
#include "xtalscale/grouping.hpp"

namespace xtalscale::py_bind {
namespace {


/// The rotations of a (m, 3, 3) int64 array, checked.
std::vector<std::array<int, 9>> rotations_of(const Int64Array& rotations) {
  if (rotations.ndim() != 3 || rotations.shape(1) != 3 || rotations.shape(2) != 3 ||
      rotations.shape(0) < 1 || rotations.shape(0) > 48)
    throw std::invalid_argument("rotations must have shape (m, 3, 3) with 1 <= m <= 48");
  std::vector<std::array<int, 9>> out;
  const auto* r = rotations.data();
  for (py::ssize_t j = 0; j < rotations.shape(0); ++j) {
    std::array<int, 9> m{};
    for (int e = 0; e < 9; ++e) m[static_cast<std::size_t>(e)] = static_cast<int>(r[9 * j + e]);
    out.push_back(m);
  }
  return out;
}

py::array_t<bool> centric_flags_py(const Int32Array& hkl, const Int64Array& rotations, int n_threads) {
  if (hkl.ndim() != 2 || hkl.shape(1) != 3)
    throw std::invalid_argument("hkl must have shape (n, 3)");
  AsuSymmetry sym;
  sym.rotations = rotations_of(rotations);
  const auto n = static_cast<std::size_t>(hkl.shape(0));
  py::array_t<bool> out(static_cast<py::ssize_t>(n));
  const std::int32_t* in = hkl.data();
  auto* o = reinterpret_cast<std::uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    centric_flags(sym, in, n, o, n_threads);
  }
  return out;
}

/// The AsuSymmetry of map_to_asu's arguments, checked (and @p hkl's shape).
AsuSymmetry checked_symmetry(const Int32Array& hkl, const Int64Array& rotations, const Int64Array& basis,
                             int condition) {
  if (hkl.ndim() != 2 || hkl.shape(1) != 3)
    throw std::invalid_argument("hkl must have shape (n, 3)");
  const auto checked_rotations = rotations_of(rotations);
  if (basis.ndim() != 2 || basis.shape(0) != 3 || basis.shape(1) != 3)
    throw std::invalid_argument("basis must have shape (3, 3)");
  if (condition < 0 || condition > 9)
    throw std::invalid_argument("condition must be in [0, 9], got " + std::to_string(condition));
  AsuSymmetry sym;
  sym.condition = static_cast<AsuCondition>(condition);
  sym.rotations = checked_rotations;
  for (int e = 0; e < 9; ++e) sym.basis[static_cast<std::size_t>(e)] = basis.data()[e];
  return sym;
}

py::tuple map_to_asu_bijvoet_py(const Int32Array& hkl, const Int64Array& rotations, const Int64Array& basis,
                                int condition, int n_threads) {
  const AsuSymmetry sym = checked_symmetry(hkl, rotations, basis, condition);
  const auto n = static_cast<std::size_t>(hkl.shape(0));
  Int32Array asu({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  py::array_t<bool> minus(static_cast<py::ssize_t>(n));
  const std::int32_t* in = hkl.data();
  std::int32_t* out = asu.mutable_data();
  auto* flags = reinterpret_cast<std::uint8_t*>(minus.mutable_data());
  {
    py::gil_scoped_release release;  // raw buffers owned by the arrays above
    map_to_asu_bijvoet(sym, in, n, out, flags, n_threads);
  }
  return py::make_tuple(asu, minus);
}

py::tuple map_to_asu_py(const Int32Array& hkl, const Int64Array& rotations, const Int64Array& basis,
                        int condition, int n_threads) {
  const AsuSymmetry sym = checked_symmetry(hkl, rotations, basis, condition);
  const auto n = static_cast<std::size_t>(hkl.shape(0));
  Int32Array asu({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  Int32Array isym({static_cast<py::ssize_t>(n)});
  const std::int32_t* in = hkl.data();
  std::int32_t* out = asu.mutable_data();
  std::int32_t* iso = isym.mutable_data();
  {
    // Safe: only raw buffers owned by the arrays above are touched; no Python objects.
    py::gil_scoped_release release;
    map_to_asu(sym, in, n, out, iso, n_threads);
  }
  return py::make_tuple(asu, isym);
}

py::tuple group_keys_py(const Int64Array& keys) {
  if (keys.ndim() != 1) throw std::invalid_argument("keys must be 1-dimensional");
  const auto n = static_cast<std::size_t>(keys.shape(0));
  Int64Array order({static_cast<py::ssize_t>(n)});
  Int64Array group_index({static_cast<py::ssize_t>(n)});
  const std::int64_t* in = keys.data();
  std::int64_t* o = order.mutable_data();
  std::int64_t* g = group_index.mutable_data();
  std::vector<std::int64_t> offsets;
  {
    // Safe: only raw buffers owned by the arrays above are touched; no Python objects.
    py::gil_scoped_release release;
    offsets = group_keys(in, n, o, g);
  }
  Int64Array off({static_cast<py::ssize_t>(offsets.size())});
  std::copy(offsets.begin(), offsets.end(), off.mutable_data());
  return py::make_tuple(order, group_index, off);
}

py::tuple counting_order_py(const Int64Array& keys, std::int64_t n_keys) {
  if (keys.ndim() != 1) throw std::invalid_argument("keys must be 1-dimensional");
  if (n_keys < 0) throw std::invalid_argument("n_keys must be >= 0");
  const auto n = static_cast<std::size_t>(keys.shape(0));
  Int64Array order({static_cast<py::ssize_t>(n)});
  Int64Array offsets({static_cast<py::ssize_t>(n_keys + 1)});
  const std::int64_t* in = keys.data();
  std::int64_t* o = order.mutable_data();
  std::int64_t* off = offsets.mutable_data();
  {
    py::gil_scoped_release release;  // raw buffers owned by the arrays above
    counting_order(in, n, static_cast<std::size_t>(n_keys), o, off);
  }
  return py::make_tuple(order, offsets);
}

py::tuple split_bijvoet_groups_py(const Int64Array& order, const Int64Array& offsets, const Int32Array& keys,
                                  const BoolArray& minus) {
  if (order.ndim() != 1 || offsets.ndim() != 1 || offsets.size() < 1)
    throw std::invalid_argument("order and offsets must be 1-dimensional (offsets: n_groups + 1 values)");
  const auto n = static_cast<std::size_t>(order.size());
  const auto n_groups = static_cast<std::size_t>(offsets.size()) - 1;
  if (keys.ndim() != 2 || keys.shape(1) != 3 || static_cast<std::size_t>(keys.shape(0)) != n_groups)
    throw std::invalid_argument("keys must have shape (n_groups, 3)");
  if (minus.ndim() != 1)
    throw std::invalid_argument("minus must be a 1-dimensional bool array (one flag per row)");
  const auto n_rows = static_cast<std::size_t>(minus.size());
  const std::int64_t* off = offsets.data();
  require_group_offsets(off, n_groups);
  require(static_cast<std::size_t>(off[n_groups]) == n, "offsets must end at len(order)");
  const std::int64_t* o = order.data();
  for (std::size_t i = 0; i < n; ++i)
    if (o[i] < 0 || static_cast<std::size_t>(o[i]) >= n_rows)
      throw std::invalid_argument("order[" + std::to_string(i) + "] is not a row of minus");
  Int64Array out_order({static_cast<py::ssize_t>(n)});
  std::vector<std::int64_t> out_offsets;
  {
    py::gil_scoped_release release;  // raw buffers owned by the arrays above
    out_offsets = split_bijvoet_groups(o, off, n_groups, keys.data(),
                                       reinterpret_cast<const std::uint8_t*>(minus.data()), out_order.mutable_data());
  }
  Int64Array out_off({static_cast<py::ssize_t>(out_offsets.size())});
  std::copy(out_offsets.begin(), out_offsets.end(), out_off.mutable_data());
  return py::make_tuple(out_order, out_off);
}

py::tuple group_miller_py(const Int32Array& hkl, int n_threads) {
  if (hkl.ndim() != 2 || hkl.shape(1) != 3)
    throw std::invalid_argument("hkl must have shape (n, 3)");
  const auto n = static_cast<std::size_t>(hkl.shape(0));
  Int64Array order({static_cast<py::ssize_t>(n)});
  Int64Array group_index({static_cast<py::ssize_t>(n)});
  const std::int32_t* in = hkl.data();
  std::int64_t* o = order.mutable_data();
  std::int64_t* g = group_index.mutable_data();
  std::vector<std::int64_t> offsets;
  {
    // Safe: only raw buffers owned by the arrays above are touched; no Python objects.
    py::gil_scoped_release release;
    offsets = group_miller_indices(in, n, o, g, n_threads);
  }
  Int64Array off({static_cast<py::ssize_t>(offsets.size())});
  std::copy(offsets.begin(), offsets.end(), off.mutable_data());
  return py::make_tuple(order, group_index, off);
}

}  // namespace

void bind_grouping(py::module_& m) {
  py::enum_<AsuCondition>(m, "AsuCondition", "Reciprocal-ASU condition of a Laue class (reference setting).")
      .value("triclinic", AsuCondition::triclinic)
      .value("monoclinic", AsuCondition::monoclinic)
      .value("orthorhombic", AsuCondition::orthorhombic)
      .value("tetragonal_low", AsuCondition::tetragonal_low)
      .value("tetragonal_high", AsuCondition::tetragonal_high)
      .value("trigonal_low", AsuCondition::trigonal_low)
      .value("trigonal_312", AsuCondition::trigonal_312)
      .value("trigonal_321", AsuCondition::trigonal_321)
      .value("cubic_low", AsuCondition::cubic_low)
      .value("cubic_high", AsuCondition::cubic_high);
  m.def("asu_condition_text", &asu_condition_text, py::arg("condition"),
        "gemmi's condition text (ReciprocalAsu.condition_str()) of an AsuCondition.");
  m.def("centric_flags", &centric_flags_py, py::arg("hkl"), py::arg("rotations"), py::arg("n_threads") = 1,
        "Centric flag of each (n, 3) index: some rotation R (m, 3, 3) gives h R = -h.\n"
        "n_threads: rows split over up to that many threads (the same flags).");
  m.def("map_to_asu", &map_to_asu_py, py::arg("hkl"), py::arg("rotations"), py::arg("basis"),
        py::arg("condition"), py::arg("n_threads") = 1,
        "Map (n, 3) int32 Miller indices to gemmi's reciprocal ASU.\n\n"
        "rotations: (m, 3, 3) integer rotation parts (gemmi sym_ops order); basis: (3, 3)\n"
        "reference-setting transform (h_ref = h @ basis, any positive scale); condition: 0-9\n"
        "(xtalscale.grouping.AsuCondition). Returns (asu_hkl (n, 3) int32, isym (n,) int32).\n"
        "n_threads: rows split over up to that many threads (the same results).");
  m.def("map_to_asu_bijvoet", &map_to_asu_bijvoet_py, py::arg("hkl"), py::arg("rotations"), py::arg("basis"),
        py::arg("condition"), py::arg("n_threads") = 1,
        "map_to_asu's ASU indices and, instead of ISYM, each row's Bijvoet-minus flag (an even\n"
        "ISYM of an acentric reflection), in one pass. Returns (asu_hkl (n, 3) int32, minus (n,) bool).");
  m.def("group_keys", &group_keys_py, py::arg("keys"),
        "Stable O(n) grouping of equal int64 keys (LSD radix sort).\n\n"
        "Returns (order, group_index, offsets): the sort permutation, each row's group\n"
        "(groups in increasing key order) and the group start offsets plus n.");
  m.def("counting_order", &counting_order_py, py::arg("keys"), py::arg("n_keys"),
        "Stable order of int64 keys in [0, n_keys) by counting sort, O(n + n_keys).\n\n"
        "Returns (order, offsets): the permutation (a stable argsort) and each key's start\n"
        "in it, n_keys + 1 values ending at n.");
  m.def("split_bijvoet_groups", &split_bijvoet_groups_py, py::arg("order"), py::arg("offsets"), py::arg("keys"),
        py::arg("minus"),
        "group_miller_indices' grouping of the same indices with the rows flagged in minus negated,\n"
        "from the grouping (order, offsets) of the indices and its group keys, without sorting again.\n"
        "Returns (order, offsets).");
  m.def("group_miller_indices", &group_miller_py, py::arg("hkl"), py::arg("n_threads") = 1,
        "Stable O(n) grouping of (n, 3) int32 Miller indices in signed lexicographic\n"
        "(h, k, l) order (DIALS order). Returns (order, group_index, offsets).\n"
        "n_threads: the counting sort's rows split over up to that many threads (the same results).");
}

}  // namespace xtalscale::py_bind
