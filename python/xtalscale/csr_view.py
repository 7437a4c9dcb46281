"""A CSR matrix as three arrays, without scipy: what the scaling job hands its C++ kernels.

The job's derivative matrices ∂g/∂p are views of a C++ model block's buffers; the kernels read
the arrays (``indptr``, ``indices``, ``data``) and nothing else. Wrapping them in scipy's
``csr_matrix`` would import scipy (~0.15–0.2 s at start-up) for no work. A :class:`CsrView`
carries the arrays; anything else asked of it (``@``, ``.T``, ``toarray()``, ``getrow``...) is
answered by the scipy :class:`~xtalscale.sparse.SparseMatrix` it builds on first such use, so
a script that reads one as a scipy matrix still works.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CsrView"]


class CsrView:
    """A read-only CSR matrix over given arrays (canonical: ascending columns in each row).

    Parameters
    ----------
    data, indices, indptr : numpy.ndarray
        The CSR arrays (not copied).
    shape : tuple of int
        (rows, columns).
    """

    format = "csr"
    #: numpy defers ``array @ view`` (and other binary operators) to this class's reflected methods
    __array_ufunc__ = None
    has_canonical_format = True
    has_sorted_indices = True
    #: True only where the pattern is known valid without a scan: the views
    #: :mod:`xtalscale.components` makes of a C++ model block's own buffers (the block built the
    #: pattern from its terms: indices in range and ascending) and empty ones. The fit kernels
    #: then skip their index scan; a view over other arrays keeps False and is scanned.
    verified_pattern = False

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> None:
        self.data = data
        self.indices = indices
        self.indptr = indptr
        self.shape = (int(shape[0]), int(shape[1]))
        self._scipy: Any = None

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1]) if len(self.indptr) else 0

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def as_scipy(self) -> Any:
        """The same matrix as a scipy CSR :class:`~xtalscale.sparse.SparseMatrix` (views of
        the same arrays; built once)."""
        if self._scipy is None:
            from .sparse import SparseMatrix

            indptr = self.indptr
            if (indptr.dtype == np.int64 and self.indices.dtype == np.int32 and len(indptr)
                    and indptr[-1] < np.iinfo(np.int32).max):
                # 32-bit row starts, so that scipy keeps the 32-bit column indices as they are
                # (the kernels read the 64-bit ones: the view keeps those)
                indptr = indptr.astype(np.int32)
            m = SparseMatrix((self.data, self.indices, indptr), shape=self.shape, copy=False)
            m.has_canonical_format = True
            self._scipy = m
        return self._scipy

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.as_scipy(), name)

    def __matmul__(self, other: Any) -> Any:
        return self.as_scipy() @ other

    def __rmatmul__(self, other: Any) -> Any:
        return other @ self.as_scipy()

    def __mul__(self, other: Any) -> Any:
        return self.as_scipy() * other

    def __rmul__(self, other: Any) -> Any:
        return other * self.as_scipy()

    def __neg__(self) -> Any:
        return -self.as_scipy()

    def __repr__(self) -> str:
        return f"<CsrView {self.shape[0]}x{self.shape[1]}, {self.nnz} stored entries>"
