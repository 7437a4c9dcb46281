"""Merging scaled observations into unique reflections, with French–Wilson amplitudes.

:func:`merge_observations` does what ``dials.merge`` does between the scaled reflections and
the merged MTZ: inverse-variance weighted means (IMEAN, SIGIMEAN, N), the same for each
Bijvoet half (I(+), I(-), their σ and N(±); centric reflections only in the (+) half), and
French–Wilson amplitudes (on the anomalous array when ``anomalous``: F(±) and SIGF(±), then F
as the inverse-variance mean of F(+) and F(-) and DANO = F(+) - F(-) with
SIGDANO = √(σF(+)² + σF(-)²) for acentric pairs; on the mean intensities otherwise).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..symmetry import SpaceGroup, UnitCell, centric_flags
from .french_wilson import french_wilson
from .observations import NoScaledDataError, ScaledObservations

__all__ = ["MergedData", "merge_observations", "write_merged_mtz"]

logger = logging.getLogger(__name__)


@dataclass
class MergedData:
    """Merged reflections (one row per unique ASU index; NaN = not available)."""

    miller_index: np.ndarray
    columns: dict  #: MTZ label -> array, in dials.merge's column order
    space_group: SpaceGroup
    unit_cell: UnitCell
    wavelength: float
    n_observations: int
    truncation: dict = field(default_factory=dict)  #: French–Wilson summary

    def __len__(self) -> int:
        return len(self.miller_index)


def _amplitudes_from_intensities(hkl, intensity, sigma, space_group, unit_cell,
                                 min_reflections: int, fallback_to_flat_prior: bool,
                                 max_bins: int, n_threads: int = 1):
    """French–Wilson on one merged array; returns (F, σF, summary)."""
    finite = np.isfinite(intensity)
    n = int(finite.sum())
    flat = n < min_reflections
    if flat and not fallback_to_flat_prior:
        raise NoScaledDataError(
            f"only {n} merged reflections: too few for the French-Wilson prior "
            f"(french_wilson.min_reflections={min_reflections}); set "
            "french_wilson.fallback_to_flat_prior=True or truncate=False")
    d_star_cubed = unit_cell.d_star_sq(hkl) ** 1.5
    result = french_wilson(intensity, sigma, d_star_cubed, centric_flags(hkl, space_group),
                           max_bins=max_bins, flat_prior=flat, n_threads=n_threads)
    summary = {"prior": "flat positive" if flat else "Wilson (French & Wilson 1978)",
               "n_input": n, "n_rejected": int(n - result.valid.sum())}
    return result.amplitude, result.sigma_amplitude, summary


def merge_observations(observations: ScaledObservations, anomalous: bool = True,
                       truncate: bool = True, min_reflections: int = 200,
                       fallback_to_flat_prior: bool = True,
                       max_bins: int = 60, groups=None, log: bool = True,
                       n_threads: int = 1) -> MergedData:
    """Merge scaled observations (see the module docstring).

    Parameters
    ----------
    observations : ScaledObservations
    anomalous : bool
        Also merge each Bijvoet half (I(+), I(-), ...) and truncate the anomalous array.
    truncate : bool
        Add French–Wilson amplitudes (F, SIGF; F(±), SIGF(±), DANO, SIGDANO if anomalous).
    min_reflections, fallback_to_flat_prior, max_bins
        French–Wilson options (as dials.merge's ``french_wilson`` scope).
    groups : xtalscale.stats.ObservationGroups, optional
        The grouping of these observations (with σ = sqrt(variance)) made for their
        statistics (:attr:`xtalscale.report.ReportInputs.observation_groups`): the mean
        intensities are merged on it instead of mapping and sorting the indices again.
    log : bool
        Log the counts (:func:`log_merged`); a caller merging on another thread logs them
        itself once the result is in, so that its log keeps its order.
    n_threads : int
        Threads of the French–Wilson integrals (the same results for any count).

    Returns
    -------
    MergedData
    """
    from ..io.mtz import anomalous_halves, merge_intensities

    obs = observations
    if len(obs) == 0:
        raise NoScaledDataError(f"{obs.source}: no observations to merge")
    sg, cell = obs.space_group, obs.unit_cell
    hkl, imean, sigimean, n = merge_intensities(obs.miller_index, obs.intensity, obs.variance, sg,
                                                grouping=_grouping_of(groups, obs))
    columns = {"IMEAN": imean, "SIGIMEAN": sigimean, "N": n.astype(np.float64)}
    truncation = {}
    if truncate and not anomalous:
        f, sigf, truncation = _amplitudes_from_intensities(
            hkl, imean, sigimean, sg, cell, min_reflections, fallback_to_flat_prior, max_bins,
            n_threads)
        columns.update({"F": f, "SIGF": sigf})
    if anomalous:
        ahkl, ai, asig, an = merge_intensities(obs.miller_index, obs.intensity, obs.variance,
                                               sg, anomalous=True)
        (ip, sp, nplus), (im, sm, nminus) = anomalous_halves(hkl, ahkl, ai, asig,
                                                             an.astype(np.float64))
        anomalous_columns = {"I(+)": ip, "SIGI(+)": sp, "I(-)": im, "SIGI(-)": sm,
                             "N(+)": nplus, "N(-)": nminus}
        if truncate:
            af, asigf, truncation = _amplitudes_from_intensities(
                ahkl, ai, asig, sg, cell, min_reflections, fallback_to_flat_prior, max_bins,
                n_threads)
            (fp, sfp), (fm, sfm) = anomalous_halves(hkl, ahkl, af, asigf)
            columns.update(_mean_amplitude(fp, sfp, fm, sfm))
            anomalous_columns.update({"F(+)": fp, "SIGF(+)": sfp, "F(-)": fm, "SIGF(-)": sfm})
            centric = centric_flags(hkl, sg)
            pair = np.isfinite(fp) & np.isfinite(fm) & ~centric
            anomalous_columns["DANO"] = np.where(pair, fp - fm, np.nan)
            anomalous_columns["SIGDANO"] = np.where(pair, np.hypot(sfp, sfm), np.nan)
        columns.update(anomalous_columns)
    merged = MergedData(hkl, columns, sg, cell, obs.wavelength, len(obs), truncation)
    if log:
        log_merged(merged)
    return merged


def log_merged(merged: MergedData) -> None:
    """Log (debug) how many observations were merged into how many unique reflections."""
    logger.debug("merged %d observations into %d unique reflections", merged.n_observations, len(merged))


def _grouping_of(groups, obs: ScaledObservations):
    """The grouping of ``groups`` if they were made from these observations' usable rows
    (finite I, variance > 0: those with a finite σ > 0), else None (the merge groups)."""
    if groups is None:
        return None
    usable = np.isfinite(obs.intensity) & np.isfinite(obs.variance) & (obs.variance > 0)
    if groups.n_input != len(obs) or not np.array_equal(np.flatnonzero(usable),
                                                        groups.usable_rows):
        raise ValueError("merge_observations: the groups were not made from these "
                         "observations")
    return groups.grouping


def _mean_amplitude(fp, sfp, fm, sfm) -> dict:
    """F, SIGF: inverse-variance mean of the valid Bijvoet-half amplitudes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        wp = np.where(np.isfinite(fp) & (sfp > 0), 1.0 / sfp ** 2, 0.0)
        wm = np.where(np.isfinite(fm) & (sfm > 0), 1.0 / sfm ** 2, 0.0)
        total = wp + wm
        f = (wp * np.nan_to_num(fp) + wm * np.nan_to_num(fm)) / total
        sigf = np.sqrt(1.0 / total)
    none = total == 0
    return {"F": np.where(none, np.nan, f), "SIGF": np.where(none, np.nan, sigf)}


def write_merged_mtz(path, merged: MergedData, project_name: str = "xtalscale",
                     crystal_name: str = "XTAL", dataset_name: str = "NATIVE") -> None:
    """Write :class:`MergedData` as a merged MTZ (gemmi; column types as dials.merge)."""
    from ..io import mtz

    c = merged.columns
    mtz.write_merged_mtz(
        path, merged.miller_index, c["IMEAN"], c["SIGIMEAN"], merged.space_group,
        merged.unit_cell, merged.wavelength,
        i_plus=c.get("I(+)"), sigi_plus=c.get("SIGI(+)"), i_minus=c.get("I(-)"),
        sigi_minus=c.get("SIGI(-)"), n_plus=c.get("N(+)"), n_minus=c.get("N(-)"),
        n=c.get("N"), f=c.get("F"), sigf=c.get("SIGF"), f_plus=c.get("F(+)"),
        sigf_plus=c.get("SIGF(+)"), f_minus=c.get("F(-)"), sigf_minus=c.get("SIGF(-)"),
        dano=c.get("DANO"), sigdano=c.get("SIGDANO"), project_name=project_name,
        crystal_name=crystal_name, dataset_name=dataset_name)
