"""Outlier rejection as dials.scale does it (spec §8.4), per-group work in C++.

Methods
-------
``standard``
    Iterative: in each group of more than two observations the observation with the largest
    leave-one-out normalised deviation is an outlier if that exceeds ``zmax``; the next round
    looks again at the groups that had one, without it, until no new outlier appears.
``simple``
    One pass against the group mean that includes the observation (DIALS's denominator).
``target``
    Deviations from a reference's Ĩ: ``z = (I − g Ĩ_t)/sqrt(σ² + g² σ_t²)``.

Weights are DIALS's: 1/σ² (or the error model's), each capped at 10× its group's median.
E² (Wilson) outliers: :func:`determine_Esq_outlier_index_arrays`.

The DIALS-shaped names (``NormDevOutlierRejection`` ...) take a :class:`GroupedObservations`
(or, through :func:`as_grouped`, an object offering ``as_grouped_observations()``) and give
``final_outlier_arrays``: one array of table rows per dataset, in detection order.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._core import job as _kern
from ..symmetry import hkl_keys
from .grouped import GroupedObservations

__all__ = [
    "OUTLIER_METHODS",
    "NormDevOutlierRejection",
    "OutlierRejectionBase",
    "SimpleNormDevOutlierRejection",
    "TargetedOutlierRejection",
    "as_grouped",
    "determine_Esq_outlier_index_arrays",
    "determine_outlier_index_arrays",
    "determine_outlier_rows",
    "limit_outlier_weights",
    "quasi_normalised_intensities",
    "reject_outliers",
]

OUTLIER_METHODS = ("standard", "simple", "target")


def as_grouped(Ih_table: Any) -> GroupedObservations:
    """A :class:`GroupedObservations` from one, or from an object that can give one."""
    if isinstance(Ih_table, GroupedObservations):
        return Ih_table
    convert = getattr(Ih_table, "as_grouped_observations", None)
    if convert is not None:
        return convert()
    raise TypeError(f"expected GroupedObservations or an Ih table offering "
                    f"as_grouped_observations(), got {type(Ih_table).__name__}")


def limit_outlier_weights(weights: np.ndarray, grouped: GroupedObservations) -> np.ndarray:
    """DIALS's cap: each weight at most 10× its group's median weight."""
    return _kern.limit_outlier_weights(grouped.order, grouped.offsets,
                                       np.asarray(weights, dtype=np.float64))


def _check_zmax(zmax: float) -> float:
    zmax = float(zmax)
    if not np.isfinite(zmax) or zmax <= 0:
        raise ValueError(f"zmax must be positive and finite (got {zmax})")
    return zmax


def _standard(grouped: GroupedObservations, zmax: float, n_threads: int = 1) -> np.ndarray:
    """Positions (into ``grouped``) of the standard method's outliers, in detection order.

    One C++ call runs DIALS's rounds: each group is re-examined without its outlier until it
    gives none (the weights re-capped every round), which is what regrouping the potential
    outliers and testing again does. The groups go over ``n_threads`` threads in fixed chunks
    (the same rows in the same order for any thread count)."""
    return _kern.standard_outlier_rows(grouped.order, grouped.offsets, grouped.intensity,
                                       np.asarray(grouped.weight, dtype=np.float64), grouped.scale, zmax,
                                       n_threads=max(1, int(n_threads)))


def _simple(grouped: GroupedObservations, zmax: float) -> np.ndarray:
    w = limit_outlier_weights(grouped.weight, grouped)
    z = _kern.normdev_simple(grouped.order, grouped.offsets, grouped.intensity, w, grouped.scale)
    return np.flatnonzero(np.abs(z) > zmax)


def _targeted(grouped: GroupedObservations, zmax: float, target: GroupedObservations) -> np.ndarray:
    target_means = target.group_means()
    first = target.order[target.offsets[:-1]]
    target_keys = hkl_keys(target.asu_hkl[first])
    sum_wgg = target.sum_in_groups(target.weight * target.scale ** 2)
    target_var = np.divide(1.0, sum_wgg, out=np.zeros_like(sum_wgg), where=sum_wgg > 0)
    keys = hkl_keys(grouped.asu_hkl)
    sorter = np.argsort(target_keys)
    pos = np.searchsorted(target_keys, keys, sorter=sorter)
    pos = np.minimum(pos, max(target_keys.size - 1, 0))
    matched = target_keys.size > 0
    if not matched:
        return np.zeros(0, dtype=np.int64)
    hit = target_keys[sorter[pos]] == keys
    t = sorter[pos]
    g = grouped.scale
    z = np.zeros(grouped.size)
    denom = np.sqrt(grouped.variance + g * g * target_var[t])
    z[hit] = (grouped.intensity[hit] - g[hit] * target_means[t][hit]) / denom[hit]
    return np.flatnonzero(hit & (np.abs(z) > zmax))


def determine_outlier_rows(grouped: GroupedObservations, method: str = "standard",
                           zmax: float = 6.0, target: GroupedObservations | None = None,
                           n_threads: int = 1) -> np.ndarray:
    """Positions (into ``grouped``) of the outliers, in detection order (the standard method
    on ``n_threads`` threads; the same result for any thread count).

    Raises
    ------
    ValueError
        Unknown method, bad zmax, or ``target`` missing for the target method.
    """
    zmax = _check_zmax(zmax)
    if method == "standard":
        return _standard(grouped, zmax, n_threads)
    if method == "simple":
        return _simple(grouped, zmax)
    if method == "target":
        if target is None:
            raise ValueError("the target outlier method needs a target table")
        return _targeted(grouped, zmax, as_grouped(target))
    raise ValueError(f"unknown outlier rejection method {method!r} "
                     f"(choose from {', '.join(OUTLIER_METHODS)})")


def determine_outlier_index_arrays(Ih_table: Any, method: str | None = "standard",
                                   zmax: float = 6.0, target: Any = None) -> list[np.ndarray]:
    """DIALS: one array of outlier rows per dataset (``method=None``: no outliers)."""
    grouped = as_grouped(Ih_table)
    if method is None:
        return [np.zeros(0, dtype=np.int64) for _ in range(grouped.n_datasets)]
    rows = determine_outlier_rows(grouped, method, zmax, target)
    return grouped.rows_per_dataset(rows)


class OutlierRejectionBase:
    """DIALS's outlier-rejection interface: ``run()`` then ``final_outlier_arrays``."""

    method = ""

    def __init__(self, Ih_table: Any, zmax: float) -> None:
        self.grouped = as_grouped(Ih_table)
        self.zmax = _check_zmax(zmax)
        self.final_outlier_arrays: list[np.ndarray] = []

    def run(self) -> None:
        self.final_outlier_arrays = self.grouped.rows_per_dataset(self._outlier_rows())

    def _outlier_rows(self) -> np.ndarray:
        return determine_outlier_rows(self.grouped, self.method, self.zmax)


class NormDevOutlierRejection(OutlierRejectionBase):
    """Iterative leave-one-out normalised deviations (``standard``)."""

    method = "standard"


class SimpleNormDevOutlierRejection(OutlierRejectionBase):
    """One pass against the group mean including the observation (``simple``)."""

    method = "simple"


class TargetedOutlierRejection(OutlierRejectionBase):
    """Deviations from a reference table's Ĩ (``target``)."""

    method = "target"

    def __init__(self, Ih_table: Any, zmax: float, target: Any) -> None:
        super().__init__(Ih_table, zmax)
        self.target = as_grouped(target)

    def _outlier_rows(self) -> np.ndarray:
        return determine_outlier_rows(self.grouped, "target", self.zmax, self.target)


def quasi_normalised_intensities(intensity: np.ndarray, d: np.ndarray, epsilon: np.ndarray) -> np.ndarray:
    """E² = I / (ε N(d)): N is the mean of I/ε (negatives as 0) in 10/15/20 equal-d*² bins
    (more than 15000 / 20000 reflections), interpolated linearly in d* between the centres of
    the non-empty bins and held constant beyond the outer centres."""
    intensity = np.asarray(intensity, dtype=np.float64)
    n = intensity.size
    if n == 0:
        return np.zeros(0)
    bins = _resolution_bins(np.arange(n), np.asarray(d, dtype=np.float64), np.asarray(epsilon, dtype=np.float64))
    return _quasi_normalised(intensity, bins)


class _ResolutionBins(NamedTuple):
    """What E² needs of the indices: per row the d*² bin and ε, per group d*² (for N)."""

    group: np.ndarray
    which: np.ndarray
    epsilon: np.ndarray
    counts: np.ndarray
    d_star_sq: np.ndarray
    lo: float
    step: float


def _resolution_bins(group: np.ndarray, d: np.ndarray, epsilon: np.ndarray) -> _ResolutionBins:
    """The bins of :func:`quasi_normalised_intensities` for rows in groups (row i in group
    ``group[i]``, every group has a row) of resolution ``d`` and ε ``epsilon`` (per group)."""
    n = group.size
    n_bins = 20 if n > 20000 else 15 if n > 15000 else 10
    dss = 1.0 / d ** 2
    lo, hi = dss.min(), dss.max()
    span = hi - lo
    lo, hi = lo - 1e-6 * span, hi + 1e-6 * span
    step = (hi - lo) / n_bins if hi > lo else 1.0
    which = np.clip(((dss - lo) / step).astype(np.int64), 0, n_bins - 1)[group]
    return _ResolutionBins(group, which, epsilon[group], np.bincount(which, minlength=n_bins), dss, lo, step)


def _group_norms(sums: np.ndarray, bins: _ResolutionBins) -> np.ndarray:
    """N per group from the bins' sums of max(I, 0)/ε (interpolated between the centres of the
    non-empty bins)."""
    filled = bins.counts > 0
    means = sums[filled] / bins.counts[filled]
    centres = np.sqrt(bins.lo + (np.flatnonzero(filled) + 0.5) * bins.step)
    return np.interp(np.sqrt(bins.d_star_sq), centres, means)


def _quasi_normalised(intensity: np.ndarray, bins: _ResolutionBins) -> np.ndarray:
    """E² of per-row intensities in :func:`_resolution_bins`'s bins (the two per-row passes in
    C++, the interpolation per group here)."""
    intensity = np.asarray(intensity, dtype=np.float64)
    norm = _group_norms(_kern.esq_bin_sums(intensity, bins.epsilon, bins.which, bins.counts.size), bins)
    return _kern.esq_values(intensity, bins.epsilon, bins.group, norm)


def _esq_rows_above(intensity: np.ndarray, scale: np.ndarray, bins: _ResolutionBins, threshold: float,
                    n_threads: int = 1) -> np.ndarray:
    """Rows (ascending) whose E² of the scaled intensities I/g exceeds ``threshold``: what
    ``np.flatnonzero(_quasi_normalised(I / g, bins) > threshold)`` gives, in two C++ passes
    without the arrays of I/g and E² (the second on ``n_threads`` threads)."""
    sums = _kern.esq_scaled_bin_sums(intensity, scale, bins.epsilon, bins.which, bins.counts.size)
    return _kern.esq_rows_above(intensity, scale, bins.epsilon, bins.group, _group_norms(sums, bins),
                                float(threshold), n_threads=max(1, int(n_threads)))


def determine_Esq_outlier_index_arrays(Ih_table: Any, experiment: Any, emax: float = 10.0,
                                       n_threads: int = 1) -> list[np.ndarray]:
    """Rows (per dataset) whose normalised scaled intensity E² exceeds emax² (the last pass on
    ``n_threads`` threads: the same rows for any count)."""
    grouped = as_grouped(Ih_table)
    cell = experiment.crystal.get_unit_cell()
    sg = experiment.crystal.get_space_group()
    from ..symmetry import SpaceGroup, UnitCell

    cell = cell if isinstance(cell, UnitCell) else UnitCell(cell.parameters())
    sg = sg if isinstance(sg, SpaceGroup) else SpaceGroup(str(sg.info()) if hasattr(sg, "info") else str(sg))
    if grouped.size == 0:
        return grouped.rows_per_dataset(np.zeros(0, dtype=np.int64))

    def bins() -> _ResolutionBins:
        # d and ε depend on the ASU index only: once per group
        unique_hkl = grouped.asu_hkl[grouped.order[grouped.offsets[:-1]]]
        return _resolution_bins(grouped.group_of_row(), np.asarray(cell.d(unique_hkl), dtype=np.float64),
                                np.asarray(sg.epsilon(unique_hkl), dtype=np.float64))

    # the scaler's successive rounds share the grouping: the bins are made once
    key = ("Esq bins", tuple(cell.parameters()), sg.hall_symbol())
    rows = _esq_rows_above(grouped.intensity, grouped.scale, grouped.derived_of_grouping(key, bins),
                           float(emax) ** 2, n_threads)
    return grouped.rows_per_dataset(rows)


def reject_outliers(reflection_table: Any, experiment: Any, method: str = "standard",
                    zmax: float = 6.0) -> Any:
    """Flag ``outlier_in_scaling`` on a table (existing outlier flags are replaced).

    The table needs ``intensity``, ``variance`` and ``miller_index`` (``inverse_scale_factor``
    defaults to 1); rows flagged excluded are not tested.

    Raises
    ------
    AssertionError, KeyError
        If the ``intensity`` or ``variance`` column is missing (DIALS raises AssertionError).
    """
    from ..reflection_table import Flags

    for name in ("intensity", "variance", "miller_index"):
        if name not in reflection_table:
            raise _MissingColumn(f"reject_outliers needs the column '{name}'")
    grouped = GroupedObservations.from_tables([reflection_table], experiment.crystal.get_space_group())
    rows = determine_outlier_index_arrays(grouped, method, zmax)[0]
    flags = np.zeros(len(reflection_table), dtype=bool)
    flags[rows] = True
    reflection_table.assign_flags(flags, Flags.outlier_in_scaling)
    return reflection_table


class _MissingColumn(AssertionError, KeyError):
    """A required column is absent (an AssertionError as in DIALS, and a KeyError)."""
