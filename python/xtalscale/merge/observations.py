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
                                  self.source, self.n_rows_read, excluded)


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


def _combine_partials(partial_id: np.ndarray, columns: dict) -> tuple[np.ndarray, dict]:
    """Sum intensity, variance and partiality over rows sharing a partial_id.

    Returns the index of each group's first row (for the per-reflection columns such as
    Miller index and batch) and the summed columns.
    """
    from .._core import grouping

    _, group_index, offsets = grouping.group_keys(partial_id.astype(np.int64))
    n_groups = len(offsets) - 1
    first = np.full(n_groups, len(partial_id), dtype=np.int64)
    np.minimum.at(first, group_index, np.arange(len(partial_id)))
    summed = {k: np.bincount(group_index, weights=v, minlength=n_groups)
              for k, v in columns.items()}
    return first, summed


def observations_from_reflections(experiments, table, partiality_threshold: float = 0.4,
                                  source: str = "reflections") -> ScaledObservations:
    """Scaled observations from a scaled DIALS reflection table, selected as dials.merge.

    Rows are kept when not ``bad_for_scaling`` (user-excluded, excluded for scaling,
    outlier), with ``inverse_scale_factor`` > 0, a finite intensity, variance > 0 and
    index ≠ (0, 0, 0). The scaled intensity is ``intensity.scale.value / g`` with variance
    ``intensity.scale.variance / g²``. Partials sharing a ``partial_id`` are summed
    (intensity, variance, partiality) and reflections with summed partiality below
    ``partiality_threshold`` are left out. Space group and cell come from experiment 0.

    Raises
    ------
    KeyError
        If a required column is missing.
    NoScaledDataError
        If nothing is left.
    """
    from ..reflection_table import Flags

    for name in ("miller_index", "intensity.scale.value", "intensity.scale.variance",
                 "inverse_scale_factor"):
        if name not in table:
            raise KeyError(f"{source}: reflection table has no column {name!r} "
                           "(is it scaled? xtalscale merge needs scaled reflections)")
    if len(experiments) == 0 or experiments[0].crystal is None:
        raise ValueError(f"{source}: the experiment list has no crystal (space group, cell)")
    n = len(table)
    hkl = np.asarray(table["miller_index"], dtype=np.int32).reshape(-1, 3)
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    value = np.asarray(table["intensity.scale.value"], dtype=np.float64)
    variance = np.asarray(table["intensity.scale.variance"], dtype=np.float64)
    flags = (np.asarray(table["flags"]).astype(np.uint64) if "flags" in table
             else np.zeros(n, dtype=np.uint64))
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity, scaled_variance = value / g, variance / (g * g)
    keep, excluded = _mask_counts({
        "bad_for_scaling": (flags & np.uint64(int(Flags.bad_for_scaling))) == 0,
        "inverse_scale_factor <= 0": g > 0,
        "non-finite intensity": np.isfinite(intensity),
        "variance <= 0": np.isfinite(scaled_variance) & (scaled_variance > 0),
        "index (0, 0, 0)": hkl.any(axis=1),
    })
    rows = np.flatnonzero(keep)
    batch = (np.asarray(table["batch"], dtype=np.int64) if "batch" in table
             else _batches_from_z(experiments, table))
    dataset = np.asarray(table["id"], dtype=np.int64) if "id" in table else np.zeros(n, int)
    partiality = (np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table
                  else np.ones(n))
    if "partial_id" in table:
        first, summed = _combine_partials(
            np.asarray(table["partial_id"])[rows],
            {"i": intensity[rows], "v": scaled_variance[rows], "p": partiality[rows]})
        rows = rows[first]
        intensity_sel, variance_sel, partiality_sel = summed["i"], summed["v"], summed["p"]
        excluded["partial pieces combined"] = int(keep.sum() - len(rows))
    else:
        intensity_sel, variance_sel = intensity[rows], scaled_variance[rows]
        partiality_sel = partiality[rows]
    full = partiality_sel >= partiality_threshold
    excluded[f"partiality < {partiality_threshold}"] = int((~full).sum())
    rows = rows[full]
    crystal = experiments[0].crystal
    beam = experiments[0].beam
    obs = ScaledObservations(
        hkl[rows], intensity_sel[full], variance_sel[full], batch[rows], dataset[rows],
        crystal.get_space_group(), crystal.get_unit_cell(),
        float(beam.get_wavelength()) if beam is not None else 0.0, source, n, excluded)
    return _check_usable(obs)


def _batches_from_z(experiments, table) -> np.ndarray:
    """Image numbers from the observed z (frame) when the table has no batch column."""
    n = len(table)
    if "xyzobs.px.value" not in table:
        return np.ones(n, dtype=np.int64)
    z = np.asarray(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, 2]
    ids = np.asarray(table["id"], dtype=np.int64) if "id" in table else np.zeros(n, int)
    first = np.array([e.scan.get_image_range()[0] if e.scan is not None else 1
                      for e in experiments], dtype=np.int64)
    safe = np.clip(ids, 0, len(first) - 1)
    return np.floor(np.nan_to_num(z)).astype(np.int64) + first[safe]


def observations_from_mtz(path: Any) -> ScaledObservations:
    """Scaled observations from a scaled unmerged MTZ (AIMLESS or dials.export/scale).

    ``I``/``SIGI`` are used as they are (already scaled); rows with missing or non-positive
    σ, or excluded by the reader (rejected summed partials), are left out.

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
        hkl[keep], intensity[keep], variance[keep],
        np.asarray(table["batch"], dtype=np.int64)[keep],
        np.asarray(table["id"], dtype=np.int64)[keep],
        unmerged.space_group, unmerged.unit_cell, float(wavelength), source, len(table),
        excluded)
    return _check_usable(obs)
