"""The C++ model block (the fit contract's model side): g and ∂g/∂p of a whole model in one
GIL-free call, a pattern built once per data selection, and Python-defined components joining
the product rule through external terms."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.sparse as sp

from xtalscale._core import model_block as mb
from xtalscale.components import (
    AnalyticalComponent,
    ComponentModelBlock,
    ScaleComponentBase,
    SHScaleComponent,
    SingleBScaleFactor,
    SingleScaleFactor,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
    product_rule,
    sh_lookup_data,
)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _physical(rng, n, lean):
    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 10))
    scale.fix_initial_parameter()
    decay = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 8))
    sh = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    for comp in (scale, decay):
        comp.lean_min_reflections = 0 if lean else 10**12
    sh.float32_min_reflections = 0 if lean else 10**12
    scale.data = {"x": rng.uniform(0, 20, n)}
    decay.data = {"x": rng.uniform(0, 20, n), "d": rng.uniform(0.8, 4.0, n)}
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    for comp in (scale, decay, sh):
        comp.update_reflection_data()
    return [scale, decay, sh]


def _dense_product_rule(results):
    """numpy reference: g = Π s_c and [∂s_c/∂p_c · Π_{c'≠c} s_c']."""
    scales = [np.asarray(s, dtype=np.float64) for s, _ in results]
    g = np.prod(scales, axis=0)
    blocks = []
    for c, (_, d) in enumerate(results):
        others = np.prod([s for k, s in enumerate(scales) if k != c], axis=0)
        dense = d.toarray() if sp.issparse(d) else np.asarray(d, dtype=np.float64)
        blocks.append(dense * others[:, None])
    return g, np.hstack(blocks)


@pytest.mark.parametrize("lean", [False, True])
def test_physical_model_block_matches_the_components(rng, lean):
    comps = _physical(rng, 3000, lean)
    block = ComponentModelBlock(comps)
    g, jac = block.evaluate()
    g_ref, j_ref = _dense_product_rule([c.calculate_scales_and_derivatives() for c in comps])
    np.testing.assert_allclose(g, g_ref, rtol=1e-15)
    np.testing.assert_allclose(jac.toarray(), j_ref, rtol=1e-14, atol=1e-300)
    assert jac.shape == (3000, 9 + 8 + 24) and jac.has_sorted_indices
    view = block.core
    assert view.indptr.dtype == np.int64 and view.indices.dtype == np.int32
    assert view.version == 1 and view.n_cols == 41 and view.n_params == 10 + 8 + 24


def test_pattern_is_built_once_and_values_are_rewritten_in_place(rng):
    comps = _physical(rng, 2000, lean=True)
    block = ComponentModelBlock(comps)
    g1, jac1 = block.evaluate()
    g1, values1, indices = g1.copy(), jac1.data.copy(), block.core.indices
    for comp in comps:
        comp.parameters = comp.parameters * 1.01
    g2, jac2 = block.evaluate()
    assert block.core.version == 1  # no rebuild for a parameter change
    assert np.shares_memory(block.core.indices, indices)
    assert not np.array_equal(g2, g1) and not np.array_equal(jac2.data, values1)
    g_ref, j_ref = _dense_product_rule([c.calculate_scales_and_derivatives() for c in comps])
    np.testing.assert_allclose(g2, g_ref, rtol=1e-15)
    np.testing.assert_allclose(jac2.toarray(), j_ref, rtol=1e-14, atol=1e-300)
    with pytest.raises(ValueError):
        block.core.values[0] = 1.0  # the block's buffers are read-only from Python


def test_release_values_frees_the_values_and_the_next_evaluation_rebuilds_them(rng):
    """release_values (streamed blocks): the values and term scratch go (nbytes drops, the view
    is empty), g and the pattern stay; the next evaluation allocates the values again and gives
    the same numbers, without a pattern rebuild."""
    comps = _physical(rng, 2000, lean=True)
    block = ComponentModelBlock(comps)
    g1, jac1 = block.evaluate()
    g1, values1 = g1.copy(), np.array(jac1.data)
    held = block.core.nbytes
    block.core.release_values()
    assert not block.core.evaluated and block.core.values.size == 0
    assert block.core.nbytes < held - 2000 * 8 * 30  # at least the 30 values per row are gone
    np.testing.assert_array_equal(block.core.scales, g1)  # g stays
    g2, jac2 = block.evaluate()
    assert block.core.version == 1  # same pattern, no rebuild
    np.testing.assert_array_equal(g2, g1)
    np.testing.assert_array_equal(np.asarray(jac2.data), values1)
    indices1 = np.array(block.core.indices)
    block.core.release_values(pattern=True)  # the pattern goes too: rebuilt, same numbers
    assert block.core.indices.size == 0
    g3, jac3 = block.evaluate()
    assert block.core.version == 2
    np.testing.assert_array_equal(g3, g1)
    np.testing.assert_array_equal(np.asarray(jac3.indices), indices1)
    np.testing.assert_array_equal(np.asarray(jac3.data), values1)


def test_evaluate_scales_gives_evaluates_g_bit_for_bit_and_holds_nothing(rng):
    """evaluate_scales (a streamed trial step): g equal to evaluate's bit for bit, no pattern
    built, no derivative values; terms that evaluate row ranges go chunk by chunk, so what
    the block holds beyond g and its row starts is one chunk's scratch (4096 rows), not a
    per-row array."""
    n = 60000
    comps = _physical(rng, n, lean=True)
    block = ComponentModelBlock(comps)
    g_only = np.array(block.evaluate_scales())
    assert block.core.version == 0 and not block.core.evaluated  # no pattern, no view
    chunk_scratch = 4096 * (3 + 5 + 5) * 8  # three terms' scales, two smoothers' ≤ 5 values
    beyond = block.core.nbytes - (n * 8 + (n + 1) * 8)  # beyond g and the row starts
    assert beyond <= chunk_scratch and beyond < n * 8  # less than one double per row
    g, _ = block.evaluate()
    np.testing.assert_array_equal(g_only, g)
    for comp in comps:
        comp.parameters = comp.parameters * 1.01
    g2_only = np.array(block.evaluate_scales())
    g2, _ = block.evaluate()
    np.testing.assert_array_equal(g2_only, g2)


def _array_kb_and_analytical(rng, n):
    """A 2-D and a 3-D smoother, a single scale, a single B and an analytical correction."""
    decay = SmoothScaleComponent2D(rng.uniform(0.9, 1.1, 15), shape=(5, 3))
    decay.data = {"x": rng.uniform(0, 5, n), "y": rng.uniform(0, 3, n)}
    absorption = SmoothScaleComponent3D(rng.uniform(0.9, 1.1, 27), shape=(3, 3, 3))
    absorption.data = {"x": rng.uniform(0, 2, n), "y": rng.uniform(0, 2, n), "z": rng.uniform(0, 2, n)}
    scale = SingleScaleFactor([1.3])
    scale.data = {"id": np.zeros(n)}
    bfac = SingleBScaleFactor([0.4])
    bfac.data = {"d": rng.uniform(1, 3, n)}
    corr = AnalyticalComponent()
    corr.data = {"correction": rng.uniform(0.5, 1.5, n)}
    comps = [decay, absorption, scale, bfac, corr]
    for comp in comps:
        comp.update_reflection_data()
    return comps


def test_array_and_kb_components_and_fixed_factors(rng):
    n = 1500
    comps = _array_kb_and_analytical(rng, n)
    fixed = rng.uniform(0.5, 2.0, n)
    block = ComponentModelBlock(comps, active=[True, True, False, True, True], fixed_scales=fixed)
    g, jac = block.evaluate()
    results = [c.calculate_scales_and_derivatives() for c in comps]
    g_ref = np.prod([r[0] for r in results], axis=0) * fixed
    np.testing.assert_allclose(g, g_ref, rtol=1e-14)
    active = [results[i] for i in (0, 1, 3, 4)]
    others = [np.prod([r[0] for k, r in enumerate(results) if k != i], axis=0) * fixed
              for i in (0, 1, 3, 4)]
    expected = np.hstack([(r[1].toarray() if sp.issparse(r[1]) else r[1]) * o[:, None]
                          for r, o in zip(active, others)])
    np.testing.assert_allclose(jac.toarray(), expected, rtol=1e-13, atol=1e-300)
    assert jac.shape == (n, 15 + 27 + 1 + 0)


class UserComponent(ScaleComponentBase):
    """A Python-defined component: s = p0 + p1·t, dense derivatives [1, t]."""

    def __init__(self, values, t):
        super().__init__(values)
        self.t = np.asarray(t, dtype=np.float64)
        self._n_refl = [self.t.size]

    def calculate_scales_and_derivatives(self, block_id=0):
        p = self.parameters
        return p[0] + p[1] * self.t, np.column_stack([np.ones_like(self.t), self.t])


def test_python_component_joins_the_product_rule_in_cpp(rng):
    n = 800
    comps = _physical(rng, n, lean=False)
    user = UserComponent([1.0, 0.1], rng.uniform(0, 1, n))
    assert user.model_term() is None  # no C++ term: an external one is filled from Python
    block = ComponentModelBlock(comps + [user])
    g, jac = block.evaluate()
    g_ref, j_ref = _dense_product_rule([c.calculate_scales_and_derivatives() for c in comps + [user]])
    np.testing.assert_allclose(g, g_ref, rtol=1e-15)
    np.testing.assert_allclose(jac.toarray(), j_ref, rtol=1e-14, atol=1e-300)
    user.parameters = [0.5, 2.0]  # the external term is refilled by each evaluation
    g2, _ = block.evaluate()
    np.testing.assert_allclose(g2, np.prod([c.calculate_scales() for c in comps], axis=0)
                               * (0.5 + 2.0 * user.t), rtol=1e-15)


def test_external_pattern_change_rebuilds_the_pattern():
    n = 4
    block = mb.ModelBlock(n)
    ext = mb.ExternalTerm(n, 2)
    ext.set(np.full(n, 2.0), np.array([0, 1, 2, 3, 4]), np.array([0, 1, 0, 1], np.int32), np.ones(4))
    block.add_term(mb.ScaleFactorTerm(n))
    block.add_term(ext)
    block.evaluate(np.array([3.0]))
    assert block.version == 1
    np.testing.assert_array_equal(block.indices, [0, 1, 0, 2, 0, 1, 0, 2])
    np.testing.assert_array_equal(block.values, [2, 3, 2, 3, 2, 3, 2, 3])
    ext.set(np.full(n, 2.0), np.array([0, 2, 4, 6, 8]), np.array([0, 1] * 4, np.int32), np.ones(8))
    block.evaluate(np.array([3.0]))
    assert block.version == 2 and block.indptr[-1] == 12


def test_zero_scale_keeps_the_other_terms_derivatives():
    block = mb.ModelBlock(2)
    a, b = mb.ExternalTerm(2, 1), mb.ExternalTerm(2, 2)
    a.set_dense(np.array([2.0, 0.0]), np.ones((2, 1)))
    b.set(np.array([3.0, 5.0]), np.array([0, 2, 3]), np.array([0, 1, 1], np.int32),
          np.array([0.5, 0.25, 2.0]))
    block.add_term(a)
    block.add_term(b)
    block.evaluate(np.zeros(0))
    np.testing.assert_array_equal(block.scales, [6.0, 0.0])
    np.testing.assert_array_equal(block.indices, [0, 1, 2, 0, 2])
    np.testing.assert_array_equal(block.values, [3.0, 1.0, 0.5, 5.0, 0.0])


def test_bad_input_raises_value_errors():
    block = mb.ModelBlock(3)
    with pytest.raises(ValueError, match="rows"):
        block.add_term(mb.ScaleFactorTerm(4))
    ext = mb.ExternalTerm(3, 1)
    block.add_term(mb.ScaleFactorTerm(3))
    block.add_term(ext)
    with pytest.raises(ValueError, match="params must hold 1"):
        block.evaluate(np.zeros(2))
    with pytest.raises(ValueError, match="external term must be set"):
        block.evaluate(np.ones(1))
    with pytest.raises(ValueError, match="params must be finite"):
        block.evaluate(np.array([np.nan]))
    with pytest.raises(ValueError, match="scales must be finite"):
        ext.set_dense(np.array([1.0, np.inf, 1.0]), np.ones((3, 1)))
    with pytest.raises(ValueError, match="indices must lie in"):
        ext.set(np.ones(3), np.array([0, 1, 2, 3]), np.array([0, 1, 0], np.int32), np.ones(3))
    with pytest.raises(ValueError, match="ascending"):
        ext.set(np.ones(3), np.array([0, 2, 2, 2]), np.array([0, 0], np.int32), np.ones(2))
    with pytest.raises(ValueError, match="one row per reflection"):
        ext.set(np.ones(3), np.array([0, 1, 2]), np.array([0, 0], np.int32), np.ones(2))
    with pytest.raises(ValueError, match="shape"):
        ext.set_dense(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match="factor must be finite"):
        mb.ExpFactorTerm(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="different reflection counts"):
        a, b = SingleScaleFactor([1.0]), SingleScaleFactor([1.0])
        a.data, b.data = {"id": np.zeros(2)}, {"id": np.zeros(3)}
        a.update_reflection_data()
        b.update_reflection_data()
        ComponentModelBlock([a, b])


def test_blocks_on_threads_share_terms_and_agree(rng):
    """Terms are immutable: blocks on several threads hold the same terms and give the
    same numbers as one block evaluated alone."""
    comps = _physical(rng, 20000, lean=True)
    terms = [c.model_term() for c in comps]
    params = np.concatenate([c.parameters for c in comps])
    reference = mb.ModelBlock(20000)
    for t in terms:
        reference.add_term(t)
    reference.evaluate(params)
    results = {}

    def run(k):
        block = mb.ModelBlock(20000)
        for t in terms:
            block.add_term(t)
        for _ in range(3):
            block.evaluate(params)
        results[k] = (block.scales.copy(), block.values.copy())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, v in results.values():
        np.testing.assert_array_equal(g, reference.scales)
        np.testing.assert_array_equal(v, reference.values)


def test_product_rule_is_the_model_block(rng):
    comps = _physical(rng, 500, lean=False)
    results = [c.calculate_scales_and_derivatives() for c in comps]
    g, jac = product_rule(results)
    g_b, jac_b = ComponentModelBlock(comps).evaluate()
    np.testing.assert_array_equal(g, g_b)
    np.testing.assert_array_equal(jac.toarray(), jac_b.toarray())


def test_refiner_calculator_keeps_its_block_until_the_data_change(rng):
    from xtalscale.parameter_managers import RefinerCalculator, active_parameter_manager

    comps = _physical(rng, 1000, lean=True)
    apm = active_parameter_manager({"scale": comps[0], "decay": comps[1], "absorption": comps[2]},
                                   ["scale", "decay", "absorption"])
    g1, j1 = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    for comp in comps:
        comp.parameters = comp.parameters * 1.02
    g2, j2 = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    assert np.shares_memory(j1.indices, j2.indices)  # the pattern was kept
    assert not np.shares_memory(j1.data, j2.data)  # each call's values are its own
    g_ref, j_ref = _dense_product_rule([c.calculate_scales_and_derivatives() for c in comps])
    np.testing.assert_allclose(g2, g_ref, rtol=1e-15)
    np.testing.assert_allclose(j2.toarray(), j_ref, rtol=1e-14, atol=1e-300)
    assert not np.allclose(g1, g2)
    comps[0].update_reflection_data()  # new terms: the block is rebuilt
    g3, j3 = RefinerCalculator.calculate_scales_and_derivatives(apm, 0)
    assert not np.shares_memory(j3.indices, j2.indices)
    np.testing.assert_allclose(g3, g_ref, rtol=1e-15)


@pytest.mark.parametrize("dims", [2, 3])
def test_grid_smooth_term_matches_the_bulk_kernel_and_counts_its_pattern(rng, dims):
    """GridSmoothTerm2D/3D hold only coordinates: their pattern (read from the windows) and
    per-evaluation values equal the bulk kernel's normalised weight matrix bit for bit,
    including points outside the range (clipped windows) and far outside (direct exp)."""
    from xtalscale._core import smoothers

    n = 3000
    smoother = (smoothers.Smoother2D if dims == 2 else smoothers.Smoother3D)(
        [(0.0, 6.0)] * dims, [6, 4, 3][:dims])
    smoother.set_smoothing(3, -1.0)
    coords = [rng.uniform(-1.0, 7.0, n) for _ in range(dims)]
    coords[0][:3] = [-40.0, 55.0, 3.0]  # far outside: the direct-exponential path
    p = rng.uniform(0.5, 1.5, smoother.num_values)
    assert smoother.num_values == int(np.prod([smoother.axis_num_values(a) for a in range(dims)]))
    term = (mb.GridSmoothTerm2D if dims == 2 else mb.GridSmoothTerm3D)(smoother, coords)
    value, _, data, indices, indptr = smoother.multi_value_weight(coords, p, normalised=True)
    ip, ix = term.pattern()
    assert term.nnz == data.size and term.n_cols == smoother.num_values
    np.testing.assert_array_equal(ip, indptr)
    np.testing.assert_array_equal(ix, indices)
    scales, values = term.evaluate(p)
    np.testing.assert_array_equal(scales, value)
    np.testing.assert_array_equal(values, data)
    np.testing.assert_array_equal(smoother.values(coords, p), value)
    assert term.nbytes == dims * n * 8  # nothing per row but the coordinates


def test_grid_smooth_term_rejects_bad_coordinates():
    from xtalscale._core import smoothers

    s = smoothers.Smoother2D([(0.0, 4.0)] * 2, [3, 3])
    with pytest.raises(ValueError, match="y"):
        mb.GridSmoothTerm2D(s, [np.zeros(5), np.zeros(4)])
    with pytest.raises(ValueError, match="one array per smoother axis"):
        mb.GridSmoothTerm2D(s, [np.zeros(5)])
    with pytest.raises(ValueError, match="finite"):
        mb.GridSmoothTerm2D(s, [np.zeros(5), np.array([0, 1, np.nan, 2, 3.0])])


def test_grid_components_defer_their_derivative_matrix(rng):
    """A 2-D/3-D component's first scales-and-derivatives call computes the scales only; the
    derivative matrix is built on first read, equals the weight matrix and is then held."""
    from xtalscale.sparse import DeferredSparseMatrix

    n = 2000
    comp = SmoothScaleComponent3D(rng.uniform(0.9, 1.1, 5 * 5 * 3), shape=(5, 5, 3))
    comp.data = {"x": rng.uniform(0, 4, n), "y": rng.uniform(0, 3, n), "z": rng.uniform(0, 2, n)}
    comp.update_reflection_data()
    scales, deriv = comp.calculate_scales_and_derivatives()
    assert isinstance(deriv, DeferredSparseMatrix) and not deriv.built
    assert deriv.shape == (n, 75)
    np.testing.assert_allclose(deriv @ comp.parameters, scales, rtol=1e-14)  # builds it
    assert deriv.built
    # Held now: the next call wraps the same arrays (no second build).
    _, again = comp.calculate_scales_and_derivatives()
    assert not isinstance(again, DeferredSparseMatrix)
    assert np.shares_memory(again.data, deriv.data)
    # A deferred matrix keeps the state it was made from: new coordinates afterwards do not
    # change it.
    full = deriv.toarray()
    comp.update_reflection_data()  # drops the held matrix
    _, old = comp.calculate_scales_and_derivatives()
    assert isinstance(old, DeferredSparseMatrix) and not old.built
    comp.update_reflection_data(selection=np.arange(n) < n // 2)
    _, new = comp.calculate_scales_and_derivatives()
    assert new.shape == (n // 2, 75) and old.shape == (n, 75)
    np.testing.assert_array_equal(old.toarray(), full)
    np.testing.assert_allclose(new @ comp.parameters, comp.calculate_scales(), rtol=1e-14)


def test_deferred_sparse_matrix_behaves_as_a_csr_matrix():
    import copy
    import pickle

    from xtalscale.sparse import DeferredSparseMatrix, SparseMatrix

    ref = sp.random(40, 12, density=0.3, format="csr", random_state=3)
    calls = []

    def build():
        calls.append(1)
        return ref.data.copy(), ref.indices.copy(), ref.indptr.copy()

    operations = [
        lambda a: a.toarray(), lambda a: (a.T @ a).toarray(), lambda a: a[3:7].toarray(),
        lambda a: a.multiply(2.0).toarray(), lambda a: a.nnz, lambda a: a.getcol(3).toarray(),
        lambda a: pickle.loads(pickle.dumps(a)).toarray(), lambda a: copy.deepcopy(a).toarray(),
        lambda a: sp.vstack([a, a]).toarray(), lambda a: np.asarray(a.sum(axis=0)),
        lambda a: a.col(3).as_dense_vector(), lambda a: a.non_zeroes, lambda a: (a + a).toarray(),
        lambda a: a @ np.arange(12.0),
    ]
    for op in operations:
        deferred = DeferredSparseMatrix(shape=ref.shape, build=build)
        assert deferred.shape == (40, 12) and not deferred.built
        np.testing.assert_array_equal(op(deferred), op(SparseMatrix(ref)))
        assert deferred.built
    assert len(calls) == len(operations)  # once per matrix


@pytest.mark.parametrize("cls, shape", [(SmoothScaleComponent2D, (6, 5)),
                                        (SmoothScaleComponent3D, (5, 5, 3))])
def test_grid_components_read_their_data_shifted_bit_for_bit(rng, cls, shape):
    """Without selections a 2-D/3-D component keeps no shifted copy of its data: the kernels
    read data − min. Scales, derivatives, model-block values and DIALS's normalised-value
    attributes equal those of the copied path (an all-True selection) bit for bit."""
    n = 4000
    axes = ("x", "y", "z")[: len(shape)]
    data = {a: rng.uniform(3.0, 3.0 + 2 * k + 2, n) * 1.37 for k, a in enumerate(axes)}
    p = rng.uniform(0.8, 1.2, int(np.prod(shape)))
    shifted, copied = cls(p, shape=shape), cls(p, shape=shape)
    for comp in (shifted, copied):
        comp.data = dict(data)
    shifted.update_reflection_data()
    copied.update_reflection_data(selection=np.ones(n, dtype=bool))
    assert shifted._shifts is not None and copied._shifts is None
    s1, d1 = shifted.calculate_scales_and_derivatives()
    s2, d2 = copied.calculate_scales_and_derivatives()
    np.testing.assert_array_equal(s1, s2)
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(d1, name), getattr(d2, name))
    g1, j1 = ComponentModelBlock([shifted]).evaluate()
    g2, j2 = ComponentModelBlock([copied]).evaluate()
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(j1.data, j2.data)
    np.testing.assert_array_equal(shifted.normalised_x_values[0], data["x"] - data["x"].min())
    np.testing.assert_array_equal(shifted.normalised_y_values[0], copied.normalised_y_values[0])


def test_deferred_sparse_matrix_is_built_once_when_read_from_two_threads():
    import threading
    import time

    from xtalscale.sparse import DeferredSparseMatrix

    ref = sp.random(30, 8, density=0.3, format="csr", random_state=5)
    calls = []

    def slow_build():
        calls.append(1)
        time.sleep(0.05)  # a second reader arrives while the first builds
        return ref.data.copy(), ref.indices.copy(), ref.indptr.copy()

    m = DeferredSparseMatrix(shape=ref.shape, build=slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(m @ np.ones(8))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, ref @ np.ones(8))


def test_coordinate_shift_must_be_finite_and_is_applied():
    from xtalscale._core import smoothers

    s = smoothers.Smoother2D([(0.0, 4.0)] * 2, [3, 3])
    s.set_smoothing(3, -1.0)
    with pytest.raises(ValueError, match="finite"):
        s.coordinate_shift = (0.0, float("nan"))
    x, y = np.linspace(1.0, 5.0, 50), np.linspace(2.0, 6.0, 50)
    p = np.linspace(0.5, 1.5, s.num_values)
    s.coordinate_shift = (1.0, 2.0)
    shifted = s.values([x, y], p)
    s.coordinate_shift = (0.0, 0.0)
    np.testing.assert_array_equal(shifted, s.values([x - 1.0, y - 2.0], p))


def _check_transpose_product(block, rng):
    """transpose_product = (∂g/∂p)ᵀ c of evaluate() to rounding, and g bit for bit."""
    c = rng.normal(size=block.core.n_rows)
    product = block.transpose_product(c)
    g_mf = np.array(block.scales)
    assert not block.core.evaluated  # nothing of ∂g/∂p was kept
    g, jac = block.evaluate()
    np.testing.assert_array_equal(g_mf, g)
    j = jac.as_scipy()
    expected, scale = j.T @ c, abs(j).T @ np.abs(c)
    assert product.shape == (block.core.n_cols,)
    # sums of the same products in another order: rounding relative to Σ|J||c|
    assert np.all(np.abs(product - expected) <= 1e-13 * scale + 1e-300)


@pytest.mark.parametrize("lean", [False, True])
def test_transpose_product_of_a_physical_model(rng, lean):
    """10,000 rows: the lean form goes in chunks of 4096 rows (a partial last chunk)."""
    block = ComponentModelBlock(_physical(rng, 10000, lean))
    _check_transpose_product(block, rng)


def test_transpose_product_of_grid_kb_fixed_and_python_terms(rng):
    """2-D/3-D smoothers (pattern from the base), an inactive scale, an exponential B, an
    analytical (fixed-scales) term, fixed factors and a Python component (external term)."""
    n = 1500
    comps = _array_kb_and_analytical(rng, n)
    user = UserComponent([1.0, 0.1], rng.uniform(0, 1, n))
    block = ComponentModelBlock(comps + [user], active=[True, True, False, True, True, True],
                                fixed_scales=rng.uniform(0.5, 2.0, n))
    _check_transpose_product(block, rng)


def test_transpose_product_refuses_bad_coefficients(rng):
    block = ComponentModelBlock(_physical(rng, 50, lean=True))
    with pytest.raises(ValueError, match="one value per row"):
        block.transpose_product(np.ones(49))
    bad = np.ones(50)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="coefficients"):
        block.transpose_product(bad)
    params = block.parameters()
    with pytest.raises(ValueError, match="params must hold"):
        block.core.transpose_product(params[:-1], np.ones(50))
    params[3] = np.inf
    with pytest.raises(ValueError, match="params"):
        block.core.transpose_product(params, np.ones(50))
    with pytest.raises(ValueError, match="n_threads"):
        block.core.transpose_product(block.parameters(), np.ones(50), 0)


@pytest.mark.parametrize("lean", [False, True])
def test_model_row_variances_without_the_derivative_matrix(rng, lean):
    """model_row_variances (equal chunks of at most 4096 rows, ∂g/∂p never formed) gives g bit
    for bit and diag(J V Jᵀ) of evaluate()'s J to rounding, the same for one, two and three
    threads (so for any chunking); blocks whose
    terms do not evaluate row ranges, a V of the wrong shape or with a NaN are refused."""
    from xtalscale._core import fit as core_fit

    block = ComponentModelBlock(_physical(rng, 10000, lean))
    n = block.core.n_cols
    a = rng.standard_normal((n, n))
    V = a @ a.T * 1e-4
    assert block.core.evaluates_rows()
    var1, g1 = core_fit.model_row_variances(block.core, block.parameters(), V)
    for threads in (2, 3):
        var2, g2 = core_fit.model_row_variances(block.core, block.parameters(), V, n_threads=threads)
        np.testing.assert_array_equal(var1, var2)
        np.testing.assert_array_equal(g1, g2)
    g, jac = block.evaluate()
    np.testing.assert_array_equal(g1, g)
    j = jac.as_scipy()
    expected = core_fit.row_quadratic_forms(j.indptr.astype(np.int64), j.indices.astype(np.int32), j.data, V)
    np.testing.assert_allclose(var1, expected, rtol=1e-12)
    np.testing.assert_allclose(var1, np.einsum("ij,jk,ik->i", j.toarray(), V, j.toarray()), rtol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        core_fit.model_row_variances(block.core, block.parameters(), V[:-1, :-1])
    with pytest.raises(ValueError, match="params must hold"):  # raised inside the threads
        core_fit.model_row_variances(block.core, block.parameters()[:-1], V, n_threads=2)
    bad = V.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="V"):
        core_fit.model_row_variances(block.core, block.parameters(), bad)
    grid = SmoothScaleComponent2D(rng.uniform(0.9, 1.1, 15), shape=(5, 3))
    grid.data = {"x": rng.uniform(0, 5, 100), "y": rng.uniform(0, 3, 100)}
    grid.update_reflection_data()
    grid_block = ComponentModelBlock([grid])
    assert not grid_block.core.evaluates_rows()
    with pytest.raises(ValueError, match="row ranges"):
        core_fit.model_row_variances(grid_block.core, grid_block.parameters(), np.eye(15))



def test_model_row_variances_into_writes_each_block_in_place(rng):
    """model_row_variances_into of several data blocks of one model: each block's (var, g) are
    model_row_variances' bit for bit, written at its rows (other positions untouched), for one
    and two threads; mismatched rows, repeated or out-of-range positions, other column layouts
    and read-only outputs are refused."""
    from xtalscale._core import fit as core_fit

    blocks = [ComponentModelBlock(_physical(rng, n, True)) for n in (5000, 9000, 1)]
    params = blocks[0].parameters()  # the same layout in every block: one model's parameters
    n = blocks[0].core.n_cols
    a = rng.standard_normal((n, n))
    V = a @ a.T * 1e-4
    n_out = sum(b.core.n_rows for b in blocks) + 7
    order = rng.permutation(n_out)
    rows = np.split(order[:n_out - 7], np.cumsum([b.core.n_rows for b in blocks])[:-1])
    for threads in (1, 2):
        var, g = np.full(n_out, -1.0), np.full(n_out, -2.0)
        core_fit.model_row_variances_into([b.core for b in blocks], params, V, rows, var, g, n_threads=threads)
        for block, where in zip(blocks, rows):
            want_var, want_g = core_fit.model_row_variances(block.core, params, V)
            assert np.array_equal(var[where], want_var) and np.array_equal(g[where], want_g)
        assert np.all(var[order[n_out - 7:]] == -1.0) and np.all(g[order[n_out - 7:]] == -2.0)
    cores = [b.core for b in blocks]
    var, g = np.zeros(n_out), np.zeros(n_out)
    with pytest.raises(ValueError, match="one array per block"):
        core_fit.model_row_variances_into(cores, params, V, rows[:2], var, g)
    with pytest.raises(ValueError, match="rows\\[1\\]"):
        core_fit.model_row_variances_into(cores, params, V, [rows[0], rows[1][:-1], rows[2]], var, g)
    with pytest.raises(ValueError, match="named twice"):
        core_fit.model_row_variances_into(cores, params, V, [rows[0], rows[1], rows[0][:1]], var, g)
    with pytest.raises(ValueError, match="outside"):
        core_fit.model_row_variances_into(cores, params, V, [rows[0], rows[1], np.array([n_out])], var, g)
    with pytest.raises(ValueError, match="shape"):
        core_fit.model_row_variances_into(cores, params, V[:-1, :-1], rows, var, g)
    with pytest.raises(ValueError, match="g"):
        core_fit.model_row_variances_into(cores, params, V, rows, var, g[:-1])
    frozen = np.zeros(n_out)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        core_fit.model_row_variances_into(cores, params, V, rows, frozen, g)


@pytest.mark.parametrize("lean", [False, True])
def test_chunks_on_threads_give_the_same_bits(rng, lean):
    """evaluate, evaluate_scales and transpose_product with the row chunks on 1, 2 or 3 C++
    threads (each with its own scratch; the transposed product's chunk sums added in chunk
    order): the same bits for any count; n_threads < 1 is refused."""
    block = ComponentModelBlock(_physical(rng, 21000, lean))  # 6 chunks, the last partial
    c = rng.normal(size=block.core.n_rows)
    results = []
    for n_threads in (1, 2, 3):
        g, jac = block.evaluate(n_threads)
        evaluated = (np.array(g), np.array(jac.as_scipy().data))
        scales = np.array(block.evaluate_scales(n_threads))
        product = block.transpose_product(c, n_threads)
        results.append((*evaluated, scales, product))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_threads"):
        block.core.evaluate(block.parameters(), 0)


def _several_blocks(rng):
    """Model blocks of several 'datasets': lean and weight-matrix physical models of different
    lengths (one over 4096 rows: chunked) and a grid/KB/fixed-factor model."""
    blocks = [ComponentModelBlock(_physical(rng, n, lean)) for n, lean in
              ((700, True), (5000, True), (300, False), (1, True))]
    n = 900
    blocks.append(ComponentModelBlock(_array_kb_and_analytical(rng, n), fixed_scales=rng.uniform(0.5, 2.0, n)))
    return blocks


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_several_blocks_in_one_call_give_each_blocks_bits(rng, n_threads):
    """evaluate_scales_of_blocks and transpose_product_of_blocks give each block's own
    evaluate_scales and transpose_product (one thread), bit for bit, concatenated in block
    order, for any thread count; each block's g buffer is written as by its own call."""
    blocks = _several_blocks(rng)
    cores = [b.core for b in blocks]
    params = [b.parameters() for b in blocks]
    g_each = [np.array(b.evaluate_scales(1)) for b in blocks]
    rows = sum(b.core.n_rows for b in blocks)
    c = rng.standard_normal(rows)
    starts = np.concatenate([[0], np.cumsum([b.core.n_rows for b in blocks])])
    tp_each = [b.transpose_product(c[starts[k]:starts[k + 1]], 1) for k, b in enumerate(blocks)]
    for b in blocks:  # the buffers are rewritten by the calls below
        b.core.evaluate_scales(np.zeros(0) if not b.parameters().size else b.parameters() * 0.5, 1)
    g, usable = mb.evaluate_scales_of_blocks(cores, params, n_threads=n_threads)
    assert usable and g.shape == (rows,)
    np.testing.assert_array_equal(g, np.concatenate(g_each))
    for b, ge in zip(blocks, g_each):
        np.testing.assert_array_equal(b.scales, ge)
    tp = mb.transpose_product_of_blocks(cores, params, c, n_threads=n_threads)
    np.testing.assert_array_equal(tp, np.concatenate(tp_each))
    assert tp.size == sum(b.core.n_cols for b in blocks)
    # evaluate_blocks: each block's evaluate (g and the CSR arrays), bit for bit
    each = []
    for b in blocks:
        g1, jac = b.evaluate(1)
        each.append((np.array(g1), np.array(jac.data), np.array(jac.indices), np.array(jac.indptr)))
        b.core.release_values(True)  # the next evaluation builds the pattern again
    mb.evaluate_blocks(cores, params, n_threads=n_threads)
    for b, (g1, values, indices, indptr) in zip(blocks, each):
        assert b.core.evaluated
        np.testing.assert_array_equal(b.core.scales, g1)
        np.testing.assert_array_equal(b.core.values, values)
        np.testing.assert_array_equal(b.core.indices, indices)
        np.testing.assert_array_equal(b.core.indptr, indptr)


def test_several_blocks_report_and_may_skip_unusable_scales(rng):
    """A block whose g is not finite and > 0 makes ``usable`` False; with stop_at_bad (one
    thread: in order) the blocks after it are not evaluated (their buffers keep their g)."""
    blocks = _several_blocks(rng)[:3]
    cores = [b.core for b in blocks]
    params = [b.parameters() for b in blocks]
    mb.evaluate_scales_of_blocks(cores, params)
    before = np.array(blocks[2].scales)
    bad = [p.copy() for p in params]
    bad[0][:9] = -5.0  # the fixed-first scale's free parameters: g < 0 on some rows
    bad[2] = params[2] * 1.1
    g, usable = mb.evaluate_scales_of_blocks(cores, bad, stop_at_bad=True, n_threads=1)
    assert not usable
    np.testing.assert_array_equal(blocks[2].scales, before)  # skipped
    g, usable = mb.evaluate_scales_of_blocks(cores, bad, stop_at_bad=False, n_threads=1)
    assert not usable and not np.array_equal(blocks[2].scales, before)
    for n_threads in (1, 2):
        assert not mb.evaluate_scales_of_blocks(cores, bad, stop_at_bad=True, n_threads=n_threads)[1]


def test_several_blocks_refuse_bad_lists(rng):
    blocks = _several_blocks(rng)[:2]
    cores = [b.core for b in blocks]
    params = [b.parameters() for b in blocks]
    with pytest.raises(ValueError, match="one array per block"):
        mb.evaluate_scales_of_blocks(cores, params[:1])
    with pytest.raises(ValueError, match="appears twice"):
        mb.evaluate_scales_of_blocks([cores[0], cores[0]], [params[0], params[0]])
    with pytest.raises(ValueError, match="appears twice"):
        mb.evaluate_blocks([cores[0], cores[0]], [params[0], params[0]])
    with pytest.raises(ValueError, match="params"):
        mb.evaluate_blocks(cores, [params[0], params[1][:-1]])
    with pytest.raises(ValueError, match="appears twice"):
        mb.transpose_product_of_blocks([cores[0], cores[0]], [params[0], params[0]],
                                       np.ones(2 * cores[0].n_rows))
    with pytest.raises(ValueError, match="one value per row"):
        mb.transpose_product_of_blocks(cores, params, np.ones(3))
    short = [params[0], params[1][:-1]]
    with pytest.raises(ValueError, match="params"):
        mb.evaluate_scales_of_blocks(cores, short)
    with pytest.raises(ValueError, match="n_threads"):
        mb.transpose_product_of_blocks(cores, params, np.ones(sum(c.n_rows for c in cores)), n_threads=0)
    assert mb.evaluate_scales_of_blocks([], [])[0].size == 0


def _rows_blocks(rng, n):
    """Blocks whose terms cover every kind of evaluate_rows's row assembly: lean smoothers (a
    run of columns a row), held-weight smoothers (a pattern), lookup harmonics (dense),
    float32 harmonics, an inactive term and a scale factor, a fixed-scales term, a zero scale."""
    lean = ComponentModelBlock(_physical(rng, n, True))
    held = ComponentModelBlock(_physical(rng, n, False), active=[True, False, True])
    mixed = mb.ModelBlock(n)
    comps = _physical(rng, n, True)
    for comp in comps:
        mixed.add_term(comp.model_term(0))
    mixed.add_term(mb.HarmonicsTerm(rng.normal(size=(n, 8)).astype(np.float32)))
    mixed.add_term(mb.ScaleFactorTerm(n), False)
    fixed = rng.uniform(0.5, 2.0, n)
    fixed[3] = 0.0  # others = 0 for every term of that row, without a division
    mixed.add_term(mb.FixedScalesTerm(fixed))
    mixed.add_term(mb.ScaleFactorTerm(n))
    params = np.concatenate([lean.parameters(), rng.normal(size=8), [1.3, 0.7]])
    return [(lean.core, lean.parameters()), (held.core, held.parameters()), (mixed, params)]


def test_evaluate_rows_gives_evaluates_rows_bit_for_bit(rng):
    """ModelBlock.evaluate_rows (the chunk the fused normal equations and the row variances
    evaluate): g, the CSR pattern and ∂g/∂p of any row range are evaluate()'s rows bit for
    bit, for every kind of term, with one scratch reused over ranges that shrink and grow
    (its buffers are kept, not shrunk: views stop at indptr[count]); an empty range is valid."""
    n = 3000
    for core, params in _rows_blocks(rng, n):
        assert core.evaluates_rows()
        core.evaluate(params)
        g, indptr, indices, values = (np.array(a) for a in (core.scales, core.indptr, core.indices, core.values))
        scratch = mb.RowsScratch()
        for first, count in [(0, n), (5, 1), (17, 1024), (2000, 1000), (0, 0), (1, 999), (100, 2900), (n, 0)]:
            core.evaluate_rows(params, first, count, scratch)
            lo, hi = indptr[first], indptr[first + count]
            np.testing.assert_array_equal(scratch.g, g[first:first + count])
            np.testing.assert_array_equal(scratch.indptr, indptr[first:first + count + 1] - lo)
            np.testing.assert_array_equal(scratch.indices, indices[lo:hi])
            np.testing.assert_array_equal(scratch.values, values[lo:hi])
            assert not scratch.values.flags.writeable
        with pytest.raises(ValueError, match="out of range"):
            core.evaluate_rows(params, n - 1, 2, scratch)
        with pytest.raises(ValueError, match="params must hold"):
            core.evaluate_rows(params[:-1], 0, 10, scratch)
