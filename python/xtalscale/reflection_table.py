"""``reflection_table``: DIALS's column table of per-reflection data, on flex/numpy columns.

Columns are flex arrays of equal length (see :mod:`xtalscale.flex_arrays`); ``table["col"]``
returns the stored column itself, so its ``as_numpy_array()`` is a zero-copy view and in-place
edits change the table, as in DIALS. Assigning a numpy array wraps it without copying.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import MutableMapping
from typing import Any, Iterable, Iterator

import numpy as np

from . import flex_arrays as fa

__all__ = ["reflection_table", "experiment_id_map", "Flags"]


class Flags(enum.IntFlag):
    """Reflection status bits, with the values of ``dials/array_family/reflection_table.h``."""

    predicted = 1 << 0
    observed = 1 << 1
    indexed = 1 << 2
    used_in_refinement = 1 << 3
    strong = 1 << 5
    reference_spot = 1 << 6
    dont_integrate = 1 << 7
    integrated_sum = 1 << 8
    integrated_prf = 1 << 9
    integrated = (1 << 8) | (1 << 9)
    overloaded = 1 << 10
    overlapped_bg = 1 << 11
    overlapped_fg = 1 << 12
    in_powder_ring = 1 << 13
    foreground_includes_bad_pixels = 1 << 14
    background_includes_bad_pixels = 1 << 15
    includes_bad_pixels = (1 << 14) | (1 << 15)
    bad_shoebox = (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)
    bad_spot = (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)
    used_in_modelling = 1 << 16
    centroid_outlier = 1 << 17
    failed_during_background_modelling = 1 << 18
    failed_during_summation = 1 << 19
    failed_during_profile_fitting = 1 << 20
    bad_reference = 1 << 21
    user_excluded_in_scaling = 1 << 22
    outlier_in_scaling = 1 << 23
    excluded_for_scaling = 1 << 24
    bad_for_scaling = (1 << 22) | (1 << 23) | (1 << 24)
    excluded_for_refinement = 1 << 25
    bad_for_refinement = (1 << 25) | (1 << 17)
    scaled = 1 << 26


class experiment_id_map(MutableMapping):
    """Map from experiment index (``id`` column value, >= 0) to experiment identifier string.

    Mirrors DIALS's ``experiment_id_map``: ``keys()``/``values()`` are in index order and
    iteration yields ``(index, identifier)`` pairs.
    """

    __slots__ = ("_d",)

    def __init__(self, items: Any = None) -> None:
        self._d: dict[int, str] = {}
        if items:
            for k, v in items.items() if hasattr(items, "items") else items:
                self[k] = v

    @staticmethod
    def _key(k: Any) -> int:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (numbers.Integral, np.integer)):
            raise TypeError(f"experiment identifier index must be an integer (got {k!r})")
        if k < 0:
            raise ValueError(f"experiment identifier index must be >= 0 (got {k})")
        return int(k)

    def __getitem__(self, k: Any) -> str:
        try:
            return self._d[self._key(k)]
        except KeyError:
            raise KeyError(f"no experiment identifier for id {k}") from None

    def __setitem__(self, k: Any, v: Any) -> None:
        if not isinstance(v, str):
            raise TypeError(f"experiment identifier must be a str (got {type(v).__name__})")
        self._d[self._key(k)] = v

    def __delitem__(self, k: Any) -> None:
        del self._d[self._key(k)]

    def __iter__(self) -> Iterator[tuple[int, str]]:  # type: ignore[override]
        return iter(sorted(self._d.items()))

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, k: Any) -> bool:
        return isinstance(k, (numbers.Integral, np.integer)) and int(k) in self._d

    def keys(self) -> list[int]:  # type: ignore[override]
        return sorted(self._d)

    def values(self) -> list[str]:  # type: ignore[override]
        return [self._d[k] for k in sorted(self._d)]

    def items(self) -> list[tuple[int, str]]:  # type: ignore[override]
        return sorted(self._d.items())

    def as_dict(self) -> dict[int, str]:
        return dict(sorted(self._d.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, experiment_id_map):
            return self._d == other._d
        if isinstance(other, dict):
            return self._d == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"experiment_id_map({self.as_dict()!r})"


def _as_column(value: Any, name: str) -> fa.FlexArray:
    """A flex column for ``value`` (flex arrays are kept as they are; numpy arrays wrapped)."""
    if isinstance(value, fa.FlexArray):
        col = value
    else:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.ndim == 0:
            raise ValueError(f"column {name!r}: a column needs an array, not a scalar")
        try:
            col = fa.as_flex(arr if arr.dtype.kind != "U" else arr.astype(object))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"column {name!r}: {exc}") from None
        if not isinstance(col, fa.FlexArray):
            raise TypeError(
                f"column {name!r}: no flex type for dtype {arr.dtype}, shape {arr.shape}"
            )
    if not col._width and col.ndim != 1:
        raise ValueError(
            f"column {name!r}: grid arrays cannot be table columns (shape {col.shape})"
        )
    return col


def _selected_rows(selection: np.ndarray) -> np.ndarray:
    """Row numbers of a validated selection (``fa._as_selection``): a bool mask becomes its
    indices once, so that every column is gathered with one shared index array
    (``np.take`` along rows is about twice as fast as boolean or fancy indexing per column)."""
    return np.flatnonzero(selection) if selection.dtype == np.bool_ else selection


class reflection_table:
    """A table of reflections: named flex columns of equal length plus experiment identifiers.

    Parameters
    ----------
    nrows : int, optional
        Initial number of rows (for a table whose columns are added later).
    """

    flags = Flags

    def __init__(self, nrows: int = 0) -> None:
        self._nrows = fa._check_size(nrows, "nrows")
        self._cols: dict[str, fa.FlexArray] = {}
        self._ids = experiment_id_map()

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._nrows

    def size(self) -> int:
        return self._nrows

    def nrows(self) -> int:
        return self._nrows

    def ncols(self) -> int:
        return len(self._cols)

    def _names(self) -> list[str]:
        # DIALS keeps columns in a std::map: byte-wise name order, whatever the insertion order.
        return sorted(self._cols, key=lambda s: s.encode("utf-8"))

    def keys(self) -> list[str]:
        """Column names, in DIALS order (sorted by name)."""
        return self._names()

    def cols(self) -> Iterator[tuple[str, fa.FlexArray]]:
        """(name, column) pairs in DIALS order."""
        return iter([(k, self._cols[k]) for k in self._names()])

    def __contains__(self, name: object) -> bool:
        return name in self._cols

    def has_key(self, name: str) -> bool:
        return name in self._cols

    def experiment_identifiers(self) -> experiment_id_map:
        """The (mutable, shared) experiment index -> identifier map."""
        return self._ids

    def __repr__(self) -> str:
        return f"<reflection_table nrows={self._nrows} ncols={len(self._cols)}>"

    def is_consistent(self) -> bool:
        return all(len(c) == self._nrows for c in self._cols.values())

    # ------------------------------------------------------------------ columns and rows
    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return self._cols[key]
            except KeyError:
                raise KeyError(f"reflection_table has no column {key!r}") from None
        if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if i < -self._nrows or i >= self._nrows:
                raise IndexError(f"row {i} out of range for a table of {self._nrows} rows")
            return {k: self._cols[k][i] for k in self._names()}
        if isinstance(key, slice):
            return self.select(np.arange(self._nrows)[key])
        raise TypeError(
            f"reflection_table indices must be str, int or slice (got {type(key).__name__})"
        )

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(key, bool):
            self._set_row(int(key), value)
            return
        if not isinstance(key, str):
            raise TypeError(f"column names must be str (got {type(key).__name__})")
        col = _as_column(value, key)
        if self._cols and len(col) != self._nrows:
            raise ValueError(f"column {key!r} has {len(col)} rows but the table has {self._nrows}")
        if not self._cols:
            self._nrows = len(col)
        self._cols[key] = col

    def _set_row(self, i: int, row: Any) -> None:
        """``table[i] = {name: value}``: set existing columns of one row (as DIALS)."""
        if i < -self._nrows or i >= self._nrows:
            raise IndexError(f"row {i} out of range for a table of {self._nrows} rows")
        if not isinstance(row, dict):
            raise TypeError("a row must be assigned from a dict {column: value}")
        unknown = [k for k in row if k not in self._cols]
        if unknown:
            raise KeyError(f"reflection_table has no columns {unknown}")
        for k, v in row.items():
            col = self._cols[k]
            col._a[i] = col._coerce_value(v, k)

    def __delitem__(self, key: str) -> None:
        try:
            del self._cols[key]
        except KeyError:
            raise KeyError(f"reflection_table has no column {key!r}") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Rows as dicts (as DIALS)."""
        for i in range(self._nrows):
            yield self[i]

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(self)

    def _adopt(self, cols: dict[str, fa.FlexArray], nrows: int) -> "reflection_table":
        t = reflection_table.__new__(reflection_table)
        t._nrows = nrows
        t._cols = cols
        t._ids = experiment_id_map(self._ids.as_dict())
        return t

    # ------------------------------------------------------------------ selection
    def select(self, selection: Any, *, columns: Iterable[str] | None = None) -> "reflection_table":
        """Rows by bool mask or indices; columns by a list/tuple of names; or by experiment(s).

        The identifiers map is copied whole for row selections (as DIALS does); for an
        experiment selection it keeps only the selected experiments. ``columns`` (row
        selections only) copies just the named columns' rows, for a caller that reads a few
        columns of a wide table (default: every column).
        """
        experiments = None
        if hasattr(selection, "identifier"):
            experiments = [selection]
        elif isinstance(selection, (list, tuple)) and selection:
            if all(isinstance(s, str) for s in selection):
                if columns is not None:
                    raise TypeError("select: columns= goes with a row selection, not with names")
                missing = [s for s in selection if s not in self._cols]
                if missing:
                    raise KeyError(f"reflection_table has no columns {missing}")
                return self._adopt({s: self._cols[s].deep_copy() for s in selection},
                                   self._nrows)
            if all(hasattr(s, "identifier") for s in selection):
                experiments = selection
        if experiments is not None:
            if columns is not None:
                raise TypeError("select: columns= goes with a row selection, not experiments")
            return self.select_on_experiment_identifiers([e.identifier for e in experiments])
        rows = _selected_rows(fa._as_selection(selection, self._nrows, "selection"))
        names = list(self._cols) if columns is None else list(columns)
        missing = [k for k in names if k not in self._cols]
        if missing:
            raise KeyError(f"reflection_table has no columns {missing}")
        return self._adopt({k: type(self._cols[k])._wrap(np.take(self._cols[k]._a, rows, axis=0))
                            for k in names}, len(rows))

    def select_on_experiment_identifiers(self, identifiers: Iterable[str]) -> "reflection_table":
        """Rows whose experiment identifier is in ``identifiers``; the map keeps only those."""
        wanted = list(identifiers)
        inv = {v: k for k, v in self._ids.items()}
        missing = [w for w in wanted if w not in inv]
        if missing:
            raise KeyError(f"experiment identifiers not in the table: {missing}")
        ids = [inv[w] for w in wanted]
        mask = np.isin(self["id"].as_numpy_array(), np.asarray(ids, dtype=np.int64))
        out = self.select(mask)
        out._ids = experiment_id_map({i: self._ids[i] for i in ids})
        return out

    def remove_on_experiment_identifiers(self, identifiers: Iterable[str]) -> "reflection_table":
        """A table without the rows (and map entries) of the given experiment identifiers."""
        drop = set(identifiers)
        inv = {v: k for k, v in self._ids.items()}
        missing = [d for d in drop if d not in inv]
        if missing:
            raise KeyError(f"experiment identifiers not in the table: {sorted(missing)}")
        keep = [v for k, v in self._ids.items() if v not in drop]
        if "id" not in self._cols:
            out = self.copy()
        else:
            ids = self["id"].as_numpy_array()
            out = self.select(~np.isin(ids, np.asarray([inv[d] for d in drop], dtype=np.int64)))
        out._ids = experiment_id_map({inv[v]: v for v in keep})
        return out

    def clean_experiment_identifiers_map(self) -> None:
        """Drop map entries whose id does not occur in the ``id`` column."""
        used = set(np.unique(self["id"].as_numpy_array()).tolist()) if "id" in self._cols else set()
        for k in [k for k in self._ids.keys() if k not in used]:
            del self._ids[k]

    def reset_ids(self) -> None:
        """Renumber the ``id`` column to 0..n-1 in order of the current ids (>= 0), keeping
        each row's experiment identifier; rows with negative ids are left unchanged."""
        ids = self["id"].as_numpy_array()
        present = np.unique(ids[ids >= 0])
        mapping = {int(old): new for new, old in enumerate(present)}
        new_ids = ids.copy()
        if present.size:
            pos = np.searchsorted(present, ids[ids >= 0])
            new_ids[ids >= 0] = pos.astype(ids.dtype)
        self._cols["id"] = fa.int._wrap(new_ids)
        self._ids = experiment_id_map({mapping[k]: v for k, v in self._ids.items() if k in mapping})

    def set_selected(self, selection: Any, other: "reflection_table") -> None:
        """Copy the rows of ``other`` into the selected rows (or named columns) of this table."""
        if not isinstance(other, reflection_table):
            raise TypeError("set_selected: other must be a reflection_table")
        if (
            isinstance(selection, (list, tuple))
            and selection
            and all(isinstance(s, str) for s in selection)
        ):
            for name in selection:
                self[name] = other[name].deep_copy()
            return
        sel = fa._as_selection(selection, self._nrows, "selection")
        n = int(np.count_nonzero(sel)) if sel.dtype == np.bool_ else len(sel)
        if len(other) != n:
            raise ValueError(f"set_selected: {len(other)} rows for {n} selected rows")
        for name, col in other._cols.items():
            if name not in self._cols:
                self._cols[name] = type(col)(self._nrows)
            elif type(self._cols[name]) is not type(col):
                raise TypeError(
                    f"set_selected: column {name!r} types differ "
                    f"({type(self._cols[name]).__name__} vs {type(col).__name__})"
                )
            self._cols[name]._a[sel] = col._a

    def del_selected(self, selection: Any) -> None:
        """Remove the selected rows in place."""
        sel = fa._as_selection(selection, self._nrows, "selection")
        keep = np.ones(self._nrows, dtype=np.bool_)
        keep[sel] = False
        t = self.select(keep)
        self._cols, self._nrows = t._cols, t._nrows

    # ------------------------------------------------------------------ growth and order
    def _merge_identifiers(self, other: "reflection_table", what: str) -> None:
        for k, v in other._ids.items():
            if k in self._ids and self._ids[k] != v:
                raise ValueError(
                    f"{what}: experiment identifiers do not match for id {k} "
                    f"({self._ids[k]!r} vs {v!r})"
                )
        for k, v in other._ids.items():
            self._ids[k] = v

    def extend(self, other: "reflection_table") -> None:
        """Append the rows of ``other``; missing columns on either side are zero-filled."""
        if not isinstance(other, reflection_table):
            raise TypeError("extend: other must be a reflection_table")
        for name, col in other._cols.items():
            if name in self._cols and type(self._cols[name]) is not type(col):
                raise TypeError(
                    f"extend: column {name!r} types differ "
                    f"({type(self._cols[name]).__name__} vs {type(col).__name__})"
                )
        self._merge_identifiers(other, "extend")
        n_old, n_new = self._nrows, self._nrows + len(other)
        for name in list(self._cols) + [k for k in other._cols if k not in self._cols]:
            mine = self._cols.get(name)
            theirs = other._cols.get(name)
            t = type(mine if mine is not None else theirs)
            a = mine._a if mine is not None else t._empty(n_old)
            b = theirs._a if theirs is not None else t._empty(len(other))
            self._cols[name] = t._wrap(np.concatenate([a, b]))
        self._nrows = n_new

    def update(self, other: "reflection_table") -> None:
        """Add/replace the columns of ``other`` (same number of rows)."""
        if self._cols and len(other) != self._nrows:
            raise ValueError(f"update: {len(other)} rows vs {self._nrows}")
        self._merge_identifiers(other, "update")
        for name, col in other._cols.items():
            self[name] = col

    def resize(self, n: int) -> None:
        n = fa._check_size(n, "n")
        for c in self._cols.values():
            c.resize(n)
        self._nrows = n

    def reorder(self, indices: Any) -> None:
        """Reorder rows in place: row i becomes old row ``indices[i]`` (a permutation)."""
        idx = fa._as_selection(indices, self._nrows, "indices")
        if idx.dtype == np.bool_ or len(idx) != self._nrows:
            raise ValueError(f"reorder: need {self._nrows} indices (a permutation)")
        seen = np.zeros(self._nrows, dtype=np.bool_)
        seen[idx] = True
        if not seen.all():
            raise ValueError("reorder: indices are not a permutation")
        for k, c in list(self._cols.items()):
            self._cols[k] = type(c)._wrap(np.take(c._a, idx, axis=0))

    def sort(self, name: str, reverse: bool = False, order: Any = None) -> None:
        """Stable sort of the rows by column ``name``.

        For tuple columns (miller_index, vec3) ``order`` gives the component priority,
        default (0, 1, 2, ...).
        """
        col = self[name]
        if col._width:
            a = col._a
            comps = list(order) if order is not None else list(range(col._width))
            keys = np.stack([a[:, k] for k in comps], axis=1)
            perm = fa.sort_permutation(keys, reverse=reverse)
        else:
            perm = fa.sort_permutation(col, reverse=reverse)
        self.reorder(perm.as_numpy_array().astype(np.intp))

    def copy(self) -> "reflection_table":
        """An independent deep copy (columns and identifiers)."""
        return self._adopt({k: c.deep_copy() for k, c in self._cols.items()}, self._nrows)

    def __deepcopy__(self, memo: dict) -> "reflection_table":
        return self.copy()

    def __copy__(self) -> "reflection_table":
        return self.copy()

    def __reduce__(self) -> tuple:
        return (
            _rebuild,
            (
                self._nrows,
                {k: (type(c).__name__, c._a) for k, c in self._cols.items()},
                self._ids.as_dict(),
            ),
        )

    # ------------------------------------------------------------------ flags
    def _flags_column(self, create: bool) -> np.ndarray:
        if "flags" not in self._cols:
            if not create:
                raise KeyError("reflection_table has no 'flags' column")
            self._cols["flags"] = fa.size_t(self._nrows)
        col = self._cols["flags"]
        if not isinstance(col, fa.size_t):
            raise TypeError(f"'flags' column must be flex.size_t (got {type(col).__name__})")
        return col._a

    def assign_flags(self, mask: Any, value: int) -> None:
        """Set the bits ``value`` on the rows where ``mask`` (bool, one per row) is True and
        clear them on every other row: :meth:`unset_flags` on all rows then :meth:`set_flags`
        on ``mask``, in one pass over the column (no row selection)."""
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != (self._nrows,):
            raise ValueError(f"mask must be a bool array of {self._nrows} rows "
                             f"(got {m.dtype} of shape {m.shape})")
        self.clear_flags(value)
        f = self._flags_column(create=True)
        f |= m * np.uint64(int(value))

    def clear_flags(self, value: int) -> None:
        """Clear the bits ``value`` on every row, in place on the flags column (made if absent):
        :meth:`unset_flags` of an all-true mask without gathering and scattering every row."""
        f = self._flags_column(create=True)
        np.bitwise_and(f, ~np.uint64(int(value)), out=f)

    def get_flags(self, value: int, all: bool = True) -> fa.bool:  # noqa: A002 (DIALS name)
        """Rows where all (or, with ``all=False``, any) of the bits in ``value`` are set."""
        v = np.uint64(int(value))
        f = self._flags_column(create=False) & v
        return fa.bool._wrap(f == v if all else f != 0)

    def set_flags(self, selection: Any, value: int) -> None:
        """Set the bits ``value`` on the selected rows (bool mask or indices)."""
        sel = fa._as_selection(selection, self._nrows, "selection")
        f = self._flags_column(create=True)
        f[sel] |= np.uint64(int(value))

    def unset_flags(self, selection: Any, value: int) -> None:
        """Clear the bits ``value`` on the selected rows (bool mask or indices)."""
        sel = fa._as_selection(selection, self._nrows, "selection")
        f = self._flags_column(create=True)
        f[sel] &= ~np.uint64(int(value))

    # ------------------------------------------------------------------ experiments
    def split_by_experiment_id(self, copy: bool = True) -> list["reflection_table"]:
        """One table per ``id`` value 0..max (empty ids skipped), each with its own identifier.

        With ``copy=False`` and the rows already ordered by ``id`` (as DIALS writes them), each
        part's columns are views of this table's rows (no copy: at 10⁶ rows a copy costs
        ~0.3 s and 200 MB of fresh memory); a change to a part's values then shows in this
        table. Unordered ids are always copied."""
        ids = self["id"].as_numpy_array()
        if len(ids) and ids.min() < 0:
            raise ValueError("split_by_experiment_id: negative experiment id in 'id' column")
        contiguous = not copy and bool(np.all(ids[1:] >= ids[:-1]))
        order = None if contiguous else np.argsort(ids, kind="stable")
        counts = np.bincount(ids, minlength=0) if len(ids) else np.zeros(0, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        out = []
        for i, n in enumerate(counts):
            if n == 0:
                continue
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if order is None:
                t = self._adopt({k: type(c)._wrap(c._a[lo:hi]) for k, c in self._cols.items()}, hi - lo)
            else:
                t = self.select(order[lo:hi])
            t._ids = experiment_id_map({i: self._ids[i]} if i in self._ids else {})
            out.append(t)
        return out

    def assert_experiment_identifiers_are_consistent(self, experiments: Any = None) -> None:
        """Raise ValueError unless identifiers are unique, cover every ``id`` used and,
        if ``experiments`` is given, match the experiments' identifiers by index."""
        check_identifiers(self, experiments, where="reflection_table")

    def are_experiment_identifiers_consistent(self, experiments: Any = None) -> bool:
        try:
            check_identifiers(self, experiments, where="reflection_table")
        except ValueError:
            return False
        return True

    # ------------------------------------------------------------------ files
    @staticmethod
    def from_file(filename: Any) -> "reflection_table":
        """Read a ``.refl`` (msgpack) or legacy pickle file, detected by its first bytes."""
        from .io.refl import read_refl

        return read_refl(filename)

    @staticmethod
    def from_msgpack_file(filename: Any) -> "reflection_table":
        from .io.refl import read_msgpack

        return read_msgpack(filename)

    @staticmethod
    def from_pickle(filename: Any) -> "reflection_table":
        from .io.refl import read_legacy_pickle

        return read_legacy_pickle(filename)

    def as_file(self, filename: Any) -> None:
        """Write DIALS msgpack ``.refl`` (what ``dials`` itself writes)."""
        from .io.refl import write_msgpack

        write_msgpack(self, filename)

    as_msgpack_file = as_file

    def as_pickle(self, filename: Any) -> None:
        """Write the legacy (Python-2 protocol) DIALS pickle format that cctbx/DIALS can load."""
        from .io.refl import write_legacy_pickle

        write_legacy_pickle(self, filename)

    def as_msgpack(self) -> bytes:
        """The msgpack ``.refl`` bytes of this table (what ``as_file`` writes)."""
        from .io.refl import msgpack_bytes

        return msgpack_bytes(self)

    @staticmethod
    def from_msgpack(data: bytes) -> "reflection_table":
        """A table from msgpack ``.refl`` bytes (as returned by ``as_msgpack``)."""
        from .io.refl import read_msgpack_bytes

        return read_msgpack_bytes(data)

    @staticmethod
    def concat(tables: Iterable["reflection_table"], consume: bool = False,
               n_threads: int = 1) -> "reflection_table":
        """One table holding the rows of all ``tables`` in order (identifiers merged; a column
        missing from some tables is zero-filled there, as :meth:`extend` does).

        Each column is joined in one copy. With ``consume`` each column is removed from the
        input tables once it has been joined, so the inputs and the result are not both held
        in full (the tables are left without columns). With ``n_threads`` > 1 the columns are
        joined on that many threads (numpy copies without the GIL; at 10⁶ rows the copies and
        the fresh pages they touch are the whole cost); the result is the same."""
        tables = list(tables)
        if not tables:
            return reflection_table()
        if int(n_threads) < 1:
            raise ValueError(f"n_threads must be >= 1 (got {n_threads})")
        out = reflection_table.__new__(reflection_table)
        out._nrows = 0
        out._cols = {}
        out._ids = experiment_id_map(tables[0]._ids.as_dict())
        for t in tables[1:]:
            out._merge_identifiers(t, "concat")
        names: dict[str, type] = {}
        for t in tables:
            for name, col in t._cols.items():
                if name in names and names[name] is not type(col):
                    raise TypeError(f"concat: column {name!r} types differ "
                                    f"({names[name].__name__} vs {type(col).__name__})")
                names.setdefault(name, type(col))

        def join(name: str) -> Any:
            typ = names[name]
            parts = [t._cols[name]._a if name in t._cols else typ._empty(len(t)) for t in tables]
            joined = np.concatenate(parts)
            del parts
            if consume:
                for t in tables:
                    t._cols.pop(name, None)
            return typ._wrap(joined)

        if int(n_threads) > 1 and len(names) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(int(n_threads), len(names))) as pool:
                joined_columns = list(pool.map(join, list(names)))
        else:
            joined_columns = [join(name) for name in names]
        out._cols = dict(zip(names, joined_columns))
        out._nrows = sum(t._nrows for t in tables)
        if consume:
            for t in tables:
                t._nrows = 0
        return out

    def compute_d(self, experiments: Any) -> None:
        """Set the ``d`` column from each experiment's unit cell (rows by ``id``)."""
        mi = self["miller_index"].as_numpy_array()
        ids = self["id"].as_numpy_array()
        d = np.zeros(self._nrows, dtype=np.float64)
        for i, expt in enumerate(experiments):
            sel = ids == i
            if np.any(sel):
                d[sel] = np.asarray(expt.crystal.get_unit_cell().d(mi[sel]), dtype=np.float64)
        self["d"] = fa.double._wrap(d)

    @staticmethod
    def empty_standard(nrows: int) -> "reflection_table":
        """A table of ``nrows`` rows with the standard integration columns zero-filled."""
        t = reflection_table(nrows)
        for name, typ in _STANDARD_COLUMNS:
            t[name] = typ(nrows)
        return t


_STANDARD_COLUMNS = [
    ("flags", fa.size_t),
    ("id", fa.int),
    ("panel", fa.size_t),
    ("miller_index", fa.miller_index),
    ("entering", fa.bool),
    ("s1", fa.vec3_double),
    ("xyzcal.mm", fa.vec3_double),
    ("xyzcal.px", fa.vec3_double),
    ("bbox", fa.int6),
    ("xyzobs.px.value", fa.vec3_double),
    ("xyzobs.px.variance", fa.vec3_double),
    ("xyzobs.mm.value", fa.vec3_double),
    ("xyzobs.mm.variance", fa.vec3_double),
    ("partial_id", fa.size_t),
    ("partiality", fa.double),
    ("intensity.sum.value", fa.double),
    ("intensity.sum.variance", fa.double),
    ("intensity.prf.value", fa.double),
    ("intensity.prf.variance", fa.double),
    ("lp", fa.double),
    ("profile.correlation", fa.double),
]


_FLEX_TYPES = {
    t.__name__: t
    for t in (
        fa.double,
        fa.int,
        fa.size_t,
        fa.bool,
        fa.std_string,
        fa.vec2_double,
        fa.vec3_double,
        fa.mat3_double,
        fa.miller_index,
        fa.int6,
    )
}


def _rebuild(nrows: int, cols: dict, ids: dict) -> reflection_table:
    """Unpickle helper: each column comes back as exactly the flex type it was."""
    t = reflection_table(nrows)
    for k, (type_name, data) in cols.items():
        col = _FLEX_TYPES[type_name]._wrap(data)
        if len(col) != nrows:
            raise ValueError(f"column {k!r} has {len(col)} rows but the table has {nrows}")
        t._cols[k] = col
    t._ids = experiment_id_map(ids)
    return t


def _used_ids(ids: np.ndarray) -> list[int]:
    """The distinct values of an experiment-id column, ascending. Ids are small integers, so
    a count over their range (2 ms at 10⁶ rows) replaces np.unique's sort or hash (30-40 ms)."""
    if ids.size == 0:
        return []
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo > 4 * ids.size + 1024:  # sparse, huge ids: counting would waste memory
        return [int(u) for u in np.unique(ids)]
    present = np.bincount((ids.astype(np.int64) - lo), minlength=hi - lo + 1) > 0
    return [int(u) + lo for u in np.flatnonzero(present)]


def check_identifiers(
    table: reflection_table, experiments: Any = None, where: str = "table"
) -> None:
    """Validate a table's experiment identifiers; raise ValueError describing the mismatch."""
    ids = table.experiment_identifiers()
    values = ids.values()
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: duplicate experiment identifiers {values}")
    if len(ids) and "id" in table:
        unknown = [u for u in _used_ids(table["id"].as_numpy_array()) if u >= 0 and u not in ids]
        if unknown:
            raise ValueError(
                f"{where}: experiment ids {unknown} in the 'id' column have no "
                f"identifier (identifiers cover {ids.keys()})"
            )
    if experiments is not None:
        expt_ids = [getattr(e, "identifier", None) for e in experiments]
        for k, v in ids.items():
            if k >= len(expt_ids):
                raise ValueError(
                    f"{where}: id {k} ({v!r}) has no experiment (only {len(expt_ids)} experiments)"
                )
            if expt_ids[k] != v:
                raise ValueError(
                    f"{where}: identifier for id {k} is {v!r} but experiment {k} "
                    f"has {expt_ids[k]!r}"
                )
