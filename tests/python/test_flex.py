"""flex array compatibles: constructors, growth, selection, arithmetic, numpy interop."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from xtalscale.array_family import flex


def test_constructors_follow_scitbx():
    assert list(flex.double()) == []
    assert list(flex.double(3)) == [0.0, 0.0, 0.0]
    assert list(flex.int(2, 7)) == [7, 7]
    assert list(flex.bool(2, True)) == [True, True]
    assert list(flex.size_t([1, 2])) == [1, 2]
    assert list(flex.std_string(["a", "bc"])) == ["a", "bc"]
    assert flex.vec3_double(2, (1, 2, 3))[1] == (1.0, 2.0, 3.0)
    assert flex.miller_index([(1, -2, 3)])[0] == (1, -2, 3)
    v = flex.vec3_double(flex.double([1, 2]), flex.double([3, 4]), flex.double([5, 6]))
    assert v[1] == (2.0, 4.0, 6.0)
    assert type(flex.double([1, 2])[0]) is float and type(flex.int([1])[0]) is int
    with pytest.raises(ValueError, match="non-integral"):
        flex.int([1.5])
    with pytest.raises(ValueError, match="outside"):
        flex.size_t([-1])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        flex.vec3_double([(1, 2)])
    with pytest.raises(ValueError, match="non-negative"):
        flex.double(-1)


def test_grid_arrays():
    g = flex.double(flex.grid(3, 2), 0.0)
    assert g.all() == (3, 2) and g.size() == 6 and len(g) == 6  # scitbx: total size
    assert len(list(g)) == 6
    g[1, 1] = 5.0
    assert g[1, 1] == 5.0 and g[0, 1] == 0.0
    h = g * 2.0
    assert isinstance(h, flex.double) and h.all() == (3, 2) and h[1, 1] == 10.0
    assert flex.double(flex.grid(0, 0)).all() == (0, 0)
    with pytest.raises(ValueError, match="grid array"):
        g.append(1.0)
    with pytest.raises(IndexError):
        g[3, 0]


def test_zero_copy_numpy_views_and_wrapping():
    a = np.arange(5.0)
    f = flex.double(a)
    assert np.shares_memory(f.as_numpy_array(), a)  # wraps an existing float64 array
    v = f.as_numpy_array()
    v[0] = 42.0
    assert f[0] == 42.0
    assert np.shares_memory(np.asarray(f), v)
    m = flex.miller_index(np.zeros((4, 3), dtype=np.int32))
    assert m.as_numpy_array().shape == (4, 3)


def test_append_extend_grow_amortised_and_keep_old_views_valid():
    f = flex.double()
    view_before = f.as_numpy_array()
    for i in range(1000):
        f.append(float(i))
    assert len(f) == 1000 and f[999] == 999.0
    assert f._buf.shape[0] < 2100  # geometric growth, not one allocation per append
    assert view_before.shape == (0,)
    f.extend(flex.double([1.0, 2.0]))
    f.extend(np.array([3.0]))
    assert list(f)[-3:] == [1.0, 2.0, 3.0]
    v = flex.vec3_double()
    v.append((1, 2, 3))
    v.extend(flex.vec3_double([(4, 5, 6)]))
    assert list(v) == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)]
    with pytest.raises(ValueError, match="3 components"):
        v.append((1, 2))


def test_select_and_set_selected():
    a = flex.double([10, 20, 30, 40])
    assert list(a.select(flex.bool([True, False, True, False]))) == [10, 30]
    assert list(a.select(flex.size_t([3, 0]))) == [40, 10]
    with pytest.raises(IndexError, match="index 4 out of range for size 4"):
        a.select(flex.size_t([4]))
    with pytest.raises(ValueError, match="bool mask of length 2"):
        a.select(flex.bool([True, False]))
    a.set_selected(a > 25, 0.0)
    assert list(a) == [10, 20, 0, 0]
    a.set_selected(flex.size_t([0, 1]), flex.double([1, 2]))
    assert list(a) == [1, 2, 0, 0]
    a.set_selected(flex.bool([False, True, False, True]), flex.double([7, 8]))
    assert list(a) == [1, 7, 0, 8]
    with pytest.raises(ValueError, match="3 values for 2 selected"):
        a.set_selected(flex.size_t([0, 1]), flex.double([1, 2, 3]))


def test_arithmetic_keeps_flex_types():
    a = flex.double([1.0, 4.0, 9.0])
    b = flex.double([1.0, 2.0, 3.0])
    assert isinstance(a * b, flex.double) and list(a * b) == [1.0, 8.0, 27.0]
    assert list(a / b) == [1.0, 2.0, 3.0]
    assert list(2.0 * b - 1) == [1.0, 3.0, 5.0]
    m = a > 2.0
    assert isinstance(m, flex.bool) and list(m) == [False, True, True]
    assert list(~m) == [True, False, False] and isinstance(~m, flex.bool)
    assert list(m & (b < 3)) == [False, True, False]
    assert m.count(True) == 2 and list(m.iselection()) == [1, 2]
    i = flex.int([1, 2, 3])
    assert isinstance(i + 1, flex.int) and list(i * 2) == [2, 4, 6]
    v = flex.vec3_double([(1, 2, 2), (0, 3, 4)])
    assert list(v.norms()) == [3.0, 5.0]
    w = v * flex.double([2.0, 1.0])  # scitbx: each vector scaled by its own factor
    assert isinstance(w, flex.vec3_double) and w[0] == (2.0, 4.0, 4.0)
    x, y, z = v.parts()
    assert list(x) == [1.0, 0.0] and list(z) == [2.0, 4.0]
    mi = flex.miller_index([(1, 2, 3), (1, 2, 4)])
    assert list(mi == flex.miller_index([(1, 2, 3), (0, 0, 0)])) == [True, False]
    assert isinstance(-mi, flex.miller_index) and (-mi)[0] == (-1, -2, -3)
    assert np.sqrt(a)[2] == 3.0 and isinstance(np.sqrt(a), flex.double)


def test_module_functions():
    a = flex.double([3.0, -1.0, 2.0])
    assert flex.mean(a) == pytest.approx(4.0 / 3.0, rel=1e-15)
    assert flex.min(a) == -1.0 and flex.max(a) == 3.0 and flex.sum(a) == 4.0
    assert list(flex.abs(a)) == [3.0, 1.0, 2.0]
    assert list(flex.sqrt(flex.double([4.0, 9.0]))) == [2.0, 3.0]
    assert flex.exp(flex.double([0.0]))[0] == 1.0
    assert list(flex.pow2(a)) == [9.0, 1.0, 4.0]
    assert flex.sum(flex.bool([True, False, True])) == 2
    with pytest.raises(ValueError, match="empty"):
        flex.mean(flex.double())
    assert list(flex.sort_permutation(flex.double([3, 1, 2, 1]))) == [1, 3, 2, 0]
    # descending keeps ties in input order (stable), as scitbx
    assert list(flex.sort_permutation(flex.double([3, 1, 2, 1]), reverse=True)) == [0, 2, 1, 3]
    assert list(flex.sort_permutation(flex.int([2, 2, 1]), reverse=True)) == [0, 1, 2]


def test_random_selection_is_seeded_and_valid():
    flex.set_random_seed(42)
    s1 = list(flex.random_selection(1000, 50))
    flex.set_random_seed(42)
    s2 = list(flex.random_selection(1000, 50))
    assert s1 == s2 and len(set(s1)) == 50 and s1 == sorted(s1)
    assert all(0 <= i < 1000 for i in s1)
    with pytest.raises(ValueError, match="exceeds"):
        flex.random_selection(3, 4)


def test_copies_pickle_and_truthiness():
    a = flex.double([1, 2])
    b = a.deep_copy()
    b[0] = 9.0
    assert a[0] == 1.0
    c = copy.deepcopy(a)
    assert list(c) == [1.0, 2.0] and not np.shares_memory(c.as_numpy_array(), a.as_numpy_array())
    d = pickle.loads(pickle.dumps(flex.miller_index([(1, 2, 3)])))
    assert isinstance(d, flex.miller_index) and d[0] == (1, 2, 3)
    with pytest.raises(ValueError, match="ambiguous"):
        bool(flex.bool([True]))
    assert a[1:].size() == 1 and not np.shares_memory(a[1:].as_numpy_array(), a.as_numpy_array())


def test_passes_into_cpp_without_copy():
    """A C++ entry point receives the flex buffer itself (its decoded result proves the view)."""
    from xtalscale import _core

    a = flex.int([5, -7, 2**31 - 1])
    enc = _core.refl.encode_base256_column(a, "int")  # accepts flex via __array__
    assert list(_core.refl.decode_base256_column(enc, "int")) == [5, -7, 2**31 - 1]
    d = flex.double([1.0, 2.0, 3.0])
    d.append(4.0)  # over-allocated buffer: the C++ side still sees the live data in place
    addr = d.as_numpy_array().__array_interface__["data"][0]
    assert _core.refl.data_address(d) == addr
    v = flex.vec3_double([(1, 2, 3)])
    assert _core.refl.data_address(v) == v.as_numpy_array().__array_interface__["data"][0]
    # a non-float64 array must be converted (a copy), which shows the check can fail
    i = flex.int([1])
    assert _core.refl.data_address(i) != i.as_numpy_array().__array_interface__["data"][0]


def test_sparse_products_and_grid_rows():
    import scipy.sparse as sp

    m = sp.csc_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    v = flex.double([10.0, 100.0])
    r = v * m  # row vector on the left: (v^T M)_j
    assert isinstance(r, flex.double) and list(r) == [10.0, 300.0, 20.0]
    c = m * flex.double([1.0, 1.0, 1.0])
    assert list(c) == [3.0, 3.0]
    with pytest.raises(ValueError, match="does not match"):
        flex.double(3) * m
    g = flex.double(flex.grid(2, 3), 0.0)
    g[1, 2] = 7.0
    row = g[1, :]
    assert isinstance(row, flex.double) and list(row) == [0.0, 0.0, 7.0]
    row[0] = 5.0  # a copy, as every flex slice
    assert g[1, 0] == 0.0


def test_linear_correlation_and_index_helpers():
    x = flex.double([1.0, 2.0, 3.0, 4.0])
    lc = flex.linear_correlation(x, 2.0 * x + 1.0)
    assert lc.is_well_defined() and lc.coefficient() == pytest.approx(1.0, abs=1e-15)
    assert not flex.linear_correlation(x, flex.double(4, 1.0)).is_well_defined()
    assert (
        flex.first_index(flex.int([3, 1, 3]), 3) == 0
        and flex.last_index(flex.int([3, 1, 3]), 3) == 2
    )
    assert flex.first_index(flex.int([3]), 9) is None


# ----------------------------------------------------------------------------- properties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite, max_size=60), st.booleans())
def test_sort_permutation_is_the_stable_python_sort(xs, reverse):
    perm = list(flex.sort_permutation(flex.double(xs), reverse=reverse))
    assert perm == sorted(range(len(xs)), key=lambda i: xs[i], reverse=reverse)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=60), st.booleans())
def test_sort_permutation_ints(xs, reverse):
    perm = list(flex.sort_permutation(flex.int(xs), reverse=reverse))
    assert perm == sorted(range(len(xs)), key=lambda i: xs[i], reverse=reverse)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.data())
def test_select_and_set_selected_match_numpy(xs, data):
    a = flex.double(xs)
    n = len(xs)
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=10))
    ref = np.array(xs)
    assert list(a.select(flex.bool(mask))) == list(ref[np.array(mask, dtype=bool)])
    assert list(a.select(flex.size_t(idx))) == list(ref[np.array(idx, dtype=np.intp)])
    vals = [float(i) for i in range(sum(mask))]
    a.set_selected(flex.bool(mask), flex.double(vals))
    ref[np.array(mask, dtype=bool)] = vals
    assert list(a) == list(ref)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(finite, max_size=50),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=50),
    st.lists(st.integers(0, 2**64 - 1), max_size=50),
)
def test_base256_round_trip_is_exact(ds, ints, sizes):
    from xtalscale import _core

    for arr, kind in [
        (np.array(ds, dtype=np.float64), "double"),
        (np.array(ints, dtype=np.int32), "int"),
        (np.array(sizes, dtype=np.uint64), "size_t"),
    ]:
        back = _core.refl.decode_base256_column(_core.refl.encode_base256_column(arr, kind), kind)
        # bit-exact except the sign of zero, which scitbx does not store
        assert np.array_equal(back, arr + 0) and back.dtype == arr.dtype


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite), max_size=30))
def test_append_one_by_one_equals_bulk_construction(vs):
    a = flex.vec3_double()
    for v in vs:
        a.append(v)
    assert list(a) == list(flex.vec3_double(vs)) == [tuple(v) for v in vs]


def test_flumpy_bridge_shares_memory():
    from xtalscale.util import flumpy

    a = np.arange(4.0)
    f = flumpy.from_numpy(a)
    assert isinstance(f, flex.double) and np.shares_memory(flumpy.to_numpy(f), a)
    assert isinstance(flumpy.from_numpy(np.array([1, 2], dtype=np.int32)), flex.int)
    assert isinstance(flumpy.from_numpy(np.array([True])), flex.bool)
    assert flumpy.from_numpy(np.zeros((2, 3))).all() == (2, 3)  # grid double
    v = np.ones((5, 3))
    assert isinstance(flumpy.vec_from_numpy(v), flex.vec3_double)
    assert np.shares_memory(flumpy.vec_from_numpy(v).as_numpy_array(), v)
    mi = flumpy.miller_index_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    assert mi[0] == (1, 2, 3)
    with pytest.raises(ValueError, match="outside"):
        flumpy.miller_index_from_numpy(np.array([[2**40, 0, 0]]))
    assert flumpy.mat3_from_numpy(np.eye(3)[None]).as_numpy_array().shape == (1, 9)
    with pytest.raises(TypeError, match="expected a flex array"):
        flumpy.to_numpy(np.zeros(2))


def test_flex_from_flex_copies_and_read_only_input_is_copied():
    a = flex.double([1.0, 2.0])
    b = flex.double(a)
    b[0] = 5.0
    assert a[0] == 1.0  # scitbx: constructing from a flex array copies
    ro = np.frombuffer(np.arange(3.0).tobytes())
    assert not ro.flags.writeable
    f = flex.double(ro)
    f[0] = 7.0  # writable copy
    assert ro[0] == 0.0 and f[0] == 7.0
    t = flex.reflection_table()
    t["x"] = ro
    t["x"][1] = 3.0
    assert t["x"][1] == 3.0


def test_numpy_style_conveniences_return_numpy():
    a = flex.double([3.0, 1.0, 2.0])
    assert a.max() == 3.0 and a.mean() == 2.0 and list(a.argsort()) == [1, 2, 0]
    assert a.astype(np.int32).dtype == np.int32 and a.tolist() == [3.0, 1.0, 2.0]
    assert a.all() == (3,)  # scitbx meaning is kept
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        getattr(a, "frobnicate")  # noqa: B009


def test_grid_matrix_helpers():
    j = flex.double(flex.grid(3, 2), 0.0)
    for i in range(3):
        j[i, 0] = float(i + 1)
        j[i, 1] = 1.0
    jtj = j.matrix_transpose().matrix_multiply(j)
    assert jtj.all() == (2, 2)
    assert [jtj[0, 0], jtj[0, 1], jtj[1, 1]] == [14.0, 6.0, 3.0]
    assert list(j.matrix_multiply(flex.double([1.0, -1.0]))) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="do not match"):
        j.matrix_multiply(flex.double([1.0, 2.0, 3.0]))


def test_take_rows_is_numpy_row_indexing():
    """take_rows (np.take / compress along the rows, ~5x faster than numpy's fancy and boolean
    indexing of (n, 3) arrays) gives array[selection] for masks, indices (negative too) and an
    empty selection, and refuses a mask of the wrong length or an index out of range."""
    from xtalscale._rows import take_rows

    rng = np.random.default_rng(2)
    a = rng.integers(-9, 10, (50, 3)).astype(np.int32)
    mask = rng.random(50) < 0.5
    idx = np.array([4, 0, -1, 4, 17])
    for sel in (mask, idx, np.zeros(0, np.int64), np.zeros(50, bool)):
        out = take_rows(a, sel)
        np.testing.assert_array_equal(out, a[sel])
        assert out.dtype == a.dtype and out.shape == a[sel].shape
    with pytest.raises(IndexError):
        take_rows(a, mask[:-1])
    with pytest.raises(IndexError):
        take_rows(a, [50])
