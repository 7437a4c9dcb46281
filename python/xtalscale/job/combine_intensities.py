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
from functools import partial
from typing import Any

import numpy as np

from .. import flex_arrays as fa
from .._core import job as _kern
from .._rows import take_rows
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
    num, den = _rmeas_sums(order, offsets, intensity, variance, scale)
    return num / den if den > 0 else -1.0


def _rmeas_sums(order: np.ndarray, offsets: np.ndarray, intensity: np.ndarray, variance: np.ndarray,
                scale: np.ndarray) -> tuple[float, float]:
    """Rmeas's numerator Σ √(n/(n−1)) Σ|I/g − Ĩ| and denominator Σ I/g over the groups of more
    than one usable row (0, 0 when there is none), so that several groupings can be summed."""
    n_used, absdev, total = _kern.rmeas_group_sums(order, offsets, np.asarray(intensity, dtype=np.float64),
                                                   np.asarray(variance, dtype=np.float64), scale)
    multi = n_used > 1
    if not multi.any():
        return 0.0, 0.0
    n = n_used[multi].astype(np.float64)
    return float(np.sum(np.sqrt(n / (n - 1.0)) * absdev[multi])), float(np.sum(total[multi]))


def _combination_inputs(tables: Sequence[Any], selections: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Profile and summation I and V (prescaling correction and partiality applied), g and the
    Miller index of the selected rows, tables one after the other."""
    parts: dict[str, list] = {k: [] for k in ("Iprf", "Vprf", "Vsum", "g", "hkl")}
    for t, sel in zip(tables, selections):
        conv = np.asarray(t["prescaling_correction"], dtype=np.float64)[sel] if "prescaling_correction" in t \
            else np.ones(int(sel.sum()))
        p = np.asarray(t["partiality"], dtype=np.float64)[sel] if "partiality" in t else np.ones(int(sel.sum()))
        parts["Iprf"].append(np.asarray(t["intensity.prf.value"], float)[sel] * conv)
        parts["Vprf"].append(np.asarray(t["intensity.prf.variance"], float)[sel] * conv ** 2)
        parts["Vsum"].append(np.asarray(t["intensity.sum.variance"], float)[sel] * (conv / p) ** 2)
        parts["g"].append(np.asarray(t["inverse_scale_factor"], float)[sel])
        parts["hkl"].append(take_rows(np.asarray(t["miller_index"]).reshape(-1, 3), sel))
    arr = {k: np.concatenate(v) for k, v in parts.items()}
    arr["Isum"] = _summation_over_partiality(tables, selections)
    _require_finite(arr["g"], "inverse_scale_factor")
    return arr


def _require_finite(values: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"column '{name}' is not finite at selected row {bad}")


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
    hkl = np.concatenate([take_rows(np.asarray(ds.table["miller_index"]).reshape(-1, 3), ds.suitable)
                          for ds in scaler.datasets])
    grouping = asu_grouping(hkl, scaler.space_group, anomalous=False)
    chosen = {id(ds): sel for ds, sel in zip(datasets, selections)}
    keep = np.concatenate([chosen[id(ds)][ds.suitable] if id(ds) in chosen else np.zeros(int(ds.suitable.sum()), bool)
                           for ds in scaler.datasets])
    order, offsets = _kern.subset_grouping(grouping.order, grouping.offsets, keep)
    return _best_Imid(order, offsets, arr, Imids)


def _profile_and_sum(table: Any, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Profile and summation I and V of ``rows`` (all rows if None) with the prescaling
    correction and 1/partiality applied, and which of them each method integrated."""
    def col(name: str) -> np.ndarray:
        values = np.asarray(table[name], dtype=np.float64)
        return values if rows is None else values[rows]

    flags = flags_of(table)
    flags = flags if rows is None else flags[rows]
    conv = col("prescaling_correction")
    p = col("partiality") if "partiality" in table else np.ones(conv.size)
    inv_p = np.divide(1.0, p, out=np.ones(p.size), where=p > 0)
    return {"prf_ok": (flags & np.uint64(int(Flags.integrated_prf))) != 0,
            "sum_ok": (flags & np.uint64(int(Flags.integrated_sum))) != 0,
            "Iprf": col("intensity.prf.value") * conv, "Vprf": col("intensity.prf.variance") * conv ** 2,
            "Isum": col("intensity.sum.value") * conv * inv_p,
            "Vsum": col("intensity.sum.variance") * (conv * inv_p) ** 2}


def _candidate_columns(arr: dict[str, np.ndarray], Imid: float) -> tuple[np.ndarray, np.ndarray]:
    """The intensity and variance of the rows of ``arr`` (:func:`_profile_and_sum`) under the
    combination ``Imid`` (§8.5 step 6)."""
    prf_ok, sum_ok = arr["prf_ok"], arr["sum_ok"]
    if Imid == 1:
        return np.where(sum_ok, arr["Isum"], arr["Iprf"]), np.where(sum_ok, arr["Vsum"], arr["Vprf"])
    newI = np.where(prf_ok, arr["Iprf"], arr["Isum"])
    newV = np.where(prf_ok, arr["Vprf"], arr["Vsum"])
    if Imid != 0:
        cI, cV = calculate_combined_raw_intensities(arr["Iprf"], arr["Isum"], arr["Vprf"], arr["Vsum"], Imid)
        both = prf_ok & sum_ok
        newI, newV = np.where(both, cI, newI), np.where(both, cV, newV)
    return newI, newV


def _apply(table: Any, suitable: np.ndarray, Imid: float) -> None:
    """Set intensity/variance of the suitable rows from the chosen combination (§8.5 step 6)."""
    newI, newV = _candidate_columns(_profile_and_sum(table), Imid)
    I = np.asarray(table["intensity"], dtype=np.float64).copy()
    V = np.asarray(table["variance"], dtype=np.float64).copy()
    I[suitable] = newI[suitable]
    V[suitable] = newV[suitable]
    table["intensity"] = fa.double(I)
    table["variance"] = fa.double(V)


#: The refit of each candidate: one damped Gauss–Newton step from the first round's optimum.
#: On the four l-cysteine sweeps one step ranks the candidates as three LevMar iterations do
#: (Rmeas within 1e-4 of them) at a third of the cost.
REFIT_ENGINE = "LevMarStep"

#: Largest number of observations a candidate's refit uses: above it, a seeded random subset of
#: whole groups of the round's rows (the comparison needs the candidates ranked, not the final
#: fit, and every candidate is refitted on the same rows).
REFIT_MAX_OBSERVATIONS = 30_000


def _summation_over_partiality(tables: Sequence[Any], selections: Sequence[np.ndarray],
                               mapper: Any = None) -> np.ndarray:
    """I_sum/p (prescaling correction applied) of the selected rows, tables one after the other:
    what the candidate Imids are derived from (:func:`candidate_Imids`). ``mapper``
    (``map``-like, e.g. a scaler's thread pool) runs the tables' parts. Raises ValueError
    naming the first row that is not finite."""
    parts = list((mapper or map)(_summation_part, list(zip(tables, selections))))
    isum = np.concatenate(parts) if parts else np.zeros(0)
    _require_finite(isum, "intensity.sum.value")
    return isum


def _summation_part(table_and_rows: tuple[Any, np.ndarray]) -> np.ndarray:
    """One table's I_sum·c/p of its selected rows: formed over every row (the same operations
    per row) and gathered once, rather than gathering each column first; rows outside the
    selection may divide by zero unseen."""
    t, sel = table_and_rows
    conv = np.asarray(t["prescaling_correction"], dtype=np.float64) if "prescaling_correction" in t else 1.0
    p = np.asarray(t["partiality"], dtype=np.float64) if "partiality" in t else 1.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (np.asarray(t["intensity.sum.value"], dtype=np.float64) * conv / p)[sel]


def _too_many_parameters_to_refit(scaler: Any) -> bool:
    """Whether the models have more parameters than the dense normal matrix is used for
    (fit.refiner.FULL_MATRIX_MAX_PARAMS): a refit step needs that matrix, and on
    REFIT_MAX_OBSERVATIONS rows such a model is not determined (60 sweeps, ~2,400 parameters:
    five dense refits). The candidates are then compared on the first round's scales, as DIALS does."""
    from ..fit.refiner import FULL_MATRIX_MAX_PARAMS

    n_params = sum(int(np.asarray(comp.parameters).size) for ds in scaler.datasets
                   for comp in ds.model.components.values())
    if n_params <= FULL_MATRIX_MAX_PARAMS:
        return False
    logger.info("intensity combination: %d parameters (more than %d): the candidates are compared "
                "on the first round's scales, without refits", n_params, FULL_MATRIX_MAX_PARAMS)
    return True


def _refitted_rmeas(scaler: Any, datasets: Sequence[Any], selections: Sequence[np.ndarray],
                    candidates: Sequence[float]) -> tuple[dict[float, float], dict[float, float]]:
    """Each candidate's Rmeas on the current scales and after refitting the models to its
    intensities (see the module notes), on the same rows.

    One minimisation table is built on the round's rows (at most REFIT_MAX_OBSERVATIONS, whole
    groups); per candidate only its intensities and variances are written into the table, the
    models take one damped Gauss–Newton step from the saved parameters, and Rmeas is computed on
    the table's rows among ``selections`` with the table's g (no expansion, no table column is
    written). The models, selections, var-cov and journals are restored afterwards."""
    from .reflection_selection import _select_groups

    saved = [(ds, {name: np.array(comp.parameters, dtype=np.float64, copy=True)
                   for name, comp in ds.model.components.items()}, ds.var_cov, ds.minimisation)
             for ds in scaler.datasets]
    n_journals = len(scaler.journals)
    current: dict[float, float] = {}
    results: dict[float, float] = {}
    try:
        rows = [(np.ones(int(ds.suitable.sum()), bool) if ds.minimisation is None else ds.minimisation.copy())
                & ~(ds.outliers if ds.outliers.size else False) for ds in scaler.datasets]
        if sum(int(r.sum()) for r in rows) > REFIT_MAX_OBSERVATIONS:
            _select_groups(scaler, rows, REFIT_MAX_OBSERVATIONS, 1, int(scaler.params.reflection_selection.seed))
        scaler.make_ready_for_scaling()
        inputs = _refit_inputs(scaler, datasets, selections)
        g_now = [np.array(block.inverse_scale_factors, dtype=np.float64) for block, _ in inputs.counted]
        for Imid in candidates:
            for (block, _), g in zip(inputs.counted, g_now):
                block.inverse_scale_factors = g  # the first round's scales
            for block, k, arr in inputs.blocks:
                I, V = _candidate_columns(arr, Imid)
                block.set_dataset_data(k, I, V)
            current[float(Imid)] = inputs.rmeas()
            scaler.apply_error_model_weights()
            scaler.perform_scaling(engine=REFIT_ENGINE)
            results[float(Imid)] = inputs.rmeas()
            _restore(saved)
    finally:
        _restore(saved)
        del scaler.journals[n_journals:]
    return current, results


class _RefitInputs:
    """Per (work block, dataset): the profile/summation inputs of the block's rows (block order);
    and the block rows that count in the Rmeas (the combination's ``selections``)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[Any, int, dict[str, np.ndarray]]] = []
        self.counted: list[tuple[Any, np.ndarray]] = []

    def rmeas(self) -> float:
        """Rmeas over the counted rows of every work block, with the blocks' current g."""
        num = den = 0.0
        for block, counted in self.counted:
            offsets, _, _, table_rows = block.table_arrays()
            n = table_rows.size
            in_table_order = np.empty(n, np.int64)
            in_table_order[table_rows] = np.arange(n)
            order, offs = _kern.subset_grouping(in_table_order, np.asarray(offsets, np.int64), counted)
            # the subset's rows are renumbered: row i is the i-th counted row
            block_num, block_den = _rmeas_sums(
                order, offs, *(np.asarray(a, dtype=np.float64)[counted] for a in
                               (block.intensities, block.variances, block.inverse_scale_factors)))
            num += block_num
            den += block_den
        return num / den if den > 0 else -1.0


def _refit_inputs(scaler: Any, datasets: Sequence[Any], selections: Sequence[np.ndarray]) -> _RefitInputs:
    inputs = _RefitInputs()
    chosen = {id(ds): sel for ds, sel in zip(datasets, selections)}
    for block in scaler.get_blocks_for_minimisation():
        counted = np.zeros(block.size, bool)
        for k, ds in enumerate(scaler.datasets):
            info = block.dataset_info.get(k)
            if info is None or id(ds) not in chosen:
                continue
            rows = ds.suitable_idx[np.asarray(block.block_selections[k])]  # table rows, block order
            inputs.blocks.append((block, k, _profile_and_sum(ds.table, rows)))
            counted[info["start_index"]:info["end_index"]] = chosen[id(ds)][rows]
        inputs.counted.append((block, counted))
    return inputs


def _restore(saved: Sequence[Any]) -> None:
    for ds, parameters, var_cov, minimisation in saved:
        ds.minimisation = minimisation
        for name, comp in ds.model.components.items():
            comp.parameters = parameters[name]
        ds.var_cov = var_cov


def _each_dataset(scaler: Any, function: Any, items: Sequence[Any]) -> list[Any]:
    """``[function(item) for item in items]``, on the scaler's threads when it has a pool
    (``_map_datasets``; a DIALS-style scaler without one runs them in turn)."""
    mapper = getattr(scaler, "_map_datasets", None)
    return mapper(function, items) if mapper is not None else [function(item) for item in items]


def judges_on_minimisation_rows(scaler: Any) -> bool:
    """Whether the Imid search reads g (and outlier flags) only on rows of the minimisation
    table: true when it is not run (no combination) or when it refits the candidates (their
    Rmeas is on that table's rows); false when it compares them on the current g of every
    row (DIALS's comparison: no refit option, or too many parameters to refit)."""
    params = scaler.params
    if params.reflection_selection.intensity_choice != "combine":
        return True
    combine = params.reflection_selection.combine
    return (bool(combine.joint_analysis) and bool(getattr(combine, "refit_candidates", False))
            and not _too_many_parameters_to_refit(scaler))


def _combination_rows(ds: Any) -> np.ndarray:
    """A dataset's rows the Imid search reads: suitable, integrated both ways, positive
    variances, g and partiality, not an outlier (bool over its table rows)."""
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
    return sel


def combine_scaler_intensities(scaler: Any) -> None:
    """The Imid search over a scaler's datasets (jointly by default) and its application."""
    params = scaler.params
    if params.reflection_selection.intensity_choice != "combine":
        return
    datasets = [ds for ds in scaler.datasets
                if "intensity.prf.value" in ds.table and "intensity.sum.value" in ds.table]
    if not datasets:
        return
    sels = _each_dataset(scaler, _combination_rows, datasets)
    given = params.reflection_selection.combine.Imid
    refit = bool(getattr(params.reflection_selection.combine, "refit_candidates", False))
    if given:
        candidates = list(given)
    else:
        isum = _summation_over_partiality([ds.table for ds in datasets], sels,
                                          mapper=partial(_each_dataset, scaler))
        candidates = candidate_Imids(isum) if isum.size else []
    refitted = None
    if refit and _too_many_parameters_to_refit(scaler):
        refit = False
    if params.reflection_selection.combine.joint_analysis and refit and len(candidates) > 1:
        from ..fit.minimisers import NonFiniteScales, RefinementFailed

        try:
            refitted = _refitted_rmeas(scaler, datasets, sels, candidates)
        except (RefinementFailed, NonFiniteScales, np.linalg.LinAlgError) as exc:
            # the models are restored; DIALS's comparison still decides, on every row's g
            logger.warning("intensity combination: the candidates' refit failed (%s); comparing "
                           "them on the first round's scales", exc)
            scaler.expand_scales_to_all_reflections()
    if refitted is not None:
        current, results = refitted
        valid = {k: v for k, v in results.items() if v >= 0}
        best = min(valid, key=valid.get) if valid else 0.0
        choices = [best] * len(datasets)
        logger.info("intensity combination: Rmeas by Imid on the first round's scales %s, after "
                    "refitting the scales to each %s; chose Imid = %s",
                    {round(k, 2): round(v, 5) for k, v in current.items()},
                    {round(k, 2): round(v, 5) for k, v in results.items()}, best)
    elif params.reflection_selection.combine.joint_analysis:
        best, results = _combine_scaler_datasets(scaler, datasets, sels, candidates)
        choices = [best] * len(datasets)
        logger.info("intensity combination: Rmeas by Imid %s; chose Imid = %s",
                    {round(k, 2): round(v, 5) for k, v in results.items()}, best)
    else:
        choices = [combine_intensities([ds.table], scaler.space_group, [s], given)[0]
                   for ds, s in zip(datasets, sels)]
    # each dataset's columns are its own: the datasets' numpy passes (which release the GIL)
    # go over the scaler's threads
    _each_dataset(scaler, lambda pair: _apply(pair[0].table, pair[0].suitable, pair[1]),
                  list(zip(datasets, choices)))
    for ds, Imid in zip(datasets, choices):
        ds.model.record_intensity_combination_Imid(Imid)
    scaler.Imid = choices[0]
