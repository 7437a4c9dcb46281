"""Which suitable reflections the model is minimised on (spec §8.3).

``use_all`` (xtalscale's automatic choice for rotation data: every suitable observation),
``random`` (DIALS's ~max(50000 reflections, 2000 groups) random groups of multiplicity > 1
with I/σ above the cut, seeded), ``quasi_random`` (for several datasets DIALS's three steps:
the groups best connected across datasets, chosen per resolution bin by the class-matrix
algorithm of :func:`class_matrix_selection`, then random groups within each dataset, then
random groups across all; for one dataset as ``random``) and ``intensity_ranges`` (I/σ, d and
partiality ranges). Random draws use numpy's seeded generator (``reflection_selection.seed``),
not scitbx's, so the random parts draw different groups than DIALS. Only the minimisation uses
the selection; outlier rejection, the error model and the final scales use every suitable
reflection.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .grouped import GroupedObservations

logger = logging.getLogger("xtalscale.scale")

__all__ = ["calculate_scaling_subset_ranges", "choose_method", "class_matrix_selection",
           "select_connected_across_datasets", "select_for_minimisation", "select_random_groups",
           "use_all_for_last_round"]


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


def select_random_groups(grouped: GroupedObservations, n_groups: int, seed: int,
                         eligible: np.ndarray | None = None) -> np.ndarray:
    """Rows (bool over ``grouped``) of ``n_groups`` groups drawn at random (seeded) from the
    ``eligible`` group numbers (ascending; default every group): the same draw as from the
    subset of those groups' rows, without making it."""
    n_available = grouped.n_groups if eligible is None else int(eligible.size)
    chosen = draw_groups(n_available, n_groups, seed)
    return _rows_of_groups(grouped, chosen if eligible is None else eligible[chosen])


def draw_groups(n_available: int, n_groups: int, seed: int) -> np.ndarray:
    """``min(n_groups, n_available)`` distinct numbers of ``range(n_available)`` drawn at
    random (seeded), ascending: every seeded draw of groups in the job."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_available, size=min(n_groups, n_available), replace=False))


def _rows_of_groups(grouped: GroupedObservations, groups: np.ndarray) -> np.ndarray:
    """Rows (bool over ``grouped``) of the given group numbers."""
    take = np.zeros(grouped.n_groups, dtype=bool)
    take[groups] = True
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
        n_subset = int(getattr(params.reflection_selection, "main_rounds_subset", 0) or 0)
        n_suitable = sum(int(ds.suitable.sum()) for ds in scaler.datasets)
        if n_subset and n_suitable > 2 * n_subset:
            # the first rounds only need to bring the model near its optimum: a random subset
            # of whole groups does that at a fraction of the cost of a normal matrix over all
            # observations; the last round (see use_all_for_last_round) fits all of them
            _select_groups(scaler, [np.ones(int(ds.suitable.sum()), bool) for ds in scaler.datasets],
                           n_subset, 1, int(params.reflection_selection.seed))
            scaler.subset_for_main_rounds = True
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
    rnd = params.reflection_selection.random
    if method == "quasi_random" and len(scaler.datasets) > 1:
        _quasi_random_multi_dataset(scaler, pre, rnd, int(params.reflection_selection.seed))
        return
    # random (and quasi_random for one dataset): groups with multiplicity > 1 among the
    # preselected rows
    _select_groups(scaler, pre, int(rnd.min_reflections), int(rnd.min_groups),
                   int(params.reflection_selection.seed))


def use_all_for_last_round(scaler: Any) -> None:
    """Drop the automatic main-rounds subset (``main_rounds_subset``): every suitable row; or,
    above ``last_round_subset`` non-outlier suitable rows (use_all selections), seeded random
    whole groups of about that many of them."""
    if getattr(scaler, "subset_for_main_rounds", False):
        for ds in scaler.datasets:
            ds.minimisation = None
        scaler.subset_for_main_rounds = False
    params = scaler.params
    cap = int(getattr(params.reflection_selection, "last_round_subset", 0) or 0)
    if not cap or getattr(scaler, "selection_method", "use_all") != "use_all":
        return
    usable = [~ds.outliers if ds.outliers.size else np.ones(int(ds.suitable.sum()), bool) for ds in scaler.datasets]
    if sum(int(u.sum()) for u in usable) > cap:
        _select_groups(scaler, usable, cap, 1, int(params.reflection_selection.seed))


def _select_groups(scaler: Any, pre: list[np.ndarray], min_reflections: int, min_groups: int,
                   seed: int) -> None:
    """Each dataset's ``minimisation`` mask: random groups of multiplicity > 1 among the ``pre``
    rows, at least ``min_reflections`` rows and ``min_groups`` groups (seeded)."""
    grouped = scaler._grouped_suitable(keep=pre)
    sizes = grouped.group_sizes()
    multi = np.flatnonzero(sizes > 1)  # the groups that can be drawn, ascending
    if not multi.size:
        for ds in scaler.datasets:
            ds.minimisation = None        # DIALS falls back to use_all
        return
    mean_m = int(sizes[multi].sum()) / multi.size
    n_groups = max(int(math.ceil(min_reflections / mean_m)), min_groups)
    rows = select_random_groups(grouped, n_groups, seed, eligible=multi)
    per_ds = grouped.rows_per_dataset(np.flatnonzero(rows))
    for k, ds in enumerate(scaler.datasets):
        # rows_per_dataset gives rows of the preselected arrays: map back to suitable rows
        suitable_rows = np.flatnonzero(pre[k])[per_ds[k]]
        mask = np.zeros(int(ds.suitable.sum()), bool)
        mask[suitable_rows] = True
        ds.minimisation = mask


# ----------------------------------------------------------------------------- quasi_random
def class_matrix_selection(counts: np.ndarray, min_per_class: float, min_total: float,
                           max_total: float) -> tuple[np.ndarray, np.ndarray]:
    """DIALS's class-matrix selection (``_loop_over_class_matrix``).

    ``counts`` is an (n_classes, n_groups) matrix of reflections per class (e.g. dataset) and
    symmetry group, its columns already in preference order (most classes covered first).
    Starting from the first column, repeatedly add the first unused column that has a
    reflection in the least-filled class, until every class holds ``min_per_class`` or the
    total exceeds ``max_total`` (a class with nothing left counts as filled; its shortfall is
    its deficit). If the total is then below ``min_total``, the per-class target is raised and
    the filling continues.

    Returns
    -------
    (total per class, bool mask of the columns used)
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_classes, n_cols = counts.shape
    used = np.zeros(n_cols, dtype=bool)
    if n_cols == 0 or n_classes == 0:
        return np.zeros(n_classes), used
    # per class: its columns in order, and a cursor past the ones already used
    columns_of_class = [np.flatnonzero(counts[r]) for r in range(n_classes)]
    cursor = [0] * n_classes
    used[0] = True
    total = counts[:, 0].copy()

    def add_next(r: int) -> bool:
        cols, c = columns_of_class[r], cursor[r]
        while c < cols.size and used[cols[c]]:
            c += 1
        cursor[r] = c
        if c == cols.size:
            return False
        used[cols[c]] = True
        total[:] += counts[:, cols[c]]
        return True

    deficit = np.zeros(n_classes)
    total_deficit = 0.0
    while total.min() < min_per_class and total.sum() - total_deficit < max_total:
        r = int(np.argmin(total))
        if not add_next(r):  # nothing left in this class: count it as filled
            deficit[r] = min_per_class - total[r]
            total_deficit += min_per_class - total[r]
            total[r] = min_per_class
        if total.sum() > max_total:
            return total - deficit, used
    total -= deficit
    n = float(total.sum())
    if n < min_total and not used.all() and n > 0:
        exhausted = deficit != 0.0
        multiplier = int(math.floor(min_total * (n_classes - int(exhausted.sum())) / (n * n_classes)) + 1)
        new_limit = min_per_class * multiplier
        deficit[exhausted] += new_limit - min_per_class
        total[exhausted] = new_limit
        while not used.all() and total.min() < new_limit:
            r = int(np.argmin(total))
            if not add_next(r):
                deficit[r] = new_limit - total[r]
                total[r] = new_limit
        return total - deficit, used
    return total, used


def _groups_above_isigma(grouped: GroupedObservations, cutoff: float) -> np.ndarray:
    """Groups (bool) of multiplicity > 1 whose mean I/σ exceeds ``cutoff`` (0 if none do)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        isig = grouped.intensity / np.sqrt(grouped.variance)
    n = grouped.group_sizes()
    mean_isig = grouped.sum_in_groups(isig) / np.maximum(n, 1)
    multi = n > 1
    if not multi.any():
        raise ValueError("no symmetry group has more than one observation: scaling is not possible")
    keep = multi & (mean_isig > cutoff)
    if not keep.any():
        logger.warning("no group has <I/sigma> > %s; using a cut-off of 0", cutoff)
        keep = multi & (mean_isig > 0.0)
        if not keep.any():
            raise ValueError("no group with more than one observation has <I/sigma> > 0")
    return keep


def _resolution_bins(d_star_sq: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value: DIALS's Ih-table binner (equal d*² steps over the range widened by
    1e-6 of its span, step at least 0.004)."""
    lo, hi = float(d_star_sq.min()), float(d_star_sq.max())
    span = hi - lo
    lo, hi = lo - span * 1e-6, hi + span * 1e-6
    step = max((hi - lo) / n_bins, 0.004)
    return np.minimum(((d_star_sq - lo) / step).astype(np.int64), int(math.ceil((hi - lo) / step)) - 1)


def select_connected_across_datasets(grouped: GroupedObservations, min_total: float,
                                     isigma_cutoff: float = 1.0, n_bins: int = 20,
                                     eligible: np.ndarray | None = None) -> np.ndarray:
    """Rows (bool over ``grouped``) of the groups best connected across datasets (DIALS's
    ``select_connected_reflections_across_datasets``): among groups of multiplicity > 1 with
    mean I/σ above the cut, per resolution bin, :func:`class_matrix_selection` with datasets
    as classes, groups ordered by the number of datasets they reach (stable), a target of
    ``min_total/(4·n_datasets)`` per dataset and ``min_total`` to 1.2·``min_total`` in all
    (each split evenly over the bins). ``eligible``: those groups (bool per group) when the
    caller has already found them."""
    keep_group = _groups_above_isigma(grouped, isigma_cutoff) if eligible is None else eligible
    group = grouped.group_of_row()
    rows_ok = keep_group[group]
    datasets_present = np.unique(grouped.dataset[rows_ok])
    n_classes = datasets_present.size
    class_of_row = np.searchsorted(datasets_present, grouped.dataset)
    min_per_class = min_total / (n_classes * 4.0)
    max_total = min_total * 1.2
    per_bin = (int(min_per_class / n_bins), int(min_total / n_bins), int(max_total / n_bins))
    d = np.asarray(grouped.extra["d"], dtype=np.float64)
    bins = _resolution_bins(1.0 / (d * d), n_bins)  # a group's rows share d, so one bin each
    chosen_group = np.zeros(grouped.n_groups, dtype=bool)
    for b in np.unique(bins[rows_ok]):
        in_bin = rows_ok & (bins == b)
        groups = np.unique(group[in_bin])  # ascending: the Ih table's group order
        local = np.searchsorted(groups, group[in_bin])
        counts = np.zeros((n_classes, groups.size))
        np.add.at(counts, (class_of_row[in_bin], local), 1.0)
        order = np.argsort(-(counts > 0).sum(axis=0), kind="stable")
        _, used = class_matrix_selection(counts[:, order], *per_bin)
        chosen_group[groups[order[used]]] = True
    return chosen_group[group]


def _quasi_random_multi_dataset(scaler: Any, pre: list[np.ndarray], rnd: Any, seed: int) -> None:
    """DIALS's multi-dataset quasi_random: connected groups, then random groups within each
    dataset, then random groups across all datasets up to the target (see the module notes)."""
    rng = np.random.default_rng(seed)
    grouped = scaler._grouped_suitable()
    sizes = grouped.group_sizes()
    multi = sizes[sizes > 1]
    if multi.size == 0:
        for ds in scaler.datasets:
            ds.minimisation = None  # DIALS cannot select either; scale on everything
        return
    avg_multiplicity = float(multi.mean())
    total_available = float(multi.sum())
    n_datasets = len(scaler.datasets)
    total_target = max(avg_multiplicity * int(rnd.min_groups), float(rnd.min_reflections))
    cutoff = float(rnd.multi_dataset.Isigma_cutoff)
    eligible_group = _groups_above_isigma(grouped, cutoff)
    chosen = select_connected_across_datasets(grouped, min(1000, int(rnd.min_groups)) * avg_multiplicity,
                                              eligible=eligible_group)
    n_connected = int(chosen.sum())
    group = grouped.group_of_row()
    # within each dataset: random groups (multiplicity > 1 within the dataset) of its
    # preselected rows
    per_dataset_target = (total_target - n_connected) / (2.0 * n_datasets)
    preselected = _preselected_rows(grouped, pre)
    if per_dataset_target > 0:
        for k in range(n_datasets):
            rows = eligible_group[group] & (grouped.dataset == k) & preselected
            groups_k, mult_k = np.unique(group[rows], return_counts=True)
            groups_k = groups_k[mult_k > 1]
            if groups_k.size == 0:
                continue
            n_groups = int(math.ceil(per_dataset_target / mult_k[mult_k > 1].mean()))
            if n_groups < groups_k.size:
                groups_k = rng.choice(groups_k, size=n_groups, replace=False)
            chosen |= rows & _rows_of_groups(grouped, groups_k)
    # across datasets: random eligible groups up to the total target
    n_used = int(chosen.sum())
    left = total_target - n_used
    fraction_used = n_used / total_available
    if left > 0 and fraction_used < 1:
        n_groups = int(left * 1.05 / (1.0 - fraction_used) / avg_multiplicity)
        eligible = np.flatnonzero(eligible_group)
        if n_groups < eligible.size:
            eligible = rng.choice(eligible, size=n_groups, replace=False)
        chosen |= _rows_of_groups(grouped, eligible)
    per_dataset = grouped.rows_per_dataset(np.flatnonzero(chosen))
    for k, ds in enumerate(scaler.datasets):
        mask = np.zeros(int(ds.suitable.sum()), dtype=bool)
        mask[per_dataset[k]] = True
        ds.minimisation = mask
    logger.info("quasi_random selection: %d reflections connected across datasets, %d chosen in all",
                n_connected, int(chosen.sum()))


def _preselected_rows(grouped: GroupedObservations, pre: list[np.ndarray]) -> np.ndarray:
    """``pre`` (per dataset, over its suitable rows) as a mask over ``grouped``'s rows."""
    out = np.zeros(grouped.size, dtype=bool)
    for k, p in enumerate(pre):
        rows = grouped.dataset == k
        out[rows] = p[grouped.row[rows]]
    return out
