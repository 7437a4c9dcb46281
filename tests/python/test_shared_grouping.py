"""One grouping of the scaled observations, shared by the end-of-job statistics and the merge.

Every shortcut is checked against the computation it replaces, value for value (exact
equality, NaN = NaN): sharing a grouping, selecting rows from a grouping, taking (dataset,
batch) pairs from a dense table and copying only the columns read change no number.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from xtalscale.io.mtz import merge_intensities, read_unmerged_mtz
from xtalscale.stats import (
    MergingStatistics,
    MergingStatisticsError,
    batch_statistics,
    batch_statistics_and_deviations,
    estimate_resolution,
    group_observations,
    normalised_deviations,
)
from xtalscale.stats.merging import _dataset_batch_groups, _prepare
from xtalscale.stats.resolution import quasi_normalised_e_squared

DATA = Path(__file__).resolve().parents[1] / "data"
INSULIN = DATA / "mtz_insulin_dials_aimless" / "insulin_dials_scaled_unmerged.mtz.gz"
QUARTZ = DATA / "dials_quartz_3ded" / "scaled.refl"


@pytest.fixture(scope="module")
def insulin():
    """Scaled insulin observations, a few made unusable (σ <= 0, NaN) on purpose."""
    t = read_unmerged_mtz(INSULIN).table
    g = np.asarray(t["inverse_scale_factor"])
    intensity = np.asarray(t["intensity.scale.value"]) / g
    sigma = np.sqrt(np.asarray(t["intensity.scale.variance"])) / g
    sigma[::97] = 0.0
    intensity[5::131] = np.nan
    return (np.asarray(t["miller_index"]), intensity, sigma, np.asarray(t["batch"]),
            np.asarray(t["id"]), "I 2 3", (78.0, 78.0, 78.0, 90.0, 90.0, 90.0))


def same(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def same_statistics(a: MergingStatistics, b: MergingStatistics) -> None:
    assert a.as_dict() == b.as_dict() or _nan_equal(a.as_dict(), b.as_dict())
    for f in dataclasses.fields(a.merged):
        same(getattr(a.merged, f.name), getattr(b.merged, f.name))


def _nan_equal(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_nan_equal(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_nan_equal(p, q) for p, q in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and x != x and y != y:
        return True
    return x == y


def test_statistics_hand_their_grouping_to_the_per_observation_statistics(insulin):
    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    stats = MergingStatistics.from_arrays(hkl, intensity, sigma, sg, cell)
    shared = stats.observation_groups()
    fresh = group_observations(hkl, intensity, sigma, sg)
    for name in ("usable_rows", "rows", "intensity", "sigma", "offsets"):
        same(getattr(shared, name), getattr(fresh, name))
    same(shared.grouping.group_index, fresh.grouping.group_index)
    same(normalised_deviations(hkl, intensity, sigma, sg, groups=shared),
         normalised_deviations(hkl, intensity, sigma, sg))
    with_groups = batch_statistics(hkl, intensity, sigma, batch, sg, dataset, groups=shared)
    alone = batch_statistics(hkl, intensity, sigma, batch, sg, dataset)
    for f in dataclasses.fields(alone):
        same(getattr(with_groups, f.name), getattr(alone, f.name))


def test_batch_statistics_and_deviations_in_one_pass(insulin):
    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    per_batch, deviations = batch_statistics_and_deviations(hkl, intensity, sigma, batch, sg,
                                                            dataset)
    alone = batch_statistics(hkl, intensity, sigma, batch, sg, dataset)
    for f in dataclasses.fields(alone):
        same(getattr(per_batch, f.name), getattr(alone, f.name))
    same(deviations, normalised_deviations(hkl, intensity, sigma, sg))
    nothing = np.zeros(len(sigma))  # no usable row: empty batches, NaN deviations
    per_batch, deviations = batch_statistics_and_deviations(hkl, intensity, nothing, batch, sg)
    assert len(per_batch.batch) == 0 and np.isnan(deviations).all()
    assert np.isnan(normalised_deviations(hkl, intensity, nothing, sg)).all()


def test_groups_are_refused_for_other_arrays_or_anomalous(insulin):
    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    groups = group_observations(hkl, intensity, sigma, sg)
    with pytest.raises(MergingStatisticsError, match="groups made from"):
        normalised_deviations(hkl[:-1], intensity[:-1], sigma[:-1], sg, groups=groups)
    with pytest.raises(MergingStatisticsError, match="anomalous"):
        batch_statistics(hkl, intensity, sigma, batch, sg, dataset, anomalous=True,
                         groups=groups)


def test_no_shared_groups_when_rows_were_cut_by_resolution(insulin):
    hkl, intensity, sigma, _, _, sg, cell = insulin
    assert MergingStatistics.from_arrays(hkl, intensity, sigma, sg, cell,
                                         d_min=2.0).observation_groups() is None


def test_a_subset_gives_the_statistics_of_its_rows_alone(insulin):
    hkl, intensity, sigma, _, _, sg, cell = insulin
    prepared = _prepare(hkl, intensity, sigma, sg, cell)
    rng = np.random.default_rng(7)
    for fraction in (1.0, 0.999, 0.6, 0.05):  # (1.0: every row kept)
        keep = rng.random(len(prepared.intensity)) < fraction
        settings = {"n_bins": 30, "binning_method": "counting_sorted", "reflections_per_bin": 10,
                    "cc_one_half_significance_level": 0.1}
        for anomalous in (False, True):
            sub = MergingStatistics(prepared.subset(keep), anomalous=anomalous, **settings)
            ref = MergingStatistics.from_arrays(prepared.hkl[keep], prepared.intensity[keep],
                                                prepared.sigma[keep], sg, cell,
                                                anomalous=anomalous, **settings)
            same_statistics(sub, ref)
            assert sub.n_rejected == ref.n_rejected


def test_resolution_estimate_on_the_subset_matches_the_rows_alone(insulin):
    hkl, intensity, sigma, _, _, sg, cell = insulin
    stats = MergingStatistics.from_arrays(hkl, intensity, sigma, sg, cell)
    estimate = estimate_resolution(stats, emax=1.5)  # a low emax: many rows left out
    p = stats._prepared
    e2 = quasi_normalised_e_squared(p.hkl, p.intensity, sg, cell)
    keep = e2 < 1.5 ** 2
    assert 0 < estimate.n_wilson_outliers == int((~keep).sum())
    ref = MergingStatistics.from_arrays(
        p.hkl[keep], p.intensity[keep], p.sigma[keep], sg, cell, n_bins=50,
        binning_method="counting_sorted", reflections_per_bin=10,
        cc_one_half_significance_level=0.1)
    same_statistics(estimate.statistics, ref)


def test_e_squared_with_known_d_star_sq_and_epsilon(insulin):
    hkl, intensity, sigma, _, _, sg, cell = insulin
    p = _prepare(hkl, intensity, sigma, sg, cell)
    grouping = p.grouped[0]
    epsilon = p.space_group.epsilon(grouping.unique_hkl)[grouping.group_index]
    same(epsilon, p.space_group.epsilon(p.hkl))  # ε is the same for symmetry mates
    same(quasi_normalised_e_squared(None, p.intensity, sg, cell, p.d_star_sq, epsilon),
         quasi_normalised_e_squared(p.hkl, p.intensity, sg, cell))
    with pytest.raises(ValueError, match="one value per observation"):
        quasi_normalised_e_squared(None, p.intensity, sg, cell, p.d_star_sq[:-1], epsilon)


@pytest.mark.parametrize("sparse", [False, True])
def test_dataset_batch_pairs_match_a_sort(sparse):
    rng = np.random.default_rng(3)
    dataset = rng.integers(0, 4, 5000)
    batch = rng.integers(1, 400, 5000) + 1000 * dataset
    if sparse:  # far-apart numbers: the sorting path
        batch[::50] += 10 ** 12
    ds, b, index = _dataset_batch_groups(dataset, batch)
    pairs, inverse = np.unique(np.stack([dataset, batch], axis=1), axis=0, return_inverse=True)
    same(ds, pairs[:, 0].copy())
    same(b, pairs[:, 1].copy())
    same(index, np.asarray(inverse).ravel().astype(np.int64))


def test_report_batch_groups_match_the_loop_over_datasets():
    from xtalscale.report.inputs import _batch_groups

    rng = np.random.default_rng(5)
    dataset = np.repeat([0, 2, 3], [3000, 50, 2000])
    batch = np.concatenate([rng.integers(1, 900, 3000), rng.integers(5, 30, 50),
                            rng.integers(1001, 1250, 2000)])
    order = rng.permutation(len(batch))
    dataset, batch = dataset[order], batch[order]
    expected = batch.astype(np.int64).copy()
    for d in np.unique(dataset):  # the rule: consecutive batches in groups of equal width
        mine = dataset == d
        first, last = expected[mine].min(), expected[mine].max()
        width = -(-(last - first + 1) // 100)
        if width > 1:
            expected[mine] = first + (expected[mine] - first) // width * width
    same(_batch_groups(batch, dataset, 100), expected)


def test_merge_on_the_shared_grouping(insulin):
    from xtalscale.merge import merge_observations
    from xtalscale.merge.observations import ScaledObservations
    from xtalscale.symmetry import SpaceGroup, UnitCell

    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    variance = np.where(sigma > 0, sigma ** 2, -1.0)
    obs = ScaledObservations(hkl.astype(np.int32), intensity, variance, batch, dataset,
                             SpaceGroup(sg), UnitCell(cell), 1.0)
    groups = group_observations(hkl, intensity, np.sqrt(np.maximum(variance, 0)), sg)
    shared = merge_observations(obs, anomalous=False, groups=groups)
    alone = merge_observations(obs, anomalous=False)
    same(shared.miller_index, alone.miller_index)
    assert shared.columns.keys() == alone.columns.keys()
    for name in alone.columns:
        same(shared.columns[name], alone.columns[name])
    other = group_observations(hkl[:1000], intensity[:1000], sigma[:1000], sg)
    with pytest.raises(ValueError, match="not made from these observations"):
        merge_observations(obs, anomalous=False, groups=other)
    with pytest.raises(ValueError, match="usable ones"):
        merge_intensities(hkl, intensity, variance, sg, grouping=other.grouping)


def test_select_copies_only_the_columns_asked_for():
    from xtalscale.reflection_table import reflection_table

    t = reflection_table.from_file(QUARTZ)
    rows = np.flatnonzero(np.arange(len(t)) % 3 == 0)
    part = t.select(rows, columns=["miller_index", "d"])
    assert part.keys() == ["d", "miller_index"] and len(part) == len(rows)
    whole = t.select(rows)
    for name in part.keys():
        same(np.asarray(part[name]), np.asarray(whole[name]))
    mask = np.zeros(len(t), dtype=bool)
    mask[rows] = True
    for name in t.keys():
        same(np.asarray(t.select(mask)[name]), np.asarray(whole[name]))
    assert t.select(rows, columns=()).ncols() == 0
    assert len(t.select(rows, columns=())) == len(rows)
    assert part.experiment_identifiers() == t.experiment_identifiers()
    with pytest.raises(KeyError, match="no columns"):
        t.select(rows, columns=["nope"])
    with pytest.raises(TypeError, match="row selection"):
        t.select(["d"], columns=["d"])


def test_scaled_intensities_with_a_few_columns():
    from xtalscale.io.scaled_intensities import ScaledIntensityError, scaled_intensities
    from xtalscale.reflection_table import reflection_table

    t = reflection_table.from_file(QUARTZ)
    full = scaled_intensities(t, 0.4)
    few = scaled_intensities(t, 0.4, columns=("miller_index",))
    assert few.keys() == ["intensity", "miller_index", "original_index", "partiality",
                          "variance"]
    for name in few.keys():
        same(np.asarray(few[name]), np.asarray(full[name]))
    with pytest.raises(ScaledIntensityError, match="no columns"):
        scaled_intensities(t, 0.4, columns=("nope",))


def test_refl_written_over_an_older_file(tmp_path):
    from xtalscale.reflection_table import reflection_table

    t = reflection_table.from_file(QUARTZ)
    out = tmp_path / "scaled.refl"
    out.write_bytes(b"an older file")
    t.as_file(out)
    assert out.read_bytes() == QUARTZ.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["scaled.refl"]  # no temporary left


def test_counting_order_is_a_stable_argsort():
    from xtalscale._core.grouping import counting_order

    rng = np.random.default_rng(8)
    keys = rng.integers(0, 500, 20000)
    keys[keys == 7] = 8  # an empty key
    order, offsets = counting_order(keys, 600)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=600))]))
    with pytest.raises(ValueError, match="outside"):
        counting_order(np.array([0, 600]), 600)
    with pytest.raises(ValueError, match="outside"):
        counting_order(np.array([-1]), 600)


@pytest.mark.parametrize("spread", [10, 600_000])
def test_grouping_kernels_equal_a_stable_lexicographic_sort(spread):
    """group_miller_indices and group_keys: order = numpy's stable lexicographic sort, groups
    in key order, for key ranges a counting sort takes (spread 10) and ranges only the radix
    sort takes (spread 6·10⁵: far more keys than rows)."""
    from xtalscale._core import grouping as kernels

    rng = np.random.default_rng(3)
    hkl = rng.integers(-spread, spread + 1, size=(20_000, 3)).astype(np.int32)
    hkl[::3] = hkl[1::3][: len(hkl[::3])]  # repeated indices: groups of several rows
    order, group_index, offsets = kernels.group_miller_indices(hkl)
    expected = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))  # stable
    np.testing.assert_array_equal(order, expected)
    sorted_hkl = hkl[expected]
    starts = np.flatnonzero(np.r_[True, np.any(sorted_hkl[1:] != sorted_hkl[:-1], axis=1)])
    np.testing.assert_array_equal(offsets, np.r_[starts, len(hkl)])
    np.testing.assert_array_equal(group_index[expected], np.repeat(np.arange(starts.size), np.diff(np.r_[starts, len(hkl)])))
    keys = hkl[:, 0].astype(np.int64) * 7 + hkl[:, 1]
    order, group_index, offsets = kernels.group_keys(keys)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    assert offsets.size - 1 == np.unique(keys).size


@pytest.mark.parametrize("space_group", ["P 1", "P 21 21 21", "P 4/m m m", "P 3 2 1", "C 2", "P 61 2 2"])
def test_bijvoet_split_of_a_grouping_equals_grouping_the_signed_indices(space_group):
    """The job groups its rows with Bijvoet mates apart by splitting its merged grouping
    (split_bijvoet_groups, no second sort): the same groups, group order and row order as
    group_reflections of the signed ASU indices, centric rows included."""
    from xtalscale._core import grouping as core_grouping
    from xtalscale.job.grouped import _ASU_CACHE, asu_grouping
    from xtalscale.symmetry import SpaceGroup, group_reflections, map_to_asu

    rng = np.random.default_rng(4)
    hkl = rng.integers(-9, 10, (30_000, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    mapping = map_to_asu(hkl, SpaceGroup(space_group), anomalous=False)
    signed = mapping.asu_hkl.copy()
    signed[mapping.friedel_minus] *= -1
    expected = group_reflections(signed)
    _ASU_CACHE.clear()
    merged = asu_grouping(hkl, space_group, anomalous=False)
    split = asu_grouping(hkl, space_group, anomalous=True)  # from the merged grouping
    np.testing.assert_array_equal(split.order, expected.order)
    np.testing.assert_array_equal(split.offsets, expected.offsets)
    np.testing.assert_array_equal(split.asu_hkl, signed)
    assert merged.offsets.size <= split.offsets.size  # (equal for a centrosymmetric group)
    keys = np.ascontiguousarray(mapping.asu_hkl[merged.order[merged.offsets[:-1]]])
    with pytest.raises(ValueError, match="shape"):
        core_grouping.split_bijvoet_groups(merged.order, merged.offsets, keys[:-1], mapping.friedel_minus)
    with pytest.raises(ValueError, match="not a row"):
        core_grouping.split_bijvoet_groups(merged.order, merged.offsets, keys, mapping.friedel_minus[:10])


@pytest.mark.parametrize("max_points", [100, 10_000])
def test_report_batch_pairs_numbered_once_equal_the_public_path(insulin, max_points):
    """The report's per-batch statistics and deviations from the (dataset, batch) pairs
    numbered once (grouped per pair, mapped per grouped row) equal
    batch_statistics_and_deviations of the grouped batches, rows left out included."""
    from xtalscale.report.inputs import _batch_groups, _grouped_batch_pairs
    from xtalscale.stats.merging import _pair_statistics_and_deviations, _pairs_of_grouped_rows

    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    dataset = np.asarray(dataset, dtype=np.int64) + (np.arange(len(batch)) % 3 == 0)
    batch = np.asarray(batch, dtype=np.int64) * 7  # (more batches than points)
    groups = group_observations(hkl, intensity, sigma, sg)
    expected_stats, expected_dev = batch_statistics_and_deviations(
        hkl, intensity, sigma, _batch_groups(batch, dataset, max_points), sg, dataset=dataset,
        groups=groups)
    ds, b, index, pair_map = _grouped_batch_pairs(batch, dataset, max_points)
    same(b[pair_map][index], _batch_groups(batch, dataset, max_points))
    got_stats, got_dev = _pair_statistics_and_deviations(groups, ds, b, index, pair_map)
    same(got_dev, expected_dev)
    for f in dataclasses.fields(expected_stats):
        same(getattr(got_stats, f.name), getattr(expected_stats, f.name))
    with pytest.raises(MergingStatisticsError, match="groups made from"):
        _pair_statistics_and_deviations(groups, ds, b, index[:-1], pair_map)
    # many pairs (the int64 path; the map padded with entries no row reaches)
    padded = np.concatenate([pair_map, np.zeros(40_000, dtype=np.int64)])
    for a, e in zip(_pairs_of_grouped_rows(groups, ds, b, index, padded),
                    _pairs_of_grouped_rows(groups, ds, b, index, pair_map)):
        same(a, e)


def test_redundancies_and_the_shared_complete_set_equal_their_definitions(insulin):
    """Each shell's {multiplicity: count} equals np.unique of its merged multiplicities (both
    the counting table and the sparse fallback); the resolution estimate's pass reuses the
    complete set computed for the same rows and d_min."""
    from xtalscale.stats.merging import _complete_set_dss, _redundancies

    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    stats = MergingStatistics.from_arrays(hkl, intensity, sigma, sg, cell, n_bins=10)
    merged = stats.merged
    for b, k in zip([*stats.bins, stats.overall], range(11)):
        sel = merged.shell == k if k < 10 else merged.shell >= 0
        values, counts = np.unique(merged.multiplicity[sel], return_counts=True)
        assert b.redundancies == {int(v): int(c) for v, c in zip(values, counts)}
    sparse = merged.multiplicity.astype(np.int64) * 10 ** 6  # (the np.unique path)
    for k, r in enumerate(_redundancies(sparse, merged.shell, 10)):
        sel = merged.shell == k if k < 10 else merged.shell >= 0
        values, counts = np.unique(sparse[sel], return_counts=True)
        assert r == {int(v): int(c) for v, c in zip(values, counts)}
    assert _redundancies(merged.multiplicity[:0], merged.shell[:0], 3) == [{}] * 4
    (key, value), = stats._prepared.complete_sets.items()
    fresh = _complete_set_dss(stats.space_group, stats.unit_cell, *key)
    same(value[0], fresh[0])
    same(value[1], fresh[1])
    estimate = estimate_resolution(stats)
    assert estimate.statistics._prepared.complete_sets is stats._prepared.complete_sets


def test_e_squared_equals_its_definition_with_and_without_empty_shells(insulin):
    """E² = I/(ε ⟨max(I, 0)/ε⟩_shell), 0 where that norm is not > 0 (a shell of negative
    intensities), whether or not some norm is 0."""
    hkl, intensity, sigma, _, _, sg, cell = insulin
    p = _prepare(hkl, intensity, sigma, sg, cell)
    dss = p.d_star_sq
    epsilon = p.space_group.epsilon(p.hkl).astype(float)
    for negative_shell in (False, True):
        I = p.intensity.copy()
        lo, hi = dss.min(), dss.max()
        span = hi - lo
        lo, hi = lo - span * 1e-6, hi + span * 1e-6
        shell = np.clip(((dss - lo) / ((hi - lo) / 20)).astype(np.int64), 0, 19)
        if negative_shell:
            I[shell == 3] = -np.abs(I[shell == 3]) - 1.0
        work = np.maximum(I, 0.0) / epsilon
        mean = np.ones(20)
        for k in range(20):
            if (shell == k).any():
                mean[k] = np.bincount(shell, weights=work, minlength=20)[k] / (shell == k).sum()
        norm = mean[shell] * epsilon
        expected = np.zeros(len(I))
        expected[norm > 0] = I[norm > 0] / norm[norm > 0]
        assert (norm > 0).all() != negative_shell
        same(quasi_normalised_e_squared(p.hkl, I, sg, cell), expected)
        for eps in (epsilon, epsilon.astype(np.int8), epsilon.astype(np.float32)):
            same(quasi_normalised_e_squared(None, I, sg, cell, dss, eps), expected)


def test_checked_miller_array_is_miller_array(insulin):
    """The statistics' index check returns what miller_array returns and raises as it does."""
    from xtalscale.stats.merging import _checked_miller_array
    from xtalscale.symmetry import miller_array

    hkl = np.ascontiguousarray(insulin[0], dtype=np.int32)
    assert _checked_miller_array(hkl) is hkl  # (checked, not copied)
    for a in (hkl.astype(np.int64), hkl.astype(float), np.asfortranarray(hkl), hkl.tolist(),
              np.array([1, 2, 3]), np.full((2, 3), -2**31, dtype=np.int32)):
        same(_checked_miller_array(a), miller_array(a, "miller_index"))
    for bad in (np.array([[2**20, 0, 0]], dtype=np.int32), np.array([[0, -2**20, 1]]),
                np.array([[0.5, 1, 2]]), np.zeros((2, 2), dtype=np.int32)):
        with pytest.raises(ValueError) as ours:
            _checked_miller_array(bad)
        with pytest.raises(ValueError) as theirs:
            miller_array(bad, "miller_index")
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("symbol", ["I 2 3", "P 1 2 1", "P 61 2 2", "P -1"])
@pytest.mark.parametrize("anomalous", [False, True])
def test_complete_set_equals_its_definition(symbol, anomalous):
    """The complete set's d*² (sorted; acentric ones) with the centric test of the ASU mapping
    equal those with gemmi's centric flags."""
    import gemmi

    from xtalscale.stats.merging import _complete_set_dss
    from xtalscale.symmetry import SpaceGroup, UnitCell, centric_flags

    sg = SpaceGroup(symbol)
    cell = UnitCell({"I 2 3": (78, 78, 78, 90, 90, 90), "P 1 2 1": (30, 40, 50, 90, 100, 90),
                     "P 61 2 2": (40, 40, 90, 90, 90, 120), "P -1": (20, 25, 30, 80, 95, 100)}[symbol])
    hkl = np.asarray(gemmi.make_miller_array(cell.gemmi, sg.gemmi, 2.0 * (1 - 1e-3), 0, True),
                     dtype=np.int32).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    dss = cell.d_star_sq(hkl)
    acentric = ~centric_flags(hkl, sg)
    complete, complete_acentric = _complete_set_dss(sg, cell, 2.0, anomalous)
    same(complete, np.sort(np.concatenate([dss, dss[acentric]]) if anomalous else dss))
    same(complete_acentric, np.sort(dss[acentric]))


def test_volume_shells_from_the_cached_range_equal_shell_limits(insulin):
    from xtalscale.stats import shell_limits

    hkl, intensity, sigma, _, _, sg, cell = insulin
    for kwargs in ({}, {"d_min": 2.0}):  # (rows' own range; then the binner's rows)
        stats = MergingStatistics.from_arrays(hkl, intensity, sigma, sg, cell, n_bins=7, **kwargs)
        p = stats._prepared
        assert p.d_star_sq_range == (p.d_star_sq.min(), p.d_star_sq.max())
        same(stats.limits, shell_limits(p.binning_dss, 7))
        assert stats.overall.d_min == pytest.approx(1 / np.sqrt(p.d_star_sq.max()), rel=1e-15)
    one = np.array([[1, 2, 3]] * 4 + [[2, 1, 3]] * 4)  # (one resolution)
    stats = MergingStatistics.from_arrays(one, np.arange(8.0), np.ones(8), "P 1 2 1",
                                          (30, 40, 50, 90, 90, 90), n_bins=3)
    same(stats.limits, shell_limits(stats._prepared.d_star_sq, 3))
    with pytest.raises(MergingStatisticsError, match="n_bins"):
        MergingStatistics.from_arrays(one, np.arange(8.0), np.ones(8), "P 1 2 1",
                                      (30, 40, 50, 90, 90, 90), n_bins=0)


# --------------------------------------------------------------------------- the statistics on
# the scaler's grouping (the job's statistics stage)


def _subset_by_rank(order, offsets, keep):
    """subset_grouping's result by array operations: the kept rows of each group (empty
    groups dropped), each row numbered by the kept rows before it."""
    rank = np.cumsum(keep) - 1
    kept = keep[order]
    counts = np.add.reduceat(kept.astype(np.int64), offsets[:-1]) if len(order) else np.zeros(0, np.int64)
    counts = counts[counts > 0]
    return rank[order[kept]], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 128, 5_000])
def test_subset_grouping_numbers_the_kept_rows_by_their_rank(n):
    """The kept rows' numbers (made from a dropped-row bitset) are their ranks among the kept
    rows, groups and row order kept, empty groups dropped: every keep pattern, word edges
    included."""
    from xtalscale._core import job as kern
    from xtalscale.symmetry import group_reflections

    rng = np.random.default_rng(n)
    grouping = group_reflections(rng.integers(-3, 4, (n, 3)).astype(np.int32))
    for keep in (np.ones(n, bool), np.zeros(n, bool), rng.random(n) < 0.997, rng.random(n) < 0.5,
                 np.arange(n) % 64 != 63, np.arange(n) % 64 == 0):
        order, offsets = kern.subset_grouping(grouping.order, grouping.offsets, keep)
        expected_order, expected_offsets = _subset_by_rank(grouping.order, grouping.offsets, keep)
        same(order, expected_order.astype(np.int64))
        same(offsets, expected_offsets)
    with pytest.raises(IndexError, match="order"):  # (a row of the grouping beyond keep)
        kern.subset_grouping(grouping.order, grouping.offsets, np.ones(n - 1, bool))


@pytest.mark.parametrize("space_group", ["P 2 2 2", "P 21 21 21", "P 4/m m m", "P 3 2 1", "C 2"])
def test_cached_grouping_of_rows_equals_grouping_those_rows(space_group):
    """The grouping of some rows taken from the cached grouping of all (the job's statistics
    on the scaler's grouping) is group_reflections of their ASU indices, with map_to_asu's
    Bijvoet-minus flags; None when the indices were not grouped before."""
    from xtalscale.job.grouped import _ASU_CACHE, asu_grouping, cached_grouping_of_rows
    from xtalscale.symmetry import SpaceGroup, group_reflections, map_to_asu

    rng = np.random.default_rng(5)
    hkl = rng.integers(-9, 10, (20_000, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    _ASU_CACHE.clear()
    assert cached_grouping_of_rows(hkl, space_group, np.arange(len(hkl))) is None
    asu_grouping(hkl, space_group, anomalous=True)  # (only the Bijvoet-split grouping made)
    for rows in (np.arange(len(hkl)), np.flatnonzero(rng.random(len(hkl)) < 0.99),
                 np.flatnonzero(rng.random(len(hkl)) < 0.2)):
        grouping, minus = cached_grouping_of_rows(hkl, space_group, rows)
        mapping = map_to_asu(hkl[rows], SpaceGroup(space_group))
        expected = group_reflections(mapping.asu_hkl)
        for name in expected._fields:
            same(getattr(grouping, name), getattr(expected, name))
        same(np.asarray(minus), mapping.friedel_minus)
    assert cached_grouping_of_rows(hkl[:-1], space_group, np.arange(len(hkl) - 1)) is None


def test_statistics_on_a_given_grouping_are_those_on_their_own(insulin):
    """Merging statistics (both passes), the resolution estimate and the per-batch
    statistics of statistics_for_report on a grouping given (map_to_asu's Bijvoet-minus
    flags, False for centric rows, instead of the ISYM parity) equal those it makes itself;
    a grouping of other rows is refused and one of rows that are partly unusable is not
    used."""
    from xtalscale.merge import ScaledObservations
    from xtalscale.report import statistics_for_report
    from xtalscale.stats.merging import MergingStatisticsError
    from xtalscale.symmetry import SpaceGroup, UnitCell, group_reflections, map_to_asu

    hkl, intensity, sigma, batch, dataset, sg, cell = insulin
    usable = np.isfinite(intensity) & (sigma > 0)
    hkl, intensity, sigma = np.asarray(hkl, dtype=np.int32)[usable], intensity[usable], sigma[usable]
    mapping = map_to_asu(hkl, SpaceGroup(sg))
    given = (group_reflections(mapping.asu_hkl), mapping.friedel_minus)
    obs = ScaledObservations(hkl, intensity, sigma ** 2, np.asarray(batch)[usable],
                             np.asarray(dataset, dtype=np.int64)[usable], SpaceGroup(sg), UnitCell(cell), 1.0)
    for n_threads in (1, 2):
        alone = statistics_for_report(obs, anomalous=True, n_threads=n_threads)
        shared = statistics_for_report(obs, anomalous=True, n_threads=n_threads, asu_grouping=given)
        same_statistics(alone.statistics, shared.statistics)
        same_statistics(alone.anomalous_statistics, shared.anomalous_statistics)
        same_statistics(alone.resolution.statistics, shared.resolution.statistics)
        assert alone.resolution.d_min == shared.resolution.d_min
        same(alone.normalised_deviations, shared.normalised_deviations)
        for key, values in alone.batch_statistics.items():
            for name, array in values.items():
                same(array, shared.batch_statistics[key][name])
    prepared = _prepare(hkl, intensity, sigma, sg, cell)
    with pytest.raises(MergingStatisticsError, match="not one of"):
        prepared.use_grouping(given[0], given[1][:-1])
    assert prepared.use_grouping(*given) and not prepared.use_grouping(*given)  # (grouped once)
    sigma_bad = sigma.copy()
    sigma_bad[0] = 0.0
    assert not _prepare(hkl, intensity, sigma_bad, sg, cell).use_grouping(*given)


def test_sorted_distinct_and_median_are_numpys():
    """The numpy.ma-free stand-ins of np.unique (shell limits, datasets) and np.median
    (French-Wilson prior) give numpy's values."""
    from xtalscale.merge.french_wilson import _median
    from xtalscale.stats.merging import sorted_distinct

    rng = np.random.default_rng(2)
    for n in (0, 1, 2, 3, 10, 101):
        for values in (rng.integers(-3, 4, n), rng.normal(size=n), np.round(rng.normal(size=n), 1)):
            same(sorted_distinct(values), np.unique(values))
            if n:
                assert _median(values.astype(float)) == np.median(values.astype(float))
    with_nan = np.array([3.0, np.nan, 1.0, np.nan, 3.0, -0.0, 0.0])
    same(sorted_distinct(with_nan), np.unique(with_nan))
