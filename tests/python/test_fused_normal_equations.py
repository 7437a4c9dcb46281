"""The normal equations built straight from C++ model blocks (``_core.fit.model_normal_equations``,
used by :class:`~xtalscale.fit.objectives.ScalerObjective` where f+g goes matrix-free): each
chunk of groups' rows evaluated into per-thread scratch and added at once, no ∂g/∂p formed.
The result is the same bits as evaluating the models and building from their matrices, for
any thread count; bad inputs are refused with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from test_job_scale import _streamed_objective, _unstreamed_objective

from xtalscale._core import fit as _fit
from xtalscale.fit.minimisers import NonFiniteScales, levenberg_marquardt


def _perturbed(apm, seed=1, size=0.01):
    x = np.asarray(apm.get_param_vals(), dtype=np.float64)
    return x * (1.0 + size * np.random.default_rng(seed).standard_normal(x.size))


def _build(obj, scaler, x, fused, kind):
    """The objective's normal equations at x, fused or the derivative way, with the blocks'
    g and Ĩ afterwards (the block state the minimiser reads next)."""
    obj.target.normal_matrix = kind
    obj.fused_normal_equations = fused
    scaler._update_keys = {}  # evaluate afresh
    obj.apm.set_param_vals(x)
    equations = obj.normal_equations(check_scales=True)
    blocks = scaler.get_blocks_for_minimisation()
    state = [np.concatenate([np.array(getattr(b, name)) for b in blocks])
             for name in ("inverse_scale_factors", "Ih_values")]
    return [np.array(e) for e in equations], state, (obj._fused_target() is not None)


def _counting_fused_calls(monkeypatch):
    import xtalscale.fit.target as target_module

    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(_fit, name)

        @staticmethod
        def model_normal_equations(*args, **kwargs):
            calls.append(1)
            return _fit.model_normal_equations(*args, **kwargs)

    monkeypatch.setattr(target_module, "_fit", Counting())
    return calls


@pytest.mark.parametrize("kind", ["dials", "schur"])
def test_fused_equations_of_a_two_dataset_block_are_the_derivative_paths_bits(kind, monkeypatch):
    """One block holding two sweeps' rows (two model blocks side by side): matrix, rhs, Σwr²,
    n_equations and the g and Ĩ left on the block equal the derivative path's bit for bit."""
    scaler, target, apm, obj = _unstreamed_objective()
    calls = _counting_fused_calls(monkeypatch)
    x = _perturbed(apm)
    fused_eq, fused_state, used = _build(obj, scaler, x, True, kind)
    assert used and len(calls) == 1
    plain_eq, plain_state, _ = _build(obj, scaler, x, False, kind)
    assert len(calls) == 1
    for a, b in zip(fused_eq + fused_state, plain_eq + plain_state):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["dials", "schur"])
def test_fused_equations_of_streamed_blocks_are_the_derivative_paths_bits(kind, monkeypatch):
    """A streamed table (blocks of 1,000 rows, two sweeps each): the same bits block after
    block, accumulated into one matrix."""
    scaler, target, apm, obj = _streamed_objective(monkeypatch)
    calls = _counting_fused_calls(monkeypatch)
    x = _perturbed(apm, seed=2)
    fused_eq, fused_state, used = _build(obj, scaler, x, True, kind)
    assert used and len(calls) == len(scaler.get_blocks_for_minimisation())
    plain_eq, plain_state, _ = _build(obj, scaler, x, False, kind)
    for a, b in zip(fused_eq + fused_state, plain_eq + plain_state):
        np.testing.assert_array_equal(a, b)


def _block_arguments(scaler, apm, block_id=0):
    block = scaler.get_blocks_for_minimisation()[block_id]
    offsets, inten, w, _ = block.table_arrays()
    models = scaler.table_models(apm, block_id)
    n_params = int(apm.n_active_params)
    return block, offsets, inten, w, models, n_params


def _replicated(offsets, inten, w, copies):
    """A table holding each group's rows ``copies`` times over (copy after copy within the
    group) and the map (table row, copy) -> its row there: the same model blocks then serve
    several "datasets" with shared columns, and the table is long enough for several parts."""
    sizes = np.diff(offsets)
    group = np.repeat(np.arange(sizes.size), sizes)
    within = np.arange(inten.size) - offsets[:-1][group]

    def new_row(rows, copy):
        return copies * offsets[group[rows]] + copy * sizes[group[rows]] + within[rows]

    big_i, big_w = np.empty(copies * inten.size), np.empty(copies * inten.size)
    for c in range(copies):
        big_i[new_row(np.arange(inten.size), c)] = inten
        big_w[new_row(np.arange(inten.size), c)] = w
    return copies * offsets, big_i, big_w, new_row


@pytest.mark.parametrize("kind", ["dials", "schur"])
@pytest.mark.parametrize("fixed", [False, True])
def test_kernel_equals_normal_equations_on_evaluated_blocks_for_any_thread_count(kind, fixed):
    """model_normal_equations against normal_equations on each model block's evaluate()
    output (Ĩ eliminated and fixed), on a table of six model blocks (two sweeps' blocks, each
    serving three copies of its rows) long enough for several parts: the same bits with one
    thread or two, and g and Ĩ per table row those of the evaluation."""
    scaler, target, apm, obj = _unstreamed_objective()
    apm.set_param_vals(_perturbed(apm, seed=4))
    block, offsets, inten, w, models, n_params = _block_arguments(scaler, apm)
    offsets, inten, w, new_row = _replicated(offsets, inten, w, copies=3)
    assert inten.size > 3 * 4096  # several parts: the threads share them
    copies = [(core, params, first, column, new_row(rows, c))
              for c in range(3) for core, params, first, column, rows in models]
    g_table = np.empty(inten.size)
    evaluated = []
    for core, params, first, column, table_rows in copies:
        core.evaluate(params, 1)
        g = np.array(core.scales)
        g_table[table_rows] = g
        evaluated.append((g, np.array(core.indptr), np.array(core.indices), np.array(core.values),
                          core.n_cols, column, table_rows))
    fixed_Ih = np.linspace(1.0, 2.0, inten.size) if fixed else None
    reference = _fit.normal_equations(offsets, inten, w, evaluated, n_params, kind=kind, fixed_Ih=fixed_Ih)
    expected_ih = np.repeat(_fit.calc_Ih(offsets, inten, w, g_table)[0], np.diff(offsets))
    results = [_fit.model_normal_equations(offsets, inten, w, copies, n_params, kind=kind, fixed_Ih=fixed_Ih,
                                           n_threads=n) for n in (1, 2)]
    for matrix, rhs, r_sq, n_eq, g, ih, usable in results:
        assert usable and n_eq == reference[3] and r_sq == reference[2]
        np.testing.assert_array_equal(matrix, reference[0])
        np.testing.assert_array_equal(rhs, reference[1])
        np.testing.assert_array_equal(g, g_table)
        if fixed:
            assert ih is None
        else:
            np.testing.assert_array_equal(ih, expected_ih)
    # out=(matrix, rhs) adds the terms unfolded, as normal_equations(out=...) does
    acc = (np.zeros((n_params, n_params)), np.zeros(n_params))
    _fit.model_normal_equations(offsets, inten, w, copies, n_params, kind=kind, fixed_Ih=fixed_Ih, out=acc)
    _fit.fold_normal_matrix(acc[0])
    np.testing.assert_array_equal(acc[0], reference[0])
    np.testing.assert_array_equal(acc[1], reference[1])


def test_levenberg_marquardt_ends_at_the_same_bits_fused_or_not(monkeypatch):
    """The minimiser reads the blocks' g and Ĩ after each build (objective, rmsd, esds): a
    Levenberg–Marquardt fit on the streamed table ends at the same parameters, journal and
    var-cov matrix whether the normal equations are fused or not."""
    ends = []
    for fused in (True, False):
        scaler, target, apm, obj = _streamed_objective(monkeypatch)
        obj.fused_normal_equations = fused
        journal = levenberg_marquardt(obj, max_iterations=4)
        ends.append((obj.get_x(), [r["objective"] for r in journal.rows], journal.var_cov))
    (x1, f1, v1), (x2, f2, v2) = ends
    np.testing.assert_array_equal(x1, x2)
    assert f1 == f2
    np.testing.assert_array_equal(v1, v2)


def test_unusable_scales_are_reported_and_the_objective_refuses_them():
    """Parameters giving g <= 0: the kernel says so (scales_usable False) and the objective
    raises NonFiniteScales, as the derivative path does; the next point evaluates afresh."""
    scaler, target, apm, obj = _unstreamed_objective()
    x0 = np.asarray(apm.get_param_vals(), dtype=np.float64)
    apm.set_param_vals(np.full_like(x0, -50.0))
    _, offsets, inten, w, models, n_params = _block_arguments(scaler, apm)
    assert not _fit.model_normal_equations(offsets, inten, w, models, n_params)[6]
    assert obj._fused_target() is not None
    with pytest.raises(NonFiniteScales):
        obj.normal_equations_at(np.full_like(x0, -50.0))
    fused = obj.normal_equations_at(x0)
    obj.fused_normal_equations = False
    plain = obj.normal_equations_at(x0)
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_clear_errors():
    scaler, target, apm, obj = _unstreamed_objective()
    block, offsets, inten, w, models, n_params = _block_arguments(scaler, apm)
    (core0, p0, f0, c0, rows0), (core1, p1, f1, c1, rows1) = models

    def call(models=models, n_params=n_params, **kwargs):
        return _fit.model_normal_equations(offsets, inten, w, models, n_params, **kwargs)

    cases = [
        ([(core0, p0, f0, c0)], {}, "expected \\(block, params"),
        ([(core0, p0[:-1], f0, c0, rows0), models[1]], {}, "model 0 params must be 1-dimensional"),
        ([(core0, np.where(np.arange(p0.size) == 0, np.nan, p0), f0, c0, rows0), models[1]], {},
         "model 0 params"),
        ([(core0, p0, 5, c0, rows0), models[1]], {}, "model 0: rows \\[5, .* outside its block's"),
        ([models[0], (core1, p1, f1, n_params, rows1)], {}, "model 1: columns .* outside n_params"),
        ([(core0, p0, f0, c0, rows0[::-1].copy()), models[1]], {}, "ascend strictly"),
        ([models[0], (core1, p1, f1, c1, rows0)], {}, "also another model's row"),
        ([models[0]], {}, "is no model's row"),
        ([models[0], (core1, p1, f1, c1, rows1 + inten.size)], {}, "outside the table's"),
        (models, {"kind": "cholesky"}, "kind must be"),
        (models, {"fixed_Ih": np.ones(3)}, "fixed_Ih"),
        (models, {"n_threads": 0}, "n_threads"),
        (models, {"out": (np.zeros((2, 2)), np.zeros(2))}, "out matrix"),
    ]
    for bad_models, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(bad_models, **kwargs)
    with pytest.raises(TypeError, match="model 0: block must be a ModelBlock"):
        call([("not a block", p0, f0, c0, rows0), models[1]])
