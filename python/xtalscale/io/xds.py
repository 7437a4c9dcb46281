"""XDS ``INTEGRATE.HKL`` and ``XDS_ASCII.HKL`` readers (geometry from the header).

The records are parsed in one vectorised pass (numpy); the header gives the models:

* beam: ``X-RAY_WAVELENGTH`` and ``INCIDENT_BEAM_DIRECTION`` (dxtbx ``direction`` points
  towards the source, so it is the negated XDS incident direction: s0 = incident / λ);
* goniometer: ``ROTATION_AXIS``;
* scan: ``DATA_RANGE`` (or the frames spanned by the data), ``STARTING_FRAME``,
  ``STARTING_ANGLE``, ``OSCILLATION_RANGE``; XDS frame coordinate ZD equals the DIALS array
  index z (image k spans [k-1, k) in both), so ``phi = start + (z - first + 1) * width``;
* crystal: ``UNIT_CELL_A/B/C-AXIS`` (real-space vectors) and ``SPACE_GROUP_NUMBER``;
* detector: one panel from ``NX NY QX QY ORGX ORGY DETECTOR_DISTANCE`` and the detector
  axes (origin = F·N − ORGX·QX·X − ORGY·QY·Y).

All vectors stay in XDS's laboratory frame (a rigid rotation away from DIALS's frame);
angles between them, and hence everything scaling needs, are frame independent.

Table columns: ``miller_index``, ``intensity.prf.*`` (INTEGRATE: profile-fitted IOBS) or
``intensity.sum.*`` (XDS_ASCII: corrected IOBS, so ``lp`` = 1), ``xyzobs.px.value`` (and
``xyzcal.px.value`` for INTEGRATE), ``phi``, ``partiality`` (PEAK/100 for INTEGRATE),
``d``, ``id`` = 0, ``flags``. XDS marks rejected reflections by SIGMA < 0: such rows are
kept but get no ``integrated`` flag.
"""
from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..experiments import Beam, Crystal, Detector, Experiment, ExperimentList, Goniometer, Scan
from ..symmetry import SpaceGroup, UnitCell

__all__ = ["XdsFormatError", "XdsData", "read_xds_hkl", "read_integrate_hkl",
           "read_xds_ascii"]

# INTEGRATE.HKL item order when the file lists them only in a comment
_INTEGRATE_ITEMS = ["H", "K", "L", "IOBS", "SIGMA", "XCAL", "YCAL", "ZCAL", "RLP", "PEAK",
                    "CORR", "MAXC", "XOBS", "YOBS", "ZOBS", "ALF0", "BET0", "ALF1", "BET1",
                    "PSI", "ISEG"]
_KEY = r"[A-Z][A-Z0-9_\-\.\(\)',]*"
_PAIR = re.compile(rf"({_KEY})=\s*(.*?)(?=\s+{_KEY}=|\s*$)")


class XdsFormatError(ValueError):
    """An XDS file is unreadable, truncated or inconsistent (names the file and problem)."""


@dataclass
class XdsData:
    """Result of :func:`read_xds_hkl`."""

    table: Any
    experiments: ExperimentList
    header: dict
    kind: str  # 'integrate' or 'xds_ascii'


def _parse_header(lines: list[str]) -> dict:
    header: dict[str, str] = {}
    for line in lines:
        for key, value in _PAIR.findall(line[1:]):
            header.setdefault(key, value.strip())
    return header


def _floats(header: dict, key: str, n: int, path: str, required: bool = True):
    if key not in header:
        if required:
            raise XdsFormatError(f"{path}: header is missing {key}")
        return None
    try:
        vals = [float(x) for x in header[key].split()[:n]]
    except ValueError:
        raise XdsFormatError(f"{path}: header {key} is not numeric: {header[key]!r}") from None
    if len(vals) != n or not all(np.isfinite(vals)):
        raise XdsFormatError(f"{path}: header {key} needs {n} finite numbers, "
                             f"got {header[key]!r}")
    return vals


# Frame numbers and detector sizes beyond these are not real data (and would make
# scans or panels of absurd size).
_MAX_FRAME = 10**8
_MAX_PIXELS = 10**6
_MAX_INDEX = (1 << 20) - 1  # symmetry.miller_array's bound


def _integer(header: dict, key: str, path: str, lo: int, hi: int, default=None) -> int:
    """An integral header value within [lo, hi] (XdsFormatError naming the key if not)."""
    if key not in header and default is not None:
        return default
    (value,) = _floats(header, key, 1, path)
    if value != int(value) or not lo <= value <= hi:
        raise XdsFormatError(f"{path}: header {key}={header[key]!r} must be an integer in "
                             f"{lo}..{hi}")
    return int(value)


def _check_indices(cols: dict, path: str) -> None:
    """H K L must be integers within the Miller-index bound (names the record)."""
    for name in ("H", "K", "L"):
        v = cols[name]
        bad = (np.abs(v) > _MAX_INDEX) | (v != np.round(v))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise XdsFormatError(f"{path}: record {i + 1}: {name}={v[i]:g} is not an integer "
                                 f"within +-{_MAX_INDEX}")


def read_xds_hkl(filename) -> XdsData:
    """Read ``INTEGRATE.HKL`` or ``XDS_ASCII.HKL`` (detected from the header).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    XdsFormatError (ValueError)
        For a missing header/end marker (truncated file), a record with the wrong number
        of items or a non-numeric value (the line number is given), or missing header
        geometry.
    """
    path = os.fspath(filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"XDS file not found: {path}")
    with open(path, "rb") as fh:
        # a device or pipe (/dev/zero) would be read until memory runs out
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise XdsFormatError(f"{path}: not a regular file")
        raw = fh.read()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise XdsFormatError(f"{path}: not an XDS text file (non-ASCII byte at {exc.start})") \
            from None
    lines = text.splitlines()
    try:
        end_header = next(i for i, line in enumerate(lines) if line.startswith("!END_OF_HEADER"))
    except StopIteration:
        raise XdsFormatError(f"{path}: no !END_OF_HEADER line (not an XDS reflection file?)") \
            from None
    try:
        end_data = next(i for i in range(len(lines) - 1, end_header, -1)
                        if lines[i].startswith("!END_OF_DATA"))
    except StopIteration:
        raise XdsFormatError(f"{path}: no !END_OF_DATA line: the file is truncated") from None
    header_lines = [x for x in lines[:end_header] if x.startswith("!")]
    header = _parse_header(header_lines)
    first = header_lines[0] if header_lines else ""
    if "XDS_ASCII" in first or "FORMAT=XDS_ASCII" in first:
        kind = "xds_ascii"
        if header.get("MERGE", "FALSE").upper() == "TRUE":
            raise XdsFormatError(f"{path}: merged XDS_ASCII (MERGE=TRUE) is not supported")
        items = _ascii_items(header, path)
    elif "INTEGRATE" in " ".join(header_lines[:3]):
        kind = "integrate"
        items = _INTEGRATE_ITEMS
        n_items = _integer(header, "NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD", path, 1, 1000,
                           default=len(items))
        if n_items != len(items):
            raise XdsFormatError(f"{path}: expected {len(items)} items per INTEGRATE record, "
                                 f"header says {n_items}")
    else:
        raise XdsFormatError(f"{path}: neither XDS_ASCII nor INTEGRATE header")
    body = [x for x in lines[end_header + 1:end_data] if x.strip() and not x.startswith("!")]
    data = _parse_records(body, len(items), end_header + 2, path)
    cols = {name: data[:, i] for i, name in enumerate(items)}
    _check_indices(cols, path)
    experiments = _experiments(header, cols, kind, path)
    table = _table(cols, kind, experiments)
    return XdsData(table, experiments, header, kind)


read_integrate_hkl = read_xds_hkl
read_xds_ascii = read_xds_hkl


def _ascii_items(header: dict, path: str) -> list[str]:
    n = _integer(header, "NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD", path, 1, 1000)
    pos = {}
    for key, value in header.items():
        if key.startswith("ITEM_"):
            try:
                pos[int(value)] = key[5:]
            except ValueError:
                raise XdsFormatError(f"{path}: bad item position {key}={value!r}") from None
    if n <= 0 or sorted(pos) != list(range(1, n + 1)):
        raise XdsFormatError(f"{path}: ITEM_ positions do not cover 1..{n}")
    items = [pos[i] for i in range(1, n + 1)]
    for need in ("H", "K", "L", "IOBS", "SIGMA(IOBS)", "ZD"):
        if need not in items:
            raise XdsFormatError(f"{path}: XDS_ASCII record lacks required item {need}")
    return ["SIGMA" if x == "SIGMA(IOBS)" else x for x in items]


def _parse_records(body: list[str], n_items: int, first_line_no: int, path: str) -> np.ndarray:
    """Parse the data records with numpy's C reader, which checks every line's length."""
    if not body:
        return np.zeros((0, n_items))
    try:
        data = np.loadtxt(io.StringIO("\n".join(body)), dtype=np.float64, ndmin=2)
    except ValueError as exc:
        # numpy names the offending row; re-check to give the record and its text
        for i, line in enumerate(body):
            parts = line.split()
            if len(parts) != n_items:
                raise XdsFormatError(f"{path}: record {i + 1} has {len(parts)} items, "
                                     f"expected {n_items}: {line.strip()[:80]!r}") from None
            try:
                [float(x) for x in parts]
            except ValueError:
                raise XdsFormatError(f"{path}: record {i + 1} is not numeric: "
                                     f"{line.strip()[:80]!r}") from None
        raise XdsFormatError(f"{path}: unreadable records ({exc})") from None
    if data.shape[1] != n_items:
        raise XdsFormatError(f"{path}: records have {data.shape[1]} items, expected {n_items}")
    if not np.all(np.isfinite(data)):
        i = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
        raise XdsFormatError(f"{path}: record {i + 1} has a non-finite value")
    return data


def _experiments(header: dict, cols: dict, kind: str, path: str) -> ExperimentList:
    sg_num = header.get("SPACE_GROUP_NUMBER")
    if sg_num is None:
        raise XdsFormatError(f"{path}: header is missing SPACE_GROUP_NUMBER")
    try:
        sg = SpaceGroup(int(sg_num))
    except ValueError as exc:
        raise XdsFormatError(f"{path}: bad SPACE_GROUP_NUMBER {sg_num!r} ({exc})") from None
    cell = _floats(header, "UNIT_CELL_CONSTANTS", 6, path)
    wavelength = _floats(header, "X-RAY_WAVELENGTH", 1, path)[0]
    incident = np.array(_floats(header, "INCIDENT_BEAM_DIRECTION", 3, path))
    axis = _floats(header, "ROTATION_AXIS", 3, path)
    osc = _floats(header, "OSCILLATION_RANGE", 1, path)[0]
    if not 0 < osc <= 360:
        raise XdsFormatError(f"{path}: header OSCILLATION_RANGE={header['OSCILLATION_RANGE']!r}"
                             " must be in (0, 360] degrees")
    start_angle = _floats(header, "STARTING_ANGLE", 1, path)[0]
    start_frame = _integer(header, "STARTING_FRAME", path, -_MAX_FRAME, _MAX_FRAME)
    if "DATA_RANGE" in header:
        first, last = _floats(header, "DATA_RANGE", 2, path)
        if not (first == int(first) and last == int(last)
                and -_MAX_FRAME <= first <= last <= _MAX_FRAME):
            raise XdsFormatError(f"{path}: header DATA_RANGE={header['DATA_RANGE']!r} must be "
                                 f"two integer frames first <= last within +-{_MAX_FRAME}")
        first, last = int(first), int(last)
    else:
        z = cols["ZCAL"] if "ZCAL" in cols else cols["ZD"]
        if len(z) and not np.all(np.abs(z) <= _MAX_FRAME):
            i = int(np.flatnonzero(~(np.abs(z) <= _MAX_FRAME))[0])
            raise XdsFormatError(f"{path}: record {i + 1}: frame coordinate {z[i]:g} is "
                                 f"beyond +-{_MAX_FRAME}")
        first = int(np.floor(z.min())) + 1 if len(z) else start_frame
        last = max(int(np.ceil(z.max())), first) if len(z) else start_frame
    real = [_floats(header, f"UNIT_CELL_{x}-AXIS", 3, path, required=False) for x in "ABC"]
    if any(r is None for r in real):
        # no orientation: a cell-aligned crystal (enough for symmetry and d-spacings)
        B = UnitCell(cell).B_matrix()
        real = np.linalg.inv(B).tolist()
    else:
        got = UnitCell(_cell_of(np.array(real)))
        if not got.is_similar_to(UnitCell(cell), 0.02, 2.0):
            raise XdsFormatError(f"{path}: UNIT_CELL_A/B/C-AXIS {got} disagree with "
                                 f"UNIT_CELL_CONSTANTS {cell}")
    crystal = Crystal({"__id__": "crystal", "real_space_a": list(real[0]),
                       "real_space_b": list(real[1]), "real_space_c": list(real[2]),
                       "space_group_hall_symbol": sg.hall_symbol()})
    norm = float(np.linalg.norm(incident))
    if not norm > 0:
        raise XdsFormatError(f"{path}: INCIDENT_BEAM_DIRECTION is zero")
    beam = Beam({"direction": (-incident / norm).tolist(), "wavelength": wavelength})
    scan = Scan({"image_range": [first, last],
                 "oscillation": [start_angle + (first - start_frame) * osc, osc]})
    gonio = Goniometer({"rotation_axis": axis})
    experiments = ExperimentList()
    experiments.append(Experiment(beam=beam, detector=_detector(header, path), goniometer=gonio,
                                  scan=scan, crystal=crystal, identifier="0"))
    return experiments


def _cell_of(real: np.ndarray) -> tuple:
    a, b, c = real
    la, lb, lc = (float(np.linalg.norm(v)) for v in real)
    ang = lambda u, v, x, y: float(np.degrees(np.arccos(np.clip(u @ v / (x * y), -1, 1))))
    return (la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb))


def _detector(header: dict, path: str) -> Detector | None:
    keys = ("NX", "NY", "QX", "QY", "ORGX", "ORGY", "DETECTOR_DISTANCE")
    if any(k not in header for k in keys):
        return None  # geometry not recorded: leave the detector out rather than invent it
    nx = _integer(header, "NX", path, 1, _MAX_PIXELS)
    ny = _integer(header, "NY", path, 1, _MAX_PIXELS)
    (qx,), (qy,) = _floats(header, "QX", 1, path), _floats(header, "QY", 1, path)
    (orgx,), (orgy,) = _floats(header, "ORGX", 1, path), _floats(header, "ORGY", 1, path)
    (dist,) = _floats(header, "DETECTOR_DISTANCE", 1, path)
    if not (qx > 0 and qy > 0):
        raise XdsFormatError(f"{path}: header pixel sizes QX={header['QX']!r}, "
                             f"QY={header['QY']!r} must be > 0")
    X = np.array(_floats(header, "DIRECTION_OF_DETECTOR_X-AXIS", 3, path))
    Y = np.array(_floats(header, "DIRECTION_OF_DETECTOR_Y-AXIS", 3, path))
    N = np.cross(X, Y)
    origin = dist * N - orgx * qx * X - orgy * qy * Y
    panel = {"name": "Panel", "type": "SENSOR_PAD", "fast_axis": X.tolist(),
             "slow_axis": Y.tolist(), "origin": origin.tolist(), "image_size": [nx, ny],
             "pixel_size": [qx, qy], "trusted_range": [0.0, _optional(header, "OVERLOAD", path)],
             "thickness": _optional(header, "SENSOR_THICKNESS", path)}
    return Detector({"panels": [panel]})


def _optional(header: dict, key: str, path: str) -> float:
    """A finite optional header number, 0 when absent."""
    return _floats(header, key, 1, path)[0] if key in header else 0.0


def _table(cols: dict, kind: str, experiments: ExperimentList):
    from ..reflection_table import Flags, reflection_table

    n = len(cols["H"])
    hkl = np.column_stack([cols["H"], cols["K"], cols["L"]]).astype(np.int32)
    expt = experiments[0]
    table = reflection_table()
    table["miller_index"] = hkl
    table["id"] = np.zeros(n, dtype=np.int32)
    sigma = cols["SIGMA"]
    prefix = "intensity.prf" if kind == "integrate" else "intensity.sum"
    table[f"{prefix}.value"] = cols["IOBS"].copy()
    table[f"{prefix}.variance"] = sigma ** 2
    if kind == "integrate":
        table["xyzcal.px.value"] = np.column_stack([cols["XCAL"], cols["YCAL"], cols["ZCAL"]])
        observed = (cols["XOBS"] != 0) | (cols["YOBS"] != 0) | (cols["ZOBS"] != 0)
        # unobserved centroids (written as 0 0 0) fall back to the calculated position
        xyz = np.where(observed[:, None],
                       np.column_stack([cols["XOBS"], cols["YOBS"], cols["ZOBS"]]),
                       np.column_stack([cols["XCAL"], cols["YCAL"], cols["ZCAL"]]))
        table["xyzobs.px.value"] = xyz
        table["partiality"] = cols["PEAK"] / 100.0
        table["profile.correlation"] = cols["CORR"] / 100.0
        table["panel"] = np.maximum(cols["ISEG"] - 1, 0).astype(np.uint64)
    else:
        table["xyzobs.px.value"] = np.column_stack([cols["XD"], cols["YD"], cols["ZD"]])
        table["partiality"] = np.ones(n)
        if "PEAK" in cols:
            table["peak"] = cols["PEAK"] / 100.0
        if "CORR" in cols:
            table["profile.correlation"] = cols["CORR"] / 100.0
    if "RLP" in cols:
        table["rlp"] = cols["RLP"]
    if "PSI" in cols:
        table["psi"] = cols["PSI"]
    table["lp"] = np.ones(n)  # XDS intensities are already Lorentz-polarisation corrected
    z = np.asarray(table["xyzobs.px.value"])[:, 2]
    table["phi"] = np.asarray(expt.scan.get_angle_from_array_index(z), dtype=np.float64)
    table["d"] = expt.crystal.get_unit_cell().d(hkl) if n else np.zeros(0)
    flags = np.zeros(n, dtype=np.uint64)
    bit = Flags.integrated_prf if kind == "integrate" else Flags.integrated_sum
    flags[sigma > 0] |= np.uint64(int(bit))
    table["flags"] = flags
    table.experiment_identifiers()[0] = expt.identifier
    return table
