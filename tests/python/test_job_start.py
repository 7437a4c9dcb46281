"""The job's start (prepare, the first grouping of the suitable rows): the fused ASU mapping with
Bijvoet-minus flags, the multi-threaded grouping sort, the first grouping made from the kept
suitable-row columns and the column views of all-suitable datasets give bit for bit what the
paths they replace give, for any thread count, and raise as they did."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from xtalscale._core import grouping as core_grouping
from xtalscale._core import job as kernels
from xtalscale.job import grouped as grouped_module
from xtalscale.job.algorithm import ScalingAlgorithm
from xtalscale.job.grouped import GroupedObservations, asu_grouping, asu_grouping_and_groups
from xtalscale.job.inputs import load_inputs
from xtalscale.job.phil import parse_phil_arguments
from xtalscale.job.scaler import _suitable_part
from xtalscale.symmetry import SpaceGroup, _asu_symmetry, group_reflections, map_to_asu, map_to_asu_bijvoet

DATA = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"
SWEEPS = [str(DATA / "20_integrated.pickle"), str(DATA / "20_integrated_experiments.json"),
          str(DATA / "25_integrated.pickle"), str(DATA / "25_integrated_experiments.json")]


def _random_hkl(n: int, span: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hkl = rng.integers(-span, span + 1, (n, 3)).astype(np.int32)
    return hkl[np.any(hkl != 0, axis=1)]


# ---------------------------------------------------------------- ASU mapping with minus flags
@pytest.mark.parametrize("symbol", ["P 1", "P -1", "P 1 2 1", "P 2 2 2", "P 41 2 2", "P 3 2 1", "P 3 1 2",
                                    "P 61 2 2", "I 2 3", "F m -3 m", "C 1 2 1", "B 1 1 2"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_map_to_asu_bijvoet_is_map_to_asu_asu_and_minus_flags(symbol, n_threads):
    hkl = _random_hkl(120_000, 12, seed=len(symbol))
    sg = SpaceGroup(symbol)
    reference = map_to_asu(hkl, sg, anomalous=False)
    asu, minus = map_to_asu_bijvoet(hkl, sg, n_threads=n_threads)
    assert asu.dtype == np.int32 and minus.dtype == np.bool_
    np.testing.assert_array_equal(asu, reference.asu_hkl)
    np.testing.assert_array_equal(minus, reference.friedel_minus)


def test_map_to_asu_bijvoet_raises_as_map_to_asu():
    sg = SpaceGroup("P 2 2 2")
    rotations, basis, condition = _asu_symmetry(sg)
    hkl = _random_hkl(100_000, 9, seed=1)
    hkl[70_000] = 0
    for kernel in (core_grouping.map_to_asu, core_grouping.map_to_asu_bijvoet):
        with pytest.raises(ValueError, match="row 70000 is \\(0, 0, 0\\)"):
            kernel(hkl, rotations, basis, condition, n_threads=2)
    with pytest.raises(ValueError, match="shape"):
        core_grouping.map_to_asu_bijvoet(hkl[:, :2], rotations, basis, condition)
    with pytest.raises(ValueError, match="condition"):
        core_grouping.map_to_asu_bijvoet(hkl[:10], rotations, basis, 10)
    with pytest.raises(ValueError, match="basis"):
        core_grouping.map_to_asu_bijvoet(hkl[:10], rotations, basis[:2], condition)
    with pytest.raises(ValueError, match="rotations"):
        core_grouping.map_to_asu_bijvoet(hkl[:10], rotations[:, :2], basis, condition)
    with pytest.raises(ValueError, match="implausibly large"):
        map_to_asu_bijvoet(np.array([[2**20, 1, 1]]), sg)
    asu, minus = map_to_asu_bijvoet(np.zeros((0, 3), np.int32), sg)
    assert asu.shape == (0, 3) and minus.shape == (0,)


# ---------------------------------------------------------------- threaded grouping sort
@pytest.mark.parametrize("span", [3, 40, 400])  # counting sort (small ranges) and radix sort (wide)
@pytest.mark.parametrize("n_rows", [1, 1000, 250_001])
def test_group_miller_indices_is_the_same_for_any_thread_count(span, n_rows):
    hkl = _random_hkl(n_rows + 10, span, seed=span)[:n_rows]
    serial = core_grouping.group_miller_indices(hkl)
    for n_threads in (1, 2, 3, 8):
        threaded = core_grouping.group_miller_indices(hkl, n_threads=n_threads)
        for a, b in zip(serial, threaded):
            assert a.dtype == b.dtype == np.int64
            np.testing.assert_array_equal(a, b)
    order, group_index, offsets = serial
    np.testing.assert_array_equal(order, np.lexsort(hkl.T[::-1]))  # stable, (h, k, l) order
    np.testing.assert_array_equal(group_index, kernels.group_of_rows(order, offsets))


def test_group_miller_indices_raises_for_bad_input():
    with pytest.raises(ValueError, match="shape"):
        core_grouping.group_miller_indices(np.zeros((5, 2), np.int32), n_threads=2)
    wide = np.array([[-2**20, 0, 0], [2**20 + 5, 0, 0]], dtype=np.int32)
    with pytest.raises(ValueError, match="range too large"):
        core_grouping.group_miller_indices(np.repeat(wide, 40_000, axis=0), n_threads=2)
    order, group_index, offsets = core_grouping.group_miller_indices(np.zeros((0, 3), np.int32), n_threads=2)
    assert order.size == group_index.size == 0 and offsets.tolist() == [0]


def test_group_reflections_threads_do_not_change_the_grouping():
    asu = map_to_asu(_random_hkl(200_000, 15, seed=5), SpaceGroup("P 2 2 2")).asu_hkl
    one, two = group_reflections(asu), group_reflections(asu, n_threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- cached ASU groupings
@pytest.mark.parametrize("anomalous", [False, True])
def test_asu_grouping_and_groups_gives_the_group_of_every_row_of_a_fresh_sort(anomalous):
    hkl = _random_hkl(50_000, 10, seed=7)
    grouped_module._ASU_CACHE.clear()
    grouping, group_index = asu_grouping_and_groups(hkl, "P 2 2 2", anomalous, n_threads=2)
    np.testing.assert_array_equal(group_index, kernels.group_of_rows(grouping.order, grouping.offsets))
    again, none = asu_grouping_and_groups(hkl, "P 2 2 2", anomalous)
    assert none is None and again.order is grouping.order  # from the cache
    grouped_module._ASU_CACHE.clear()
    fresh = asu_grouping(hkl, "P 2 2 2", anomalous)
    for a, b in zip(fresh, grouping):
        np.testing.assert_array_equal(a, b)


def test_asu_grouping_keeps_a_handed_over_array():
    hkl = _random_hkl(1000, 6, seed=8)
    grouped_module._ASU_CACHE.clear()
    asu_grouping(hkl, "P 1", False, copy=False)
    kept = grouped_module._ASU_CACHE[0][1]
    assert np.shares_memory(kept, hkl) and not kept.flags.writeable  # kept, not copied
    copied = _random_hkl(1000, 6, seed=9)
    asu_grouping(copied, "P 1", False)
    assert not np.shares_memory(grouped_module._ASU_CACHE[0][1], copied) and copied.flags.writeable


# ---------------------------------------------------------------- the first grouping of the job
def _scaler(*args: str):
    inputs = load_inputs(SWEEPS)
    params, _ = parse_phil_arguments(list(args))
    return ScalingAlgorithm(params, inputs.experiments, inputs.tables).scaler


def _from_tables(scaler, monkeypatch) -> GroupedObservations:
    """The first grouping as the per-dataset gathers and from_tables make it."""
    with monkeypatch.context() as m:
        m.setattr(type(scaler), "_group_every_suitable_row", lambda self: None)
        grouped_module._ASU_CACHE.clear()
        scaler._grouped_cache = None
        return scaler._grouped_suitable()


@pytest.mark.parametrize("args", [("nproc=1",), ("nproc=2",), ("nproc=2", "anomalous=True")])
def test_first_grouping_is_the_from_tables_grouping_bit_for_bit(args, monkeypatch):
    scaler = _scaler(*args)
    grouped_module._ASU_CACHE.clear()
    first = scaler.global_Ih_table
    assert scaler._grouped_cache is first
    reference = _from_tables(scaler, monkeypatch)
    for f in fields(GroupedObservations):
        a, b = getattr(first, f.name), getattr(reference, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            assert a.tobytes() == b.tobytes(), f.name
    assert first.extra.keys() == reference.extra.keys() == {"d"}
    assert first.extra["d"].tobytes() == reference.extra["d"].tobytes()
    assert first.n_datasets == reference.n_datasets
    # the group of every row, from the sort (not anomalous) or computed: group_of_rows'
    np.testing.assert_array_equal(first.group_of_row(), kernels.group_of_rows(first.order, first.offsets))
    # the values are the kept suitable-row columns: the next readers find them gathered
    assert first.intensity is scaler.suitable_values("intensity")
    assert first.scale is scaler.suitable_values("inverse_scale_factor")
    scaler.shutdown_threads()


@pytest.mark.parametrize("column, value, message", [
    ("intensity", np.nan, "column 'intensity' is not finite"),
    ("variance", np.inf, "column 'variance' is not finite"),
    ("variance", -1.0, "column 'variance' must be positive"),
    ("inverse_scale_factor", np.inf, "column 'inverse_scale_factor' is not finite"),
])
@pytest.mark.parametrize("nproc", [1, 2])
def test_first_grouping_raises_as_from_tables_for_unusable_values(column, value, message, nproc):
    scaler = _scaler(f"nproc={nproc}")
    ds = scaler.datasets[1]
    values = np.array(ds.table[column], dtype=np.float64)
    values[ds.suitable_idx[5]] = value
    ds.table[column] = values
    grouped_module._ASU_CACHE.clear()
    with pytest.raises(ValueError, match=message):
        scaler._grouped_suitable()
    scaler.shutdown_threads()


def test_first_grouping_raises_as_from_tables_for_a_zero_index():
    scaler = _scaler("nproc=2")
    ds = scaler.datasets[0]
    hkl = np.array(ds.table["miller_index"]).reshape(-1, 3)
    hkl[ds.suitable_idx[3]] = 0
    ds.table["miller_index"] = type(ds.table["miller_index"])(hkl)
    grouped_module._ASU_CACHE.clear()
    with pytest.raises(ValueError, match="is \\(0, 0, 0\\)"):
        scaler._grouped_suitable()
    scaler.shutdown_threads()


# ---------------------------------------------------------------- the models' suitable rows
def test_suitable_part_views_every_row_read_only_and_copies_a_selection():
    table = load_inputs(SWEEPS[:2]).tables[0]
    every = np.ones(len(table), bool)
    names = ["d", "s1", "id"]
    part = _suitable_part(table, every, names)
    assert sorted(part.keys()) == sorted(names) and len(part) == len(table)
    assert part.experiment_identifiers().as_dict() == table.experiment_identifiers().as_dict()
    for name in names:
        view = np.asarray(part[name])
        assert type(part[name]) is type(table[name])
        assert np.shares_memory(view, np.asarray(table[name])) and not view.flags.writeable
        np.testing.assert_array_equal(view, np.asarray(table[name]))
    assert np.asarray(table["d"]).flags.writeable  # the table's own columns stay writable
    some = every.copy()
    some[::3] = False
    selected = _suitable_part(table, some, names)
    reference = table.select(some, columns=names)
    for name in names:
        assert not np.shares_memory(np.asarray(selected[name]), np.asarray(table[name]))
        np.testing.assert_array_equal(np.asarray(selected[name]), np.asarray(reference[name]))
    every_column = _suitable_part(table, every, None)
    assert every_column.keys() == table.keys()


def test_clear_flags_is_unset_flags_of_an_all_true_mask():
    from xtalscale import flex_arrays as fa
    from xtalscale.reflection_table import Flags, reflection_table

    bits = int(Flags.bad_for_scaling) | int(Flags.scaled)
    rng = np.random.default_rng(11)
    table = reflection_table(1000)
    table["flags"] = fa.size_t(rng.integers(0, 2**40, 1000, dtype=np.uint64))
    expected = np.asarray(table["flags"]).copy()
    reference = table.copy()
    reference.unset_flags(np.ones(1000, bool), bits)
    column = np.asarray(table["flags"])
    table.clear_flags(bits)
    assert np.asarray(table["flags"]) is column  # in place
    np.testing.assert_array_equal(column, np.asarray(reference["flags"]))
    assert not np.array_equal(column, expected)
    no_flags = reflection_table(5)
    no_flags["d"] = fa.double(np.ones(5))
    no_flags.clear_flags(bits)  # made, as unset_flags makes it
    np.testing.assert_array_equal(np.asarray(no_flags["flags"]), np.zeros(5, np.uint64))
    wrong = reflection_table(3)
    wrong["flags"] = fa.int(np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="flags"):
        wrong.clear_flags(bits)


