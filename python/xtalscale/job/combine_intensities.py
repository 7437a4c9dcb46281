"""Profile/summation intensity combination with the Imid search (dials.scale, spec §8.5).

For each candidate midpoint Imid the combined intensity is
``w·I_prf + (1 − w)·I_sum`` with ``w = 1/(1 + (I_sum/Imid)³)`` (w = 1 where I_sum ≤ 0), 0 meaning
profile only and 1 summation only; the candidate whose scaled, merged data have the lowest
Rmeas (internal-variance merging, rows with σ > 0 and I/σ > 1) is applied to every suitable row.
Per-group sums run in C++ (:mod:`xtalscale._core.job`).

DIALS compares the candidates on the scales of the first round, which were fitted to the
profile intensities: every other candidate is judged with scales that were not fitted to it, so
the comparison leans towards profile. On the four l-cysteine sweeps it picks profile (Rmeas
0.0365 vs 0.0376 for sum), yet scaling the sums gives the better data (final Rmeas 0.0341 vs
0.0374). With ``reflection_selection.combine.refit_candidates`` (our default) each candidate's
Rmeas is taken after a short refit of the models to that candidate's intensities, from the
current parameters, on the round's minimisation rows; the models and tables are then restored.
``refit_candidates=False`` is DIALS's comparison.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import flex_arrays as fa
from .._core import job as _kern
from ..reflection_table import Flags
from .grouped import GroupedObservations, asu_grouping
from .prepare import flags_of

__all__ = [
    "calculate_combined_raw_intensities",
    "candidate_Imids",
    "combine_intensities",
    "combine_scaler_intensities",
    "rmeas_of",
]

logger = logging.getLogger("xtalscale.scale")


def calculate_combined_raw_intensities(Iprf: np.ndarray, Isum: np.ndarray, Vprf: np.ndarray,
                                       Vsum: np.ndarray, Imid: float) -> tuple[np.ndarray, np.ndarray]:
    """Combined I and V for one midpoint (0: profile, 1: summation)."""
    if Imid == 0:
        return Iprf.copy(), Vprf.copy()
    if Imid == 1:
        return Isum.copy(), Vsum.copy()
    with np.errstate(over="ignore"):
        w = np.where(Isum > 0, 1.0 / (1.0 + (np.maximum(Isum, 0) / Imid) ** 3), 1.0)
    return w * Iprf + (1 - w) * Isum, w * Vprf + (1 - w) * Vsum


def candidate_Imids(Isum_over_p: np.ndarray) -> list[float]:
    """[0, 1, avg, Imid, Imid/10, ...] while above avg = max(10, mean(I_sum/p))."""
    avg = max(10.0, float(np.mean(Isum_over_p)))
    Imid = float(np.max(Isum_over_p)) / 10.0
    out = [0.0, 1.0, avg, Imid]
    while Imid > avg:
        Imid /= 10.0
        out.append(Imid)
    return out


def rmeas_of(grouped: GroupedObservations, intensity: np.ndarray, variance: np.ndarray) -> float:
    """Rmeas of scaled intensities I/g (weights 1/σ²), rows with σ > 0 and I/σ > 1; −1 on failure."""
    return _rmeas(grouped.order, grouped.offsets, intensity, variance, grouped.scale)


def _rmeas(order: np.ndarray, offsets: np.ndarray, intensity: np.ndarray, variance: np.ndarray,
           scale: np.ndarray) -> float:
    """:func:`rmeas_of` on a grouping: the per-group sums over the usable rows in one C++ pass
    (no subset is made), the sum over groups of more than one usable row here."""
    n_used, absdev, total = _kern.rmeas_group_sums(order, offsets, np.asarray(intensity, dtype=np.float64),
                                                   np.asarray(variance, dtype=np.float64), scale)
    if n_used.sum() < 2:
        return -1.0
    multi = n_used > 1
    if not multi.any():
        return -1.0
    n = n_used[multi].astype(np.float64)
    num = np.sum(np.sqrt(n / (n - 1.0)) * absdev[multi])
    den = np.sum(total[multi])
    return float(num / den) if den > 0 else -1.0


def _combination_inputs(tables: Sequence[Any], selections: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Profile and summation I and V (prescaling correction and partiality applied), g and the
    Miller index of the selected rows, tables one after the other."""
    parts: dict[str, list] = {k: [] for k in ("Iprf", "Isum", "Vprf", "Vsum", "g", "hkl")}
    for t, sel in zip(tables, selections):
        conv = np.asarray(t["prescaling_correction"], dtype=np.float64)[sel] if "prescaling_correction" in t \
            else np.ones(int(sel.sum()))
        p = np.asarray(t["partiality"], dtype=np.float64)[sel] if "partiality" in t else np.ones(int(sel.sum()))
        parts["Iprf"].append(np.asarray(t["intensity.prf.value"], float)[sel] * conv)
        parts["Vprf"].append(np.asarray(t["intensity.prf.variance"], float)[sel] * conv ** 2)
        parts["Isum"].append(np.asarray(t["intensity.sum.value"], float)[sel] * conv / p)
        parts["Vsum"].append(np.asarray(t["intensity.sum.variance"], float)[sel] * (conv / p) ** 2)
        parts["g"].append(np.asarray(t["inverse_scale_factor"], float)[sel])
        parts["hkl"].append(np.asarray(t["miller_index"]).reshape(-1, 3)[sel])
    arr = {k: np.concatenate(v) for k, v in parts.items()}
    for name, key in (("intensity.sum.value", "Isum"), ("inverse_scale_factor", "g")):
        if not np.all(np.isfinite(arr[key])):
            bad = int(np.flatnonzero(~np.isfinite(arr[key]))[0])
            raise ValueError(f"column '{name}' is not finite at selected row {bad}")
    return arr


def _best_Imid(order: np.ndarray, offsets: np.ndarray, arr: dict[str, np.ndarray],
               Imids: Sequence[float] | None) -> tuple[float, dict[float, float]]:
    """The candidate with the lowest Rmeas (``arr``'s rows grouped by ``order``/``offsets``)."""
    candidates = list(Imids) if Imids else candidate_Imids(arr["Isum"])
    results = {}
    for Imid in candidates:
        I, V = calculate_combined_raw_intensities(arr["Iprf"], arr["Isum"], arr["Vprf"], arr["Vsum"], Imid)
        results[float(Imid)] = _rmeas(order, offsets, I, V, arr["g"])
    valid = {k: v for k, v in results.items() if v >= 0}
    best = min(valid, key=valid.get) if valid else 0.0
    return best, results


def combine_intensities(tables: Sequence[Any], space_group: Any, selections: Sequence[np.ndarray],
                        Imids: Sequence[float] | None = None) -> tuple[float, dict[float, float]]:
    """The best Imid for ``tables`` (rows ``selections``), and the Rmeas of every candidate."""
    arr = _combination_inputs(tables, selections)
    if arr["Isum"].size == 0:
        return 0.0, {}
    grouping = asu_grouping(arr["hkl"], space_group, anomalous=False)
    return _best_Imid(grouping.order, grouping.offsets, arr, Imids)


def _combine_scaler_datasets(scaler: Any, datasets: Sequence[Any], selections: Sequence[np.ndarray],
                             Imids: Sequence[float] | None) -> tuple[float, dict[float, float]]:
    """:func:`combine_intensities` over ``datasets`` jointly, grouped without a new sort: the
    rows are a subset of the scaler's suitable rows, whose grouping is cached (the scaler made
    it), and the subset of a grouping keeps its order."""
    arr = _combination_inputs([ds.table for ds in datasets], selections)
    if arr["Isum"].size == 0:
        return 0.0, {}
    hkl = np.concatenate([np.asarray(ds.table["miller_index"]).reshape(-1, 3)[ds.suitable]
                          for ds in scaler.datasets])
    grouping = asu_grouping(hkl, scaler.space_group, anomalous=False)
    chosen = {id(ds): sel for ds, sel in zip(datasets, selections)}
    keep = np.concatenate([chosen[id(ds)][ds.suitable] if id(ds) in chosen else np.zeros(int(ds.suitable.sum()), bool)
                           for ds in scaler.datasets])
    order, offsets = _kern.subset_grouping(grouping.order, grouping.offsets, keep)
    return _best_Imid(order, offsets, arr, Imids)


def _apply(table: Any, suitable: np.ndarray, Imid: float) -> None:
    """Set intensity/variance of the suitable rows from the chosen combination (§8.5 step 6)."""
    flags = flags_of(table)
    prf_ok = (flags & np.uint64(int(Flags.integrated_prf))) != 0
    sum_ok = (flags & np.uint64(int(Flags.integrated_sum))) != 0
    conv = np.asarray(table["prescaling_correction"], dtype=np.float64)
    n = len(table)
    p = np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table else np.ones(n)
    inv_p = np.divide(1.0, p, out=np.ones(n), where=p > 0)
    Iprf = np.asarray(table["intensity.prf.value"], float) * conv
    Vprf = np.asarray(table["intensity.prf.variance"], float) * conv ** 2
    Isum = np.asarray(table["intensity.sum.value"], float) * conv * inv_p
    Vsum = np.asarray(table["intensity.sum.variance"], float) * (conv * inv_p) ** 2
    I = np.asarray(table["intensity"], dtype=np.float64).copy()
    V = np.asarray(table["variance"], dtype=np.float64).copy()
    if Imid == 1:
        newI, newV = np.where(sum_ok, Isum, Iprf), np.where(sum_ok, Vsum, Vprf)
    else:
        newI, newV = np.where(prf_ok, Iprf, Isum), np.where(prf_ok, Vprf, Vsum)
        if Imid != 0:
            cI, cV = calculate_combined_raw_intensities(Iprf, Isum, Vprf, Vsum, Imid)
            both = prf_ok & sum_ok
            newI, newV = np.where(both, cI, newI), np.where(both, cV, newV)
    I[suitable] = newI[suitable]
    V[suitable] = newV[suitable]
    table["intensity"] = fa.double(I)
    table["variance"] = fa.double(V)


#: The refit of each candidate: one damped Gauss–Newton step from the first round's optimum.
#: On the four l-cysteine sweeps one step ranks the candidates as three LevMar iterations do
#: (Rmeas within 1e-4 of them) at a third of the cost.
REFIT_ENGINE = "LevMarStep"


def _refitted_rmeas(scaler: Any, datasets: Sequence[Any], selections: Sequence[np.ndarray],
                    candidates: Sequence[float]) -> dict[float, float]:
    """Each candidate's Rmeas after refitting the models to its intensities (see the module
    notes). The scaler's models, tables, var-cov and journals are restored afterwards."""
    saved = [(ds, {c: np.array(ds.table[c], dtype=np.float64, copy=True)
                   for c in ("intensity", "variance", "inverse_scale_factor")},
              {name: np.array(comp.parameters, dtype=np.float64, copy=True)
               for name, comp in ds.model.components.items()}, ds.var_cov)
             for ds in scaler.datasets]
    n_journals = len(scaler.journals)
    results: dict[float, float] = {}
    try:
        for Imid in candidates:
            for ds in datasets:
                _apply(ds.table, ds.suitable, Imid)
            scaler.make_ready_for_scaling()
            scaler.perform_scaling(engine=REFIT_ENGINE)
            scaler.expand_scales_to_all_reflections()
            results[float(Imid)] = _combine_scaler_datasets(scaler, datasets, selections, [Imid])[1][float(Imid)]
            _restore(saved)
    finally:
        _restore(saved)
        del scaler.journals[n_journals:]
    return results


def _restore(saved: Sequence[Any]) -> None:
    for ds, columns, parameters, var_cov in saved:
        for name, values in columns.items():
            ds.table[name] = fa.double(values)
        for name, comp in ds.model.components.items():
            comp.parameters = parameters[name]
        ds.var_cov = var_cov


def combine_scaler_intensities(scaler: Any) -> None:
    """The Imid search over a scaler's datasets (jointly by default) and its application."""
    params = scaler.params
    if params.reflection_selection.intensity_choice != "combine":
        return
    datasets = [ds for ds in scaler.datasets
                if "intensity.prf.value" in ds.table and "intensity.sum.value" in ds.table]
    if not datasets:
        return
    sels = []
    for ds in datasets:
        t = ds.table
        flags = flags_of(t)
        both = ((flags & np.uint64(int(Flags.integrated_prf))) != 0) & \
               ((flags & np.uint64(int(Flags.integrated_sum))) != 0)
        sel = ds.suitable & both
        sel &= np.asarray(t["intensity.prf.variance"], float) > 0
        sel &= np.asarray(t["intensity.sum.variance"], float) > 0
        sel &= np.asarray(t["inverse_scale_factor"], float) > 0
        if "partiality" in t:
            sel &= np.asarray(t["partiality"], float) > 0
        if ds.outliers.size:
            out = np.zeros(len(t), bool)
            out[ds.suitable] = ds.outliers
            sel &= ~out
        sels.append(sel)
    given = params.reflection_selection.combine.Imid
    if params.reflection_selection.combine.joint_analysis:
        best, results = _combine_scaler_datasets(scaler, datasets, sels, given)
        if getattr(params.reflection_selection.combine, "refit_candidates", False) and len(results) > 1:
            logger.info("intensity combination: Rmeas by Imid on the current scales %s",
                        {round(k, 2): round(v, 5) for k, v in results.items()})
            results = _refitted_rmeas(scaler, datasets, sels, list(results))
            valid = {k: v for k, v in results.items() if v >= 0}
            best = min(valid, key=valid.get) if valid else best
        choices = [best] * len(datasets)
        logger.info("intensity combination: Rmeas by Imid%s %s; chose Imid = %s",
                    " after refitting the scales to each" if len(results) > 1 and
                    getattr(params.reflection_selection.combine, "refit_candidates", False) else "",
                    {round(k, 2): round(v, 5) for k, v in results.items()}, best)
    else:
        choices = [combine_intensities([ds.table], scaler.space_group, [s], given)[0]
                   for ds, s in zip(datasets, sels)]
    for ds, Imid in zip(datasets, choices):
        _apply(ds.table, ds.suitable, Imid)
        ds.model.record_intensity_combination_Imid(Imid)
    scaler.Imid = choices[0]
