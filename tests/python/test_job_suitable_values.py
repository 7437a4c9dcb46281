"""The job's kept suitable-row columns (ScalerBase.suitable_values) and the outlier / error-model
paths that read them: the same values, groupings and results as the per-dataset gathers they
replace, the kept arrays renewed when a column is replaced, and the fused E² kernels bit for
bit the numpy formulation for any thread count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xtalscale import flex_arrays as fa
from xtalscale._core import job as kernels
from xtalscale.job import error_model as em_module
from xtalscale.job.algorithm import ScalingAlgorithm
from xtalscale.job.error_model import BasicErrorModel, _check_rows, _grouped_rows, refine_error_models
from xtalscale.job.inputs import load_inputs
from xtalscale.job.outlier_rejection import _esq_rows_above, _quasi_normalised, _resolution_bins
from xtalscale.job.phil import parse_phil_arguments

DATA = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_integrated"
SWEEPS = [str(DATA / "20_integrated.pickle"), str(DATA / "20_integrated_experiments.json"),
          str(DATA / "25_integrated.pickle"), str(DATA / "25_integrated_experiments.json")]


def _scaler(*args: str):
    inputs = load_inputs(SWEEPS)
    params, _ = parse_phil_arguments(list(args))
    return ScalingAlgorithm(params, inputs.experiments, inputs.tables).scaler


def _concatenated(scaler, name):
    return np.concatenate([ds.column(name) for ds in scaler.datasets])


# ---------------------------------------------------------------- E² kernels
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_fused_esq_passes_are_the_numpy_formulation_bit_for_bit(n_threads):
    rng = np.random.default_rng(3)
    n, n_groups = 200_003, 5000
    group = rng.integers(0, n_groups, n)
    group[:n_groups] = np.arange(n_groups)  # every group has a row
    d = rng.uniform(1.2, 30.0, n_groups)
    eps = rng.choice([1.0, 2.0, 4.0], n_groups)
    I = rng.normal(50.0, 80.0, n) * rng.uniform(0.5, 3.0, n)
    g = rng.uniform(0.2, 4.0, n)
    bins = _resolution_bins(group, d, eps)
    sums_old = kernels.esq_bin_sums(I / g, bins.epsilon, bins.which, bins.counts.size)
    sums_new = kernels.esq_scaled_bin_sums(I, g, bins.epsilon, bins.which, bins.counts.size)
    assert sums_new.tobytes() == sums_old.tobytes()
    esq = _quasi_normalised(I / g, bins)
    for threshold in (0.0, 1.5, 4.0, 1e9):
        rows = _esq_rows_above(I, g, bins, threshold, n_threads=n_threads)
        np.testing.assert_array_equal(rows, np.flatnonzero(esq > threshold))
        assert rows.dtype == np.int64
    # a group whose norm is not positive gives E² = 0 there (as esq_values)
    norm = np.ones(n_groups)
    norm[:10] = 0.0
    rows = kernels.esq_rows_above(I, g, bins.epsilon, bins.group, norm, -1.0, n_threads=n_threads)
    np.testing.assert_array_equal(rows, np.flatnonzero(kernels.esq_values(I / g, bins.epsilon, bins.group, norm) > -1.0))


def test_fused_esq_kernels_reject_bad_input():
    I, g, eps = np.ones(5), np.ones(5), np.ones(5)
    with pytest.raises(ValueError):
        kernels.esq_scaled_bin_sums(I, np.ones(4), eps, np.zeros(5, np.int64), 2)
    with pytest.raises(IndexError, match="bin"):
        kernels.esq_scaled_bin_sums(I, g, eps, np.array([0, 1, 2, 0, 0]), 2)  # a bin out of range
    with pytest.raises(IndexError, match="group"):
        kernels.esq_rows_above(I, g, eps, np.array([0, 0, 3, 0, 0]), np.ones(2), 1.0)  # a group out of range
    with pytest.raises(ValueError):
        kernels.esq_rows_above(I, g, eps[:3], np.zeros(5, np.int64), np.ones(2), 1.0)
    with pytest.raises(ValueError):
        kernels.esq_rows_above(I, g, eps, np.zeros(5, np.int64), np.ones(2), 1.0, n_threads=0)


# ---------------------------------------------------------------- kept columns
def test_suitable_values_are_the_gathered_columns_and_renewed_when_a_column_is_replaced():
    scaler = _scaler()
    for name in ("intensity", "variance", "inverse_scale_factor", "d"):
        values = scaler.suitable_values(name)
        np.testing.assert_array_equal(values, _concatenated(scaler, name))
        assert scaler.suitable_values(name) is values  # kept
        assert not values.flags.writeable
    with pytest.raises(KeyError, match="no column 'no_such_column'"):
        scaler.suitable_values("no_such_column")
    np.testing.assert_array_equal(scaler.suitable_values("no_such_column", 1.0),
                                  np.ones(sum(ds.suitable_idx.size for ds in scaler.datasets)))
    # the intensity combination replaces the intensity column: the kept values follow
    before = scaler.suitable_values("intensity")
    ds = scaler.datasets[1]
    ds.table["intensity"] = fa.double(np.asarray(ds.table["intensity"], dtype=np.float64) * 2.0)
    after = scaler.suitable_values("intensity")
    assert after is not before
    np.testing.assert_array_equal(after, _concatenated(scaler, "intensity"))
    # a dataset's suitable rows replaced: gathered again too
    ds.suitable = ds.suitable.copy()
    assert scaler.suitable_values("intensity") is not after


def test_grouped_suitable_variances_follow_the_error_models():
    """Every suitable row's σ² through the datasets' error models (one shared, or one each),
    element for element the per-dataset _variances; a new model gives new variances."""
    scaler = _scaler()
    assert scaler.global_Ih_table.size > 0  # the cached grouping
    old = np.concatenate([scaler._variances(ds) for ds in scaler.datasets])
    np.testing.assert_array_equal(scaler._grouped_suitable().variance, old)
    shared = BasicErrorModel(1.3, 0.04)
    for ds in scaler.datasets:
        ds.error_model = shared
    grouped = scaler._grouped_suitable()
    expected = np.concatenate([scaler._variances(ds) for ds in scaler.datasets])
    assert grouped.variance.tobytes() == expected.tobytes()
    assert (1.0 / expected).tobytes() == grouped.weight.tobytes()
    assert not np.array_equal(expected, old)
    scaler.datasets[0].error_model = BasicErrorModel(0.9, 0.01)  # one each
    grouped = scaler._grouped_suitable()
    expected = np.concatenate([scaler._variances(ds) for ds in scaler.datasets])
    assert grouped.variance.tobytes() == expected.tobytes()
    # the kept-rows path (subset rounds) too
    keep = [np.random.default_rng(2).random(ds.suitable_idx.size) < 0.4 for ds in scaler.datasets]
    sub = scaler._grouped_suitable(keep=keep)
    expected = np.concatenate([scaler._variances(ds, np.flatnonzero(k)) for ds, k in zip(scaler.datasets, keep)])
    assert sub.variance.tobytes() == expected.tobytes()


# ---------------------------------------------------------------- error model
def test_error_model_by_mask_or_by_gathered_rows_gives_the_same_parameters(monkeypatch):
    """refine_error_models on every row with a mask (EVERY_ROW_FRACTION 0) or on gathered rows
    (EVERY_ROW_FRACTION above 1): the same (a, b) bit for bit, with and without a row cap."""
    results = {}
    for fraction in (0.0, 2.0):
        for cap in ("0", "3000"):
            scaler = _scaler(f"weighting.error_model.basic.max_observations={cap}")
            scaler.make_ready_for_scaling()
            scaler.perform_scaling()
            scaler.expand_scales_to_all_reflections()
            scaler.round_of_outlier_rejection()
            monkeypatch.setattr(em_module, "EVERY_ROW_FRACTION", fraction)
            refine_error_models(scaler)
            results[fraction, cap] = [(ds.error_model.a, ds.error_model.b) for ds in scaler.datasets]
    for cap in ("0", "3000"):
        assert results[0.0, cap] == results[2.0, cap]
        assert results[0.0, cap][0] != (1.0, 0.0)
    assert results[0.0, "0"] != results[0.0, "3000"]  # the cap took effect


def test_gathered_error_model_rows_are_the_per_dataset_gathers():
    """_grouped_rows from the kept arrays equals the per-dataset gathers it replaced."""
    scaler = _scaler()
    grouping = scaler.suitable_asu_grouping(anomalous=True)
    rows = np.random.default_rng(4).random(grouping.order.size) < 0.5
    fast = _grouped_rows(scaler, grouping, rows)

    class Plain:  # the scaler without suitable_values: the per-dataset gathers
        datasets, space_group = scaler.datasets, scaler.space_group

    slow = _grouped_rows(Plain(), grouping, rows)
    for name in ("intensity", "variance", "weight", "scale", "asu_hkl", "dataset", "row", "order", "offsets"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
    np.testing.assert_array_equal(fast.extra["partiality"], slow.extra["partiality"])


def test_row_checks_on_a_mask_name_the_selected_row():
    scaler = _scaler()
    grouping = scaler.suitable_asu_grouping(anomalous=True)
    every = em_module._every_suitable_row(scaler, grouping)
    rows = np.zeros(every.size, bool)
    rows[[3, 10, 20]] = True
    _check_rows(every, rows)  # all good
    variance = every.variance.copy()
    variance[[5, 20]] = 0.0  # row 5 is not selected; row 20 is the third selected one
    every.variance = variance
    with pytest.raises(ValueError, match=r"variance' must be positive for the selected rows \(row 2 has 0.0\)"):
        _check_rows(every, rows)
    rows[20] = False
    _check_rows(every, rows)  # the unselected bad rows are not read


def test_group_of_rows_kernel_is_the_numpy_scatter():
    from xtalscale.job.grouped import group_of_rows

    rng = np.random.default_rng(6)
    n = 100_001
    order = rng.permutation(n).astype(np.int64)
    offsets = np.unique(np.concatenate([[0, n], rng.integers(0, n, 30_000)])).astype(np.int64)
    offsets = np.insert(offsets, 5, offsets[5])  # an empty group
    expected = np.empty(n, dtype=np.int64)
    expected[order] = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    np.testing.assert_array_equal(group_of_rows(order, offsets), expected)
    assert group_of_rows(np.zeros(0, np.int64), np.zeros(1, np.int64)).size == 0
    with pytest.raises(ValueError, match="last offset"):
        kernels.group_of_rows(order, offsets[:-1])
    with pytest.raises((ValueError, IndexError)):
        kernels.group_of_rows(np.array([0, 5, 1]), np.array([0, 3]))  # a row out of range


@pytest.mark.parametrize("anomalous", [False, True])
def test_suitable_asu_grouping_from_the_cached_grouping_is_the_gathered_one(anomalous):
    """The scaler's ASU grouping taken from the cache entry of its grouping of every suitable
    row (no indices gathered) is the grouping of the gathered indices."""
    from xtalscale._rows import take_rows
    from xtalscale.job import grouped as grouped_module

    scaler = _scaler()
    assert scaler.global_Ih_table.size > 0  # the cached grouping of every suitable row
    shortcut = scaler.suitable_asu_grouping(anomalous)
    hkl = np.concatenate([take_rows(np.asarray(ds.table["miller_index"]).reshape(-1, 3), ds.suitable)
                          for ds in scaler.datasets])
    grouped_module._ASU_CACHE.clear()  # afresh: map, sort (and split)
    fresh = grouped_module.asu_grouping(hkl, scaler.space_group, anomalous)
    for a, b in zip(shortcut, fresh):
        np.testing.assert_array_equal(a, b)
    assert grouped_module.cached_asu_grouping_of(np.arange(3), anomalous) is None


def test_kept_columns_last_from_an_all_row_round_to_the_error_model_only():
    """Of what suitable_values keeps only I, σ² and 1/σ² are held into a minimisation: the
    error-model refinement drops the rest, and so does a round when no error model follows."""
    scaler = _scaler()
    scaler.make_ready_for_scaling()
    scaler.perform_scaling()
    scaler.expand_scales_to_all_reflections()
    assert scaler.global_Ih_table.size > 0  # the cached grouping (then the rounds keep the columns)
    scaler.round_of_outlier_rejection()
    assert "intensity" in scaler._suitable_values_held  # for the error model next
    scaler.perform_error_optimisation()
    assert set(scaler._suitable_values_held) <= set(scaler.KEPT_FOR_THE_JOB)
    assert scaler._suitable_layout_held is None
    no_model = _scaler("error_model=None")
    no_model.make_ready_for_scaling()
    no_model.perform_scaling()
    no_model.expand_scales_to_all_reflections()
    assert no_model.global_Ih_table.size > 0
    no_model.round_of_outlier_rejection()
    assert set(no_model._suitable_values_held) <= set(no_model.KEPT_FOR_THE_JOB)
