"""Sparse vectors and CSR matrices that also answer the calls scripts make on scitbx's.

Where DIALS hands a script a ``scitbx.sparse.matrix`` (smoother weights, component and model
derivatives, a target's Jacobian), xtalscale hands it a :class:`SparseMatrix`: a
``scipy.sparse.csr_matrix`` (every scipy operation works on it) that also offers scitbx's
``n_rows``, ``n_cols``, ``non_zeroes`` (attributes, as in scitbx's Python bindings),
``col(j)`` (a :class:`SparseVector` with ``as_dense_vector()``) and ``as_dense_matrix()``.
A single weight row is a :class:`SparseVector` (``scitbx.sparse.vector``-like).

This module is the one home of both types; the smoothers, the components and the
refinement code all return them.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.sparse import SparseEfficiencyWarning, csr_matrix, issparse

__all__ = ["DeferredSparseMatrix", "SparseMatrix", "SparseVector", "as_sparse_matrix", "matrix"]


class SparseVector:
    """A sparse vector, shaped like ``scitbx.sparse.vector``.

    Parameters
    ----------
    size : int
        Length of the (dense) vector.
    indices : numpy.ndarray
        Ascending positions of the stored entries.
    data : numpy.ndarray
        Values of the stored entries.
    """

    __slots__ = ("_size", "data", "indices")

    def __init__(self, size: int, indices: np.ndarray, data: np.ndarray) -> None:
        self._size = int(size)
        self.indices = indices
        self.data = data

    @property
    def size(self) -> int:
        """Length of the dense vector (an attribute, as in scitbx)."""
        return self._size

    @property
    def non_zeroes(self) -> int:
        """Number of stored entries."""
        return int(self.indices.size)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> float:
        i = int(i)
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError(f"index {i} is out of range for a vector of size {self._size}")
        k = int(np.searchsorted(self.indices, i))
        if k < self.indices.size and self.indices[k] == i:
            return float(self.data[k])
        return 0.0

    def __iter__(self) -> Iterator[float]:
        return iter(self.as_dense_vector().tolist())

    def as_dense_vector(self) -> np.ndarray:
        """Return the dense vector as a float64 array."""
        dense = np.zeros(self._size)
        dense[self.indices] = self.data
        return dense

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = self.as_dense_vector()
        return dense if dtype is None else dense.astype(dtype)

    def __repr__(self) -> str:
        items = zip(self.indices.tolist(), self.data.tolist())
        pairs = ", ".join(f"{i}: {w:.6g}" for i, w in items)
        return f"SparseVector(size={self._size}, {{{pairs}}})"


class SparseMatrix(csr_matrix):
    """A CSR matrix with scitbx's sparse-matrix accessors (rows = observations or points)."""

    @property
    def non_zeroes(self) -> int:
        """Number of stored entries (``scitbx.sparse.matrix.non_zeroes``)."""
        return int(self.nnz)

    @property
    def n_rows(self) -> int:
        """Number of rows."""
        return int(self.shape[0])

    @property
    def n_cols(self) -> int:
        """Number of columns."""
        return int(self.shape[1])

    def col(self, j: int) -> SparseVector:
        """Column ``j`` as a :class:`SparseVector` (``scitbx.sparse.matrix.col``)."""
        j = int(j)
        if j < 0:
            j += self.shape[1]
        if not 0 <= j < self.shape[1]:
            raise IndexError(f"column {j} is out of range for a matrix with {self.shape[1]} "
                             "columns")
        column = self.getcol(j).tocoo()
        order = np.argsort(column.row, kind="stable")
        return SparseVector(self.shape[0], column.row[order].astype(np.int64),
                            column.data[order].astype(np.float64))

    def cols(self) -> Iterator[SparseVector]:
        """The columns in order (``for c in m.cols()``)."""
        return (self.col(j) for j in range(self.shape[1]))

    def as_dense_matrix(self) -> np.ndarray:
        """Return the dense matrix as a 2-D float64 array."""
        return self.toarray()

    def __setitem__(self, key: Any, value: Any) -> None:
        # scitbx scripts fill small matrices entry by entry (m[i, j] = x); scipy would warn
        # that this changes the CSR structure, which is exactly what is meant here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SparseEfficiencyWarning)
            super().__setitem__(key, value)


class DeferredSparseMatrix(SparseMatrix):
    """A :class:`SparseMatrix` whose arrays are built when first read.

    A 2-D/3-D smooth component returns its derivatives (normalised weights, 9-27 per row) this
    way: a refinement through a model block never reads them (the block recomputes its own
    values in C++), so building them up front would cost ~100-300 B and 30-60 ns per reflection
    for nothing. Any use (``.data``, ``.indices``, ``.indptr``, ``nnz``, products, slicing,
    pickling...) builds them once; after that it is an ordinary :class:`SparseMatrix`.
    Matrices scipy derives from it (sums, slices, copies) are built ones.

    Parameters
    ----------
    shape : tuple
        ``(n_rows, n_cols)``.
    build : callable
        Returns ``(data, indices, indptr)``; called at most once.
    """

    def __init__(self, arg1: Any = None, shape: Any = None, dtype: Any = None,
                 copy: bool = False, *, build: Any = None, **kwargs: Any) -> None:
        if build is None:  # scipy building a result of this class: an ordinary matrix
            super().__init__(arg1, shape=shape, dtype=dtype, copy=copy, **kwargs)
            return
        # Only what scipy's constructor would set, without reading the arrays.
        self._build = build
        self._build_lock = threading.Lock()  # two threads reading at once build it once
        self._shape = (int(shape[0]), int(shape[1]))
        self.maxprint = 50

    def _arrays(self) -> None:
        lock = self.__dict__.get("_build_lock")
        if lock is None:
            return
        with lock:
            build = self.__dict__.get("_build")
            if build is not None:
                data, indices, indptr = build()
                self.__dict__.update(_data=data, _indices=indices, _indptr=indptr)
                del self.__dict__["_build"]

    @property
    def built(self) -> bool:
        """True once the arrays exist."""
        return "_build" not in self.__dict__

    def _get(self, name: str) -> Any:
        if "_build" in self.__dict__:
            self._arrays()
        return self.__dict__[name]

    data = property(lambda self: self._get("_data"),
                    lambda self, v: self.__dict__.__setitem__("_data", v))
    indices = property(lambda self: self._get("_indices"),
                       lambda self, v: self.__dict__.__setitem__("_indices", v))
    indptr = property(lambda self: self._get("_indptr"),
                      lambda self, v: self.__dict__.__setitem__("_indptr", v))

    def __getstate__(self) -> dict:
        self._arrays()
        state = dict(self.__dict__)
        state.pop("_build_lock", None)  # not picklable; a built matrix needs none
        return state


def matrix(n_rows: int, n_cols: int) -> SparseMatrix:
    """scitbx's ``sparse.matrix(n_rows, n_cols)``: an all-zero matrix to fill with
    ``m[i, j] = value``."""
    if int(n_rows) < 0 or int(n_cols) < 0:
        raise ValueError(f"matrix shape must be >= 0, got ({n_rows}, {n_cols})")
    return SparseMatrix((int(n_rows), int(n_cols)), dtype=np.float64)


def as_sparse_matrix(matrix: Any) -> SparseMatrix:
    """A :class:`SparseMatrix` view of any scipy sparse matrix (no copy when already CSR).

    Raises
    ------
    TypeError
        If ``matrix`` is not a scipy sparse matrix.
    """
    if isinstance(matrix, SparseMatrix):
        return matrix
    if not issparse(matrix):
        raise TypeError(f"expected a scipy sparse matrix, got {type(matrix).__name__}")
    csr = matrix if matrix.format == "csr" else matrix.tocsr()
    out = SparseMatrix((csr.data, csr.indices, csr.indptr), shape=csr.shape, copy=False)
    out.has_sorted_indices = csr.has_sorted_indices
    return out
