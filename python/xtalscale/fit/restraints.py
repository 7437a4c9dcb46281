"""Parameter restraints of the scaling target (spec 6.6; DIALS ``scaling_restraints``).

A restrained component (physical decay, SH absorption) adds ``Σ w p²`` to the functional.
The LBFGS form returns ``(residuals w p², gradient 2 w p)``; the least-squares form returns
``(p, identity Jacobian, w)`` so that ``Σ w r²`` is the same sum.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["SingleScalingRestraintsCalculator", "ScalingRestraintsCalculator"]


def _apm_list(apm: Any) -> list[Any]:
    return list(apm.apm_list) if hasattr(apm, "apm_list") else [apm]


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
        rs, ws, rows, cols, vals = [], [], [], [], []
        n = 0
        for info in apm.components.values():
            res = info["object"].calculate_jacobian_restraints()
            if res is None:
                continue
            r, jac, w = res
            r = np.asarray(r, dtype=np.float64)
            jac = sp.coo_matrix(jac)
            rs.append(r)
            ws.append(np.asarray(w, dtype=np.float64))
            rows.append(jac.row + n)
            cols.append(jac.col + info["start_idx"])
            vals.append(jac.data)
            n += r.size
        if not rs:
            return None
        jac = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(n, apm.n_active_params))
        return [np.concatenate(rs), jac, np.concatenate(ws)]


class ScalingRestraintsCalculator:
    """Restraints of a multi-dataset manager: per-dataset results concatenated."""

    @staticmethod
    def calculate_restraints(multi_apm: Any) -> list[np.ndarray] | None:
        apms = _apm_list(multi_apm)
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
        apms = _apm_list(multi_apm)
        n_total = sum(a.n_active_params for a in apms)
        parts, start = [], 0
        for apm in apms:
            res = SingleScalingRestraintsCalculator.calculate_jacobian_restraints(apm)
            if res is not None:
                jac = sp.csr_matrix(res[1])
                pad = sp.hstack([sp.csr_matrix((jac.shape[0], start)), jac,
                                 sp.csr_matrix((jac.shape[0], n_total - start - jac.shape[1]))]).tocsr()
                parts.append((res[0], pad, res[2]))
            start += apm.n_active_params
        if not parts:
            return None
        return [np.concatenate([p[0] for p in parts]), sp.vstack([p[1] for p in parts]).tocsr(),
                np.concatenate([p[2] for p in parts])]
