"""Experiment models and .expt I/O on the real DIALS files in tests/data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gemmi
import numpy as np
import pytest

from xtalscale.dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
from xtalscale.experiments import Goniometer, Scan

DATA = Path(__file__).resolve().parents[1] / "data"
FILES = {
    "cys20_old": DATA / "dials_l_cysteine_integrated" / "20_integrated_experiments.json",
    "cys30_scaled": DATA / "dials_l_cysteine_4_sweeps_scaled" / "scaled_30.expt",
    "wedge11": DATA / "dials_l_cysteine_narrow_wedge" / "11_integrated.expt",
    "quartz": DATA / "dials_quartz_3ded" / "scaled.expt",
    "centroid": DATA / "dials_centroid_x4lots" / "indexed.expt",
    "ssx": DATA / "dials_ssx_cunir_stills" / "integrated.expt",
}


def _raw(name):
    return json.loads(FILES[name].read_text())


def _cell_from_raw(crystal):
    """Independent cell computation from the raw real-space vectors."""
    a, b, c = (np.array(crystal[k]) for k in ("real_space_a", "real_space_b", "real_space_c"))
    ang = lambda u, v: math.degrees(math.acos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    return [np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c), ang(b, c), ang(a, c),
            ang(a, b)]


@pytest.mark.parametrize("name", sorted(FILES))
def test_write_read_preserves_every_key(name, tmp_path):
    el = ExperimentList.from_file(FILES[name])
    out = tmp_path / "out.expt"
    el.as_file(out)
    # Exact equality of the decoded JSON: every key and every value survives.
    assert json.loads(out.read_text()) == _raw(name)
    again = ExperimentList.from_file(out)
    assert len(again) == len(el)
    assert again.identifiers() == el.identifiers()


@pytest.mark.parametrize(
    "name, n_expt, sg_number, sg_symbol",
    [
        ("cys20_old", 1, 16, "P 2 2 2"),
        ("cys30_scaled", 1, 16, "P 2 2 2"),
        ("wedge11", 1, 16, "P 2 2 2"),
        ("quartz", 1, 152, "P 31 2 1"),
        ("centroid", 1, 89, "P 4 2 2"),
        ("ssx", 5, 198, "P 21 3"),
    ],
)
def test_crystal_models_match_file(name, n_expt, sg_number, sg_symbol):
    el = ExperimentList.from_file(FILES[name])
    raw = _raw(name)
    assert len(el) == n_expt
    for expt, rexp in zip(el, raw["experiment"]):
        rc = raw["crystal"][rexp["crystal"]]
        cryst = expt.crystal
        np.testing.assert_allclose(cryst.get_unit_cell().parameters(), _cell_from_raw(rc),
                                   rtol=1e-12)
        sg = cryst.get_space_group()
        assert sg.type().number() == sg_number
        assert sg.type().lookup_symbol() == sg_symbol
        assert sg.type().hall_symbol() == rc["space_group_hall_symbol"]
        # A = UB and A^-1 has rows a, b, c
        A = np.reshape(cryst.get_A(), (3, 3))
        R = np.array([rc["real_space_a"], rc["real_space_b"], rc["real_space_c"]])
        np.testing.assert_allclose(A @ R, np.eye(3), atol=1e-12)
        U, B = np.reshape(cryst.get_U(), (3, 3)), np.reshape(cryst.get_B(), (3, 3))
        np.testing.assert_allclose(U @ B, A, atol=1e-12)
        np.testing.assert_allclose(U @ U.T, np.eye(3), atol=1e-10)  # U is a rotation
        assert abs(B[0, 1]) < 1e-15 and abs(B[0, 2]) < 1e-15 and abs(B[1, 2]) < 1e-15


def test_l_cysteine_cell_and_scan_values():
    """Numbers read directly from 20_integrated_experiments.json."""
    (expt,) = ExperimentList.from_file(FILES["cys20_old"])
    # a,b,c = 5.48, 8.22, 12.15 A (data_and_formats.md, row 1), orthorhombic
    a, b, c, al, be, ga = expt.crystal.get_unit_cell().parameters()
    assert (round(a, 2), round(b, 2), round(c, 2)) == (5.48, 8.22, 12.15)
    assert max(abs(al - 90), abs(be - 90), abs(ga - 90)) < 1e-6
    assert expt.scan.get_image_range() == (1, 1800)
    assert expt.scan.get_array_range() == (0, 1800)
    assert expt.scan.get_oscillation() == (0.0, 0.1)
    assert expt.scan.get_oscillation_range() == pytest.approx((0.0, 180.0))
    assert expt.scan.get_angle_from_array_index(250) == pytest.approx(25.0, abs=1e-12)
    np.testing.assert_allclose(expt.scan.get_angle_from_array_index(np.array([0.0, 1.5])),
                               [0.0, 0.15], atol=1e-12)
    assert expt.scan.get_array_index_from_angle(25.0) == pytest.approx(250.0)
    assert expt.beam.get_wavelength() == 0.6889
    direction = np.array(_raw("cys20_old")["beam"][0]["direction"])
    np.testing.assert_allclose(expt.beam.get_s0(), -direction / np.linalg.norm(direction) / 0.6889,
                               rtol=1e-14)
    # scan-varying crystal: one A per scan point (image_range + 1)
    assert expt.crystal.get_num_scan_points() == 1801
    rawA = _raw("cys20_old")["crystal"][0]["A_at_scan_points"]
    assert expt.crystal.get_A_at_scan_point(900) == tuple(rawA[900])
    assert expt.crystal.get_A_at_scan_points().shape == (1801, 3, 3)
    cell900 = expt.crystal.get_unit_cell_at_scan_point(900).parameters()
    inv = np.linalg.inv(np.reshape(rawA[900], (3, 3)))
    assert cell900[0] == pytest.approx(np.linalg.norm(inv[0]), rel=1e-12)
    with pytest.raises(IndexError, match="scan point 1801"):
        expt.crystal.get_A_at_scan_point(1801)
    # goniometer: axis from file, fixed rotation from file
    raw_g = _raw("cys20_old")["goniometer"][0]
    np.testing.assert_allclose(expt.goniometer.get_rotation_axis(), raw_g["rotation_axis"],
                               rtol=1e-14)
    assert expt.goniometer.get_fixed_rotation() == tuple(raw_g["fixed_rotation"])
    assert expt.scaling_model is None
    assert expt.identifier == ""  # old files have no identifiers


def test_scaled_expt_scaling_model_and_identifier():
    el = ExperimentList.from_file(FILES["cys30_scaled"])
    expt = el[0]
    assert expt.identifier == "2"
    assert el.identifiers() == ["2"]
    sm = expt.scaling_model
    assert sm["__id__"] == "physical"
    assert sm["scale"]["n_parameters"] == 14 and len(sm["scale"]["parameters"]) == 14
    assert sm["configuration_parameters"]["s_norm_fac"] == pytest.approx(0.007051764705882354)
    assert expt.scan.get_valid_image_ranges("2") == [(1, 1700)]
    assert expt.scan.get_oscillation() == (-145.0, 0.1)
    # angle of frame z is osc0 + z * width for image_range starting at 1
    assert expt.scan.get_angle_from_array_index(1700) == pytest.approx(25.0)
    assert expt.scan.get_oscillation(deg=False)[1] == pytest.approx(math.radians(0.1))


def test_quartz_electron_beam_and_model():
    (expt,) = ExperimentList.from_file(FILES["quartz"])
    assert expt.beam.get_wavelength() == pytest.approx(0.02508)
    a, b, c, al, be, ga = expt.crystal.get_unit_cell().parameters()
    assert (round(a, 3), round(c, 3), round(ga, 3)) == (4.925, 5.401, 120.0)
    assert expt.scan.get_image_range() == (1, 100)
    assert expt.scan.get_oscillation() == (-50.0, 1.0)
    assert expt.scaling_model["configuration_parameters"]["error_model_parameters"][0] == \
        pytest.approx(2.6806589628976236)
    panel = expt.detector[0]
    assert panel.get_image_size() == (1024, 1024)
    assert panel.get_pixel_size() == (0.026, 0.026)
    assert panel.get_distance() == pytest.approx(280.0)  # origin z = -280, normal -z


def test_stills_have_no_scan_and_five_crystals():
    el = ExperimentList.from_file(FILES["ssx"])
    assert len(el) == 5 and len(el.crystals()) == 5
    assert all(e.scan is None and e.goniometer is None and e.is_still() for e in el)
    assert len(set(el.identifiers())) == 5
    assert el.select_on_experiment_identifiers([el[3].identifier])[0] is el[3]
    with pytest.raises(KeyError, match="not-there"):
        el.select_on_experiment_identifiers(["not-there"])


def test_unit_cell_d_scalar_and_array_agree_with_gemmi():
    (expt,) = ExperimentList.from_file(FILES["quartz"])
    uc = expt.crystal.get_unit_cell()
    g = gemmi.UnitCell(*uc.parameters())
    hkl = np.array([[1, 0, 0], [1, 2, 3], [-2, 1, -4], [0, 0, 1]])
    d = uc.d(hkl)
    assert isinstance(d, np.ndarray) and d.shape == (4,)
    np.testing.assert_allclose(d, [g.calculate_d(list(map(int, h))) for h in hkl], rtol=1e-12)
    assert isinstance(uc.d((1, 2, 3)), float)
    assert uc.d((1, 0, 0)) == pytest.approx(4.925 * math.sqrt(3) / 2, rel=1e-3)


def test_multi_axis_goniometer_rotations():
    """F = product of axes inside the scan axis, S = outside; axis = S * axes[scan_axis]."""
    g = Goniometer({"axes": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "angles": [30.0, 0.0, 90.0],
                    "names": ["PHI", "CHI", "OMEGA"], "scan_axis": 1})
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    np.testing.assert_allclose(np.reshape(g.get_fixed_rotation(), (3, 3)),
                               [[1, 0, 0], [0, c, -s], [0, s, c]], atol=1e-15)
    np.testing.assert_allclose(np.reshape(g.get_setting_rotation(), (3, 3)),
                               [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(g.get_rotation_axis(), [-1, 0, 0], atol=1e-15)
    assert g.get_rotation_axis_datum() == (0.0, 1.0, 0.0)
    assert g.get_names() == ["PHI", "CHI", "OMEGA"] and g.get_scan_axis() == 1


def test_narrow_wedge_multi_axis_file():
    (expt,) = ExperimentList.from_file(FILES["wedge11"])
    g = expt.goniometer
    assert g.is_multi_axis() and g.get_scan_axis() == 1
    np.testing.assert_allclose(g.get_rotation_axis(), [1, 0, 0], atol=1e-15)  # omega
    np.testing.assert_allclose(np.reshape(g.get_fixed_rotation(), (3, 3)), np.eye(3),
                               atol=1e-15)  # phi angle is 0
    assert expt.scan.get_image_range() == (1, 10)


def test_shared_models_written_once(tmp_path):
    el = ExperimentList.from_file(FILES["cys30_scaled"])
    e = el[0]
    from xtalscale.experiments import Experiment

    clone = Experiment(beam=e.beam, detector=e.detector, goniometer=e.goniometer, scan=e.scan,
                       crystal=e.crystal, identifier="second")
    el.append(clone)
    d = el.to_dict()
    assert len(d["beam"]) == 1 and len(d["crystal"]) == 1
    assert [x["crystal"] for x in d["experiment"]] == [0, 0]
    with pytest.raises(ValueError, match="duplicate"):
        el.append(Experiment(identifier="second"))


def test_scan_from_dict_and_bad_scan():
    s = Scan({"image_range": [11, 20], "oscillation": [5.0, 0.5]})
    assert s.get_array_range() == (10, 20)
    assert s.get_angle_from_array_index(10) == 5.0
    assert s.get_batch_range() == (11, 20)
    with pytest.raises(ValueError, match="image_range"):
        Scan({"image_range": [20, 11], "oscillation": [5.0, 0.5]})


# ------------------------------------------------------------------ bad input


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.expt"):
        ExperimentList.from_file(tmp_path / "nope.expt")


def test_truncated_file(tmp_path):
    text = FILES["wedge11"].read_text()
    bad = tmp_path / "truncated.expt"
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated.expt.*not a valid JSON"):
        ExperimentList.from_file(bad)


def test_binary_garbage(tmp_path):
    bad = tmp_path / "garbage.expt"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.expt"):
        ExperimentListFactory.from_json_file(bad)


def _write(tmp_path, data, name="bad.expt"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_model_index_out_of_range(tmp_path):
    d = _raw("wedge11")
    d["experiment"][0]["crystal"] = 3
    with pytest.raises(ValueError, match="bad.expt: experiment\\[0\\] refers to crystal 3"):
        ExperimentList.from_file(_write(tmp_path, d))


def test_missing_required_crystal_key(tmp_path):
    d = _raw("wedge11")
    del d["crystal"][0]["real_space_b"]
    with pytest.raises(ValueError, match="crystal\\[0\\]: crystal is missing required key "
                                         "'real_space_b'"):
        ExperimentList.from_file(_write(tmp_path, d))


def test_bad_vector_and_hall_symbol(tmp_path):
    d = _raw("wedge11")
    d["beam"][0]["direction"] = [0.0, 1.0]
    with pytest.raises(ValueError, match="beam\\[0\\]: beam.direction must have 3 elements"):
        ExperimentList.from_file(_write(tmp_path, d))
    d = _raw("wedge11")
    d["crystal"][0]["space_group_hall_symbol"] = " Q 9 9"
    with pytest.raises(ValueError, match="crystal\\[0\\]: invalid Hall symbol"):
        ExperimentList.from_file(_write(tmp_path, d))
    d = _raw("wedge11")
    d["beam"][0]["wavelength"] = float("nan")
    with pytest.raises(ValueError, match="wavelength must be positive"):
        ExperimentList.from_file(_write(tmp_path, d))


def test_not_an_experiment_list(tmp_path):
    with pytest.raises(ValueError, match="no 'experiment' list"):
        ExperimentList.from_file(_write(tmp_path, {"hello": 1}))


def test_duplicate_identifiers_rejected(tmp_path):
    d = _raw("ssx")
    d["experiment"][1]["identifier"] = d["experiment"][0]["identifier"]
    with pytest.raises(ValueError, match="duplicate experiment identifier"):
        ExperimentList.from_file(_write(tmp_path, d))


def test_identifiers_match_reflection_table_and_mismatch_is_reported(tmp_path):
    """Integration with the reflection table: the quartz .refl/.expt pair is consistent;
    an experiment list whose identifier differs is rejected with both names."""
    from xtalscale.array_family import flex

    refl = DATA / "dials_quartz_3ded" / "scaled.refl"
    if not refl.exists():
        pytest.skip("scaled.refl not shipped")
    table = flex.reflection_table.from_file(refl)
    el = ExperimentList.from_file(FILES["quartz"])
    table.assert_experiment_identifiers_are_consistent(el)
    d = _raw("quartz")
    d["experiment"][0]["identifier"] = "not-the-same"
    other = ExperimentList.from_file(_write(tmp_path, d))
    with pytest.raises(ValueError, match="not-the-same"):
        table.assert_experiment_identifiers_are_consistent(other)


def test_scan_properties_table_format():
    """Newer dxtbx files keep per-image start angles in scan['properties']."""
    s = Scan({"image_range": [1, 3], "batch_offset": 0,
              "properties": {"oscillation": [10.0, 10.5, 11.0], "epochs": [1.0, 2.0, 3.0],
                             "exposure_time": [0.1, 0.1, 0.1]}})
    assert s.get_oscillation() == (10.0, 0.5)
    assert s.get_angle_from_array_index(2) == 11.0
    np.testing.assert_array_equal(s.get_epochs(), [1.0, 2.0, 3.0])
    one = Scan({"image_range": [5, 5], "properties": {"oscillation": [3.0],
                                                      "oscillation_width": [0.2]}})
    assert one.get_oscillation() == (3.0, 0.2)
    assert one.to_dict()["properties"]["oscillation"] == [3.0]  # written back unchanged


def test_dxtbx_import_paths():
    """A DIALS script's dxtbx imports work with only the package prefix changed."""
    from xtalscale.dxtbx.model import Crystal as C2
    from xtalscale.dxtbx.model import ExperimentList as EL2
    from xtalscale.dxtbx.serialize import load

    el = load.experiment_list(str(FILES["wedge11"]), check_format=False)
    assert isinstance(el, EL2) and isinstance(el[0].crystal, C2)
    assert EL2 is ExperimentList


def test_ragged_scan_points_are_reported(tmp_path):
    d = _raw("quartz")
    d["crystal"][0]["A_at_scan_points"][5] = d["crystal"][0]["A_at_scan_points"][5][:8]
    with pytest.raises(ValueError, match="bad.expt: crystal\\[0\\]: crystal.A_at_scan_points "
                                         "must be a list of 9-element"):
        ExperimentList.from_file(_write(tmp_path, d))


# ----------------------------------------------------------------------------- .expt writer
def test_expt_written_one_model_per_line_and_read_back_without_sharing(tmp_path):
    """The file is the models' own dicts (written without a deep copy), one model per line;
    reading it back copies, so the result shares nothing with the decoded dict."""
    experiments = ExperimentList.from_file(str(FILES["cys20_old"]))
    text = experiments.as_json()
    assert json.loads(text) == experiments.to_dict()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert '  "crystal": [' in lines
    crystal_line = lines[lines.index('  "crystal": [') + 1]
    assert json.loads(crystal_line) == experiments.to_dict()["crystal"][0]  # one line, whole
    assert json.loads(experiments.as_json(compact=True)) == experiments.to_dict()
    data = json.loads(text)
    copy = ExperimentListFactory.from_dict(data)  # the public from_dict still copies
    data["crystal"][0]["A_at_scan_points"][0][0] = 123.0
    assert copy.as_json() == text
