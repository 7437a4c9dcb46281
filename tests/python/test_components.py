"""Scale components: DIALS parity numbers (spec §9.2, §9.9), derivatives against finite
differences, spherical harmonics against scipy, the lookup table against the exact path, the
seed API form, and bad input."""
from __future__ import annotations

from math import exp, pi, sqrt
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import sph_harm_y

from xtalscale import dials_scaling_ext as ext
from xtalscale.algorithms.scaling.model.components.analytical_component import AnalyticalComponent
from xtalscale.algorithms.scaling.model.components.scale_components import (
    LinearDoseDecay,
    QuadraticDoseDecay,
    ScaleComponentBase,
    SHScaleComponent,
    SingleBScaleFactor,
    SingleScaleFactor,
)
from xtalscale.algorithms.scaling.model.components.smooth_scale_components import (
    SmoothBScaleComponent1D,
    SmoothMixin,
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
)
from xtalscale.components import ComponentError, create_sph_harm_lookup_table, sh_lookup_data
from xtalscale.scaling_utilities import (
    absorption_frame_vectors,
    absorption_lookup_indices,
    align_axis_along_z,
    calc_crystal_frame_vectors,
    sph_harm_table,
    sph_harm_values,
)

SQRT2_DIALS = 1.414213562  # DIALS's truncated √2 (spec §2.5, §11.4)


# ----------------------------------------------------------------------------- §9.2 numbers
def test_base_component_parameters_esds_and_var_cov():
    base = ScaleComponentBase(np.ones(3))
    assert base.n_params == 3 and base.parameter_esds is None
    assert list(base.parameters) == [1.0, 1.0, 1.0]
    base.parameters = [2.0, 2.0, 2.0]
    assert list(base.parameters) == [2.0, 2.0, 2.0]
    with pytest.raises(AssertionError, match="different length"):
        base.parameters = [2.0] * 4
    assert base.var_cov_matrix is None
    base.var_cov_matrix = [1.0, 0.0, 0.0]
    assert base.var_cov_matrix == [1.0, 0.0, 0.0]
    assert base.calculate_restraints() is None and base.calculate_jacobian_restraints() is None
    assert list(ScaleComponentBase(np.ones(3), np.full(3, 0.1)).parameter_esds) == [0.1] * 3


def test_single_scale_factor():
    comp = SingleScaleFactor([2.0])
    comp.data = {"id": np.array([0, 0])}
    comp.update_reflection_data()
    assert comp.n_refl == [2]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == [2.0, 2.0]
    assert d.shape == (2, 1) and d[0, 0] == 1.0 and d[1, 0] == 1.0
    comp.update_reflection_data(np.array([True, False]))
    assert comp.n_refl == [1]


def test_single_b_scale_factor():
    comp = SingleBScaleFactor([0.0])
    comp.data = {"d": np.array([1.0, 1.0])}
    comp.update_reflection_data()
    assert comp.n_refl == [2] and list(comp.d_values[0]) == [1.0, 1.0]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == [1.0, 1.0]
    assert d[0, 0] == 0.5 and d[1, 0] == 0.5  # s/(2d²) with s = 1, d = 1
    comp.update_reflection_data(np.array([True, False]))
    assert comp.n_refl == [1]


def test_sh_component_with_given_table_and_selection():
    comp = SHScaleComponent([0.1] * 3)
    table = sp.lil_matrix((3, 1))
    table[:, 0] = 0.2
    comp.data = {"sph_harm_table": table.tocsr()}
    comp.update_reflection_data()
    assert [comp.harmonic_values[0][0, k] for k in range(3)] == [0.2] * 3
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == [1.0 + (3.0 * 0.2 * 0.1)]  # 1.06, bit for bit as DIALS's test
    assert [d[0, k] for k in range(3)] == [0.2] * 3
    table = sp.lil_matrix((3, 2))
    table[0, 0] = table[0, 1] = table[2, 0] = 0.2
    comp.data = {"sph_harm_table": table}
    comp.update_reflection_data(np.array([False, True]))
    assert comp.harmonic_values[0].shape == (1, 3) and comp.n_refl == [1]
    assert list(comp.calculate_scales()) == [1.0 + 0.2 * 0.1]
    comp.parameter_restraints = [0.1, 0.2, 0.3]
    res, grad = comp.calculate_restraints()
    np.testing.assert_allclose(res, [0.1 * 0.01, 0.2 * 0.01, 0.3 * 0.01], rtol=1e-15)
    np.testing.assert_allclose(grad, [0.02, 0.04, 0.06], rtol=1e-15)
    r, jac, w = comp.calculate_jacobian_restraints()
    assert list(r) == [0.1] * 3 and (jac.toarray() == np.eye(3)).all() and list(w) == [0.1, 0.2, 0.3]


def test_nparam_to_val():
    mixin = SmoothMixin()
    assert hasattr(mixin, "smoother")
    assert [mixin.nparam_to_val(n) for n in (2, 3, 5, 6)] == [1, 2, 3, 4]
    with pytest.raises(AssertionError):
        mixin.nparam_to_val(1)


# Weights of the normalised coordinate 0.5 on positions −0.5, 0.5, 1.5 with σ = 1: e⁻¹, 1, e⁻¹.
W_CENTRE = 1.0 / (2.0 * exp(-1.0) + 1.0)


def _smooth1d(cls, value, d=None):
    comp = cls(np.full(5, value))
    data = {"x": np.array([0.5, 1.0, 2.5, 0.0])}
    if d is not None:
        data["d"] = np.full(4, d)
    comp.data = data
    comp.update_reflection_data()
    comp.smoother.set_smoothing(4, 1.0)
    return comp


def test_smooth_1d_dials_numbers():
    comp = _smooth1d(SmoothScaleComponent1D, 1.1)
    assert list(comp.normalised_values[0]) == [0.5, 1.0, 2.5, 0.0]
    assert list(comp.smoother.positions()) == [-0.5, 0.5, 1.5, 2.5, 3.5]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == list(comp.calculate_scales())
    assert list(s) == pytest.approx([1.1] * 4, rel=1e-15)  # DIALS: approx
    # The weights are computed with DIALS's operations, so DIALS's exact assertions hold.
    assert d[0, 0] / d[0, 1] == exp(-1.0)
    assert d[0, 1] == W_CENTRE
    for row in range(3):  # DIALS sums columns of the transpose in order: exactly 1.0
        assert sum(list(d.toarray()[row])) == 1.0
    # z = 1 sits between positions 0.5 and 1.5: a symmetric 4-point window.
    assert d[1, 1] == d[1, 2] and d[1, 0] == d[1, 3]


def test_smooth_1d_single_and_empty_blocks():
    comp = _smooth1d(SmoothScaleComponent1D, 1.1)
    comp._normalised_values = [np.array([0.5])]
    comp._n_refl = [1]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == list(comp.calculate_scales()) and s[0] == pytest.approx(1.1, rel=1e-15)
    assert d.shape == (1, 5) and d[0, 1] == W_CENTRE
    comp._normalised_values = [np.array([])]
    comp._n_refl = [0]
    s, d = comp.calculate_scales_and_derivatives()
    assert s.size == 0 and d.shape == (0, 0) and comp.calculate_scales().size == 0


def test_smooth_b_1d_dials_numbers():
    comp = _smooth1d(SmoothBScaleComponent1D, 0.0, d=1.0)
    assert list(comp.d_values[0]) == [1.0] * 4
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == list(comp.calculate_scales()) == [1.0] * 4
    assert d[0, 0] / d[0, 1] == pytest.approx(exp(-1.0), rel=1e-15)
    assert d[0, 1] == pytest.approx(W_CENTRE * s[1] / 2.0, rel=1e-15)
    for row in range(3):
        assert sum(list(d.toarray()[row])) == 0.5  # s/(2d²) = 1/2 times weights summing to 1
    assert d[1, 1] == d[1, 2] and d[1, 0] == d[1, 3]
    comp._normalised_values = [np.array([0.5])]
    comp._n_refl = [1]
    comp._d_values = [np.array([1.0])]
    assert list(comp.calculate_scales_and_derivatives()[0]) == list(comp.calculate_scales())


def test_smooth_2d_dials_numbers():
    with pytest.raises(AssertionError):
        SmoothScaleComponent2D(np.full(30, 1.1), shape=(5, 5))
    comp = SmoothScaleComponent2D(np.full(30, 1.1), shape=(6, 5))
    assert (comp.n_x_params, comp.n_y_params, comp.n_params) == (6, 5, 30)
    x, y = np.full(30, 0.5), np.full(30, 0.5)
    x[0] = y[0] = 0.0
    x[29], y[29] = 3.99, 2.99
    comp.data = {"x": x, "y": y}
    comp.update_reflection_data()
    comp.smoother.set_smoothing(4, 1.0)
    assert list(comp.smoother.x_positions()) == [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]
    assert list(comp.smoother.y_positions()) == [-0.5, 0.5, 1.5, 2.5, 3.5]
    s, d = comp.calculate_scales_and_derivatives()
    np.testing.assert_allclose(s, 1.1, rtol=1e-15)
    # (0.5, 0.5) is a grid point; its 3×3 neighbourhood has weights 1, 4·e⁻¹, 4·e⁻².
    assert d[1, 7] == pytest.approx(1.0 / (1.0 + 4 * exp(-1.0) + 4 * exp(-2.0)), rel=1e-14)

    comp = SmoothScaleComponent2D(np.full(6, 1.1), shape=(3, 2))
    x, y = np.full(6, 0.5), np.full(6, 0.5)
    x[0] = y[0] = 0.0
    x[5], y[5] = 1.99, 0.99
    comp.data = {"x": x, "y": y}
    comp.update_reflection_data()
    comp.smoother.set_smoothing(4, 1.0)
    assert list(comp.smoother.x_positions()) == [0.0, 1.0, 2.0]
    assert list(comp.smoother.y_positions()) == [0.0, 1.0]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == list(comp.calculate_scales())
    expected = exp(-0.5) / (4.0 * exp(-0.5) + 2.0 * exp(-2.5))
    assert d[1, 1] == pytest.approx(expected, rel=1e-14)
    comp._normalised_x_values = [np.array([0.5])]
    comp._normalised_y_values = [np.array([0.5])]
    comp._n_refl = [1]
    assert list(comp.calculate_scales()) == pytest.approx([1.1], rel=1e-15)
    comp._normalised_x_values = [np.array([])]
    comp._normalised_y_values = [np.array([])]
    comp._n_refl = [0]
    s, d = comp.calculate_scales_and_derivatives()
    assert s.size == 0 and d.shape == (0, 0)


def test_smooth_3d_dials_numbers():
    with pytest.raises(AssertionError):
        SmoothScaleComponent3D(np.full(150, 1.1), shape=(5, 5, 5))
    comp = SmoothScaleComponent3D(np.full(150, 1.1), shape=(6, 5, 5))
    assert (comp.n_x_params, comp.n_y_params, comp.n_z_params) == (6, 5, 5)
    x, y, z = (np.full(150, 0.5) for _ in range(3))
    x[0] = y[0] = z[0] = 0.0
    x[149], y[149], z[149] = 3.99, 2.99, 2.99
    comp.data = {"x": x, "y": y, "z": z}
    comp.update_reflection_data()
    comp.smoother.set_smoothing(3, 1.0)
    assert list(comp.smoother.z_positions()) == [-0.5, 0.5, 1.5, 2.5, 3.5]
    s, d = comp.calculate_scales_and_derivatives()
    assert list(s) == list(comp.calculate_scales())
    np.testing.assert_allclose(s, 1.1, rtol=1e-15)
    sumexp = 1.0 + 6 * exp(-1.0) + 12 * exp(-2.0) + 8 * exp(-3.0)
    assert d[1, 7] == pytest.approx(exp(-1.0) / sumexp, rel=1e-14)


def test_fixed_first_parameter_drops_the_first_column():
    comp = SmoothScaleComponent1D(np.array([1.0, 1.2, 0.9, 1.1, 1.05]))
    comp.data = {"x": np.array([0.0, 0.4, 1.3, 2.2, 3.0])}
    comp.update_reflection_data()
    s_full, d_full = comp.calculate_scales_and_derivatives()
    comp.fix_initial_parameter()
    s, d = comp.calculate_scales_and_derivatives()
    assert d.shape == (5, 4)
    np.testing.assert_allclose(s, s_full, rtol=1e-15)  # p₀ still contributes to the value
    np.testing.assert_allclose(d.toarray(), d_full.toarray()[:, 1:], rtol=1e-15)
    assert list(comp.free_parameters) == [1.2, 0.9, 1.1, 1.05]
    comp.free_parameters = [2.0, 2.0, 2.0, 2.0]
    assert list(comp.parameters) == [1.0, 2.0, 2.0, 2.0, 2.0]
    comp.free_parameter_esds = [0.1, 0.2, 0.3, 0.4]
    assert list(comp.parameter_esds) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert list(comp.free_parameter_esds) == [0.1, 0.2, 0.3, 0.4]


def test_dose_decay_and_analytical_components():
    d = np.array([1.0, 2.0, 4.0])
    x = np.array([10.0, 20.0, 5.0])
    lin, quad = LinearDoseDecay([0.01]), QuadraticDoseDecay([0.01])
    for comp in (lin, quad):
        comp.data = {"d": d, "x": x}
        comp.update_reflection_data()
    np.testing.assert_allclose(lin.calculate_scales(), np.exp(0.01 * x / d), rtol=1e-15)
    np.testing.assert_allclose(quad.calculate_scales(), np.exp(0.01 * x / d**2), rtol=1e-15)
    an = AnalyticalComponent()
    an.data = {"correction": np.array([1.5, 0.5, 2.0])}
    an.update_reflection_data(block_selections=[np.array([2, 0])])
    s, deriv = an.calculate_scales_and_derivatives()
    assert list(s) == [2.0, 1.5] and deriv.shape == (2, 0) and an.free_parameters.size == 0


# ----------------------------------------------------------------------------- finite differences
def _fd_check(comp, block_id=0, h=1e-6):
    """Central differences of calculate_scales against the analytic derivative matrix.

    With h = 1e-6 the truncation error (h²·s''') and rounding (ε·s/h) are both ~1e-10 relative,
    so a 1e-6 tolerance leaves four orders of margin but still catches any wrong factor.
    """
    s0, deriv = comp.calculate_scales_and_derivatives(block_id)
    np.testing.assert_array_equal(s0, comp.calculate_scales(block_id))
    free = np.array(comp.free_parameters, dtype=float)
    fd = np.zeros((s0.size, free.size))
    for j in range(free.size):
        for sign in (1.0, -1.0):
            p = free.copy()
            p[j] += sign * h
            comp.free_parameters = p
            fd[:, j] += sign * comp.calculate_scales(block_id) / (2 * h)
        comp.free_parameters = free
    an = deriv.toarray()
    assert an.shape == fd.shape
    scale = np.abs(an).max()
    np.testing.assert_allclose(fd, an, rtol=1e-6, atol=1e-6 * scale)
    return an


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20261125)


def _blocks(n):
    idx = np.arange(n)
    return [idx[::2], idx[1::2][::-1]]


def test_derivatives_match_finite_differences(rng):
    n = 60
    d = rng.uniform(0.9, 4.0, n)
    z = rng.uniform(0.0, 90.0, n)
    cases = []
    cases.append((SingleScaleFactor([1.7]), {"id": np.zeros(n, dtype=int)}))
    cases.append((SingleBScaleFactor([3.5]), {"d": d}))
    cases.append((LinearDoseDecay([-0.002]), {"d": d, "x": z}))
    cases.append((QuadraticDoseDecay([0.003]), {"d": d, "x": z}))
    s1d = SmoothScaleComponent1D(rng.uniform(0.5, 1.5, 8))
    cases.append((s1d, {"x": z * 0.0666}))
    s1f = SmoothScaleComponent1D(rng.uniform(0.5, 1.5, 8))
    s1f.fix_initial_parameter()
    cases.append((s1f, {"x": z * 0.0666}))
    sb = SmoothBScaleComponent1D(rng.uniform(-2.0, 2.0, 7))
    cases.append((sb, {"x": z * 0.0555, "d": d}))
    sbf = SmoothBScaleComponent1D(rng.uniform(-2.0, 2.0, 7))
    sbf.fix_initial_parameter()
    cases.append((sbf, {"x": z * 0.0555, "d": d}))
    s2 = SmoothScaleComponent2D(rng.uniform(0.5, 1.5, 12 * 7), shape=(12, 7))
    cases.append((s2, {"x": rng.uniform(0, 10, n), "y": z * 0.06}))
    s3 = SmoothScaleComponent3D(rng.uniform(0.5, 1.5, 5 * 5 * 7), shape=(5, 5, 7))
    cases.append((s3, {"x": rng.uniform(0, 3, n), "y": rng.uniform(0, 3, n), "z": z * 0.06}))
    sh = SHScaleComponent(rng.uniform(-0.1, 0.1, 24))
    s0c = rng.normal(size=(n, 3))
    s1c = rng.normal(size=(n, 3))
    sh.data = {"sph_harm_table": sph_harm_table({"s0c": s0c, "s1c": s1c}, 4)}
    cases.append((sh, None))
    sh_lookup = SHScaleComponent(rng.uniform(-0.1, 0.1, 24))
    sh_lookup.cache_harmonics = False  # scales straight from the table, derivatives rebuilt
    sh_lookup.data = sh_lookup_data(s0c, s1c, 4)
    cases.append((sh_lookup, None))
    for comp, data in cases:
        if data is not None:
            comp.data = data
        comp.update_reflection_data(block_selections=_blocks(n))
        assert comp.n_refl == [30, 30]
        for b in (0, 1):
            an = _fd_check(comp, b)
            assert np.abs(an).max() > 0, type(comp).__name__


def test_selection_then_blocks_index_the_selected_data(rng):
    x = np.array([5.0, 0.0, 1.0, 2.0, 3.0])
    comp = SmoothScaleComponent1D(np.linspace(0.5, 1.5, 5))
    comp.data = {"x": x}
    mask = np.array([False, True, True, True, True])  # drops x = 5: the range becomes [0, 3]
    comp.update_reflection_data(mask, block_selections=[np.array([3, 0])])
    assert comp.smoother.spacing() == 1.0 and comp.n_refl == [2]  # 5/3 if x = 5 counted
    assert list(comp.normalised_values[0]) == [3.0, 0.0]
    with pytest.raises(IndexError, match="index 4 is out of range for 4"):
        comp.update_reflection_data(mask, block_selections=[np.array([4])])


def test_blocks_agree_with_the_whole(rng):
    n = 40
    comp = SmoothBScaleComponent1D(rng.uniform(-1, 1, 6))
    comp.data = {"x": rng.uniform(0, 5, n), "d": rng.uniform(1, 3, n)}
    comp.update_reflection_data()
    s_all, d_all = comp.calculate_scales_and_derivatives()
    blocks = _blocks(n)
    comp.update_reflection_data(block_selections=blocks)
    for b, idx in enumerate(blocks):
        s, d = comp.calculate_scales_and_derivatives(b)
        np.testing.assert_array_equal(s, s_all[idx])
        np.testing.assert_array_equal(d.toarray(), d_all.toarray()[idx])


def test_components_pickle_without_their_caches(rng):
    import pickle

    comp = SmoothBScaleComponent1D(rng.uniform(-1, 1, 6))
    comp.fix_initial_parameter()
    comp.data = {"x": rng.uniform(0, 5, 30), "d": rng.uniform(1, 3, 30)}
    comp.update_reflection_data(block_selections=_blocks(30))
    s, d = comp.calculate_scales_and_derivatives(1)
    clone = pickle.loads(pickle.dumps(comp))
    s2, d2 = clone.calculate_scales_and_derivatives(1)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(d2.toarray(), d.toarray())
    sh = SHScaleComponent(rng.uniform(-0.1, 0.1, 8))
    sh.data = sh_lookup_data(rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), 2)
    sh.update_reflection_data()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sh)).calculate_scales(),
                                  sh.calculate_scales())


def test_derivative_matrices_are_read_only_views(rng):
    comp = SmoothScaleComponent1D(np.ones(5))
    comp.data = {"x": rng.uniform(0, 3, 10)}
    comp.update_reflection_data()
    _, d = comp.calculate_scales_and_derivatives()
    with pytest.raises(ValueError):
        d.data[0] = 5.0
    d2 = d.copy()
    d2.data[0] = 5.0  # a copy is writable
    assert comp.calculate_scales_and_derivatives()[1].data[0] != 5.0


def test_product_rule_matches_scipy_assembly(rng):
    from xtalscale.components import product_rule

    n = 50
    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 6))
    scale.fix_initial_parameter()
    scale.data = {"x": rng.uniform(0, 4, n)}
    decay = SmoothBScaleComponent1D(rng.uniform(-1, 1, 5))
    decay.data = {"x": rng.uniform(0, 3, n), "d": rng.uniform(1, 3, n)}
    sh = SHScaleComponent(rng.uniform(-0.1, 0.1, 8))
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 2)
    comps = [scale, decay, sh]
    for comp in comps:
        comp.update_reflection_data()
    results = [c.calculate_scales_and_derivatives() for c in comps]
    g, jac = product_rule(results)
    s = [r[0] for r in results]
    expected = sp.hstack([results[0][1].multiply((s[1] * s[2])[:, None]),
                          results[1][1].multiply((s[0] * s[2])[:, None]),
                          results[2][1].multiply((s[0] * s[1])[:, None])]).toarray()
    np.testing.assert_allclose(g, s[0] * s[1] * s[2], rtol=1e-15)
    np.testing.assert_allclose(jac.toarray(), expected, rtol=1e-14, atol=1e-16)
    assert jac.shape == (n, 5 + 5 + 8) and jac.has_sorted_indices
    # Same patterns after a parameter change: the previous matrix is refilled in place.
    for comp in comps:
        comp.parameters = comp.parameters * 1.01
    results2 = [c.calculate_scales_and_derivatives() for c in comps]
    fresh_g, fresh = product_rule(results2)
    g2, jac2 = product_rule(results2, out=jac)
    assert jac2 is jac
    np.testing.assert_array_equal(g2, fresh_g)
    np.testing.assert_array_equal(jac2.toarray(), fresh.toarray())
    # A different pattern is not reused.
    _, other = product_rule(results2[:2], out=jac)
    assert other is not jac and other.shape == (n, 10)
    # A zero scale still gives the other components' derivative columns (no division by s).
    zero = np.ones(n)
    zero[0] = 0.0
    g0, j0 = product_rule([(zero, np.zeros((n, 1))), (np.full(n, 3.0), np.ones((n, 1)))],
                          widths=[2, 1])
    assert g0[0] == 0.0 and j0.shape == (n, 3) and j0[0, 2] == 0.0 and j0[1, 2] == 1.0
    with pytest.raises(ValueError, match="one row per reflection"):
        product_rule([(np.ones(3), np.ones((3, 1))), (np.ones(3), np.ones((2, 1)))])


# ----------------------------------------------------------------------------- spherical harmonics
def _reference_real_sh(lmax, theta, phi, sqrt2=SQRT2_DIALS):
    """DIALS's real harmonics from scipy's complex Y_l^m (which carries the Condon–Shortley
    phase): √2·(−1)^m·Re Y_l^m for m > 0, Y_l^0, √2·(−1)^|m|·Im Y_l^|m| for m < 0."""
    out = []
    for l in range(1, lmax + 1):
        for m in range(-l, l + 1):
            y = sph_harm_y(l, abs(m), theta, phi)
            if m > 0:
                out.append(sqrt2 * (-1) ** m * y.real)
            elif m == 0:
                out.append(y.real)
            else:
                out.append(sqrt2 * (-1) ** m * y.imag)
    return np.stack(out, axis=-1)


def test_harmonics_match_scipy_with_dials_conventions():
    rng = np.random.default_rng(7)
    lmax = 6
    n = 500
    theta = np.arccos(rng.uniform(-1, 1, (n, 2)))
    phi = rng.uniform(0, 2 * pi, (n, 2))
    tp0 = np.stack([theta[:, 0], phi[:, 0]], axis=1)
    tp1 = np.stack([theta[:, 1], phi[:, 1]], axis=1)
    table = ext.create_sph_harm_table(tp0, tp1, lmax)
    assert table.shape == (48, n)
    ref = 0.5 * (_reference_real_sh(lmax, theta[:, 0], phi[:, 0]) +
                 _reference_real_sh(lmax, theta[:, 1], phi[:, 1]))
    # Both sides are double-precision evaluations of the same formula: agreement to ~1e-13.
    np.testing.assert_allclose(table.toarray().T, ref, rtol=0, atol=1e-12)
    # The √2 is DIALS's truncated constant: the true √2 differs by 2.6e-10 relative.
    ref_true = 0.5 * (_reference_real_sh(lmax, theta[:, 0], phi[:, 0], sqrt(2)) +
                      _reference_real_sh(lmax, theta[:, 1], phi[:, 1], sqrt(2)))
    col = 4  # (l, m) = (2, -1): columns run l = 1..lmax, m = -l..l
    # The truncation shows as a 2.6e-10 relative offset, far above the 1e-14 agreement.
    diff = table.toarray().T[:, col] - ref_true[:, col]
    np.testing.assert_allclose(diff, (SQRT2_DIALS / sqrt(2) - 1.0) * ref_true[:, col], rtol=0,
                               atol=1e-14)
    assert np.abs(diff).max() > 1e-11


def test_sh_table_dials_numbers_and_crystal_frame_vectors():
    # spec §9.9: beam s0 = (0,0,2), axis x, scan 1–90 at 1°, s1 = (1/√2, 0, 1/√2), z = 0, 45, 90.
    r = 1 / sqrt(2)
    beam = SimpleNamespace(get_sample_to_source_direction=lambda: (0.0, 0.0, -1.0))
    gonio = SimpleNamespace(get_rotation_axis_datum=lambda: (1.0, 0.0, 0.0),
                            get_fixed_rotation=lambda: (1, 0, 0, 0, 1, 0, 0, 0, 1),
                            get_setting_rotation=lambda: (1, 0, 0, 0, 1, 0, 0, 0, 1))
    scan = SimpleNamespace(get_angle_from_array_index=lambda z, deg=True: np.radians(z))
    expt = SimpleNamespace(beam=beam, goniometer=gonio, scan=scan)
    table = {"s1": np.array([[r, 0, r]] * 3), "xyzobs.px.value": np.array([[0, 0, 0], [0, 0, 45],
                                                                           [0, 0, 90.0]])}
    calc_crystal_frame_vectors(table, expt)
    np.testing.assert_allclose(table["s0c"], [[0, 0, -1], [0, -r, -r], [0, -1, 0]], atol=1e-15)
    np.testing.assert_allclose(table["s1c"], [[r, 0, r], [r, 0.5, 0.5], [r, r, 0]], atol=1e-15)
    s0c = align_axis_along_z((1.0, 0.0, 0.0), table["s0c"])
    s1c = align_axis_along_z((1.0, 0.0, 0.0), table["s1c"])
    np.testing.assert_allclose(s0c, [[1, 0, 0], [r, -r, 0], [0, -1, 0]], atol=1e-15)
    np.testing.assert_allclose(s1c, [[-r, 0, r], [-0.5, 0.5, r], [0, r, r]], atol=1e-15)
    np.testing.assert_allclose(ext.calc_theta_phi(s0c),
                               [[pi / 2, 0], [pi / 2, 7 * pi / 4], [pi / 2, 3 * pi / 2]], atol=1e-15)
    np.testing.assert_allclose(ext.calc_theta_phi(s1c),
                               [[pi / 4, pi], [pi / 4, 3 * pi / 4], [pi / 4, pi / 2]], atol=1e-15)
    sht = sph_harm_table({"s0c": s0c, "s1c": s1c}, 2).toarray()
    np.testing.assert_allclose(sht[1], sqrt(3 / (8 * pi)) / 2, rtol=1e-14)  # l=1, m=0
    np.testing.assert_allclose(sht[5], -sqrt(5 / (256 * pi)), rtol=1e-14)  # l=2, m=0


def test_lookup_index_and_table_selection_numbers():
    tp = np.array([(0.001, 0), (3.141, 2 * 3.141), (0.001, 2 * 3.141), (3.141, 0)])
    assert list(ext.calc_lookup_index(tp, 1)) == [0, 64799, 359, 64440]
    assert list(ext.calc_lookup_index(tp, 2)) == [0, 259199, 719, 258480]
    sel = np.array([1, 0, 2, 3, 1])
    values, matrix = ext.calculate_harmonic_tables_from_selections(
        sel, sel, [[10, 11, 12, 13], [20, 21, 22, 23]])
    assert [list(v) for v in values] == [[11, 10, 12, 13, 11], [21, 20, 22, 23, 21]]
    assert matrix.shape == (5, 2) and matrix[3, 1] == 23


def test_lookup_path_matches_exact_path_within_the_grid_resolution(rng):
    """Memory mode reads the harmonics at the grid corner below each direction. Moving a point
    on the unit sphere by at most √(Δθ² + Δφ²) with Δθ = Δφ = 0.5° (0.0087 rad) changes
    Y_lm by at most |∇Y_lm| times that, and by the addition theorem
    Σ_m |∇Y_lm|² = l(l+1)(2l+1)/4π, so |ΔY_lm| ≤ √(l(l+1)(2l+1)/4π) · √2 · 0.0087 (×√2 for
    the real form); the average of two directions obeys the same bound."""
    lmax = 4
    n = 2000
    s0c = rng.normal(size=(n, 3))
    s1c = rng.normal(size=(n, 3))
    exact = sph_harm_values(s0c, s1c, lmax)
    saved = SHScaleComponent.coefficients_list
    try:
        SHScaleComponent.coefficients_list = None
        data = sh_lookup_data(s0c, s1c, lmax)
        comp = SHScaleComponent(np.zeros(24))
        comp.data = data
        comp.update_reflection_data()
        lookup = comp.dense_harmonic_values(0)
    finally:
        SHScaleComponent.coefficients_list = saved
    step = pi / 360.0
    k = 0
    for l in range(1, lmax + 1):
        bound = sqrt(l * (l + 1) * (2 * l + 1) / (4 * pi)) * sqrt(2) * sqrt(2) * step
        err = np.abs(lookup[:, k:k + 2 * l + 1] - exact[:, k:k + 2 * l + 1]).max()
        assert err <= bound, (l, err, bound)
        assert err > bound / 50  # the lookup really is the coarse path
        k += 2 * l + 1


def test_lookup_table_layout():
    table = create_sph_harm_lookup_table(2, 1)
    assert len(table) == 8 and table[0].size == 64800
    i = 360 * 30 + 45  # θ = 30°, φ = 45°
    ref = _reference_real_sh(2, np.radians(30.0), np.radians(45.0))
    np.testing.assert_allclose([t[i] for t in table], ref, atol=1e-13)


def test_sh_lookup_mode_scales_and_derivatives(rng):
    n = 50
    s0c, s1c = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    comp = SHScaleComponent(rng.uniform(-0.1, 0.1, 8))
    comp.data = sh_lookup_data(s0c, s1c, 2)
    comp.update_reflection_data(block_selections=_blocks(n))
    h = comp.dense_harmonic_values(1)
    s, d = comp.calculate_scales_and_derivatives(1)
    np.testing.assert_allclose(s, 1.0 + h @ comp.parameters, rtol=1e-14)
    np.testing.assert_array_equal(d.toarray(), h)
    assert len(comp.harmonic_values[0]) == 8  # memory mode: one array per harmonic


@pytest.mark.parametrize("n", [1000, 140_000])  # direct row reads / whole-grid surface
def test_lookup_mode_scales_without_the_harmonic_matrix(rng, n):
    s0c, s1c = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    comp = SHScaleComponent(rng.uniform(-0.1, 0.1, 24))
    comp.exact_harmonics = True  # the lazy float64 path (above 100k the default is float32)
    comp.data = sh_lookup_data(s0c, s1c, 4)
    comp.update_reflection_data()
    assert comp._blocks == [None]  # only the grid indices are held until derivatives are asked
    s_lookup = comp.calculate_scales()
    s, d = comp.calculate_scales_and_derivatives()
    assert d.shape == (n, 24) and comp._blocks[0] is not None
    # Same sums in a different order: agreement to rounding (|C·Y| < 1, so 1e-14 absolute).
    np.testing.assert_allclose(s_lookup, s, rtol=0, atol=1e-14)
    np.testing.assert_allclose(comp.calculate_scales(), s, rtol=0, atol=0)


def test_own_lookup_table_grows_when_a_larger_lmax_follows_a_smaller_one(rng, monkeypatch):
    # A script that scales an lmax-2 model and then an lmax-4 one in the same process: the
    # class table xtalscale built for lmax 2 (8 harmonics) is rebuilt to cover 24, not an error.
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", create_sph_harm_lookup_table(2))
    n = 300
    s0c, s1c = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    comp = SHScaleComponent(rng.uniform(-0.1, 0.1, 24))
    comp.exact_harmonics = True
    comp.data = sh_lookup_data(s0c, s1c, 4)
    comp.update_reflection_data()
    s, d = comp.calculate_scales_and_derivatives()
    assert d.shape == (n, 24) and len(SHScaleComponent.coefficients_list) >= 24
    np.testing.assert_allclose(comp.calculate_scales(), s, rtol=0, atol=1e-14)


def test_user_assigned_lookup_table_too_small_is_a_clear_error(rng, monkeypatch):
    small = [np.asarray(column) for column in create_sph_harm_lookup_table(2)]  # a plain list
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", small)
    comp = SHScaleComponent(rng.uniform(-0.1, 0.1, 24))
    comp.exact_harmonics = True
    comp.data = sh_lookup_data(rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), 4)
    with pytest.raises(ComponentError, match="8 harmonics but the component has 24"):
        comp.update_reflection_data()  # rows are read from a user's table straight away


def test_lookup_mode_without_caching_holds_only_indices(rng):
    n = 500
    s0c, s1c = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    cached, lean = SHScaleComponent(np.full(8, 0.05)), SHScaleComponent(np.full(8, 0.05))
    lean.cache_harmonics = False
    for comp in (cached, lean):
        comp.data = sh_lookup_data(s0c, s1c, 2)
        comp.update_reflection_data()
    s_c, d_c = cached.calculate_scales_and_derivatives()
    s_l, d_l = lean.calculate_scales_and_derivatives()
    assert lean._blocks == [None] and cached._blocks[0] is not None
    np.testing.assert_allclose(s_l, s_c, rtol=0, atol=1e-15)  # summation order differs
    np.testing.assert_array_equal(s_l, lean.calculate_scales())
    np.testing.assert_array_equal(d_l.toarray(), d_c.toarray())


def test_lookup_theta_pi_is_kept_inside_the_table():
    # θ = π indexes one row past DIALS's table; sh_lookup_data uses the last θ row instead.
    down = np.array([[0.0, 0.0, -1.0]])
    assert ext.calc_lookup_index(ext.calc_theta_phi(down), 2)[0] == 259200  # DIALS's index
    data = sh_lookup_data(down, down, 2)
    assert data["s0_lookup"][0] == 259200 - 720
    comp = SHScaleComponent(np.zeros(8))
    comp.data = data
    comp.update_reflection_data()
    # Y_10 at the last grid row (θ = 179.5°) is within 4e-5 of its value at the pole.
    assert comp.dense_harmonic_values()[0, 1] == pytest.approx(-sqrt(3 / (4 * pi)), abs=4e-5)


def test_lookup_indices_are_checked_at_update():
    comp = SHScaleComponent(np.zeros(8))
    comp.data = sh_lookup_data(np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]), 2)
    comp.data = {"s0_lookup": np.array([0]), "s1_lookup": np.array([10**7])}
    with pytest.raises(IndexError, match="s1_lookup index 10000000"):
        comp.update_reflection_data()


# ----------------------------------------------------------------------------- seed API form
class _SimpleMultiplicative(ScaleComponentBase):
    """The commissioning document's example component (seed form), lightly adapted."""

    def __init__(self, active_parameter_manager, initial_scale=1.0):
        super().__init__(active_parameter_manager)
        self.active_parameter_manager.add_parameters(np.array([initial_scale]))

    @property
    def n_params(self):
        return 1

    @property
    def parameters(self):
        return self.active_parameter_manager.get_parameters()[: self.n_params]

    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        n = len(reflection_table["d"])
        return np.full(n, self.parameters[0]), np.ones((n, 1))


def test_seed_form_component_and_dense_derivatives():
    from xtalscale.parameter_managers import active_parameter_manager

    apm = active_parameter_manager()
    comp = _SimpleMultiplicative(apm, initial_scale=2.5)
    assert comp.active_parameter_manager is apm and comp.params is None
    assert comp.n_params == 1 and list(comp.parameters) == [2.5]
    table = {"d": np.array([1.0, 2.0, 3.0])}
    scales, dense = comp.calculate_scales_and_derivatives(table)
    deriv = ScaleComponentBase.as_sparse_derivatives(dense, n_rows=3)
    assert sp.issparse(deriv) and deriv.shape == (3, 1) and deriv.nnz == 3
    # Mixed with a C++-backed component, the chain rule needs only these two forms.
    b = SingleBScaleFactor([1.0])
    b.data = {"d": table["d"]}
    b.update_reflection_data()
    sb, db = b.calculate_scales_and_derivatives()
    g = scales * sb
    np.testing.assert_allclose(g, 2.5 * np.exp(1.0 / (2 * table["d"] ** 2)), rtol=1e-15)
    jac = sp.hstack([deriv.multiply(sb[:, None]), db.multiply(scales[:, None])]).toarray()
    np.testing.assert_allclose(jac[:, 1], 2.5 * sb / (2 * table["d"] ** 2), rtol=1e-15)
    with pytest.raises(ValueError, match="rows"):
        ScaleComponentBase.as_sparse_derivatives(dense, n_rows=4)
    grid_like = SimpleNamespace(as_dense_matrix=lambda: [[1.0, 0.0], [0.0, 2.0]])
    assert ScaleComponentBase.as_sparse_derivatives(grid_like).toarray()[1, 1] == 2.0


def test_seed_form_takes_params_second():
    from xtalscale.parameter_managers import active_parameter_manager

    params = SimpleNamespace(n_bins=3)
    comp = ScaleComponentBase(active_parameter_manager(), params)
    assert comp.params is params and comp.parameter_esds is None


class _SeedSmooth(ScaleComponentBase):
    """The commissioning document's §7 smooth component: no ``parameters`` of its own, so the
    base class serves its slice of the manager's parameters."""

    def __init__(self, active_parameter_manager, coordinate_values, n_control_points=6):
        from xtalscale.smoothing import GaussianSmoother1D

        super().__init__(active_parameter_manager)
        coords = np.asarray(coordinate_values, dtype=float)
        self.smoother = GaussianSmoother1D(n_parameters=n_control_points,
                                           value_range=(coords.min(), coords.max()))
        self.active_parameter_manager.add_parameters(np.linspace(0.8, 1.2, n_control_points))
        self.coordinate_values = coords

    @property
    def n_params(self):
        return self.smoother.n_parameters

    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        self.smoother.set_parameters(self.parameters)
        scales, _ = self.smoother.value_error_for_location(self.coordinate_values)
        deriv = np.zeros((scales.size, self.n_params))
        for i, x in enumerate(self.coordinate_values):
            w = self.smoother.value_weight(x)
            weights = np.asarray(w.get_weight(), dtype=float)
            deriv[i] = weights / w.get_sumweight()
        return scales, deriv


def test_seed_smooth_component_shares_a_manager_and_mixes_with_cpp_components():
    from xtalscale.parameter_managers import active_parameter_manager

    apm = active_parameter_manager()
    first = _SimpleMultiplicative(apm, initial_scale=1.5)
    x = np.linspace(0.0, 10.0, 9)
    smooth = _SeedSmooth(apm, x)
    # The base class finds each component's slice of the shared manager.
    assert list(first.parameters) == [1.5]
    np.testing.assert_allclose(smooth.parameters, np.linspace(0.8, 1.2, 6), rtol=1e-15)
    smooth.parameters = np.full(6, 1.1)
    np.testing.assert_allclose(apm.get_parameters(), [1.5] + [1.1] * 6, rtol=1e-15)
    smooth.parameters = np.linspace(0.9, 1.3, 6)
    b = SingleBScaleFactor([2.0])
    b.data = {"d": np.linspace(1.0, 3.0, 9)}
    b.update_reflection_data()
    table = {"d": b.data["d"]}

    def g_and_jac():
        s1, d1 = first.calculate_scales_and_derivatives(table)
        s2, d2 = smooth.calculate_scales_and_derivatives(table)
        s3, d3 = b.calculate_scales_and_derivatives()
        d1 = ScaleComponentBase.as_sparse_derivatives(d1, 9)
        d2 = ScaleComponentBase.as_sparse_derivatives(d2, 9)
        g = s1 * s2 * s3
        jac = sp.hstack([d1.multiply((s2 * s3)[:, None]), d2.multiply((s1 * s3)[:, None]),
                         d3.multiply((s1 * s2)[:, None])]).toarray()
        return g, jac

    g, jac = g_and_jac()
    assert jac.shape == (9, 8)
    # Chain rule of the mixed model against central differences of g (relative 1e-6).
    p0 = np.concatenate([apm.get_parameters(), b.parameters])
    h = 1e-6
    fd = np.zeros_like(jac)
    for j in range(p0.size):
        for sign in (1.0, -1.0):
            p = p0.copy()
            p[j] += sign * h
            apm.set_parameters(p[:7])
            b.parameters = p[7:]
            fd[:, j] += sign * g_and_jac()[0] / (2 * h)
    apm.set_parameters(p0[:7])
    b.parameters = p0[7:]
    np.testing.assert_allclose(fd, jac, rtol=1e-6, atol=1e-6 * np.abs(jac).max())
    smooth.update_reflection_data(table)  # seed form: a no-op unless the subclass overrides it


# ----------------------------------------------------------------------------- bad input
def test_wrong_parameter_counts():
    # One exception type serves both conventions: ValueError here, AssertionError in DIALS.
    assert issubclass(ComponentError, ValueError) and issubclass(ComponentError, AssertionError)
    with pytest.raises(ValueError, match="single parameter"):
        SingleScaleFactor([1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one parameter"):
        SingleBScaleFactor([])
    with pytest.raises(ValueError, match="<2 parameters"):
        SmoothScaleComponent1D([1.0])
    with pytest.raises(ValueError, match="inconsistent"):
        SmoothScaleComponent2D(np.ones(7), shape=(3, 2))
    with pytest.raises(ValueError, match="parameter_esds has 2"):
        SingleScaleFactor([1.0], [0.1, 0.2])
    comp = SHScaleComponent(np.zeros(8))
    with pytest.raises(ValueError, match="n_params=8"):
        comp.data = {"sph_harm_table": np.zeros((3, 5))}
    comp.data = {"sph_harm_table": np.zeros((8, 5))}
    comp.update_reflection_data()
    with pytest.raises(ValueError, match="parameter_restraints has 3"):
        comp.parameter_restraints = [1.0, 1.0, 1.0]


def test_missing_or_wrong_data_keys():
    with pytest.raises(ValueError, match=r"missing \['d'\]"):
        SingleBScaleFactor([0.0]).data = {"x": np.ones(2)}
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        SmoothBScaleComponent1D(np.zeros(3)).data = {"d": np.ones(2)}
    with pytest.raises(ValueError, match="sph_harm_table"):
        SHScaleComponent(np.zeros(3)).data = {"s0_lookup": np.zeros(2, dtype=int)}
    with pytest.raises(ValueError, match="set .data"):
        SingleBScaleFactor([0.0]).update_reflection_data()
    with pytest.raises(KeyError, match="'s1'"):
        calc_crystal_frame_vectors({"xyzobs.px.value": np.zeros((2, 3))}, None)
    with pytest.raises(KeyError, match="xyzobs.px.value"):
        calc_crystal_frame_vectors({"s1": np.zeros((2, 3))}, None)
    with pytest.raises(KeyError, match="'s0c'"):
        sph_harm_table({"s1c": np.zeros((2, 3))}, 2)


@pytest.mark.parametrize("bad, what", [(0.0, "> 0"), (-1.5, "> 0"), (np.nan, "finite"),
                                       (np.inf, "finite")])
def test_bad_d_values(bad, what):
    for comp in (SingleBScaleFactor([0.0]), QuadraticDoseDecay([0.0])):
        data = {"d": np.array([1.0, bad])}
        if isinstance(comp, QuadraticDoseDecay):
            data["x"] = np.ones(2)
        with pytest.raises(ValueError, match=rf"data\['d'\] must be .*{what}.*element 1"):
            comp.data = data


def test_nan_inputs_are_rejected():
    with pytest.raises(ValueError, match="initial_values must be finite"):
        SingleScaleFactor([np.nan])
    comp = SmoothScaleComponent1D(np.ones(4))
    with pytest.raises(ValueError, match=r"data\['x'\] must be finite"):
        comp.data = {"x": np.array([0.0, np.nan])}
    comp.data = {"x": np.array([0.0, 1.0, 2.0])}
    comp.update_reflection_data()
    with pytest.raises(ValueError, match="parameters must be finite"):
        comp.parameters = [1.0, np.nan, 1.0, 1.0]
    with pytest.raises(ValueError, match="finite"):
        ext.calc_theta_phi(np.array([[np.nan, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="s0_theta_phi must be finite"):
        ext.create_sph_harm_table(np.array([[np.nan, 0.0]]), np.array([[0.0, 0.0]]), 2)


def test_bad_selections_and_block_ids():
    comp = SingleBScaleFactor([0.0])
    comp.data = {"d": np.ones(4)}
    with pytest.raises(ValueError, match="selection has length 3"):
        comp.update_reflection_data(np.array([True, False, True]))
    with pytest.raises(IndexError, match=r"block_selections\[1\] index 4"):
        comp.update_reflection_data(block_selections=[np.array([0]), np.array([1, 4])])
    comp.update_reflection_data(block_selections=[np.array([0, 1])])
    with pytest.raises(IndexError, match="block_id 1"):
        comp.calculate_scales(1)


def test_kernel_level_bad_input():
    from xtalscale._core import components as kern

    with pytest.raises(ValueError, match="lmax"):
        kern.sph_harm_table(np.zeros((1, 2)), np.zeros((1, 2)), 0)
    with pytest.raises(ValueError, match="same length"):
        kern.sph_harm_table(np.zeros((2, 2)), np.zeros((1, 2)), 2)
    with pytest.raises(IndexError, match="s1_selection"):
        kern.harmonics_from_lookup(np.array([0]), np.array([10]), np.zeros((10, 3)), 3)
    with pytest.raises(ValueError, match="rot_axis must be non-zero"):
        kern.rotate_vectors_about_axis(np.zeros(3), np.zeros((1, 3)), np.zeros(1))
    with pytest.raises(IndexError, match="indices"):
        kern.csr_matvec(np.array([0, 1], dtype=np.int32), np.array([5], dtype=np.int32),
                        np.ones(1), np.ones(3))
    with pytest.raises(ValueError, match="x must be finite"):
        kern.smoother_weights([np.array([0.0, np.inf])], [(0.0, 2.0)], [2])
    with pytest.raises(ValueError, match="theta_phi"):
        ext.calc_lookup_index(np.array([[-0.1, 0.0]]), 2)
    with pytest.raises(ValueError, match="v must have one value per matrix row"):
        ext.row_multiply(sp.identity(3, format="csr"), np.ones(2))


def test_weight_matrix_object():
    from xtalscale._core import components as kern

    x = np.array([0.0, 0.4, 1.3, 2.2, 3.0])
    full = kern.weight_matrix([x], [(0.0, 3.0)], [3])
    fixed = kern.weight_matrix([x], [(0.0, 3.0)], [3], first_fixed=True)
    assert full.shape == (5, 5) and fixed.shape == (5, 4) and fixed.n_params == 5
    assert fixed.fixed_first and full.first_col is None
    dense = sp.csr_matrix((full.data, full.indices, full.indptr), shape=full.shape).toarray()
    np.testing.assert_array_equal(fixed.first_col, dense[:, 0])
    p = np.array([1.0, 1.2, 0.9, 1.1, 1.05])
    np.testing.assert_allclose(fixed.values(p), dense @ p, rtol=1e-15)
    np.testing.assert_allclose(full.values(p), dense @ p, rtol=1e-15)
    f = np.full(5, 0.125)
    s, d_data = full.b_scales(p, f)
    np.testing.assert_allclose(s, np.exp(dense @ p * 0.125), rtol=1e-15)
    np.testing.assert_allclose(d_data, full.data * np.repeat(s * 0.125, np.diff(full.indptr)),
                               rtol=1e-15)
    with pytest.raises(ValueError):
        full.data[0] = 1.0  # views of the C++ buffers are read-only
    with pytest.raises(ValueError, match="parameters must have 5 values"):
        fixed.values(p[1:])
    with pytest.raises(ValueError, match="factor and rows"):
        full.b_scales(p, f[:3])
    with pytest.raises(ValueError, match="first_fixed is only defined"):
        kern.weight_matrix([x, x], [(0.0, 3.0)] * 2, [3, 3], first_fixed=True)


def test_row_multiply_and_elementwise_square():
    m = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    np.testing.assert_array_equal(ext.row_multiply(m, [2.0, -1.0]).toarray(),
                                  [[2.0, 0.0, 4.0], [0.0, -3.0, 0.0]])
    np.testing.assert_array_equal(ext.elementwise_square(m.tocsc()).toarray(),
                                  [[1.0, 0.0, 4.0], [0.0, 9.0, 0.0]])
    rotated = ext.rotate_vectors_about_axis([[0.0, 0.0, 2.0]], [[1.0, 0.0, 0.0]], [pi / 2])
    np.testing.assert_allclose(rotated, [[0.0, 1.0, 0.0]], atol=1e-16)


def test_bin_coordinates_is_dials_formula_bit_for_bit():
    from xtalscale._core import components as kern

    rng = np.random.default_rng(5)
    xyz = rng.uniform(-10, 2000, (1000, 3))
    d = rng.uniform(0.7, 30.0, 1000)
    np.testing.assert_array_equal(kern.bin_coordinates(xyz[:, 1], 3.25, 17.5), (xyz[:, 1] - 3.25) / 17.5)
    np.testing.assert_array_equal(kern.bin_coordinates(d, 0.001, 0.37, inverse_square=True),
                                  (1.0 / d**2 - 0.001) / 0.37)
    with pytest.raises(ValueError, match="width"):
        kern.bin_coordinates(d, 0.0, 0.0)
    with pytest.raises(ValueError):
        kern.bin_coordinates(xyz, 0.0, 1.0)


def test_sh_lookup_table_rows_are_the_direct_harmonics_bit_for_bit():
    """The lookup table is built line by line (Legendre per θ, trig per φ); every row equals
    the direct evaluation at its grid point exactly."""
    import math

    from xtalscale._core import components as kern

    lmax, ppd = 4, 2
    table = kern.sph_harm_lookup_table(lmax, ppd)
    n_phi = 360 * ppd
    step = math.pi / (180.0 * ppd)
    rng = np.random.default_rng(2)
    for i in [0, 1, n_phi - 1, n_phi, table.shape[0] - 1, *rng.integers(0, table.shape[0], 200)]:
        theta, phi = (i // n_phi) * step, (i % n_phi) * step
        np.testing.assert_array_equal(table[i], kern.real_harmonics(lmax, theta, phi))


def _tilted_experiment():
    """A goniometer with non-trivial fixed and setting rotations and a tilted beam."""
    def rot(axis, angle):
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    F, S = rot((0.3, 1, 0.2), 0.7), rot((1, -0.4, 0.5), -0.3)
    beam = SimpleNamespace(get_sample_to_source_direction=lambda: (0.05, -0.02, 0.998))
    gonio = SimpleNamespace(get_rotation_axis_datum=lambda: (0.99, 0.01, -0.02),
                            get_fixed_rotation=lambda: tuple(F.ravel()),
                            get_setting_rotation=lambda: tuple(S.ravel()))
    scan = SimpleNamespace(get_angle_from_array_index=lambda z, deg=True: np.radians(0.1 * z))
    return SimpleNamespace(beam=beam, goniometer=gonio, scan=scan)


def _reference_lookup_indices(table, expt):
    """The lookup-grid indices (2 points per degree) of the absorption frame vectors by the
    vector path: frame vectors → θ, φ → grid index, θ = π moved to the last row."""
    from xtalscale.scaling_utilities import absorption_frame_vectors

    expected = []
    for v in absorption_frame_vectors(dict(table), expt):
        idx = ext.calc_lookup_index(ext.calc_theta_phi(v), 2)
        idx[idx >= 360 * 180 * 4] -= 720
        expected.append(idx)
    return expected


@pytest.mark.parametrize("tilted", [False, True])
def test_fused_absorption_lookup_indices_equal_the_vector_path(tilted):
    # The one-pass kernel equals frame vectors → θ, φ → grid index (θ = π moved to the last
    # row), for DIALS's frame and for a geometry whose matrix products round; any thread count.
    rng = np.random.default_rng(7)
    n = 50_000
    s1 = rng.normal(size=(n, 3))
    s1[:5] = 0.0  # |s1| = 0 gives zero vectors, as the numpy path does
    s1[5:9] = [[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0]]  # grid edges and poles
    z = np.repeat(rng.uniform(0, 3600, size=n // 50), 50)  # runs of equal scan angles
    table = {"s1": s1, "xyzobs.px.value": np.column_stack([np.zeros(n), np.zeros(n), z])}
    if tilted:
        expt = _tilted_experiment()
    else:
        expt = _tilted_experiment()
        expt.goniometer.get_fixed_rotation = lambda: (1, 0, 0, 0, 1, 0, 0, 0, 1)
        expt.goniometer.get_setting_rotation = lambda: (1, 0, 0, 0, 1, 0, 0, 0, 1)
    s0c, s1c = absorption_frame_vectors(dict(table), expt)
    expected = _reference_lookup_indices(table, expt)
    for n_threads in (1, 2, 3):
        i0, i1 = absorption_lookup_indices(table, expt, 2, n_threads=n_threads)
        np.testing.assert_array_equal(i0, expected[0])
        np.testing.assert_array_equal(i1, expected[1])
    # the vector path of the SH component (sh_lookup_data) gives the same indices, and θ = π
    # (one row past the grid) lands on the last θ row
    from_vectors = sh_lookup_data(s0c, s1c, 2)
    np.testing.assert_array_equal(from_vectors["s0_lookup"], expected[0])
    np.testing.assert_array_equal(from_vectors["s1_lookup"], expected[1])
    from xtalscale._core import components as kern

    assert list(kern.grid_lookup_indices(np.array([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]), 2)) == [720 * 359, 0]
    assert "s0c" not in table  # the table gains no columns
    # the vectors are unit vectors in DIALS's frame (zero where |s1| = 0)
    np.testing.assert_allclose(np.linalg.norm(s1c[9:], axis=1), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(s1c[:5], 0.0)


@pytest.mark.parametrize("points_per_degree", [1, 2, 10])
def test_grid_lookup_with_polynomial_angles_equals_the_atan2_path(points_per_degree):
    # The lookup kernels take θ and φ from a polynomial atan2 and redo a direction with
    # std::atan2 only when its grid coordinate lies within the polynomial's error of a grid
    # line. Directions *on* grid lines (where the two could round apart), poles, axes and
    # signed zeros give the atan2 path's index, as random directions do.
    from xtalscale._core import components as kern

    rng = np.random.default_rng(11)
    ppd = points_per_degree
    theta = np.floor(rng.uniform(0, 180 * ppd, 20_000)) / ppd * np.pi / 180
    phi = np.floor(rng.uniform(0, 360 * ppd, 20_000)) / ppd * np.pi / 180
    on_lines = np.column_stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    special = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [-1, -0.0, 0],
                        [-1, 1e-300, 0], [-1, -1e-300, 0], [1, -1e-17, 0], [0, 0, 0]], dtype=float)
    vectors = np.concatenate([rng.normal(size=(50_000, 3)), on_lines, special])
    expected = ext.calc_lookup_index(ext.calc_theta_phi(vectors), ppd)
    expected[expected >= 360 * 180 * ppd * ppd] -= 360 * ppd
    np.testing.assert_array_equal(kern.grid_lookup_indices(vectors, ppd), expected)


def test_absorption_frame_kernels_reject_bad_input():
    expt = _tilted_experiment()
    table = {"s1": np.ones((3, 3)), "xyzobs.px.value": np.zeros((3, 3))}
    bad = dict(table, s1=np.array([[1.0, np.nan, 0.0]] * 3))
    with pytest.raises(ValueError, match="finite"):
        absorption_lookup_indices(bad, expt, 2)
    with pytest.raises(ValueError, match="non-zero"):
        absorption_lookup_indices(table, expt, 2, alignment_axis=(0.0, 0.0, 0.0))
    expt.goniometer.get_rotation_axis_datum = lambda: (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="non-zero"):
        absorption_frame_vectors(dict(table), expt)
    with pytest.raises(ValueError, match="positive"):
        absorption_lookup_indices(table, _tilted_experiment(), 0)
    from xtalscale._core import components as kern

    with pytest.raises(ValueError, match="finite"):
        kern.grid_lookup_indices(np.array([[0.0, np.inf, 1.0]]), 2)
    with pytest.raises(ValueError, match="positive"):
        kern.grid_lookup_indices(np.ones((2, 3)), 0)
    with pytest.raises(ValueError):
        kern.grid_lookup_indices(np.ones((2, 2)), 2)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_absorption_lookup_indices_on_and_near_grid_lines_are_the_exact_path(n_threads):
    """Directions on grid lines (integer vectors in a frame that rounds them by an ulp or two),
    poles and random ones: the two-lane kernel's indices are those of the exact angles."""
    from types import SimpleNamespace

    from xtalscale.scaling_utilities import absorption_lookup_indices

    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    expt = SimpleNamespace(
        beam=SimpleNamespace(get_sample_to_source_direction=lambda: (0.0, 0.0, 1.0)),
        goniometer=SimpleNamespace(get_rotation_axis_datum=lambda: (1.0, 0.0, 0.0),
                                   get_fixed_rotation=lambda: identity, get_setting_rotation=lambda: identity),
        scan=SimpleNamespace(get_angle_from_array_index=lambda z, deg=True: np.radians(0.5 * np.round(z))))
    grid = np.stack(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    grid = grid[np.any(grid != 0, axis=1)]
    rng = np.random.default_rng(12)
    s1 = np.concatenate([np.repeat(grid, 40, axis=0), rng.normal(size=(60_000, 3))])
    z = rng.integers(0, 720, s1.shape[0]).astype(float)  # scan angles on 0.5° steps
    table = {"s1": s1, "xyzobs.px.value": np.column_stack([np.zeros_like(z), np.zeros_like(z), z])}
    expected = _reference_lookup_indices(table, expt)
    i0, i1 = absorption_lookup_indices(table, expt, 2, n_threads=n_threads)
    np.testing.assert_array_equal(i0, expected[0])
    np.testing.assert_array_equal(i1, expected[1])
