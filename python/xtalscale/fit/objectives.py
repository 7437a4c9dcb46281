"""Objectives the minimisers drive.

* :class:`ScalerObjective`: the DIALS refinery protocol. A *scaler* offers
  ``get_blocks_for_minimisation()`` (or ``Ih_table.blocked_data_list``),
  ``update_for_minimisation(apm, block_id)`` (sets ``g``, ``∂g/∂p`` and Ĩ on the block) and
  ``Ih_table``; the parameter manager (``apm``) offers ``set_param_vals``/``get_param_vals``,
  ``compute_functional_gradients(block)``, the restraint calls and (for shared components)
  ``reducing_matrix``. This is what DIALS's ``ScalingSimpleLBFGS``/lstbx refineries use.
* :class:`ModelObjective`: the direct path. Observations in table order (group offsets, I, w)
  and a *model* callable ``model(x) -> list of blocks`` returning each block's scales and
  canonical scipy CSR ``∂g/∂p`` with its column offset and row map — C++ components, Python
  components, many datasets, explicit voxel groups all arrive this way.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from .._core import fit as _fit
from .minimisers import NonFiniteScales
from .target import canonical_csr

__all__ = ["ScalerObjective", "ModelObjective", "ModelBlockData"]


def _check_scales(g: np.ndarray) -> None:
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise NonFiniteScales("scales are not finite and > 0")


class ScalerObjective:
    """The target over a scaler's minimisation blocks, for a parameter manager ``apm``."""

    def __init__(self, scaler: Any, target: Any, apm: Any, n_threads: int = 1) -> None:
        self.scaler = scaler
        self.target = target
        self.apm = apm
        self.n_params = int(np.asarray(apm.get_param_vals()).size)
        self.n_threads = n_threads
        if hasattr(target, "n_threads"):
            target.n_threads = n_threads

    def _blocks(self) -> list[Any]:
        getter = getattr(self.scaler, "get_blocks_for_minimisation", None)
        return list(getter()) if getter else list(self.scaler.Ih_table.blocked_data_list)

    def get_x(self) -> np.ndarray:
        return np.asarray(self.apm.get_param_vals(), dtype=np.float64)

    def set_x(self, x: np.ndarray) -> None:
        self.apm.set_param_vals(np.asarray(x, dtype=np.float64))
        for block_id, block in enumerate(self._blocks()):
            with np.errstate(over="ignore", invalid="ignore"):
                self.scaler.update_for_minimisation(self.apm, block_id)
            _check_scales(np.asarray(block.inverse_scale_factors))

    def _refresh(self) -> list[Any]:
        blocks = self._blocks()
        for block_id in range(len(blocks)):
            self.scaler.update_for_minimisation(self.apm, block_id)
        return blocks

    def f_and_grad(self) -> tuple[float, np.ndarray]:
        blocks = self._refresh()
        f, grad = 0.0, np.zeros(self.n_params)
        for block in blocks:
            fb, gb = self.apm.compute_functional_gradients(block)
            f += fb
            grad += gb
        restraints = self.apm.compute_restraints_functional_gradients(self.apm)
        if restraints:
            f += restraints[0]
            grad += restraints[1]
        return f, grad

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        blocks = self._refresh()
        reduce = getattr(self.apm, "reducing_matrix", None)
        n_full = reduce.shape[0] if reduce is not None else self.n_params
        matrix, rhs, r_sq, n_eq = np.zeros((n_full, n_full)), np.zeros(n_full), 0.0, 0
        inner = getattr(self.apm, "target", None) or self.target
        for block in blocks:
            if hasattr(inner, "compute_normal_equations"):
                nb, rb, sb, eb = inner.compute_normal_equations(block)
            else:  # a target without the C++ path: explicit Jacobian
                r, jac, w = inner.compute_residuals_and_gradients(block)
                jac = sp.csr_matrix(jac)
                nb = (jac.T @ sp.diags(w) @ jac).toarray()
                rb, sb, eb = -(jac.T @ (w * r)), float(np.sum(w * r * r)), len(r)
            matrix += nb
            rhs += rb
            r_sq += sb
            n_eq += eb
        if reduce is not None:
            matrix = np.asarray(reduce.T @ (reduce.T @ matrix).T)
            rhs = np.asarray(reduce.T @ rhs).ravel()
        restraints = self.apm.compute_restraints_residuals_and_gradients(self.apm)
        if restraints:
            r, jac, w = restraints
            jac = sp.csr_matrix(jac)
            matrix += (jac.T @ sp.diags(w) @ jac).toarray()
            rhs -= np.asarray(jac.T @ (w * r)).ravel()
            r_sq += float(np.sum(w * r * r))
            n_eq += len(r)
        return matrix, rhs, r_sq, n_eq

    def objective_only(self) -> float:
        blocks = self._refresh()
        total = 0.0
        for block in blocks:
            r, w = self.target.compute_residuals(block)
            total += float(np.sum(w * r * r))
        restraints = self.apm.compute_restraints_residuals_and_gradients(self.apm)
        if restraints:
            total += float(np.sum(restraints[2] * restraints[0] ** 2))
        return total

    def rmsd(self) -> float:
        return float(self.target.rmsds(self.scaler.Ih_table, self.apm)[0])

    def n_reflections(self) -> int:
        return int(self.scaler.Ih_table.size)

    def param_names(self) -> list[str]:
        try:
            names = list(self.apm.get_param_names())
        except (AttributeError, TypeError):
            names = []
        return names if len(names) == self.n_params else [f"p{j}" for j in range(self.n_params)]

    def set_var_cov(self, var_cov: np.ndarray) -> None:
        self.apm.calculate_model_state_uncertainties(var_cov)
        self.apm.set_param_esds(np.sqrt(np.clip(np.diag(var_cov), 0.0, None)))


class ModelBlockData:
    """One model block for :class:`ModelObjective`: ``g``, canonical CSR ``∂g/∂p`` (columns are
    the block's own), its first global column and its table rows (None = identity)."""

    __slots__ = ("scales", "derivatives", "column_offset", "table_rows")

    def __init__(self, scales: Any, derivatives: Any, column_offset: int = 0, table_rows: Any = None) -> None:
        self.scales = np.ascontiguousarray(scales, dtype=np.float64)
        self.derivatives = canonical_csr(derivatives, self.scales.size)
        self.column_offset = int(column_offset)
        self.table_rows = None if table_rows is None else np.ascontiguousarray(table_rows, dtype=np.int64)

    def as_kernel_tuple(self) -> tuple[Any, ...]:
        d = self.derivatives
        return (self.scales, d.indptr.astype(np.int64, copy=False), d.indices.astype(np.int32, copy=False),
                d.data, d.shape[1], self.column_offset, self.table_rows)


class ModelObjective:
    """Direct objective: table-ordered observations and a model callable.

    Parameters
    ----------
    group_offsets, intensities, weights : arrays in table order (rows sorted by group)
    model : callable ``x -> sequence of ModelBlockData``
    x0 : initial parameters
    fixed_Ih : optional table-order Ĩ (targeted scaling)
    restraint_weights : optional ``w`` per parameter adding ``Σ w p²``
    names : optional parameter names
    n_threads : threads for the kernels (results identical for any value)
    kind : "dials" or "schur" normal matrix
    """

    def __init__(self, group_offsets: Any, intensities: Any, weights: Any,
                 model: Callable[[np.ndarray], Sequence[ModelBlockData]], x0: Any,
                 fixed_Ih: Any = None, restraint_weights: Any = None, names: list[str] | None = None,
                 n_threads: int = 1, kind: str = "schur") -> None:
        self.offsets = np.ascontiguousarray(group_offsets, dtype=np.int64)
        self.intensities = np.ascontiguousarray(intensities, dtype=np.float64)
        self.weights = np.ascontiguousarray(weights, dtype=np.float64)
        self.model = model
        self.x = np.asarray(x0, dtype=np.float64).copy()
        self.n_params = self.x.size
        self.fixed_Ih = None if fixed_Ih is None else np.ascontiguousarray(fixed_Ih, dtype=np.float64)
        self.restraint_weights = None if restraint_weights is None else np.asarray(restraint_weights, np.float64)
        self.names = names or [f"p{j}" for j in range(self.n_params)]
        self.n_threads = n_threads
        self.kind = kind
        self.var_cov: np.ndarray | None = None
        self._blocks: list[tuple[Any, ...]] = []
        self.set_x(self.x)

    def get_x(self) -> np.ndarray:
        return self.x.copy()

    def set_x(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            blocks = list(self.model(x))
        for b in blocks:
            _check_scales(b.scales)
            if not np.all(np.isfinite(b.derivatives.data)):
                raise NonFiniteScales("derivatives are not finite")
        self.x = x.copy()
        self._blocks = [b.as_kernel_tuple() for b in blocks]

    def _restraint_f_g(self) -> tuple[float, np.ndarray]:
        if self.restraint_weights is None:
            return 0.0, np.zeros(self.n_params)
        w = self.restraint_weights
        return float(np.sum(w * self.x * self.x)), 2.0 * w * self.x

    def f_and_grad(self) -> tuple[float, np.ndarray]:
        f, grad, _ = _fit.functional_and_gradient(self.offsets, self.intensities, self.weights, self._blocks,
                                                  self.n_params, gradient=True, fixed_Ih=self.fixed_Ih,
                                                  n_threads=self.n_threads)
        fr, gr = self._restraint_f_g()
        return f + fr, grad + gr

    def table_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Ĩ, residuals, g)`` per table row at the current parameters."""
        _, _, rows = _fit.functional_and_gradient(self.offsets, self.intensities, self.weights, self._blocks,
                                                  self.n_params, gradient=False, fixed_Ih=self.fixed_Ih,
                                                  rows=True, n_threads=self.n_threads)
        return rows

    def objective_only(self) -> float:
        f, _, _ = _fit.functional_and_gradient(self.offsets, self.intensities, self.weights, self._blocks,
                                               self.n_params, gradient=False, fixed_Ih=self.fixed_Ih,
                                               n_threads=self.n_threads)
        return f + self._restraint_f_g()[0]

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        matrix, rhs, r_sq, n_eq = _fit.normal_equations(self.offsets, self.intensities, self.weights, self._blocks,
                                                        self.n_params, kind=self.kind, fixed_Ih=self.fixed_Ih,
                                                        n_threads=self.n_threads)
        if self.restraint_weights is not None:
            w = self.restraint_weights
            matrix[np.diag_indices_from(matrix)] += w
            rhs -= w * self.x
            r_sq += float(np.sum(w * self.x * self.x))
            n_eq += int(np.count_nonzero(w))
        return matrix, rhs, r_sq, n_eq

    def rmsd(self) -> float:
        n = self.intensities.size
        return float(np.sqrt(self.objective_only() / n)) if n else 0.0

    def n_reflections(self) -> int:
        return int(self.intensities.size)

    def param_names(self) -> list[str]:
        return list(self.names)

    def set_var_cov(self, var_cov: np.ndarray) -> None:
        self.var_cov = var_cov

