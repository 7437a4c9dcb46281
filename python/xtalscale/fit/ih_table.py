"""The Ih table: observations grouped by unique reflection (or any integer key).

A block (:class:`IhTableBlock`) holds per-observation numpy arrays in DIALS's row order
(dataset by dataset, each sorted by group) plus the permutation to *table order* (rows sorted
by group, the order the C++ kernels stream). :class:`IhTable` splits datasets into blocks as
DIALS does (spec 6.1-6.3): joint unique groups, block boundaries over all groups, a seeded free
set. Grouping reuses :func:`xtalscale.symmetry.map_to_asu` / ``group_reflections`` (the data
layer's C++ radix sort): one home for grouping.

Bad rows are never dropped: a row whose intensity is not finite or whose variance is not
finite and > 0 gets weight 0 and an ``exclusion`` code (``EXCLUDED_*``), and its intensity is
read as 0 by the kernels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .._core import fit as _fit
from .._lazy import LazyModule
from .._rows import take_rows
from ..symmetry import group_reflections, hkl_keys, map_to_asu

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = ["IhTable", "IhTableBlock", "IhTableError", "TargetAsuDictCache", "group_offsets_from_keys",
           "EXCLUDED_NONE", "EXCLUDED_BAD_VARIANCE", "EXCLUDED_BAD_INTENSITY"]

EXCLUDED_NONE = 0
EXCLUDED_BAD_VARIANCE = 1  #: variance not finite or <= 0 (weight set to 0)
EXCLUDED_BAD_INTENSITY = 2  #: intensity not finite (weight 0, read as 0)


class IhTableError(ValueError):
    """Invalid Ih-table input (names the argument, column or row)."""


def _column(table: Any, name: str) -> np.ndarray:
    col = table[name]
    if hasattr(col, "as_numpy_array"):
        col = col.as_numpy_array()
    return np.asarray(col)


def _has(table: Any, name: str) -> bool:
    try:
        return name in table
    except TypeError:
        return name in list(table.keys())


def group_offsets_from_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable grouping of integer keys: ``(order, group_index, offsets)`` (C++ radix sort)."""
    from .._core import grouping

    k = np.ascontiguousarray(keys, dtype=np.int64)
    if k.ndim != 1:
        raise IhTableError("group keys must be 1-dimensional")
    return grouping.group_keys(k)


def _stable_group_order(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(stable argsort of group numbers in [0, n_groups), start of each group in it): a C++
    counting sort, O(n + n_groups) (4× numpy's stable argsort at 10⁶ rows)."""
    from .._core import grouping

    return grouping.counting_order(np.ascontiguousarray(groups, dtype=np.int64), int(n_groups))


def _given_group_parts(group_index: Sequence[Any], n_rows: list[int],
                       mapper: Callable[..., Any] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """``(group numbers, offsets)`` of the tables' rows from a caller's group numbers: checked,
    and renumbered 0, 1, ... in the same order without the numbers no row uses; the numbers
    kept per table (one array each, not concatenated). ``mapper`` (like ``map``, e.g. a thread pool's) counts and renumbers the
    tables' rows concurrently (numpy's counting and gathering release the GIL); the counts
    are integers, so their sum is the same for any mapper."""
    if len(group_index) != len(n_rows):
        raise IhTableError(f"group_index has {len(group_index)} arrays for {len(n_rows)} tables")
    parts = []
    for i, (g, n) in enumerate(zip(group_index, n_rows)):
        g = np.asarray(g)
        if g.ndim != 1 or g.size != n or (g.size and not np.issubdtype(g.dtype, np.integer)):
            raise IhTableError(f"group_index[{i}] must hold one integer per selected row ({n})")
        parts.append(g.astype(np.int64, copy=False))
    each = mapper or map
    ranges = [(int(lo), int(hi)) for lo, hi in each(lambda p: (p.min(), p.max()), [p for p in parts if p.size])]
    if any(lo < 0 for lo, _ in ranges):
        raise IhTableError("group_index must be >= 0")
    size = max((hi for _, hi in ranges), default=-1) + 1
    counts = np.zeros(size, np.int64)
    for part_counts in each(lambda p: np.bincount(p, minlength=size), parts):
        counts += part_counts
    used = counts > 0
    renumber = np.cumsum(used) - 1
    offsets = np.concatenate([[0], np.cumsum(counts[used])]).astype(np.int64)
    return list(each(renumber.take, parts)), offsets


_CORE = ("intensity", "variance", "inverse_scale_factor")  # the columns every block holds


def _as_float(values: Any) -> np.ndarray:
    """A column as the block kernel reads it: floats as they are (the binding converts them to
    float64 once, exactly), anything else as float64."""
    a = np.asarray(values)
    return a if a.dtype.kind == "f" else a.astype(np.float64)


class _RowSource:
    """One dataset's selected rows as the Ih table's blocks read them, nothing gathered: whole
    columns read at ``column_rows`` (None: the selected rows are the columns' rows), the
    ``loc_indices`` of the selected rows (None: their column rows), whole (n, 3) Miller indices
    read at ``hkl_rows`` (None: likewise) and each selected row's group number."""

    __slots__ = ("columns", "n_selected", "column_rows", "loc_indices", "hkl", "hkl_rows", "groups")

    def __init__(self, columns: Mapping[str, np.ndarray], n_selected: int, column_rows: np.ndarray | None,
                 loc_indices: np.ndarray | None, hkl: np.ndarray, hkl_rows: np.ndarray | None,
                 groups: np.ndarray | None) -> None:
        self.columns = dict(columns)
        self.n_selected = int(n_selected)
        self.column_rows = column_rows
        self.loc_indices = loc_indices if loc_indices is not None else (
            column_rows if column_rows is not None else np.arange(self.n_selected, dtype=np.int64))
        self.hkl = hkl
        self.hkl_rows = hkl_rows
        self.groups = groups


class _BlockRows:
    """A dataset's rows in one block: ``rows`` (selected rows, in group order) of ``src``, and
    optionally their group numbers (``groups``, one per row: else read from ``src.groups``)."""

    __slots__ = ("rows", "src", "groups")

    def __init__(self, rows: np.ndarray, src: _RowSource, groups: np.ndarray | None = None) -> None:
        self.rows, self.src, self.groups = rows, src, groups


class IhTableBlock:
    """One block of the Ih table (DIALS ``IhTableBlock(n_groups, n_refl, n_datasets=1)``).

    Fill it with :meth:`add_data` once per dataset, in dataset order. Row order is DIALS's:
    dataset 0's rows first, each dataset's rows in group order.
    """

    def __init__(self, n_groups: int, n_refl: int, n_datasets: int = 1) -> None:
        if n_groups < 0 or n_refl < 0 or n_datasets < 1:
            raise IhTableError("n_groups and n_refl must be >= 0 and n_datasets >= 1")
        self._n_groups = int(n_groups)
        self._n_refl_expected = int(n_refl)
        self.n_datasets = int(n_datasets)
        self._cols: dict[str, list[np.ndarray]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._group_parts: list[np.ndarray] = []
        self._hkl_parts: list[np.ndarray] = []
        self._hkl_value: np.ndarray | None = None
        # (whole Miller-index array, block rows, row map | None) per dataset: a gathered block's
        # indices (hkl[row_map[rows]]), taken
        # on first use (the job's fit never reads them: at 10⁶ rows the gather cost 30 ms)
        self._hkl_sources: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.block_selections: list[np.ndarray] = [np.zeros(0, np.int64)] * self.n_datasets
        self.dataset_info: dict[int, dict[str, int]] = {}
        self._next_dataset = 0
        self._n_filled = 0
        self.derivatives: Any = None
        self.binner: Any = None
        self._finalised = False
        # (row map, {row ranges: whether each range's table rows ascend}): see rows_ascend
        self._ascending_held: tuple[np.ndarray, dict[tuple[int, ...], bool]] | None = None

    # ------------------------------------------------------------------ filling
    def add_data(self, dataset_id: int, group_ids: Any, df: Mapping[str, Any], hkl: Any) -> None:
        """Add one dataset's rows (already in group order): columns ``intensity``,
        ``variance``, optional ``inverse_scale_factor`` (default 1), ``loc_indices`` and extras."""
        if self._next_dataset >= self.n_datasets:
            raise IhTableError(f"all {self.n_datasets} dataset(s) were added: the block is complete")
        if dataset_id != self._next_dataset:
            raise IhTableError(f"datasets must be added in order: expected {self._next_dataset}, got {dataset_id}")
        groups = np.asarray(group_ids, dtype=np.int64)
        n = groups.size
        if n and (groups.min() < 0 or groups.max() >= self._n_groups):
            raise IhTableError(f"group_ids must lie in [0, {self._n_groups})")
        cols = {k: np.asarray(v) for k, v in df.items()}
        for k, v in cols.items():
            if v.shape[0] != n:
                raise IhTableError(f"column {k!r} has {v.shape[0]} rows, expected {n}")
        cols.setdefault("inverse_scale_factor", np.ones(n))
        cols.setdefault("loc_indices", np.arange(n, dtype=np.int64))
        cols["dataset_id"] = np.full(n, dataset_id, dtype=np.int64)
        for k, v in cols.items():
            self._cols.setdefault(k, []).append(v)
        self._group_parts.append(groups)
        self._hkl_parts.append(np.asarray(hkl).reshape(n, 3) if hkl is not None else np.zeros((n, 3), np.int32))
        self.block_selections[dataset_id] = np.asarray(cols["loc_indices"], dtype=np.int64)
        self.dataset_info[dataset_id] = {"start_index": self._n_filled, "end_index": self._n_filled + n}
        self._n_filled += n
        self._next_dataset += 1
        if self._next_dataset == self.n_datasets:  # complete (as DIALS's _complete_setup)
            self._finalise()

    def _finalise(self) -> None:
        """Join the datasets' parts (then dropped: they would double the block's memory),
        weights, group order and Ĩ."""
        for k, parts in self._cols.items():
            self._arrays[k] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._group_ids = (self._group_parts[0] if len(self._group_parts) == 1
                           else np.concatenate(self._group_parts))
        self._hkl = self._hkl_parts[0] if len(self._hkl_parts) == 1 else np.concatenate(self._hkl_parts)
        self._cols, self._group_parts, self._hkl_parts = {}, [], []
        self._complete()

    def _complete(self) -> None:
        """Weights, group order and Ĩ of the joined rows."""
        self._init_weights()
        self._reindex()
        self.calc_Ih()

    @classmethod
    def _gathered(cls, n_groups: int, parts: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray], np.ndarray,
                                                             np.ndarray]]) -> IhTableBlock:
        """A complete block of several datasets' rows, as :meth:`add_data` once per dataset
        would make it, with each column gathered once, straight into the block's array (no
        per-dataset parts to join). ``parts``: per dataset, its rows' group numbers in the
        block, its columns (``intensity``, ``variance``, ``inverse_scale_factor``,
        ``loc_indices`` and extras, whole), the rows of them to take (in group order) and its
        (n, 3) Miller indices (whole)."""
        names = list(parts[0][1])
        sources = []
        for groups, columns, rows, hkl in parts:
            loc = columns["loc_indices"]
            sources.append(_BlockRows(np.asarray(rows), _RowSource(
                {k: v for k, v in columns.items() if k != "loc_indices"}, len(np.asarray(loc)), None,
                np.asarray(loc), np.asarray(hkl).reshape(-1, 3), None, None), np.asarray(groups)))
        return cls._from_rows(n_groups, sources, names, None)

    @classmethod
    def _from_rows(cls, n_groups: int, parts: Sequence[_BlockRows], names: Sequence[str],
                   group_map: np.ndarray | None) -> IhTableBlock:
        """A complete block of several datasets' rows built in one C++ pass
        (``_core.fit.build_ih_block``): the columns ``names`` (in this order, ``loc_indices``
        among them) gathered through each dataset's row maps, dataset and group of every row,
        weights and exclusion codes (:meth:`_init_weights`' rules), table order
        (:meth:`_reindex`'s) and Ĩ (:meth:`calc_Ih`'s kernel): what :meth:`add_data` once per
        dataset gives the same rows, array for array and dtype for dtype. ``group_map`` maps the
        rows' group numbers (each part's ``groups``, else its source's) to the block's (None:
        they are the block's)."""
        sizes = [int(p.rows.size) for p in parts]
        block = cls(n_groups, sum(sizes), len(parts))
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        for core in _CORE:
            if core not in names:
                raise IhTableError(f"the block's columns must include {core!r}")
        dtypes = {name: np.result_type(*(np.asarray(p.src.loc_indices if name == "loc_indices"
                                                     else p.src.columns[name]).dtype for p in parts))
                  for name in names}
        # float64 columns go through the kernel; the core columns always do (as float64: their
        # weights and Ĩ are those of the float64 values, as _init_weights and calc_Ih read them)
        in_kernel = list(_CORE) + [k for k in names if k not in _CORE and k != "loc_indices"
                                   and dtypes[k] == np.float64]
        sources = [(p.rows, p.src.n_selected, p.src.groups if p.groups is None else p.groups, p.groups is not None,
                    p.src.column_rows,
                    p.src.loc_indices, [_as_float(p.src.columns[k]) for k in in_kernel]) for p in parts]
        try:
            (columns, loc, selections, dataset_id, group_ids, weights, exclusion, order, offsets, table_rows,
             Ih) = _fit.build_ih_block(sources, group_map, int(n_groups))
        except ValueError as exc:
            raise IhTableError(str(exc)) from exc
        built = dict(zip(in_kernel, columns))
        for name in names:
            if name == "loc_indices":
                block._arrays[name] = loc if dtypes[name] == np.int64 else loc.astype(dtypes[name])
            elif name in built and dtypes[name] == np.float64:
                block._arrays[name] = built[name]
            else:  # another dtype: numpy's gather, as the block would hold it
                out = np.empty(starts[-1], dtype=dtypes[name])
                for k, p in enumerate(parts):
                    rows = p.rows if p.src.column_rows is None else p.src.column_rows[p.rows]
                    np.take(np.asarray(p.src.columns[name]), rows, out=out[starts[k]:starts[k + 1]], mode="raise")
                block._arrays[name] = out
        block._arrays["dataset_id"] = dataset_id
        block._arrays["weights"] = weights
        block._arrays["Ih_values"] = Ih
        block.exclusion = exclusion
        block._group_ids = group_ids
        block._order, block._offsets, block._table_rows = order, offsets, table_rows
        block._hkl_sources = [(p.src.hkl, p.rows, p.src.hkl_rows) for p in parts]
        block.block_selections = list(selections)  # each its own array
        for k in range(len(parts)):
            block.dataset_info[k] = {"start_index": int(starts[k]), "end_index": int(starts[k + 1])}
        block._n_filled, block._next_dataset = int(starts[-1]), len(parts)
        # found here, on the thread building the block, for a fit that asks (rows_ascend)
        block.rows_ascend(starts.tolist())
        return block

    def _init_weights(self) -> None:
        inten = np.asarray(self._arrays["intensity"], dtype=np.float64)
        var = np.asarray(self._arrays["variance"], dtype=np.float64)
        code = np.zeros(inten.size, dtype=np.uint8)
        bad_var = ~(np.isfinite(var) & (var > 0))
        bad_i = ~np.isfinite(inten)
        code[bad_var] = EXCLUDED_BAD_VARIANCE
        code[bad_i] = EXCLUDED_BAD_INTENSITY
        w = np.zeros(inten.size)
        np.divide(1.0, var, out=w, where=~bad_var)
        w[bad_i] = 0.0
        self._arrays["weights"] = w
        self.exclusion = code

    def _reindex(self) -> None:
        """Table order (rows sorted by group, stable) and group offsets."""
        self._order, self._offsets = _stable_group_order(self._group_ids, self._n_groups)
        self._table_rows = np.empty_like(self._order)
        self._table_rows[self._order] = np.arange(self._order.size)
        self._arrays.setdefault("Ih_values", np.zeros(self._order.size))

    # ------------------------------------------------------------------ accessors
    @property
    def size(self) -> int:
        return int(self._group_ids.size)

    @property
    def n_groups(self) -> int:
        return self._n_groups

    @property
    def Ih_table(self) -> dict[str, np.ndarray]:  # noqa: N802 (DIALS name)
        """dict: the block's columns (DIALS keeps a pandas table here)."""
        return self._arrays

    @property
    def intensities(self) -> np.ndarray:
        return self._arrays["intensity"]

    @property
    def variances(self) -> np.ndarray:
        return self._arrays["variance"]

    @property
    def inverse_scale_factors(self) -> np.ndarray:
        return self._arrays["inverse_scale_factor"]

    @inverse_scale_factors.setter
    def inverse_scale_factors(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size != self.size:
            raise IhTableError(f"inverse_scale_factors needs {self.size} values, got {v.size}")
        self._arrays["inverse_scale_factor"] = v

    @property
    def weights(self) -> np.ndarray:
        return self._arrays["weights"]

    @weights.setter
    def weights(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size != self.size or not np.all(np.isfinite(v)) or np.any(v < 0):
            raise IhTableError(f"weights must be {self.size} finite values >= 0")
        self._arrays["weights"] = v

    @property
    def Ih_values(self) -> np.ndarray:  # noqa: N802
        return self._arrays["Ih_values"]

    @property
    def _hkl(self) -> np.ndarray:
        """The rows' ASU Miller indices (gathered from their sources on first use)."""
        if self._hkl_value is None:
            sources, self._hkl_sources = self._hkl_sources, []
            if not sources:
                self._hkl_value = np.zeros((self.size, 3), np.int32)
            else:
                out = np.empty((sum(int(r.size) for _, r, _ in sources), 3),
                               dtype=np.result_type(*(h.dtype for h, _, _ in sources)))
                start = 0
                for hkl, rows, row_map in sources:
                    take = rows if row_map is None else row_map[rows]
                    # the block's rows were checked by its build: in range
                    np.take(hkl, take, axis=0, out=out[start:start + rows.size], mode="clip")
                    start += rows.size
                self._hkl_value = out
        return self._hkl_value

    @_hkl.setter
    def _hkl(self, value: np.ndarray) -> None:
        self._hkl_value, self._hkl_sources = value, []

    @property
    def asu_miller_index(self) -> np.ndarray:
        return self._hkl

    @property
    def group_ids(self) -> np.ndarray:
        """numpy.ndarray: block-local group of every row."""
        return self._group_ids

    @property
    def h_index_matrix(self) -> sp.csr_matrix:
        """scipy CSR ``n_refl x n_groups`` with a 1 at (row, group)."""
        n = self.size
        return sp.csr_matrix((np.ones(n), (np.arange(n), self._group_ids)), shape=(n, self._n_groups))

    @property
    def h_expand_matrix(self) -> sp.csr_matrix:
        return self.h_index_matrix.T.tocsr()

    def set_dataset_data(self, dataset_id: int, intensity: Any, variance: Any) -> None:
        """Replace one dataset's intensities and variances (``dataset_info[dataset_id]``'s rows,
        in this block's row order). Every row's weight is reset to 1/σ² (an error model's weights
        are re-applied with :meth:`update_weights`); Ĩ is not recomputed (:meth:`calc_Ih`)."""
        info = self.dataset_info.get(dataset_id)
        if info is None:
            raise IhTableError(f"dataset {dataset_id} has no rows in this block")
        lo, hi = info["start_index"], info["end_index"]
        for name, values in (("intensity", intensity), ("variance", variance)):
            v = np.asarray(values, dtype=np.float64).ravel()
            if v.size != hi - lo:
                raise IhTableError(f"{name} needs {hi - lo} values for dataset {dataset_id}, got {v.size}")
            arr = self._arrays[name].astype(np.float64, copy=True)
            arr[lo:hi] = v
            self._arrays[name] = arr
        self._init_weights()

    # ------------------------------------------------------------------ table view for kernels
    def table_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(group_offsets, intensities, weights, table_rows)`` in table order; ``table_rows``
        maps block rows to table rows (the row map of a model block in block order).

        The table-order I and w (read-only) are made once and kept until the block's intensity
        or weight array is replaced (its setters and error-model updates replace the arrays,
        never write into them): a fit asks for them at every evaluation."""
        inten_src, w_src = self._arrays["intensity"], self._arrays["weights"]
        held = getattr(self, "_table_order_held", None)
        if held is None or held[0] is not inten_src or held[1] is not w_src or held[2] is not self._order:
            inten = np.nan_to_num(np.asarray(inten_src, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            inten_t = np.ascontiguousarray(inten[self._order])
            w_t = np.ascontiguousarray(np.asarray(w_src)[self._order])
            inten_t.setflags(write=False)
            w_t.setflags(write=False)
            held = self._table_order_held = (inten_src, w_src, self._order, inten_t, w_t)
        return (self._offsets, held[3], held[4], self._table_rows)

    def rows_ascend(self, starts: Sequence[int]) -> bool:
        """True when the table rows (:meth:`table_arrays`' row map) of the block rows in each
        range ``[starts[k], starts[k + 1])`` ascend (each dataset's rows in group order, as a
        model block evaluated over table rows needs them). Found once per row map and ranges:
        the block builder finds its datasets' on the worker thread that builds the block, so a
        streamed fit does not check each block again on its one thread."""
        key = tuple(int(k) for k in starts)
        held = self._ascending_held
        if held is None or held[0] is not self._table_rows:
            held = self._ascending_held = (self._table_rows, {})
        found = held[1].get(key)
        if found is None:
            rows = self._table_rows
            found = held[1][key] = all(bool(np.all(np.diff(rows[lo:hi]) > 0)) for lo, hi in zip(key, key[1:]))
        return found

    # ------------------------------------------------------------------ group maths
    def calc_Ih(self) -> None:  # noqa: N802
        """Ĩ_h = Σ w g I / Σ w g² (0 for a group with no weight), broadcast to rows."""
        # one C++ pass over the rows in group order (no table-order copies)
        self._arrays["Ih_values"] = _fit.calc_Ih_rows(
            self._order, self._offsets, np.asarray(self.intensities, dtype=np.float64),
            np.asarray(self.weights, dtype=np.float64), np.asarray(self.inverse_scale_factors, dtype=np.float64))

    def calc_nh(self) -> np.ndarray:
        """Group size of every row."""
        return np.diff(self._offsets)[self._group_ids].astype(np.float64)

    def group_multiplicities(self, output: str = "per_group") -> np.ndarray:
        counts = np.diff(self._offsets).astype(np.float64)
        return self._expand(counts, output)

    def _expand(self, per_group: np.ndarray, output: str) -> np.ndarray:
        if output == "per_group":
            return per_group
        if output == "per_refl":
            return per_group[self._group_ids]
        raise IhTableError(f"output must be 'per_group' or 'per_refl', got {output!r}")

    def sum_in_groups(self, array: Any, output: str = "per_group") -> np.ndarray:
        a = np.asarray(array, dtype=np.float64).ravel()
        if a.size != self.size:
            raise IhTableError(f"array needs {self.size} values, got {a.size}")
        sums = _fit.sum_in_groups(self._offsets, np.ascontiguousarray(a[self._order]))
        return self._expand(sums, output)

    def update_weights(self, error_model: Any = None, dataset_id: int | None = None) -> None:
        """1/σ², or the error model's weights ``1/(a²(σ² + (b I)²))`` on the unscaled I."""
        if error_model is None:
            self._init_weights()
            return
        rows = slice(None)
        if dataset_id is not None:
            info = self.dataset_info.get(dataset_id)
            if info is None:
                return
            rows = slice(info["start_index"], info["end_index"])
        sigmaprime = error_model.update_variances(self.variances[rows], self.intensities[rows])
        sp_ = np.asarray(sigmaprime, dtype=np.float64)
        w = self._arrays["weights"].copy()
        ok = np.isfinite(sp_) & (sp_ > 0) & (self.exclusion[rows] == 0)
        part = np.zeros(sp_.size)
        np.divide(1.0, sp_, out=part, where=ok)
        w[rows] = part
        self._arrays["weights"] = w

    # ------------------------------------------------------------------ selection
    def select(self, sel: Any) -> "IhTableBlock":
        """A new block holding the selected rows (bool mask or row indices), groups renumbered."""
        idx = np.arange(self.size)[np.asarray(sel)] if np.asarray(sel).dtype == bool else np.asarray(sel, np.int64)
        groups_kept, new_groups = np.unique(self._group_ids[idx], return_inverse=True)
        new = IhTableBlock(len(groups_kept), idx.size, self.n_datasets)
        ds = self._arrays["dataset_id"][idx]
        for d in range(self.n_datasets):
            m = ds == d
            cols = {k: v[idx][m] for k, v in self._arrays.items()
                    if k not in ("weights", "Ih_values", "dataset_id")}
            new.add_data(d, new_groups[m], cols, self._hkl[idx][m])
        new._arrays["weights"] = self.weights[idx].copy()
        new.exclusion = self.exclusion[idx].copy()
        new._arrays["Ih_values"] = self.Ih_values[idx].copy()
        if self.derivatives is not None:
            d = self.derivatives
            new.derivatives = sp.csr_matrix(d.as_scipy() if hasattr(d, "as_scipy") else d)[idx]
        return new

    def select_on_groups(self, sel: Any) -> "IhTableBlock":
        """Select whole groups (bool mask over groups or group indices)."""
        s = np.asarray(sel)
        groups = np.flatnonzero(s) if s.dtype == bool else s.astype(np.int64)
        keep = np.isin(self._group_ids, groups)
        return self.select(keep)

    def match_Ih_values_to_target(self, target_Ih_table: Any) -> None:  # noqa: N802,N803
        """Set Ĩ to the reference table's value for the same ASU index; drop unmatched groups
        from the fit by giving them weight 0 (rows stay, flagged by ``Ih_values == 0``)."""
        target = target_Ih_table.blocked_data_list[0] if hasattr(target_Ih_table, "blocked_data_list") else target_Ih_table
        t_keys = hkl_keys(target.asu_miller_index)
        t_ih = np.asarray(target.Ih_values, dtype=np.float64)
        # the target's value per ASU index: its last row's, as DIALS's {index: Ĩ} dict keeps
        # (rows of one group normally share Ĩ)
        t_keys, last = np.unique(t_keys[::-1], return_index=True)
        t_ih = t_ih[::-1][last]
        keys = hkl_keys(self._hkl)
        matched = np.zeros(keys.size)
        if t_keys.size:
            pos = np.minimum(np.searchsorted(t_keys, keys), t_keys.size - 1)
            hit = t_keys[pos] == keys
            matched[hit] = t_ih[pos[hit]]
        self._arrays["Ih_values"] = matched
        matched = self._arrays["Ih_values"] != 0.0
        if not np.all(matched):
            sel = self.select(matched)
            self.__dict__.update(sel.__dict__)

    def set_Ih_values_to_target(self, target_Ih_table: Any) -> None:  # noqa: N802,N803
        self.match_Ih_values_to_target(target_Ih_table)

    def as_miller_array(self, unit_cell: Any, space_group: Any = None) -> Any:
        """The block's observations as an intensity :class:`~xtalscale.miller.MillerArray`:
        ASU indices, data I/g and sigmas σ/g (DIALS's ``_reflection_table_to_iobs``)."""
        from ..miller import MillerArray

        g = np.asarray(self.inverse_scale_factors, dtype=np.float64)
        data = np.asarray(self.intensities, dtype=np.float64) / g
        sigmas = np.sqrt(np.asarray(self.variances, dtype=np.float64)) / g
        return MillerArray(unit_cell, space_group, self._hkl, data, sigmas).set_observation_type_xray_intensity()

    def setup_binner(self, unit_cell: Any, space_group: Any, n_resolution_bins: int) -> Any:
        """Equal-d*² resolution bins over the block's observations, as DIALS: the range widened
        by 1e-6 of its span at both ends, the step ``max(span / n_resolution_bins, 0.004)``.
        Stored as ``binner`` and returned."""
        if int(n_resolution_bins) < 1:
            raise IhTableError("n_resolution_bins must be >= 1")
        array = self.as_miller_array(unit_cell, space_group)
        dss = np.asarray(array.d_star_sq().data())
        if not dss.size:
            raise IhTableError("the block holds no observations to bin")
        lo, hi = float(dss.min()), float(dss.max())
        span = hi - lo
        lo, hi = lo - span * 1e-6, hi + span * 1e-6
        step = max((hi - lo) / int(n_resolution_bins), 0.004)
        self.binner = array.setup_binner_d_star_sq_step(d_max=lo ** -0.5, d_min=hi ** -0.5, d_star_sq_step=step)
        return self.binner

    def as_reflection_table(self) -> Any:
        """The block's columns as a reflection table (asu index, Ĩ, weights, ...)."""
        from .. import flex_arrays as flex
        from ..reflection_table import reflection_table

        t = reflection_table()
        for k, v in self._arrays.items():
            t[k] = flex.double(np.asarray(v, np.float64)) if np.asarray(v).dtype.kind == "f" else flex.int(np.asarray(v, np.int32))
        t["asu_miller_index"] = flex.miller_index(np.asarray(self._hkl, dtype=np.int32).reshape(-1, 3))
        return t


class IhTable:
    """DIALS ``IhTable``: the reflections of one or more datasets grouped by unique index.

    Parameters
    ----------
    reflection_tables : list of reflection tables (or mappings of columns)
        Each with ``intensity``, ``variance``, ``miller_index`` and optionally
        ``inverse_scale_factor``. ``asu_miller_index`` is computed and stored if missing; a
        table that has it (one row per intensity) needs no ``miller_index``.
    space_group : SpaceGroup or str
    indices_lists : list of int arrays, optional
        Rows of each table to use (``loc_indices`` then index into these lists). Without
        them every row is used, and a table's own ``loc_indices`` column (if any) gives its
        rows' numbers in the caller's table (a caller that gathered the rows itself).
    nblocks : int
        Work blocks; groups are split at ``int(i * n_unique / n_work_blocks)``.
    free_set_percentage, free_set_offset : float, int
        Every ``int(100/pct)``-th unique group from ``offset`` goes to a final free block.
    additional_cols : list of str, optional
        Extra columns carried into the blocks.
    anomalous : bool
        Keep Bijvoet mates apart.
    group_keys : list of int64 arrays, optional
        Explicit group key per (selected) row instead of Miller indices (voxels, ...); then
        ``miller_index`` and ``space_group`` are not used.
    group_index : list of int64 arrays, optional
        The group of each (selected) row in a grouping of these Miller indices the caller has
        already made (numbers ascending in the order :func:`~xtalscale.symmetry.group_reflections`
        gives the groups, i.e. by signed ASU (h, k, l), with this ``anomalous``; unused numbers
        are allowed): the rows are not sorted again. The job passes its grouping of the
        suitable rows.
    mapper : callable, optional
        ``mapper(function, items)`` like the built-in ``map`` (e.g. a thread pool's): the blocks
        are built through it, so a caller with threads builds them concurrently (each block's
        columns are its own; the blocks come back in order, the same for any mapper).
    """

    def __init__(self, reflection_tables: Sequence[Any], space_group: Any = None,
                 indices_lists: Sequence[Any] | None = None, nblocks: int = 1,
                 free_set_percentage: float = 0, free_set_offset: int = 0,
                 additional_cols: Sequence[str] | None = None, anomalous: bool = False,
                 group_keys: Sequence[Any] | None = None, group_index: Sequence[Any] | None = None,
                 mapper: Callable[..., Any] | None = None) -> None:
        if not reflection_tables:
            raise IhTableError("reflection_tables must hold at least one table")
        if nblocks < 1:
            raise IhTableError("nblocks must be >= 1")
        self.space_group = space_group
        self.anomalous = anomalous
        self.n_datasets = len(reflection_tables)
        self.properties_dict = {"n_unique_in_each_block": [], "n_reflections_in_each_block": {},
                                "miller_index_boundaries": []}
        self.free_Ih_table: bool | None = None
        extra = list(additional_cols or [])
        keys, sources = [], []
        for i, table in enumerate(reflection_tables):
            sel = None if indices_lists is None else np.asarray(indices_lists[i], dtype=np.int64)
            src = self._dataset_source(table, sel, extra, i)
            if group_keys is not None:
                k = np.asarray(group_keys[i], dtype=np.int64)
                if k.size != src.n_selected:
                    raise IhTableError(f"group_keys[{i}] has {k.size} values for {src.n_selected} rows")
                src.hkl = np.stack([k, np.zeros_like(k), np.zeros_like(k)], axis=1).astype(np.int64)
                keys.append(k)
            else:
                src.hkl = self._asu(table, i)
                src.hkl_rows = sel
            sources.append(src)
        given = None if group_index is None or group_keys is not None else \
            _given_group_parts(group_index, [src.n_selected for src in sources], mapper)
        self._build(sources, keys if group_keys is not None else None, nblocks,
                    free_set_percentage, free_set_offset, given, mapper)

    @classmethod
    def _from_sources(cls, sources: Sequence[_RowSource], space_group: Any, group_index: Sequence[Any],
                      nblocks: int = 1, free_set_percentage: float = 0, free_set_offset: int = 0,
                      anomalous: bool = False, mapper: Callable[..., Any] | None = None) -> IhTable:
        """The table of datasets given as :class:`_RowSource` (whole columns read through row
        maps, nothing gathered first) and their rows' groups (as ``group_index``): the table
        ``IhTable(tables, ..., group_index=group_index)`` gives for the gathered rows."""
        if not sources:
            raise IhTableError("sources must hold at least one dataset")
        if nblocks < 1:
            raise IhTableError("nblocks must be >= 1")
        table = cls.__new__(cls)
        table.space_group = space_group
        table.anomalous = anomalous
        table.n_datasets = len(sources)
        table.properties_dict = {"n_unique_in_each_block": [], "n_reflections_in_each_block": {},
                                 "miller_index_boundaries": []}
        table.free_Ih_table = None
        given = _given_group_parts(group_index, [src.n_selected for src in sources], mapper)
        table._build(list(sources), None, nblocks, free_set_percentage, free_set_offset, given, mapper)
        return table

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _dataset_source(table: Any, sel: np.ndarray | None, extra: list[str], i: int) -> _RowSource:
        """A table's selected rows as the blocks read them (nothing gathered: see _RowSource)."""
        for name in ("intensity", "variance"):
            if not _has(table, name):
                raise IhTableError(f"reflection table {i} has no {name!r} column")
        n = len(_column(table, "intensity"))
        columns: dict[str, np.ndarray] = {}
        for name in ("intensity", "variance"):
            columns[name] = np.asarray(_column(table, name), np.float64)
        columns["inverse_scale_factor"] = (np.asarray(_column(table, "inverse_scale_factor"), np.float64)
                                           if _has(table, "inverse_scale_factor") else np.ones(n))
        for name in extra:
            columns[name] = np.asarray(_column(table, name))
        for name, values in columns.items():
            if values.ndim != 1 or values.shape[0] != n:
                raise IhTableError(f"table {i}: column {name!r} must hold one value per row ({n})")
        if sel is None:
            # every row: as input rows the table's "loc_indices" if it has them (a caller that
            # gathered the rows itself), else 0..n-1
            given = np.asarray(_column(table, "loc_indices"), np.int64) if _has(table, "loc_indices") else None
            if given is not None and given.shape != (n,):
                raise IhTableError(f"table {i}: loc_indices must hold one row number per row ({n})")
            return _RowSource(columns, n, None, given, None, None, None)
        if sel.ndim != 1:
            raise IhTableError(f"indices_lists[{i}] must be 1-dimensional")
        if sel.size and (sel.min() < 0 or sel.max() >= n):
            raise IhTableError(f"indices_lists[{i}] holds rows outside [0, {n})")
        # loc_indices: rows of the input table (DIALS block_selections)
        return _RowSource(columns, sel.size, sel, sel, None, None, None)

    def _asu(self, table: Any, i: int) -> np.ndarray:
        """The ASU Miller indices of every row of a table (stored in it when missing)."""
        n_rows = len(_column(table, "intensity"))
        if _has(table, "asu_miller_index"):  # stored by an earlier table (or the caller): reuse
            stored = np.asarray(_column(table, "asu_miller_index"), dtype=np.int32).reshape(-1, 3)
            if stored.shape[0] == n_rows:
                return stored
        if not _has(table, "miller_index"):
            raise IhTableError(f"reflection table {i} has no 'miller_index' column")
        if self.space_group is None:
            raise IhTableError("space_group is required to group by Miller index")
        hkl_all = np.asarray(_column(table, "miller_index")).reshape(-1, 3)
        asu = map_to_asu(hkl_all, self.space_group, anomalous=self.anomalous).asu_hkl
        try:
            if not _has(table, "asu_miller_index"):
                from .. import flex_arrays as flex
                table["asu_miller_index"] = flex.miller_index(np.asarray(asu, dtype=np.int32))
        except (TypeError, AttributeError, ValueError):
            pass  # a plain read-only mapping: nothing to store
        return asu

    def _build(self, sources: list[_RowSource], keys: list[np.ndarray] | None,
               nblocks: int, pct: float, offset: int, given: tuple[list[np.ndarray], np.ndarray] | None = None,
               mapper: Callable[..., Any] | None = None) -> None:
        """Cut the rows into blocks of whole groups and build them. ``given``: each source's
        rows' group numbers (one array per source) and the groups' offsets
        (:func:`_given_group_parts`). ``mapper`` (like ``map``): the per-source sorts and the
        blocks are made through it (their kernels release the GIL)."""
        each = mapper or map
        starts = np.cumsum([0] + [src.n_selected for src in sources])
        if given is not None and keys is None:
            gidx_parts, offs = given
        else:
            if keys is not None:
                _, gidx, offs = group_offsets_from_keys(np.concatenate(keys))
            else:
                hkls = [src.hkl if src.hkl_rows is None else take_rows(src.hkl, src.hkl_rows) for src in sources]
                grouping = group_reflections(np.concatenate(hkls) if hkls else np.zeros((0, 3), np.int64))
                gidx, offs = grouping.group_index, grouping.offsets
            gidx_parts = [gidx[starts[d]:starts[d + 1]] for d in range(len(sources))]
        n_unique = offs.size - 1
        is_free = np.zeros(n_unique, bool)
        if pct > 0:
            n_free = int(pct * n_unique / 100)
            interval = int(100 / pct)
            pos = offset + interval * np.arange(n_free)
            is_free[pos[pos < n_unique]] = True
        n_work_groups = int(n_unique - is_free.sum())
        n_work_blocks = max(1, min(nblocks, n_work_groups)) if n_work_groups else 1
        bounds = [int(i * n_unique / n_work_blocks) for i in range(n_work_blocks)] + [n_unique]
        block_of_group = np.searchsorted(np.asarray(bounds[1:]), np.arange(n_unique), side="right")
        block_of_group[is_free] = n_work_blocks  # the free block comes last
        n_blocks_total = n_work_blocks + (1 if pct > 0 else 0)
        self.blocked_data_list: list[IhTableBlock] = []
        self.blocked_selection_list: list[list[np.ndarray]] = []
        # Each group's number within its block, and per dataset its rows ordered by block, then
        # group, then row (two stable counting sorts): O(rows + groups) whatever the number of
        # blocks (a streamed table has many).
        group_order, block_starts = _stable_group_order(block_of_group, n_blocks_total)
        local = np.empty(n_unique, np.int64)
        local[group_order] = np.arange(n_unique) - np.repeat(block_starts[:-1], np.diff(block_starts))
        # without free groups every block is a run of consecutive groups (block numbers ascend
        # with the group numbers): rows in group order are then in block order already
        blocks_are_group_runs = bool(np.all(block_of_group[1:] >= block_of_group[:-1]))

        def rows_by_block(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            g = np.ascontiguousarray(gidx_parts[d], dtype=np.int64)
            by_group, group_starts = _stable_group_order(g, n_unique)
            # the groups in by_group's order, made in order (not read through it): ascending
            g_sorted = np.repeat(np.arange(n_unique, dtype=np.int64), np.diff(group_starts))
            if blocks_are_group_runs:  # (the stable sort by block below would be the identity)
                return by_group, g_sorted, group_starts[block_starts]
            within, row_starts = _stable_group_order(block_of_group[g_sorted], n_blocks_total)
            # the rows by block, then group; and their groups (numbered over the table: local
            # maps them to the block's), so no block reads a row's group out of order
            return by_group[within], g_sorted[within], row_starts

        # each source's sorts are its own (the counting sorts release the GIL)
        by_block = list(each(rows_by_block, range(len(sources))))
        names = [*sources[0].columns, "loc_indices"]

        def make_block(b: int) -> IhTableBlock:
            n_groups_b = int(block_starts[b + 1] - block_starts[b])
            parts = [_BlockRows(order[row_starts[b]:row_starts[b + 1]], src, groups[row_starts[b]:row_starts[b + 1]])
                     for (order, groups, row_starts), src in zip(by_block, sources)]
            return IhTableBlock._from_rows(n_groups_b, parts, names, local)

        for block in each(make_block, range(n_blocks_total)):
            self.blocked_data_list.append(block)
            self.blocked_selection_list.append([blk for blk in block.block_selections])
            self.properties_dict["n_unique_in_each_block"].append(block.n_groups)
        if pct > 0:
            self.free_Ih_table = True
        self.n_work_blocks = n_work_blocks

    # ------------------------------------------------------------------ DIALS API
    @property
    def Ih_table_blocks(self) -> list[IhTableBlock]:  # noqa: N802
        return self.blocked_data_list

    @property
    def size(self) -> int:
        """int: rows in the work blocks."""
        return sum(b.size for b in self.blocked_data_list[: self.n_work_blocks])

    def get_block_selections_for_dataset(self, dataset: int) -> list[np.ndarray]:
        return [b.block_selections[dataset] for b in self.blocked_data_list[: self.n_work_blocks]]

    def update_data_in_blocks(self, data: Any, dataset_id: int, column: str = "intensity") -> None:
        """Write a dataset's column (indexed as the input rows) into every block."""
        if column not in ("intensity", "variance", "inverse_scale_factor"):
            raise IhTableError(f"column must be intensity, variance or inverse_scale_factor, got {column!r}")
        values = np.asarray(data.as_numpy_array() if hasattr(data, "as_numpy_array") else data, np.float64)
        for block in self.blocked_data_list:
            info = block.dataset_info.get(dataset_id)
            if info is None:
                continue
            arr = block._arrays[column].astype(np.float64, copy=True)
            arr[info["start_index"]:info["end_index"]] = values[block.block_selections[dataset_id]]
            block._arrays[column] = arr
            if column == "variance":
                block._init_weights()

    def update_weights(self, error_model: Any = None, dataset_id: int | None = None) -> None:
        for block in self.blocked_data_list[: self.n_work_blocks]:
            block.update_weights(error_model, dataset_id)

    def set_derivatives(self, derivatives: Any, block_id: int) -> None:
        self.blocked_data_list[block_id].derivatives = derivatives

    def set_inverse_scale_factors(self, new_scales: Any, block_id: int) -> None:
        self.blocked_data_list[block_id].inverse_scale_factors = new_scales

    def calc_Ih(self, block_id: int | None = None) -> None:  # noqa: N802
        blocks = self.blocked_data_list if block_id is None else [self.blocked_data_list[block_id]]
        for block in blocks:
            block.calc_Ih()

    def extract_free_set(self) -> IhTableBlock | None:
        return self.blocked_data_list[-1] if self.free_Ih_table else None

    def as_miller_array(self, unit_cell: Any, return_free_set_data: bool = False) -> Any:
        """The work blocks' (or, with ``return_free_set_data``, the free block's) observations
        as one intensity :class:`~xtalscale.miller.MillerArray` (I/g, σ/g at the ASU indices), in
        block order (DIALS ``IhTable.as_miller_array``)."""
        from ..miller import MillerArray

        blocks = self.blocked_data_list
        if self.free_Ih_table:
            blocks = blocks[-1:] if return_free_set_data else blocks[: self.n_work_blocks]
        elif return_free_set_data:
            raise IhTableError("this Ih table has no free set")
        parts = [b.as_miller_array(unit_cell, self.space_group) for b in blocks]
        hkl = np.concatenate([np.asarray(p.indices()).reshape(-1, 3) for p in parts])
        data = np.concatenate([np.asarray(p.data()) for p in parts])
        sigmas = np.concatenate([np.asarray(p.sigmas()) for p in parts])
        return MillerArray(unit_cell, self.space_group, hkl, data, sigmas).set_observation_type_xray_intensity()


class TargetAsuDictCache:
    """DIALS's ``TargetAsuDictCache``: ``TargetAsuDictCache(target)`` is the dict
    ``{ASU index tuple: Ĩ}`` of the target table's first block, built once per target object
    (later rows of an index win, as in a dict built row by row). Kept for scripts; the Ih table's
    own matching (:meth:`IhTableBlock.match_Ih_values_to_target`) is vectorised and needs none."""

    instances: dict[int, dict] = {}

    def __new__(cls, target_Ih_table: Any) -> dict:  # noqa: N803 (DIALS name)
        key = id(target_Ih_table)
        if key not in cls.instances:
            block = target_Ih_table.blocked_data_list[0]
            hkl = np.asarray(block.asu_miller_index).reshape(-1, 3).tolist()
            cls.instances[key] = dict(zip(map(tuple, hkl), np.asarray(block.Ih_values).tolist()))
        return cls.instances[key]
