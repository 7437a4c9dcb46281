"""LookupHarmonicsTerm: absorption harmonics formed from the lookup grid's separable factors.

The term holds two int32 grid indices per row and forms h_k = (T[i0, k] + T[i1, k]) / 2 from
the factor tables (T[t·n_phi + j, k] = A[t, k]·B[j, k]); these tests pin it to the table path
(harmonics_from_lookup, the float64 HarmonicsTerm) and to the model block's contracts.

Two paths (``path``): "rows" forms each row's harmonics, so its scales and transposed product
are the float64 block's up to the scale's summation order (its transposed product bit for bit);
"grid" (the default for enough rows) goes through sums over the grid's θ rows (the φ factor of
harmonic (l, m) depends on m alone), so its scales differ from the rows' in the last bits and
its transposed product by rounding: those are checked against tight tolerances, and every path
of one term (scales, evaluate, the model block's calls, the fused normal equations) against
each other bit for bit.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from xtalscale import _core
from xtalscale._core import components as kern
from xtalscale._core import model_block as mb
from xtalscale.components import (
    ComponentModelBlock,
    SHLookupColumns,
    SHScaleComponent,
    ensure_sh_lookup_table,
    sh_lookup_data,
)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.fixture(scope="module")
def grid():
    """(factors, table) for lmax 4 at 2 points per degree (DIALS's grid)."""
    return kern.sph_harm_lookup_factors(4, 2), kern.sph_harm_lookup_table(4, 2)


def _indices(rng, n, size):
    return rng.integers(0, size, n).astype(np.int32), rng.integers(0, size, n).astype(np.int32)


def _table_rows(table, i0, i1, n_params):
    return kern.harmonics_from_lookup(i0.astype(np.int64), i1.astype(np.int64), table, n_params)


def _grouped(rng, n, group=8):
    offsets = np.arange(0, n + 1, group, dtype=np.int64)
    if offsets[-1] != n:
        offsets = np.append(offsets, n)
    return offsets, rng.uniform(10, 1000, n), rng.uniform(0.5, 2.0, n)


@pytest.mark.parametrize("lmax, ppd", [(4, 2), (2, 1), (3, 3)])
def test_factor_products_are_the_table_bit_for_bit(lmax, ppd):
    f = kern.sph_harm_lookup_factors(lmax, ppd)
    table = kern.sph_harm_lookup_table(lmax, ppd)
    assert (f.n_theta, f.n_phi, f.n_params) == (180 * ppd, 360 * ppd, lmax * lmax + 2 * lmax)
    product = f.theta_factors[:, None, :] * f.phi_factors[None, :, :]
    np.testing.assert_array_equal(product.reshape(-1, f.n_params), table)
    assert not f.theta_factors.flags.writeable


def test_every_grid_point_gives_the_table_rows_bit_for_bit(grid):
    """All 259 200 indices on both sides: the index split (a multiply and shift for the
    division by n_phi) and the products, against the table's rows averaged."""
    f, table = grid
    i0 = np.arange(f.grid_size, dtype=np.int32)
    i1 = i0[::-1].copy()
    term = mb.LookupHarmonicsTerm(f, i0, i1, 24)
    s, values = term.evaluate(np.zeros(24))
    np.testing.assert_array_equal(values.reshape(-1, 24), _table_rows(table, i0, i1, 24))
    np.testing.assert_array_equal(s, 1.0)


def test_a_smaller_lmax_reads_the_leading_harmonics(grid, rng):
    f, table = grid
    i0, i1 = _indices(rng, 3000, f.grid_size)
    term = mb.LookupHarmonicsTerm(f, i0, i1, 8)  # lmax 2 from the lmax-4 factors
    c = rng.normal(size=8) * 0.05
    _, values = term.evaluate(c)
    h = _table_rows(table, i0, i1, 8)
    np.testing.assert_array_equal(values.reshape(-1, 8), h)
    assert term.factors.n_params == 8  # a trimmed copy: rows of a fixed length
    np.testing.assert_allclose(term.scales(c), kern.sh_scales(h, c), rtol=1e-15, atol=0)


@pytest.mark.parametrize("level", [2, 1, 0])
@pytest.mark.parametrize("path", ["rows", "grid"])
def test_scales_and_transposed_product_against_the_float64_rows(grid, rng, level, path):
    """Scales: one order at every SIMD level (the same bits at each), within a few ulp of
    the float64 block's Eigen product (another summation order; by grid rows through F_m(θ)
    sums, see the class notes). The transposed product by rows: per column in row order by
    FMA on the same rows, so the float64 HarmonicsTerm's bits wherever that kernel uses FMA
    (levels 1 and 2); by grid rows another order (through the θ rows' sums), so within
    1e-13 of the largest entry."""
    f, table = grid
    n = 20_000
    i0, i1 = _indices(rng, n, f.grid_size)
    c = rng.normal(size=24) * 0.05
    u = rng.normal(size=n)
    h = _table_rows(table, i0, i1, 24)
    lookup = mb.ModelBlock(n)
    lookup.add_term(mb.LookupHarmonicsTerm(f, i0, i1, 24, path))
    held = mb.ModelBlock(n)
    held.add_term(mb.HarmonicsTerm(h))
    try:
        _core.set_simd_level(2)
        s_ref = mb.LookupHarmonicsTerm(f, i0, i1, 24, path).scales(c)
        _core.set_simd_level(level)
        term = mb.LookupHarmonicsTerm(f, i0, i1, 24, path)
        assert term.by_grid == (path == "grid")
        s = term.scales(c)
        np.testing.assert_array_equal(s, s_ref)  # the same bits at every level
        np.testing.assert_array_equal(term.evaluate(c)[0], s)
        np.testing.assert_array_equal(term.evaluate(c)[1].reshape(-1, 24), h)  # rows either way
        # |s − 1| ≤ Σ|c_k h_k| ≈ 0.5 here: a few ulp of 1
        np.testing.assert_allclose(s, kern.sh_scales(h, c), rtol=1e-15, atol=0)
        jt = lookup.transpose_product(c, u)
        jt_held = held.transpose_product(c, u)
        if level >= 1 and path == "rows":
            np.testing.assert_array_equal(jt, jt_held)
        else:  # the held block's plain path may leave the products unfused; grid: another order
            np.testing.assert_allclose(jt, jt_held, rtol=1e-13, atol=1e-13 * np.abs(jt_held).max())
    finally:
        _core.set_simd_level(2)


def test_the_paths_scales_agree_bit_for_bit_within_each_path(grid, rng):
    """By grid rows the scales come from one kernel whichever call asks: the term's scales()
    and evaluate(), a model block's evaluate(), evaluate_scales(), transpose_product() and
    functional_and_gradient() (any thread count), and the fused normal equations."""
    from xtalscale._core import fit as core_fit

    f, _ = grid
    n = 30_000
    i0, i1 = _indices(rng, n, f.grid_size)
    offsets, inten, w = _grouped(rng, n)
    c = rng.normal(size=24) * 0.05
    term = mb.LookupHarmonicsTerm(f, i0, i1, 24)
    assert term.by_grid  # the default for this many rows
    s = term.scales(c)
    block = mb.ModelBlock(n)
    block.add_term(term)
    got = [term.evaluate(c)[0]]
    for nt in (1, 2, 3):
        block.evaluate(c, nt)
        got.append(np.array(block.scales))
        block.evaluate_scales(c, nt)
        got.append(np.array(block.scales))
        block.transpose_product(c, np.ones(n), nt)
        got.append(np.array(block.scales))
        block.functional_and_gradient(c, offsets, inten, w, nt)
        got.append(np.array(block.scales))
        g_fused = core_fit.model_normal_equations(offsets, inten, w, [(block, c, 0, 0, np.arange(n))], 24,
                                                  n_threads=nt)[4]
        got.append(g_fused)
    for g in got:
        np.testing.assert_array_equal(g, s)
    rows = mb.LookupHarmonicsTerm(f, i0, i1, 24, "rows").scales(c)
    assert np.max(np.abs(rows - s)) <= 4 * np.finfo(float).eps  # the two paths: last bits only


def test_the_automatic_path_and_bad_paths(grid, rng):
    f, _ = grid
    small = _indices(rng, 1000, f.grid_size)  # under 4 rows per θ row (360)
    assert not mb.LookupHarmonicsTerm(f, *small, 24).by_grid
    assert mb.LookupHarmonicsTerm(f, *small, 24, "grid").by_grid
    assert mb.LookupHarmonicsTerm(f, *_indices(rng, 1440, f.grid_size), 24).by_grid
    assert not mb.LookupHarmonicsTerm(f, *_indices(rng, 5000, f.grid_size), 24, "rows").by_grid
    with pytest.raises(ValueError, match="path"):
        mb.LookupHarmonicsTerm(f, *small, 24, "cells")


@pytest.mark.parametrize("lmax, n_params", [(2, 8), (3, 15), (4, 20), (4, 5), (6, 48)])
def test_grid_rows_for_other_degrees(rng, lmax, n_params):
    """Lanes padded to whole registers (2·lmax rounded up to 8) and a partial last degree:
    scales and the transposed product against the table's rows, the same bits at every SIMD
    level."""
    f = kern.sph_harm_lookup_factors(lmax, 2)
    table = kern.sph_harm_lookup_table(lmax, 2)
    n = 5000
    i0, i1 = _indices(rng, n, f.grid_size)
    h = _table_rows(table, i0, i1, n_params)
    c = rng.normal(size=n_params) * 0.05
    u = rng.normal(size=n)
    results = []
    try:
        for level in (2, 1, 0):  # one order at every SIMD level: the same bits
            _core.set_simd_level(level)
            term = mb.LookupHarmonicsTerm(f, i0, i1, n_params, "grid")
            block = mb.ModelBlock(n)
            block.add_term(term)
            results.append((term.scales(c), block.transpose_product(c, u)))
    finally:
        _core.set_simd_level(2)
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])
    np.testing.assert_allclose(results[0][0], kern.sh_scales(h, c), rtol=1e-15, atol=0)
    ref = h.T @ u
    np.testing.assert_allclose(results[0][1], ref, rtol=0, atol=1e-13 * np.abs(ref).max())


def _fg_by_three_calls(block, params, offsets, inten, w):
    from xtalscale._core import fit as core_fit

    n = inten.size
    block.evaluate_scales(params)
    g = np.array(block.scales)
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    f, dfdg, _ = core_fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)])
    return f, block.transpose_product(params, dfdg)


@pytest.mark.parametrize("path", ["rows", "grid"])
def test_one_pass_gradient_matches_the_three_calls_and_finite_differences(grid, rng, path):
    f, _ = grid
    n = 30_000
    i0, i1 = _indices(rng, n, f.grid_size)
    offsets, inten, w = _grouped(rng, n)
    block = mb.ModelBlock(n)
    block.add_term(mb.LookupHarmonicsTerm(f, i0, i1, 24, path))
    c = rng.normal(size=24) * 0.05
    f1, g1 = block.functional_and_gradient(c, offsets, inten, w)
    f3, g3 = _fg_by_three_calls(block, c, offsets, inten, w)
    assert f1 == pytest.approx(f3, rel=1e-14)
    np.testing.assert_allclose(g1, g3, rtol=0, atol=1e-13 * np.abs(g3).max())
    step = 1e-6
    for k in (0, 7, 23):
        up, down = c.copy(), c.copy()
        up[k] += step
        down[k] -= step
        fd = (block.functional_and_gradient(up, offsets, inten, w)[0]
              - block.functional_and_gradient(down, offsets, inten, w)[0]) / (2 * step)
        assert fd == pytest.approx(g1[k], rel=1e-6, abs=1e-6 * np.abs(g1).max())


@pytest.mark.parametrize("path", ["rows", "grid"])
def test_thread_counts_give_the_same_bits(grid, rng, path):
    f, _ = grid
    n = 40_000
    i0, i1 = _indices(rng, n, f.grid_size)
    offsets, inten, w = _grouped(rng, n)
    block = mb.ModelBlock(n)
    block.add_term(mb.LookupHarmonicsTerm(f, i0, i1, 24, path))
    c = rng.normal(size=24) * 0.05
    u = rng.normal(size=n)
    results = []
    for nt in (1, 2, 3):
        fv, grad = block.functional_and_gradient(c, offsets, inten, w, nt)
        g_fg = np.array(block.scales)
        jt = block.transpose_product(c, u, nt)
        block.evaluate_scales(c, nt)
        results.append((fv, grad, g_fg, jt, np.array(block.scales)))
    for other in results[1:]:
        assert other[0] == results[0][0]
        for a, b in zip(other[1:], results[0][1:]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][2], results[0][4])  # g of f+g = evaluate_scales'


def test_bad_input_is_named(grid):
    f, _ = grid
    ok = np.zeros(4, np.int32)
    bad = np.array([0, 1, f.grid_size, 2], np.int32)
    with pytest.raises(IndexError, match="s0_lookup.*row 2"):
        mb.LookupHarmonicsTerm(f, bad, ok, 24)
    with pytest.raises(IndexError, match="s1_lookup"):
        mb.LookupHarmonicsTerm(f, ok, np.array([0, -1, 0, 0], np.int32), 24)
    with pytest.raises(ValueError, match="same length"):
        mb.LookupHarmonicsTerm(f, ok, ok[:3].copy(), 24)
    with pytest.raises(ValueError, match="n_params"):
        mb.LookupHarmonicsTerm(f, ok, ok, 25)
    with pytest.raises(ValueError, match="n_params"):
        mb.LookupHarmonicsTerm(f, ok, ok, 0)
    with pytest.raises(TypeError, match="int32"):
        mb.LookupHarmonicsTerm(f, ok.astype(np.int64), ok, 24)
    with pytest.raises(ValueError, match="lmax"):
        kern.sph_harm_lookup_factors(0, 2)
    with pytest.raises(ValueError, match="points_per_degree"):
        kern.sph_harm_lookup_factors(4, 0)
    term = mb.LookupHarmonicsTerm(f, ok, ok, 24)
    with pytest.raises(ValueError, match="parameters"):
        term.scales(np.full(24, np.nan))


def _large_component(rng, n=3000):
    comp = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    comp.float32_min_reflections = 0  # the large-data regime
    comp.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    comp.update_reflection_data()
    return comp


def test_component_uses_the_factors_of_its_own_table(rng):
    ensure_sh_lookup_table(4)  # xtalscale's own table, built (unbuilt: see test_golden_dials_scales)
    comp = _large_component(rng)
    assert isinstance(SHScaleComponent.coefficients_list, SHLookupColumns)
    assert type(comp.model_term(0)).__name__ == "LookupHarmonicsTerm"
    i0, i1 = (comp.data[k] for k in ("s0_lookup", "s1_lookup"))
    table = np.stack(SHScaleComponent.coefficients_list, axis=1)
    h = _table_rows(table, i0, i1, 24)
    s, d = comp.calculate_scales_and_derivatives()
    np.testing.assert_array_equal(d.toarray(), h)
    np.testing.assert_array_equal(comp.dense_harmonic_values(), h)
    np.testing.assert_array_equal(np.column_stack(comp.harmonic_values[0]), h)
    block = ComponentModelBlock([comp])
    np.testing.assert_array_equal(block.evaluate_scales(), s)  # the model block's bits
    clone = pickle.loads(pickle.dumps(comp))
    assert type(clone.model_term(0)).__name__ == "LookupHarmonicsTerm"
    np.testing.assert_array_equal(clone.calculate_scales(), s)
    assert pickle.loads(pickle.dumps(SHScaleComponent.coefficients_list)) is not None


def test_a_user_assigned_table_keeps_the_float32_block(rng, monkeypatch):
    ensure_sh_lookup_table(4)  # the class table exists
    own = SHScaleComponent.coefficients_list
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", list(own))  # factors unknown
    comp = _large_component(rng)
    assert type(comp.model_term(0)).__name__ == "HarmonicsTerm"
    assert comp.dense_harmonic_values().dtype == np.float32
    edited = SHLookupColumns(list(own), own.factors)
    edited[0] = np.array(own[0])  # an edited list is a user table too
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", edited)
    assert type(_large_component(rng).model_term(0)).__name__ == "HarmonicsTerm"


def test_new_data_drops_the_factored_form(rng):
    """A component that formed its rows from the grid's factors and is then given exact
    harmonics (as the report's absorption map does to a copy of a job's component) evaluates
    those, not its old blocks."""
    comp = _large_component(rng)
    assert type(comp.model_term(0)).__name__ == "LookupHarmonicsTerm"
    angles = kern.calc_theta_phi(rng.normal(size=(50, 3)))
    exact = kern.sph_harm_table(angles, angles, 4)
    del comp.float32_min_reflections  # (the class default: 50 rows keep float64 harmonics)
    comp.data = {"sph_harm_table": exact.T}
    comp.update_reflection_data()
    np.testing.assert_array_equal(comp.calculate_scales(), kern.sh_scales(exact, comp.parameters))
