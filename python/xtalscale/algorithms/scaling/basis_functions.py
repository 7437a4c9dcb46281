"""DIALS import path ``dials.algorithms.scaling.basis_functions``.

:class:`RefinerCalculator` is implemented in :mod:`xtalscale.parameter_managers`; its
derivative matrices are :class:`xtalscale.sparse.SparseMatrix` (scipy CSR with scitbx's
``n_rows``, ``n_cols``, ``non_zeroes``, ``col(j)`` and ``as_dense_matrix()``).
"""
from __future__ import annotations

from xtalscale.parameter_managers import RefinerCalculator

__all__ = ["RefinerCalculator"]
