"""The hand-vectorised paths of the matrix-free f+g (model block g, target kernel, transposed
product): every SIMD level gives the same bits, for any thread count, and the results match
simple references (the CSR Jacobian's Jᵀc, numpy sums)."""

from __future__ import annotations

import numpy as np
import pytest

from xtalscale import _core as core
from xtalscale._core import model_block as mb
from xtalscale.components import (
    ComponentModelBlock,
    SHScaleComponent,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    sh_lookup_data,
)


def at_every_simd_level(fn):
    """fn() at each SIMD level the CPU has (levels it lacks clamp to its widest), widest last."""
    widest = core.simd_level()
    results = []
    try:
        for level in range(widest + 1):
            core.set_simd_level(level)
            results.append(fn())
    finally:
        core.set_simd_level(widest)
    return results


def harmonics_block(h):
    block = mb.ModelBlock(h.shape[0])
    block.add_term(mb.HarmonicsTerm(h))
    return block


def reference_transpose(block, params, c):
    """Jᵀc from evaluate()'s CSR matrix, with the scale Σ|J||c| of its rounding."""
    block.evaluate(params)
    n, m = block.n_rows, block.n_cols
    dense = np.zeros((n, m))
    indptr, indices, values = np.asarray(block.indptr), np.asarray(block.indices), np.asarray(block.values)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    dense[rows, indices] = values
    return dense.T @ c, np.abs(dense).T @ np.abs(c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [8, 24, 40, 48, 72, 15])
def test_dense_transpose_product_same_bits_at_every_level_and_thread_count(dtype, width):
    """(∂g/∂p)ᵀc of a harmonics term: the AVX-512, AVX2 and plain column sums run in one order
    (row order, one FMA per row), so all levels and thread counts give the same bits; they
    equal Jᵀc of the CSR derivatives to rounding. 9,000 rows: two full chunks and a partial
    one; widths beyond 32 columns take two register groups."""
    rng = np.random.default_rng(width)
    h = rng.standard_normal((9000, width)).astype(dtype)
    params = rng.standard_normal(width) * 0.05
    c = rng.standard_normal(9000)
    block = harmonics_block(h)
    results = at_every_simd_level(lambda: [block.transpose_product(params, c, nt) for nt in (1, 2, 3)])
    for per_level in results:
        for got in per_level:
            assert np.array_equal(got, results[-1][0])
    expected, scale = reference_transpose(block, params, c)
    assert np.all(np.abs(results[-1][0] - expected) <= 1e-13 * scale + 1e-300)


def physical_block(n, rng, far=0):
    """Lean scale (first parameter fixed) and decay smoothers and harmonics formed from the
    lookup grid's factors, as the large-data regime builds them; @p far rows at random places lie far outside the smoothers'
    range (the direct formula, row by row among the SIMD lanes)."""
    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 20))
    scale.fix_initial_parameter()
    decay = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 15))
    sh = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    for comp in (scale, decay):
        comp.lean_min_reflections = 0
    sh.float32_min_reflections = 0
    x_scale, x_decay = rng.uniform(0, 36, n), rng.uniform(0, 36, n)
    for x in (x_scale, x_decay):
        x[rng.choice(n, far, replace=False)] = rng.choice([-1e6, -300.0, 400.0, 1e6], far)
    scale.data = {"x": x_scale}
    decay.data = {"x": x_decay, "d": rng.uniform(0.8, 4.0, n)}
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    for comp in (scale, decay, sh):
        comp.update_reflection_data()
    block = ComponentModelBlock([scale, decay, sh])
    assert [type(block.core.term(i)).__name__ for i in range(3)] == ["LeanSmoothTerm", "LeanSmoothTerm", "LookupHarmonicsTerm"]
    return block


@pytest.mark.parametrize("far", [0, 40])
def test_physical_model_f_g_same_bits_at_every_level_and_thread_count(far):
    """g, ∂g/∂p and (∂g/∂p)ᵀc of a physical model (lean scale and decay in SIMD lanes, lookup
    harmonics from the grid's factors): the same bits at every SIMD level and thread count; Jᵀc of evaluate()'s CSR to
    rounding."""
    rng = np.random.default_rng(5 + far)
    n = 10003
    block = physical_block(n, rng, far)
    c = rng.standard_normal(n)

    def run():
        out = []
        for nt in (1, 2):
            g = np.array(block.evaluate_scales(nt))
            t = block.transpose_product(c, nt)
            gj, jac = block.evaluate(nt)
            out.append((g, t, np.array(gj), np.array(jac.as_scipy().data)))
        return out

    results = at_every_simd_level(run)
    g0, t0, _, v0 = results[-1][0]
    for per_level in results:
        for g, t, gj, v in per_level:
            assert np.array_equal(g, g0) and np.array_equal(gj, g0)
            assert np.array_equal(t, t0) and np.array_equal(v, v0)
    g, jac = block.evaluate()
    np.testing.assert_array_equal(g0, g)
    j = jac.as_scipy()
    expected, scale = j.T @ c, abs(j).T @ np.abs(c)
    assert np.all(np.abs(t0 - expected) <= 1e-13 * scale + 1e-300)


def grouped_table(n, rng):
    sizes = rng.integers(1, 12, size=n)
    sizes = sizes[np.cumsum(sizes) <= n]
    sizes = np.append(sizes, n - sizes.sum()) if sizes.sum() < n else sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    inten = rng.uniform(1, 100, n)
    w = rng.uniform(0.1, 2.0, n)
    return offsets, inten, w


def numpy_target(offsets, inten, w, g):
    groups = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    wgg = np.bincount(groups, w * g * g)
    wgi = np.bincount(groups, w * g * inten)
    ih = np.where(wgg > 0, wgi / np.where(wgg > 0, wgg, 1), 0.0)[groups]
    r = inten - g * ih
    return np.sum(w * r * r), -2 * w * r * ih, ih


@pytest.mark.parametrize("table_rows", [False, True])
def test_scale_gradient_matches_numpy_with_and_without_a_row_map(table_rows):
    """functional_and_scale_gradient reads a table-ordered block's scales in place; with a
    row map it gathers them: both agree with numpy, and with each other bit for bit."""
    rng = np.random.default_rng(3)
    n = 5000
    offsets, inten, w = grouped_table(n, rng)
    g = rng.uniform(0.5, 1.5, n)
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    direct = core.fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)])
    rows = np.arange(n, dtype=np.int64)
    mapped = core.fit.functional_and_scale_gradient(
        offsets, inten, w, [(g, *empty, 0, 0, rows if table_rows else None)])
    assert direct[0] == mapped[0]
    assert np.array_equal(direct[1], mapped[1]) and np.array_equal(direct[2], mapped[2])
    f, dfdg, ih = numpy_target(offsets, inten, w, g)
    assert direct[0] == pytest.approx(f, rel=1e-12)
    np.testing.assert_allclose(direct[1], dfdg, rtol=1e-12, atol=1e-12 * np.abs(dfdg).max())
    np.testing.assert_allclose(direct[2], ih, rtol=1e-12)


def test_scale_gradient_still_refuses_bad_scales_and_rows():
    """The in-place path keeps the checks: a non-positive scale, a short block."""
    rng = np.random.default_rng(4)
    n = 100
    offsets, inten, w = grouped_table(n, rng)
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    g = np.ones(n)
    g[17] = 0.0
    with pytest.raises(ValueError, match="scale at row 17"):
        core.fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)])
    short = (np.ones(n - 1), np.zeros(n, np.int64), np.zeros(0, np.int32), np.zeros(0), 0, 0, None)
    with pytest.raises(ValueError, match="cover"):
        core.fit.functional_and_scale_gradient(offsets, inten, w, [short])


SPECIALS = [0.0, -0.0, -1e-300, -1.0, np.inf, -np.inf, np.nan, 5e-324, 1.0, np.finfo(float).max]


def refused(call, match):
    """True when call() raises ValueError naming @p match; False when it runs (or only finds
    the result overflowing, as a weight or scale of 1.8e308 may)."""
    try:
        call()
    except ValueError as e:
        if "overflowed" in str(e):
            return False
        assert match in str(e)
        return True
    return False


@pytest.mark.parametrize("value", SPECIALS)
def test_vectorised_value_checks_accept_and_refuse_as_comparisons_do(value):
    """The integer-bit checks (weights finite and >= 0, scales finite and > 0) agree with the
    comparisons they replace, wherever the value is."""
    rng = np.random.default_rng(6)
    n = 1000
    offsets, inten, w = grouped_table(n, rng)
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    fit = core.fit
    for at in (0, 517, n - 1):
        w_bad = w.copy()
        w_bad[at] = value
        assert refused(lambda w_bad=w_bad: fit.functional_and_scale_gradient(
            offsets, inten, w_bad, [(np.ones(n), *empty, 0, 0, None)]), "weights") == (
            not (np.isfinite(value) and value >= 0))
        g = np.ones(n)
        g[at] = value
        assert refused(lambda g=g: fit.functional_and_scale_gradient(
            offsets, inten, w, [(g, *empty, 0, 0, None)]), f"scale at row {at}") == (
            not (np.isfinite(value) and value > 0))


@pytest.mark.parametrize("value", SPECIALS)
def test_smoothed_b_factor_check_agrees_with_comparisons(value):
    """smooth_1d_apply's factor (1/(2d²)) must be finite and > 0, wherever the bad value is."""
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 10, 50)
    setup = (x, 0.0, (0.0, 10.0), 10, 3, 0.7)
    window, q = core.components.smooth_1d_prepare(*setup)
    p = rng.uniform(-0.5, 0.5, 12)
    ok = bool(np.isfinite(value) and value > 0)
    for at in (0, 33, 49):
        factor = rng.uniform(0.1, 1.0, 50)
        factor[at] = value
        if ok:
            core.components.smooth_1d_apply(*setup, window, q, p, factor=factor)
        else:
            with pytest.raises(ValueError, match="factor"):
                core.components.smooth_1d_apply(*setup, window, q, p, factor=factor)


def three_call_f_g(block, offsets, inten, w):
    """The matrix-free f+g of three calls: g, the target's ∂f/∂g, the transposed product."""
    n = inten.size
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    g = block.evaluate_scales()
    f, dfdg, _ = core.fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)])
    return f, block.transpose_product(dfdg)


@pytest.mark.parametrize("long_group", [False, True])
def test_fused_functional_and_gradient_matches_the_three_calls(long_group):
    """ModelBlock.functional_and_gradient (one pass over chunks of whole groups) gives the
    three calls' f and gradient to rounding, the same g bit for bit, and the same bits at every
    SIMD level and thread count; a group longer than a chunk is a chunk of its own."""
    rng = np.random.default_rng(9)
    n = 12000
    offsets, inten, w = grouped_table(n, rng)
    if long_group:  # rows 3000..8999 one group
        offsets = np.unique(np.concatenate([offsets[(offsets <= 3000) | (offsets >= 9000)], [3000, 9000]]))
    w[rng.choice(n, 50, replace=False)] = 0.0
    block = physical_block(n, rng)
    f_ref, grad_ref = three_call_f_g(block, offsets, inten, w)
    g_ref = np.array(block.scales)
    params = block.parameters()
    results = at_every_simd_level(
        lambda: [block.core.functional_and_gradient(params, offsets, inten, w, nt) for nt in (1, 2, 3)])
    f0, grad0 = results[-1][0]
    for per_level in results:
        for f, grad in per_level:
            assert f == f0 and np.array_equal(grad, grad0)
    assert not block.core.evaluated
    np.testing.assert_array_equal(np.array(block.scales), g_ref)
    assert f0 == pytest.approx(f_ref, rel=1e-13)
    assert np.max(np.abs(grad0 - grad_ref)) <= 1e-12 * np.max(np.abs(grad_ref))


def test_fused_f_g_with_far_points_same_bits_at_every_level_and_thread_count():
    """Far points (the direct formula, row by row) among the lean smoothers' SIMD lanes, which
    go two blocks of eight at a time in the one-pass f+g: the same f, gradient and g at every
    SIMD level and thread count, g that of evaluate_scales()."""
    rng = np.random.default_rng(21)
    n = 9001
    offsets, inten, w = grouped_table(n, rng)
    block = physical_block(n, rng, far=60)
    g_ref = np.array(block.evaluate_scales())
    params = block.parameters()

    def run():
        out = []
        for nt in (1, 2):
            f, grad = block.core.functional_and_gradient(params, offsets, inten, w, nt)
            out.append((f, grad, np.array(block.scales)))
        return out

    results = at_every_simd_level(run)
    f0, grad0, _ = results[-1][0]
    for per_level in results:
        for f, grad, g in per_level:
            assert f == f0 and np.array_equal(grad, grad0)
            np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("n_intervals", [10, 22, 40])  # 12, 24 and 42 smoother values
@pytest.mark.parametrize("b_factor", [False, True])
def test_lean_fused_rows_read_the_values_in_registers_or_by_gather(n_intervals, b_factor):
    """The lean kernel's lanes read a smoother's values held in registers (up to 32 values)
    or gathered (more): the one-pass f+g of a lean term gives the row-by-row scales bit for
    bit (smooth_1d_apply writing its pattern), and the same f and gradient at every level."""
    rng = np.random.default_rng(22 + n_intervals)
    n = 3001
    x = rng.uniform(0, 10, n)
    setup = (x, 0.0, (0.0, 10.0), n_intervals, 3, 0.7)
    kern = core.components
    window, q = kern.smooth_1d_prepare(*setup)
    n_values = n_intervals + 2
    p = rng.uniform(-0.3, 0.3, n_values) if b_factor else rng.uniform(0.8, 1.2, n_values)
    factor = rng.uniform(0.03, 0.8, n) if b_factor else None
    ref_s = kern.smooth_1d_apply(*setup, window, q, p, factor=factor)[0]
    block = mb.ModelBlock(n)
    block.add_term(mb.LeanSmoothTerm(*setup, window, q, False, factor))
    offsets, inten, w = grouped_table(n, rng)

    def run():
        f, grad = block.functional_and_gradient(p, offsets, inten, w)
        return f, grad, np.array(block.scales)

    results = at_every_simd_level(run)
    for f, grad, g in results:
        np.testing.assert_array_equal(g, ref_s)
        assert f == results[-1][0] and np.array_equal(grad, results[-1][1])


@pytest.mark.parametrize("bad_row", [5, 1031, 1035])  # a full block of lanes, its last lane, the tail
def test_smoothed_b_exponent_out_of_range_takes_std_exp_at_every_level(bad_row):
    """A block of rows (256) with an exponent outside [−700, 700] goes through std::exp as a
    whole at every SIMD level (overflow to inf as IEEE says), wherever the row lies among
    the lanes and the last partial lanes: the same bits at every level."""
    rng = np.random.default_rng(24)
    n = 1037  # the last block of 256 rows ends in 8 + 5 lanes
    x = rng.uniform(0, 10, n)
    setup = (x, 0.0, (0.0, 10.0), 10, 3, 0.7)
    kern = core.components
    window, q = kern.smooth_1d_prepare(*setup)
    p = rng.uniform(0.3, 0.5, 12)  # B > 0 everywhere
    factor = rng.uniform(0.03, 0.8, n)
    factor[bad_row] = 1e4  # B·f > 700
    results = at_every_simd_level(lambda: kern.smooth_1d_apply(*setup, window, q, p, factor=factor,
                                                               derivatives=False)[0])
    for s in results:
        assert s[bad_row] == np.inf
        np.testing.assert_array_equal(s, results[-1])
    # the block's other rows: std::exp's values, within exp_bounded's ~2 ulp of them
    factor[bad_row] = 0.5
    in_range = kern.smooth_1d_apply(*setup, window, q, p, factor=factor, derivatives=False)[0]
    block = np.r_[bad_row // 256 * 256:min(bad_row // 256 * 256 + 256, n)]
    block = block[block != bad_row]
    np.testing.assert_allclose(results[-1][block], in_range[block], rtol=5e-16, atol=0)


def test_fused_functional_and_gradient_of_a_physical_model_names_bad_rows():
    """A physical model's chunks check g, the weights and the intensities in one pass: each
    fault is still refused with its own message."""
    rng = np.random.default_rng(23)
    n = 5000
    offsets, inten, w = grouped_table(n, rng)
    block = physical_block(n, rng)
    params = block.parameters()
    for bad, match in ((np.nan, "intensities"), (np.inf, "intensities")):
        i_bad = inten.copy()
        i_bad[4321] = bad
        with pytest.raises(ValueError, match=match):
            block.core.functional_and_gradient(params, offsets, i_bad, w)
    for bad in (np.inf, -1.0, np.nan):
        w_bad = w.copy()
        w_bad[17] = bad
        with pytest.raises(ValueError, match="weights"):
            block.core.functional_and_gradient(params, offsets, inten, w_bad)
    negative = params.copy()
    negative[block.core.parameter_start(0):block.core.parameter_start(1)] *= -1.0  # the scale smoother
    with pytest.raises(ValueError, match="scale g is not finite and > 0"):
        block.core.functional_and_gradient(negative, offsets, inten, w)
    f, grad = block.core.functional_and_gradient(params, offsets, inten, w)
    assert np.isfinite(f) and np.all(np.isfinite(grad))


def test_fused_functional_and_gradient_refuses_bad_input():
    rng = np.random.default_rng(10)
    n = 500
    offsets, inten, w = grouped_table(n, rng)
    block = physical_block(n, rng)
    params = block.parameters()
    with pytest.raises(ValueError, match="one row per block row"):
        block.core.functional_and_gradient(params, *grouped_table(n - 1, rng))
    with pytest.raises(ValueError, match="weights"):
        block.core.functional_and_gradient(params, offsets, inten, -w)
    with pytest.raises(ValueError, match="params"):
        block.core.functional_and_gradient(params[:-1], offsets, inten, w)
    empty = mb.ModelBlock(0)
    f, grad = empty.functional_and_gradient(np.zeros(0), np.zeros(1, np.int64), np.zeros(0), np.zeros(0))
    assert f == 0.0 and grad.size == 0


def test_fused_functional_and_gradient_refuses_a_non_positive_scale():
    rng = np.random.default_rng(12)
    n = 300
    offsets, inten, w = grouped_table(n, rng)
    block = harmonics_block(np.abs(rng.standard_normal((n, 8))) + 0.1)
    with pytest.raises(ValueError, match="scale g is not finite and > 0"):
        block.functional_and_gradient(np.full(8, -5.0), offsets, inten, w)
    f, grad = block.functional_and_gradient(np.full(8, 0.01), offsets, inten, w)
    assert np.isfinite(f) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("first_fixed", [False, True])
@pytest.mark.parametrize("b_factor", [False, True])
def test_lean_kernel_lanes_give_the_row_by_row_bits(first_fixed, b_factor):
    """smooth_1d_apply writing its pattern goes row by row (the plain path); without the
    pattern, or with derivatives off, rows go in SIMD lanes at levels 1 and 2: the same scales
    and derivative values bit for bit, far points included, for partial blocks of lanes."""
    rng = np.random.default_rng(13)
    n = 1037
    x = rng.uniform(0, 10, n)
    x[rng.choice(n, 9, replace=False)] = rng.choice([-1e6, -40.0, 50.0, 1e6], 9)
    setup = (x, 0.0, (0.0, 10.0), 10, 3, 0.7)
    kern = core.components
    window, q = kern.smooth_1d_prepare(*setup)
    p = rng.uniform(-0.5, 0.5, 12) if b_factor else rng.uniform(0.8, 1.2, 12)
    factor = rng.uniform(0.03, 0.8, n) if b_factor else None
    ref_s, ip, ix, ref_d, nnz = kern.smooth_1d_apply(*setup, window, q, p, first_fixed=first_fixed,
                                                     factor=factor)

    def lanes():
        s, _, _, d, m = kern.smooth_1d_apply(*setup, window, q, p, first_fixed=first_fixed, factor=factor,
                                             indptr_out=ip.copy(), indices_out=ix.copy(), write_pattern=False)
        s_only = kern.smooth_1d_apply(*setup, window, q, p, first_fixed=first_fixed, factor=factor,
                                      derivatives=False)[0]
        return s, d[:m], m, s_only

    for s, d, m, s_only in at_every_simd_level(lanes):
        assert m == nnz
        assert np.array_equal(s, ref_s) and np.array_equal(s_only, ref_s)
        assert np.array_equal(d, ref_d[:nnz])
