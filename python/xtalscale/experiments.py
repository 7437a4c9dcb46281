"""Experiment models (dxtbx-like) and ``ExperimentList`` I/O for DIALS ``.expt`` files.

Reads modern ``.expt`` and old ``*_experiments.json`` files (both are the same JSON
layout: an ``experiment`` list whose entries index into top-level ``beam``,
``detector``, ``goniometer``, ``scan``, ``crystal``, ``profile``, ``imageset`` and
``scaling_model`` lists).

Design: every model keeps the JSON dict it was read from as its single source of truth
(getters compute from it, setters write into it). Writing a list back therefore
preserves every key it read, including ones this package does not interpret, and
values round-trip bit-for-bit. Models shared between experiments (same index in the
file) are shared objects here, and are written back once.
"""
from __future__ import annotations

import copy
import json
import math
import os
import stat
from typing import Any, Iterable, Iterator

import numpy as np

from .symmetry import SpaceGroup, UnitCell, space_group_from_hall

__all__ = [
    "Beam",
    "Panel",
    "Detector",
    "Goniometer",
    "Scan",
    "Crystal",
    "Experiment",
    "ExperimentList",
    "ExperimentListFactory",
]

_MODEL_KEYS = ("beam", "detector", "goniometer", "scan", "crystal", "profile",
               "imageset", "scaling_model")


class ExperimentFormatError(ValueError):
    """An experiment file is unreadable or inconsistent (message names file and problem)."""


def _vec(value, name: str, n: int = 3) -> np.ndarray:
    """Validate a length-n finite numeric vector taken from a model dict."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} elements, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return a


def _mat3(value, name: str) -> np.ndarray:
    return _vec(value, name, 9).reshape(3, 3)


def _tuple(a) -> tuple:
    return tuple(float(x) for x in np.asarray(a).ravel())


def _unit(v: np.ndarray, name: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not n > 0:
        raise ValueError(f"{name} must be a non-zero vector")
    return v / n


def _rotation_matrix(axis, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by angle_deg about axis (Rodrigues)."""
    k = _unit(np.asarray(axis, dtype=float), "axis")
    t = math.radians(angle_deg)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * (K @ K)


class _JsonModel:
    """Base class: a model backed by (and serialised as) its JSON dict."""

    _kind = "model"

    def __init__(self, data: dict | None = None):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{self._kind} must be a JSON object, got {type(data).__name__}")
        self._data = data
        self._validate()

    def _validate(self) -> None:  # overridden
        pass

    def to_dict(self) -> dict:
        """The JSON dict (a deep copy), with every key that was read."""
        return copy.deepcopy(self._data)

    @classmethod
    def from_dict(cls, data: dict):
        """Build the model from its JSON dict (the dict is copied)."""
        return cls(copy.deepcopy(data))

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._data == other._data

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()})"

    def _summary(self) -> str:
        return ""


# --------------------------------------------------------------------------- beam


class Beam(_JsonModel):
    """Monochromatic beam: direction (towards the source, as in dxtbx) and wavelength."""

    _kind = "beam"

    def _validate(self) -> None:
        d = self._data
        if "direction" not in d and "s0" in d:
            # Very old files store s0 only; convert once to the dxtbx representation.
            s0 = _vec(d.pop("s0"), "beam.s0")
            d["wavelength"] = 1.0 / float(np.linalg.norm(s0))
            d["direction"] = _tuple(-_unit(s0, "beam.s0"))
        for key in ("direction", "wavelength"):
            if key not in d:
                raise ValueError(f"beam is missing required key {key!r}")
        _unit(_vec(d["direction"], "beam.direction"), "beam.direction")
        w = float(d["wavelength"])
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"beam.wavelength must be positive and finite, got {w}")

    def get_direction(self) -> tuple:
        """Unit vector pointing from the sample towards the source."""
        return _tuple(_unit(_vec(self._data["direction"], "direction"), "direction"))

    def get_wavelength(self) -> float:
        """Wavelength in Å."""
        return float(self._data["wavelength"])

    def get_s0(self) -> tuple:
        """Incident beam vector s0 = -direction / wavelength (1/Å)."""
        return _tuple(-np.asarray(self.get_direction()) / self.get_wavelength())

    def get_unit_s0(self) -> tuple:
        """Unit vector along s0."""
        return _tuple(-np.asarray(self.get_direction()))

    def set_wavelength(self, wavelength: float) -> None:
        """Set the wavelength (Å)."""
        if not (math.isfinite(wavelength) and wavelength > 0):
            raise ValueError(f"wavelength must be positive and finite, got {wavelength}")
        self._data["wavelength"] = float(wavelength)

    def set_s0(self, s0) -> None:
        """Set direction and wavelength from an s0 vector."""
        v = _vec(s0, "s0")
        self._data["wavelength"] = 1.0 / float(np.linalg.norm(_unit(v, "s0") * np.linalg.norm(v)))
        self._data["direction"] = list(_tuple(-_unit(v, "s0")))

    def get_polarization_normal(self) -> tuple:
        """Polarisation plane normal."""
        return _tuple(self._data.get("polarization_normal", (0.0, 1.0, 0.0)))

    def get_polarization_fraction(self) -> float:
        """Polarisation fraction."""
        return float(self._data.get("polarization_fraction", 0.999))

    def get_divergence(self) -> float:
        return float(self._data.get("divergence", 0.0))

    def get_sigma_divergence(self) -> float:
        return float(self._data.get("sigma_divergence", 0.0))

    def get_flux(self) -> float:
        return float(self._data.get("flux", 0.0))

    def get_transmission(self) -> float:
        return float(self._data.get("transmission", 1.0))

    def _summary(self) -> str:
        return f"wavelength={self.get_wavelength():.6g}"


# --------------------------------------------------------------------------- detector


class Panel(_JsonModel):
    """One flat detector panel (origin, fast and slow axes in the lab frame, mm)."""

    _kind = "panel"

    def _validate(self) -> None:
        d = self._data
        for key in ("origin", "fast_axis", "slow_axis"):
            if key not in d:
                raise ValueError(f"detector panel is missing required key {key!r}")
            _vec(d[key], f"panel.{key}")
        for key, n in (("pixel_size", 2), ("image_size", 2), ("trusted_range", 2)):
            if key in d:
                _vec(d[key], f"panel.{key}", n)

    def get_name(self) -> str:
        return str(self._data.get("name", ""))

    def get_type(self) -> str:
        return str(self._data.get("type", ""))

    def get_origin(self) -> tuple:
        return _tuple(self._data["origin"])

    def get_fast_axis(self) -> tuple:
        return _tuple(_unit(_vec(self._data["fast_axis"], "fast_axis"), "fast_axis"))

    def get_slow_axis(self) -> tuple:
        return _tuple(_unit(_vec(self._data["slow_axis"], "slow_axis"), "slow_axis"))

    def get_normal(self) -> tuple:
        return _tuple(np.cross(self.get_fast_axis(), self.get_slow_axis()))

    def get_d_matrix(self) -> tuple:
        """dxtbx D⁻¹: columns fast, slow, origin (row-major tuple of 9)."""
        m = np.column_stack([self.get_fast_axis(), self.get_slow_axis(), self.get_origin()])
        return _tuple(m)

    def get_D_matrix(self) -> tuple:
        """dxtbx D = inverse of the d matrix (maps lab vectors to panel coordinates)."""
        return _tuple(np.linalg.inv(np.asarray(self.get_d_matrix()).reshape(3, 3)))

    def get_distance(self) -> float:
        """Distance from the sample to the panel plane along its normal (mm)."""
        return float(np.dot(self.get_origin(), self.get_normal()))

    def get_pixel_size(self) -> tuple:
        return _tuple(self._data.get("pixel_size", (0.0, 0.0)))

    def get_image_size(self) -> tuple:
        return tuple(int(x) for x in self._data.get("image_size", (0, 0)))

    def get_image_size_mm(self) -> tuple:
        p, n = self.get_pixel_size(), self.get_image_size()
        return (p[0] * n[0], p[1] * n[1])

    def get_trusted_range(self) -> tuple:
        return _tuple(self._data.get("trusted_range", (0.0, 0.0)))

    def get_thickness(self) -> float:
        return float(self._data.get("thickness", 0.0))

    def get_material(self) -> str:
        return str(self._data.get("material", ""))

    def get_mu(self) -> float:
        return float(self._data.get("mu", 0.0))

    def get_mask(self) -> list:
        return [tuple(int(v) for v in m) for m in self._data.get("mask", [])]

    def get_gain(self) -> float:
        return float(self._data.get("gain", 1.0))

    def get_lab_coord(self, xy_mm) -> tuple:
        """Lab coordinate of a panel position given in mm (no parallax correction)."""
        x, y = float(xy_mm[0]), float(xy_mm[1])
        o, f, s = map(np.asarray, (self.get_origin(), self.get_fast_axis(), self.get_slow_axis()))
        return _tuple(o + x * f + y * s)

    def get_ray_intersection(self, s1) -> tuple:
        """Panel (x, y) in mm where the ray along s1 meets the panel plane."""
        v = np.asarray(np.asarray(self.get_D_matrix()).reshape(3, 3) @ _vec(s1, "s1"))
        if v[2] <= 0:
            raise ValueError("ray does not intersect the panel")
        return (float(v[0] / v[2]), float(v[1] / v[2]))

    def get_beam_centre(self, s0) -> tuple:
        """Beam centre (mm) for an incident beam vector s0."""
        return self.get_ray_intersection(s0)

    def _summary(self) -> str:
        return f"name={self.get_name()!r}, origin={self.get_origin()}"


class Detector:
    """A list of panels plus the (preserved, uninterpreted) panel hierarchy."""

    def __init__(self, data: dict | None = None):
        if data is None:
            data = {"panels": []}
        if not isinstance(data, dict):
            raise ValueError("detector must be a JSON object")
        panels = data.get("panels")
        if not isinstance(panels, list):
            raise ValueError("detector is missing its 'panels' list")
        self._extra = {k: v for k, v in data.items() if k != "panels"}
        self._panels = []
        for i, p in enumerate(panels):
            try:
                self._panels.append(Panel(p))
            except ValueError as exc:
                raise ValueError(f"detector panel {i}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> "Detector":
        return cls(copy.deepcopy(data))

    def to_dict(self) -> dict:
        d = copy.deepcopy(self._extra)
        d["panels"] = [p.to_dict() for p in self._panels]
        # keep the key order of the file: panels first unless the file had hierarchy first
        return d

    def __len__(self) -> int:
        return len(self._panels)

    def __getitem__(self, i: int) -> Panel:
        return self._panels[i]

    def __iter__(self) -> Iterator[Panel]:
        return iter(self._panels)

    def get_names(self) -> list:
        return [p.get_name() for p in self._panels]

    def hierarchy(self) -> dict | None:
        """The raw hierarchy dict, if the file had one."""
        return self._extra.get("hierarchy")

    def get_ray_intersection(self, s1) -> tuple:
        """(panel index, (x, y) mm) of the first panel hit by the ray along s1."""
        for i, p in enumerate(self._panels):
            try:
                xy = p.get_ray_intersection(s1)
            except ValueError:
                continue
            size = p.get_image_size_mm()
            if 0 <= xy[0] <= size[0] and 0 <= xy[1] <= size[1]:
                return i, xy
        raise ValueError("ray does not hit any panel")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Detector):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Detector({len(self)} panel{'s' if len(self) != 1 else ''})"


# --------------------------------------------------------------------------- goniometer


class Goniometer(_JsonModel):
    """Rotation goniometer: A(φ) = S R(φ) F U B (dxtbx convention).

    Single-axis files store ``rotation_axis`` (at datum), ``fixed_rotation`` (F) and
    ``setting_rotation`` (S). Multi-axis files store ``axes`` (crystal → base order),
    ``angles`` (degrees), ``names`` and ``scan_axis``; then F is the product of the
    rotations of the axes inside the scan axis, S of those outside, and the datum axis
    is ``axes[scan_axis]``.
    """

    _kind = "goniometer"

    def _validate(self) -> None:
        d = self._data
        if "axes" in d:
            axes = np.asarray(d["axes"], dtype=float)
            if axes.ndim != 2 or axes.shape[1] != 3 or len(axes) == 0:
                raise ValueError(f"goniometer.axes must be a list of 3-vectors, got {d['axes']!r}")
            _vec(d.get("angles", []), "goniometer.angles", len(axes))
            scan_axis = d.get("scan_axis")
            if not isinstance(scan_axis, int) or not 0 <= scan_axis < len(axes):
                raise ValueError(
                    f"goniometer.scan_axis must be an index < {len(axes)}, got {scan_axis!r}")
            for i, a in enumerate(axes):
                _unit(_vec(a, f"goniometer.axes[{i}]"), f"goniometer.axes[{i}]")
        else:
            if "rotation_axis" not in d:
                raise ValueError("goniometer is missing required key 'rotation_axis'")
            _unit(_vec(d["rotation_axis"], "goniometer.rotation_axis"), "goniometer.rotation_axis")
            for key in ("fixed_rotation", "setting_rotation"):
                if key in d:
                    _mat3(d[key], f"goniometer.{key}")

    def is_multi_axis(self) -> bool:
        return "axes" in self._data

    def _rotations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = self._data
        if self.is_multi_axis():
            axes = np.asarray(d["axes"], dtype=float)
            angles = np.asarray(d["angles"], dtype=float)
            k = int(d["scan_axis"])
            F, S = np.eye(3), np.eye(3)
            for i in range(k):
                F = _rotation_matrix(axes[i], angles[i]) @ F
            for i in range(k + 1, len(axes)):
                S = _rotation_matrix(axes[i], angles[i]) @ S
            return _unit(axes[k], "axis"), F, S
        axis = _unit(_vec(d["rotation_axis"], "rotation_axis"), "rotation_axis")
        F = _mat3(d.get("fixed_rotation", np.eye(3).ravel()), "fixed_rotation")
        S = _mat3(d.get("setting_rotation", np.eye(3).ravel()), "setting_rotation")
        return axis, F, S

    def get_rotation_axis_datum(self) -> tuple:
        """Rotation axis before the setting rotation."""
        return _tuple(self._rotations()[0])

    def get_rotation_axis(self) -> tuple:
        """Effective rotation axis in the lab frame, S · axis_datum."""
        axis, _, S = self._rotations()
        return _tuple(S @ axis)

    def get_fixed_rotation(self) -> tuple:
        """F as a row-major tuple of 9."""
        return _tuple(self._rotations()[1])

    def get_setting_rotation(self) -> tuple:
        """S as a row-major tuple of 9."""
        return _tuple(self._rotations()[2])

    def get_axes(self) -> list:
        """Multi-axis: list of axis vectors (crystal → base); single-axis: [datum axis]."""
        if self.is_multi_axis():
            return [_tuple(a) for a in self._data["axes"]]
        return [self.get_rotation_axis_datum()]

    def get_angles(self) -> list:
        return [float(a) for a in self._data.get("angles", [0.0])]

    def get_names(self) -> list:
        return list(self._data.get("names", [""] * len(self.get_axes())))

    def get_scan_axis(self) -> int:
        return int(self._data.get("scan_axis", 0))

    def get_num_scan_points(self) -> int:
        return len(self._data.get("setting_rotation_at_scan_points", []))

    def _summary(self) -> str:
        return f"rotation_axis={tuple(round(x, 6) for x in self.get_rotation_axis())}"


# --------------------------------------------------------------------------- scan


class Scan(_JsonModel):
    """A rotation scan: image range (1-based, inclusive) and oscillation (start, width) in °.

    Array index z (0-based frame coordinate, as in ``xyzobs.px.value[:, 2]``) relates to
    images by ``image = z + 1`` and to angles by
    ``phi = osc_start + (z + 1 - first_image) * osc_width``.
    """

    _kind = "scan"

    def _validate(self) -> None:
        d = self._data
        props = d.get("properties")
        if "oscillation" not in d and isinstance(props, dict) and "oscillation" in props:
            # newer dxtbx: per-image start angles in a properties table (uniform scans only)
            osc = [float(x) for x in props["oscillation"]]
            if len(osc) > 1:
                width = osc[1] - osc[0]
            else:
                width = float(props.get("oscillation_width", [0.0])[0])
            if not osc or not all(math.isfinite(x) for x in osc + [width]):
                raise ValueError("scan.properties.oscillation must hold finite angles")
            self._osc = (osc[0], width)
        elif "oscillation" in d:
            self._osc = tuple(float(x) for x in _vec(d["oscillation"], "scan.oscillation", 2))
        else:
            raise ValueError("scan is missing required key 'oscillation'")
        if "image_range" not in d:
            raise ValueError("scan is missing required key 'image_range'")
        r = d["image_range"]
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(x, int) for x in r) or r[1] < r[0]):
            raise ValueError(f"scan.image_range must be two integers [first, last], got {r!r}")

    def get_image_range(self) -> tuple:
        """(first, last) image numbers, inclusive, 1-based."""
        r = self._data["image_range"]
        return (int(r[0]), int(r[1]))

    def get_array_range(self) -> tuple:
        """(first - 1, last): half-open range of array (frame) indices."""
        first, last = self.get_image_range()
        return (first - 1, last)

    def get_num_images(self) -> int:
        first, last = self.get_image_range()
        return last - first + 1

    def get_oscillation(self, deg: bool = True) -> tuple:
        """(start angle, width) of the first image; degrees unless ``deg=False``."""
        s, w = self._osc
        return (s, w) if deg else (math.radians(s), math.radians(w))

    def get_oscillation_range(self, deg: bool = True) -> tuple:
        """(start, end) angle of the whole scan."""
        s, w = self.get_oscillation(deg)
        return (s, s + w * self.get_num_images())

    def get_angle_from_image_index(self, index, deg: bool = True):
        """Angle at (fractional) image number(s) ``index`` (scalar or array)."""
        s, w = self.get_oscillation(deg)
        out = s + (np.asarray(index, dtype=float) - self.get_image_range()[0]) * w
        return float(out) if out.ndim == 0 else out

    def get_angle_from_array_index(self, index, deg: bool = True):
        """Angle at (fractional) array index/indices z (scalar or array)."""
        return self.get_angle_from_image_index(np.asarray(index, dtype=float) + 1.0, deg)

    def get_array_index_from_angle(self, angle, deg: bool = True):
        """Inverse of ``get_angle_from_array_index`` (scalar or array)."""
        s, w = self.get_oscillation(deg)
        if w == 0:
            raise ValueError("scan has zero oscillation width")
        out = (np.asarray(angle, dtype=float) - s) / w + self.get_image_range()[0] - 1.0
        return float(out) if out.ndim == 0 else out

    def get_image_index_from_angle(self, angle, deg: bool = True):
        out = np.asarray(self.get_array_index_from_angle(angle, deg)) + 1.0
        return float(out) if out.ndim == 0 else out

    def get_batch_offset(self) -> int:
        return int(self._data.get("batch_offset", 0))

    def get_batch_range(self) -> tuple:
        first, last = self.get_image_range()
        off = self.get_batch_offset()
        return (first + off, last + off)

    def get_batch_for_image_index(self, index: int) -> int:
        return int(index) + self.get_batch_offset()

    def get_batch_for_array_index(self, index: int) -> int:
        return int(index) + 1 + self.get_batch_offset()

    def get_valid_image_ranges(self, identifier: str) -> list:
        """Valid image ranges stored for an experiment identifier ([] if none)."""
        return [tuple(r) for r in self._data.get("valid_image_ranges", {}).get(identifier, [])]

    def set_valid_image_ranges(self, identifier: str, ranges) -> None:
        self._data.setdefault("valid_image_ranges", {})[identifier] = [list(map(int, r))
                                                                      for r in ranges]

    def get_exposure_times(self) -> np.ndarray:
        props = self._data.get("properties", {})
        v = self._data.get("exposure_time", props.get("exposure_time", []))
        return np.asarray(v, dtype=float)

    def get_epochs(self) -> np.ndarray:
        v = self._data.get("epochs", self._data.get("properties", {}).get("epochs", []))
        return np.asarray(v, dtype=float)

    def is_still(self) -> bool:
        return self._osc[1] == 0.0

    def __len__(self) -> int:
        return self.get_num_images()

    def _summary(self) -> str:
        return f"image_range={self.get_image_range()}, oscillation={self.get_oscillation()}"


# --------------------------------------------------------------------------- crystal


class Crystal(_JsonModel):
    """Crystal model: real-space vectors a, b, c (Å, lab frame at φ = 0), space group and
    optional scan-varying A matrices (``A_at_scan_points``).

    Conventions (dxtbx): the rows of A⁻¹ are a, b, c; A = U B; B is the transpose of the
    fractionalisation matrix of the cell. Matrices are returned as row-major tuples of 9.
    """

    _kind = "crystal"

    def _validate(self) -> None:
        d = self._data
        for key in ("real_space_a", "real_space_b", "real_space_c", "space_group_hall_symbol"):
            if key not in d:
                raise ValueError(f"crystal is missing required key {key!r}")
        R = self._real_space()
        if abs(np.linalg.det(R)) < 1e-12:
            raise ValueError("crystal real-space vectors are linearly dependent")
        self._sg = space_group_from_hall(d["space_group_hall_symbol"])
        self._A_scan = None
        if "A_at_scan_points" in d:
            try:
                a = np.asarray(d["A_at_scan_points"], dtype=float)
            except (TypeError, ValueError):
                a = np.zeros((0, 0))  # ragged or non-numeric: reported below
            if a.ndim != 2 or a.shape[1] != 9 or not np.all(np.isfinite(a)):
                raise ValueError("crystal.A_at_scan_points must be a list of 9-element "
                                 "finite matrices (ragged, short or non-numeric entries found)")

    def _real_space(self) -> np.ndarray:
        d = self._data
        return np.vstack([_vec(d[k], f"crystal.{k}") for k in
                          ("real_space_a", "real_space_b", "real_space_c")])

    def get_real_space_vectors(self) -> tuple:
        R = self._real_space()
        return (_tuple(R[0]), _tuple(R[1]), _tuple(R[2]))

    def get_A(self) -> tuple:
        """A = UB (reciprocal basis vectors as columns)."""
        return _tuple(np.linalg.inv(self._real_space()))

    def get_unit_cell(self) -> UnitCell:
        """Unit cell from the real-space vectors (``.d(hkl)`` accepts arrays)."""
        return _cell_from_real_space(self._real_space())

    def get_B(self) -> tuple:
        return _tuple(self.get_unit_cell().B_matrix())

    def get_U(self) -> tuple:
        A = np.asarray(self.get_A()).reshape(3, 3)
        return _tuple(A @ np.linalg.inv(self.get_unit_cell().B_matrix()))

    def get_space_group(self) -> SpaceGroup:
        return self._sg

    def set_space_group(self, space_group) -> None:
        sg = space_group if isinstance(space_group, SpaceGroup) else SpaceGroup(space_group)
        self._sg = sg
        self._data["space_group_hall_symbol"] = sg.hall_symbol()

    def get_crystal_symmetry(self) -> tuple:
        """(unit cell, space group) pair."""
        return (self.get_unit_cell(), self._sg)

    def get_mosaicity(self) -> float:
        return float(self._data.get("mosaicity", 0.0) or 0.0)

    # scan-varying model
    def get_num_scan_points(self) -> int:
        return len(self._data.get("A_at_scan_points", []))

    def get_A_at_scan_points(self) -> np.ndarray:
        """All scan-point A matrices, shape (n, 3, 3) (read-only view, cached)."""
        if self._A_scan is None:
            a = np.asarray(self._data.get("A_at_scan_points", []), dtype=float).reshape(-1, 3, 3)
            a.setflags(write=False)
            self._A_scan = a
        return self._A_scan

    def get_A_at_scan_point(self, index: int) -> tuple:
        n = self.get_num_scan_points()
        if not -n <= index < n:
            raise IndexError(f"scan point {index} out of range (crystal has {n} scan points)")
        return _tuple(self.get_A_at_scan_points()[index])

    def get_unit_cell_at_scan_point(self, index: int) -> UnitCell:
        A = np.asarray(self.get_A_at_scan_point(index)).reshape(3, 3)
        return _cell_from_real_space(np.linalg.inv(A))

    def get_B_at_scan_point(self, index: int) -> tuple:
        return _tuple(self.get_unit_cell_at_scan_point(index).B_matrix())

    def get_U_at_scan_point(self, index: int) -> tuple:
        A = np.asarray(self.get_A_at_scan_point(index)).reshape(3, 3)
        B = self.get_unit_cell_at_scan_point(index).B_matrix()
        return _tuple(A @ np.linalg.inv(B))

    def get_B_covariance(self) -> np.ndarray:
        return np.asarray(self._data.get("B_covariance", []), dtype=float)

    def _summary(self) -> str:
        return f"{self.get_unit_cell()}, {self._sg.symbol()!r}"


def _cell_from_real_space(R: np.ndarray) -> UnitCell:
    a, b, c = R
    la, lb, lc = (float(np.linalg.norm(v)) for v in (a, b, c))

    def ang(u, v, lu, lv):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(np.dot(u, v)) / (lu * lv)))))

    return UnitCell((la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb)))


# --------------------------------------------------------------------------- experiment


class Experiment:
    """One experiment: models plus identifier, profile and scaling-model dicts.

    ``profile``, ``imageset`` and ``scaling_model`` are kept as the raw JSON dicts (or any
    object with a ``to_dict()`` method that a caller assigns, e.g. a scaling model).
    """

    def __init__(self, beam=None, detector=None, goniometer=None, scan=None, crystal=None,
                 profile=None, imageset=None, scaling_model=None, identifier: str = ""):
        self.beam = beam
        self.detector = detector
        self.goniometer = goniometer
        self.scan = scan
        self.crystal = crystal
        self.profile = profile
        self.imageset = imageset
        self.scaling_model = scaling_model
        self.identifier = identifier
        self._extra: dict = {}

    def is_still(self) -> bool:
        """True for stills (no goniometer, no scan or zero oscillation)."""
        return self.goniometer is None or self.scan is None or self.scan.is_still()

    def is_sequence(self) -> bool:
        return not self.is_still()

    def __repr__(self) -> str:
        return f"Experiment(identifier={self.identifier!r}, crystal={self.crystal!r})"


class ExperimentList:
    """An ordered list of experiments (dxtbx ``ExperimentList`` API subset)."""

    def __init__(self, experiments: Iterable[Experiment] = ()):
        self._experiments: list[Experiment] = []
        self._extra_top: dict = {}
        self._present_keys: set | None = None  # top-level model keys of the source file
        for e in experiments:
            self.append(e)

    # list protocol
    def append(self, experiment: Experiment) -> None:
        if not isinstance(experiment, Experiment):
            raise TypeError(f"can only append Experiment, got {type(experiment).__name__}")
        if experiment.identifier and experiment.identifier in self.identifiers():
            raise ValueError(f"duplicate experiment identifier {experiment.identifier!r}")
        self._experiments.append(experiment)

    def extend(self, other: Iterable[Experiment]) -> None:
        for e in other:
            self.append(e)

    def __len__(self) -> int:
        return len(self._experiments)

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments)

    def __getitem__(self, item):
        if isinstance(item, slice):
            out = ExperimentList(self._experiments[item])
            out._extra_top = self._extra_top
            out._present_keys = self._present_keys
            return out
        return self._experiments[item]

    def __delitem__(self, item) -> None:
        del self._experiments[item]

    def __contains__(self, experiment) -> bool:
        return any(e is experiment for e in self._experiments)

    def __repr__(self) -> str:
        return f"ExperimentList({len(self)} experiment{'s' if len(self) != 1 else ''})"

    # DIALS accessors
    def identifiers(self) -> list:
        return [e.identifier for e in self._experiments]

    def find(self, identifier: str) -> int:
        """Index of the experiment with this identifier, or -1."""
        for i, e in enumerate(self._experiments):
            if e.identifier == identifier:
                return i
        return -1

    def select_on_experiment_identifiers(self, identifiers) -> "ExperimentList":
        """Sub-list in the order of ``identifiers``; KeyError naming a missing identifier."""
        out = ExperimentList()
        for ident in identifiers:
            i = self.find(ident)
            if i < 0:
                raise KeyError(f"experiment identifier {ident!r} is not in this ExperimentList")
            out.append(self._experiments[i])
        return out

    def remove_on_experiment_identifiers(self, identifiers) -> "ExperimentList":
        drop = set(identifiers)
        self._experiments = [e for e in self._experiments if e.identifier not in drop]
        return self

    def _unique(self, attr: str) -> list:
        seen, out = set(), []
        for e in self._experiments:
            m = getattr(e, attr)
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def beams(self) -> list:
        return self._unique("beam")

    def detectors(self) -> list:
        return self._unique("detector")

    def goniometers(self) -> list:
        return self._unique("goniometer")

    def scans(self) -> list:
        return self._unique("scan")

    def crystals(self) -> list:
        return self._unique("crystal")

    def profiles(self) -> list:
        return self._unique("profile")

    def imagesets(self) -> list:
        return self._unique("imageset")

    def scaling_models(self) -> list:
        return [e.scaling_model for e in self._experiments]

    # serialisation
    def to_dict(self) -> dict:
        """The JSON dict written to ``.expt``."""
        pools: dict[str, list] = {k: [] for k in _MODEL_KEYS}
        index: dict[str, dict[int, int]] = {k: {} for k in _MODEL_KEYS}
        exps = []
        for e in self._experiments:
            ed = {"__id__": "Experiment"}
            ed.update(copy.deepcopy(e._extra))
            if e.identifier:
                ed["identifier"] = e.identifier
            for key in _MODEL_KEYS:
                m = getattr(e, key)
                if m is None:
                    ed.pop(key, None)
                    continue
                if id(m) not in index[key]:
                    index[key][id(m)] = len(pools[key])
                    pools[key].append(m)
                ed[key] = index[key][id(m)]
            exps.append(ed)
        out: dict[str, Any] = {"__id__": "ExperimentList", "experiment": exps}
        for key in _MODEL_KEYS:
            # A key absent from the file it was read from stays absent if still empty.
            if pools[key] or self._present_keys is None or key in self._present_keys:
                out[key] = [_model_to_dict(m) for m in pools[key]]
        for k, v in self._extra_top.items():
            out.setdefault(k, copy.deepcopy(v))
        return out

    def as_json(self, filename=None, compact: bool = False, split: bool = False) -> str:
        """Serialise to JSON text; write it to ``filename`` if given."""
        text = json.dumps(self.to_dict(), indent=None if compact else 2)
        if filename is not None:
            with open(os.fspath(filename), "w") as fh:
                fh.write(text)
        return text

    def as_file(self, filename) -> None:
        """Write an ``.expt`` file."""
        self.as_json(filename)

    @staticmethod
    def from_file(filename, check_format: bool = False) -> "ExperimentList":
        """Read an ``.expt`` / ``*_experiments.json`` file (``check_format`` is ignored:
        image files are never opened)."""
        return ExperimentListFactory.from_json_file(filename, check_format=check_format)

    @staticmethod
    def from_dict(data: dict, filename: str = "<dict>") -> "ExperimentList":
        return ExperimentListFactory.from_dict(data, filename=filename)


def _model_to_dict(m) -> Any:
    if isinstance(m, dict):
        return copy.deepcopy(m)
    if hasattr(m, "to_dict"):
        return m.to_dict()
    raise TypeError(f"cannot serialise model of type {type(m).__name__}")


_MODEL_CLASSES = {
    "beam": Beam,
    "detector": Detector,
    "goniometer": Goniometer,
    "scan": Scan,
    "crystal": Crystal,
}


class ExperimentListFactory:
    """Constructors for ``ExperimentList`` (dxtbx factory API subset)."""

    @staticmethod
    def from_json_file(filename, check_format: bool = False) -> ExperimentList:
        """Read an experiment list from a JSON file.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If the file is not valid JSON or its models are inconsistent; the message names
            the file and the problem.
        """
        path = os.fspath(filename)
        try:
            with open(path, "rb") as fh:
                # a device or pipe (/dev/zero) would be read until memory runs out
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ExperimentFormatError(f"{path}: not a regular file")
                raw = fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"experiment file not found: {path}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExperimentFormatError(
                f"{path}: not a valid JSON experiment list ({exc})") from None
        except RecursionError:
            raise ExperimentFormatError(f"{path}: JSON nested too deeply") from None
        try:
            return ExperimentListFactory.from_dict(data, filename=path)
        except RecursionError:
            raise ExperimentFormatError(f"{path}: JSON nested too deeply") from None

    @staticmethod
    def from_json(text: str) -> ExperimentList:
        try:
            data = json.loads(text)
            return ExperimentListFactory.from_dict(data)
        except json.JSONDecodeError as exc:
            raise ExperimentFormatError(f"not a valid JSON experiment list ({exc})") from None
        except RecursionError:
            raise ExperimentFormatError("JSON experiment list nested too deeply") from None

    from_serialized_format = from_json_file

    @staticmethod
    def from_dict(data: dict, filename: str = "<dict>") -> ExperimentList:
        """Build an experiment list from the decoded JSON dict (the dict is copied)."""
        if not isinstance(data, dict) or not isinstance(data.get("experiment"), list):
            raise ExperimentFormatError(
                f"{filename}: not an experiment list (no 'experiment' list at top level)")
        data = copy.deepcopy(data)
        pools = {}
        for key in _MODEL_KEYS:
            entries = data.get(key, [])
            if not isinstance(entries, list):
                raise ExperimentFormatError(f"{filename}: top-level {key!r} must be a list")
            cls = _MODEL_CLASSES.get(key)
            models = []
            for i, entry in enumerate(entries):
                try:
                    models.append(cls(entry) if cls is not None else entry)
                except ValueError as exc:
                    raise ExperimentFormatError(f"{filename}: {key}[{i}]: {exc}") from None
                except (TypeError, KeyError) as exc:
                    # a wrong type or a missing field in the file is a format error too
                    raise ExperimentFormatError(
                        f"{filename}: {key}[{i}]: wrong type or missing field ({exc})") from None
            pools[key] = models
        out = ExperimentList()
        out._extra_top = {k: v for k, v in data.items()
                          if k not in _MODEL_KEYS and k not in ("experiment", "__id__")}
        out._present_keys = {k for k in _MODEL_KEYS if k in data}
        for j, ed in enumerate(data["experiment"]):
            if not isinstance(ed, dict):
                raise ExperimentFormatError(f"{filename}: experiment[{j}] must be an object")
            e = Experiment(identifier=str(ed.get("identifier", "")))
            for key in _MODEL_KEYS:
                if key not in ed or ed[key] is None:
                    continue
                idx = ed[key]
                if not isinstance(idx, int) or not 0 <= idx < len(pools[key]):
                    raise ExperimentFormatError(
                        f"{filename}: experiment[{j}] refers to {key} {idx!r} but the file has "
                        f"{len(pools[key])} {key} entr{'y' if len(pools[key]) == 1 else 'ies'}")
                setattr(e, key, pools[key][idx])
            e._extra = {k: v for k, v in ed.items()
                        if k not in _MODEL_KEYS and k not in ("__id__", "identifier")}
            try:
                out.append(e)
            except ValueError as exc:
                raise ExperimentFormatError(f"{filename}: {exc}") from None
        return out


def experiment_list(filename, check_format: bool = True) -> ExperimentList:
    """Load an ``.expt`` / ``*_experiments.json`` file (dxtbx's ``serialize.load.experiment_list``;
    ``check_format`` is accepted for compatibility: image files are never opened)."""
    return ExperimentListFactory.from_json_file(filename, check_format=check_format)
