"""Scaled observations from a DIALS ``.refl``/``.expt`` pair or a scaled unmerged MTZ.

``ScaledObservations`` is what merging and the merged MTZ need: the original Miller index,
the scaled intensity and variance per observation, its batch and dataset, plus symmetry,
cell and wavelength. Rows are selected as ``dials.merge`` selects them (see
:func:`observations_from_reflections`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._rows import take_rows
from ..symmetry import SpaceGroup, UnitCell

__all__ = [
    "NoScaledDataError",
    "ScaledObservations",
    "observations_from_mtz",
    "observations_from_reflections",
]


class NoScaledDataError(ValueError):
    """The input holds no usable scaled observation (names the input and the reason)."""


@dataclass
class ScaledObservations:
    """Scaled, unmerged observations (one row per observation, partials combined)."""

    miller_index: np.ndarray  #: (n, 3) int32, original (unmapped) indices
    intensity: np.ndarray  #: scaled intensity
    variance: np.ndarray  #: its variance
    batch: np.ndarray  #: batch (image) number per observation
    dataset: np.ndarray  #: experiment / dataset index per observation
    space_group: SpaceGroup
    unit_cell: UnitCell
    wavelength: float
    source: str = ""  #: file(s) the data came from
    n_rows_read: int = 0  #: rows before selection
    excluded: dict = field(default_factory=dict)  #: reason -> rows not merged
    #: the row of the source table of each observation (ascending), when read from a
    #: reflection table (:func:`observations_from_reflections`); None otherwise
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.intensity)

    def d_spacings(self) -> np.ndarray:
        """d (Å) per observation."""
        return np.sqrt(1.0 / self.unit_cell.d_star_sq(self.miller_index))

    def resolution_filter(self, d_min=None, d_max=None) -> ScaledObservations:
        """The observations with d_min <= d <= d_max (limits None = open)."""
        if d_min is None and d_max is None:
            return self
        d = self.d_spacings()
        keep = np.ones(len(d), dtype=bool)
        if d_min is not None:
            keep &= d >= d_min
        if d_max is not None:
            keep &= d <= d_max
        excluded = dict(self.excluded)
        excluded["outside the resolution limits"] = int((~keep).sum())
        return ScaledObservations(self.miller_index[keep], self.intensity[keep],
                                  self.variance[keep], self.batch[keep], self.dataset[keep],
                                  self.space_group, self.unit_cell, self.wavelength,
                                  self.source, self.n_rows_read, excluded,
                                  None if self.rows is None else self.rows[keep])


def _check_usable(obs: ScaledObservations) -> ScaledObservations:
    if len(obs) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in obs.excluded.items() if v) or "empty input"
        raise NoScaledDataError(f"{obs.source}: no scaled observation to merge ({reasons})")
    return obs


def _mask_counts(masks: dict) -> tuple[np.ndarray, dict]:
    """AND of the masks (insertion order) and, per reason, the rows it removes first."""
    keep = None
    counts = {}
    for reason, mask in masks.items():
        if keep is None:
            keep = np.ones(len(mask), dtype=bool)
        counts[reason] = int((keep & ~mask).sum())
        keep &= mask
    return keep, counts


def observations_from_reflections(experiments, table, partiality_threshold: float = 0.4,
                                  source: str = "reflections") -> ScaledObservations:
    """Scaled observations from a scaled DIALS reflection table, selected as dials.merge.

    The rows and intensities are those of
    :func:`xtalscale.io.scaled_intensities.scaled_intensities` (DIALS's scaled selection:
    not ``bad_for_scaling``, g > 0, variance > 0, partiality > 0; I = value / g; partials
    combined), with dials.merge's partiality threshold (0.4). Rows with index (0, 0, 0) are
    left out. Space group, cell and wavelength come from experiment 0.

    Raises
    ------
    KeyError
        If a required column is missing.
    NoScaledDataError
        If nothing is left (the message names the step that removed the last rows).
    """
    from ..io.scaled_intensities import ScaledIntensityError, _scaled_observation_rows

    missing = [c for c in ("miller_index", "intensity.scale.value", "intensity.scale.variance",
                           "inverse_scale_factor") if c not in table]
    if missing:
        raise KeyError(f"{source}: reflection table has no column {missing[0]!r} "
                       "(is it scaled? xtalscale merge needs scaled reflections)")
    if len(experiments) == 0 or experiments[0].crystal is None:
        raise ValueError(f"{source}: the experiment list has no crystal (space group, cell)")
    n = len(table)
    if n == 0:
        raise NoScaledDataError(f"{source}: no scaled observation to merge (empty table)")
    try:
        # the rows and values alone: the Miller index, id and frame are the other columns read
        s = _scaled_observation_rows(table, partiality_threshold,
                                     with_z="batch" not in table and "xyzobs.px.value" in table)
    except ScaledIntensityError as error:
        raise NoScaledDataError(f"{source}: no scaled observation to merge ({error})") from None
    n_bad, n_selected, n_zero = s.n_bad, s.n_selected, s.n_zero
    rows, hkl, intensity, variance, dataset = s.rows, s.hkl, s.intensity, s.variance, s.dataset
    batch = (np.take(np.asarray(table["batch"]), rows).astype(np.int64, copy=False)
             if "batch" in table else _batches_from_z(experiments, table, rows, dataset, s.z))
    excluded = {"bad_for_scaling": n_bad,
                "g <= 0, variance <= 0, partiality or combined partial pieces":
                    n - n_bad - n_selected,
                "index (0, 0, 0)": n_zero}
    crystal, beam = experiments[0].crystal, experiments[0].beam
    obs = ScaledObservations(
        hkl, intensity, variance, batch, dataset,
        crystal.get_space_group(), crystal.get_unit_cell(),
        float(beam.get_wavelength()) if beam is not None else 0.0, source, n, excluded, rows)
    return _check_usable(obs)


def _batches_from_z(experiments, table, rows: np.ndarray, ids: np.ndarray,
                    z: np.ndarray | None = None) -> np.ndarray:
    """Image numbers of ``rows`` (experiment ``ids``) from the observed z (frame) when the
    table has no batch column. ``z``: the rows' frame coordinates, gathered already (a
    fresh array, worked on in place)."""
    if "xyzobs.px.value" not in table:
        return np.ones(len(rows), dtype=np.int64)
    if z is None:
        z = np.asarray(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, 2][rows]
    first = np.array([e.scan.get_image_range()[0] if e.scan is not None else 1
                      for e in experiments], dtype=np.int64)
    if len(z) and z.min() >= 0 and z.max() < np.inf:
        # (the usual frame coordinates: finite and >= 0, where truncation is the floor)
        batch = z.astype(np.int64)
    else:
        np.nan_to_num(z, copy=False)  # (z is a fresh copy: worked on in place)
        batch = np.floor(z, out=z).astype(np.int64)
    del z
    if len(first) and (first == first[0]).all():
        batch += first[0]  # (the same first image for every experiment: no gather per row)
        return batch
    in_range = len(ids) == 0 or (ids.min() >= 0 and ids.max() < len(first))
    batch += first[ids if in_range else np.clip(ids, 0, len(first) - 1)]
    return batch


def observations_from_mtz(path: Any) -> ScaledObservations:
    """Scaled observations from a scaled unmerged MTZ (AIMLESS or dials.export/scale).

    The file's scaled ``I``/``SIGI`` are used (the reader's ``intensity.scale.*`` divided by
    ``SCALEUSED``, which gives them back); rows with missing or non-positive σ, or excluded
    by the reader (rejected summed partials), are left out.

    Raises
    ------
    MtzFormatError
        For an unreadable file, a merged file, or one without ``I``/``SIGI``.
    NoScaledDataError
        If no row is usable.
    """
    from ..io.mtz import MtzFormatError, read_unmerged_mtz
    from ..reflection_table import Flags

    source = os.fspath(path)
    try:
        unmerged = read_unmerged_mtz(source)
    except KeyError as error:  # a missing column, named by the reader
        raise MtzFormatError(f"{source}: not a scaled unmerged MTZ with intensities "
                             f"({error})") from error
    table = unmerged.table
    kind = next((k for k in ("scale", "prf", "sum") if f"intensity.{k}.value" in table), None)
    if kind is None:
        raise MtzFormatError(f"{source}: no intensity column (I/SIGI or IPR/SIGIPR)")
    intensity = np.asarray(table[f"intensity.{kind}.value"], dtype=np.float64)
    variance = np.asarray(table[f"intensity.{kind}.variance"], dtype=np.float64)
    if kind == "scale" and "inverse_scale_factor" in table:
        # the reader keeps DIALS's convention: intensity.scale.* = I·g (raw), scaled = raw / g
        g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            intensity, variance = intensity / g, variance / (g * g)
    flags = np.asarray(table["flags"]).astype(np.uint64)
    hkl = np.asarray(table["miller_index"], dtype=np.int32).reshape(-1, 3)
    keep, excluded = _mask_counts({
        "bad_for_scaling": (flags & np.uint64(int(Flags.bad_for_scaling))) == 0,
        "non-finite intensity": np.isfinite(intensity),
        "variance <= 0": np.isfinite(variance) & (variance > 0),
        "index (0, 0, 0)": hkl.any(axis=1),
    })
    if kind != "scale":
        excluded["note: unscaled data (no SCALEUSED)"] = 0
    wavelength = next((e.beam.get_wavelength() for e in unmerged.experiments
                       if e.beam is not None), 0.0)
    obs = ScaledObservations(
        take_rows(hkl, keep), intensity[keep], variance[keep],
        np.asarray(table["batch"], dtype=np.int64)[keep],
        np.asarray(table["id"], dtype=np.int64)[keep],
        unmerged.space_group, unmerged.unit_cell, float(wavelength), source, len(table),
        excluded)
    return _check_usable(obs)
