"""Suitable observations of one or more datasets, grouped by unique reflection.

:class:`GroupedObservations` is the job's view of "an Ih table with one block": per-row numpy
arrays (intensity, variance, weight, inverse scale g, ASU index, dataset and the row of that
dataset's table) plus the grouping of the data layer (:func:`xtalscale.symmetry.group_reflections`:
``order``/``offsets``, groups in signed (h, k, l) order, rows of dataset 0 first within a
group, as DIALS's Ih table orders them). The per-group work runs in C++
(``xtalscale._core.job``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from .._core import job as _kern
from .._rows import negate_rows, take_rows

__all__ = ["AsuGrouping", "GroupedObservations", "asu_grouping", "asu_grouping_and_groups", "cached_asu_grouping_of",
           "group_of_rows", "regroup", "suitable_rows"]


def suitable_rows(table: Any) -> np.ndarray:
    """Rows not flagged ``excluded_for_scaling`` or ``user_excluded_in_scaling`` (DIALS)."""
    from ..reflection_table import Flags

    n = _nrows(table)
    if "flags" not in table:
        return np.ones(n, dtype=bool)
    flags = np.asarray(table["flags"], dtype=np.uint64)  # (no copy of a uint64 column)
    bad = np.uint64(int(Flags.excluded_for_scaling) | int(Flags.user_excluded_in_scaling))
    return (flags & bad) == 0


def _nrows(table: Any) -> int:
    """Rows of a reflection table or of a dict of columns."""
    if isinstance(table, dict):
        return len(np.asarray(table["intensity"])) if "intensity" in table else 0
    return len(table)


def _column(table: Any, name: str, default: float | None = None) -> np.ndarray:
    if name in table:
        return np.asarray(table[name], dtype=np.float64)
    if default is None:
        raise KeyError(f"the reflection table has no column '{name}'")
    return np.full(_nrows(table), float(default))



def _rows_of(values: np.ndarray, idx: np.ndarray, every: bool) -> np.ndarray:
    """Rows ``idx`` of a per-row array (``values`` itself when they are every row)."""
    return values if every else take_rows(values, idx)


def group_of_rows(order: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The group number of every row of a grouping (``order``: rows in group order, group g
    at ``order[offsets[g]:offsets[g + 1]]``)."""
    return _kern.group_of_rows(np.asarray(order, dtype=np.int64), np.asarray(offsets, dtype=np.int64))


def regroup(order: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grouping (``order``, ``offsets``) of the rows with ``keep`` (a per-row bool array),
    without empty groups, and the kept rows' old positions ``idx`` (row ``i`` of the subset is
    row ``idx[i]``): per-row arrays of the subset are ``array[idx]`` (or ``array[keep]``).

    The kept rows stay in their order, so the subset needs no new sort: its grouping is the
    old one with the dropped rows taken out (one C++ pass)."""
    keep = np.asarray(keep, dtype=bool)
    new_order, new_offsets = _kern.subset_grouping(order, offsets, keep)
    return new_order, new_offsets, np.flatnonzero(keep)


class AsuGrouping(NamedTuple):
    """ASU indices and their grouping (``order``/``offsets`` of
    :func:`~xtalscale.symmetry.group_reflections`)."""

    asu_hkl: np.ndarray
    order: np.ndarray
    offsets: np.ndarray


# The ASU mapping and grouping of the last few sets of Miller indices, keyed by their content:
# the job groups the same rows again and again (the scaler's suitable rows, with and without
# Bijvoet mates apart), and a mapping plus a sort of 10^6 rows costs far more than comparing
# the indices. Entries: (space group, hkl copy, ASU indices, Bijvoet-minus flags,
# {anomalous: AsuGrouping}); only what from_tables needs is kept (some 60 MB per 10^6 rows).
_ASU_CACHE: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]] = []
_ASU_CACHE_SIZE = 2


def _read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def asu_grouping(hkl: np.ndarray, space_group: Any, anomalous: bool, n_threads: int = 1,
                 copy: bool = True) -> AsuGrouping:
    """ASU indices of ``hkl`` (Bijvoet minus mates negated if ``anomalous``) and their grouping,
    as :func:`~xtalscale.symmetry.map_to_asu` and :func:`~xtalscale.symmetry.group_reflections`
    give them, reused from a cache when the same indices were grouped before. The returned
    arrays are shared and read-only. ``n_threads``: the ASU mapping's and the sort's threads
    (the same result). ``copy=False``: the caller hands ``hkl`` over (an int32 (n, 3) array
    nobody changes afterwards): the cache keeps it, made read-only, instead of a copy."""
    return asu_grouping_and_groups(hkl, space_group, anomalous, n_threads, copy)[0]


def asu_grouping_and_groups(hkl: np.ndarray, space_group: Any, anomalous: bool, n_threads: int = 1,
                            copy: bool = True) -> tuple[AsuGrouping, np.ndarray | None]:
    """:func:`asu_grouping`, and the group of every row (``group_of_rows`` of the grouping)
    when the sort that made the grouping gave it (a grouping sorted by this call; None for
    one from the cache or split from the merged grouping): the caller may keep it instead
    of computing it again. It is not kept in the cache (8 B per row)."""
    from ..symmetry import SpaceGroup, group_reflections, map_to_asu_bijvoet

    sg = space_group if isinstance(space_group, SpaceGroup) else SpaceGroup(space_group)
    hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
    if hkl.size == 0:
        grouping = group_reflections(hkl)
        return AsuGrouping(hkl, grouping.order, grouping.offsets), grouping.group_index
    entry = next((e for e in _ASU_CACHE if e[0] == sg and e[1].shape == hkl.shape and np.array_equal(e[1], hkl)),
                 None)
    if entry is None:
        # map_to_asu(anomalous=False)'s ASU indices and Bijvoet-minus flags, in one pass
        asu, minus = map_to_asu_bijvoet(hkl, sg, n_threads=n_threads)
        kept = hkl.copy() if copy or not hkl.flags.c_contiguous else hkl
        entry = (sg, kept, asu, minus, {})
        _read_only(*entry[1:4])
        _ASU_CACHE.insert(0, entry)
        del _ASU_CACHE[_ASU_CACHE_SIZE:]
    return _grouping_of_entry(entry, anomalous, n_threads)


def cached_asu_grouping_of(order: np.ndarray, anomalous: bool) -> AsuGrouping | None:
    """:func:`asu_grouping` (with ``anomalous``) of the Miller indices whose grouping in either
    setting has the order array ``order`` (the same object, as :func:`asu_grouping` returned
    it), from the cache without the indices being gathered and compared again; None when no
    cached entry holds that array."""
    entry = next((e for e in _ASU_CACHE if any(g.order is order for g in e[4].values())), None)
    return None if entry is None else _grouping_of_entry(entry, anomalous)[0]


def _grouping_of_entry(entry: tuple, anomalous: bool, n_threads: int = 1) -> tuple[AsuGrouping, np.ndarray | None]:
    """The grouping (made once) of a cache entry's ASU indices, Bijvoet mates apart or not, and
    the group of every row if it was sorted here (else None)."""
    from ..symmetry import group_reflections

    _, _, asu, minus, groupings = entry
    group_index = None
    if anomalous not in groupings:
        if anomalous:  # as map_to_asu(anomalous=True): the acentric minus mates negated
            signed = negate_rows(asu.copy(), minus)
            merged = groupings.get(False)
            if merged is not None:  # split the merged grouping: no second sort
                from .._core import grouping as _grouping

                keys = np.ascontiguousarray(asu[merged.order[merged.offsets[:-1]]])
                order, offsets = _grouping.split_bijvoet_groups(merged.order, merged.offsets, keys, minus)
                groupings[True] = AsuGrouping(signed, order, offsets)
            else:
                grouping = group_reflections(signed, n_threads=n_threads)
                groupings[True] = AsuGrouping(signed, grouping.order, grouping.offsets)
                group_index = grouping.group_index
        else:
            grouping = group_reflections(asu, n_threads=n_threads)
            groupings[False] = AsuGrouping(asu, grouping.order, grouping.offsets)
            group_index = grouping.group_index
        _read_only(*groupings[anomalous])
    return groupings[anomalous], group_index


@dataclass
class GroupedObservations:
    """Observations grouped by unique reflection (one Ih-table block, DIALS order).

    Attributes
    ----------
    intensity, variance, weight, scale : ndarray, float64, (n,)
        ``I``, ``σ²``, the weight (1/σ² unless an error model says otherwise) and ``g``.
    asu_hkl : ndarray, int32, (n, 3)
    dataset : ndarray, int64, (n,)
        Index of the table each row came from.
    row : ndarray, int64, (n,)
        Row of that table.
    order, offsets : ndarray, int64
        The grouping: group k holds rows ``order[offsets[k]:offsets[k+1]]``.
    n_datasets : int
    space_group : SpaceGroup
    extra : dict of ndarray
        Optional per-row columns carried along (``d``, ``partiality``...).
    derived : dict
        Arrays that depend on the grouping only (the group of every row...), made on first use
        (:meth:`derived_of_grouping`). Copies made with ``dataclasses.replace`` that keep
        ``order`` and ``offsets`` share them (the scaler refreshes I, σ², g that way).
    """

    intensity: np.ndarray
    variance: np.ndarray
    weight: np.ndarray
    scale: np.ndarray
    asu_hkl: np.ndarray
    dataset: np.ndarray
    row: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    n_datasets: int
    space_group: Any
    extra: dict
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_tables(cls, tables: Sequence[Any], space_group: Any, anomalous: bool = False,
                    selections: Sequence[np.ndarray] | None = None,
                    extra_columns: Sequence[str] = (), n_threads: int = 1) -> GroupedObservations:
        """Group the suitable rows of ``tables`` (columns ``intensity``, ``variance``,
        ``miller_index``, optionally ``inverse_scale_factor`` (default 1) and ``flags``).

        ``selections`` (one bool array per table) replaces the default suitability rule.

        Raises
        ------
        KeyError
            A required column is missing (named).
        ValueError
            A selected row has a non-positive or non-finite variance, or a non-finite value.
        """
        parts: dict[str, list] = {k: [] for k in ("I", "V", "g", "hkl", "ds", "row")}
        extras: dict[str, list] = {k: [] for k in extra_columns}
        for k, table in enumerate(tables):
            n_rows = _nrows(table)
            sel = suitable_rows(table) if selections is None else np.asarray(selections[k], dtype=bool)
            if sel.shape != (n_rows,):
                raise ValueError(f"selection {k} must be a bool array of length {n_rows}")
            # every row: the columns as they are (no gather)
            idx = np.arange(n_rows, dtype=np.int64) if sel.all() else np.flatnonzero(sel)
            every = idx.size == n_rows
            parts["I"].append(_rows_of(_column(table, "intensity"), idx, every))
            parts["V"].append(_rows_of(_column(table, "variance"), idx, every))
            parts["g"].append(_rows_of(_column(table, "inverse_scale_factor", 1.0), idx, every))
            if "miller_index" not in table:
                raise KeyError(f"table {k} has no column 'miller_index'")
            parts["hkl"].append(_rows_of(np.asarray(table["miller_index"], dtype=np.int32).reshape(-1, 3), idx, every))
            parts["ds"].append(np.full(idx.size, k, dtype=np.int64))
            parts["row"].append(idx)
            for name in extra_columns:
                extras[name].append(_rows_of(_column(table, name), idx, every))
        I, V, g = (np.concatenate(parts[k]) for k in ("I", "V", "g"))
        for name, arr in (("intensity", I), ("variance", V), ("inverse_scale_factor", g)):
            if not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr))[0])
                raise ValueError(f"column '{name}' is not finite at selected row {bad}")
        if np.any(V <= 0):
            bad = int(np.flatnonzero(V <= 0)[0])
            raise ValueError(f"column 'variance' must be positive for the selected rows "
                             f"(row {bad} has {V[bad]})")
        hkl = np.concatenate(parts["hkl"]) if parts["hkl"] else np.zeros((0, 3), np.int32)
        grouping = asu_grouping(hkl, space_group, anomalous, n_threads=n_threads)
        return cls(I, V, 1.0 / V, g, grouping.asu_hkl, np.concatenate(parts["ds"]), np.concatenate(parts["row"]),
                   grouping.order, grouping.offsets, len(tables), space_group,
                   {k: np.concatenate(v) for k, v in extras.items()})

    # ------------------------------------------------------------------ basics
    @property
    def size(self) -> int:
        return int(self.intensity.size)

    @property
    def n_groups(self) -> int:
        return int(self.offsets.size - 1)

    def group_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def derived_of_grouping(self, key: Any, compute: Any) -> Any:
        """``compute()``, made once per grouping and kept in :attr:`derived` under ``key``.

        The cache holds the ``order``/``offsets`` arrays it was made for and starts afresh when
        they are not this object's, so a copy with another grouping never sees stale values.
        Cached arrays are read-only."""
        cache = self.derived
        if cache.get("order") is not self.order or cache.get("offsets") is not self.offsets:
            cache.clear()
            cache["order"], cache["offsets"] = self.order, self.offsets
        if key not in cache:
            value = compute()
            for a in value if isinstance(value, tuple) else (value,):
                if isinstance(a, np.ndarray):
                    a.setflags(write=False)
            cache[key] = value
        return cache[key]

    def group_of_row(self) -> np.ndarray:
        """The group index of every row (read-only; made once per grouping)."""
        return self.derived_of_grouping("group_of_row", lambda: group_of_rows(self.order, self.offsets))

    def sum_in_groups(self, values: np.ndarray) -> np.ndarray:
        """Per-group sums of a per-row array (C++)."""
        return _kern.sum_in_groups(self.order, self.offsets, values)

    def group_means(self, weight: np.ndarray | None = None) -> np.ndarray:
        """Ĩ per group: Σ w g I / Σ w g² (zero where Σ w g² is zero)."""
        w = self.weight if weight is None else weight
        a, b = _kern.weighted_group_sums(self.order, self.offsets, self.intensity, w, self.scale)
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    def Ih_values(self) -> np.ndarray:
        """Ĩ broadcast to every row."""
        return self.group_means()[self.group_of_row()]

    def subset(self, keep: np.ndarray) -> GroupedObservations:
        """The rows with ``keep`` (a per-row bool array), regrouped without empty groups.

        No new sort: the kept rows keep their order, so their grouping is this one without the
        dropped rows (as grouping them afresh would give)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.size,):
            raise ValueError(f"keep must be a bool array of length {self.size}")
        order, offsets = _kern.subset_grouping(self.order, self.offsets, keep)
        rows = np.flatnonzero(keep)  # one scan of the mask; each column is then gathered
        return replace(self, intensity=self.intensity.take(rows), variance=self.variance.take(rows),
                       weight=self.weight.take(rows), scale=self.scale.take(rows),
                       asu_hkl=take_rows(self.asu_hkl, rows), dataset=self.dataset.take(rows),
                       row=self.row.take(rows), order=order, offsets=offsets,
                       extra={k: np.take(v, rows, axis=0) for k, v in self.extra.items()}, derived={})

    def rows_per_dataset(self, rows: np.ndarray) -> list[np.ndarray]:
        """Split positions ``rows`` of this object into each dataset's table rows (order kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        ds = self.dataset[rows]
        return [self.row[rows[ds == k]] for k in range(self.n_datasets)]
