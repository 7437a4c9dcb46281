"""The kernels of the scaling job's statistics stage against the formulations they replace.

Each is checked value for value (exact equality, NaN = NaN) against the array operations or
kernel calls it stands for, and bad input must raise a clear exception.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from xtalscale._core import stats as kernels
from xtalscale.io.mtz import read_unmerged_mtz
from xtalscale.io.scaled_intensities import (
    ScaledIntensityError,
    _observation_rows_by_arrays,
    _scaled_observation_rows,
    _scaled_rows,
)
from xtalscale.stats import MergingStatistics
from xtalscale.stats import merging as ms
from xtalscale.stats.resolution import _e_squared_by_arrays, quasi_normalised_e_squared

DATA = Path(__file__).resolve().parents[1] / "data"
CYS = DATA / "dials_l_cysteine_4_sweeps_scaled"
INSULIN = DATA / "mtz_insulin_dials_aimless" / "insulin_dials_scaled_unmerged.mtz.gz"


def same(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def same_dict(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same(a[key], b[key])


# --------------------------------------------------------------------------- scaled rows


def _cysteine_tables():
    """The cysteine table as read, and edited: (0, 0, 0) rows, a row of no experiment, low and
    zero partialities (every partial id its own: nothing combines), bad flags, g <= 0."""
    from xtalscale.reflection_table import reflection_table

    table = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    edited = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    hkl = np.asarray(edited["miller_index"]).copy()
    hkl[[5, 77]] = 0
    edited["miller_index"] = hkl
    edited["partial_id"] = np.arange(len(edited), dtype=np.uint64)
    part = np.asarray(edited["partiality"]).copy()
    part[10:40] = 0.3
    part[50] = 0.0
    edited["partiality"] = part
    ids = np.asarray(edited["id"]).copy()
    ids[3] = -1
    edited["id"] = ids
    flags = np.asarray(edited["flags"]).copy()
    flags[60:70] |= np.uint64(1 << 23)
    edited["flags"] = flags
    g = np.asarray(edited["inverse_scale_factor"]).copy()
    g[80] = 0.0
    g[81] = np.nan
    edited["inverse_scale_factor"] = g
    var = np.asarray(edited["intensity.scale.variance"]).copy()
    var[90] = -1.0
    edited["intensity.scale.variance"] = var
    return table, edited


def _same_rows(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None
        elif isinstance(x, np.ndarray):
            same(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.99])
def test_scaled_observation_rows_by_the_kernels_are_those_of_the_arrays(monkeypatch, threshold):
    from xtalscale.io import scaled_intensities

    tables = _cysteine_tables()
    expected = [_observation_rows_by_arrays(t, threshold, with_z) for t in tables
                for with_z in (False, True)]

    def refuse(*args):  # (the kernels' path is taken: nothing combines here)
        raise AssertionError("array path taken")

    monkeypatch.setattr(scaled_intensities, "_observation_rows_by_arrays", refuse)
    got = [_scaled_observation_rows(t, threshold, with_z) for t in tables
           for with_z in (False, True)]
    for a, b in zip(got, expected):
        _same_rows(a, b)
    assert got[2].n_zero >= 1 and got[2].n_bad > 0


def test_scaled_observation_rows_without_optional_columns_and_with_combining_partials():
    table, edited = _cysteine_tables()
    for name in ("id", "flags", "partiality", "partial_id"):
        t = copy.deepcopy(edited)
        del t[name]
        _same_rows(_scaled_observation_rows(t, 0.4), _observation_rows_by_arrays(t, 0.4, False))
    # partials that combine: the array path, as _scaled_rows combines them
    pid = np.asarray(edited["partial_id"]).copy()
    pid[10:40] = pid[10]
    edited["partial_id"] = pid
    rows = _scaled_observation_rows(edited, 0.0)
    reference = _scaled_rows(edited, 0.0, with_partiality=False)
    assert len(rows.rows) < len(reference[0]) + 1
    _same_rows(rows, _observation_rows_by_arrays(edited, 0.0, False))


def test_scaled_observation_rows_raise_as_the_selection_does():
    table, _ = _cysteine_tables()
    cases = {
        "id": "selecting scaled",
        "inverse_scale_factor": "inverse scale factors <= 0",
        "intensity.scale.variance": "variances <= 0",
        "partiality": "partiality <= 0",
    }
    for column, message in cases.items():
        t = copy.deepcopy(table)
        t[column] = np.full(len(t), -1, dtype=np.asarray(t[column]).dtype)
        for select in (_scaled_observation_rows, lambda t_, thr: _scaled_rows(t_, thr)):
            with pytest.raises(ScaledIntensityError, match=message):
                select(t, 0.4)
    with pytest.raises(ScaledIntensityError, match="partiality < 2.0"):
        _scaled_observation_rows(table, 2.0)
    with pytest.raises(ScaledIntensityError, match="must be finite"):
        _scaled_observation_rows(table, float("nan"))
    t = copy.deepcopy(table)
    del t["inverse_scale_factor"]
    with pytest.raises(ScaledIntensityError, match="inverse_scale_factor"):
        _scaled_observation_rows(t, 0.4)


def test_scaled_row_kernels_reject_bad_input():
    n = 5
    g = np.ones(n)
    hkl = np.ones((n, 3), dtype=np.int32)
    with pytest.raises(ValueError, match="variance"):
        kernels.classify_scaled_rows(None, None, 0, g, np.ones(n + 1), None, 0.0, hkl)
    with pytest.raises(ValueError, match="hkl"):
        kernels.classify_scaled_rows(None, None, 0, g, g, None, 0.0, hkl[:3])
    with pytest.raises(ValueError, match="threshold"):
        kernels.classify_scaled_rows(None, None, 0, g, g, None, float("inf"), hkl)
    code, counts = kernels.classify_scaled_rows(None, None, 0, g, g, None, 0.0, hkl)
    assert counts["survivors"] == [n] * 5 and not code.any()
    with pytest.raises(ValueError, match="n_out"):
        kernels.gather_scaled_rows(code, n - 1, g, g, g, True, hkl, None, None)
    with pytest.raises(ValueError, match="xyz"):
        kernels.gather_scaled_rows(code, n, g, g, g, True, hkl, None, np.zeros((n, 2)))


# --------------------------------------------------------------------------- E²


def test_e_squared_kernel_is_the_array_arithmetic():
    rng = np.random.default_rng(3)
    n = 30000
    dss = rng.uniform(0.01, 0.4, n)
    intensity = rng.normal(100, 200, n)
    intensity[::1001] = np.nan
    for eps in (rng.integers(1, 5, n).astype(np.int8), rng.integers(1, 5, n).astype(np.float64),
                rng.integers(1, 5, n)):
        e2 = quasi_normalised_e_squared(None, intensity, "P 1", (10, 10, 10, 90, 90, 90),
                                        d_star_sq=dss, epsilon=eps)
        lo, hi = dss.min(), dss.max()
        span = hi - lo
        lo, hi = lo - span * 1e-6, hi + span * 1e-6
        reference = _e_squared_by_arrays(dss, intensity, eps, lo, (hi - lo) / 20, 20)
        same(e2, reference)
        same(quasi_normalised_e_squared(None, intensity, "P 1", (10, 10, 10, 90, 90, 90),
                                        d_star_sq=dss, epsilon=eps,
                                        d_star_sq_range=(dss.min(), dss.max())), reference)
    # one resolution (step 1) and a shell of negative intensities alone (mean 0: E² = 0)
    flat = np.full(100, 0.2)
    negative = -np.ones(100)
    same(kernels.quasi_normalised_e_squared(flat, negative, np.ones(100, np.int8), 0.2, 1.0, 10),
         _e_squared_by_arrays(flat, negative, np.ones(100, np.int8), 0.2, 1.0, 10))


def test_e_squared_kernel_rejects_bad_input():
    x = np.ones(4)
    with pytest.raises(ValueError, match="epsilon"):
        kernels.quasi_normalised_e_squared(x, x, np.ones(3), 0.0, 1.0, 5)
    with pytest.raises(ValueError, match="step"):
        kernels.quasi_normalised_e_squared(x, x, x, 0.0, 0.0, 5)
    with pytest.raises(ValueError, match="n_shells"):
        kernels.quasi_normalised_e_squared(x, x, x, 0.0, 1.0, 0)


# --------------------------------------------------------------------------- sorted values


def test_sorted_values_at_are_those_of_a_sort():
    rng = np.random.default_rng(5)
    samples = [rng.uniform(0.01, 0.3, 200000), np.round(rng.uniform(0, 1, 50000), 2),
               np.repeat([3.0, 1.0, 2.0], 3000), np.full(5000, 0.25), rng.standard_normal(7),
               np.array([1.0]), np.r_[np.zeros(10000), 1e300]]
    for values in samples:
        n = len(values)
        positions = np.unique(np.r_[0, n - 1, np.arange(1, n, max(1, n // 37))]).astype(np.int64)
        same(kernels.sorted_values_at(values, positions), np.sort(values)[positions])
    assert kernels.sorted_values_at(np.array([1.0, np.nan, 2.0]), np.array([0])) is None
    assert kernels.sorted_values_at(np.array([1.0, np.inf]), np.array([0])) is None
    with pytest.raises(IndexError):
        kernels.sorted_values_at(np.ones(3), np.array([3]))


def test_counting_shells_are_those_of_the_sorted_values():
    def by_sort(dss, n_bins, per):
        s = np.sort(dss)
        n = len(s)
        per_bin = max(1, int(np.ceil(n / max(1, n_bins))))
        if per:
            per_bin = max(per_bin, int(per))
        cuts = s[per_bin:n:per_bin]
        cuts = cuts[cuts > s[0]]
        span = s[-1] - s[0]
        lo = max(s[0] - span * 1e-6, 0.0)
        hi = s[-1] + span * 1e-6
        if hi <= lo:
            hi = lo * (1 + 1e-6) + 1e-12
        return np.unique(np.concatenate([[lo], cuts[cuts < hi], [hi]]))

    rng = np.random.default_rng(9)
    for dss in (rng.uniform(0.01, 0.4, 100000), np.round(rng.uniform(0.01, 0.4, 20000), 3),
                rng.uniform(0.01, 0.4, 500), np.r_[rng.uniform(0.01, 0.4, 9000), np.nan]):
        for n_bins, per in ((50, 10), (20, None), (7, 5000)):
            same(ms._counting_limits(dss, n_bins, per), by_sort(dss, n_bins, per))


# --------------------------------------------------------------------------- merging passes


@pytest.fixture(scope="module")
def insulin_prepared():
    t = read_unmerged_mtz(INSULIN).table
    g = np.asarray(t["inverse_scale_factor"])
    intensity = np.asarray(t["intensity.scale.value"]) / g
    sigma = np.sqrt(np.asarray(t["intensity.scale.variance"])) / g
    return ms._prepare(np.asarray(t["miller_index"]), intensity, sigma, "I 2 3",
                       (78.0, 78.0, 78.0, 90.0, 90.0, 90.0))


@pytest.mark.parametrize("use_internal_variance", [False, True])
@pytest.mark.parametrize("seed", [0, 7])
def test_both_passes_in_one_are_the_two_passes(insulin_prepared, use_internal_variance, seed):
    p = insulin_prepared
    inputs = ms._kernel_inputs(p, ms._shell_limits_in(p.d_star_sq_range, 10))
    plain, anomalous = kernels.merging_statistics_both(
        *inputs[:-2], use_internal_variance=use_internal_variance, seed=seed)
    for result, mode in ((plain, False), (anomalous, True)):
        expected = kernels.merging_statistics(*inputs[:-2], anomalous=mode, seed=seed,
                                              use_internal_variance=use_internal_variance)
        same_dict(result[0], expected[0])
        same_dict(result[1], expected[1])
    one, two = MergingStatistics._with_anomalous_pass(
        p, 10, use_internal_variance=use_internal_variance, seed=seed)
    alone = MergingStatistics(p, 10, use_internal_variance=use_internal_variance, seed=seed)
    for a, b in ((one, alone), (two, alone.anomalous_pass())):
        assert a.as_dict() == b.as_dict()
        assert [s.redundancies for s in a.bins] == [s.redundancies for s in b.bins]
        for f in dataclasses.fields(a.merged):
            same(getattr(a.merged, f.name), getattr(b.merged, f.name))


def test_both_passes_reject_bad_input(insulin_prepared):
    p = insulin_prepared
    inputs = list(ms._kernel_inputs(p, ms._shell_limits_in(p.d_star_sq_range, 10))[:-2])
    bad = list(inputs)
    bad[5] = bad[5][:-1]  # (a shell too few)
    with pytest.raises(ValueError, match="group_shell"):
        kernels.merging_statistics_both(*bad)
    bad = list(inputs)
    bad[1] = bad[1].copy()
    bad[1][3] = 0.0
    with pytest.raises(ValueError, match="sigma"):
        kernels.merging_statistics_both(*bad)
    with pytest.raises(ms.MergingStatisticsError, match="seed"):
        MergingStatistics._with_anomalous_pass(p, 10, seed=-1)


# --------------------------------------------------------------------------- per batch


def test_deviations_on_the_groups_means_are_those_of_the_kernel(insulin_prepared):
    p = insulin_prepared
    stats = MergingStatistics(p, 10)
    groups = stats.observation_groups()
    n = groups.n_input
    rng = np.random.default_rng(2)
    batch = rng.integers(1, 300, n)
    dataset = rng.integers(0, 2, n)
    pairs = ms._row_pairs(batch, dataset, n)
    plain = ms._pair_statistics_and_deviations(groups, *pairs)
    shared = ms._pair_statistics_and_deviations(groups, *pairs, group_means=stats.group_means())
    for f in dataclasses.fields(plain[0]):
        same(getattr(plain[0], f.name), getattr(shared[0], f.name))
    same(plain[1], shared[1])
    assert MergingStatistics(p, 10, anomalous=True).group_means() is None


def test_deviations_on_the_groups_means_reject_bad_input():
    I = np.array([1.0, 2.0, 3.0])
    s = np.ones(3)
    offsets = np.array([0, 2, 3])
    mean = np.array([1.5, 3.0])
    rows = np.array([2, 0, 1])
    index = np.zeros(3, dtype=np.int64)
    out = kernels.grouped_deviations_and_batch_sums(I, s, offsets, mean, rows, 4, index, 1)
    same(out[0], np.array([np.sqrt(0.5) * 0.5, np.nan, -np.sqrt(0.5) * 0.5, np.nan]))
    with pytest.raises(ValueError, match="sigma"):
        kernels.grouped_deviations_and_batch_sums(I, np.array([1.0, 0.0, 1.0]), offsets, mean,
                                                  rows, 3, index, 1)
    with pytest.raises(ValueError, match="intensity"):
        kernels.grouped_deviations_and_batch_sums(np.array([1.0, np.nan, 3.0]), s, offsets,
                                                  mean, rows, 3, index, 1)
    with pytest.raises(IndexError, match="position"):
        kernels.grouped_deviations_and_batch_sums(I, s, offsets, mean, rows, 2, index, 1)
    with pytest.raises(ValueError, match="mean"):
        kernels.grouped_deviations_and_batch_sums(I, s, offsets, mean[:1], rows, 3, index, 1)
    with pytest.raises(ValueError, match="batch_index"):
        kernels.grouped_deviations_and_batch_sums(I, s, offsets, mean, rows, 3, index + 1, 1)
    with pytest.raises(ValueError, match="offsets"):
        kernels.grouped_deviations_and_batch_sums(I, s, np.array([0, 2, 4]), mean, rows, 3,
                                                  index, 1)
