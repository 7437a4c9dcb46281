"""Which suitable reflections the model is minimised on (spec §8.3).

``use_all`` (xtalscale's automatic choice for rotation data: every suitable observation),
``random``/``quasi_random`` (DIALS's ~max(50000 reflections, 2000 groups) random groups of
multiplicity > 1 with I/σ above the cut, seeded; the multi-dataset connectivity step of
DIALS's quasi_random is not reproduced: groups are drawn across all datasets) and
``intensity_ranges`` (I/σ, d and partiality ranges). Only the minimisation uses the selection;
outlier rejection, the error model and the final scales use every suitable reflection.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .grouped import GroupedObservations

__all__ = ["calculate_scaling_subset_ranges", "choose_method", "select_for_minimisation", "select_random_groups"]


def calculate_scaling_subset_ranges(intensity: np.ndarray, variance: np.ndarray, d: np.ndarray,
                                    params: Any, partiality: np.ndarray | None = None) -> np.ndarray:
    """The preselection: I/σ in ``Isigma_range`` (0 as maximum: no upper limit), partiality above
    ``min_partiality`` and d inside ``d_range`` when set."""
    rs = params.reflection_selection
    lo, hi = rs.Isigma_range
    with np.errstate(divide="ignore", invalid="ignore"):
        isig = np.where(variance > 0, intensity / np.sqrt(np.maximum(variance, 1e-300)), 0.0)
    sel = isig > lo
    if hi:
        sel &= isig < hi
    if partiality is not None:
        sel &= partiality > rs.min_partiality
    if rs.d_range is not None:
        dmin, dmax = rs.d_range
        sel &= (d > dmin) & (d < dmax)
    return sel


def select_random_groups(grouped: GroupedObservations, n_groups: int, seed: int) -> np.ndarray:
    """Rows (bool over ``grouped``) of ``n_groups`` groups drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    n_available = grouped.n_groups
    chosen = np.sort(rng.choice(n_available, size=min(n_groups, n_available), replace=False))
    take = np.zeros(n_available, bool)
    take[chosen] = True
    return take[grouped.group_of_row()]


def choose_method(params: Any, experiments: Any) -> str:
    """``auto`` → use_all for rotation data, intensity_ranges for stills."""
    method = params.reflection_selection.method
    if method != "auto":
        return method
    return "intensity_ranges" if any(e.is_still() for e in experiments) else "use_all"


def select_for_minimisation(scaler: Any) -> None:
    """Set each dataset's ``minimisation`` mask (over its suitable rows)."""
    params = scaler.params
    method = choose_method(params, [ds.experiment for ds in scaler.datasets])
    scaler.selection_method = method
    if method == "use_all":
        for ds in scaler.datasets:
            ds.minimisation = None
        return
    pre = []
    for ds in scaler.datasets:
        p = ds.column("partiality") if "partiality" in ds.table else None
        pre.append(calculate_scaling_subset_ranges(ds.column("intensity"), ds.column("variance"),
                                                   ds.column("d"), params, p))
    if method == "intensity_ranges":
        for ds, sel in zip(scaler.datasets, pre):
            ds.minimisation = sel
        return
    # random / quasi_random: groups with multiplicity > 1 among the preselected rows
    grouped = scaler._grouped_suitable(keep=pre)
    multi = grouped.group_sizes()[grouped.group_of_row()] > 1
    if not multi.any():
        for ds in scaler.datasets:
            ds.minimisation = None        # DIALS falls back to use_all
        return
    grouped = grouped.subset(multi)
    rnd = params.reflection_selection.random
    mean_m = grouped.size / max(grouped.n_groups, 1)
    n_groups = max(int(math.ceil(rnd.min_reflections / mean_m)), int(rnd.min_groups))
    rows = select_random_groups(grouped, n_groups, int(params.reflection_selection.seed))
    per_ds = grouped.rows_per_dataset(np.flatnonzero(rows))
    for k, ds in enumerate(scaler.datasets):
        # rows_per_dataset gives rows of the preselected arrays: map back to suitable rows
        suitable_rows = np.flatnonzero(pre[k])[per_ds[k]]
        mask = np.zeros(int(ds.suitable.sum()), bool)
        mask[suitable_rows] = True
        ds.minimisation = mask
