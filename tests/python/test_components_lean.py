"""Large-data ("lean") paths of the physical model's components.

* SH absorption in the lookup regime holds a float32 harmonic block (no column pattern);
* 1-D smoothers above ``lean_min_reflections`` hold no weights, only the normalised
  coordinate and a 10-byte window record per reflection, and recompute the weights per call.

The thresholds are lowered per instance so the tests run on small data. No timings here:
memory claims are checked through ``held_bytes()``.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xtalscale import _core as core
from xtalscale._core import components as kern
from xtalscale.components import (
    SHScaleComponent,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    ensure_sh_lookup_table,
    product_rule,
    sh_lookup_data,
)

F32_EPS = 2.0 ** -24  # unit roundoff of float32 (round to nearest)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def user_table(monkeypatch):
    """The class lookup table as a user-assigned plain list (the same columns): its factors are
    unknown to the component, which then holds the float32 block in the large-data regime."""
    ensure_sh_lookup_table(4)  # the class table exists
    monkeypatch.setattr(SHScaleComponent, "coefficients_list", list(SHScaleComponent.coefficients_list))


def _sh(rng, n, lmax=4, float32=True):
    """A lookup-mode component in the large-data regime (``float32``; with xtalscale's own
    table it forms its harmonics from the grid's factors, with ``user_table`` it holds a
    float32 block), or below it."""
    p = lmax * lmax + 2 * lmax
    comp = SHScaleComponent(rng.uniform(-0.05, 0.05, p))
    comp.float32_min_reflections = 0 if float32 else 10**12
    comp.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), lmax)
    comp.update_reflection_data()
    return comp


def test_sh_float32_block_within_float32_rounding_of_exact(rng, user_table):
    n = 3000
    fast = _sh(rng, n)
    exact = SHScaleComponent(fast.parameters.copy())
    exact.exact_harmonics = True
    exact.data = dict(fast.data)
    exact.update_reflection_data()
    s32, h32 = fast.calculate_scales_and_dense_derivatives()
    s64, h64 = exact.calculate_scales_and_dense_derivatives()
    assert h32.dtype == np.float32 and h64.dtype == np.float64 and h32.shape == (n, 24)
    # Each stored harmonic is the float64 value rounded once to float32.
    assert np.all(np.abs(h32 - h64) <= F32_EPS * np.abs(h64))
    # Scales: Σ C_k h_k accumulated in double from those values, so
    # |Δs| <= 2^-24 Σ |C_k h_k| (+ double rounding, far smaller).
    bound = F32_EPS * (np.abs(h64) @ np.abs(exact.parameters)) + 1e-15
    assert np.all(np.abs(s32 - s64) <= bound)
    # The scipy (DIALS-API) form holds the same values.
    s, d = fast.calculate_scales_and_derivatives()
    np.testing.assert_array_equal(s, s32)
    np.testing.assert_array_equal(d.toarray(), h32.astype(np.float64))
    np.testing.assert_array_equal(fast.calculate_scales(), s32)


def test_sh_float32_derivatives_match_finite_differences(rng):
    comp = _sh(rng, 500)
    s0, h = comp.calculate_scales_and_dense_derivatives()
    step = 1e-3
    for k in (0, 5, 23):
        p = comp.parameters.copy()
        p[k] += step
        comp.parameters = p
        s1 = comp.calculate_scales()
        p[k] -= step
        comp.parameters = p
        # The surface is linear in C: the difference quotient equals the column (to rounding).
        np.testing.assert_allclose((s1 - s0) / step, h[:, k], rtol=0, atol=1e-9)


def test_sh_held_bytes_float32_block_and_no_pattern(rng, user_table):
    n, p = 2000, 24
    comp = _sh(rng, n)
    assert comp.dense_harmonic_values().dtype == np.float32
    block = 4 * p * n
    lookups = 2 * 4 * n  # int32 grid indices kept in .data
    assert comp.held_bytes() == block + lookups
    comp.calculate_scales_and_derivatives()  # builds a CSR pattern for the caller ...
    assert comp.held_bytes() == block + lookups  # ... which is not kept
    assert not hasattr(SHScaleComponent, "_col_index")
    _, h = comp.calculate_scales_and_dense_derivatives()
    assert not h.flags.writeable  # a view of the held block, not a copy
    h2 = comp.calculate_scales_and_dense_derivatives()[1]
    assert np.shares_memory(h, h2)
    exact = _sh(rng, n, float32=False)
    exact.calculate_scales_and_derivatives()
    assert exact.held_bytes() == 8 * p * n + lookups  # float64 block below the threshold


def test_sh_held_bytes_factored_grid_indices_only(rng):
    """With xtalscale's own table the large-data regime holds the grid indices alone; matrices
    asked for are float64 rows built per call and not kept."""
    n = 2000
    comp = _sh(rng, n)
    lookups = 2 * 4 * n  # int32 grid indices kept in .data (one block: the same arrays)
    assert comp.held_bytes() == lookups
    s, h = comp.calculate_scales_and_dense_derivatives()
    assert h.dtype == np.float64 and not h.flags.writeable
    assert comp.held_bytes() == lookups
    assert not np.shares_memory(h, comp.calculate_scales_and_dense_derivatives()[1])
    np.testing.assert_array_equal(comp.calculate_scales(), s)


def test_sh_shared_table_is_reported_separately(rng):
    comp = _sh(rng, 10, float32=False)
    comp.calculate_scales()  # small lookup data read the class table: built on this first need
    assert SHScaleComponent.shared_table_bytes() >= 360 * 180 * 4 * 24 * 8


def _smooth_pair(rng, cls, n, fixed=False):
    n_par = 12
    made = []
    x = rng.uniform(0, 10, n)
    d = rng.uniform(0.8, 4.0, n)
    for lean in (True, False):
        comp = cls(rng.uniform(0.8, 1.2, n_par) if cls is SmoothScaleComponent1D
                   else rng.uniform(-0.5, 0.5, n_par))
        comp.lean_min_reflections = 0 if lean else 10**12
        if fixed:
            comp.fix_initial_parameter()
        comp.data = {"x": x} if cls is SmoothScaleComponent1D else {"x": x, "d": d}
        comp.update_reflection_data()
        made.append(comp)
    made[1].parameters = made[0].parameters.copy()
    return made


@pytest.mark.parametrize("cls", [SmoothScaleComponent1D, SmoothBScaleComponent1D])
@pytest.mark.parametrize("fixed", [False, True])
def test_lean_smoother_matches_exact_weights(rng, cls, fixed):
    lean, exact = _smooth_pair(rng, cls, 4000, fixed)
    s_l, d_l = lean.calculate_scales_and_derivatives()
    s_e, d_e = exact.calculate_scales_and_derivatives()
    # Product-form weights: a few ulp from DIALS's direct formula.
    np.testing.assert_allclose(s_l, s_e, rtol=1e-14, atol=0)
    assert d_l.shape == d_e.shape and d_l.nnz == d_e.nnz
    np.testing.assert_array_equal(d_l.indptr, d_e.indptr)
    np.testing.assert_array_equal(d_l.indices, d_e.indices)
    np.testing.assert_allclose(d_l.data, d_e.data, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(lean.calculate_scales(), s_e, rtol=1e-14, atol=0)


@pytest.mark.parametrize("cls", [SmoothScaleComponent1D, SmoothBScaleComponent1D])
def test_lean_smoother_derivatives_match_finite_differences(rng, cls):
    lean, _ = _smooth_pair(rng, cls, 600)
    s0, d = lean.calculate_scales_and_derivatives()
    d = d.toarray()
    step = 1e-6
    for k in (0, 4, 11):
        p = lean.parameters.copy()
        p[k] += step
        lean.parameters = p
        sp_ = lean.calculate_scales()
        p[k] -= 2 * step
        lean.parameters = p
        sm = lean.calculate_scales()
        p[k] += step
        lean.parameters = p
        np.testing.assert_allclose((sp_ - sm) / (2 * step), d[:, k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cls", [SmoothScaleComponent1D, SmoothBScaleComponent1D])
def test_lean_smoother_holds_no_weights(rng, cls):
    n = 5000
    lean, exact = _smooth_pair(rng, cls, n)
    lean.calculate_scales_and_derivatives()
    # normalised x (8 B) + window record (uint16) + q (float64) [+ 1/(2d²) for the B form];
    # x and d are the caller's.
    extra = 8 if cls is SmoothBScaleComponent1D else 0
    assert lean.held_bytes() == n * (8 + 2 + 8 + extra)
    exact.calculate_scales_and_derivatives()
    assert exact.held_bytes() > n * (8 + 12 + 24)  # the cached weight matrix


def test_lean_smoother_writes_into_caller_buffers(rng):
    lean, _ = _smooth_pair(rng, SmoothBScaleComponent1D, 3000)
    bufs = lean.derivative_buffers()
    s, d = lean.calculate_scales_and_derivatives(out=bufs)
    assert np.shares_memory(s, bufs[0]) and np.shares_memory(d.data, bufs[3])
    assert np.shares_memory(d.indices, bufs[2]) and np.shares_memory(d.indptr, bufs[1])
    s2, d2 = lean.calculate_scales_and_derivatives()
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(d.toarray(), d2.toarray())
    with pytest.raises(ValueError, match="out"):
        lean.calculate_scales_and_derivatives(out=bufs[:3])
    with pytest.raises(ValueError, match="data_out"):
        lean.calculate_scales_and_derivatives(out=(*bufs[:3], bufs[3][:10]))
    with pytest.raises(ValueError, match="indices_out"):
        lean.calculate_scales_and_derivatives(out=(bufs[0], bufs[1], bufs[2].astype(np.int64),
                                                   bufs[3]))
    _, exact = _smooth_pair(rng, SmoothScaleComponent1D, 10)
    with pytest.raises(ValueError, match="derivative_buffers"):
        exact.derivative_buffers()


def test_lean_product_rule_matches_exact(rng):
    n = 800
    scale, scale_e = _smooth_pair(rng, SmoothScaleComponent1D, n, fixed=True)
    decay, decay_e = _smooth_pair(rng, SmoothBScaleComponent1D, n)
    sh = _sh(rng, n)
    g, jac = product_rule([c.calculate_scales_and_derivatives() for c in (scale, decay, sh)])
    g_e, jac_e = product_rule([c.calculate_scales_and_derivatives() for c in (scale_e, decay_e, sh)])
    np.testing.assert_allclose(g, g_e, rtol=1e-14)
    assert sp.issparse(jac)
    np.testing.assert_allclose(jac.toarray(), jac_e.toarray(), rtol=1e-13, atol=1e-15)


def _kernel_args(x, n_intervals=10):
    return (x, 0.0, (0.0, float(n_intervals)), n_intervals, 3, 0.7)


def test_lean_kernels_match_dials_weights_outside_the_range(rng):
    # Points far outside the smoother's range: every DIALS weight underflows (a zero row) or
    # q^k would overflow; the lean kernels fall back to the direct formula there.
    x = np.concatenate([rng.uniform(0, 10, 200), [-1e6, 1e6, -30.0, 45.0, -3.0, 13.0]])
    p = rng.uniform(0.8, 1.2, 12)
    setup = _kernel_args(x)
    window, q = kern.smooth_1d_prepare(*setup)
    s_a, ip_a, ix_a, d_a, nnz_a = kern.smooth_1d_apply(*setup, window, q, p)
    w = kern.weight_matrix([x], [(0.0, 10.0)], [10], 3, 0.7, False)
    ref = w.values(p)
    np.testing.assert_allclose(s_a, ref, rtol=1e-14, atol=0)
    assert nnz_a == w.nnz
    np.testing.assert_array_equal(ip_a, np.asarray(w.indptr))
    np.testing.assert_array_equal(ix_a[:nnz_a], np.asarray(w.indices))
    np.testing.assert_allclose(d_a[:nnz_a], np.asarray(w.data), rtol=1e-13, atol=0)
    assert s_a[-6] == 0.0 and s_a[-5] == 0.0


def test_lean_kernels_validate_inputs(rng):
    x = rng.uniform(0, 10, 50)
    p = rng.uniform(0.8, 1.2, 12)
    setup = _kernel_args(x)
    window, q = kern.smooth_1d_prepare(*setup)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="x"):
        kern.smooth_1d_prepare(*_kernel_args(bad))
    with pytest.raises(ValueError, match="parameters"):
        kern.smooth_1d_apply(*setup, window, q, p[:5])
    with pytest.raises(ValueError, match="parameters"):
        kern.smooth_1d_apply(*setup, window, q, np.full(12, np.inf))
    with pytest.raises(ValueError, match="factor"):
        kern.smooth_1d_apply(*setup, window, q, p, factor=np.zeros(50))
    with pytest.raises(ValueError, match="factor"):
        kern.smooth_1d_apply(*setup, window, q, p, factor=np.full(50, np.nan))
    with pytest.raises(ValueError, match="factor"):
        kern.smooth_1d_apply(*setup, window, q, p, factor=np.ones(49))
    with pytest.raises(ValueError, match="window"):
        kern.smooth_1d_apply(*setup, window[:10], q, p)
    with pytest.raises(ValueError, match="window"):
        kern.smooth_1d_apply(*setup, np.full(50, 0xFFFF, dtype=np.uint16), q, p)
    with pytest.raises(ValueError, match="scales_out"):
        kern.smooth_1d_apply(*setup, window, q, p, scales_out=np.empty(3))
    with pytest.raises(ValueError, match="parameters"):
        kern.sh_scales_f32(np.zeros((4, 3), np.float32), np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="harmonic_values"):
        kern.sh_scales_f32(np.zeros((4, 3), np.float32), np.zeros(2))
    table = np.zeros((100, 8))
    with pytest.raises(IndexError, match="s1_lookup"):
        kern.harmonics_from_lookup_f32(np.zeros(3, np.int32), np.array([0, 100, 0], np.int32),
                                       table, 8)
    with pytest.raises(ValueError, match="s0_lookup"):
        kern.harmonics_from_lookup_f32(np.zeros(3, np.int32), np.zeros(2, np.int32), table, 8)


@pytest.mark.parametrize("width", [8, 24, 48, 15])
def test_float32_absorption_scales_same_bits_at_every_simd_level(width):
    """s = 1 + Σ h c over float32 harmonics: the AVX-512, AVX2 and plain sums run in one order
    (eight lanes of k mod 8 for widths that are multiples of 8), so each level gives the same
    bits, within the summation's error bound of a long-double reference. Levels the CPU lacks clamp to its widest."""
    rng = np.random.default_rng(width)
    h = rng.standard_normal((1000, width)).astype(np.float32)
    c = rng.standard_normal(width) * 0.05
    reference = 1.0 + (h.astype(np.longdouble) @ c.astype(np.longdouble))
    widest = core.simd_level()
    try:
        results = []
        for level in range(widest + 1):
            core.set_simd_level(level)
            results.append(kern.sh_scales_f32(h, c))
    finally:
        core.set_simd_level(widest)
    for got in results:
        assert np.array_equal(got, results[-1])
    # a sum of p products in lanes of p/8 then a 3-level tree: error ≲ (p/8 + 4) ulp of Σ|h c|
    bound = (width / 8 + 4) * np.finfo(float).eps * (1.0 + np.abs(h.astype(float) * c).sum(axis=1))
    assert np.all(np.abs(results[-1] - reference) <= bound)


def test_lean_caller_buffers_always_hold_the_latest_call(rng):
    """Caller buffers shared between components and calls always hold the latest call's
    pattern and values (the pattern is rewritten each call: no state is kept about them)."""
    scale, _ = _smooth_pair(rng, SmoothScaleComponent1D, 2000)
    decay, _ = _smooth_pair(rng, SmoothBScaleComponent1D, 2000)
    bufs = decay.derivative_buffers()
    _, d1 = decay.calculate_scales_and_derivatives(out=bufs)
    pattern = (d1.indptr.copy(), d1.indices.copy())
    decay.parameters = decay.parameters + 0.01
    s2, d2 = decay.calculate_scales_and_derivatives(out=bufs)
    s_ref, d_ref = decay.calculate_scales_and_derivatives()
    np.testing.assert_array_equal(s2, s_ref)
    np.testing.assert_array_equal(d2.toarray(), d_ref.toarray())
    np.testing.assert_array_equal(bufs[1], pattern[0])
    # The same buffers for another component: its own pattern is written.
    _, d3 = scale.calculate_scales_and_derivatives(out=bufs)
    np.testing.assert_array_equal(d3.toarray(), scale.calculate_scales_and_derivatives()[1].toarray())
    # Back to the first: rewritten again, still right.
    _, d4 = decay.calculate_scales_and_derivatives(out=bufs)
    np.testing.assert_array_equal(d4.toarray(), d_ref.toarray())
    # A caller who changes the pattern in between gets it rewritten.
    bufs[2][:10] = 0
    _, d5 = decay.calculate_scales_and_derivatives(out=bufs)
    np.testing.assert_array_equal(d5.toarray(), d_ref.toarray())


def test_lean_components_pickle_without_their_caches(rng):
    import pickle

    lean, exact = _smooth_pair(rng, SmoothBScaleComponent1D, 1500)
    sh = _sh(rng, 1500)
    for comp in (lean, sh):
        s, d = comp.calculate_scales_and_derivatives()
        back = pickle.loads(pickle.dumps(comp))
        s2, d2 = back.calculate_scales_and_derivatives()
        np.testing.assert_array_equal(s, s2)
        np.testing.assert_array_equal(d.toarray(), d2.toarray())
    assert "_lean_windows" not in lean.__getstate__()


def test_lean_mode_is_decided_on_all_blocks_together(rng):
    """A streamed minimisation table gives a component many blocks below the lean threshold:
    lean mode is chosen on the component's rows in all blocks, so no block holds a weight
    matrix (and the blocks' scales equal the one-block scales)."""
    comp = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 12))
    comp.lean_min_reflections = 5000
    n = 9000
    comp.data = {"x": rng.uniform(0, 10, n), "d": rng.uniform(0.8, 4.0, n)}
    comp.update_reflection_data()
    whole = np.asarray(comp.calculate_scales(0))
    comp.update_reflection_data(block_selections=[np.arange(0, 3000), np.arange(3000, 6000), np.arange(6000, n)])
    for b in range(3):
        comp.derivative_buffers(b)  # raises for a block that would hold weights
        comp.calculate_scales_and_derivatives(b)
    # coordinates, window records, q and 1/(2d²) (26 B) plus the per-block coordinate copies
    # (8 B); a weight matrix alone would add >= 3 x 12 B per row
    assert comp.held_bytes() == n * (8 + 2 + 8 + 8 + 8)
    np.testing.assert_array_equal(np.concatenate([comp.calculate_scales(b) for b in range(3)]), whole)
    small = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 12))
    small.lean_min_reflections = 5000
    small.data = {"x": rng.uniform(0, 10, 4000), "d": rng.uniform(0.8, 4.0, 4000)}
    small.update_reflection_data(block_selections=[np.arange(0, 2000), np.arange(2000, 4000)])
    with pytest.raises(ValueError, match="lean"):
        small.derivative_buffers(0)
