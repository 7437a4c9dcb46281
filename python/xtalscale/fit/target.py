"""The scaling target (spec 6.5-6.7; DIALS ``ScalingTarget`` / ``ScalingTargetFixedIH``).

``f = Σ w (I − g Ĩ)²`` per block. The hot methods (:meth:`ScalingTarget.compute_functional_gradients`,
:meth:`ScalingTarget.compute_normal_equations`) run in C++ (``xtalscale._core.fit``):

* the gradient uses the envelope theorem: Ĩ is the weighted least-squares mean of its group, so
  ``∂f/∂Ĩ = 0`` and ``df/dp = Σ −2 w r Ĩ ∂g/∂p`` (one streaming pass, no ``∂Ĩ/∂p``). The kernel
  recomputes Ĩ from the block's current ``g`` and weights, so this is exact; DIALS's explicit
  two-term gradient (:meth:`ScalingTarget.calculate_gradients`, kept for parity) agrees to rounding;
* the normal matrix is assembled per group with Ĩ eliminated, without a Jacobian
  (``kind="dials"`` reproduces DIALS's ``JᵀWJ`` exactly; ``"schur"`` is the joint (p, Ĩ)
  Gauss–Newton matrix).

The explicit Jacobian (:meth:`ScalingTarget.calculate_jacobian`, scipy) is the DIALS path, used
by scripts that ask for ``(r, J, w)`` and by the parity tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._core import fit as _fit
from .._lazy import LazyModule
from ..csr_view import CsrView
from .restraints import ScalingRestraintsCalculator

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = ["ScalingTarget", "ScalingTargetFixedIH", "StackedDerivatives", "block_kernel_arguments",
           "canonical_csr"]


class StackedDerivatives:
    """∂g/∂p of a block made of several datasets' rows, kept as one CSR piece per dataset.

    Piece ``k`` covers block rows ``row_starts[k]:row_starts[k] + n_rows_k`` and parameter
    columns ``column_offsets[k]:column_offsets[k] + n_cols_k`` (block-diagonal). The C++ kernels
    take the pieces directly as model blocks, so the N × P matrix (about 360 B/obs at k = 30)
    is never concatenated; :meth:`as_scipy` assembles it only for the explicit-Jacobian paths.
    """

    def __init__(self, pieces: list[sp.csr_matrix], row_starts: list[int], column_offsets: list[int],
                 n_cols: int) -> None:
        self.pieces = pieces
        self.row_starts = row_starts
        self.column_offsets = column_offsets
        self.shape = (int(sum(p.shape[0] for p in pieces)), int(n_cols))

    def as_scipy(self) -> sp.csr_matrix:
        """The whole block-diagonal matrix (one copy of every piece)."""
        data, indices, indptrs, nnz = [], [], [], 0
        for piece, col in zip(self.pieces, self.column_offsets):
            data.append(piece.data)
            indices.append(piece.indices.astype(np.int64) + col)
            indptrs.append(piece.indptr[:-1].astype(np.int64) + nnz)
            nnz += int(piece.indptr[-1])
        indptrs.append(np.array([nnz], dtype=np.int64))
        return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptrs)),
                             shape=self.shape)


def canonical_csr(matrix: Any, n_rows: int) -> sp.csr_matrix:
    """A scipy CSR matrix in canonical form (sorted, no duplicates, int64/int32 indices)."""
    if matrix is None:
        return sp.csr_matrix((n_rows, 0))
    if hasattr(matrix, "as_scipy"):
        matrix = matrix.as_scipy()  # StackedDerivatives, CsrView
    # an float64 CSR matrix is used as it is: a new matrix object would forget its cached
    # canonical-format flag and scan all entries again
    m = matrix if sp.isspmatrix_csr(matrix) and matrix.dtype == np.float64 else sp.csr_matrix(
        matrix, dtype=np.float64)
    if m.shape[0] != n_rows:
        raise ValueError(f"derivatives have {m.shape[0]} rows but the block has {n_rows}")
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
        m.sort_indices()
    return m


def _kernel_csr(matrix: Any, n_rows: int) -> Any:
    """The CSR arrays the C++ kernels read: a :class:`~xtalscale.csr_view.CsrView` (a model
    block's buffers, canonical by construction) as it is, anything else via :func:`canonical_csr`."""
    if isinstance(matrix, CsrView):
        if matrix.shape[0] != n_rows:
            raise ValueError(f"derivatives have {matrix.shape[0]} rows but the block has {n_rows}")
        return matrix
    return canonical_csr(matrix, n_rows)


def derivative_patterns_verified(block: Any, derivatives: Any = None) -> bool:
    """True when every derivative piece of ``block`` has a pattern known to be valid
    (:attr:`CsrView.verified_pattern`: a C++ model block's own, built from its terms, or an
    empty one), so the kernels may skip their O(nnz) index scan (about half an f+g pass).
    Column ranges, the row count and the scales are still checked."""
    source = block.derivatives if derivatives is None else derivatives
    pieces = source.pieces if isinstance(source, StackedDerivatives) else [source]
    return all(isinstance(p, CsrView) and p.verified_pattern for p in pieces)


def block_kernel_arguments(block: Any, derivatives: Any = None) -> tuple[Any, ...]:
    """``(group_offsets, I, w, [model block], n_params)`` for the C++ kernels of one Ih block."""
    offsets, inten, w, rows = block.table_arrays()
    source = block.derivatives if derivatives is None else derivatives
    g = np.ascontiguousarray(block.inverse_scale_factors, dtype=np.float64)
    if isinstance(source, StackedDerivatives):
        if source.shape[0] != block.size:
            raise ValueError(f"derivatives have {source.shape[0]} rows but the block has {block.size}")
        models = []
        for piece, start, col in zip(source.pieces, source.row_starts, source.column_offsets):
            d = _kernel_csr(piece, piece.shape[0])
            stop = start + d.shape[0]
            models.append((g[start:stop], d.indptr.astype(np.int64, copy=False),
                           d.indices.astype(np.int32, copy=False), d.data, d.shape[1], col, rows[start:stop]))
        return offsets, inten, w, models, source.shape[1]
    d = _kernel_csr(source, block.size)
    model = (g, d.indptr.astype(np.int64, copy=False), d.indices.astype(np.int32, copy=False),
             d.data, d.shape[1], 0, rows)
    return offsets, inten, w, [model], d.shape[1]


class ScalingTarget:
    """Target of the scaling refinement (DIALS ``ScalingTarget``)."""

    _grad_names = ["dI_dp"]
    rmsd_names = ["RMSD_I"]
    rmsd_units = ["a.u"]
    fixed_Ih = False
    #: which normal matrix the full-matrix engines build ("dials": DIALS's JᵀWJ; "schur")
    normal_matrix = "dials"

    def __init__(self) -> None:
        self.param_restraints = True
        self.n_threads = 1

    # ---------------------------------------------------------------- journal helpers
    def achieved(self) -> bool:
        return False

    def rmsds(self, Ih_table: Any, apm: Any) -> list[float]:  # noqa: N803
        """``[sqrt((Σ w r² + Σ restraint residuals) / n_refl)]`` over the work blocks (spec 6.7)."""
        blocks = Ih_table.blocked_data_list[: getattr(Ih_table, "n_work_blocks", len(Ih_table.blocked_data_list))]
        r_sq, n = 0.0, 0
        for block in blocks:
            r = self.calculate_residuals(block)
            r_sq += float(np.sum(block.weights * r * r))
            n += block.size
        if self.param_restraints:
            restraints = apm.compute_restraints_functional_gradients(apm)  # residuals w p²
            if restraints is None:
                self.param_restraints = False
            else:
                r_sq += float(np.sum(restraints[0]))
        return [float(np.sqrt(r_sq / n))] if n else [0.0]

    # ---------------------------------------------------------------- DIALS static pieces
    @staticmethod
    def calculate_residuals(block: Any) -> np.ndarray:
        """``r = I − g Ĩ`` with the block's stored Ĩ."""
        inten = np.nan_to_num(np.asarray(block.intensities, dtype=np.float64))
        return inten - block.inverse_scale_factors * block.Ih_values

    @staticmethod
    def _dIh_by_dp(block: Any) -> sp.csr_matrix:  # noqa: N802
        """``∂Ĩ_h/∂p = (1/S_h) Σ w (I − 2 g Ĩ) ∂g/∂p`` (sparse ``n_groups x n_params``)."""
        g, w = block.inverse_scale_factors, block.weights
        inten = np.nan_to_num(np.asarray(block.intensities, dtype=np.float64))
        s = block.sum_in_groups(w * g * g)
        inv_s = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        d = canonical_csr(block.derivatives, block.size)
        coef = w * (inten - 2.0 * g * block.Ih_values)
        return (sp.diags(inv_s) @ block.h_expand_matrix @ sp.diags(coef) @ d).tocsr()

    @classmethod
    def calculate_gradients(cls, block: Any) -> np.ndarray:
        """DIALS's explicit two-term gradient (parity reference; numpy/scipy)."""
        g, w, ih = block.inverse_scale_factors, block.weights, block.Ih_values
        r = cls.calculate_residuals(block)
        prefactor = -2.0 * w * r
        d = canonical_csr(block.derivatives, block.size)
        term1 = d.T @ (prefactor * ih)
        term2 = cls._dIh_by_dp(block).T @ block.sum_in_groups(prefactor * g)
        return np.asarray(term1 + term2, dtype=np.float64).ravel()

    @classmethod
    def calculate_jacobian(cls, block: Any) -> sp.csr_matrix:
        """DIALS's explicit Jacobian ``J = −Ĩ ∂g/∂p − g ∂Ĩ_h/∂p`` (scipy CSR ``n x n_params``)."""
        d = canonical_csr(block.derivatives, block.size)
        expanded = block.h_index_matrix @ cls._dIh_by_dp(block)
        return (-(sp.diags(block.Ih_values) @ d) - sp.diags(block.inverse_scale_factors) @ expanded).tocsr()

    # ---------------------------------------------------------------- refinery entry points
    @classmethod
    def compute_residuals(cls, block: Any) -> tuple[np.ndarray, np.ndarray]:
        return cls.calculate_residuals(block), block.weights

    def compute_functional_gradients(self, block: Any) -> tuple[float, np.ndarray]:
        """``(f, df/dp)`` of one block in one C++ pass (envelope theorem; Ĩ recomputed and
        stored back on the block). Frees ``block.derivatives`` as DIALS does."""
        offsets, inten, w, models, n_params = block_kernel_arguments(block)
        fixed = np.ascontiguousarray(block.Ih_values[block._order]) if self.fixed_Ih else None
        f, grad, rows = _fit.functional_and_gradient(offsets, inten, w, models, n_params,
                                                     gradient=True, fixed_Ih=fixed, rows=True,
                                                     n_threads=getattr(self, "n_threads", 1),
                                                     check_structure=not derivative_patterns_verified(block))
        if not self.fixed_Ih:
            block.Ih_table["Ih_values"] = rows[0][block._table_rows]
        block.derivatives = None
        return f, grad

    def compute_functional_and_scale_gradient(self, block: Any) -> tuple[float, np.ndarray]:
        """``(f, ∂f/∂g)`` of one block from its ``g`` alone, ``∂f/∂g = −2 w r Ĩ`` per block row
        (the envelope theorem holds Ĩ), in one C++ pass that reads no derivatives. With a
        model's transposed product (:meth:`ComponentModelBlock.transpose_product`) this gives
        the gradient of :meth:`compute_functional_gradients` without ``∂g/∂p``. Ĩ is recomputed
        and stored back on the block, as there."""
        offsets, inten, w, rows = block.table_arrays()
        g = np.ascontiguousarray(block.inverse_scale_factors, dtype=np.float64)
        scales_only = (g, np.zeros(g.size + 1, np.int64), np.zeros(0, np.int32), np.zeros(0), 0, 0, rows)
        fixed = np.ascontiguousarray(block.Ih_values[block._order]) if self.fixed_Ih else None
        f, dfdg, ih = _fit.functional_and_scale_gradient(offsets, inten, w, [scales_only], fixed_Ih=fixed,
                                                         n_threads=getattr(self, "n_threads", 1))
        if not self.fixed_Ih:
            block.Ih_table["Ih_values"] = ih[block._table_rows]
        return f, dfdg[rows]

    def compute_model_functional_and_gradient(self, block: Any, models: list[tuple[Any, ...]], n_params: int
                                              ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """``(f, ∂f/∂p, g, Ĩ)`` of one block with its rows evaluated from C++ model blocks in one
        pass over chunks of whole groups (``_core.fit.model_functional_and_gradient``): g, the
        groups' f and ∂f/∂g and each model's transposed product while a chunk is in cache, no
        ∂g/∂p formed. Equal to :meth:`compute_functional_and_scale_gradient` with the models'
        transposed products to rounding (another summation order); g and Ĩ (block row order)
        are the same bits as evaluating the models and :meth:`calc_Ih`.

        Parameters
        ----------
        block : the Ih table block
        models : per dataset ``(ModelBlock, parameters, first_row, column_offset, table_rows)``
            covering the block's rows (``scaler.table_models``)
        n_params : length of the gradient
        """
        if self.fixed_Ih:
            raise ValueError("a fixed-Ĩ target has no one-pass f+g from model blocks (Ĩ is eliminated there)")
        offsets, inten, w, rows = block.table_arrays()
        f, grad, g, ih = _fit.model_functional_and_gradient(offsets, inten, w, models, n_params, Ih=True,
                                                            n_threads=getattr(self, "n_threads", 1))
        return f, grad, g[rows], ih[rows]

    def compute_residuals_and_gradients(self, block: Any) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
        """``(r, J, w)`` with the explicit Jacobian (DIALS path)."""
        jac = self.calculate_jacobian(block)
        r, w = self.compute_residuals(block)
        block.derivatives = None
        return r, jac, w

    def compute_normal_equations(self, block: Any, kind: str | None = None,
                                 out: tuple[np.ndarray, np.ndarray] | None = None
                                 ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """``(N, rhs = −JᵀWr, Σ w r², n_equations)`` of one block, Ĩ eliminated, no Jacobian.

        ``out=(matrix, rhs)``: add the block's terms to these arrays (returned as N and rhs)
        instead of making new ones, the matrix left unfolded: after the last block,
        ``xtalscale._core.fit.fold_normal_matrix(matrix)`` makes it N. At 1,176 parameters (24
        sweeps) a new 11 MB matrix per block, added to the sum, took ~0.5 s per job."""
        offsets, inten, w, models, n_params = block_kernel_arguments(block)
        fixed = np.ascontiguousarray(block.Ih_values[block._order]) if self.fixed_Ih else None
        matrix, rhs, r_sq, n_eq = _fit.normal_equations(
            offsets, inten, w, models, n_params, kind=kind or self.normal_matrix, fixed_Ih=fixed,
            n_threads=getattr(self, "n_threads", 1), check_structure=not derivative_patterns_verified(block),
            out=out)
        block.derivatives = None
        return matrix, rhs, r_sq, n_eq

    def compute_model_normal_equations(self, block: Any, models: list[tuple[Any, ...]], n_params: int,
                                       kind: str | None = None, out: tuple[np.ndarray, np.ndarray] | None = None
                                       ) -> tuple[np.ndarray, np.ndarray, float, int, np.ndarray, np.ndarray | None, bool]:
        """:meth:`compute_normal_equations` with the block's rows evaluated from C++ model blocks
        chunk by chunk (``_core.fit.model_normal_equations``): no ∂g/∂p is formed, and the
        result is the same bits as evaluating the models and calling that method.

        Parameters
        ----------
        block : the Ih table block
        models : per dataset ``(ModelBlock, parameters, first_row, column_offset, table_rows)``
            covering the block's rows (``scaler.table_models``)
        n_params : columns of the normal matrix
        kind, out : as :meth:`compute_normal_equations`

        Returns
        -------
        ``(N, rhs, Σ w r², n_equations, g, Ĩ, scales_usable)``: g and Ĩ (None with a fixed Ĩ)
        per block row, ``scales_usable`` False when some g is not finite and > 0.
        """
        offsets, inten, w, rows = block.table_arrays()
        fixed = np.ascontiguousarray(block.Ih_values[block._order]) if self.fixed_Ih else None
        matrix, rhs, r_sq, n_eq, g, ih, usable = _fit.model_normal_equations(
            offsets, inten, w, models, n_params, kind=kind or self.normal_matrix, fixed_Ih=fixed,
            n_threads=getattr(self, "n_threads", 1), out=out)
        return matrix, rhs, r_sq, n_eq, g[rows], None if ih is None else ih[rows], usable

    def compute_normal_diagonal(self, block: Any) -> np.ndarray:
        """Diagonal of the Ĩ-eliminated normal matrix of one block (L-BFGS preconditioner)."""
        offsets, inten, w, models, n_params = block_kernel_arguments(block)
        fixed = np.ascontiguousarray(block.Ih_values[block._order]) if self.fixed_Ih else None
        return _fit.normal_matrix_diagonal(offsets, inten, w, models, n_params, fixed_Ih=fixed)

    # ---------------------------------------------------------------- restraints
    def compute_restraints_functional_gradients(self, apm: Any) -> list[Any] | None:
        if not self.param_restraints:
            return None
        res = ScalingRestraintsCalculator.calculate_restraints(apm)
        if res is None:
            self.param_restraints = False
            return None
        return [float(np.sum(res[0])), res[1]]

    def compute_restraints_residuals_and_gradients(self, apm: Any) -> list[Any] | None:
        if not self.param_restraints:
            return None
        res = ScalingRestraintsCalculator.calculate_jacobian_restraints(apm)
        if res is None:
            self.param_restraints = False
        return res


class ScalingTargetFixedIH(ScalingTarget):
    """Targeted scaling against a fixed reference Ĩ: gradient ``Σ −2 w r Ĩ ∂g/∂p``, ``J = −Ĩ ∂g/∂p``."""

    fixed_Ih = True

    @classmethod
    def calculate_gradients(cls, block: Any) -> np.ndarray:
        r = cls.calculate_residuals(block)
        d = canonical_csr(block.derivatives, block.size)
        return np.asarray(d.T @ (-2.0 * block.weights * r * block.Ih_values), dtype=np.float64).ravel()

    @classmethod
    def calculate_jacobian(cls, block: Any) -> sp.csr_matrix:
        d = canonical_csr(block.derivatives, block.size)
        return (-(sp.diags(block.Ih_values) @ d)).tocsr()
