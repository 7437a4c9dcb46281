"""Merged intensities: inverse-variance weighted means per unique reflection, merged-MTZ output.

The per-group sums here are the Ih table's weighted means in their simplest form (one pass,
weights 1/σ², no scales); :func:`write_merged_mtz_from_table` merges a reflection table and
writes the result with :func:`xtalscale.io.mtz.write_merged_mtz` (like ``dials.merge``).
"""
from __future__ import annotations

import os

import numpy as np

from ..experiments import ExperimentList
from ..io.mtz import _check_unmerged_input, _checked_scales, write_merged_mtz
from ..symmetry import centric_flags, group_reflections, map_to_asu, miller_array

__all__ = ["merge_intensities", "anomalous_halves", "write_merged_mtz_from_table"]


def merge_intensities(hkl, intensities, variances, space_group, anomalous: bool = False):
    """Inverse-variance weighted merge per unique (ASU) reflection (vectorised).

    Returns
    -------
    tuple
        ``(unique_hkl, mean, sigma, multiplicity)``; rows with variance <= 0 or
        non-finite values are ignored.
    """
    I = np.asarray(intensities, dtype=np.float64)
    V = np.asarray(variances, dtype=np.float64)
    hkl = miller_array(hkl, "hkl")
    if not (len(I) == len(V) == len(hkl)):
        raise ValueError(f"hkl, intensities and variances must have equal lengths "
                         f"(got {len(hkl)}, {len(I)}, {len(V)})")
    ok = np.isfinite(I) & np.isfinite(V) & (V > 0)
    m = map_to_asu(hkl[ok], space_group, anomalous=anomalous)
    g = group_reflections(m.asu_hkl)
    w = 1.0 / V[ok]
    sw = np.bincount(g.group_index, weights=w, minlength=g.n_groups)
    swi = np.bincount(g.group_index, weights=w * I[ok], minlength=g.n_groups)
    return g.unique_hkl, swi / sw, np.sqrt(1.0 / sw), g.group_sizes()


def anomalous_halves(unique_hkl, anomalous_hkl, *values) -> list:
    """Split arrays merged per anomalous ASU index into (+) and (-) halves of ``unique_hkl``.

    Parameters
    ----------
    unique_hkl : (n, 3)
        Non-anomalous ASU indices (the rows of the merged file).
    anomalous_hkl : (m, 3)
        Anomalous ASU indices, sorted as :func:`merge_intensities` returns them.
    *values : array_like (m,)
        Arrays per anomalous index.

    Returns
    -------
    list of tuples
        ``[(plus values...), (minus values...)]``, each array of length n with NaN where the
        half was not observed (for centric reflections only the (+) half exists).
    """
    keys = _hkl_key(miller_array(anomalous_hkl, "anomalous_hkl"))
    hkl = miller_array(unique_hkl, "unique_hkl")
    halves = []
    for sign in (1, -1):
        want = _hkl_key(sign * hkl)
        pos = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
        hit = keys[pos] == want if len(keys) else np.zeros(len(hkl), dtype=bool)
        halves.append(tuple(np.where(hit, np.asarray(v, dtype=np.float64)[pos], np.nan)
                            if len(keys) else np.full(len(hkl), np.nan) for v in values))
    return halves


def _hkl_key(hkl: np.ndarray) -> np.ndarray:
    """Order-preserving int64 key of signed (h, k, l) (|index| < 2**20, see miller_array)."""
    a = hkl.astype(np.int64) + (1 << 20)
    return (a[:, 0] << 42) + (a[:, 1] << 21) + a[:, 2]


def write_merged_mtz_from_table(filename, table, experiments: ExperimentList,
                                intensity: str | None = None, anomalous: bool = True,
                                duplicate_centrics: bool = False, **names) -> int:
    """Merge a reflection table and write a merged MTZ (like ``dials.merge``).

    Means are inverse-variance weighted over symmetry equivalents (rows with a
    non-positive or non-finite variance are skipped). With ``anomalous=True`` the file also
    holds ``I(+) SIGI(+) I(-) SIGI(-) N(+) N(-)``; a Bijvoet half with no observation is
    missing (NaN in all three columns). Centric reflections have only a (+) half, as in
    ``dials.merge`` output; ``duplicate_centrics=True`` copies it to (-) as AIMLESS does.

    Parameters
    ----------
    filename : str or path
    table : reflection_table
        ``miller_index``, ``id`` and ``intensity.<kind>.value/.variance``; select the rows
        to merge beforehand (e.g. integrated and not ``bad_for_scaling``). For
        ``intensity.scale`` with ``inverse_scale_factor`` present the scaled intensity
        ``value / g`` (variance ``/ g²``) is merged.
    experiments : ExperimentList
        Space group and cell from experiment 0, wavelength from its beam.
    intensity : {'scale', 'prf', 'sum'} or None
        As in :func:`write_unmerged_mtz`.
    anomalous : bool
    duplicate_centrics : bool
    **names
        ``project_name``, ``crystal_name``, ``dataset_name``.

    Returns
    -------
    int
        Number of unique reflections written.
    """
    path = os.fspath(filename)
    hkl, _, kind = _check_unmerged_input(path, table, experiments, intensity)
    crystal = experiments[0].crystal
    sg, cell = crystal.get_space_group(), crystal.get_unit_cell()
    I = np.asarray(table[f"intensity.{kind}.value"], dtype=np.float64)
    V = np.asarray(table[f"intensity.{kind}.variance"], dtype=np.float64)
    if kind == "scale" and "inverse_scale_factor" in table:
        # merge the scaled intensities raw / g (as dials.merge does)
        g = _checked_scales(table["inverse_scale_factor"], path)
        I, V = I / g, V / g**2
    uh, mean, sig, _ = merge_intensities(hkl, I, V, sg)
    if len(uh) == 0:
        raise ValueError(f"{path}: no observation has a positive variance; nothing to merge")
    wavelength = experiments[0].beam.get_wavelength() if experiments[0].beam else 0.0
    extra = {}
    if anomalous:
        ah, am, asig, an = merge_intensities(hkl, I, V, sg, anomalous=True)
        (ip, sp, nplus), (im, sm, nminus) = anomalous_halves(uh, ah, am, asig, an)
        if duplicate_centrics:
            centric = centric_flags(uh, sg)
            im, sm, nminus = (np.where(centric, a, b) for a, b in ((ip, im), (sp, sm),
                                                                   (nplus, nminus)))
        extra = dict(i_plus=ip, sigi_plus=sp, i_minus=im, sigi_minus=sm, n_plus=nplus,
                     n_minus=nminus)
    write_merged_mtz(path, uh, mean, sig, sg, cell, wavelength, **extra, **names)
    return len(uh)
