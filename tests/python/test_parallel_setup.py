"""The set-up kernels that run on several threads (a model block's pattern build, its chunked
evaluation) give the same arrays for any thread count, and the same as the serial
construction."""
from __future__ import annotations

import numpy as np
import pytest

from xtalscale._core import model_block as mb
from xtalscale.components import (
    ComponentModelBlock,
    SHScaleComponent,
    SingleBScaleFactor,
    SmoothBScaleComponent1D,
    SmoothScaleComponent1D,
    sh_lookup_data,
)


def _components(n, lean, seed=3):
    rng = np.random.default_rng(seed)
    scale = SmoothScaleComponent1D(rng.uniform(0.8, 1.2, 12))
    scale.fix_initial_parameter()
    decay = SmoothBScaleComponent1D(rng.uniform(-0.5, 0.5, 9))
    sh = SHScaleComponent(rng.uniform(-0.05, 0.05, 24))
    bfac = SingleBScaleFactor([0.3])
    for comp in (scale, decay):
        comp.lean_min_reflections = 0 if lean else 10**12
    sh.float32_min_reflections = 0 if lean else 10**12
    # clustered x: the windows (and so the rows' nnz) vary along the rows
    scale.data = {"x": np.sort(rng.uniform(0, 24, n))}
    decay.data = {"x": rng.uniform(0, 24, n), "d": rng.uniform(0.8, 4.0, n)}
    sh.data = sh_lookup_data(rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), 4)
    bfac.data = {"d": rng.uniform(1, 3, n)}
    comps = [scale, decay, sh, bfac]
    for comp in comps:
        comp.update_reflection_data()
    return comps


def _arrays(core):
    return [np.array(a) for a in (core.scales, core.indptr, core.indices, core.values)]


def _serial_reference(block, active):
    """The same terms in a block with one more (inactive, parameter-free) external term: a
    block whose terms do not all serve row ranges builds its pattern from the terms' whole
    patterns, serially (the construction before chunked builds)."""
    n = block.core.n_rows
    core = mb.ModelBlock(n)
    for term, act in zip(block._terms, active):
        core.add_term(term, act)
    external = mb.ExternalTerm(n, 0)
    external.set_dense(np.ones(n), np.zeros((n, 0)))
    core.add_term(external, False)
    assert not core.evaluates_rows()
    core.evaluate(block.parameters())
    return core


# 13 000 rows: four 4096-row chunks, the last one short
@pytest.mark.parametrize("n", [1, 4095, 4096, 13000])
@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("active", [(True, True, True, True), (True, False, True, False),
                                    (False, True, False, True)])
def test_pattern_build_is_the_serial_construction_for_any_thread_count(n, lean, active):
    comps = _components(n, lean)
    block = ComponentModelBlock(comps, active=active)
    assert block.core.evaluates_rows()
    reference = _arrays(_serial_reference(block, active))
    for n_threads in (1, 2, 3):
        block.core.release_values(True)  # the next evaluation builds the pattern again
        version = block.core.version
        block.evaluate(n_threads)
        assert block.core.version == version + 1
        got = _arrays(block.core)
        assert got[1].dtype == np.int64 and got[2].dtype == np.int32
        for a, b in zip(got, reference):
            np.testing.assert_array_equal(a, b)


def test_first_build_on_threads_equals_the_first_build_on_one(n=9000):
    outputs = []
    for n_threads in (1, 2, 3):
        block = ComponentModelBlock(_components(n, True, seed=5))  # fresh: no pattern yet
        block.evaluate(n_threads)
        outputs.append(_arrays(block.core))
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [20000, 8193])
def test_balanced_chunks_give_the_same_g_and_derivatives_for_any_thread_count(n):
    """Per-row passes split a block into equal chunks per thread count (20 000 rows: 5 chunks
    on one thread, 6 on two or three): every row's values are the same bits."""
    block = ComponentModelBlock(_components(n, True, seed=9))
    params = block.parameters()
    outputs, scales = [], []
    for n_threads in (1, 2, 3):
        block.evaluate(n_threads)
        outputs.append(_arrays(block.core))
        block.core.evaluate_scales(params, n_threads)
        scales.append(np.array(block.core.scales))
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            np.testing.assert_array_equal(a, b)
    for g in scales:
        np.testing.assert_array_equal(g, outputs[0][0])
