"""The minimisation table's set-up on the scaler's thread pool (``make_ready_for_scaling``):
the same blocks, weights, table-order arrays and component terms as on one thread, bit for
bit; and the pieces it is made of (``_given_group_parts``, ``IhTableBlock.rows_ascend``,
``prepare_model_terms``) against the paths they replace, with bad input refused."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_ih_block_builder import SWEEP20, SWEEP25, _assert_same_block

from xtalscale.components import SmoothBScaleComponent1D, SmoothScaleComponent1D, _SmoothComponentND
from xtalscale.fit.ih_table import IhTableBlock, IhTableError, _given_group_parts


def _ready_scaler(monkeypatch, nproc, error_model):
    """The two shipped sweeps' scaler after ``make_ready_for_scaling`` (streamed in ~1,000-row
    blocks, the 1-D smoothers in their lean form), with ``nproc`` threads."""
    from xtalscale.error_model import BasicErrorModel
    from xtalscale.job import scaler as scaler_module
    from xtalscale.job.algorithm import ScalingAlgorithm
    from xtalscale.job.inputs import load_inputs
    from xtalscale.job.phil import parse_phil_arguments
    from xtalscale.job.reflection_selection import select_for_minimisation

    monkeypatch.setattr(scaler_module, "STREAM_MIN_ROWS", 1000)
    monkeypatch.setattr(scaler_module, "STREAM_BLOCK_ROWS", 1000)
    monkeypatch.setattr(_SmoothComponentND, "lean_min_reflections", 0)
    inputs = load_inputs(SWEEP20 + SWEEP25)
    params, _ = parse_phil_arguments(["output.html=None", f"nproc={nproc}"])
    scaler = ScalingAlgorithm(params, inputs.experiments, inputs.tables).scaler
    select_for_minimisation(scaler)
    if error_model:
        scaler.datasets[1].error_model = BasicErrorModel(a=1.3, b=0.04)
    scaler.make_ready_for_scaling()
    return scaler


@pytest.mark.parametrize("error_model", [False, True])
def test_set_up_on_the_pool_is_the_set_up_on_one_thread(monkeypatch, error_model):
    one = _ready_scaler(monkeypatch, 1, error_model)
    two = _ready_scaler(monkeypatch, 2, error_model)
    try:
        assert two.n_threads == 2 and one.Ih_table.n_work_blocks >= 4
        assert len(one.Ih_table.blocked_data_list) == len(two.Ih_table.blocked_data_list)
        for a, b in zip(one.Ih_table.blocked_data_list, two.Ih_table.blocked_data_list):
            _assert_same_block(b, a)
            assert a.weights.tobytes() == b.weights.tobytes()
            for x, y in zip(a.table_arrays(), b.table_arrays()):
                assert x.tobytes() == y.tobytes()
        for ds_one, ds_two in zip(one.datasets, two.datasets):
            for name, comp in ds_two.model.components.items():
                other = ds_one.model.components[name]
                assert comp.n_refl == other.n_refl
                if isinstance(comp, _SmoothComponentND):
                    # the lean terms are built (and what model_term returns), on either path
                    for b in range(len(comp.n_refl)):
                        assert comp._terms[b][1] is comp.model_term(b)
                        assert other._terms[b][1] is other.model_term(b)
                    for b, (key, window, q) in comp._lean_windows.items():
                        held = other._lean_windows[b]
                        assert key == held[0] and window.tobytes() == held[1].tobytes()
                        assert q.tobytes() == held[2].tobytes()
    finally:
        two.shutdown_threads()


def test_table_order_arrays_follow_the_error_model_weights(monkeypatch):
    """The table-order I and w made ahead are those of the block's final weights: a later
    weight change (here a second error model) is picked up, not the early copy."""
    from xtalscale.error_model import BasicErrorModel

    scaler = _ready_scaler(monkeypatch, 1, True)
    block = scaler.Ih_table.blocked_data_list[0]
    early = block.table_arrays()[2]
    scaler.datasets[0].error_model = BasicErrorModel(a=2.0, b=0.1)
    scaler.apply_error_model_weights()
    later = block.table_arrays()[2]
    assert later is not early
    assert later.tobytes() == np.ascontiguousarray(block.weights[block._order]).tobytes()


def _group_numbers(rng):
    parts = [rng.integers(0, 40, n) * 3 for n in (50, 0, 31)]  # sparse numbers, one empty table
    return parts, [p.size for p in parts]


@pytest.mark.parametrize("threads", [None, 2])
def test_given_group_parts_are_the_concatenated_numbering_split(threads):
    rng = np.random.default_rng(3)
    parts, sizes = _group_numbers(rng)
    serial, offsets = _given_group_parts(parts, sizes)
    with ThreadPoolExecutor(threads or 1) as pool:
        mapper = pool.map if threads else None
        split, split_offsets = _given_group_parts(parts, sizes, mapper)
    assert split_offsets.dtype == offsets.dtype and split_offsets.tobytes() == offsets.tobytes()
    assert [p.dtype for p in split] == [np.dtype(np.int64)] * 3
    assert np.concatenate(split).tobytes() == np.concatenate(serial).tobytes()
    # the numbers each table's rows had before are kept in order, renumbered 0, 1, ...
    numbers, counts = np.unique(np.concatenate(parts), return_inverse=True, return_counts=True)[1:]
    assert np.concatenate(split).tobytes() == numbers.astype(np.int64).tobytes()
    assert offsets.tolist() == [0, *np.cumsum(counts).tolist()]


def test_given_group_parts_refuses_bad_numbers():
    good = [np.arange(4), np.arange(3)]
    with pytest.raises(IhTableError, match="arrays for"):
        _given_group_parts(good, [4])
    with pytest.raises(IhTableError, match="one integer per selected row"):
        _given_group_parts(good, [4, 2])
    with pytest.raises(IhTableError, match="one integer per selected row"):
        _given_group_parts([np.arange(4.0), np.arange(3)], [4, 3])
    with pytest.raises(IhTableError, match=">= 0"):
        _given_group_parts([np.arange(4), np.array([0, -1, 2])], [4, 3])
    parts, offsets = _given_group_parts([np.zeros(0, np.int64)], [0])
    assert parts[0].size == 0 and offsets.tolist() == [0]


def test_rows_ascend_checks_each_range_once_per_row_map():
    block = IhTableBlock(3, 6, 2)
    block.add_data(0, np.array([0, 1, 2]), {"intensity": np.ones(3), "variance": np.ones(3)},
                   np.zeros((3, 3), np.int32))
    block.add_data(1, np.array([0, 2, 2]), {"intensity": np.ones(3), "variance": np.ones(3)},
                   np.zeros((3, 3), np.int32))
    rows = block.table_arrays()[3]
    expected = all(np.all(np.diff(rows[a:b]) > 0) for a, b in ((0, 3), (3, 6)))
    assert block.rows_ascend([0, 3, 6]) is expected is True
    assert block.rows_ascend([0, 6]) is False  # the datasets' rows interleave in table order
    block._table_rows = rows[::-1].copy()  # a new row map: found again
    assert block.rows_ascend([0, 3, 6]) is False
    assert block.rows_ascend([0, 1]) is True  # one row (and no row) ascend


@pytest.mark.parametrize("cls", [SmoothScaleComponent1D, SmoothBScaleComponent1D])
def test_prepared_terms_are_the_terms_built_on_use(cls):
    rng = np.random.default_rng(11)
    x, d = rng.uniform(0, 10, 3000), rng.uniform(0.8, 4.0, 3000)
    blocks = [np.sort(rng.permutation(3000)[:k]) for k in (900, 1200, 0)]
    made = []
    for prepare in (True, False):
        comp = cls(rng.uniform(0.8, 1.2, 8) if cls is SmoothScaleComponent1D else rng.uniform(-0.5, 0.5, 8))
        comp.lean_min_reflections = 1000
        comp.data = {"x": x} if cls is SmoothScaleComponent1D else {"x": x, "d": d}
        comp.update_reflection_data(block_selections=blocks)
        if prepare:
            comp.prepare_model_terms()
            assert sorted(comp._terms) == [0, 1]  # not the empty block
        made.append(comp)
    made[1].parameters = made[0].parameters.copy()
    for b in range(2):
        one, two = made[0].model_term(b), made[1].model_term(b)
        assert made[0]._terms[b][1] is one
        p = made[0].parameters
        for x_, y_ in zip(one.evaluate(p), two.evaluate(p)):
            assert np.asarray(x_).tobytes() == np.asarray(y_).tobytes()
    small = cls(np.ones(8) if cls is SmoothScaleComponent1D else np.zeros(8))
    small.data = {"x": x[:50]} if cls is SmoothScaleComponent1D else {"x": x[:50], "d": d[:50]}
    small.update_reflection_data()
    small.prepare_model_terms()  # below lean_min_reflections: weight matrices, built on use
    assert small._terms == {} and small._lean_windows == {}


@pytest.mark.parametrize("factored", [True, False])
def test_prepared_sh_terms_only_in_the_factored_form(factored):
    """Factored SH blocks (large data, xtalscale's own table) get their light terms ahead, the
    same as built on use; the other forms (terms holding harmonic blocks) are left alone."""
    from test_components_lean import _sh

    rng = np.random.default_rng(5)
    made = []
    for prepare in (True, False):
        comp = _sh(np.random.default_rng(5), 400, float32=factored)
        comp.update_reflection_data(block_selections=[np.arange(0, 400, 2), np.arange(1, 400, 2)])
        assert comp._factored is factored
        if prepare:
            comp.prepare_model_terms()
            assert sorted(comp._terms) == ([0, 1] if factored else [])
        made.append(comp)
    p = rng.uniform(-0.05, 0.05, made[0].parameters.size)
    for comp in made:
        comp.parameters = p
    for b in range(2):
        one, two = made[0].model_term(b), made[1].model_term(b)
        for x_, y_ in zip(one.evaluate(p), two.evaluate(p)):
            assert np.asarray(x_).tobytes() == np.asarray(y_).tobytes()
