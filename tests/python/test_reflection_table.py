"""reflection_table: columns, rows, selection, flags (DIALS bit values), identifiers."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from xtalscale.array_family import flex

DATA = Path(__file__).resolve().parents[1] / "data"
F = flex.reflection_table.flags


def _table() -> flex.reflection_table:
    t = flex.reflection_table()
    t["id"] = flex.int([0, 1, 0, 1])
    t["intensity.sum.value"] = flex.double([4.0, 3.0, 2.0, 1.0])
    t["miller_index"] = flex.miller_index([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
    t["flags"] = flex.size_t(4, 0)
    t.experiment_identifiers()[0] = "e0"
    t.experiment_identifiers()[1] = "e1"
    return t


def test_dials_flag_values():
    # dials/array_family/reflection_table.h (enum Flags)
    expected = {
        "predicted": 1,
        "observed": 2,
        "indexed": 4,
        "used_in_refinement": 8,
        "strong": 32,
        "reference_spot": 64,
        "dont_integrate": 128,
        "integrated_sum": 256,
        "integrated_prf": 512,
        "integrated": 768,
        "overloaded": 1024,
        "overlapped_bg": 2048,
        "overlapped_fg": 4096,
        "in_powder_ring": 8192,
        "foreground_includes_bad_pixels": 16384,
        "background_includes_bad_pixels": 32768,
        "includes_bad_pixels": 49152,
        "bad_shoebox": 64512,
        "bad_spot": 64512,
        "used_in_modelling": 65536,
        "centroid_outlier": 131072,
        "failed_during_background_modelling": 262144,
        "failed_during_summation": 524288,
        "failed_during_profile_fitting": 1048576,
        "bad_reference": 2097152,
        "user_excluded_in_scaling": 4194304,
        "outlier_in_scaling": 8388608,
        "excluded_for_scaling": 16777216,
        "bad_for_scaling": 29360128,
        "excluded_for_refinement": 33554432,
        "bad_for_refinement": 33685504,
        "scaled": 67108864,
    }
    for name, value in expected.items():
        assert int(getattr(F, name)) == value, name


def test_numpy_columns_are_wrapped_by_dtype_without_copy():
    t = flex.reflection_table()
    d = np.arange(3.0)
    t["d"] = d
    t["v"] = np.zeros((3, 3))
    t["hkl"] = np.zeros((3, 3), dtype=np.int32)
    t["i"] = np.array([1, 2, 3], dtype=np.int32)
    t["b"] = np.array([True, False, True])
    t["s"] = np.array([1, 2, 3], dtype=np.uint64)
    t["names"] = np.array(["x", "y", "z"])
    assert t.keys() == ["b", "d", "hkl", "i", "names", "s", "v"]  # sorted, as DIALS
    kinds = {k: type(t[k]) for k in t.keys()}
    assert kinds == {
        "d": flex.double,
        "v": flex.vec3_double,
        "hkl": flex.miller_index,
        "i": flex.int,
        "b": flex.bool,
        "s": flex.size_t,
        "names": flex.std_string,
    }
    assert np.shares_memory(t["d"].as_numpy_array(), d)
    t["d"].as_numpy_array()[0] = 5.0  # the column is the table's storage
    assert t["d"][0] == 5.0 and len(t) == 3
    with pytest.raises(ValueError, match="column 'bad' has 2 rows but the table has 3"):
        t["bad"] = flex.double(2)
    with pytest.raises(TypeError, match="no flex type"):
        t["c"] = np.zeros(3, dtype=np.complex128)
    with pytest.raises(KeyError, match="no column 'nope'"):
        t["nope"]
    del t["d"]
    assert "d" not in t
    with pytest.raises(KeyError):
        del t["d"]


def test_rows_select_and_set_selected():
    t = _table()
    assert t[1] == {"id": 1, "intensity.sum.value": 3.0, "miller_index": (0, 1, 0), "flags": 0}
    s = t.select(t["intensity.sum.value"] > 2.5)
    assert len(s) == 2 and list(s["id"]) == [0, 1]
    assert s.experiment_identifiers().as_dict() == {0: "e0", 1: "e1"}
    s2 = t.select(flex.size_t([3, 0]))
    assert list(s2["intensity.sum.value"]) == [1.0, 4.0]
    cols = t.select(["id", "flags"])
    assert cols.keys() == ["flags", "id"] and len(cols) == 4  # DIALS (std::map) order
    new = s2.copy()
    new["intensity.sum.value"] = flex.double([10.0, 40.0])
    t.set_selected(flex.size_t([3, 0]), new)
    assert list(t["intensity.sum.value"]) == [40.0, 3.0, 2.0, 10.0]
    with pytest.raises(ValueError, match="2 rows for 1 selected"):
        t.set_selected(flex.size_t([0]), new)
    with pytest.raises(IndexError, match="index 9"):
        t.select(flex.size_t([9]))


def test_extend_sort_reorder_copy():
    t = _table()
    u = _table()
    u["extra"] = flex.double(4, 1.5)
    t.extend(u)
    assert len(t) == 8 and list(t["extra"]) == [0.0] * 4 + [1.5] * 4
    t.sort("intensity.sum.value")
    assert list(t["intensity.sum.value"]) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    # stable: the row from the first table comes before its copy
    assert list(t["extra"])[:2] == [0.0, 1.5]
    t.sort("intensity.sum.value", reverse=True)
    assert list(t["intensity.sum.value"])[:2] == [4.0, 4.0] and list(t["extra"])[:2] == [0.0, 1.5]
    t.sort("miller_index")
    assert t["miller_index"][0] == (0, 0, 1) and t["miller_index"][-1] == (1, 1, 1)
    c = t.copy()
    c["id"][0] = 99
    assert t["id"][0] != 99
    d = copy.deepcopy(t)
    assert d.experiment_identifiers() == t.experiment_identifiers()
    t.reorder(flex.size_t(list(range(7, -1, -1))))
    assert t["miller_index"][-1] == (0, 0, 1)
    with pytest.raises(ValueError, match="not a permutation"):
        t.reorder(flex.size_t([0] * 8))


def test_flags_get_set_unset():
    t = _table()
    t.set_flags(flex.bool([True, True, False, False]), F.integrated_sum)
    t.set_flags(flex.size_t([1, 2]), F.outlier_in_scaling)
    assert list(t["flags"]) == [256, 256 | 8388608, 8388608, 0]
    assert list(t.get_flags(F.integrated_sum)) == [True, True, False, False]
    assert list(t.get_flags(F.bad_for_scaling)) == [False, False, False, False]  # all bits
    assert list(t.get_flags(F.bad_for_scaling, all=False)) == [False, True, True, False]
    t.unset_flags(flex.size_t([1]), F.outlier_in_scaling)
    assert list(t["flags"]) == [256, 256, 8388608, 0]
    with pytest.raises(ValueError, match="bool mask of length 3"):
        t.set_flags(flex.bool([True] * 3), F.scaled)
    with pytest.raises(KeyError, match="flags"):
        flex.reflection_table().get_flags(F.scaled)


def test_split_by_experiment_id_and_identifier_checks():
    t = _table()
    parts = t.split_by_experiment_id()
    assert [len(p) for p in parts] == [2, 2]
    assert parts[1].experiment_identifiers().as_dict() == {1: "e1"}
    assert list(parts[1]["intensity.sum.value"]) == [3.0, 1.0]
    t.assert_experiment_identifiers_are_consistent()

    class Expt:
        def __init__(self, identifier):
            self.identifier = identifier

    t.assert_experiment_identifiers_are_consistent([Expt("e0"), Expt("e1")])
    with pytest.raises(ValueError, match="identifier for id 1 is 'e1' but experiment 1 has 'x'"):
        t.assert_experiment_identifiers_are_consistent([Expt("e0"), Expt("x")])
    sel = t.select(Expt("e1"))
    assert len(sel) == 2 and sel.experiment_identifiers().as_dict() == {1: "e1"}


def test_concat_joins_each_column_once_and_can_consume_its_inputs():
    """concat equals repeated extend (missing columns zero-filled, identifiers merged); with
    consume the inputs are emptied as their columns are joined."""
    a, b, c = _table(), _table(), _table()
    del b["intensity.sum.value"]
    c["extra"] = flex.double([1.0, 2.0, 3.0, 4.0])
    expected = a.copy()
    expected.extend(b)
    expected.extend(c)
    for consume, threads in ((False, 1), (True, 1), (False, 2), (True, 3)):
        parts = [a.copy(), b.copy(), c.copy()]
        joined = flex.reflection_table.concat(parts, consume=consume, n_threads=threads)
        assert len(joined) == 12 and list(joined.keys()) == list(flex.reflection_table.concat([a, b, c]).keys())
        assert sorted(joined.keys()) == sorted(expected.keys())
        for k in expected.keys():
            np.testing.assert_array_equal(np.asarray(joined[k]), np.asarray(expected[k]))
        assert joined.experiment_identifiers().as_dict() == expected.experiment_identifiers().as_dict()
        assert all(len(p) == (0 if consume else 4) for p in parts)
    bad = _table()
    bad["extra"] = flex.int([1, 2, 3, 4])
    with pytest.raises(TypeError, match="types differ"):
        flex.reflection_table.concat([c, bad])
    with pytest.raises(ValueError, match="n_threads"):
        flex.reflection_table.concat([a, b], n_threads=0)


def test_assign_flags_sets_the_mask_and_clears_the_rest():
    """assign_flags = unset_flags on every row then set_flags on the mask (other bits kept;
    a table without flags gets the column); a mask of the wrong length or dtype is refused."""
    t = _table()
    t.set_flags(flex.bool([True, False, True, False]), F.scaled)
    t.set_flags(flex.bool([True, True, False, False]), F.outlier_in_scaling)
    expected = t.copy()
    mask = np.array([False, True, True, False])
    expected.unset_flags(flex.bool([True] * 4), F.scaled)
    expected.set_flags(flex.bool(mask.tolist()), F.scaled)
    t.assign_flags(mask, F.scaled)
    np.testing.assert_array_equal(np.asarray(t["flags"]), np.asarray(expected["flags"]))
    bare = flex.reflection_table()
    bare["id"] = flex.int([0, 0])
    bare.assign_flags(np.array([True, False]), F.scaled)
    assert list(bare.get_flags(F.scaled)) == [True, False]
    with pytest.raises(ValueError, match="bool array of 4 rows"):
        t.assign_flags(mask[:3], F.scaled)
    with pytest.raises(ValueError, match="bool array"):
        t.assign_flags(mask.astype(int), F.scaled)


def test_split_by_experiment_id_without_copies():
    """copy=False: rows ordered by id give views (a change shows in the whole table); unordered
    ids are copied as with copy=True, and both give the same parts."""
    t = _table()
    ordered = t.select(flex.size_t(list(np.argsort(np.asarray(t["id"]), kind="stable"))))
    views = ordered.split_by_experiment_id(copy=False)
    copies = ordered.split_by_experiment_id()
    for v, c in zip(views, copies):
        assert v.experiment_identifiers().as_dict() == c.experiment_identifiers().as_dict()
        for k in c.keys():
            np.testing.assert_array_equal(np.asarray(v[k]), np.asarray(c[k]))
    views[1].set_flags(flex.bool([True, True]), F.scaled)
    assert list(ordered.get_flags(F.scaled)) == [False, False, True, True]
    copies[0].set_flags(flex.bool([True, True]), F.outlier_in_scaling)
    assert not any(ordered.get_flags(F.outlier_in_scaling))
    assert list(t["id"]) == [0, 1, 0, 1]  # unordered: copied even with copy=False
    parts = t.split_by_experiment_id(copy=False)
    parts[0].set_flags(flex.bool([True, True]), F.outlier_in_scaling)
    assert not any(t.get_flags(F.outlier_in_scaling))


@pytest.mark.parametrize(
    "path",
    [
        DATA / "dials_quartz_3ded" / "scaled.refl",  # msgpack
        DATA / "dials_l_cysteine_integrated" / "20_integrated.pickle",  # legacy, with shoeboxes
    ],
)
def test_real_table_memory_close_to_raw_column_bytes(path):
    flex.reflection_table.from_file(path)  # warm up: lazy imports are not table memory
    tracemalloc.start()
    t = flex.reflection_table.from_file(path)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    raw = sum(c.as_numpy_array().nbytes for _, c in t.cols())
    # numpy reports its buffers to tracemalloc; the Python objects add a few kB on top
    # (measured 1.03x); skipped shoebox bytes must not be kept.
    assert raw <= current <= 1.2 * raw, (current, raw)
    if path.suffix == ".refl":  # msgpack blobs go straight into the columns
        assert peak <= 1.2 * raw, (peak, raw)


def test_msgpack_bytes_round_trip_concat_and_strings(tmp_path):
    t = _table()
    t["label"] = flex.std_string(["a", "b", "", "d"])
    back = flex.reflection_table.from_msgpack(t.as_msgpack())
    assert back.keys() == sorted(t.keys())
    assert list(back["label"]) == ["a", "b", "", "d"]
    assert back.experiment_identifiers().as_dict() == {0: "e0", 1: "e1"}
    both = flex.reflection_table.concat([t, t])
    assert len(both) == 8 and list(both["label"])[4:] == ["a", "b", "", "d"]
    assert len(t) == 4  # concat does not modify its inputs


def test_failed_write_leaves_no_file(tmp_path):
    t = _table()
    t["weird"] = flex.double(4)
    t._cols["weird"] = flex.grid  # not a flex array: the writer must refuse it cleanly
    out = tmp_path / "x.refl"
    with pytest.raises((TypeError, AttributeError)):
        t.as_file(out)
    assert list(tmp_path.iterdir()) == []


def test_compute_d_uses_each_experiments_unit_cell():
    class Cell:
        def __init__(self, a):
            self.a = a

        def d(self, hkl):  # cubic cell
            h = np.asarray(hkl, dtype=float)
            return self.a / np.sqrt((h * h).sum(axis=1))

    class Crystal:
        def __init__(self, a):
            self._cell = Cell(a)

        def get_unit_cell(self):
            return self._cell

    class Expt:
        def __init__(self, a):
            self.crystal = Crystal(a)

    t = _table()
    t.compute_d([Expt(10.0), Expt(20.0)])
    assert list(t["d"]) == pytest.approx([10.0, 20.0, 10.0, 20.0 / np.sqrt(3.0)], rel=1e-15)


def test_row_assignment():
    t = _table()
    t[2] = {"intensity.sum.value": 9.5, "miller_index": (3, 3, 3)}
    assert t[2]["intensity.sum.value"] == 9.5 and t[2]["miller_index"] == (3, 3, 3)
    with pytest.raises(KeyError, match="no columns"):
        t[0] = {"nope": 1.0}
    with pytest.raises(IndexError, match="row 4 out of range"):
        t[4] = {"id": 0}
    with pytest.raises(ValueError, match="3 components"):
        t[0] = {"miller_index": (1, 2)}


def test_identifier_housekeeping():
    t = _table()
    t["id"] = flex.int([0, 5, 0, 5])
    t.experiment_identifiers()[5] = "e5"
    del t.experiment_identifiers()[1]
    t.reset_ids()
    assert list(t["id"]) == [0, 1, 0, 1]
    assert t.experiment_identifiers().as_dict() == {0: "e0", 1: "e5"}
    r = t.remove_on_experiment_identifiers(["e0"])
    assert list(r["id"]) == [1, 1] and r.experiment_identifiers().as_dict() == {1: "e5"}
    with pytest.raises(KeyError, match="not in the table"):
        t.remove_on_experiment_identifiers(["zz"])
    t.experiment_identifiers()[7] = "unused"
    t.clean_experiment_identifiers_map()
    assert t.experiment_identifiers().keys() == [0, 1]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-3, 3)), max_size=40), st.booleans())
def test_sort_split_and_extend_invariants(rows, reverse):
    t = flex.reflection_table()
    t["id"] = flex.int([r[0] for r in rows])
    t["key"] = flex.double([float(r[1]) for r in rows])
    t["row"] = flex.size_t(list(range(len(rows))))
    for i in range(5):
        t.experiment_identifiers()[i] = f"x{i}"
    s = t.copy()
    s.sort("key", reverse=reverse)
    expect = sorted(range(len(rows)), key=lambda i: rows[i][1], reverse=reverse)
    assert list(s["row"]) == expect  # stable in both directions
    parts = t.split_by_experiment_id()
    assert sum(len(p) for p in parts) == len(rows)
    for p in parts:
        ids = set(p["id"])
        assert len(ids) == 1
        (i,) = ids
        assert p.experiment_identifiers().as_dict() == {i: f"x{i}"}
        assert list(p["row"]) == [j for j, r in enumerate(rows) if r[0] == i]  # order kept
    joined = flex.reflection_table.concat(parts) if parts else flex.reflection_table()
    assert sorted(joined["row"]) == list(range(len(rows))) if rows else len(joined) == 0


def test_pickle_keeps_every_column_type():
    import pickle

    t = _table()
    t["v2"] = flex.vec2_double(4, (1.0, 2.0))
    t["m3"] = flex.mat3_double(4, tuple(range(9)))
    t["bbox"] = flex.int6(4, (0, 1, 2, 3, 4, 5))
    t["s"] = flex.std_string(["a", "b", "c", "d"])
    t["b"] = flex.bool(4, True)
    back = pickle.loads(pickle.dumps(t))
    assert back.keys() == t.keys() and len(back) == 4
    for k in t.keys():
        assert type(back[k]) is type(t[k]), k
        assert list(back[k]) == list(t[k]), k
    assert back.experiment_identifiers() == t.experiment_identifiers()
