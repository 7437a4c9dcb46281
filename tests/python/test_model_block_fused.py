"""The one-pass f+g (ModelBlock.functional_and_gradient) and the chunked transposed product
through the terms' fused hooks: the lean smoother's fixed-stride weights and per-window-start
accumulators, g written from a cached workspace, the table checked on the rows the pass reads,
and lean terms that hold no coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from test_model_block_speed_paths import at_every_simd_level, grouped_table, physical_block, reference_transpose

from xtalscale import _core as core
from xtalscale._core import model_block as mb


def csr_f_g(block, params, offsets, inten, w):
    """f and ∂f/∂p through evaluate()'s CSR derivatives (the target kernel reads them)."""
    block.evaluate(params)
    n = block.n_rows
    one = (np.array(block.scales), np.asarray(block.indptr), np.asarray(block.indices),
           np.asarray(block.values), block.n_cols, 0, None)
    f, grad = core.fit.functional_and_gradient(offsets, inten, w, [one], block.n_cols)[:2]
    assert n == inten.size
    return f, grad


@pytest.mark.parametrize("far", [0, 30])
def test_fused_f_g_matches_the_csr_gradient_and_is_the_same_for_every_thread_count(far):
    """With rows far outside the smoothers' range (direct formula) or none: the same bits for
    1, 2 and 3 threads and at every SIMD level, f and ∂f/∂p of the CSR route to rounding, and g
    equal to evaluate_scales()'s bit for bit."""
    rng = np.random.default_rng(21 + far)
    n = 15001
    offsets, inten, w = grouped_table(n, rng)
    block = physical_block(n, rng, far)
    params = block.parameters()
    core_block = block.core
    f_ref, grad_ref = csr_f_g(core_block, params, offsets, inten, w)
    core_block.evaluate_scales(params)
    g_ref = np.array(core_block.scales)
    results = at_every_simd_level(
        lambda: [core_block.functional_and_gradient(params, offsets, inten, w, nt) for nt in (1, 2, 3)])
    f0, grad0 = results[-1][0]
    for per_level in results:
        for f, grad in per_level:
            assert f == f0 and np.array_equal(grad, grad0)
    np.testing.assert_array_equal(np.array(core_block.scales), g_ref)
    assert f0 == pytest.approx(f_ref, rel=1e-13)
    assert np.max(np.abs(grad0 - grad_ref)) <= 1e-12 * np.max(np.abs(grad_ref))


@pytest.mark.parametrize("first_fixed", [False, True])
@pytest.mark.parametrize("b_factor", [False, True])
@pytest.mark.parametrize("n_intervals", [1, 2, 3, 12, 40])
def test_lean_fused_transpose_matches_the_csr_product(first_fixed, b_factor, n_intervals):
    """A lean term's chunked transposed product (fixed-stride weights, four accumulators per
    window start): Jᵀc of its CSR derivatives to rounding for every window bound (1 to 5
    values, so strides 4 and 8), first parameter fixed or not, linear or smoothed B; the same
    bits at every SIMD level and thread count."""
    rng = np.random.default_rng(n_intervals + 10 * first_fixed + 100 * b_factor)
    n = 9001
    x = rng.uniform(-2.0, 12.0, n)
    x[:5] = [-1e6, -300.0, 400.0, 1e6, 5.0]  # far rows, direct formula
    setup = (x, 0.0, (0.0, 10.0), n_intervals, 3, 0.7)
    window, q = core.components.smooth_1d_prepare(*setup)
    factor = rng.uniform(0.02, 0.8, n) if b_factor else None
    term = mb.LeanSmoothTerm(*setup, window, q, first_fixed, factor)
    block = mb.ModelBlock(n)
    block.add_term(term)
    params = rng.uniform(0.5, 1.5, term.n_params) if not b_factor else rng.uniform(-0.5, 0.5, term.n_params)
    c = rng.standard_normal(n)
    results = at_every_simd_level(lambda: [block.transpose_product(params, c, nt) for nt in (1, 2)])
    for per_level in results:
        for got in per_level:
            assert np.array_equal(got, results[-1][0])
    expected, scale = reference_transpose(block, params, c)
    assert np.all(np.abs(results[-1][0] - expected) <= 1e-13 * scale + 1e-300)


def test_lean_term_holds_no_coordinates():
    """10 B a row (window record and q), 18 with a B factor, plus 16 B per far row; the
    coordinates array is not kept alive by the term."""
    rng = np.random.default_rng(3)
    n = 1000
    x = rng.uniform(0, 10, n)
    x[[3, 500]] = [-1e6, 1e6]
    setup = (x, 0.0, (0.0, 10.0), 10, 3, 0.7)
    window, q = core.components.smooth_1d_prepare(*setup)
    assert np.isnan(q).sum() == 2
    linear = mb.LeanSmoothTerm(*setup, window, q)
    assert linear.nbytes == 10 * n + 2 * 16
    b = mb.LeanSmoothTerm(*setup, window, q, False, rng.uniform(0.1, 1.0, n))
    assert b.nbytes == 18 * n + 2 * 16
    # the far rows' coordinates were copied: overwriting the caller's array changes nothing
    block = mb.ModelBlock(n)
    block.add_term(linear)
    params = rng.uniform(0.5, 1.5, linear.n_params)
    block.evaluate_scales(params)
    g0 = np.array(block.scales)
    x[:] = 0.0
    block.evaluate_scales(params)
    np.testing.assert_array_equal(np.array(block.scales), g0)


def test_lean_term_refuses_bad_windows_and_factors():
    rng = np.random.default_rng(4)
    n = 50
    x = rng.uniform(0, 10, n)
    setup = (x, 0.0, (0.0, 10.0), 10, 3, 0.7)
    window, q = core.components.smooth_1d_prepare(*setup)
    bad = window.copy()
    bad[7] = (400 << 3) | 3  # first value 400 of 12
    with pytest.raises(ValueError, match="window record of row 7"):
        mb.LeanSmoothTerm(*setup, bad, q)
    bad = window.copy()
    bad[9] = (0 << 3) | 7  # 7 values: more than the window bound
    with pytest.raises(ValueError, match="window record of row 9"):
        mb.LeanSmoothTerm(*setup, bad, q)
    for value in (0.0, -1.0, np.inf, np.nan):
        factor = rng.uniform(0.1, 1.0, n)
        factor[11] = value
        with pytest.raises(ValueError, match="b_factor"):
            mb.LeanSmoothTerm(*setup, window, q, False, factor)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_f_g_names_a_bad_table(n_threads):
    """The table is checked by the pass itself (not beforehand): a non-finite intensity, a
    negative or non-finite weight and broken offsets are named as before, for any thread count,
    and before a scale fault elsewhere."""
    rng = np.random.default_rng(13)
    n = 9000
    offsets, inten, w = grouped_table(n, rng)
    model = physical_block(n, rng)
    block, params = model.core, model.parameters()
    for at in (0, 4500, n - 1):
        bad = inten.copy()
        bad[at] = np.nan
        with pytest.raises(ValueError, match="intensities must be finite"):
            block.functional_and_gradient(params, offsets, bad, w, n_threads)
        bad = w.copy()
        bad[at] = -1.0
        with pytest.raises(ValueError, match=f"weights must be >= 0 \\(row {at}\\)"):
            block.functional_and_gradient(params, offsets, inten, bad, n_threads)
        bad[at] = np.inf
        with pytest.raises(ValueError, match="weights must be finite"):
            block.functional_and_gradient(params, offsets, inten, bad, n_threads)
    broken = offsets.copy()
    broken[5] = broken[7]
    with pytest.raises(ValueError, match="non-decreasing"):
        block.functional_and_gradient(params, broken, inten, w, n_threads)
    short = offsets.copy()
    short[-1] -= 1
    with pytest.raises(ValueError, match="end at the observation count"):
        block.functional_and_gradient(params, short, inten, w, n_threads)
    start = offsets.copy()
    start[0] = 1
    with pytest.raises(ValueError, match=r"group_offsets\[0\] must be 0"):
        block.functional_and_gradient(params, start, inten, w, n_threads)
