"""Gaussian smoothers: DIALS parity (spec section 3 and 9.1), properties, API forms, bad input.

Parity numbers are DIALS's own (marked [verified] in the spec where they were checked against a
DIALS build); the tolerance 1e-12 allows the few-ulp difference of the product-form weights.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtalscale import dials_refinement_helpers_ext as ext
from xtalscale.algorithms.refinement.parameterisation.scan_varying_model_parameters import (
    GaussianSmoother as RefinementGaussianSmoother,
)
from xtalscale.algorithms.scaling.model.components.smooth_scale_components import (
    GaussianSmoother1D,
    GaussianSmoother2D,
    GaussianSmoother3D,
)
from xtalscale.smoothing import SparseVector, ValueWeight, WeightMatrix, nparam_to_val

TOL = 1e-12


# ------------------------------------------------------------------------------- parity: 1D
@pytest.mark.parametrize(
    "x_range, n, n_values, positions, sigma, spacing",
    [
        ((0, 10), 10, 12, [i - 0.5 for i in range(12)], 0.7, 1.0),
        ((0, 2), 2, 3, [0.0, 1.0, 2.0], 0.7, 1.0),
        ((0, 1), 1, 2, [0.0, 1.0], 0.65, 1.0),
        ((1, 100), 5, 7, [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5], 0.7, 19.8),
    ],
)
def test_1d_construction(x_range, n, n_values, positions, sigma, spacing):
    s = GaussianSmoother1D(x_range, n)
    assert s.num_values() == n_values
    assert s.num_samples() == n
    assert s.positions() == positions
    assert s.sigma() == pytest.approx(sigma, abs=TOL)
    assert s.spacing() == pytest.approx(spacing, abs=TOL)


def test_1d_spec_9_1_num_average_and_single_equals_multi():
    s = ext.GaussianSmoother((1, 100), 5)
    assert s.num_average() == 3
    assert s.positions() == [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    p = np.array([1.0, 2.0, 1.5, 3.0, 2.5, 1.0, 4.0])
    x = np.array([1.0, 10.9, 50.5, 99.0, 100.0])
    value, weight, sumweight = s.multi_value_weight(x, p)
    for k, xk in enumerate(x):
        v, w, sw = s.value_weight(xk, p)
        assert v == value[k]
        assert sw == sumweight[k]
        np.testing.assert_array_equal(w.as_dense_vector(), weight.toarray()[k])


@pytest.mark.parametrize(
    "z, window", [(0.0, [0, 1]), (0.5, [0, 1, 2]), (1.0, [0, 1, 2]), (1.5, [1, 2, 3]),
                  (9.5, [9, 10, 11]), (10.0, [10, 11])])
def test_window_rounds_half_away_from_zero(z, window):
    # (0, 10) in 10 intervals: spacing 1, so x == z; 12 values, naverage 3 (spec 3.2 [verified])
    _, w, _ = GaussianSmoother1D((0, 10), 10).value_weight(z, np.zeros(12))
    assert w.indices.tolist() == window


def test_1d_value_weight_verified_numbers():
    r = GaussianSmoother1D((0, 10), 10).value_weight(0.5, list(range(12)))
    assert isinstance(r, ValueWeight) and isinstance(r.get_weight(), SparseVector)
    assert r.get_value() == pytest.approx(1.0, abs=TOL)
    assert r.get_sumweight() == pytest.approx(1.259845216610119, abs=TOL)
    w = r.get_weight()
    assert w.size == 12 and w.non_zeroes == 3
    for j, expected in enumerate([0.12992260830505953, 1.0, 0.12992260830505953, 0.0]):
        assert w[j] == pytest.approx(expected, abs=TOL)
    assert w[-1] == 0.0
    # DIALS's operations per weight: a symmetric window has equal weights, the centre is 1
    assert w[0] == w[2] and w[1] == 1.0


def test_first_fixed_verified_numbers():
    s = GaussianSmoother1D((0, 3), 3)
    p = [1.0, 2.0, 3.0, 4.0, 5.0]
    value, weight, sumweight = s.multi_value_weight_first_fixed([0.0, 1.2, 2.9], p)
    np.testing.assert_allclose(value, [1.5, 2.7271605265578374, 4.378333884157964],
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(sumweight,
                               [1.200746082396809, 1.231864988279242, 1.2193901980735347],
                               rtol=0, atol=TOL)
    assert weight.shape == (3, 4)
    full = s.multi_value_weight([0.0, 1.2, 2.9], p)[1].toarray()
    # w_j sits in column j-1; w_0 is dropped from the matrix but kept in value and sumweight
    np.testing.assert_array_equal(weight.toarray(), full[:, 1:])
    assert weight[0, 0] == pytest.approx(math.exp(-((0.5 / 0.7) ** 2)), abs=TOL)
    # single point: the intended layout (DIALS's C++ also writes a stray w_j at j)
    v, w, sw = s.value_weight_first_fixed(1.2, p)
    assert v == pytest.approx(value[1], abs=TOL) and sw == pytest.approx(sumweight[1], abs=TOL)
    assert w.size == 4
    np.testing.assert_array_equal(w.as_dense_vector(), weight.toarray()[1])


# ------------------------------------------------------------------------------- parity: 2D/3D
def test_2d_spec_example():
    gs = GaussianSmoother2D([0, 1], 1, [0, 4], 4)
    assert (gs.num_x_values(), gs.num_y_values()) == (2, 6)
    assert (gs.num_x_average(), gs.num_y_average()) == (2, 3)
    assert gs.sigma() == 0.65
    p = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 6.0, 6.0]
    value, weight, sumw = gs.multi_value_weight([0.5, 0.25], [1.0, 0.75], p)
    assert isinstance(weight, WeightMatrix)
    assert weight.non_zeroes == 12
    s2 = 0.65**2
    expected_sumw = 2 * math.exp(-2.5 / s2) + 4 * math.exp(-0.5 / s2)
    expected_value = (10 * math.exp(-0.5 / s2) + 2 * math.exp(-2.5 / s2)) / expected_sumw
    assert sumw[0] == pytest.approx(expected_sumw, abs=TOL)
    assert value[0] == pytest.approx(expected_value, abs=TOL)
    v, w, _sw = gs.value_weight(0.5, 1.0, p)
    assert w.non_zeroes == 6
    assert v == pytest.approx(expected_value, abs=TOL)
    # x fastest: weight of value (i=1, j=2) at flat index 1 + 2*2 = 5
    assert weight[0, 5] == pytest.approx(math.exp(-(0.25 + 0.25) / s2), abs=TOL)


@pytest.mark.parametrize("args, values, averages", [
    (([0, 2], 2, [0, 4], 4), (3, 6), (3, 3)),
    (([0, 4], 4, [0, 5], 5), (6, 7), (3, 3)),
])
def test_2d_other_configurations(args, values, averages):
    gs = GaussianSmoother2D(*args)
    assert (gs.num_x_values(), gs.num_y_values()) == values
    assert (gs.num_x_average(), gs.num_y_average()) == averages


def test_3d_spec_example():
    gs = GaussianSmoother3D([0, 1], 1, [0, 3], 3, [0, 1], 1)
    assert (gs.num_x_values(), gs.num_y_values(), gs.num_z_values()) == (2, 5, 2)
    assert (gs.num_x_average(), gs.num_y_average(), gs.num_z_average()) == (2, 3, 2)
    assert gs.sigma() == 0.65
    p = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0] * 2
    value, weight, sumw = gs.multi_value_weight([0.5, 0.25], [1.0, 0.75], [0.5, 0.25], p)
    assert weight.non_zeroes == 24
    s2 = 0.65**2
    expected_sumw = 4 * math.exp(-2.75 / s2) + 8 * math.exp(-0.75 / s2)
    expected_value = (20 * math.exp(-0.75 / s2) + 4 * math.exp(-2.75 / s2)) / expected_sumw
    assert sumw[0] == pytest.approx(expected_sumw, abs=TOL)
    assert value[0] == pytest.approx(expected_value, abs=TOL)
    v, w, _sw = gs.value_weight(0.5, 1.0, 0.5, p)
    assert w.non_zeroes == 12
    assert v == pytest.approx(expected_value, abs=TOL)
    gs = GaussianSmoother3D([0, 1], 1, [0, 2], 2, [0, 3], 3)
    assert (gs.num_x_values(), gs.num_y_values(), gs.num_z_values()) == (2, 3, 5)
    assert (gs.num_x_average(), gs.num_y_average(), gs.num_z_average()) == (2, 3, 3)


def test_nparam_to_val():
    assert [nparam_to_val(n) for n in (2, 3, 5, 6)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="n_params"):
        nparam_to_val(1)


# ------------------------------------------------------------------------------- API forms
def test_seed_constructor_forms_count_values():
    s1 = GaussianSmoother1D(20, (0.0, 100.0))
    assert s1.n_parameters == 20 and s1.num_samples() == 18
    s1k = GaussianSmoother1D(n_parameters=3, value_range=(0, 1))
    assert s1k.num_values() == 3
    s2 = GaussianSmoother2D(5, 3, (0, 1), (0, 2))
    assert (s2.num_x_values(), s2.num_y_values(), s2.n_parameters) == (5, 3, 15)
    s3 = GaussianSmoother3D(2, 3, 6, (0, 1), (0, 2), (0, 3))
    assert (s3.num_x_values(), s3.num_y_values(), s3.num_z_values()) == (2, 3, 6)
    with pytest.raises(ValueError, match="n_parameters=4"):
        GaussianSmoother1D(4, (0, 1))
    with pytest.raises(ValueError, match="n_y_params"):
        GaussianSmoother2D(3, 1, (0, 1), (0, 1))
    with pytest.raises(TypeError):
        GaussianSmoother1D("a", 3)


def test_seed_stateful_calls_and_error_propagation():
    s = GaussianSmoother1D(5, (0.0, 3.0))  # 3 intervals, as GaussianSmoother1D((0, 3), 3)
    p = [1.0, 2.0, 3.0, 4.0, 5.0]
    esd = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    s.set_parameters(p)
    values, errors = s.value_error_for_location([0.0, 1.2, 2.9])
    np.testing.assert_array_equal(errors, 0.0)  # no esds stored yet
    np.testing.assert_allclose(values, [1.5, 2.7271605265578374, 4.378333884157964], atol=TOL)
    s.set_parameter_esds(esd)
    values, errors = s.value_error_for_location([0.0, 1.2, 2.9])
    _, weight, sumweight = s.multi_value_weight([0.0, 1.2, 2.9])
    dvdp = weight.toarray() / sumweight[:, None]
    np.testing.assert_allclose(errors, np.sqrt((dvdp**2) @ esd**2), rtol=1e-14)
    # x = 0 sits midway between values 0 and 1: sigma_v = sqrt(0.1^2 + 0.2^2) / 2
    assert errors[0] == pytest.approx(math.sqrt(0.01 + 0.04) / 2, abs=TOL)
    r = s.value_weight(1.2)
    assert r.get_value() == pytest.approx(2.7271605265578374, abs=TOL)
    assert r.get_weight()[1] > 0
    s2 = GaussianSmoother2D(2, 3, (0, 1), (0, 2))
    s2.set_parameters(np.arange(6.0))
    v_rows, _ = s2.value_error_for_location([[0.5, 1.0], [0.1, 0.2], [1.0, 2.0]])
    v_cols, _ = s2.value_error_for_location(np.array([[0.5, 0.1, 1.0], [1.0, 0.2, 2.0]]))
    np.testing.assert_array_equal(v_rows, v_cols)
    assert s2.value_weight((0.5, 1.0)).get_value() == v_rows[0]


def test_refinement_smoother_accepts_parameter_sets_and_flex_like_inputs():
    class ParamSet:  # a ScanVaryingParameterSet-like object
        value = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)

    class FlexLike:  # numpy-backed, as xtalscale.array_family.flex arrays
        def __init__(self, a):
            self._a = np.asarray(a, dtype=float)

        def __array__(self, dtype=None, copy=None):
            return self._a

    s = RefinementGaussianSmoother((1, 100), 5)
    v, _w, sw = s.value_weight(50.5, ParamSet())
    ref = GaussianSmoother1D((1, 100), 5).value_weight(50.5, ParamSet.value)
    assert (v, sw) == (ref[0], ref[2])
    values, weight, _ = s.multi_value_weight(FlexLike([1.0, 50.5]), ParamSet())
    assert values[1] == v and weight.n_rows == 2 and weight.n_cols == 7


def test_zero_copy_numpy_results_and_scipy_interop():
    s = GaussianSmoother1D((0, 50), 50)
    x = np.linspace(0, 50, 1001)
    value, weight, sumweight = s.multi_value_weight(x, np.ones(52))
    assert value.dtype == np.float64 and value.flags.c_contiguous
    assert weight.indices.dtype == np.int32 and weight.has_sorted_indices
    np.testing.assert_allclose(value, 1.0, rtol=1e-15)  # constant parameters -> constant value
    np.testing.assert_allclose(weight @ np.ones(52), sumweight, rtol=1e-15)
    assert weight[3, 0] == weight.toarray()[3, 0]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: GaussianSmoother1D((0, 10), 0), "num_intervals"),
    (lambda: GaussianSmoother1D((0, 10), -2), "num_intervals"),
    (lambda: GaussianSmoother1D((10, 0), 5), "x_range"),
    (lambda: GaussianSmoother1D((1, 1), 5), "x_range"),
    (lambda: GaussianSmoother1D((0, float("nan")), 5), "x_range"),
    (lambda: GaussianSmoother1D(5, (3, 1)), "value_range"),
    (lambda: GaussianSmoother2D([0, 1], 1, [4, 0], 4), "y_range"),
    (lambda: GaussianSmoother3D([0, 1], 1, [0, 4], 4, [0, 1], 0), "nz"),
    (lambda: GaussianSmoother1D((0, 10), 10).set_smoothing(0, -1), "num_average"),
    (lambda: GaussianSmoother1D((0, 10), 10).set_smoothing(6, -1), "num_average"),
    (lambda: GaussianSmoother1D((0, 10), 10).set_smoothing(3, 0.0), "sigma"),
    (lambda: GaussianSmoother1D((0, 10), 10).value_weight(1.0, np.ones(11)), "values"),
    (lambda: GaussianSmoother1D((0, 10), 10).multi_value_weight([1.0, 2.0], np.ones(13)),
     "values"),
    (lambda: GaussianSmoother1D((0, 10), 10).value_weight(float("nan"), np.ones(12)), "x"),
    (lambda: GaussianSmoother1D((0, 10), 10).multi_value_weight([1.0, np.inf], np.ones(12)),
     "x must be finite"),
    (lambda: GaussianSmoother2D([0, 1], 1, [0, 4], 4).multi_value_weight(
        [0.5, 0.2, 0.1], [1.0, 2.0], np.ones(12)), "x and y"),
    (lambda: GaussianSmoother3D([0, 1], 1, [0, 3], 3, [0, 1], 1).multi_value_weight(
        [0.5], [1.0], [0.5, 0.1], np.ones(20)), "x and z"),
    (lambda: GaussianSmoother2D([0, 1], 1, [0, 4], 4).multi_value_weight(
        [0.5], [np.nan], np.ones(12)), "y must be finite"),
    (lambda: GaussianSmoother1D((0, 10), 10).value_weight(1.0), "set_parameters"),
    (lambda: GaussianSmoother1D((0, 10), 10).set_parameters(np.ones(3)), "values"),
    (lambda: GaussianSmoother1D((0, 10), 10).set_parameter_esds(np.ones(3)), "esds"),
])
def test_bad_input_raises_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------- properties
@st.composite
def smoother_case(draw):
    dim = draw(st.integers(1, 3))
    ranges, counts = [], []
    for _ in range(dim):
        x0 = draw(st.floats(-100, 100))
        width = draw(st.floats(0.1, 200))
        ranges.append((x0, x0 + width))
        counts.append(draw(st.integers(1, 12)))
    n_avg = draw(st.integers(1, 5))
    sigma = draw(st.one_of(st.just(-1.0), st.floats(0.03, 3.0)))  # small σ: direct-exp path
    n = draw(st.integers(1, 40))
    coords = [np.array(draw(st.lists(st.floats(r[0] - 0.3 * (r[1] - r[0]),
                                               r[1] + 0.3 * (r[1] - r[0])),
                                     min_size=n, max_size=n))) for r in ranges]
    seed = draw(st.integers(0, 2**31))
    return dim, ranges, counts, n_avg, sigma, coords, seed


def _make(dim, ranges, counts):
    args = [a for r, c in zip(ranges, counts) for a in (r, c)]
    return {1: GaussianSmoother1D, 2: GaussianSmoother2D, 3: GaussianSmoother3D}[dim](*args)


@settings(max_examples=150, deadline=None)
@given(smoother_case())
def test_properties(case):
    dim, ranges, counts, n_avg, sigma, coords, seed = case
    s = _make(dim, ranges, counts)
    s.set_smoothing(n_avg, sigma)
    p = np.random.default_rng(seed).uniform(-2, 3, s.num_values())
    value, weight, sumweight = s.multi_value_weight(*coords, p)
    dense = weight.toarray()
    assert np.all(weight.data >= 0)
    # value is a weighted mean: inside [min p, max p]. Far outside the range the weights
    # underflow (Σw = 0 gives value 0, as DIALS; subnormal Σw is only a ratio of roundings),
    # so the bound is checked where Σw is a normal number.
    ok = sumweight > 1e-250
    assert np.all(value[ok] >= p.min() - 1e-12) and np.all(value[ok] <= p.max() + 1e-12)
    assert np.all(value[sumweight == 0] == 0)
    np.testing.assert_allclose(dense.sum(axis=1), sumweight, rtol=1e-13, atol=1e-300)
    # window sizes: all values on axes with <= 3 values, else 2..max(naverage, 2) per axis
    per_axis_max = [nv if nv <= 3 else max(min(n_avg, nv), 2)
                    for nv in (s._core.axis_num_values(a) for a in range(dim))]
    assert np.all(np.diff(weight.indptr) <= np.prod(per_axis_max))
    for k in range(len(value)):
        v1, w1, sw1 = s.value_weight(*[c[k] for c in coords], p)
        assert v1 == pytest.approx(value[k], rel=1e-15, abs=1e-15)
        assert sw1 == pytest.approx(sumweight[k], rel=1e-15, abs=1e-300)
        np.testing.assert_allclose(w1.as_dense_vector(), dense[k], rtol=1e-15, atol=0)
        # d value / d p_j = w_j / sum w, checked by central differences (value is linear in p)
        if sw1 > 1e-200:
            j = int(np.argmax(dense[k]))
            h = 1e-6
            pp, pm = p.copy(), p.copy()
            pp[j] += h
            pm[j] -= h
            fd = (s.value_weight(*[c[k] for c in coords], pp)[0]
                  - s.value_weight(*[c[k] for c in coords], pm)[0]) / (2 * h)
            assert fd == pytest.approx(dense[k, j] / sw1, abs=1e-8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5),
       st.lists(st.floats(-2.0, 40.0), min_size=2, max_size=30))
def test_window_size_rule_1d(n_intervals, n_avg, xs):
    s = GaussianSmoother1D((0.0, float(n_intervals)), n_intervals)
    s.set_smoothing(n_avg, -1.0)
    nv = s.num_values()
    _, weight, _ = s.multi_value_weight(xs, np.ones(nv))
    sizes = np.diff(weight.indptr)
    if nv <= 3:
        assert np.all(sizes == nv)
    else:
        nav = min(n_avg, nv)
        # a full window of naverage inside; clipped windows keep at least 2 values
        assert np.all((sizes == nav) | ((sizes >= min(2, nav)) & (sizes <= max(nav, 2))))
        assert s.sigma() == pytest.approx(0.65 + 0.05 * (nav - 2), abs=1e-15)


# ------------------------------------------------------------------------------- raw kernels
def test_core_into_buffers_and_normalised_mode():
    gs = GaussianSmoother2D([0, 4], 4, [0, 5], 5)
    core = gs._core
    rng = np.random.default_rng(7)
    x, y = rng.uniform(-1, 5, 500), rng.uniform(0, 6, 500)
    p = rng.uniform(0.5, 2.0, gs.num_values())
    value, weight, sumweight = gs.multi_value_weight(x, y, p)
    cap = x.size * core.max_row_nnz
    out = {"value": np.empty(x.size), "sumweight": np.empty(x.size),
               "indptr": np.empty(x.size + 1, np.int64), "indices": np.empty(cap, np.int64),
               "data": np.empty(cap)}
    nnz = core.multi_value_weight_into([x, y], p, **out)
    assert nnz == weight.nnz
    np.testing.assert_array_equal(out["value"], value)
    np.testing.assert_array_equal(out["sumweight"], sumweight)
    np.testing.assert_array_equal(out["indptr"], weight.indptr)
    np.testing.assert_array_equal(out["data"][:nnz], weight.data)
    # normalised: w / sum w = d value / d p (DIALS row_multiply(weight, 1/sumweight))
    _, _, data, _indices, indptr = core.multi_value_weight([x, y], p, normalised=True)
    np.testing.assert_allclose(data, weight.data / np.repeat(sumweight, np.diff(indptr)),
                               rtol=1e-15)
    with pytest.raises(ValueError, match="data"):
        core.multi_value_weight_into([x, y], p, **dict(out, data=np.empty(10)))
    with pytest.raises(ValueError, match="value"):
        core.multi_value_weight_into([x, y], p, **dict(out, value=np.empty(x.size, np.float32)))
    with pytest.raises(ValueError, match="indices"):
        core.multi_value_weight_into([x, y], p, **dict(out, indices=np.empty(cap, np.int32)))


@pytest.mark.parametrize("dims, n", [(2, 400_000), (3, 150_000)])
def test_large_output_streaming_path_matches_small_calls(dims, n):
    # > 32 MB of CSR output (2D: 400k x 9 x 12 bytes, 3D: 150k x 27 x 12) switches the kernel
    # to non-temporal stores with a carry of less than 16 bytes between flushes; rows, values
    # and sums must be those of small (plain-store) calls, at any offset.
    gs = (GaussianSmoother2D([0, 10], 10, [0, 10], 10) if dims == 2
          else GaussianSmoother3D([0, 10], 10, [0, 10], 10, [0, 10], 10))
    rng = np.random.default_rng(3)
    coords = [rng.uniform(-1, 11, n) for _ in range(dims)]
    p = rng.uniform(0.5, 1.5, gs.num_values())
    value, weight, sumweight = gs.multi_value_weight(*coords, p)
    assert weight.nnz > 32 * 2**20 // 12
    assert weight.indptr[-1] == weight.nnz == weight.data.size
    for sl in (slice(0, 1500), slice(77_777, 79_000), slice(n - 1501, n)):
        v, w, sw = gs.multi_value_weight(*[c[sl] for c in coords], p)
        np.testing.assert_array_equal(v, value[sl])
        np.testing.assert_array_equal(sw, sumweight[sl])
        lo, hi = weight.indptr[sl.start], weight.indptr[sl.stop]
        np.testing.assert_array_equal(np.diff(w.indptr), np.diff(weight.indptr[sl.start:sl.stop + 1]))
        np.testing.assert_array_equal(w.data, weight.data[lo:hi])
        np.testing.assert_array_equal(w.indices, weight.indices[lo:hi])


def test_pickle_and_deepcopy_keep_layout_smoothing_and_parameters():
    import copy
    import pickle

    s = GaussianSmoother2D(5, 3, (0, 1), (0, 2))
    s.set_smoothing(2, 0.9)
    s.set_parameters(np.arange(15.0))
    s.set_parameter_esds(np.full(15, 0.1))
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert type(clone) is GaussianSmoother2D
        assert clone.sigma() == 0.9 and clone.num_x_average() == 2
        a = s.value_error_for_location([[0.3, 1.1], [0.9, 0.1]])
        b = clone.value_error_for_location([[0.3, 1.1], [0.9, 0.1]])
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    r = pickle.loads(pickle.dumps(RefinementGaussianSmoother((1, 100), 5)))
    assert isinstance(r, RefinementGaussianSmoother) and r.spacing() == pytest.approx(19.8)


def test_concurrent_calls_on_one_smoother_give_serial_results():
    # The GIL is released in the kernel and the smoother keeps no scratch state.
    from concurrent.futures import ThreadPoolExecutor

    gs = GaussianSmoother2D([0, 20], 20, [0, 20], 20)
    rng = np.random.default_rng(11)
    jobs = [(rng.uniform(0, 20, 50_000), rng.uniform(0, 20, 50_000)) for _ in range(4)]
    p = rng.uniform(0.5, 1.5, gs.num_values())
    serial = [gs.multi_value_weight(x, y, p) for x, y in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda xy: gs.multi_value_weight(*xy, p), jobs))
    for (v1, w1, s1), (v2, w2, s2) in zip(serial, threaded):
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(w1.data, w2.data)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bulk_weights_follow_the_dials_formula_to_rounding(dims):
    # DIALS: w = exp(-(sum over axes of ((z_a - pos_a)/sigma)^2)). The kernel evaluates the
    # Gaussian as 2^-(d*sqrt(log2 e)/sigma)^2 per axis and multiplies the axes, which moves the
    # last few bits of each weight.
    grids = {1: [(0.0, 50.0, 50)], 2: [(0.0, 20.0, 20), (-3.0, 5.0, 8)],
             3: [(0.0, 10.0, 10), (0.0, 6.0, 3), (-1.0, 1.0, 5)]}[dims]
    cls = {1: GaussianSmoother1D, 2: GaussianSmoother2D, 3: GaussianSmoother3D}[dims]
    gs = cls(*[a for x0, x1, k in grids for a in ((x0, x1), k)])
    rng = np.random.default_rng(17)
    n = 50_000
    coords = [rng.uniform(x0 - 1, x1 + 1, n) for x0, x1, _ in grids]
    p = rng.uniform(0.5, 1.5, gs.num_values())
    value, weight, sumweight = gs.multi_value_weight(*coords, p)
    rows = np.repeat(np.arange(n), np.diff(weight.indptr))
    nvals = [2 if k == 1 else (3 if k == 2 else k + 2) for _, _, k in grids]
    col_axes = np.unravel_index(weight.indices, nvals[::-1])[::-1]  # x fastest
    exponent = np.zeros(weight.nnz)
    for (x0, x1, k), nv, c, col in zip(grids, nvals, coords, col_axes):
        z = (c[rows] - x0) / ((x1 - x0) / k)
        pos = col - (0.5 if nv > 3 else 0.0)
        exponent += ((z - pos) / gs.sigma()) ** 2
    expected = np.exp(-exponent)
    # Rounding an exponent E costs ~E ulp in exp(-E), in DIALS's formula as in ours, so the
    # bound grows with E: 1e-15 (1 + E) relative, ~1e-15 near the centre of the window.
    rel = np.abs(weight.data - expected) / expected
    assert np.all(rel <= 1e-15 * (1.0 + exponent)), (rel / (1.0 + exponent)).max()
    expected_sumw = np.bincount(rows, weights=expected, minlength=n)
    np.testing.assert_allclose(sumweight, expected_sumw, rtol=1e-14)
    expected_value = np.bincount(rows, weights=expected * p[weight.indices], minlength=n) / expected_sumw
    np.testing.assert_allclose(value, expected_value, rtol=1e-14)


def test_huge_page_advice_switch_changes_no_result():
    """The huge-page advice for large buffers (off by default, see large_buffers.hpp) changes
    speed only: a smoother's ≥ 4 MB weight matrix is the same with it on and off."""
    from xtalscale import _core
    from xtalscale.smoothing import GaussianSmoother1D

    x = np.linspace(0.0, 10.0, 400_000)
    smoother = GaussianSmoother1D((0.0, 10.0), 12)
    params = np.linspace(0.8, 1.2, smoother.num_values())
    before = _core.huge_pages()
    try:
        results = []
        for enabled in (False, True):
            _core.set_huge_pages(enabled)
            assert _core.huge_pages() is enabled
            values, weights, sumw = smoother.multi_value_weight(x, params)
            results.append([np.array(values), np.array(weights.data), np.array(sumw)])
        for off, on in zip(*results):
            np.testing.assert_array_equal(off, on)
    finally:
        _core.set_huge_pages(before)
