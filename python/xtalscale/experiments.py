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
    "BeamFactory",
    "GoniometerFactory",
    "ScanFactory",
    "DetectorFactory",
    "CrystalFactory",
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
    """A finite 3×3 matrix from 9 row-major values or a 3×3 array."""
    if isinstance(value, np.ndarray) and value.shape == (3, 3):
        value = value.reshape(-1)
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


def _is_json_form(args: tuple, kwargs: dict) -> bool:
    """Whether a model constructor was called the JSON way: ``Model()``, ``Model(dict)`` or
    ``Model(data=dict)`` (anything else is a dxtbx-style constructor call)."""
    if kwargs:
        return set(kwargs) == {"data"} and not args
    return len(args) == 0 or (len(args) == 1 and (args[0] is None or isinstance(args[0], dict)))


def _json_data(args: tuple, kwargs: dict):
    return kwargs["data"] if kwargs else (args[0] if args else None)


def _is_rotation(m: np.ndarray, tol: float = 1e-6) -> bool:
    return bool(np.allclose(m @ m.T, np.eye(3), atol=tol) and abs(np.linalg.det(m) - 1.0) < tol)


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

    def to_dict(self, deep: bool = True) -> dict:
        """The JSON dict (a deep copy), with every key that was read. ``deep=False`` returns
        the model's own dict, for serialising without a copy (do not modify it)."""
        return copy.deepcopy(self._data) if deep else self._data

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
    """Monochromatic beam: direction (towards the source, as in dxtbx) and wavelength.

    Constructors: ``Beam(json_dict)``; or as dxtbx, ``Beam(s0)``,
    ``Beam(s0, divergence, sigma_divergence)``, ``Beam(direction, wavelength[, divergence,
    sigma_divergence[, polarization_normal, polarization_fraction[, flux, transmission]]])``
    and the keyword forms ``Beam(s0=...)``, ``Beam(direction=..., wavelength=...)``.
    """

    _kind = "beam"
    _OPTIONAL = ("divergence", "sigma_divergence", "polarization_normal",
                 "polarization_fraction", "flux", "transmission")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _is_json_form(args, kwargs):
            super().__init__(_json_data(args, kwargs))
        else:
            super().__init__(self._dxtbx_dict(args, kwargs))

    @classmethod
    def _dxtbx_dict(cls, args: tuple, kwargs: dict) -> dict:
        if len(args) in (1, 3):  # (s0) or (s0, divergence, sigma_divergence)
            names = ("s0", "divergence", "sigma_divergence")
        else:
            names = ("direction", "wavelength") + cls._OPTIONAL
        if len(args) > len(names):
            raise TypeError(f"Beam takes at most {len(names)} positional arguments here")
        given = dict(zip(names, args))
        for key, value in kwargs.items():
            if key in given:
                raise TypeError(f"Beam got {key!r} twice")
            given[key] = value
        unknown = set(given) - {"s0", "direction", "wavelength"} - set(cls._OPTIONAL)
        if unknown:
            raise TypeError(f"Beam got unexpected arguments {sorted(unknown)}")
        d: dict = {}
        if "s0" in given:
            if "direction" in given or "wavelength" in given:
                raise TypeError("give Beam either s0 or direction and wavelength, not both")
            s0 = _vec(given.pop("s0"), "s0")
            d["direction"] = list(_tuple(-_unit(s0, "s0")))
            d["wavelength"] = 1.0 / float(np.linalg.norm(s0))
        elif "direction" in given and "wavelength" in given:
            d["direction"] = list(_tuple(_unit(_vec(given.pop("direction"), "direction"),
                                               "direction")))
            d["wavelength"] = float(given.pop("wavelength"))
        else:
            raise TypeError("Beam needs s0, or direction and wavelength")
        d.update({"divergence": 0.0, "sigma_divergence": 0.0,
                  "polarization_normal": [0.0, 1.0, 0.0], "polarization_fraction": 0.999,
                  "flux": 0.0, "transmission": 1.0})
        for key, value in given.items():
            d[key] = (list(_tuple(_vec(value, key))) if key == "polarization_normal"
                      else float(value))
        return d

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

    def set_direction(self, direction) -> None:
        """Set the unit direction towards the source (normalised here)."""
        self._data["direction"] = list(_tuple(_unit(_vec(direction, "direction"), "direction")))

    def set_unit_s0(self, unit_s0) -> None:
        """Set the direction from a vector along s0."""
        self.set_direction(-_vec(unit_s0, "unit_s0"))

    def _set_number(self, key: str, value, low: float = -math.inf, high: float = math.inf) -> None:
        v = float(value)
        if not (math.isfinite(v) and low <= v <= high):
            raise ValueError(f"beam {key} must be finite and within [{low}, {high}], got {value}")
        self._data[key] = v

    def set_divergence(self, divergence) -> None:
        self._set_number("divergence", divergence)

    def set_sigma_divergence(self, sigma_divergence) -> None:
        self._set_number("sigma_divergence", sigma_divergence)

    def set_polarization_normal(self, normal) -> None:
        self._data["polarization_normal"] = list(_tuple(_vec(normal, "polarization_normal")))

    def set_polarization_fraction(self, fraction) -> None:
        self._set_number("polarization_fraction", fraction, 0.0, 1.0)

    def set_flux(self, flux) -> None:
        self._set_number("flux", flux)

    def set_transmission(self, transmission) -> None:
        self._set_number("transmission", transmission)

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

    def to_dict(self, deep: bool = True) -> dict:
        d = copy.deepcopy(self._extra) if deep else dict(self._extra)
        d["panels"] = [p.to_dict(deep) for p in self._panels]
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``Goniometer(json_dict)``; or as dxtbx, ``Goniometer()`` (axis (1, 0, 0)),
        ``Goniometer(rotation_axis[, fixed_rotation[, setting_rotation]])`` (positional or
        keyword; the axis is normalised, the rotations are row-major 3×3)."""
        if not args and not kwargs:
            super().__init__({"rotation_axis": [1.0, 0.0, 0.0],
                              "fixed_rotation": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                              "setting_rotation": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]})
        elif _is_json_form(args, kwargs):
            super().__init__(_json_data(args, kwargs))
        else:
            names = ("rotation_axis", "fixed_rotation", "setting_rotation")
            if len(args) > 3:
                raise TypeError("Goniometer takes at most 3 positional arguments")
            given = dict(zip(names, args))
            for key, value in kwargs.items():
                if key not in names or key in given:
                    raise TypeError(f"Goniometer got an unexpected or repeated argument {key!r}")
                given[key] = value
            if "rotation_axis" not in given:
                raise TypeError("Goniometer needs a rotation_axis")
            eye = list(np.eye(3).ravel())
            d = {"rotation_axis": list(_tuple(_unit(_vec(given["rotation_axis"],
                                                         "rotation_axis"), "rotation_axis"))),
                 "fixed_rotation": list(_tuple(_mat3(given.get("fixed_rotation", eye),
                                                     "fixed_rotation"))),
                 "setting_rotation": list(_tuple(_mat3(given.get("setting_rotation", eye),
                                                       "setting_rotation")))}
            super().__init__(d)

    def _require_single_axis(self, what: str) -> None:
        if self.is_multi_axis():
            raise ValueError(f"Goniometer.{what} is for single-axis goniometers")

    def set_rotation_axis_datum(self, axis) -> None:
        """Set the rotation axis before the setting rotation (normalised)."""
        self._require_single_axis("set_rotation_axis_datum")
        self._data["rotation_axis"] = list(_tuple(_unit(_vec(axis, "axis"), "axis")))

    def set_rotation_axis(self, axis) -> None:
        """Set the effective (lab-frame) rotation axis: the datum becomes S⁻¹ · axis."""
        self._require_single_axis("set_rotation_axis")
        S = np.asarray(self.get_setting_rotation()).reshape(3, 3)
        self.set_rotation_axis_datum(np.linalg.solve(S, _unit(_vec(axis, "axis"), "axis")))

    def set_fixed_rotation(self, rotation) -> None:
        self._require_single_axis("set_fixed_rotation")
        self._data["fixed_rotation"] = list(_tuple(_mat3(rotation, "fixed_rotation")))

    def set_setting_rotation(self, rotation) -> None:
        self._require_single_axis("set_setting_rotation")
        self._data["setting_rotation"] = list(_tuple(_mat3(rotation, "setting_rotation")))

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``Scan(json_dict)``; or as dxtbx, ``Scan(image_range, oscillation[, batch_offset])``
        and ``Scan(image_range, oscillation, exposure_times, epochs[, batch_offset[, deg]])``
        (positional or keyword; ``deg=False`` means the oscillation is in radians)."""
        if _is_json_form(args, kwargs):
            super().__init__(_json_data(args, kwargs))
            return
        if len(args) == 3:  # (image_range, oscillation, batch_offset)
            names: tuple = ("image_range", "oscillation", "batch_offset")
        else:
            names = ("image_range", "oscillation", "exposure_times", "epochs", "batch_offset",
                     "deg")
        if len(args) > len(names):
            raise TypeError(f"Scan takes at most {len(names)} positional arguments")
        given = dict(zip(names, args))
        allowed = {"image_range", "oscillation", "exposure_times", "epochs", "batch_offset",
                   "deg"}
        for key, value in kwargs.items():
            if key not in allowed or key in given:
                raise TypeError(f"Scan got an unexpected or repeated argument {key!r}")
            given[key] = value
        if "image_range" not in given or "oscillation" not in given:
            raise TypeError("Scan needs image_range and oscillation")
        super().__init__(self._dxtbx_dict(**given))

    @staticmethod
    def _dxtbx_dict(image_range, oscillation, exposure_times=None, epochs=None,
                    batch_offset: int = 0, deg: bool = True) -> dict:
        first, last = (int(x) for x in image_range)
        if last < first:
            raise ValueError(f"scan image_range must be [first, last] with last >= first, got "
                             f"{tuple(image_range)}")
        n = last - first + 1
        osc = _vec(oscillation, "oscillation", 2)
        if not deg:
            osc = np.degrees(osc)

        def per_image(values, name: str) -> list:
            if values is None:
                return [0.0] * n
            if isinstance(values, dict):  # {image: value}, as ScanFactory takes epochs
                values = [values[k] for k in sorted(values)]
            a = np.atleast_1d(np.asarray(values, dtype=float))
            if a.size == 1:
                a = np.full(n, float(a[0]))
            if a.size != n or not np.all(np.isfinite(a)):
                raise ValueError(f"scan {name} needs {n} finite values (one per image), got "
                                 f"{a.size}")
            return a.tolist()

        return {"image_range": [first, last], "oscillation": list(_tuple(osc)),
                "exposure_time": per_image(exposure_times, "exposure_times"),
                "epochs": per_image(epochs, "epochs"),
                "batch_offset": int(batch_offset), "valid_image_ranges": {}}

    def _replace(self, **changes) -> None:
        """Apply changes to the JSON dict and re-validate (restored if invalid)."""
        old = copy.deepcopy(self._data)
        self._data.update(changes)
        try:
            self._validate()
        except ValueError:
            self._data.clear()
            self._data.update(old)
            self._validate()
            raise

    def set_image_range(self, image_range) -> None:
        """Set (first, last); per-image exposure times and epochs are cut or padded (with
        the last value, or 0)."""
        first, last = (int(x) for x in image_range)
        n = last - first + 1
        changes: dict = {"image_range": [first, last]}
        for key in ("exposure_time", "epochs"):
            values = list(self._data.get(key, []))
            if values:
                changes[key] = (values + [values[-1]] * n)[:n] if n > 0 else []
        self._replace(**changes)

    def set_oscillation(self, oscillation, deg: bool = True) -> None:
        osc = _vec(oscillation, "oscillation", 2)
        self._replace(oscillation=list(_tuple(osc if deg else np.degrees(osc))))

    def set_batch_offset(self, batch_offset: int) -> None:
        self._replace(batch_offset=int(batch_offset))

    def set_exposure_times(self, exposure_times) -> None:
        values = np.asarray(exposure_times, dtype=float).ravel()
        if values.size != self.get_num_images() or not np.all(np.isfinite(values)):
            raise ValueError(f"exposure_times needs {self.get_num_images()} finite values")
        self._replace(exposure_time=values.tolist())

    def set_epochs(self, epochs) -> None:
        values = np.asarray(epochs, dtype=float).ravel()
        if values.size != self.get_num_images() or not np.all(np.isfinite(values)):
            raise ValueError(f"epochs needs {self.get_num_images()} finite values")
        self._replace(epochs=values.tolist())

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``Crystal(json_dict)``; or as dxtbx:

        * ``Crystal(real_space_a, real_space_b, real_space_c, space_group=...)`` or with
          ``space_group_symbol=...`` (the space group may also be the 4th positional
          argument: a :class:`SpaceGroup` or a symbol);
        * ``Crystal(A, space_group[, reciprocal=True])`` with A = UB (9 values, row-major);
          ``reciprocal=False`` means A is the real-space matrix whose rows are a, b, c.
        """
        if _is_json_form(args, kwargs):
            super().__init__(_json_data(args, kwargs))
            return
        super().__init__(self._dxtbx_dict(args, kwargs))

    @staticmethod
    def _dxtbx_dict(args: tuple, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        args = list(args)
        first = kwargs.pop("A", args.pop(0) if args and "real_space_a" not in kwargs else None)
        if first is not None and np.asarray(first, dtype=float).size == 9:
            reciprocal = bool(kwargs.pop("reciprocal", args.pop(1) if len(args) > 1 else True))
            A = _mat3(first, "A")
            real = np.linalg.inv(A) if reciprocal else A
        else:
            vectors = [first] if first is not None else []
            for name in ("real_space_a", "real_space_b", "real_space_c")[len(vectors):]:
                vectors.append(kwargs.pop(name) if name in kwargs else
                               (args.pop(0) if args else None))
            if any(v is None for v in vectors):
                raise TypeError("Crystal needs real_space_a, real_space_b and real_space_c")
            real = np.vstack([_vec(v, f"real_space_{k}") for v, k in zip(vectors, "abc")])
        group = kwargs.pop("space_group", None)
        symbol = kwargs.pop("space_group_symbol", None)
        if args:
            if group is not None or symbol is not None or len(args) > 1:
                raise TypeError("Crystal got too many positional arguments")
            group = args.pop(0)
        if kwargs:
            raise TypeError(f"Crystal got unexpected arguments {sorted(kwargs)}")
        if (group is None) == (symbol is None):
            raise TypeError("Crystal needs exactly one of space_group and space_group_symbol")
        sg = group if isinstance(group, SpaceGroup) else SpaceGroup(
            group if group is not None else symbol)
        return {"__id__": "crystal", "real_space_a": list(_tuple(real[0])),
                "real_space_b": list(_tuple(real[1])), "real_space_c": list(_tuple(real[2])),
                "space_group_hall_symbol": sg.hall_symbol()}

    # ---------------------------------------------------------------- setters (dxtbx)
    def _set_real_space(self, R: np.ndarray) -> None:
        R = np.asarray(R, dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(R)) or abs(np.linalg.det(R)) < 1e-12:
            raise ValueError("crystal real-space vectors must be finite and linearly independent")
        for row_, key in zip(R, ("real_space_a", "real_space_b", "real_space_c")):
            self._data[key] = list(_tuple(row_))

    def set_A(self, A) -> None:
        """Set A = UB (row-major 9 values); U and B follow from it."""
        A = _mat3(A, "A")
        if abs(np.linalg.det(A)) < 1e-300:
            raise ValueError("A must be invertible")
        self._set_real_space(np.linalg.inv(A))

    def set_U(self, U) -> None:
        """Set the orientation U (a rotation matrix), keeping B: A = U B."""
        U = _mat3(U, "U")
        if not _is_rotation(U):
            raise ValueError("U must be a proper rotation matrix (orthonormal, det +1)")
        self.set_A(U @ np.asarray(self.get_B()).reshape(3, 3))

    def set_B(self, B) -> None:
        """Set B (the cell's reciprocal basis, row-major 9 values), keeping U: A = U B."""
        self.set_A(np.asarray(self.get_U()).reshape(3, 3) @ _mat3(B, "B"))

    def set_unit_cell(self, *args) -> None:
        """``set_unit_cell(unit_cell)`` keeps U and sets B from the cell;
        ``set_unit_cell(real_space_a, real_space_b, real_space_c)`` sets the vectors."""
        if len(args) == 3:
            self._set_real_space(np.vstack([_vec(v, f"real_space_{k}")
                                            for v, k in zip(args, "abc")]))
        elif len(args) == 1:
            cell = args[0] if isinstance(args[0], UnitCell) else UnitCell(args[0])
            self.set_B(cell.B_matrix())
        else:
            raise TypeError("set_unit_cell takes a unit cell or three real-space vectors")

    def rotate_around_origin(self, axis, angle: float, deg: bool = True) -> None:
        """Rotate the crystal (U) right-handedly by ``angle`` about ``axis``."""
        R = _rotation_matrix(axis, float(angle) if deg else math.degrees(float(angle)))
        self._set_real_space(self._real_space() @ R.T)

    def set_A_at_scan_points(self, A_list) -> None:
        """Set the scan-varying A matrices (each 9 values, row-major)."""
        mats = [list(_tuple(_mat3(a, f"A_at_scan_points[{i}]"))) for i, a in enumerate(A_list)]
        self._data["A_at_scan_points"] = mats
        self._A_scan = None

    def reset_scan_points(self) -> None:
        """Remove the scan-varying model."""
        self._data.pop("A_at_scan_points", None)
        self._data.pop("B_covariance_at_scan_points", None)
        self._A_scan = None

    @property
    def num_scan_points(self) -> int:
        return self.get_num_scan_points()

    def set_mosaicity(self, mosaicity: float, deg: bool = True) -> None:
        m = float(mosaicity) if deg else math.degrees(float(mosaicity))
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"mosaicity must be finite and >= 0, got {mosaicity}")
        self._data["mosaicity"] = m

    def set_B_covariance(self, cov) -> None:
        c = np.asarray(cov, dtype=float).reshape(-1)
        if c.size != 81 or not np.all(np.isfinite(c)):
            raise ValueError("B_covariance must be 81 finite values (9 × 9)")
        self._data["B_covariance"] = c.tolist()

    def set_recalculated_unit_cell(self, unit_cell) -> None:
        cell = unit_cell if isinstance(unit_cell, UnitCell) else UnitCell(unit_cell)
        self._data["recalculated_unit_cell"] = list(cell.parameters())

    def get_recalculated_unit_cell(self):
        """The recalculated cell (a UnitCell), or None."""
        p = self._data.get("recalculated_unit_cell")
        return None if p is None else UnitCell(p)

    def set_recalculated_cell_parameter_sd(self, sds) -> None:
        self._data["recalculated_cell_parameter_sd"] = list(_tuple(_vec(sds, "sds", 6)))

    def get_recalculated_cell_parameter_sd(self) -> tuple:
        return tuple(float(x) for x in self._data.get("recalculated_cell_parameter_sd", ()))

    def set_recalculated_cell_volume_sd(self, sd: float) -> None:
        self._data["recalculated_cell_volume_sd"] = float(sd)

    def get_recalculated_cell_volume_sd(self) -> float:
        return float(self._data.get("recalculated_cell_volume_sd", 0.0))

    def is_similar_to(self, other: "Crystal", angle_tolerance: float = 0.01,
                      uc_rel_length_tolerance: float = 0.01,
                      uc_abs_angle_tolerance: float = 1.0) -> bool:
        """dxtbx's test: same space group, similar cells and U within ``angle_tolerance``°."""
        if self._sg != other.get_space_group():
            return False
        if not self.get_unit_cell().is_similar_to(other.get_unit_cell(),
                                                  uc_rel_length_tolerance,
                                                  uc_abs_angle_tolerance):
            return False
        U1 = np.asarray(self.get_U()).reshape(3, 3)
        U2 = np.asarray(other.get_U()).reshape(3, 3)
        cos = (np.trace(U1.T @ U2) - 1.0) / 2.0
        return math.degrees(math.acos(max(-1.0, min(1.0, cos)))) <= angle_tolerance

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


def _json_one_model_per_line(data: dict) -> str:
    """JSON with each top-level list's entries (an experiment, a beam, a crystal...) on a line
    of their own, each written by json's C encoder.

    ``json.dumps(indent=2)`` runs the pure-Python encoder: for a four-sweep ``.expt`` (1.5 MB
    of per-image crystal and scan values) that is 71 ms against 35 ms, a tenth of a small
    scaling job. The file stays valid JSON that DIALS reads, and one model per line keeps it
    easy to read and diff.
    """
    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            entries = ",\n    ".join(json.dumps(v) for v in value)
            parts.append(f"  {json.dumps(key)}: [\n    {entries}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}"


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
    def to_dict(self, deep: bool = True) -> dict:
        """The JSON dict written to ``.expt`` (independent of the models unless ``deep`` is
        False, which shares their dicts: for serialising without copies)."""
        pools: dict[str, list] = {k: [] for k in _MODEL_KEYS}
        index: dict[str, dict[int, int]] = {k: {} for k in _MODEL_KEYS}
        exps = []
        for e in self._experiments:
            ed = {"__id__": "Experiment"}
            ed.update(copy.deepcopy(e._extra) if deep else e._extra)
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
                out[key] = [_model_to_dict(m, deep) for m in pools[key]]
        for k, v in self._extra_top.items():
            out.setdefault(k, copy.deepcopy(v) if deep else v)
        return out

    def as_json(self, filename=None, compact: bool = False, split: bool = False) -> str:
        """Serialise to JSON text; write it to ``filename`` if given."""
        data = self.to_dict(deep=False)
        text = json.dumps(data) if compact else _json_one_model_per_line(data)
        if filename is not None:
            with open(os.fspath(filename), "w") as fh:
                fh.write(text)
        return text

    def as_file(self, filename) -> None:
        """Write an ``.expt`` file (see :func:`_json_one_model_per_line`)."""
        self.as_json(filename)

    @staticmethod
    def from_file(filename, check_format: bool = False) -> "ExperimentList":
        """Read an ``.expt`` / ``*_experiments.json`` file (``check_format`` is ignored:
        image files are never opened)."""
        return ExperimentListFactory.from_json_file(filename, check_format=check_format)

    @staticmethod
    def from_dict(data: dict, filename: str = "<dict>") -> "ExperimentList":
        return ExperimentListFactory.from_dict(data, filename=filename)


def _model_to_dict(m, deep: bool = True) -> Any:
    if isinstance(m, dict):
        return copy.deepcopy(m) if deep else m
    if isinstance(m, (_JsonModel, Detector)):
        return m.to_dict(deep)
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
            return ExperimentListFactory._from_own_dict(data, filename=path)
        except RecursionError:
            raise ExperimentFormatError(f"{path}: JSON nested too deeply") from None

    @staticmethod
    def from_json(text: str) -> ExperimentList:
        try:
            data = json.loads(text)
            return ExperimentListFactory._from_own_dict(data)
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
        return ExperimentListFactory._from_own_dict(copy.deepcopy(data), filename)

    @staticmethod
    def _from_own_dict(data: dict, filename: str = "<dict>") -> ExperimentList:
        """:meth:`from_dict` on a dict no caller holds (just decoded): the models take its
        parts without a copy (a deep copy of four sweeps' scan-point arrays cost ~20 ms)."""
        if not isinstance(data, dict) or not isinstance(data.get("experiment"), list):
            raise ExperimentFormatError(
                f"{filename}: not an experiment list (no 'experiment' list at top level)")
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


# --------------------------------------------------------------------------- dxtbx factories


class BeamFactory:
    """dxtbx's ``BeamFactory`` (the constructors that need no image headers)."""

    @staticmethod
    def from_dict(d: dict, t: dict | None = None) -> Beam:
        """Beam from its JSON dict, with missing keys taken from the template ``t``."""
        joint = dict(t or {})
        joint.update(d)
        return Beam(copy.deepcopy(joint))

    @staticmethod
    def make_beam(sample_to_source=None, wavelength=None, s0=None, unit_s0=None,
                  divergence=None, sigma_divergence=None) -> Beam:
        """From a direction towards the source (or ``unit_s0``) and a wavelength, or from s0."""
        if divergence is None or sigma_divergence is None:
            divergence = sigma_divergence = 0.0
        if sample_to_source is not None or unit_s0 is not None:
            if wavelength is None:
                raise ValueError("make_beam needs a wavelength with a direction")
            direction = (sample_to_source if sample_to_source is not None
                         else -_vec(unit_s0, "unit_s0"))
            return Beam(direction, float(wavelength), float(divergence), float(sigma_divergence))
        if s0 is None:
            raise ValueError("make_beam needs sample_to_source, unit_s0 or s0")
        return Beam(s0, float(divergence), float(sigma_divergence))

    @staticmethod
    def make_polarized_beam(sample_to_source=None, wavelength=None, s0=None, unit_s0=None,
                            polarization=None, polarization_fraction=None, divergence=None,
                            sigma_divergence=None, flux=None, transmission=None) -> Beam:
        if polarization is None or polarization_fraction is None:
            raise ValueError("make_polarized_beam needs polarization and polarization_fraction")
        beam = BeamFactory.make_beam(sample_to_source, wavelength, s0, unit_s0, divergence,
                                     sigma_divergence)
        beam.set_polarization_normal(polarization)
        beam.set_polarization_fraction(polarization_fraction)
        beam.set_flux(0.0 if flux is None else flux)
        beam.set_transmission(1.0 if transmission is None else transmission)
        return beam

    @staticmethod
    def simple(wavelength: float) -> Beam:
        """Beam along -z (direction towards the source +z), as dxtbx (electron wavelengths
        below 0.05 Å get an unpolarised beam)."""
        return BeamFactory.simple_directional((0.0, 0.0, 1.0), wavelength)

    @staticmethod
    def simple_directional(sample_to_source, wavelength: float) -> Beam:
        if wavelength > 0.05:
            return BeamFactory.make_beam(sample_to_source=sample_to_source, wavelength=wavelength)
        return BeamFactory.make_polarized_beam(sample_to_source=sample_to_source,
                                               wavelength=wavelength, polarization=(0, 1, 0),
                                               polarization_fraction=0.5)

    @staticmethod
    def complex(sample_to_source, polarization_fraction, polarization_plane_normal,
                wavelength) -> Beam:
        return BeamFactory.make_polarized_beam(sample_to_source=sample_to_source,
                                               wavelength=wavelength,
                                               polarization=polarization_plane_normal,
                                               polarization_fraction=polarization_fraction)


class GoniometerFactory:
    """dxtbx's ``GoniometerFactory`` (single- and multi-axis constructors)."""

    @staticmethod
    def from_dict(d: dict, t: dict | None = None) -> Goniometer:
        joint = dict(t or {})
        joint.update(d)
        return Goniometer(copy.deepcopy(joint))

    @staticmethod
    def make_goniometer(rotation_axis, fixed_rotation_matrix) -> Goniometer:
        return Goniometer(rotation_axis, fixed_rotation_matrix)

    @staticmethod
    def single_axis() -> Goniometer:
        """Rotation about +x (the dxtbx default)."""
        return Goniometer((1.0, 0.0, 0.0))

    @staticmethod
    def single_axis_reverse() -> Goniometer:
        """Rotation about -x."""
        return Goniometer((-1.0, 0.0, 0.0))

    @staticmethod
    def known_axis(axis) -> Goniometer:
        return Goniometer(axis)

    @staticmethod
    def make_multi_axis_goniometer(axes, angles, names, scan_axis: int) -> Goniometer:
        axes_list = [list(_tuple(_vec(a, f"axes[{i}]"))) for i, a in enumerate(axes)]
        return Goniometer({"axes": axes_list, "angles": [float(a) for a in angles],
                           "names": [str(n) for n in names], "scan_axis": int(scan_axis)})

    multi_axis = make_multi_axis_goniometer


class ScanFactory:
    """dxtbx's ``ScanFactory`` (``make_scan``, ``single_file``-free subset)."""

    @staticmethod
    def from_dict(d: dict, t: dict | None = None) -> Scan:
        joint = dict(t or {})
        joint.update(d)
        if "exposure_time" in joint and not isinstance(joint["exposure_time"], list):
            joint["exposure_time"] = [joint["exposure_time"]]
        joint.setdefault("batch_offset", 0)
        joint.setdefault("valid_image_ranges", {})
        return Scan(copy.deepcopy(joint))

    @staticmethod
    def make_scan(image_range, exposure_times, oscillation, epochs, batch_offset: int = 0,
                  deg: bool = True) -> Scan:
        """A scan from image range, exposure time(s), (start, width) and epochs (a list, or a
        dict keyed by image number)."""
        n = int(image_range[1]) - int(image_range[0]) + 1
        if isinstance(exposure_times, (list, tuple, np.ndarray)):
            times = [float(t) for t in exposure_times]
            if len(times) != n:  # dxtbx pads with the last value (or 0)
                times = (times + [times[-1] if times else 0.0] * n)[:n]
        else:
            times = [float(exposure_times)] * n
        return Scan(image_range, oscillation, times, epochs, batch_offset, deg)


class DetectorFactory:
    """dxtbx's ``DetectorFactory``: ``simple``, ``make_detector`` and ``from_dict``."""

    _DIRECTIONS = {"+x": (1.0, 0.0, 0.0), "-x": (-1.0, 0.0, 0.0),
                   "+y": (0.0, 1.0, 0.0), "-y": (0.0, -1.0, 0.0)}
    _SENSORS = {"PAD": "SENSOR_PAD", "CCD": "SENSOR_CCD", "IMAGE_PLATE": "SENSOR_IMAGE_PLATE",
                "UNKNOWN": "SENSOR_UNKNOWN"}

    @staticmethod
    def from_dict(d: dict, t: dict | None = None) -> Detector:
        joint = dict(t or {})
        joint.update(d)
        return Detector(copy.deepcopy(joint))

    @staticmethod
    def sensor(name: str) -> str:
        """dxtbx sensor type name for ``"PAD"``, ``"CCD"``, ... (or the name itself)."""
        key = str(name).upper().replace("SENSOR_", "")
        return DetectorFactory._SENSORS.get(key, str(name))

    @staticmethod
    def make_detector(stype, fast_axis, slow_axis, origin, pixel_size, image_size,
                      trusted_range=(0.0, 0.0), px_mm=None, name: str = "Panel",
                      thickness: float = 0.0, material: str = "", mu: float = 0.0,
                      gain=None, pedestal=None, identifier: str = "") -> Detector:
        """A one-panel detector (``px_mm`` and ``pedestal`` are accepted and not modelled)."""
        panel = {"name": name, "type": DetectorFactory.sensor(stype),
                 "fast_axis": list(_tuple(_unit(_vec(fast_axis, "fast_axis"), "fast_axis"))),
                 "slow_axis": list(_tuple(_unit(_vec(slow_axis, "slow_axis"), "slow_axis"))),
                 "origin": list(_tuple(_vec(origin, "origin"))),
                 "pixel_size": list(_tuple(_vec(pixel_size, "pixel_size", 2))),
                 "image_size": [int(x) for x in image_size],
                 "trusted_range": list(_tuple(_vec(trusted_range, "trusted_range", 2))),
                 "thickness": float(thickness), "material": str(material), "mu": float(mu),
                 "gain": 1.0 if gain is None else float(gain), "identifier": str(identifier),
                 "mask": []}
        return Detector({"panels": [panel]})

    @staticmethod
    def simple(sensor, distance: float, beam_centre, fast_direction: str, slow_direction: str,
               pixel_size, image_size, trusted_range=(0.0, 0.0), mask=(), px_mm=None,
               mu: float = 0.0, gain=None, pedestal=None, identifier: str = "") -> Detector:
        """A flat detector normal to the beam at ``distance`` mm, beam centre (mm) given
        along the fast and slow directions (``"+x"``, ``"-x"``, ``"+y"``, ``"-y"``)."""
        dirs = DetectorFactory._DIRECTIONS
        if fast_direction not in dirs or slow_direction not in dirs or (
                fast_direction[1] == slow_direction[1]):
            raise ValueError("fast_direction and slow_direction must be two of +x, -x, +y, -y "
                             "along different axes")
        fast, slow = np.array(dirs[fast_direction]), np.array(dirs[slow_direction])
        origin = -beam_centre[0] * fast - beam_centre[1] * slow + np.array([0, 0, -distance])
        detector = DetectorFactory.make_detector(sensor, fast, slow, origin, pixel_size,
                                                 image_size, trusted_range, px_mm, mu=mu,
                                                 gain=gain, identifier=identifier)
        detector[0]._data["mask"] = [list(m) for m in mask]
        return detector


class CrystalFactory:
    """dxtbx's ``CrystalFactory.from_dict``."""

    @staticmethod
    def from_dict(d: dict, t: dict | None = None) -> Crystal:
        joint = dict(t or {})
        joint.update(d)
        return Crystal(copy.deepcopy(joint))
