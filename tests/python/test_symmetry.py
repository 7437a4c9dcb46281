"""Symmetry layer: space groups, vectorised ASU mapping, grouping, absences, reindexing."""
from __future__ import annotations

import gemmi
import numpy as np
import pytest

from xtalscale.symmetry import (
    SpaceGroup,
    UnitCell,
    centric_flags,
    d_spacings,
    group_reflections,
    map_to_asu,
    reindex,
    space_group_from_hall,
    systematic_absences,
)


@pytest.mark.parametrize(
    "hall, number, hm",
    [(" P 2 2", 16, "P 2 2 2"), (' P 31 2"', 152, "P 31 2 1"), (" I 2 2 3", 197, "I 2 3"),
     (" P 4abw 2nw", 92, "P 41 21 2"), (" P 2ac 2ab", 19, "P 21 21 21"),
     (" R 3", 146, "R 3")],
)
def test_space_group_from_hall(hall, number, hm):
    sg = space_group_from_hall(hall)
    assert sg.type().number() == number
    assert sg.type().lookup_symbol() == hm
    assert sg.hall_symbol() == hall
    assert sg == SpaceGroup(hm)


def test_space_group_properties():
    sg = SpaceGroup("P 21 21 21")
    assert sg.order_z() == 4 and not sg.is_centric() and sg.is_chiral()
    assert sg.build_derived_patterson_group().order_z() == 8
    assert SpaceGroup("C 1 2 1").order_z() == 4 and SpaceGroup("C 1 2 1").order_p() == 2
    with pytest.raises(ValueError, match="space group"):
        SpaceGroup("")
    with pytest.raises(ValueError, match="Hall symbol"):
        space_group_from_hall(" X 9 q")


def test_asu_matches_gemmi_for_every_tabulated_setting():
    """Index-by-index equality with gemmi's ReciprocalAsu.to_asu (ASU index and ISYM)
    for all 564 settings in gemmi's table, on random indices."""
    rng = np.random.default_rng(7)
    hkl = rng.integers(-9, 10, size=(120, 3)).astype(np.int32)
    hkl = hkl[hkl.any(axis=1)]
    n_groups = 0
    for gsg in gemmi.spacegroup_table():
        m = map_to_asu(hkl, SpaceGroup(gsg))
        asu, ops = gemmi.ReciprocalAsu(gsg), gsg.operations()
        ref = [asu.to_asu([int(v) for v in h], ops) for h in hkl]
        np.testing.assert_array_equal(m.asu_hkl, [r[0] for r in ref], err_msg=gsg.xhm())
        np.testing.assert_array_equal(m.isym, [r[1] for r in ref], err_msg=gsg.xhm())
        n_groups += 1
    assert n_groups == len(list(gemmi.spacegroup_table())) > 500


def test_c2_anomalous_example_from_spec():
    """Spec 6.1: in C2, (1,1,1) and (-1,1,-1) map to (1,1,1) while (-1,-1,-1) and
    (1,-1,1) map to (-1,-1,-1) when anomalous."""
    hkl = [(1, 1, 1), (-1, 1, -1), (-1, -1, -1), (1, -1, 1)]
    anom = map_to_asu(hkl, "C 1 2 1", anomalous=True)
    np.testing.assert_array_equal(anom.asu_hkl, [(1, 1, 1), (1, 1, 1), (-1, -1, -1),
                                                 (-1, -1, -1)])
    np.testing.assert_array_equal(anom.friedel_minus, [False, False, True, True])
    np.testing.assert_array_equal(anom.isym, [1, 3, 2, 4])
    plain = map_to_asu(hkl, "C 1 2 1")
    np.testing.assert_array_equal(plain.asu_hkl, [(1, 1, 1)] * 4)


def test_centric_reflections_are_never_negated():
    # In P2 (b unique) h0l is centric: (-1,0,-2) maps to (1,0,2) via the Friedel branch
    # (isym even) but must keep the + index when anomalous (cctbx behaviour).
    m = map_to_asu([(1, 0, 2), (-1, 0, -2), (1, 1, 2), (-1, -1, -2)], "P 1 2 1",
                   anomalous=True)
    np.testing.assert_array_equal(m.centric, [True, True, False, False])
    np.testing.assert_array_equal(m.isym % 2, [1, 0, 1, 0])
    np.testing.assert_array_equal(m.asu_hkl, [(1, 0, 2), (1, 0, 2), (1, 1, 2), (-1, -1, -2)])
    np.testing.assert_array_equal(centric_flags([(1, 0, 2), (1, 1, 2)], "P 1 2 1"),
                                  [True, False])


def test_grouping_spec_example_order():
    """The Ih-table example of spec 9.6 (P1): groups sorted by signed (h,k,l)."""
    hkl = [(1, 0, 0), (0, 0, 1), (-1, 0, 0), (0, 2, 0), (0, 4, 0), (0, 0, -2), (0, 0, 2)]
    asu = map_to_asu(hkl, "P 1").asu_hkl
    g = group_reflections(asu)
    np.testing.assert_array_equal(g.unique_hkl, [(0, 0, 1), (0, 0, 2), (0, 2, 0), (0, 4, 0),
                                                 (1, 0, 0)])
    np.testing.assert_array_equal(g.group_index, [4, 0, 4, 2, 3, 1, 1])
    np.testing.assert_array_equal(g.order, [1, 5, 6, 3, 4, 0, 2])
    np.testing.assert_array_equal(g.offsets, [0, 1, 3, 4, 5, 7])
    np.testing.assert_array_equal(g.group_sizes(), [1, 2, 1, 1, 2])


def test_grouping_signed_lexicographic_order():
    # spec 6.1: (0,0,1) < (0,0,2) < (0,0,20) < (0,2,0) < (1,0,0) < (3,0,0) < (10,0,0);
    # negative indices sort before positive ones (signed comparison).
    hkl = [(10, 0, 0), (0, 0, 20), (3, 0, 0), (0, 2, 0), (1, 0, 0), (0, 0, 2), (0, 0, 1),
           (-1, 5, 5), (0, -3, 1)]
    g = group_reflections(hkl)
    np.testing.assert_array_equal(
        g.unique_hkl, [(-1, 5, 5), (0, -3, 1), (0, 0, 1), (0, 0, 2), (0, 0, 20), (0, 2, 0),
                       (1, 0, 0), (3, 0, 0), (10, 0, 0)])


def test_grouping_against_reference_and_deterministic():
    rng = np.random.default_rng(3)
    hkl = rng.integers(-6, 7, size=(5000, 3)).astype(np.int32)
    hkl = hkl[hkl.any(axis=1)]
    asu = map_to_asu(hkl, "P 41 21 2").asu_hkl
    g = group_reflections(asu)
    # independent reference: dict of sorted keys -> input rows in order
    ref: dict = {}
    for i, h in enumerate(map(tuple, asu.tolist())):
        ref.setdefault(h, []).append(i)
    keys = sorted(ref)
    assert [tuple(h) for h in g.unique_hkl.tolist()] == keys
    for gi, key in enumerate(keys):
        rows = g.order[g.offsets[gi]:g.offsets[gi + 1]].tolist()
        assert rows == ref[key]  # stable: input order kept within a group
        assert set(np.flatnonzero(g.group_index == gi).tolist()) == set(rows)
    g2 = group_reflections(asu.copy())
    for a, b in zip(g, g2):
        np.testing.assert_array_equal(a, b)


def test_grouping_empty():
    g = group_reflections(np.zeros((0, 3), dtype=np.int32))
    assert g.n_groups == 0 and g.offsets.tolist() == [0] and len(g.order) == 0


def test_d_spacings_match_gemmi():
    cell = UnitCell((58.44, 58.44, 156.16, 90, 90, 120))
    hkl = np.array([[1, 0, 0], [3, -2, 7], [10, 10, 40], [0, 0, 1]], dtype=np.int32)
    ref = gemmi.UnitCell(58.44, 58.44, 156.16, 90, 90, 120).calculate_d_array(hkl)
    np.testing.assert_allclose(d_spacings(hkl, cell), ref, rtol=1e-13)
    assert d_spacings([[0, 0, 1]], cell)[0] == pytest.approx(156.16, rel=1e-12)


def test_systematic_absences_p212121():
    hkl = [(1, 0, 0), (2, 0, 0), (0, 3, 0), (0, 4, 0), (0, 0, 5), (0, 0, 6), (1, 1, 0)]
    np.testing.assert_array_equal(systematic_absences(hkl, " P 2ac 2ab"),
                                  [True, False, True, False, True, False, False])
    assert SpaceGroup("P 21 21 21").is_sys_absent([(0, 0, 1)]).tolist() == [True]


def test_reindex():
    hkl = np.array([(1, 2, 3), (-4, 5, 6)])
    np.testing.assert_array_equal(reindex(hkl, "k,h,-l"), [(2, 1, -3), (5, -4, -6)])
    np.testing.assert_array_equal(reindex(hkl, [[0, 1, 0], [1, 0, 0], [0, 0, -1]]),
                                  [(2, 1, -3), (5, -4, -6)])
    np.testing.assert_array_equal(reindex([(2, 0, 4)], "h/2,k,l/2"), [(1, 0, 2)])
    # a non-symmetric operator: (h, k, l) -> (h, h + 2k, l), as gemmi's Op.apply_to_hkl
    np.testing.assert_array_equal(reindex([(1, 0, 0), (0, 1, 0), (3, -1, 2)], "h,h+2*k,l"),
                                  [(1, 1, 0), (0, 2, 0), (3, 1, 2)])
    assert gemmi.Op("h,h+2*k,l").apply_to_hkl([3, -1, 2]) == [3, 1, 2]
    with pytest.raises(ValueError, match="non-integral"):
        reindex([(1, 0, 0)], "h/2,k,l")
    with pytest.raises(ValueError, match="singular"):
        reindex(hkl, [[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="cannot parse"):
        reindex(hkl, "q,r,s")


def test_bad_miller_input():
    with pytest.raises(ValueError, match="hkl must have shape \\(n, 3\\)"):
        map_to_asu(np.zeros((4, 2), dtype=int), "P 1")
    with pytest.raises(ValueError, match="row 1 is \\(0, 0, 0\\)"):
        map_to_asu([(1, 0, 0), (0, 0, 0)], "P 1")
    with pytest.raises(ValueError, match="integer values"):
        map_to_asu([(1.5, 0, 0)], "P 1")
    with pytest.raises(ValueError, match="finite"):
        group_reflections([(np.nan, 0, 0)])
    with pytest.raises(ValueError, match="implausibly large"):
        group_reflections([(2**21, 0, 0)])


def test_isym_reproduces_original_index():
    """Applying operator k (and the Friedel sign) to the ASU index gives back the input."""
    sg = SpaceGroup("R 3:H")
    rng = np.random.default_rng(11)
    hkl = rng.integers(-15, 16, size=(3000, 3)).astype(np.int32)
    hkl = hkl[hkl.any(axis=1)]
    m = map_to_asu(hkl, sg)
    R = sg.point_group_rotations()
    k = (m.isym - 1) // 2
    sign = np.where(m.isym % 2 == 1, 1, -1)
    # h_asu = sign * h R_k  =>  h = sign * h_asu R_k^-1
    back = np.einsum("ni,nij->nj", sign[:, None] * m.asu_hkl, np.linalg.inv(R[k]))
    np.testing.assert_allclose(back, hkl, atol=1e-9)


def test_add_asu_miller_index_on_table():
    from xtalscale.array_family import flex
    from xtalscale.symmetry import add_asu_miller_index

    t = flex.reflection_table()
    t["miller_index"] = np.array([(1, 1, 1), (-1, -1, -1), (1, -1, 1)], dtype=np.int32)
    m = add_asu_miller_index(t, "C 1 2 1", anomalous=True)
    np.testing.assert_array_equal(np.asarray(t["asu_miller_index"]),
                                  [(1, 1, 1), (-1, -1, -1), (-1, -1, -1)])
    assert m.isym.tolist() == [1, 2, 4]
    with pytest.raises(KeyError, match="miller_index"):
        add_asu_miller_index(flex.reflection_table(), "P 1")


def test_l_cysteine_grouping_matches_published_counts():
    """All 4 l-cysteine sweeps with DIALS's flags (integrated, not bad_for_scaling):
    11,816 observations in 1,565 unique reflections (data_and_formats.md, section 2)."""
    from pathlib import Path

    from xtalscale.array_family import flex
    from xtalscale.experiments import ExperimentList

    data = Path(__file__).resolve().parents[1] / "data" / "dials_l_cysteine_4_sweeps_scaled"
    names = ("scaled_20_25", "scaled_30", "scaled_35")
    if not all((data / f"{n}.refl").exists() for n in names):
        pytest.skip("l-cysteine scaled .refl files not shipped")
    hkl, sg = [], None
    for name in names:
        t = flex.reflection_table.from_file(data / f"{name}.refl")
        el = ExperimentList.from_file(data / f"{name}.expt")
        t.assert_experiment_identifiers_are_consistent(el)
        sel = t.get_flags(t.flags.integrated, all=False) & ~t.get_flags(
            t.flags.bad_for_scaling, all=False)
        hkl.append(np.asarray(t.select(sel)["miller_index"]))
        sg = el[0].crystal.get_space_group()
    hkl = np.concatenate(hkl)
    assert len(hkl) == 11816 and sg.type().number() == 16
    g = group_reflections(map_to_asu(hkl, sg).asu_hkl)
    assert g.n_groups == 1565
    assert g.group_sizes().sum() == 11816 and g.group_sizes().min() >= 1


def test_reindex_unit_cell():
    from xtalscale.symmetry import reindex_unit_cell

    np.testing.assert_allclose(reindex_unit_cell((10, 20, 30, 90, 90, 90), "k,h,-l").parameters(),
                               (20, 10, 30, 90, 90, 90), atol=1e-12)
    # hexagonal -> orthohexagonal C cell: a' = a - b? use h' = h + 2k style check on d-spacings
    hexa = UnitCell((58.44, 58.44, 156.16, 90, 90, 120))
    op = "h,h+2*k,l"  # indices of the C-centred orthohexagonal setting (a'=a, b'=a+2b)
    ortho = reindex_unit_cell(hexa, op)
    a, b, c, al, be, ga = ortho.parameters()
    assert (a, round(b, 6), c) == pytest.approx((58.44, round(58.44 * 3 ** 0.5, 6), 156.16))
    assert (al, be, ga) == pytest.approx((90, 90, 90), abs=1e-9)
    # d-spacings are invariant under reindexing
    hkl = np.array([(1, 0, 0), (2, 1, 3), (-1, 4, 2)])
    np.testing.assert_allclose(ortho.d(reindex(hkl, op)), hexa.d(hkl), rtol=1e-12)


def test_centric_flags_kernel_is_gemmis_centric_test():
    """The C++ centric test (h R = -h for a rotation of the group, the mapping's own
    convention) gives gemmi's flags for every 12th setting of gemmi's table, on random indices
    and on their ASU images."""
    from xtalscale._core import grouping as core_grouping
    from xtalscale.symmetry import _asu_symmetry

    rng = np.random.default_rng(3)
    hkl = rng.integers(-9, 10, (4000, 3)).astype(np.int32)
    hkl[np.all(hkl == 0, axis=1)] = (1, 0, 0)
    for entry in list(gemmi.spacegroup_table())[::12]:
        sg = SpaceGroup(entry.hall)
        rotations = _asu_symmetry(sg)[0]
        for h in (hkl, map_to_asu(hkl, sg).asu_hkl):
            np.testing.assert_array_equal(core_grouping.centric_flags(h, rotations),
                                          sg.gemmi_ops.centric_flag_array(h), err_msg=entry.hm)
    with pytest.raises(ValueError, match="rotations"):
        core_grouping.centric_flags(hkl, np.zeros((0, 3, 3), np.int64))
    with pytest.raises(ValueError, match="hkl"):
        core_grouping.centric_flags(hkl[:, :2], rotations)


@pytest.mark.parametrize("hall", [" P 4 2", " I 2 2 3", ' P 31 2"', "-P 1"])
def test_threaded_asu_mapping_equals_the_serial_one(hall):
    """map_to_asu split over threads gives every row what one thread gives it (ASU index, ISYM,
    centric and minus flags), for row counts below and above the per-thread minimum, and a bad
    row is named by its number in the whole input whichever thread meets it."""
    from xtalscale._core import grouping as core_grouping
    from xtalscale.symmetry import _asu_symmetry

    rng = np.random.default_rng(5)
    sg = SpaceGroup(hall)
    for n in (1000, 200_001):
        hkl = rng.integers(-30, 31, (n, 3)).astype(np.int32)
        hkl[np.all(hkl == 0, axis=1)] = (0, 0, 1)
        one, three = map_to_asu(hkl, sg), map_to_asu(hkl, sg, n_threads=3)
        for name in ("asu_hkl", "isym", "friedel_minus", "centric"):
            np.testing.assert_array_equal(getattr(three, name), getattr(one, name), err_msg=name)
    bad = hkl.copy()
    bad[150_000] = 0
    rotations, basis, condition = _asu_symmetry(sg)
    for threads in (1, 2, 4):
        with pytest.raises(ValueError, match=r"row 150000 is \(0, 0, 0\)"):
            core_grouping.map_to_asu(bad, rotations, basis, condition, n_threads=threads)
