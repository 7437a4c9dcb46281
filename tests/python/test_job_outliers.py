"""Outlier rejection: DIALS's test_outlier_rejection.py numbers (spec §9.8) and the C++ kernels."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from xtalscale import flex_arrays as fa
from xtalscale._core import job as kern
from xtalscale.job.grouped import GroupedObservations
from xtalscale.job.outlier_rejection import (
    NormDevOutlierRejection,
    SimpleNormDevOutlierRejection,
    TargetedOutlierRejection,
    determine_Esq_outlier_index_arrays,
    determine_outlier_index_arrays,
    limit_outlier_weights,
    reject_outliers,
)
from xtalscale.reflection_table import Flags, reflection_table
from xtalscale.symmetry import SpaceGroup, UnitCell

SG = SpaceGroup("C 2y")


def _table(I, hkl, var=None, g=None, excluded=None):
    t = reflection_table(len(I))
    t["intensity"] = fa.double(np.asarray(I, float))
    t["variance"] = fa.double(np.ones(len(I)) if var is None else np.asarray(var, float))
    if g is not False:
        t["inverse_scale_factor"] = fa.double(np.ones(len(I)) if g is None else np.asarray(g, float))
    t["miller_index"] = fa.miller_index(np.asarray(hkl, dtype=np.int32))
    t["flags"] = fa.size_t(np.zeros(len(I), dtype=np.uint64))
    if excluded is not None:
        t.set_flags(np.asarray(excluded, bool), Flags.excluded_for_scaling)
    return t


def outlier_table():
    return _table([1, 1, 1, 1, 20, 1, 1, 20, 400, 500, 10, 10],
                  [(0, 0, 1)] * 5 + [(0, 0, 2)] * 5 + [(0, 0, 23), (0, 0, 3)],
                  excluded=[True] + [False] * 11)


def outlier_table_2():
    return _table([1, 1, 1, 20, 1, 1, 20, 400, 500, 10, 10],
                  [(0, 0, 1)] * 4 + [(0, 0, 2)] * 5 + [(0, 0, 23), (0, 0, 3)])


@pytest.fixture
def grouped():
    return GroupedObservations.from_tables([outlier_table()], SG)


def test_standard_simple_and_target(grouped):
    rej = NormDevOutlierRejection(grouped, 6.0)
    rej.run()
    assert len(rej.final_outlier_arrays) == 1
    assert list(rej.final_outlier_arrays[0]) == [4, 9, 8, 7]
    rej = SimpleNormDevOutlierRejection(grouped, 6.0)
    rej.run()
    assert list(rej.final_outlier_arrays[0]) == [4, 5, 6, 7, 8, 9]
    target = GroupedObservations.from_tables([_table([500.0], [(0, 0, 2)])], SG)
    rej = TargetedOutlierRejection(grouped, 6.0, target)
    rej.run()
    assert list(rej.final_outlier_arrays[0]) == [5, 6, 7, 8]


def test_determine_outlier_index_arrays(grouped):
    assert list(determine_outlier_index_arrays(grouped, "standard")[0]) == [4, 9, 8, 7]
    assert list(determine_outlier_index_arrays(grouped, "simple")[0]) == [4, 5, 6, 7, 8, 9]
    target = GroupedObservations.from_tables([_table([500.0], [(0, 0, 2)])], SG)
    assert list(determine_outlier_index_arrays(grouped, "target", target=target)[0]) == [5, 6, 7, 8]
    none = determine_outlier_index_arrays(grouped, method=None)
    assert len(none) == 1 and none[0].size == 0
    with pytest.raises(ValueError, match="badchoice"):
        determine_outlier_index_arrays(grouped, "badchoice")
    with pytest.raises(ValueError, match="zmax"):
        determine_outlier_index_arrays(grouped, "standard", zmax=-1)


def test_small_outliers():
    I = [3560.84231, 3433.66407, 3830.64235, 0.20552, 3786.59537, 4009.98652, 0.00000, 3578.91470,
         3549.19151, 3379.58616, 3686.38610, 3913.42869, 0.00000, 3608.84869, 3681.11110]
    V = [10163.98104, 9577.90389, 9702.84868, 3.77427, 8244.70685, 9142.38221, 1.51118, 9634.53782,
         9870.73103, 9078.23488, 8977.26984, 8712.91360, 1.78802, 7473.26521, 10075.49862]
    g = GroupedObservations.from_tables([_table(I, [(0, 0, 1)] * 15, var=V)], SpaceGroup("P 1"))
    rej = NormDevOutlierRejection(g, zmax=6.0)
    rej.run()
    assert set(rej.final_outlier_arrays[0]) == {3, 6, 12}


def test_two_datasets():
    rt1 = _table([1, 1, 1, 1, 1, 1, 20, 400, 10],
                 [(0, 0, 1)] * 4 + [(0, 0, 2)] * 4 + [(0, 0, 3)], excluded=[True] + [False] * 8)
    rt2 = _table([10, 20, 500], [(0, 0, 23), (0, 0, 1), (0, 0, 2)])
    g = GroupedObservations.from_tables([rt1, rt2], SG)
    rej = SimpleNormDevOutlierRejection(g, 6.0)
    rej.run()
    assert [list(a) for a in rej.final_outlier_arrays] == [[4, 5, 6, 7], [1, 2]]
    rej = NormDevOutlierRejection(g, 6.0)
    rej.run()
    assert [list(a) for a in rej.final_outlier_arrays] == [[7, 6], [1, 2]]


def test_limit_outlier_weights():
    rt = _table([100, 101, 109, 105, 1], [(0, 0, 1)] * 5, var=[100, 101, 109, 105, 1])
    rt2 = _table([100, 101, 102, 105, 1], [(0, 0, 1)] * 5, var=[100, 101, 102, 105, 1])
    g = GroupedObservations.from_tables([rt, rt2], SpaceGroup("P 1"))
    capped = limit_outlier_weights(g.weight, g)
    assert np.all(capped <= 0.1)
    # the median of an even count is the mean of the two central values
    w = np.array([1.0, 2.0, 3.0, 100.0])
    out = kern.limit_outlier_weights(np.arange(4), np.array([0, 4]), w)
    np.testing.assert_allclose(out, [1, 2, 3, 25.0])


def test_reject_outliers_flags_and_overwrites():
    exp = SimpleNamespace(crystal=SimpleNamespace(get_space_group=lambda: SG,
                                                  get_unit_cell=lambda: UnitCell((5, 5, 5, 90, 90, 90))))
    expected = [False, False, False, True, False, False, True, True, True, False, False]
    refls = reject_outliers(outlier_table_2(), exp)
    assert list(refls.get_flags(Flags.outlier_in_scaling)) == expected
    both = outlier_table_2()
    both.extend(outlier_table_2())
    assert list(reject_outliers(both, exp).get_flags(Flags.outlier_in_scaling)) == expected * 2
    refls = outlier_table_2()
    refls.set_flags(np.array([True] + [False] * 10), Flags.outlier_in_scaling)
    assert list(reject_outliers(refls, exp).get_flags(Flags.outlier_in_scaling)) == expected
    del refls["intensity"]
    with pytest.raises(AssertionError):
        reject_outliers(refls, exp)


def test_esq_outliers():
    exp = SimpleNamespace(crystal=SimpleNamespace(get_space_group=lambda: SG,
                                                  get_unit_cell=lambda: UnitCell((5, 5, 5, 90, 90, 90))))
    g = GroupedObservations.from_tables([outlier_table()], SG)
    assert list(determine_Esq_outlier_index_arrays(g, exp, emax=1.5)[0]) == [8, 9]
    rt = outlier_table()
    g2 = GroupedObservations.from_tables([rt.select(np.arange(12) < 9), rt.select(np.arange(12) >= 9)], SG)
    out = determine_Esq_outlier_index_arrays(g2, exp, emax=1.5)
    assert [list(a) for a in out] == [[8], [0]]


def test_kernels_validate_and_agree_with_numpy():
    rng = np.random.default_rng(0)
    n = 2000
    group = np.sort(rng.integers(0, 300, n))
    order = np.arange(n)
    offsets = np.searchsorted(group, np.arange(301))
    I, w, g = rng.normal(100, 10, n), rng.uniform(0.5, 2, n), rng.uniform(0.5, 1.5, n)
    z = kern.normdev_leave_one_out(order, offsets, I, w, g)
    sizes = np.diff(offsets)
    a = np.bincount(group, w * g * I, 300)
    b = np.bincount(group, w * g * g, 300)
    big = sizes[group] > 2
    others_wgg = np.where(big, b[group] - w * g * g, 1.0)
    others_mean = (a[group] - w * g * I) / others_wgg
    ref = (I - g * others_mean) / np.sqrt(1 / w + g * g / others_wgg)
    np.testing.assert_allclose(z[big], ref[big], rtol=1e-10)
    assert np.all(z[~big] == 0)
    np.testing.assert_allclose(kern.sum_in_groups(order, offsets, I), np.bincount(group, I, 300))
    with pytest.raises(ValueError, match="last offset"):
        kern.sum_in_groups(order, offsets[:-1], I)
    with pytest.raises(IndexError, match="order"):
        kern.sum_in_groups(order + 5, offsets, I)
    with pytest.raises(ValueError, match="entries"):
        kern.normdev_simple(order, offsets, I, w[:-1], g)
    with pytest.raises(ValueError, match="finite"):
        kern.normdev_simple(order, offsets, np.full(n, np.nan), w, g)
    with pytest.raises(ValueError, match="positive"):
        kern.normdev_leave_one_out(order, offsets, I, np.zeros(n), g)


def test_grouped_validation():
    with pytest.raises(ValueError, match="variance"):
        GroupedObservations.from_tables([_table([1.0, 2.0], [(0, 0, 1)] * 2, var=[1.0, 0.0])], SG)
    t = _table([1.0], [(0, 0, 1)])
    del t["miller_index"]
    with pytest.raises(KeyError, match="miller_index"):
        GroupedObservations.from_tables([t], SG)


def _random_tables(rng, n_tables=2, n=3000):
    tables = []
    for _ in range(n_tables):
        hkl = rng.integers(-6, 7, size=(n, 3)).astype(np.int32)
        hkl[np.all(hkl == 0, axis=1)] = (0, 0, 1)
        tables.append({"intensity": rng.normal(100, 20, n), "variance": rng.uniform(50, 150, n),
                       "inverse_scale_factor": rng.uniform(0.5, 2, n), "miller_index": hkl})
    return tables


@pytest.mark.parametrize("anomalous", [False, True])
def test_subset_is_the_grouping_of_the_kept_rows(anomalous):
    """A subset keeps the grouping's order (no new sort): it equals grouping the kept rows afresh,
    through the ASU cache or not, and the standard rejection gives the rounds' order."""
    from xtalscale.job import grouped as grouped_module
    from xtalscale.symmetry import group_reflections, map_to_asu

    rng = np.random.default_rng(4)
    tables = _random_tables(rng)
    ones = [np.ones(3000, bool)] * 2
    full = GroupedObservations.from_tables(tables, SG, anomalous=anomalous, selections=ones)
    again = GroupedObservations.from_tables(tables, SG, anomalous=anomalous, selections=ones)  # cached
    hkl = np.concatenate([t["miller_index"] for t in tables])
    fresh = group_reflections(map_to_asu(hkl, SG, anomalous=anomalous).asu_hkl)
    for g in (full, again):
        np.testing.assert_array_equal(g.order, fresh.order)
        np.testing.assert_array_equal(g.offsets, fresh.offsets)
    assert not again.asu_hkl.flags.writeable
    keep = [rng.random(3000) < 0.6 for _ in tables]
    grouped_module._ASU_CACHE.clear()
    direct = GroupedObservations.from_tables(tables, SG, anomalous=anomalous, selections=keep)
    sub = full.subset(np.concatenate(keep))
    for name in ("order", "offsets", "intensity", "scale", "asu_hkl", "dataset", "row"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(direct, name))
    np.testing.assert_array_equal(sub.group_of_row(), direct.group_of_row())
    rows = determine_outlier_index_arrays(sub, "standard", zmax=1.5)
    assert [list(r) for r in rows] == [list(r) for r in determine_outlier_index_arrays(direct, "standard", zmax=1.5)]


@pytest.mark.parametrize("n_rows,n_threads", [(5000, 1), (120000, 1), (120000, 2)])
def test_fused_standard_rejection_equals_the_round_by_round_kernels(n_rows, n_threads):
    """standard_outlier_rows = the loop of weight cap, leave-one-out z, pick and regrouping;
    with many groups (several fixed chunks of 4096 groups) and on two threads too."""
    rng = np.random.default_rng(7)
    tables = _random_tables(rng, 1, n_rows)
    if n_rows > 5000:  # ~15,000 groups of ~8: four chunks
        tables[0]["miller_index"] = rng.integers(-24, 25, size=(n_rows, 3)).astype(np.int32)
    g = GroupedObservations.from_tables(tables, SG, selections=[np.ones(n_rows, bool)])
    if n_rows > 5000:
        assert g.n_groups > 3 * 4096
    n_out = n_rows // 16
    I = g.intensity.copy()
    I[rng.integers(0, I.size, n_out)] *= rng.uniform(2, 6, n_out)  # outliers, some groups several
    w = g.weight * rng.choice([1.0, 30.0], size=I.size, p=[0.9, 0.1])  # some weights capped
    order, offsets, position, inten, weight, scale = g.order, g.offsets, np.arange(I.size), I, w, g.scale
    found = []
    while position.size:
        capped = kern.limit_outlier_weights(order, offsets, weight)
        z = kern.normdev_leave_one_out(order, offsets, inten, capped, scale)
        outliers, potential = kern.pick_group_outliers(order, offsets, np.abs(z), 3.0)
        if outliers.size == 0:
            break
        found.append(position[outliers])
        keep = np.zeros(position.size, bool)
        keep[potential] = True
        order, offsets = kern.subset_grouping(order, offsets, keep)
        position, inten, weight, scale = position[keep], inten[keep], weight[keep], scale[keep]
    expected = np.concatenate(found)
    assert expected.size > n_out and len(found) > 2
    np.testing.assert_array_equal(
        kern.standard_outlier_rows(g.order, g.offsets, I, w, g.scale, 3.0, n_threads=n_threads), expected)
    with pytest.raises(ValueError, match="positive"):
        kern.standard_outlier_rows(g.order, g.offsets, I, np.zeros(I.size), g.scale, 3.0, n_threads=n_threads)
    # the error names the first bad row in group order (groups of more than two), whichever
    # chunk or thread meets a bad weight first
    sizes = np.diff(g.offsets)
    tested = np.flatnonzero(sizes > 2)
    early, late = tested[len(tested) // 3], tested[-1]
    bad = w.copy()
    bad[g.order[g.offsets[late]]] = 0.0
    bad[g.order[g.offsets[early] + 1]] = -1.0
    with pytest.raises(ValueError, match=rf"\(row {g.order[g.offsets[early] + 1]}\)"):
        kern.standard_outlier_rows(g.order, g.offsets, I, bad, g.scale, 3.0, n_threads=n_threads)
