"""scitbx import path ``scitbx.sparse`` (facade over :mod:`xtalscale.sparse`, a subset):
``sparse.matrix(n_rows, n_cols)`` is a scipy CSR matrix with scitbx's ``n_rows``, ``n_cols``,
``non_zeroes``, ``col(j)`` and ``as_dense_matrix()``; ``m[i, j] = x`` fills it."""
from xtalscale.sparse import SparseMatrix, SparseVector, matrix

__all__ = ["SparseMatrix", "SparseVector", "matrix"]
