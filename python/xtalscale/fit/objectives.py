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

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._core import fit as _fit
from .._lazy import LazyModule
from .minimisers import NonFiniteScales
from .restraints import coo_arrays
from .target import canonical_csr

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = ["ScalerObjective", "ModelObjective", "ModelBlockData"]


def _restraint_entries(jac: Any, n_columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of the restraints' Jacobian entries, rows ascending, from a
    CsrView, a scipy matrix or a dense array (a dense one without scipy)."""
    if isinstance(jac, np.ndarray):
        dense = np.asarray(jac, dtype=np.float64).reshape(-1, n_columns)
        rows, cols = np.nonzero(dense)
        return rows.astype(np.int64), cols.astype(np.int64), dense[rows, cols]
    return coo_arrays(jac)


def _add_restraint_terms(matrix: np.ndarray, rhs: np.ndarray, r: np.ndarray, jac: Any,
                         w: np.ndarray) -> None:
    """matrix += JᵀWJ and rhs −= JᵀWr of the restraints, entry by entry from J's stored
    entries: each restraint row adds the products of its own entries (one entry per row, as
    the absorption restraints have, is a diagonal term). A dense Jᵀ·J product cost O(P²·R):
    0.1 s per normal-equations build at 1,176 parameters and as many restraints."""
    rows, cols, vals = _restraint_entries(jac, matrix.shape[0])
    if rows.size == 0:
        return
    weighted = w[rows] * vals
    np.add.at(rhs, cols, -weighted * r[rows])
    counts = np.bincount(rows, minlength=r.size)
    if counts.max() == 1:  # one entry per restraint row: the diagonal
        np.add.at(matrix, (cols, cols), weighted * vals)
        return
    # every (left, right) pair of entries of one row: rows ascend, so a row's entries are
    # consecutive, and entry e pairs with its row's entries starts[e] .. starts[e] + k[e] − 1
    starts = np.concatenate([[0], np.cumsum(counts)])[rows]
    k = counts[rows]
    left = np.repeat(np.arange(rows.size), k)
    position_in_row = np.arange(left.size) - np.repeat(np.cumsum(k) - k, k)
    right = np.repeat(starts, k) + position_in_row
    np.add.at(matrix, (cols[left], cols[right]), weighted[left] * vals[right])


def require_usable_scales(g: np.ndarray) -> None:
    """Raise :class:`NonFiniteScales` unless every value of ``g`` is finite and > 0 (the test
    a trial point's scales must pass; also the scaler's, dataset by dataset)."""
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise NonFiniteScales("scales are not finite and > 0")


def _sums_in_place(target: Any) -> bool:
    """Whether ``target.compute_normal_equations`` adds a block into ``out=(matrix, rhs)``
    (ScalingTarget's; a subclass that overrides it without ``out`` is called the old way)."""
    if not hasattr(target, "compute_normal_equations"):
        return False
    import inspect

    try:
        return "out" in inspect.signature(target.compute_normal_equations).parameters
    except (TypeError, ValueError):
        return False


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
        #: whether the full-matrix engines end with the var-cov matrix (minimisers._finish_esds)
        self.wants_var_cov = True
        self._restraints_at: tuple[bytes, Any] | None = None  # (parameters, restraint r, J, w)
        #: f+g through the models' transposed products where the scaler allows it (no ∂g/∂p
        #: formed); False: always the derivative matrices (the two agree to rounding)
        self.matrix_free = True
        self._free_target: tuple[Any] | None = None  # (target or None), found once: see _matrix_free
        self._update_takes: frozenset[str] | None = None  # see _update_arguments
        #: normal equations straight from the scaler's C++ model blocks where it offers them
        #: (:meth:`_fused_target`: no ∂g/∂p formed, the same bits), and the matrix-free f+g in
        #: one pass over them (g, ∂f/∂g and the transposed products per chunk of groups, equal
        #: to the three calls to rounding); False: the derivative way and the three calls
        self.fused_normal_equations = True

    def _blocks(self) -> list[Any]:
        getter = getattr(self.scaler, "get_blocks_for_minimisation", None)
        return list(getter()) if getter else list(self.scaler.Ih_table.blocked_data_list)

    def get_x(self) -> np.ndarray:
        return np.asarray(self.apm.get_param_vals(), dtype=np.float64)

    def _streaming(self) -> bool:
        """True when the scaler streams its blocks (``stream_derivatives``): each block's
        ∂g/∂p is released right after use, so one block's derivatives are alive at a time."""
        return bool(getattr(self.scaler, "stream_derivatives", False)) and \
            hasattr(self.scaler, "release_block_derivatives")

    def _update_arguments(self) -> frozenset[str]:
        """The parameter names of the scaler's ``update_for_minimisation`` (found once)."""
        if self._update_takes is None:
            import inspect

            update = getattr(self.scaler, "update_for_minimisation", None)
            try:
                names = frozenset(inspect.signature(update).parameters) if update is not None else frozenset()
            except (TypeError, ValueError):
                names = frozenset()
            self._update_takes = names
        return self._update_takes

    def _g_only_updates(self) -> bool:
        """True when the scaler's ``update_for_minimisation`` takes ``derivatives=False`` (g and
        Ĩ without ∂g/∂p): a streaming scaler, or one whose method has that argument (the DIALS
        protocol's has not)."""
        return self._streaming() or "derivatives" in self._update_arguments()

    def set_x(self, x: np.ndarray) -> None:
        self.apm.set_param_vals(np.asarray(x, dtype=np.float64))
        # g and Ĩ only when no caller reads ∂g/∂p before the next set_x builds them anyway: a
        # streamed table builds a block's when it is consumed, and the matrix-free f+g never
        # does. A line search's rejected trial point (g <= 0 somewhere) then costs g alone: in
        # a 60-sweep job's first round two trial points in three were rejected.
        lazy = self._streaming() or self._matrix_free() is not None
        for _ in self._each_block(derivatives=not lazy, check_scales=True):
            pass

    def _update(self, block_id: int, derivatives: bool, check_scales: bool = False) -> None:
        """The scaler's update of a block; ``derivatives`` is passed on only to a scaler that
        takes it (:meth:`_g_only_updates`; otherwise the block always gets ∂g/∂p), and
        ``check_scales`` (g only) to one that takes it: that scaler refuses a point at its first
        dataset with g not finite and > 0, before evaluating the others and Ĩ (the caller
        checks g after the update in any case)."""
        if not self._g_only_updates():
            self.scaler.update_for_minimisation(self.apm, block_id)
        elif check_scales and not derivatives and "check_scales" in self._update_arguments():
            self.scaler.update_for_minimisation(self.apm, block_id, derivatives=False, check_scales=True)
        else:
            self.scaler.update_for_minimisation(self.apm, block_id, derivatives=derivatives)

    def _each_block(self, derivatives: bool = True, check_scales: bool = False) -> Iterator[Any]:
        """The minimisation blocks with g and Ĩ (and ∂g/∂p, if asked) current for the manager's
        parameters, one at a time; when streaming, a block's derivatives are released once the
        caller has moved on to the next block. ``check_scales``: raise NonFiniteScales for a
        block whose g is not finite and > 0 (overflow is then left to that check)."""
        stream = self._streaming()
        for block_id, block in enumerate(self._blocks()):
            self._update_block(block_id, block, derivatives, check_scales)
            yield block
            if stream and derivatives:
                self.scaler.release_block_derivatives(self.apm, block_id)

    def _update_block(self, block_id: int, block: Any, derivatives: bool, check_scales: bool) -> None:
        """:meth:`_update` of one block; ``check_scales``: then raise NonFiniteScales if its g
        is not finite and > 0 (overflow is left to that check)."""
        if check_scales:
            with np.errstate(over="ignore", invalid="ignore"):
                self._update(block_id, derivatives, check_scales=True)
            require_usable_scales(np.asarray(block.inverse_scale_factors))
        else:
            self._update(block_id, derivatives)

    def _restraint_residuals_and_jacobian(self) -> list[Any] | None:
        """The manager's restraint ``[r, J, w]`` (or None) at the current parameters.

        Levenberg–Marquardt asks twice at an accepted step (the objective, then the normal
        equations); the second time reuses the first (building J costs ~2 ms of scipy.sparse
        calls). The values are read, never modified, by the callers below."""
        key = np.asarray(self.apm.get_param_vals(), dtype=np.float64).tobytes()
        if self._restraints_at is None or self._restraints_at[0] != key:
            self._restraints_at = (key, self.apm.compute_restraints_residuals_and_gradients(self.apm))
        return self._restraints_at[1]

    def _matrix_free(self) -> Any:
        """The target when f+g can go without ∂g/∂p (a scaler that updates g alone and whose
        models all have C++ blocks, no shared-component reduction, a target with the
        scale-gradient kernel), else None. Streamed or not: at 60 sweeps of ~700 rows each,
        forming ∂g/∂p of every dataset for the CSR kernel cost more than the transposed
        products. Found once per objective (the manager and its models do not change under
        it); :attr:`matrix_free` is read on every call."""
        if not self.matrix_free:
            return None
        if self._free_target is None:
            inner = getattr(self.apm, "target", None) or self.target
            usable = (self._g_only_updates()
                      and hasattr(inner, "compute_functional_and_scale_gradient")
                      and getattr(self.apm, "reducing_matrix", None) is None
                      and getattr(self.scaler, "can_transpose_product", lambda apm: False)(self.apm))
            self._free_target = (inner if usable else None,)
        return self._free_target[0]

    def _fused_target(self) -> Any:
        """The target when the normal equations may be built straight from the scaler's model
        blocks (``scaler.table_models``, evaluated chunk by chunk in C++ with no ∂g/∂p formed):
        :meth:`_matrix_free`'s conditions, a target with ``compute_model_normal_equations``
        and Ĩ eliminated (a fixed Ĩ keeps the derivative way, where the scaler's update sets
        the Ĩ it holds), else None."""
        if not self.fused_normal_equations:
            return None
        inner = self._matrix_free()
        usable = (inner is not None and hasattr(inner, "compute_model_normal_equations")
                  and not getattr(inner, "fixed_Ih", False) and hasattr(self.scaler, "table_models")
                  and hasattr(self.scaler, "take_block_scales"))
        return inner if usable else None

    def _fused_terms(self, inner: Any, matrix: np.ndarray, rhs: np.ndarray,
                     check_scales: bool) -> tuple[float, int]:
        """Every block's terms added to ``matrix`` (unfolded) and ``rhs``: from its model blocks
        (the g and Ĩ evaluated on the way stored back on the block) where the scaler gives
        them, else from its derivatives as :meth:`normal_equations` adds them. Raises
        NonFiniteScales for a block whose g is not finite and > 0."""
        r_sq, n_eq = 0.0, 0
        for block_id, block in enumerate(self._blocks()):
            models = self.scaler.table_models(self.apm, block_id)
            if models is None:
                _, _, sb, eb = self._derivative_terms(inner, block_id, block, matrix, rhs, check_scales)
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    _, _, sb, eb, g, ih, usable = inner.compute_model_normal_equations(
                        block, models, matrix.shape[0], out=(matrix, rhs))
                self.scaler.take_block_scales(self.apm, block_id, g, ih)
                if not usable:
                    raise NonFiniteScales("scales are not finite and > 0")
            r_sq += sb
            n_eq += eb
        return r_sq, n_eq

    def _derivative_terms(self, inner: Any, block_id: int, block: Any, matrix: np.ndarray, rhs: np.ndarray,
                          check_scales: bool) -> tuple[Any, ...]:
        """One block's terms added to ``matrix`` and ``rhs`` from its ∂g/∂p (evaluated for it,
        released afterwards when streaming), as :meth:`_each_block` serves it."""
        self._update_block(block_id, block, True, check_scales)
        terms = inner.compute_normal_equations(block, out=(matrix, rhs))
        if self._streaming():
            self.scaler.release_block_derivatives(self.apm, block_id)
        return terms

    def f_and_grad(self) -> tuple[float, np.ndarray]:
        f, grad = 0.0, np.zeros(self.n_params)
        inner = self._matrix_free()
        if inner is not None:
            fused = self._fused_target()
            one_pass = fused is not None and hasattr(fused, "compute_model_functional_and_gradient")
            for block_id, block in enumerate(self._blocks()):
                models = self.scaler.table_models(self.apm, block_id) if one_pass else None
                if models is not None:
                    # g, ∂f/∂g and the transposed products in one pass over chunks of groups
                    with np.errstate(over="ignore", invalid="ignore"):
                        fb, gb, g, ih = fused.compute_model_functional_and_gradient(block, models, self.n_params)
                    self.scaler.take_block_scales(self.apm, block_id, g, ih)
                    f += fb
                    grad += gb
                    continue
                # ∂f/∂g from g alone, then (∂g/∂p)ᵀ ∂f/∂g from each model block: no ∂g/∂p formed
                self._update_block(block_id, block, False, False)
                fb, dfdg = inner.compute_functional_and_scale_gradient(block)
                f += fb
                grad += self.scaler.transpose_product(self.apm, block_id, dfdg)
            return self._add_restraints(f, grad)
        for block in self._each_block():
            fb, gb = self.apm.compute_functional_gradients(block)
            f += fb
            grad += gb
        return self._add_restraints(f, grad)

    def _add_restraints(self, f: float, grad: np.ndarray) -> tuple[float, np.ndarray]:
        restraints = self.apm.compute_restraints_functional_gradients(self.apm)
        if restraints:
            f += restraints[0]
            grad += restraints[1]
        return f, grad

    def normal_equations_at(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        """:meth:`set_x` then :meth:`normal_equations`, raising NonFiniteScales as set_x does.
        A scaler that updates g alone (:meth:`_g_only_updates`, whose set_x may leave ∂g/∂p
        unbuilt) evaluates each block once (g with ∂g/∂p) instead of twice (g for set_x, then
        again with the derivatives): ~0.1 s per start of a streamed 10⁶-row round."""
        if not self._g_only_updates():
            self.set_x(x)
            return self.normal_equations()
        self.apm.set_param_vals(np.asarray(x, dtype=np.float64))
        return self.normal_equations(check_scales=True)

    def _block_terms(self, inner: Any, in_place: bool, matrix: np.ndarray, rhs: np.ndarray,
                     check_scales: bool) -> tuple[float, int]:
        """Every block's terms added to ``matrix`` and ``rhs`` (unfolded when ``in_place``) from
        its ∂g/∂p; returns ``(Σ w r², n_equations)``."""
        r_sq, n_eq = 0.0, 0
        if in_place:  # the blocks' terms summed into matrix and rhs, folded by the caller
            for block_id, block in enumerate(self._blocks()):
                _, _, sb, eb = self._derivative_terms(inner, block_id, block, matrix, rhs, check_scales)
                r_sq += sb
                n_eq += eb
            return r_sq, n_eq
        for block in self._each_block(check_scales=check_scales):
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
        return r_sq, n_eq

    def normal_equations(self, check_scales: bool = False) -> tuple[np.ndarray, np.ndarray, float, int]:
        reduce = getattr(self.apm, "reducing_matrix", None)
        n_full = reduce.shape[0] if reduce is not None else self.n_params
        matrix, rhs = np.zeros((n_full, n_full)), np.zeros(n_full)
        inner = getattr(self.apm, "target", None) or self.target
        in_place = _sums_in_place(inner)
        fused = self._fused_target() if in_place else None
        if fused is not None:  # no reducing matrix (_matrix_free); folded below
            r_sq, n_eq = self._fused_terms(fused, matrix, rhs, check_scales)
        else:
            r_sq, n_eq = self._block_terms(inner, in_place, matrix, rhs, check_scales)
        if in_place:
            _fit.fold_normal_matrix(matrix)
        if reduce is not None:
            matrix = np.asarray(reduce.T @ (reduce.T @ matrix).T)
            rhs = np.asarray(reduce.T @ rhs).ravel()
        restraints = self._restraint_residuals_and_jacobian()
        if restraints:
            r, jac, w = restraints
            _add_restraint_terms(matrix, rhs, np.asarray(r, dtype=np.float64),
                                 jac, np.asarray(w, dtype=np.float64))
            r_sq += float(np.sum(w * r * r))
            n_eq += len(r)
        return matrix, rhs, r_sq, n_eq

    #: dataset_blocks builds the P x P fixed-Ĩ matrix; above this many parameters (128 MB) the
    #: L-BFGS preconditioner stays the diagonal
    DATASET_BLOCKS_MAX_PARAMS = 4000

    def dataset_blocks(self) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
        """``(N, ranges)``: the normal matrix with Ĩ held at its current values (restraints
        included) and each dataset's parameter range, for a block-diagonal L-BFGS
        preconditioner. With Ĩ fixed the datasets' parameters do not couple (each observation
        depends on its own dataset's model only, each restraint on one dataset's parameters),
        so N is block-diagonal and its blocks are all of it. None for one dataset, shared components (they couple datasets), a
        target without the C++ normal equations, or more than DATASET_BLOCKS_MAX_PARAMS."""
        data = getattr(self.apm, "apm_data", None)
        inner = getattr(self.apm, "target", None) or self.target
        if (not data or len(data) < 2 or getattr(self.apm, "reducing_matrix", None) is not None
                or not hasattr(inner, "compute_normal_equations") or not hasattr(inner, "fixed_Ih")
                or self.n_params > self.DATASET_BLOCKS_MAX_PARAMS):
            return None
        ranges = [(int(d["start_idx"]), int(d["end_idx"])) for _, d in sorted(data.items())]
        held = inner.__dict__.get("fixed_Ih")
        inner.fixed_Ih = True  # this call only: Ĩ at its current values (the blocks' Ih_values)
        try:
            matrix = self.normal_equations()[0]
        finally:
            if held is None:
                del inner.fixed_Ih
            else:
                inner.fixed_Ih = held
        return matrix, ranges

    def diagonal(self) -> np.ndarray | None:
        """Diagonal of JᵀWJ (Ĩ eliminated, restraints included): the L-BFGS preconditioner."""
        inner = getattr(self.apm, "target", None) or self.target
        if not hasattr(inner, "compute_normal_diagonal"):
            return None
        diag = None
        for block in self._each_block():
            part = inner.compute_normal_diagonal(block)
            diag = part if diag is None else diag + part
        if diag is None:
            return None
        reduce = getattr(self.apm, "reducing_matrix", None)
        if reduce is not None:
            diag = np.asarray(reduce.multiply(reduce).T @ diag).ravel()
        restraints = self._restraint_residuals_and_jacobian()
        if restraints:
            rows, cols, vals = _restraint_entries(restraints[1], diag.size)
            w = np.asarray(restraints[2], dtype=np.float64)
            diag = diag + np.bincount(cols, w[rows] * vals * vals, minlength=diag.size)
        return diag

    def objective_only(self) -> float:
        total = 0.0
        for block in self._each_block(derivatives=False):
            r, w = self.target.compute_residuals(block)
            total += float(np.sum(w * r * r))
        restraints = self._restraint_residuals_and_jacobian()
        if restraints:
            total += float(np.sum(restraints[2] * restraints[0] ** 2))
        return total

    def rmsd(self) -> float:
        return float(self.target.rmsds(self.scaler.Ih_table, self.apm)[0])

    def rmsd_of(self, r_sq: float) -> float:
        """:meth:`rmsd` from Σ w r² (restraints included) at the current point, which the
        engines already hold: sqrt(r²/n) over the work blocks' rows, without another pass."""
        n = self.n_reflections()
        return float(np.sqrt(r_sq / n)) if n else 0.0

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
    """One model block for :class:`ModelObjective` (the DerivativesView of the C++ contract).

    Parameters
    ----------
    scales : g, one per block row
    derivatives : scipy sparse ``n_rows x n_cols`` (made canonical), or a raw CSR tuple
        ``(indptr int64, indices int32, values float64, n_cols)`` used as is. Passing the same
        ``indptr``/``indices``/``table_rows`` arrays on every evaluation lets the objective skip
        re-validating their structure (values are always checked).
    column_offset : first global parameter of column 0
    table_rows : table row of each block row (None = identity)
    """

    __slots__ = ("scales", "indptr", "indices", "values", "n_cols", "column_offset", "table_rows")

    def __init__(self, scales: Any, derivatives: Any, column_offset: int = 0, table_rows: Any = None) -> None:
        self.scales = np.ascontiguousarray(scales, dtype=np.float64)
        if isinstance(derivatives, tuple):
            indptr, indices, values, n_cols = derivatives
            self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
            self.indices = np.ascontiguousarray(indices, dtype=np.int32)
            self.values = np.ascontiguousarray(values, dtype=np.float64)
            self.n_cols = int(n_cols)
        else:
            d = canonical_csr(derivatives, self.scales.size)
            self.indptr = d.indptr.astype(np.int64, copy=False)
            self.indices = d.indices.astype(np.int32, copy=False)
            self.values, self.n_cols = d.data, d.shape[1]
        self.column_offset = int(column_offset)
        self.table_rows = None if table_rows is None else np.ascontiguousarray(table_rows, dtype=np.int64)

    #: per model-block object: (block, pattern version, indptr, indices) of the last wrap
    _patterns: dict[int, tuple[Any, int, np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_model_block(cls, block: Any, table_rows: Any = None) -> "ModelBlockData":
        """Wrap an evaluated C++ ``xtalscale._core.model_block.ModelBlock`` (its DerivativesView)
        without copies. While the block's pattern ``version`` is unchanged the same
        ``indptr``/``indices`` objects are reused, so their structure is checked only once."""
        cached = cls._patterns.get(id(block))
        if cached is not None and cached[0] is block and cached[1] == block.version:
            indptr, indices = cached[2], cached[3]
        else:
            indptr, indices = block.indptr, block.indices
            cls._patterns[id(block)] = (block, block.version, indptr, indices)
        return cls(block.scales, (indptr, indices, block.values, block.n_cols), block.column_offset, table_rows)

    @property
    def derivatives(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=(self.scales.size, self.n_cols))

    def as_kernel_tuple(self) -> tuple[Any, ...]:
        return (self.scales, self.indptr, self.indices, self.values, self.n_cols, self.column_offset,
                self.table_rows)


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
        self._checked: list[tuple[Any, ...]] = []
        self._check = True
        self.set_x(self.x)

    def get_x(self) -> np.ndarray:
        return self.x.copy()

    def set_x(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            blocks = list(self.model(x))
        for b in blocks:
            require_usable_scales(b.scales)
            if not np.all(np.isfinite(b.values)):
                raise NonFiniteScales("derivatives are not finite")
        self.x = x.copy()
        self._f_here: float | None = None  # functional at x, once computed
        self._blocks = [b.as_kernel_tuple() for b in blocks]
        structure = [(b[1], b[2], b[6]) for b in self._blocks]
        same = len(structure) == len(self._checked) and all(
            a is c and bb is d and e is f for (a, bb, e), (c, d, f) in zip(structure, self._checked))
        self._check = not same
        self._pending = structure

    def _checked_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a kernel, validating index structure only when the arrays are new."""
        out = fn(*args, check_structure=self._check, **kwargs)
        if self._check:  # keep references: the ids cannot be reused while we hold them
            self._checked, self._check = self._pending, False
        return out

    def _restraint_f_g(self) -> tuple[float, np.ndarray]:
        if self.restraint_weights is None:
            return 0.0, np.zeros(self.n_params)
        w = self.restraint_weights
        return float(np.sum(w * self.x * self.x)), 2.0 * w * self.x

    def f_and_grad(self) -> tuple[float, np.ndarray]:
        f, grad, _ = self._checked_call(_fit.functional_and_gradient, self.offsets, self.intensities, self.weights, self._blocks,
                                                  self.n_params, gradient=True, fixed_Ih=self.fixed_Ih,
                                                  n_threads=self.n_threads)
        fr, gr = self._restraint_f_g()
        self._f_here = f + fr
        return f + fr, grad + gr

    def table_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Ĩ, residuals, g)`` per table row at the current parameters."""
        _, _, rows = self._checked_call(_fit.functional_and_gradient, self.offsets, self.intensities, self.weights, self._blocks,
                                                  self.n_params, gradient=False, fixed_Ih=self.fixed_Ih,
                                                  rows=True, n_threads=self.n_threads)
        return rows

    def objective_only(self) -> float:
        f, _, _ = self._checked_call(_fit.functional_and_gradient, self.offsets, self.intensities, self.weights, self._blocks,
                                               self.n_params, gradient=False, fixed_Ih=self.fixed_Ih,
                                               n_threads=self.n_threads)
        self._f_here = f + self._restraint_f_g()[0]
        return self._f_here

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        matrix, rhs, r_sq, n_eq = self._checked_call(_fit.normal_equations, self.offsets, self.intensities, self.weights, self._blocks,
                                                        self.n_params, kind=self.kind, fixed_Ih=self.fixed_Ih,
                                                        n_threads=self.n_threads)
        if self.restraint_weights is not None:
            w = self.restraint_weights
            matrix[np.diag_indices_from(matrix)] += w
            rhs -= w * self.x
            r_sq += float(np.sum(w * self.x * self.x))
            n_eq += int(np.count_nonzero(w))
        return matrix, rhs, r_sq, n_eq

    def diagonal(self) -> np.ndarray:
        """Diagonal of the Ĩ-eliminated normal matrix (+ restraint weights): L-BFGS preconditioner."""
        diag = self._checked_call(_fit.normal_matrix_diagonal, self.offsets, self.intensities, self.weights,
                                  self._blocks, self.n_params, fixed_Ih=self.fixed_Ih)
        if self.restraint_weights is not None:
            diag = diag + self.restraint_weights
        return diag

    def rmsd(self) -> float:
        """``sqrt((Σ w r² + Σ w p²) / n)`` (spec 6.7), reusing the functional of this point."""
        n = self.intensities.size
        f = self._f_here if self._f_here is not None else self.objective_only()
        return float(np.sqrt(f / n)) if n else 0.0

    def n_reflections(self) -> int:
        return int(self.intensities.size)

    def param_names(self) -> list[str]:
        return list(self.names)

    def set_var_cov(self, var_cov: np.ndarray) -> None:
        self.var_cov = var_cov

