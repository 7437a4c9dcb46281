"""Scaled intensities of a DIALS reflection table, selected and combined as ``dials.export`` does.

:func:`scaled_intensities` reproduces the filtering that ``dials.export`` (and
``dials.util.filter_reflections.ScaleIntensityReducer``) applies to scaled data before
writing an unmerged MTZ, vectorised over the table:

1. keep rows assigned to an experiment (``id >= 0``) and not ``bad_for_scaling``
   (user-excluded, excluded or outlier in scaling), with ``inverse_scale_factor > 0``;
2. drop rows with ``intensity.scale.variance <= 0``;
3. drop rows with ``partiality <= 0``, then divide by the inverse scale factor:
   ``I = intensity.scale.value / g`` and ``var = intensity.scale.variance / g²``
   (``apply_inverse_scale=False`` leaves I and var as they are, i.e. g = 1);
4. combine partials: within one experiment, rows with the same ``partial_id`` whose
   partiality is < 0.99 (and variance > 0) are replaced by one row holding their
   1/var-weighted mean intensity, variance ``1/Σ(1/var)`` and summed partiality; the row kept
   is the group's first row in table order (its other columns are kept);
5. drop rows with partiality below ``partiality_threshold`` (0.99 by default);
6. optionally drop rows with ``I/σ < min_isigi``.

Nothing is modified in the input table; the result is a new table plus the ``intensity``
and ``variance`` columns and ``original_index`` (row in the input table) so that every
dropped row can be traced.
"""
from __future__ import annotations

import numpy as np

from ..reflection_table import Flags

__all__ = ["ScaledIntensityError", "scaled_intensities"]


class ScaledIntensityError(ValueError):
    """The table lacks what is needed, or no rows remain after a filtering step."""


_REQUIRED = ("miller_index", "intensity.scale.value", "intensity.scale.variance",
             "inverse_scale_factor")


def _combine_partials(ids, partial_id, partiality, intensity, variance, threshold=0.99):
    """Indices of the rows to keep and combined (I, var, partiality) for every row."""
    n = len(intensity)
    candidate = (partiality < threshold) & (variance > 0)
    rows = np.flatnonzero(candidate)
    keep = np.ones(n, dtype=bool)
    I, V, P = intensity, variance, partiality
    if len(rows) == 0:
        return keep, I, V, P
    # Group candidate rows by (experiment id, partial_id), preserving table order in groups.
    key = np.stack([ids[rows].astype(np.int64), partial_id[rows].astype(np.int64)])
    order = np.lexsort((rows, key[1], key[0]))
    sk = key[:, order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (sk[:, 1:] != sk[:, :-1]).any(axis=0)
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(rows)))
    multi = sizes > 1
    if not multi.any():
        return keep, I, V, P
    I, V, P = intensity.copy(), variance.copy(), partiality.copy()  # the inputs stay as they are
    sorted_rows = rows[order]
    w = 1.0 / variance[sorted_rows]
    sw = np.add.reduceat(w, starts)
    swi = np.add.reduceat(w * intensity[sorted_rows], starts)
    sp = np.add.reduceat(partiality[sorted_rows], starts)
    first = sorted_rows[starts[multi]]
    I[first] = swi[multi] / sw[multi]
    V[first] = 1.0 / sw[multi]
    P[first] = sp[multi]
    group_of = np.repeat(np.arange(len(starts)), sizes)
    is_first = np.zeros(len(rows), dtype=bool)
    is_first[starts] = True
    drop = multi[group_of] & ~is_first
    keep[sorted_rows[drop]] = False
    return keep, I, V, P


def scaled_intensities(table, partiality_threshold: float = 0.99, combine_partials: bool = True,
                       min_isigi: float | None = None, apply_inverse_scale: bool = True,
                       columns=None):
    """Select and combine scaled intensities as ``dials.export`` does (see module docstring).

    Parameters
    ----------
    table : reflection_table
        A DIALS-scaled table (``intensity.scale.*``, ``inverse_scale_factor``, ``flags``;
        ``partiality`` and ``partial_id`` are used when present).
    partiality_threshold : float
        Rows whose (combined) partiality is below this are dropped (dials.export's 0.99).
    combine_partials : bool
        Combine partial rows sharing a ``partial_id`` within an experiment.
    min_isigi : float, optional
        Drop rows with I/σ below this after combining (dials.export's ``min_isigi``).
    apply_inverse_scale : bool
        Divide by the inverse scale factor (False gives the g = 1 intensities).
    columns : sequence of str, optional
        Copy only these columns of ``table`` into the result (default: every column). The
        selected rows of a wide table cost more than the whole selection when a caller reads
        one or two of them.

    Returns
    -------
    reflection_table
        The selected rows with ``intensity`` and ``variance`` (scaled, combined) and
        ``original_index`` (row in ``table``); ``partiality`` holds the combined partiality.

    Raises
    ------
    ScaledIntensityError
        If a required column is missing or a filtering step leaves no rows.
    """
    missing = [c for c in _REQUIRED if c not in table]
    if missing:
        raise ScaledIntensityError(f"reflection table lacks column(s) {', '.join(missing)} "
                                   "needed for scaled intensities")
    thr = float(partiality_threshold)
    if not np.isfinite(thr):
        raise ScaledIntensityError("partiality_threshold must be finite")
    n = len(table)
    ids = np.asarray(table["id"]) if "id" in table else np.zeros(n, dtype=np.int64)
    flags = np.asarray(table["flags"], dtype=np.uint64) if "flags" in table else \
        np.zeros(n, dtype=np.uint64)
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    value = np.asarray(table["intensity.scale.value"], dtype=np.float64)
    var = np.asarray(table["intensity.scale.variance"], dtype=np.float64)
    part = np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table else None

    def _check(sel, step):
        if not sel.any():
            raise ScaledIntensityError(f"no reflections remain after {step}")
        return sel

    bad = np.uint64(int(Flags.bad_for_scaling))
    sel = _check((ids >= 0) & ((flags & bad) == 0), "selecting scaled (not bad_for_scaling) rows")
    sel = _check(sel & (g > 0), "removing inverse scale factors <= 0")
    sel = _check(sel & (var > 0), "removing variances <= 0")
    if part is not None:
        sel = _check(sel & (part > 0), "removing partiality <= 0")
    rows = np.flatnonzero(sel)
    # (np.take: the gathers of the selected rows are the bulk of the work)
    gi = np.take(g, rows) if apply_inverse_scale else np.ones(len(rows))
    I = np.take(value, rows)
    I /= gi
    V = np.take(var, rows)
    V /= gi ** 2
    P = np.take(part, rows) if part is not None else np.ones(len(rows))
    keep = np.ones(len(rows), dtype=bool)
    if part is not None and combine_partials and "partial_id" in table:
        pid = np.take(np.asarray(table["partial_id"]), rows)
        keep, I, V, P = _combine_partials(np.take(ids, rows), pid, P, I, V)
    if part is not None:
        keep &= P >= thr
    _check(keep, f"removing partiality < {thr}")
    if min_isigi is not None:
        keep &= ~(I / np.sqrt(V) < float(min_isigi))
        _check(keep, f"removing I/sigma < {min_isigi}")
    kept = rows if len(rows) == np.count_nonzero(keep) else rows[keep]
    try:
        out = table.select(kept, columns=columns)
    except KeyError as error:
        raise ScaledIntensityError(str(error)) from None
    if len(kept) < len(rows):
        I, V, P = I[keep], V[keep], P[keep]
    out["intensity"] = I
    out["variance"] = V
    out["partiality"] = P
    out["original_index"] = kept.astype(np.uint64)
    return out
