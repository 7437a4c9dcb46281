"""XDS INTEGRATE.HKL / XDS_ASCII.HKL readers on the HEWL snippets in tests/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xtalscale.io.xds import XdsFormatError, read_xds_hkl

DATA = Path(__file__).resolve().parents[1] / "data" / "xds_hewl_ssad_snippets"
ASCII = DATA / "XDS_ASCII.HKL"
INTEGRATE = DATA / "INTEGRATE.HKL"


def _records(path):
    """Independent plain-Python parse of the data records (reference for the tests)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("!") or not line.strip():
            continue
        rows.append([float(x) for x in line.split()])
    return np.array(rows)


def test_xds_ascii_rows_columns_and_values():
    r = read_xds_hkl(ASCII)
    ref = _records(ASCII)
    t = r.table
    assert r.kind == "xds_ascii" and len(t) == 453 == len(ref)
    np.testing.assert_array_equal(np.asarray(t["miller_index"]), ref[:, :3].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(t["intensity.sum.value"]), ref[:, 3])
    np.testing.assert_array_equal(np.asarray(t["intensity.sum.variance"]), ref[:, 4] ** 2)
    np.testing.assert_array_equal(np.asarray(t["xyzobs.px.value"]), ref[:, 5:8])
    # 41 records carry SIGMA < 0 (XDS rejection): kept, but not flagged as integrated
    flagged = np.asarray(t["flags"]) > 0
    assert (ref[:, 4] < 0).sum() == 41 and flagged.sum() == 412
    np.testing.assert_array_equal(flagged, ref[:, 4] > 0)
    # phi from the frame coordinate: 0.0 + ZD * 0.5 deg
    np.testing.assert_allclose(np.asarray(t["phi"]), ref[:, 7] * 0.5, rtol=1e-15)


def test_xds_ascii_header_geometry():
    e = read_xds_hkl(ASCII).experiments[0]
    assert e.crystal.get_space_group().type().number() == 96  # P 43 21 2
    np.testing.assert_allclose(e.crystal.get_unit_cell().parameters(),
                               (79.336, 79.336, 37.797, 90, 90, 90), atol=2e-3)
    assert e.beam.get_wavelength() == 1.892
    # s0 = incident direction / wavelength
    inc = np.array([0.004215, -0.006992, 0.999967])
    np.testing.assert_allclose(e.beam.get_s0(), inc / np.linalg.norm(inc) / 1.892, rtol=1e-12)
    assert e.scan.get_image_range() == (1, 1439)
    assert e.scan.get_oscillation() == (0.0, 0.5)
    np.testing.assert_allclose(e.goniometer.get_rotation_axis(),
                               np.array([0.999994, 0.003061, -0.001524]) / np.linalg.norm(
                                   [0.999994, 0.003061, -0.001524]), rtol=1e-12)
    panel = e.detector[0]
    assert panel.get_image_size() == (2463, 2527)
    assert panel.get_pixel_size() == (0.172, 0.172)
    assert panel.get_distance() == pytest.approx(149.766, abs=1e-9)
    # origin = F N - ORGX QX X - ORGY QY Y
    np.testing.assert_allclose(panel.get_origin(), (-1305.18 * 0.172, -1695.69 * 0.172, 149.766),
                               rtol=1e-12)
    # the beam hits the detector near (ORGX, ORGY), offset by the beam tilt (~0.63 mm)
    x, y = panel.get_beam_centre(e.beam.get_s0())
    assert x == pytest.approx(1305.18 * 0.172 + 149.766 * 0.004215 / 0.999967, abs=1e-6)
    assert y == pytest.approx(1695.69 * 0.172 - 149.766 * 0.006992 / 0.999967, abs=1e-6)


def test_integrate_hkl_rows_and_geometry():
    r = read_xds_hkl(INTEGRATE)
    ref = _records(INTEGRATE)
    t = r.table
    assert r.kind == "integrate" and len(t) == 468 == len(ref)
    np.testing.assert_array_equal(np.asarray(t["intensity.prf.value"]), ref[:, 3])
    np.testing.assert_array_equal(np.asarray(t["xyzcal.px.value"]), ref[:, 5:8])
    np.testing.assert_allclose(np.asarray(t["partiality"]), ref[:, 9] / 100.0, rtol=1e-15)
    # unobserved centroids (XOBS = YOBS = ZOBS = 0) fall back to the calculated position
    unobserved = (ref[:, 12:15] == 0).all(axis=1)
    assert unobserved.sum() > 0
    xyz = np.asarray(t["xyzobs.px.value"])
    np.testing.assert_array_equal(xyz[unobserved], ref[unobserved, 5:8])
    np.testing.assert_array_equal(xyz[~unobserved], ref[~unobserved, 12:15])
    e = r.experiments[0]
    assert e.beam.get_wavelength() == 1.892
    assert e.scan.get_oscillation()[1] == 0.5
    # no DATA_RANGE in INTEGRATE.HKL: frames spanned by ZCAL (image k spans [k-1, k))
    first, last = e.scan.get_image_range()
    assert first == int(np.floor(ref[:, 7].min())) + 1 and last == int(np.ceil(ref[:, 7].max()))
    assert e.scan.get_oscillation()[0] == pytest.approx((first - 1) * 0.5)
    assert e.detector[0].get_distance() == pytest.approx(150.0)
    np.testing.assert_allclose(e.crystal.get_unit_cell().parameters()[:3],
                               (79.395, 79.395, 37.840), atol=2e-3)
    np.testing.assert_allclose(np.asarray(t["phi"]), xyz[:, 2] * 0.5, rtol=1e-12)


# ------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.HKL"):
        read_xds_hkl(tmp_path / "gone.HKL")


def test_truncated_file_has_no_end_marker(tmp_path):
    text = ASCII.read_text()
    bad = tmp_path / "cut.HKL"
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(XdsFormatError, match="cut.HKL: no !END_OF_DATA line: the file is "
                                             "truncated"):
        read_xds_hkl(bad)


def test_short_record_is_named(tmp_path):
    lines = ASCII.read_text().splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith("!END_OF_HEADER")) + 3
    lines[i] = " ".join(lines[i].split()[:7])
    bad = tmp_path / "short.HKL"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(XdsFormatError, match="short.HKL: record 3 has 7 items, expected 12"):
        read_xds_hkl(bad)


def test_non_numeric_record(tmp_path):
    lines = INTEGRATE.read_text().splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith("!END_OF_HEADER")) + 5
    parts = lines[i].split()
    parts[3] = "1.0E+0x"
    lines[i] = " ".join(parts)
    bad = tmp_path / "garbled.HKL"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(XdsFormatError, match="garbled.HKL: record 5 is not numeric"):
        read_xds_hkl(bad)


def test_missing_header_geometry(tmp_path):
    text = ASCII.read_text().replace("!X-RAY_WAVELENGTH=  1.892000\n", "")
    bad = tmp_path / "nowl.HKL"
    bad.write_text(text)
    with pytest.raises(XdsFormatError, match="nowl.HKL: header is missing X-RAY_WAVELENGTH"):
        read_xds_hkl(bad)


def test_not_an_xds_file(tmp_path):
    bad = tmp_path / "random.HKL"
    bad.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(XdsFormatError, match="random.HKL"):
        read_xds_hkl(bad)
    bad.write_text("1 2 3 4\n5 6 7 8\n")
    with pytest.raises(XdsFormatError, match="random.HKL: no !END_OF_HEADER"):
        read_xds_hkl(bad)


def test_compensating_record_lengths_are_caught(tmp_path):
    """One short and one long record (same total token count) must not shift columns."""
    lines = ASCII.read_text().splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith("!END_OF_HEADER")) + 1
    a, b = lines[i].split(), lines[i + 1].split()
    lines[i], lines[i + 1] = " ".join(a[:-1]), " ".join(b + [a[-1]])
    bad = tmp_path / "shifted.HKL"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(XdsFormatError, match="shifted.HKL: record 1 has 11 items, expected 12"):
        read_xds_hkl(bad)
