"""Parameter restraints of the scaling target (spec 6.6; DIALS ``scaling_restraints``).

A restrained component (physical decay, SH absorption) adds ``Σ w p²`` to the functional.
The LBFGS form returns ``(residuals w p², gradient 2 w p)``; the least-squares form returns
``(p, identity Jacobian, w)`` so that ``Σ w r²`` is the same sum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._lazy import LazyModule, is_scipy_sparse
from ..csr_view import CsrView
from ..parameter_managers import single_managers

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = ["SingleScalingRestraintsCalculator", "ScalingRestraintsCalculator"]


class SingleScalingRestraintsCalculator:
    """Restraints of one single-dataset parameter manager."""

    @staticmethod
    def calculate_restraints(apm: Any) -> list[np.ndarray] | None:
        """``[residuals, gradient]`` (gradient over all of ``apm``'s parameters) or None."""
        residuals, gradient = [], np.zeros(apm.n_active_params)
        for info in apm.components.values():
            res = info["object"].calculate_restraints()
            if res is None:
                continue
            residuals.append(np.asarray(res[0], dtype=np.float64))
            gradient[info["start_idx"]:info["end_idx"]] += np.asarray(res[1], dtype=np.float64)
        if not residuals:
            return None
        return [np.concatenate(residuals), gradient]

    @classmethod
    def calculate_jacobian_restraints(cls, apm: Any) -> list[Any] | None:
        """``[r, J (scipy CSR n_restraints x n_active), w]`` or None."""
        parts = _jacobian_restraint_parts(apm, 0, 0)
        return None if parts is None else _assemble(parts, apm.n_active_params)


def _jacobian_restraint_parts(apm: Any, row_offset: int, column_offset: int) -> tuple | None:
    """The restraints of one single-dataset manager as (r, w, rows, columns, values) arrays,
    the Jacobian's entries shifted by the offsets; None when no component is restrained."""
    rs, ws, rows, cols, vals = [], [], [], [], []
    n = row_offset
    for info in apm.components.values():
        res = info["object"].calculate_jacobian_restraints()
        if res is None:
            continue
        r, jac, w = res
        r = np.asarray(r, dtype=np.float64)
        row, col, val = coo_arrays(jac)
        rs.append(r)
        ws.append(np.asarray(w, dtype=np.float64))
        rows.append(row + n)
        cols.append(col + info["start_idx"] + column_offset)
        vals.append(val)
        n += r.size
    if not rs:
        return None
    return tuple(np.concatenate(a) for a in (rs, ws, rows, cols, vals))


def coo_arrays(jac: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of every stored entry of a CsrView, scipy or dense Jacobian, rows
    in ascending order."""
    if isinstance(jac, CsrView):
        counts = np.diff(np.asarray(jac.indptr, dtype=np.int64))
        return (np.repeat(np.arange(counts.size, dtype=np.int64), counts),
                np.asarray(jac.indices, dtype=np.int64), np.asarray(jac.data, dtype=np.float64))
    coo = jac.tocoo() if is_scipy_sparse(jac) else sp.coo_matrix(jac)
    order = np.argsort(coo.row, kind="stable")
    return (coo.row[order].astype(np.int64), coo.col[order].astype(np.int64),
            np.asarray(coo.data, dtype=np.float64)[order])


def _assemble(parts: tuple, n_columns: int) -> list[Any]:
    """``[r, J, w]`` from :func:`_jacobian_restraint_parts` arrays, J as a CSR
    :class:`~xtalscale.csr_view.CsrView` (the rows arrive in ascending order)."""
    r, w, rows, cols, vals = parts
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=r.size))]).astype(np.int64)
    return [r, CsrView(vals, cols.astype(np.int32), indptr, (r.size, n_columns)), w]


class ScalingRestraintsCalculator:
    """Restraints of a multi-dataset manager: per-dataset results concatenated."""

    @staticmethod
    def calculate_restraints(multi_apm: Any) -> list[np.ndarray] | None:
        apms = single_managers(multi_apm)
        n_total = sum(a.n_active_params for a in apms)
        residuals, gradient, found, start = [], np.zeros(n_total), False, 0
        for apm in apms:
            res = SingleScalingRestraintsCalculator.calculate_restraints(apm)
            if res is not None:
                found = True
                residuals.append(res[0])
                gradient[start:start + apm.n_active_params] = res[1]
            start += apm.n_active_params
        return [np.concatenate(residuals), gradient] if found else None

    @classmethod
    def calculate_jacobian_restraints(cls, multi_apm: Any) -> list[Any] | None:
        apms = single_managers(multi_apm)
        n_total = sum(a.n_active_params for a in apms)
        found, start, n_rows = [], 0, 0
        for apm in apms:
            parts = _jacobian_restraint_parts(apm, n_rows, start)
            if parts is not None:
                found.append(parts)
                n_rows += parts[0].size
            start += apm.n_active_params
        if not found:
            return None
        return _assemble(tuple(np.concatenate(a) for a in zip(*found)), n_total)
