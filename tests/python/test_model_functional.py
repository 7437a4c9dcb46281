"""f+g of a table whose rows come from several C++ model blocks, in one pass
(``_core.fit.model_functional_and_gradient``): per chunk of whole groups each model's rows
evaluated once, g scattered to table order, the groups' f and ∂f/∂g, then each model's
transposed product. It equals the three-call path (g per block, the target's ∂f/∂g, each
block's transposed product) to rounding, ``ModelBlock.functional_and_gradient`` bit for bit for
one model covering the table, the same bits for any thread count; bad inputs are clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from xtalscale._core import fit as _fit
from xtalscale.components import (
    ComponentModelBlock,
    SHScaleComponent,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    sh_lookup_data,
)


def _physical_block(n, rng):
    """A physical model (scale and B smoothers, lmax-4 lookup harmonics) over ``n`` rows."""
    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 12))
    scale.fix_initial_parameter()
    decay = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 9))
    sh = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    scale.data = {"x": rng.uniform(0, 20, n)}
    decay.data = {"x": rng.uniform(0, 20, n), "d": rng.uniform(0.8, 4.0, n)}
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    for comp in (scale, decay, sh):
        comp.update_reflection_data()
    return ComponentModelBlock([scale, decay, sh])


def _table(n_obs, rng, multiplicity=8):
    n_groups = n_obs // multiplicity
    group = np.sort(rng.integers(0, n_groups, n_obs))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n_groups))]).astype(np.int64)
    return offsets, rng.uniform(10, 1000, n_obs), 1.0 / rng.uniform(10, 100, n_obs)


def _datasets(n_obs=40_000, n_datasets=3, seed=5):
    """A table of several datasets whose groups span them (each row's dataset drawn at random),
    one physical model block per dataset, its columns after the previous datasets'."""
    rng = np.random.default_rng(seed)
    offsets, inten, w = _table(n_obs, rng)
    dataset = rng.integers(0, n_datasets, n_obs)
    blocks, models, column = [], [], 0
    for d in range(n_datasets):
        rows = np.flatnonzero(dataset == d).astype(np.int64)
        block = _physical_block(rows.size, rng)
        blocks.append((block, rows))
        models.append((block.core, block.parameters(), 0, column, rows))
        column += block.core.n_cols
    return offsets, inten, w, blocks, models, column


def _three_calls(offsets, inten, w, blocks):
    """g per block, ∂f/∂g from the target on g alone, each block's transposed product."""
    n = inten.size
    g = np.empty(n)
    for block, rows in blocks:
        g[rows] = block.evaluate_scales()
    scales_only = (g, np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0), 0, 0, None)
    f, dfdg, ih = _fit.functional_and_scale_gradient(offsets, inten, w, [scales_only])
    grad = np.concatenate([block.transpose_product(dfdg[rows]) for block, rows in blocks])
    return f, grad, g, ih


def test_several_datasets_equal_the_three_calls_for_any_thread_count():
    offsets, inten, w, blocks, models, n_params = _datasets()
    f3, grad3, g3, ih3 = _three_calls(offsets, inten, w, blocks)
    results = [_fit.model_functional_and_gradient(offsets, inten, w, models, n_params, Ih=True, n_threads=nt)
               for nt in (1, 2)]
    f, grad, g, ih = results[0]
    assert abs(f - f3) <= 1e-12 * abs(f3)
    assert np.max(np.abs(grad - grad3)) <= 1e-12 * np.max(np.abs(grad3))
    np.testing.assert_array_equal(g, g3)  # g per row: the blocks' own bits
    np.testing.assert_array_equal(ih, ih3)
    f2, grad2, g2, ih2 = results[1]
    assert f2 == f
    for a, b in ((grad2, grad), (g2, g), (ih2, ih)):
        np.testing.assert_array_equal(a, b)
    assert _fit.model_functional_and_gradient(offsets, inten, w, models, n_params)[3] is None


def test_g_into_the_callers_array():
    offsets, inten, w, blocks, models, n_params = _datasets()
    f, grad, g, _ = _fit.model_functional_and_gradient(offsets, inten, w, models, n_params)
    held = np.full(inten.size, np.nan)
    f_held, grad_held, g_held, _ = _fit.model_functional_and_gradient(offsets, inten, w, models, n_params,
                                                                      g_out=held)
    assert g_held is held or np.shares_memory(g_held, held)
    assert f_held == f
    np.testing.assert_array_equal(held, g)
    np.testing.assert_array_equal(grad_held, grad)
    with pytest.raises(ValueError, match="g_out"):
        _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, g_out=np.empty(inten.size - 1))
    with pytest.raises(ValueError, match="g_out must not share memory with the intensities"):
        _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, g_out=inten)
    with pytest.raises(ValueError, match="g_out must not share memory with the weights"):
        _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, g_out=w)
    read_only = np.empty(inten.size)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="g_out"):
        _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, g_out=read_only)


def test_shared_columns_and_a_model_without_rows_in_a_chunk():
    """Two models may share columns (their products add up) and a model's rows may be a sub-
    range of its block: here dataset 1's model serves its block's rows from 1 on, and a
    one-row model at the end holds the rest."""
    offsets, inten, w, blocks, models, n_params = _datasets(n_obs=30_000, n_datasets=2, seed=8)
    (c0, p0, _, col0, rows0), (c1, p1, _, col1, rows1) = models
    shared = [(c0, p0, 0, 0, rows0), (c1, p1, 1, 0, rows1[1:]), (c1, p1, 0, 0, rows1[:1])]
    f, grad, g, _ = _fit.model_functional_and_gradient(offsets, inten, w, shared, c0.n_cols)
    f3, grad3, g3, _ = _three_calls(offsets, inten, w, blocks)
    assert abs(f - f3) <= 1e-12 * abs(f3)
    summed = grad3[col0:col0 + c0.n_cols] + grad3[col1:col1 + c1.n_cols]
    assert np.max(np.abs(grad - summed)) <= 1e-12 * np.max(np.abs(summed))
    np.testing.assert_array_equal(g, g3)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_model_covering_the_table_is_the_block_one_pass_bit_for_bit(n_threads):
    rng = np.random.default_rng(3)
    offsets, inten, w = _table(20_000, rng)
    block = _physical_block(inten.size, rng)
    rows = np.arange(inten.size, dtype=np.int64)
    f, grad, g, _ = _fit.model_functional_and_gradient(
        offsets, inten, w, [(block.core, block.parameters(), 0, 5, rows)], block.core.n_cols + 7,
        n_threads=n_threads)
    f1, grad1 = block.core.functional_and_gradient(block.parameters(), offsets, inten, w, n_threads)[:2]
    assert f == f1
    np.testing.assert_array_equal(grad[5:5 + block.core.n_cols], grad1)
    assert not grad[:5].any() and not grad[5 + block.core.n_cols:].any()
    np.testing.assert_array_equal(g, np.asarray(block.core.scales))


def test_bad_inputs_are_clear_errors():
    offsets, inten, w, blocks, models, n_params = _datasets(n_obs=6_000, n_datasets=2, seed=2)
    (c0, p0, f0, col0, rows0), (c1, p1, f1, col1, rows1) = models

    def call(models=models, n_params=n_params, inten=inten, w=w, **kwargs):
        return _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, **kwargs)

    nan_params = np.where(np.arange(p0.size) == 1, np.nan, p0)
    cases = [
        ({"models": [(c0, p0, f0, col0)]}, "expected \\(block, params"),
        ({"models": [(c0, p0[:-1], f0, col0, rows0), models[1]]}, "model 0 params must be 1-dimensional"),
        ({"models": [(c0, nan_params, f0, col0, rows0), models[1]]}, "model 0 params"),
        ({"models": [(c0, p0, 5, col0, rows0), models[1]]}, "model 0: rows \\[5, .* outside its block's"),
        ({"models": [models[0], (c1, p1, f1, n_params, rows1)]}, "model 1: columns .* outside n_params"),
        ({"models": [(c0, p0, f0, col0, rows0[::-1].copy()), models[1]]}, "ascend strictly"),
        ({"models": [models[0], (c1, p1, f1, col1, rows1 + inten.size)]}, "outside the table's"),
        ({"models": [models[0]]}, "rows in all, the table"),
        ({"n_params": -1}, "n_params"),
        ({"n_threads": 0}, "n_threads"),
        ({"w": np.where(np.arange(inten.size) == 7, -1.0, w)}, "weights"),
        ({"inten": np.where(np.arange(inten.size) == 9, np.inf, inten)}, "intensities"),
        ({"inten": inten[:-1]}, "weights must be 1-dimensional"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kwargs)
    # model 1 takes model 0's first row for its own: the counts add up, but one row is covered
    # twice and another not at all (found by the chunk's check)
    swapped = np.sort(np.concatenate([rows1[1:], rows0[:1]]))
    with pytest.raises(ValueError, match="is (no model's|several models') row"):
        call(models=[models[0], (c1, p1, f1, col1, swapped)])
    # parameters giving g <= 0
    with pytest.raises(ValueError, match="a scale g is not finite and > 0"):
        call(models=[(c0, np.full_like(p0, -50.0), f0, col0, rows0), models[1]])
    # a block whose terms do not evaluate row ranges is refused as model_normal_equations does
    with pytest.raises(TypeError, match="ModelBlock"):
        call(models=[(object(), p0, f0, col0, rows0), models[1]])


@pytest.mark.parametrize("n_threads", [1, 2])
def test_rows_out_of_order_across_chunks_are_found_by_the_chunks(n_threads):
    """The chunks check the models' rows as they read them (no serial pass): rows that ascend
    within each chunk but not over the table (two chunks' runs swapped), a repeated row inside
    a run that looks consecutive, and rows beyond the table all name the fault, as the
    serial check did, and nothing is written outside the arrays."""
    offsets, inten, w, blocks, models, n_params = _datasets(n_obs=120_000, n_datasets=3, seed=8)
    (c0, p0, f0, col0, rows0) = models[0]
    half = int(np.searchsorted(rows0, inten.size // 2))
    swapped = np.concatenate([rows0[half:], rows0[:half]])
    repeated = rows0.copy()
    repeated[100] = repeated[99]
    beyond = rows0.copy()
    beyond[-1] = inten.size + 5
    for bad, message in ((swapped, "ascend strictly"), (repeated, "ascend strictly"),
                         (beyond, "outside the table's")):
        with pytest.raises(ValueError, match=message):
            _fit.model_functional_and_gradient(offsets, inten, w, [(c0, p0, f0, col0, bad), *models[1:]],
                                               n_params, n_threads=n_threads)
    # and the good rows still give the three calls' result
    f3, grad3, g3, _ = _three_calls(offsets, inten, w, blocks)
    f, grad, g, _ = _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, n_threads=n_threads)
    assert abs(f - f3) <= 1e-12 * abs(f3)
    np.testing.assert_array_equal(g, g3)


def test_a_job_block_of_two_sweeps_equals_the_objectives_three_calls():
    """The job's table block of two sweeps (the scaler's own model blocks, ``table_models``):
    f, the gradient, g and Ĩ against the objective's matrix-free calls on the same block."""
    from test_job_scale import _unstreamed_objective

    scaler, target, apm, obj = _unstreamed_objective()
    x = np.asarray(apm.get_param_vals(), dtype=np.float64)
    obj.set_x(x * (1.0 + 0.01 * np.random.default_rng(6).standard_normal(x.size)))
    inner = obj._matrix_free()
    assert inner is not None
    block = scaler.get_blocks_for_minimisation()[0]
    f3, dfdg = inner.compute_functional_and_scale_gradient(block)
    grad3 = scaler.transpose_product(apm, 0, dfdg)
    offsets, inten, w, rows = block.table_arrays()
    models = scaler.table_models(apm, 0)
    assert models is not None and len(models) == 2
    for nt in (1, 2):
        f, grad, g, ih = _fit.model_functional_and_gradient(offsets, inten, w, models, int(apm.n_active_params),
                                                             Ih=True, n_threads=nt)
        assert abs(f - f3) <= 1e-12 * abs(f3)
        assert np.max(np.abs(grad - grad3)) <= 1e-12 * np.max(np.abs(grad3))
        np.testing.assert_array_equal(g[rows], block.inverse_scale_factors)
        np.testing.assert_array_equal(ih[rows], block.Ih_values)
