"""Stand-in for DIALS's compiled ``dials_scaling_ext`` (spec §1.16): component-related helpers.

Sparse matrices are ``scipy.sparse``; vector arrays (``vec2``/``vec3``) are (n, 2)/(n, 3)
float64 numpy arrays. The per-reflection loops run in C++ (``xtalscale._core.components``).
The Ih-table and outlier helpers of the same DIALS module live with their own areas.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from ._core import components as _kern
from .smoothing import GaussianSmootherFirstFixed

__all__ = [
    "GaussianSmootherFirstFixed",
    "row_multiply",
    "elementwise_square",
    "calc_theta_phi",
    "calc_lookup_index",
    "create_sph_harm_table",
    "create_sph_harm_lookup_table",
    "calculate_harmonic_tables_from_selections",
    "rotate_vectors_about_axis",
]


def _compact_csr(m: Any, name: str) -> sp.csr_matrix:
    """A canonical float64 CSR copy of a sparse or dense matrix (duplicates summed, as compact())."""
    if sp.issparse(m):
        out = sp.csr_matrix(m, dtype=np.float64, copy=True)
    elif hasattr(m, "as_dense_matrix"):
        out = sp.csr_matrix(np.asarray(m.as_dense_matrix(), dtype=np.float64))
    else:
        arr = np.asarray(m, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix (got shape {arr.shape})")
        out = sp.csr_matrix(arr)
    out.sum_duplicates()
    return out


def row_multiply(m: Any, v: Any) -> sp.csr_matrix:
    """``result[i, j] = m[i, j] · v[i]``.

    Parameters
    ----------
    m : sparse matrix (n × k)
    v : (n,) array_like

    Returns
    -------
    scipy.sparse.csr_matrix
    """
    csr = _compact_csr(m, "m")
    vec = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
    if vec.shape != (csr.shape[0],):
        raise ValueError(f"v must have one value per matrix row ({csr.shape[0]}), got shape {vec.shape}")
    data = _kern.row_multiply(csr.indptr, csr.data, vec)
    return sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)


def elementwise_square(m: Any) -> sp.csr_matrix:
    """``result[i, j] = m[i, j]²`` as a CSR matrix."""
    csr = _compact_csr(m, "m")
    csr.data = csr.data * csr.data
    return csr


def calc_theta_phi(xyz: Any) -> np.ndarray:
    """(n, 2) ``θ = atan2(√(x²+y²), z)`` ∈ [0, π] and ``φ = (atan2(y, x) + 2π) mod 2π``."""
    v = np.asarray(xyz, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"xyz must have shape (n, 3) (got {v.shape})")
    return _kern.calc_theta_phi(v)


def calc_lookup_index(theta_phi: Any, points_per_degree: float) -> np.ndarray:
    """Grid index ``int(360·ppd·floor(θ·ppd·180/π) + floor(φ·ppd·180/π))`` of each (θ, φ).

    As in DIALS, θ = π gives an index one row past the end of the lookup table.
    """
    tp = np.asarray(theta_phi, dtype=np.float64)
    if tp.ndim != 2 or tp.shape[1] != 2:
        raise ValueError(f"theta_phi must have shape (n, 2) (got {tp.shape})")
    return _kern.calc_lookup_index(tp, float(points_per_degree))


def create_sph_harm_table(s0_theta_phi: Any, s1_theta_phi: Any, lmax: int) -> sp.csc_matrix:
    """Sparse (lmax²+2·lmax) × n table of averaged real harmonics of the two directions."""
    tp0 = np.asarray(s0_theta_phi, dtype=np.float64)
    tp1 = np.asarray(s1_theta_phi, dtype=np.float64)
    for name, tp in (("s0_theta_phi", tp0), ("s1_theta_phi", tp1)):
        if tp.ndim != 2 or tp.shape[1] != 2:
            raise ValueError(f"{name} must have shape (n, 2) (got {tp.shape})")
    values = _kern.sph_harm_table(tp0, tp1, int(lmax))
    n, p = values.shape
    indices = np.tile(np.arange(p, dtype=np.int32), n)
    indptr = np.arange(0, n * p + 1, p, dtype=np.int64 if n * p >= 2**31 else np.int32)
    return sp.csc_matrix((values.reshape(-1), indices, indptr), shape=(p, n), copy=False)


def create_sph_harm_lookup_table(lmax: int, points_per_degree: int) -> list:
    """One array per harmonic of the values on the (θ, φ) grid with ``points_per_degree``."""
    from .components import create_sph_harm_lookup_table as _create

    return _create(lmax, points_per_degree)


def calculate_harmonic_tables_from_selections(s0_selection: Any, s1_selection: Any,
                                              coefficients_list: Sequence[Any]) -> tuple:
    """Average two lookups per reflection: ``(table[s0] + table[s1]) / 2`` for each harmonic.

    Returns
    -------
    (list of numpy arrays, scipy.sparse.csr_matrix)
        One array of n values per harmonic, and the same values as an n × n_param matrix.
    """
    columns = [np.asarray(c, dtype=np.float64) for c in coefficients_list]
    if not columns:
        raise ValueError("coefficients_list must hold at least one table")
    if len({c.shape for c in columns}) != 1 or columns[0].ndim != 1:
        raise ValueError("coefficients_list must hold 1-D tables of equal length")
    table = np.ascontiguousarray(np.stack(columns, axis=1))
    i0 = np.asarray(s0_selection, dtype=np.int64)
    i1 = np.asarray(s1_selection, dtype=np.int64)
    values = _kern.harmonics_from_lookup(i0, i1, table, table.shape[1])
    return [values[:, k].copy() for k in range(values.shape[1])], sp.csr_matrix(values)


def rotate_vectors_about_axis(rot_axis: Any, vectors: Any, angles: Any) -> np.ndarray:
    """Rotate each vector about ``rot_axis`` (normalised here) by its angle in radians."""
    axis = np.asarray(rot_axis, dtype=np.float64).reshape(-1)
    if axis.size != 3:
        raise ValueError(f"rot_axis must hold exactly one 3-vector (got {np.shape(rot_axis)})")
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vectors must have shape (n, 3) (got {v.shape})")
    return _kern.rotate_vectors_about_axis(axis, v, np.asarray(angles, dtype=np.float64))
