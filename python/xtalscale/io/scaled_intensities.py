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

import sys
from dataclasses import dataclass

import numpy as np

from ..reflection_table import Flags

__all__ = ["ScaledIntensityError", "scaled_intensities"]


class ScaledIntensityError(ValueError):
    """The table lacks what is needed, or no rows remain after a filtering step."""


_REQUIRED = ("miller_index", "intensity.scale.value", "intensity.scale.variance",
             "inverse_scale_factor")


def _combine_partials(ids, partial_id, partiality, intensity, variance, threshold=0.99,
                      rows_of=None):
    """Indices of the rows to keep and combined (I, var, partiality) for every row.

    ``ids`` and ``partial_id`` hold one value per row of ``intensity``, or with ``rows_of``
    (the row of each ``intensity`` entry in them) one per row of a larger table: only the
    candidate rows' values are then gathered (none when there are no partials).
    """
    n = len(intensity)
    candidate = (partiality < threshold) & (variance > 0)
    rows = np.flatnonzero(candidate)
    keep = np.ones(n, dtype=bool)
    I, V, P = intensity, variance, partiality
    if len(rows) == 0:
        return keep, I, V, P
    at = rows if rows_of is None else np.take(rows_of, rows)
    # Group candidate rows by (experiment id, partial_id), preserving table order in groups.
    key = np.stack([np.take(ids, at).astype(np.int64),
                    np.take(partial_id, at).astype(np.int64)])
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
    kept, I, V, P = _scaled_rows(table, partiality_threshold, combine_partials, min_isigi,
                                 apply_inverse_scale)
    try:
        out = table.select(kept, columns=columns)
    except KeyError as error:
        raise ScaledIntensityError(str(error)) from None
    out["intensity"] = I
    out["variance"] = V
    out["partiality"] = P
    out["original_index"] = kept.astype(np.uint64)
    return out


def _checked_inputs(table, partiality_threshold: float) -> float:
    """The partiality threshold as a float, after checking that ``table`` has the columns
    scaled intensities need and that the threshold is finite (ScaledIntensityError)."""
    missing = [c for c in _REQUIRED if c not in table]
    if missing:
        raise ScaledIntensityError(f"reflection table lacks column(s) {', '.join(missing)} "
                                   "needed for scaled intensities")
    thr = float(partiality_threshold)
    if not np.isfinite(thr):
        raise ScaledIntensityError("partiality_threshold must be finite")
    return thr


def _scaled_rows(table, partiality_threshold: float = 0.99, combine_partials: bool = True,
                 min_isigi: float | None = None, apply_inverse_scale: bool = True,
                 with_partiality: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The selection of :func:`scaled_intensities` without building a table: ``(rows, I, V,
    P)``, the selected rows of ``table`` (int64, ascending) and their scaled intensity,
    variance and (combined) partiality (None unless ``with_partiality`` or partials were
    combined). For callers that read a column or two of the rows.

    Raises
    ------
    ScaledIntensityError
        As :func:`scaled_intensities`.
    """
    thr = _checked_inputs(table, partiality_threshold)
    n = len(table)
    ids = np.asarray(table["id"]) if "id" in table else np.zeros(n, dtype=np.int64)
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    value = np.asarray(table["intensity.scale.value"], dtype=np.float64)
    var = np.asarray(table["intensity.scale.variance"], dtype=np.float64)
    part = np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table else None

    def _check(sel, step):
        if not sel.any():
            raise ScaledIntensityError(f"no reflections remain after {step}")
        return sel

    # (one mask and one scratch mask, updated in place: no fresh array per condition)
    sel = np.greater_equal(ids, 0)
    scratch = np.empty(n, dtype=bool)
    if "flags" in table:
        sel &= _flags_clear(np.asarray(table["flags"], dtype=np.uint64), out=scratch)
    _check(sel, "selecting scaled (not bad_for_scaling) rows")
    sel &= np.greater(g, 0, out=scratch)
    _check(sel, "removing inverse scale factors <= 0")
    sel &= np.greater(var, 0, out=scratch)
    _check(sel, "removing variances <= 0")
    if part is not None:
        sel &= np.greater(part, 0, out=scratch)
        _check(sel, "removing partiality <= 0")
    combine = (part is not None and combine_partials and "partial_id" in table
               and _partials_combine(ids, np.asarray(table["partial_id"]), part, var, g, sel,
                                     apply_inverse_scale))
    if part is not None and not combine:
        # every row keeps its own partiality: the threshold is a mask on the table's rows,
        # before any gather (no partiality gathered to be tested, no rows dropped after)
        sel &= np.greater_equal(part, thr, out=scratch)
        _check(sel, f"removing partiality < {thr}")
    del scratch
    rows = np.flatnonzero(sel)
    del sel
    # (np.take: the gathers of the selected rows are the bulk of the work; g and then g² in
    # one array, divided into I and V in place)
    I = np.take(value, rows)
    V = np.take(var, rows)
    if apply_inverse_scale:
        gi = np.take(g, rows)
        I /= gi
        V /= np.square(gi, out=gi)
        del gi
    P = None
    if with_partiality or combine:
        P = np.take(part, rows) if part is not None else np.ones(len(rows))
    keep = None  # every row (no mask made unless a row is dropped)
    if combine:
        keep, I, V, P = _combine_partials(ids, np.asarray(table["partial_id"]), P, I, V,
                                          rows_of=rows)
        keep &= P >= thr
        _check(keep, f"removing partiality < {thr}")
    if min_isigi is not None:
        above = ~(I / np.sqrt(V) < float(min_isigi))
        keep = above if keep is None else keep & above
        _check(keep, f"removing I/sigma < {min_isigi}")
    if keep is not None and np.count_nonzero(keep) < len(rows):
        rows, I, V = rows[keep], I[keep], V[keep]
        P = P[keep] if P is not None else None
    return rows, I, V, P


@dataclass
class _ObservationRows:
    """The rows :func:`_scaled_observation_rows` selects and their values."""

    rows: np.ndarray  #: int64, ascending: rows of the table kept
    hkl: np.ndarray  #: (m, 3) int32 Miller indices of ``rows``
    intensity: np.ndarray  #: scaled intensity (value / g, partials combined)
    variance: np.ndarray  #: its variance (variance / g²)
    dataset: np.ndarray  #: int64 ``id`` of ``rows`` (0 without an id column)
    z: np.ndarray | None  #: frame coordinate of ``rows`` (``xyzobs.px.value``) if asked for
    n_bad: int  #: table rows with a bad_for_scaling bit
    n_selected: int  #: rows selected before the (0, 0, 0) rows were left out
    n_zero: int  #: selected rows with index (0, 0, 0), left out


_STEPS = ("selecting scaled (not bad_for_scaling) rows", "removing inverse scale factors <= 0",
          "removing variances <= 0", "removing partiality <= 0")


def _scaled_observation_rows(table, partiality_threshold: float = 0.99,
                             with_z: bool = False) -> _ObservationRows:
    """:func:`_scaled_rows` (partials combined, no I/σ cut, g applied) with the (0, 0, 0) rows
    left out, the rows' indices, ids and (``with_z``) frame coordinates: what merging needs
    of a scaled table. Raises as :func:`_scaled_rows`.

    One pass classifies the rows (each one's first failed step, and the counts) and a second
    gathers the kept ones (the kernels of ``xtalscale._core.stats``), where the array
    formulation (:func:`_observation_rows_by_arrays`, used when partials are to be combined
    or a column has an unusual type) makes a mask per condition and a gather per column: the
    same rows and values.
    """
    from .._core import stats as _core_stats

    thr = _checked_inputs(table, partiality_threshold)
    ids = np.asarray(table["id"]) if "id" in table else None
    flags = np.asarray(table["flags"]) if "flags" in table else None
    hkl = np.asarray(table["miller_index"])
    if ((ids is not None and ids.dtype != np.int32) or (flags is not None and flags.dtype != np.uint64)
            or hkl.dtype != np.int32 or hkl.ndim != 2 or hkl.shape[1:] != (3,)):
        return _observation_rows_by_arrays(table, thr, with_z)
    part = np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table else None
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    var = np.asarray(table["intensity.scale.variance"], dtype=np.float64)
    code, counts = _core_stats.classify_scaled_rows(ids, flags, int(Flags.bad_for_scaling), g,
                                                    var, part, thr, hkl)
    survivors = counts["survivors"]
    for step, left in zip(_STEPS if part is not None else _STEPS[:3], survivors):
        if left == 0:
            raise ScaledIntensityError(f"no reflections remain after {step}")
    if part is not None and "partial_id" in table and counts["n_partial_candidates"] >= 2:
        # (the rows selected before the partiality threshold: code 0, 5 or 6)
        sel = (code == 0) | (code >= 5)
        if _partials_combine(ids if ids is not None else np.zeros(len(g), dtype=np.int64),
                             np.asarray(table["partial_id"]), part, var, g, sel, True):
            return _observation_rows_by_arrays(table, thr, with_z)  # (partials combine)
    n_selected = int(survivors[4])
    if part is not None and n_selected == 0:
        raise ScaledIntensityError(f"no reflections remain after removing partiality < {thr}")
    n_zero = int(counts["n_zero_index"])
    xyz = np.asarray(table["xyzobs.px.value"], dtype=np.float64) if with_z else None
    rows, intensity, variance, hkl_out, dataset, z = _core_stats.gather_scaled_rows(
        code, n_selected - n_zero, np.asarray(table["intensity.scale.value"], dtype=np.float64),
        var, g, True, hkl, ids, xyz)
    return _ObservationRows(rows, hkl_out, intensity, variance, dataset, z,
                            int(counts["n_bad"]), n_selected, n_zero)


def _observation_rows_by_arrays(table, partiality_threshold: float, with_z: bool
                                ) -> _ObservationRows:
    """:func:`_scaled_observation_rows` by array operations (a mask per condition, a gather
    per column); combines partials."""
    from .._rows import take_rows

    n = len(table)
    n_bad = (n - int(np.count_nonzero(_flags_clear(np.asarray(table["flags"], dtype=np.uint64))))
             if "flags" in table else 0)
    rows, intensity, variance, _ = _scaled_rows(table, partiality_threshold, with_partiality=False)
    hkl = take_rows(np.asarray(table["miller_index"], dtype=np.int32).reshape(-1, 3), rows)
    n_selected = len(rows)
    zero = np.bitwise_or(hkl[:, 0], hkl[:, 1])  # (0, 0, 0); faster than ~any(axis=1)
    zero |= hkl[:, 2]
    zero = np.equal(zero, 0)
    n_zero = int(np.count_nonzero(zero))
    if n_zero:  # (otherwise every selected row is kept: no copies)
        keep = ~zero
        hkl, intensity, variance, rows = take_rows(hkl, keep), intensity[keep], variance[keep], rows[keep]
    if "id" in table:
        dataset = np.take(np.asarray(table["id"]), rows).astype(np.int64, copy=False)
    else:
        dataset = np.zeros(len(rows), dtype=np.int64)
    z = (np.asarray(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, 2][rows]
         if with_z else None)
    return _ObservationRows(rows, hkl, intensity, variance, dataset, z, n_bad, n_selected, n_zero)


def _partials_combine(ids, partial_id, part, var, g, sel, apply_inverse_scale: bool) -> bool:
    """Whether :func:`_combine_partials` of the selected rows (``sel``) combines any: two
    candidates (partiality < 0.99, scaled variance > 0) share an experiment and partial id.
    Looks at the candidates alone (none in data without partials)."""
    candidates = np.flatnonzero(sel & (part < 0.99))
    if len(candidates) < 2:
        return False
    v = np.take(var, candidates)
    if apply_inverse_scale:
        v = v / np.square(np.take(g, candidates))  # (the scaled variance as _scaled_rows makes it)
    candidates = candidates[v > 0]
    if len(candidates) < 2:
        return False
    key_id = np.take(ids, candidates).astype(np.int64)
    key_part = np.take(partial_id, candidates).astype(np.int64)
    order = np.lexsort((key_part, key_id))
    key_id, key_part = key_id[order], key_part[order]
    return bool(((key_id[1:] == key_id[:-1]) & (key_part[1:] == key_part[:-1])).any())


def _flags_clear(flags: np.ndarray, bits: int = int(Flags.bad_for_scaling),
                 out: np.ndarray | None = None) -> np.ndarray:
    """``(flags & bits) == 0`` per row of a uint64 flag column (into the bool ``out`` if given).

    Bits below 2³² are tested on the low 32-bit words alone (little-endian machines): half the
    bytes of a temporary ``flags & bits``.
    """
    flags = np.asarray(flags, dtype=np.uint64)
    if (bits >> 32) == 0 and sys.byteorder == "little" and flags.ndim == 1 \
            and flags.flags.c_contiguous:
        low = flags.view(np.uint32)[::2]
        return np.equal(np.bitwise_and(low, np.uint32(bits)), 0, out=out)
    return np.equal(np.bitwise_and(flags, np.uint64(bits)), 0, out=out)
