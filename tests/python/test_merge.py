"""Merging, the merged MTZ (read back by gemmi), bad input, and the merge/show commands."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import gemmi
import numpy as np
import pytest

from xtalscale._core import merge as kernel
from xtalscale.cli import main
from xtalscale.io.detect import detect_file_type
from xtalscale.io.mtz import MtzFormatError
from xtalscale.merge import (
    NoScaledDataError,
    ScaledObservations,
    merge_observations,
    observations_from_mtz,
    observations_from_reflections,
    write_merged_mtz,
)
from xtalscale.merge.params import merge_phil_scope, parse_phil_arguments
from xtalscale.symmetry import SpaceGroup, UnitCell, map_to_asu

DATA = Path(__file__).resolve().parents[1] / "data"
INSULIN = DATA / "mtz_insulin_dials_aimless" / "insulin_dials_scaled_unmerged.mtz.gz"
CYS = DATA / "dials_l_cysteine_4_sweeps_scaled"

DIALS_MERGE_COLUMNS = [
    ("H", "H"), ("K", "H"), ("L", "H"), ("IMEAN", "J"), ("SIGIMEAN", "Q"), ("N", "I"),
    ("F", "F"), ("SIGF", "Q"), ("I(+)", "K"), ("SIGI(+)", "M"), ("I(-)", "K"),
    ("SIGI(-)", "M"), ("N(+)", "I"), ("N(-)", "I"), ("F(+)", "G"), ("SIGF(+)", "L"),
    ("F(-)", "G"), ("SIGF(-)", "L"), ("DANO", "D"), ("SIGDANO", "Q")]


def _observations(hkl, intensity, variance, symbol="P 1") -> ScaledObservations:
    n = len(intensity)
    return ScaledObservations(np.asarray(hkl, dtype=np.int32).reshape(-1, 3),
                              np.asarray(intensity, float), np.asarray(variance, float),
                              np.arange(n), np.zeros(n, int), SpaceGroup(symbol),
                              UnitCell((30, 40, 50, 90, 90, 90)), 1.0, "constructed", n)


def _row(merged, hkl):
    asu = map_to_asu(np.array([hkl]), merged.space_group).asu_hkl[0]
    return int(np.flatnonzero((merged.miller_index == asu).all(axis=1))[0])


def test_hand_computed_means_halves_and_amplitudes():
    # (1,2,3) twice and its Friedel mate once; (0,0,1) once (P 1: all acentric)
    obs = _observations([(1, 2, 3), (1, 2, 3), (-1, -2, -3), (0, 0, 1)],
                        [10.0, 14.0, 20.0, 5.0], [4.0, 4.0, 1.0, 1.0])
    merged = merge_observations(obs)
    c = merged.columns
    r = _row(merged, (1, 2, 3))
    # IMEAN: weights 1/4, 1/4, 1 -> (2.5 + 3.5 + 20) / 1.5
    assert c["IMEAN"][r] == pytest.approx(26.0 / 1.5)
    assert c["SIGIMEAN"][r] == pytest.approx(math.sqrt(1 / 1.5))
    assert c["N"][r] == 3
    plus_is_123 = tuple(merged.miller_index[r]) == (1, 2, 3)
    ip, sp, n_p = (12.0, math.sqrt(2.0), 2) if plus_is_123 else (20.0, 1.0, 1)
    im, sm, n_m = (20.0, 1.0, 1) if plus_is_123 else (12.0, math.sqrt(2.0), 2)
    assert (c["I(+)"][r], c["SIGI(+)"][r], c["N(+)"][r]) == pytest.approx((ip, sp, n_p))
    assert (c["I(-)"][r], c["SIGI(-)"][r], c["N(-)"][r]) == pytest.approx((im, sm, n_m))
    # fewer than 200 reflections: the flat positive prior (acentric form, Σ = ∞)
    assert merged.truncation["prior"] == "flat positive"
    fp = kernel.french_wilson_moments(ip / sp, False)[2] * math.sqrt(sp)
    fm = kernel.french_wilson_moments(im / sm, False)[2] * math.sqrt(sm)
    assert c["F(+)"][r] == pytest.approx(fp) and c["F(-)"][r] == pytest.approx(fm)
    assert c["DANO"][r] == pytest.approx(fp - fm)
    assert c["SIGDANO"][r] == pytest.approx(math.hypot(c["SIGF(+)"][r], c["SIGF(-)"][r]))
    wp, wm = c["SIGF(+)"][r] ** -2, c["SIGF(-)"][r] ** -2
    assert c["F"][r] == pytest.approx((wp * fp + wm * fm) / (wp + wm))
    assert c["SIGF"][r] == pytest.approx((wp + wm) ** -0.5)
    # (0,0,1): one half only, no DANO
    s = _row(merged, (0, 0, 1))
    assert np.isnan(c["DANO"][s]) and c["N"][s] == 1
    assert np.isfinite(c["F"][s]) and c["F"][s] == pytest.approx(
        np.nanmax([c["F(+)"][s], c["F(-)"][s]]))


def test_centric_reflections_have_one_half_and_no_dano():
    # P 2: (h 0 l) is centric; its Friedel mate is a symmetry equivalent
    obs = _observations([(1, 0, 2), (-1, 0, -2), (1, 1, 1), (-1, -1, -1)],
                        [9.0, 11.0, 4.0, 6.0], [1.0, 1.0, 1.0, 1.0], "P 1 2 1")
    merged = merge_observations(obs)
    r = _row(merged, (1, 0, 2))
    c = merged.columns
    assert c["N(+)"][r] == 2 and np.isnan(c["I(-)"][r]) and np.isnan(c["DANO"][r])
    assert c["I(+)"][r] == pytest.approx(10.0)


def test_non_anomalous_merge_truncates_the_mean():
    obs = _observations([(1, 2, 3), (-1, -2, -3)], [10.0, 14.0], [4.0, 4.0])
    merged = merge_observations(obs, anomalous=False)
    assert set(merged.columns) == {"IMEAN", "SIGIMEAN", "N", "F", "SIGF"}
    f = kernel.french_wilson_moments(12.0 / math.sqrt(2.0), False)[2] * math.sqrt(math.sqrt(2.0))
    assert merged.columns["F"][0] == pytest.approx(f)
    with pytest.raises(NoScaledDataError, match="min_reflections"):
        merge_observations(obs, anomalous=False, fallback_to_flat_prior=False)
    assert set(merge_observations(obs, anomalous=False, truncate=False).columns) == {
        "IMEAN", "SIGIMEAN", "N"}


@pytest.fixture(scope="module")
def insulin_merged():
    return merge_observations(observations_from_mtz(INSULIN))


def test_merged_mtz_read_back_by_gemmi(tmp_path, insulin_merged):
    merged = insulin_merged
    assert len(merged) == 9831  # iotbx n_uniq (issue 12 parity)
    halves = np.isfinite(merged.columns["I(+)"]).sum() + np.isfinite(merged.columns["I(-)"]).sum()
    assert halves == 18151  # anomalous n_uniq
    assert merged.truncation["prior"].startswith("Wilson")
    path = tmp_path / "merged.mtz"
    write_merged_mtz(path, merged, dataset_name="INSULIN")
    mtz = gemmi.read_mtz_file(str(path))
    assert [(c.label, c.type) for c in mtz.columns] == DIALS_MERGE_COLUMNS
    assert mtz.spacegroup.hm == "I 2 3" and not mtz.batches
    assert mtz.datasets[1].dataset_name == "INSULIN"
    assert mtz.datasets[1].wavelength == pytest.approx(0.979, abs=1e-3)
    data = np.asarray(mtz.array)
    np.testing.assert_array_equal(data[:, :3].astype(int), merged.miller_index)
    for j, (label, _) in enumerate(DIALS_MERGE_COLUMNS[3:], start=3):
        expected = merged.columns[label]
        np.testing.assert_array_equal(np.isnan(data[:, j]), np.isnan(expected), err_msg=label)
        ok = np.isfinite(expected)
        np.testing.assert_allclose(data[ok, j], expected[ok], rtol=1e-6, err_msg=label)
    # amplitudes are positive; F ≈ √IMEAN for strong reflections (F is the mean of the
    # Bijvoet halves' amplitudes, so a few with a large anomalous difference differ more)
    f, imean, sig = (merged.columns[k] for k in ("F", "IMEAN", "SIGIMEAN"))
    strong = imean > 20 * sig
    np.testing.assert_allclose(f[strong], np.sqrt(imean[strong]), rtol=0.05)
    assert (f[np.isfinite(f)] > 0).all()


def test_mtz_observations_are_the_files_scaled_intensities():
    obs = observations_from_mtz(INSULIN)
    mtz = gemmi.read_mtz_file(str(INSULIN))
    np.testing.assert_allclose(np.sort(obs.intensity),
                               np.sort(mtz.column_with_label("I").array), rtol=1e-6)
    np.testing.assert_allclose(np.sort(np.sqrt(obs.variance)),
                               np.sort(mtz.column_with_label("SIGI").array), rtol=1e-6)


def test_merge_of_dials_reflections_selects_as_dials():
    from xtalscale.experiments import ExperimentList
    from xtalscale.reflection_table import reflection_table

    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    table = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    obs = observations_from_reflections(experiments, table)
    assert obs.excluded["bad_for_scaling"] == 2145
    assert len(obs) == 3163
    g = np.asarray(table["inverse_scale_factor"])
    keep = (np.asarray(table["flags"]).astype(np.uint64) & np.uint64((1 << 22) | (1 << 23) | (1 << 24))) == 0
    np.testing.assert_allclose(np.sort(obs.intensity),
                               np.sort(np.asarray(table["intensity.scale.value"])[keep] / g[keep]))
    merged = merge_observations(obs)
    assert len(merged) == len(np.unique(map_to_asu(obs.miller_index, obs.space_group).asu_hkl,
                                        axis=0))


# ------------------------------------------------------------------------------- bad input


def test_empty_and_sigma_free_inputs_raise_clear_errors():
    with pytest.raises(NoScaledDataError, match="no observations"):
        merge_observations(_observations(np.zeros((0, 3)), [], []))
    from xtalscale.experiments import ExperimentList
    from xtalscale.reflection_table import reflection_table

    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    table = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    table["intensity.scale.variance"] = np.zeros(len(table))
    with pytest.raises(NoScaledDataError, match=r"variances <= 0"):
        observations_from_reflections(experiments, table)
    empty = table.select(np.zeros(len(table), dtype=bool))
    with pytest.raises(NoScaledDataError, match="no scaled observation"):
        observations_from_reflections(experiments, empty)
    del table["inverse_scale_factor"]
    with pytest.raises(KeyError, match="inverse_scale_factor"):
        observations_from_reflections(experiments, table)


def test_no_multiplicity_still_merges_and_the_report_says_why_statistics_are_missing(tmp_path):
    from xtalscale.report import render_html_report, statistics_for_report

    obs = _observations([(1, 2, 3), (2, 3, 4)], [10.0, 14.0], [4.0, 4.0])
    merged = merge_observations(obs)
    assert (merged.columns["N"] == 1).all()
    inputs = statistics_for_report(obs)
    assert inputs.statistics is None and inputs.resolution is None
    assert any("could not be computed" in note for note in inputs.notes)
    page = render_html_report(merged=merged, **inputs.report_arguments())
    assert "could not be computed" in page and "No merging statistics were given." in page


def _write_unmerged_like(path, labels, spacegroup="P 21 21 21"):
    mtz = gemmi.Mtz(with_base=True)
    if spacegroup is not None:
        mtz.spacegroup = gemmi.SpaceGroup(spacegroup)
    mtz.set_cell_for_all(gemmi.UnitCell(30, 40, 50, 90, 90, 90))
    mtz.add_dataset("x")
    for label, kind in labels:
        mtz.add_column(label, kind)
    data = np.zeros((3, 3 + len(labels)), dtype=np.float32)
    data[:, :3] = [(1, 2, 3), (2, 3, 4), (3, 4, 5)]
    data[:, 3:] = 1.0
    mtz.set_data(data)
    mtz.write_to_file(str(path))


def test_mtz_without_intensities_is_a_clear_error(tmp_path):
    path = tmp_path / "no_i.mtz"
    _write_unmerged_like(path, [("M/ISYM", "Y"), ("BATCH", "B"), ("FP", "F"), ("SIGFP", "Q")])
    with pytest.raises(MtzFormatError, match="no_i.mtz"):
        observations_from_mtz(path)
    assert main(["merge", str(path), f"output.mtz={tmp_path / 'm.mtz'}"]) == 2


def test_unknown_space_group_is_a_clear_error(tmp_path, capsys):
    text = (CYS / "scaled_30.expt").read_text()
    bad = tmp_path / "bad_sg.expt"
    bad.write_text(text.replace('"space_group_hall_symbol": " P 2 2"',
                                '"space_group_hall_symbol": " Q 9 9"'))
    assert main(["merge", str(bad), str(CYS / "scaled_30.refl"),
                 f"output.mtz={tmp_path / 'm.mtz'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xtalscale: error:") and "Q 9 9" in err


def test_merge_parameters_misspelt_names_suggest_the_nearest(tmp_path):
    with pytest.raises(ValueError, match="did you mean d_min"):
        parse_phil_arguments(merge_phil_scope(), ["dmin=2"])
    phil_file = tmp_path / "merge.phil"
    phil_file.write_text("french_wilson.max_bins = 7\n")
    assert parse_phil_arguments(merge_phil_scope(), [str(phil_file)]).french_wilson.max_bins == 7


def test_detect_file_type_by_content(tmp_path):
    assert detect_file_type(INSULIN) == "mtz"
    assert detect_file_type(CYS / "scaled_30.expt") == "experiments"
    assert detect_file_type(CYS / "scaled_30.refl") == "reflections"
    assert detect_file_type(DATA / "xds_hewl_ssad_snippets" / "XDS_ASCII.HKL") == "xds"
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="unrecognised"):
        detect_file_type(other)
    with pytest.raises(FileNotFoundError):
        detect_file_type(tmp_path / "missing.mtz")


# ---------------------------------------------------------------------------- commands


def test_merge_command_writes_mtz_json_report_and_log(tmp_path, capsys):
    out = tmp_path / "m.mtz"
    status = main(["merge", str(CYS / "scaled_30.expt"), str(CYS / "scaled_30.refl"),
                   f"output.mtz={out}", f"output.json={tmp_path / 's.json'}",
                   f"output.html={tmp_path / 'r.html'}", f"output.log={tmp_path / 'm.log'}",
                   "d_min=0.8", "-v"])
    assert status == 0
    text = capsys.readouterr().out
    assert "bad_for_scaling" in text and "unique reflections" in text
    mtz = gemmi.read_mtz_file(str(out))
    assert mtz.resolution_high() >= 0.8 - 1e-6
    assert [c.label for c in mtz.columns][3:6] == ["IMEAN", "SIGIMEAN", "N"]
    document = json.loads((tmp_path / "s.json").read_text())
    assert document["summary"]["Space group"] == "P 2 2 2 (No. 16)"
    assert "unique reflections" in (tmp_path / "m.log").read_text()
    html = (tmp_path / "r.html").read_text()
    assert html.count("Plotly") > 10 and "plot-model-scale" in html


def test_merge_command_rejects_bad_arguments(tmp_path, capsys):
    assert main(["merge", str(INSULIN), "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert main(["merge", str(INSULIN), "d_min=-1"]) == 2
    assert main(["merge", str(CYS / "scaled_30.expt")]) == 2
    assert "one .expt and one .refl" in capsys.readouterr().err
    assert main(["merge", "-h"]) == 0
    assert "french_wilson" in capsys.readouterr().out


def test_show_command_summarises_every_format(capsys):
    assert main(["show", str(INSULIN), str(CYS / "scaled_30.expt"), str(CYS / "scaled_30.refl"),
                 str(DATA / "xds_hewl_ssad_snippets" / "XDS_ASCII.HKL")]) == 0
    text = capsys.readouterr().out
    assert "rows: 45595" in text and "I 2 3 (197)" in text and "batches: 45 (1-45)" in text
    assert "SCALEUSED     R" in text
    assert "P 2 2 2 (No. 16)" in text and "physical" in text
    assert "rows: 5308" in text and "bad_for_scaling" not in text  # composite names skipped
    assert "excluded_for_scaling" in text and "intensity.scale.value" in text
    assert "XDS xds_ascii file" in text and "integrated_sum  412" in text
    assert main(["show"]) == 2


def test_report_statistics_on_two_threads_equal_one():
    """n_threads=2 makes the resolution estimate beside the per-batch statistics: the same
    estimate, notes, per-batch statistics and deviations as on one thread."""
    from xtalscale.experiments import ExperimentList
    from xtalscale.reflection_table import reflection_table
    from xtalscale.report import statistics_for_report

    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    table = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    obs = observations_from_reflections(experiments, table)
    one, two = (statistics_for_report(obs, n_threads=n) for n in (1, 2))
    assert one.resolution is not None and one.resolution.d_min == two.resolution.d_min
    assert one.notes == two.notes
    assert one.statistics.as_table() == two.statistics.as_table()
    assert one.batch_statistics.keys() == two.batch_statistics.keys()
    for key, values in one.batch_statistics.items():
        for name, column in values.items():
            np.testing.assert_array_equal(column, two.batch_statistics[key][name])
    np.testing.assert_array_equal(one.normalised_deviations, two.normalised_deviations)


def _reference_scaled_selection(table, threshold, min_isigi=None):
    """scaled_intensities' selection written plainly (boolean masks, a loop over partial
    groups): rows, I, V, P."""
    ids = np.asarray(table["id"]).astype(np.int64)
    flags = np.asarray(table["flags"]).astype(np.uint64)
    g = np.asarray(table["inverse_scale_factor"], float)
    var = np.asarray(table["intensity.scale.variance"], float)
    part = np.asarray(table["partiality"], float)
    sel = ((ids >= 0) & ((flags & np.uint64((1 << 22) | (1 << 23) | (1 << 24))) == 0)
           & (g > 0) & (var > 0) & (part > 0))
    rows = np.flatnonzero(sel)
    I = np.asarray(table["intensity.scale.value"], float)[rows] / g[rows]
    V = var[rows] / g[rows] ** 2
    P = part[rows].copy()
    keep = np.ones(len(rows), dtype=bool)
    pid = np.asarray(table["partial_id"]).astype(np.int64)[rows]
    groups: dict = {}
    for i in np.flatnonzero((P < 0.99) & (V > 0)):
        groups.setdefault((ids[rows[i]], pid[i]), []).append(i)
    I0, V0, P0 = I.copy(), V.copy(), P.copy()
    for members in groups.values():
        if len(members) > 1:
            w = 1.0 / V0[members]

            def total(x):  # (summed as add.reduceat sums a group)
                return np.add.reduceat(x, [0])[0]
            I[members[0]] = total(w * I0[members]) / total(w)
            V[members[0]] = 1.0 / total(w)
            P[members[0]] = total(P0[members])
            keep[members[1:]] = False
    keep &= P >= threshold
    if min_isigi is not None:
        keep &= ~(I / np.sqrt(V) < min_isigi)
    return rows[keep], I[keep], V[keep], P[keep]


def _edited_cysteine_table():
    """The cysteine table with (0, 0, 0) rows, more partial pieces, a row of no experiment and
    a negative and a NaN frame coordinate."""
    from xtalscale.reflection_table import reflection_table

    table = reflection_table.from_file(str(CYS / "scaled_30.refl"))
    hkl = np.asarray(table["miller_index"]).copy()
    hkl[[5, 77]] = 0
    table["miller_index"] = hkl
    pid = np.asarray(table["partial_id"]).copy()
    pid[10:40] = pid[10]  # (one partial group of many pieces)
    table["partial_id"] = pid
    part = np.asarray(table["partiality"]).copy()
    part[10:40] = 0.3
    table["partiality"] = part
    ids = np.asarray(table["id"]).copy()
    ids[3] = -1
    table["id"] = ids
    xyz = np.asarray(table["xyzobs.px.value"]).copy()
    xyz[7, 2], xyz[8, 2] = -0.5, np.nan
    table["xyzobs.px.value"] = xyz
    return table


def test_scaled_rows_are_the_plain_selection():
    """The selection (masks in place, the partials' ids gathered for candidates only) gives the
    rows and values of a plain definition, and scaled_intensities' table holds them."""
    from xtalscale.io.scaled_intensities import (
        ScaledIntensityError,
        _flags_clear,
        _scaled_rows,
        scaled_intensities,
    )

    table = _edited_cysteine_table()
    flags = np.asarray(table["flags"]).astype(np.uint64)
    for bits in (int((1 << 22) | (1 << 23) | (1 << 24)), 1 << 40 | 1, 0):
        np.testing.assert_array_equal(_flags_clear(flags, bits),
                                      (flags & np.uint64(bits)) == 0)
    unique = _edited_cysteine_table()
    unique["partial_id"] = np.arange(len(unique), dtype=np.uint64)  # (nothing to combine)
    for t, combined in ((table, True), (unique, False)):
        for threshold, min_isigi in ((0.0, None), (0.4, None), (0.99, 1.0)):
            got = _scaled_rows(t, threshold, min_isigi=min_isigi)
            expected = _reference_scaled_selection(t, threshold, min_isigi)
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(a, b)
            rows, I, V, P = _scaled_rows(t, threshold, min_isigi=min_isigi,
                                         with_partiality=False)
            assert (P is not None) == combined
            for a, b in zip((rows, I, V), expected):
                np.testing.assert_array_equal(a, b)
            out = scaled_intensities(t, threshold, min_isigi=min_isigi, columns=("id",))
            np.testing.assert_array_equal(np.asarray(out["original_index"]), got[0])
            np.testing.assert_array_equal(np.asarray(out["intensity"]), got[1])
            np.testing.assert_array_equal(np.asarray(out["variance"]), got[2])
            np.testing.assert_array_equal(np.asarray(out["partiality"]), got[3])
    with pytest.raises(ScaledIntensityError, match="partiality < 2.0"):
        _scaled_rows(unique, 2.0)
    with pytest.raises(ScaledIntensityError, match="partiality < 100.0"):
        _scaled_rows(table, 100.0)  # (the combined pieces sum to 9)


def test_observations_from_reflections_are_the_selected_rows():
    """Observations (rows of the selection without (0, 0, 0); batch floor(z) + the scan's first
    image, from z >= 0 by truncation, else through nan_to_num and floor) as defined."""
    from xtalscale.experiments import ExperimentList

    experiments = ExperimentList.from_file(str(CYS / "scaled_30.expt"))
    table = _edited_cysteine_table()
    table_ids = np.asarray(table["id"]).copy()
    table_ids[table_ids >= 0] = np.arange(np.count_nonzero(table_ids >= 0)) % 2
    table["id"] = table_ids  # (rows of two experiments)
    rows, I, V, _ = _reference_scaled_selection(table, 0.4)
    hkl = np.asarray(table["miller_index"])[rows]
    keep = hkl.any(axis=1)
    rows, I, V = rows[keep], I[keep], V[keep]
    ids = table_ids.astype(np.int64)[rows]
    z = np.nan_to_num(np.asarray(table["xyzobs.px.value"])[rows, 2])
    assert (z < 0).any()  # (the z < 0 / NaN path is taken)
    one = experiments[0]
    assert one.scan.get_image_range()[0] == 1
    for second_first in (1, 5):  # the same first image for both experiments, then not
        second = copy.deepcopy(one)
        second.identifier = "second"
        second.scan.set_image_range((second_first, second_first + 10))
        experiments = ExperimentList([one, second])
        first = np.array([1, second_first])
        obs = observations_from_reflections(experiments, table)
        np.testing.assert_array_equal(obs.miller_index, np.asarray(table["miller_index"])[rows])
        np.testing.assert_array_equal(obs.intensity, I)
        np.testing.assert_array_equal(obs.variance, V)
        np.testing.assert_array_equal(obs.dataset, ids)
        assert obs.batch.dtype == obs.dataset.dtype == np.int64
        np.testing.assert_array_equal(obs.batch, np.floor(z).astype(np.int64) + first[ids])
        assert obs.excluded["index (0, 0, 0)"] == np.count_nonzero(~keep) > 0
        assert sum(obs.excluded.values()) + len(obs) == len(table)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_report_notes_when_statistics_or_the_estimate_fail(monkeypatch, n_threads):
    """Without statistics there is no estimate (nor its note); a failed estimate is noted
    after the statistics, on one thread or two."""
    from xtalscale.report import statistics_for_report
    from xtalscale.stats import resolution

    hkl = np.array([[h, k, 1] for h in range(1, 40) for k in range(1, 30)])
    unique = _observations(hkl, np.full(len(hkl), 10.0), np.ones(len(hkl)), "P 1")
    out = statistics_for_report(unique, n_threads=n_threads)
    assert out.statistics is None and out.resolution is None
    assert len(out.notes) == 1 and out.notes[0].startswith("Merging statistics could not")
    twice = _observations(np.concatenate([hkl, hkl]), np.arange(2.0 * len(hkl)),
                          np.ones(2 * len(hkl)), "P 1")
    assert statistics_for_report(twice, n_threads=n_threads).statistics is not None
    bad_bins = statistics_for_report(twice, n_bins=0, n_threads=n_threads)
    assert bad_bins.resolution is None and len(bad_bins.notes) == 1 and "n_bins" in bad_bins.notes[0]

    def failing(*args, **kwargs):
        raise resolution.MergingStatisticsError("no fit")

    monkeypatch.setattr(resolution, "_estimate_resolution", failing)
    out = statistics_for_report(twice, n_threads=n_threads)
    assert out.statistics is not None and out.resolution is None
    assert out.notes == ["Resolution estimate failed: no fit"]
