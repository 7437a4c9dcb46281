"""Dense normal equations and their iterations, with the semantics of scitbx's ``lstbx``.

This is the home of the least-squares objects that DIALS-style scripts reach through
``scitbx.lstbx.normal_eqns`` and ``scitbx.lstbx.normal_eqns_solving`` (the facades
:mod:`xtalscale.lstbx.normal_eqns` and :mod:`xtalscale.lstbx.normal_eqns_solving` re-export
them under those names):

* :class:`linear_ls` -- the normal equations ``(AᵀWA) x = AᵀWb`` of ``min ‖A x - b‖²_W``,
  accumulated equation by equation or a whole (dense, flex-grid or scipy-sparse) design matrix
  at a time, stored packed-upper as scitbx stores them, solved by Cholesky (LAPACK).
* :class:`non_linear_ls` -- the Gauss-Newton linearisation of ``L(x) = ½ Σ wᵢ rᵢ(x)²``:
  adding a residual r with gradient ∇r adds the linear equation ``∇r · δ = -r``, so the step
  equations' right-hand side is ``-∇L`` and their solution the Gauss-Newton step.
* :class:`non_linear_ls_mixin` -- the protocol the iteration drivers need (``build_up``,
  ``step_forward``, ``parameter_vector_norm`` ...), as in scitbx.
* :class:`naive_iterations`, :class:`naive_iterations_with_damping` and
  :class:`levenberg_marquardt_iterations` -- the drivers, with scitbx's stopping rules
  (gradient infinity-norm ≤ ``gradient_threshold``; step norm ≤ ``step_threshold`` ·
  (‖x‖ + ``step_threshold``)) and, for Levenberg-Marquardt, Nielsen's damping update
  (μ₀ = τ · max diag(N); gain ratio ρ > 0 accepts the step and scales μ by
  max(1/3, 1 - (2ρ - 1)³), otherwise the step is undone and μ multiplied by ν, ν doubled).

Differences from scitbx (deliberate)
------------------------------------
* A normal matrix that is not positive definite raises :class:`NormalEquationsError` naming
  the first parameter whose pivot vanished (scitbx fails a C++ assertion). The error is both a
  ``ValueError`` and a ``RuntimeError``, so code written for scitbx's ``RuntimeError`` still
  catches it.
* Non-finite residuals, derivatives or weights raise ``ValueError`` naming the argument;
  scitbx accumulates them silently.
* ``levenberg_marquardt_iterations`` also takes the commissioning API's one-shot form,
  ``levenberg_marquardt_iterations(residuals=r, jacobian=J, step_threshold=...,
  gradient_threshold=...)`` followed by ``build_and_solve()`` and ``solution()``: one
  Levenberg-Marquardt step ``(JᵀWJ + μ I) δ = -JᵀWr`` with scitbx's initial damping
  μ = τ · max diag(JᵀWJ) (τ = 10⁻³), for scripts that re-evaluate r and J themselves. The
  damping keeps the step defined when the parameters are not all determined by the data
  (e.g. an overall scale shared by two multiplicative components); the step is zero when the
  gradient has converged (its infinity-norm ≤ ``gradient_threshold``).
"""
from __future__ import annotations

import numbers
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from ..flex_arrays import double, symmetric_from_packed_u
from .minimisers import nielsen_damping  # one rule for both LevMar engines

__all__ = [
    "NormalEquationsError",
    "iterations",
    "journaled_non_linear_ls",
    "levenberg_marquardt_iterations",
    "linear_ls",
    "naive_iterations",
    "naive_iterations_with_damping",
    "non_linear_ls",
    "non_linear_ls_mixin",
]


class NormalEquationsError(ValueError, RuntimeError):
    """Normal equations that cannot be solved (not positive definite, non-finite, misused)."""


# ----------------------------------------------------------------------------- argument checks
def _vector(values: Any, name: str, n: int | None = None) -> np.ndarray:
    """A finite 1-D float64 array (of length n when given)."""
    if hasattr(values, "as_dense_vector"):  # a scitbx-like sparse vector
        values = values.as_dense_vector()
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 2 and 1 in a.shape:  # a single row or column
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (got shape {a.shape})")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} values but {n} are needed")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name}[{int(np.flatnonzero(bad)[0])}] is not finite")
    return a


def _weights(weights: Any, n: int) -> np.ndarray:
    """Weights: ``None`` or empty means all 1; otherwise n finite values (scitbx accepts
    negative weights too, and so do we)."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        return np.ones(n)
    return _vector(w, "weights", n)


def _matrix(matrix: Any, n_rows: int, n_cols: int, name: str) -> Any:
    """A design matrix / Jacobian as a scipy CSR matrix or a dense 2-D float64 array."""
    if sp.issparse(matrix):
        m = sp.csr_matrix(matrix, dtype=np.float64)
        values = m.data
    else:
        if hasattr(matrix, "as_dense_matrix"):  # a scitbx-like sparse matrix
            matrix = matrix.as_dense_matrix()
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim == 1 and n_cols == 1:
            m = m.reshape(-1, 1)
        if m.ndim != 2:
            raise ValueError(f"{name} must be 2-dimensional (got shape {m.shape})")
        values = m
    if m.shape != (n_rows, n_cols):
        raise ValueError(f"{name} has shape {m.shape} but ({n_rows}, {n_cols}) is needed "
                         "(one row per equation, one column per parameter)")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds non-finite values")
    return m


def _weighted_normal_matrix(a: Any, w: np.ndarray) -> np.ndarray:
    """Dense ``AᵀWA`` for a dense or sparse A."""
    if sp.issparse(a):
        return np.asarray((a.T @ a.multiply(w[:, None])).toarray())
    return (a * w[:, None]).T @ a


def _packed(full: np.ndarray) -> np.ndarray:
    return full[np.triu_indices(full.shape[0])]


# ----------------------------------------------------------------------------- linear_ls
class linear_ls:
    """Normal equations of the linear least-squares problem ``min_x Σ wᵢ (Aᵢ·x - bᵢ)²``.

    Parameters
    ----------
    n_parameters : int or array_like
        Number of unknowns; or (scitbx's second form) a packed-upper normal matrix, with the
        right-hand side as the second argument.
    right_hand_side : array_like, optional
        With a packed-upper normal matrix first: the right-hand side ``AᵀWb``.

    Notes
    -----
    The normal matrix ``AᵀWA`` is held packed-upper (row by row, ``i ≤ j``), as scitbx holds
    it; :meth:`normal_matrix_packed_u` returns a flex view *sharing* that storage, so an
    in-place change of it (e.g. Levenberg-Marquardt's
    ``matrix_packed_u_diagonal_add_in_place``) changes the equations, as in scitbx. After
    :meth:`solve` the storage holds the Cholesky factor U (``AᵀWA = UᵀU``) and the right-hand
    side the solution, and the accessors of the unsolved state raise.
    """

    def __init__(self, n_parameters: Any, right_hand_side: Any = None) -> None:
        if isinstance(n_parameters, numbers.Integral) and right_hand_side is None:
            n = int(n_parameters)
            if n < 0:
                raise ValueError(f"n_parameters must be >= 0 (got {n})")
            self._n = n
            self._matrix = np.zeros(n * (n + 1) // 2)
            self._rhs = np.zeros(n)
        else:
            if right_hand_side is None:
                raise TypeError("linear_ls(normal_matrix_packed_u, right_hand_side) needs both")
            rhs = _vector(right_hand_side, "right_hand_side")
            packed = _vector(n_parameters, "normal_matrix_packed_u")
            self._n = rhs.size
            if packed.size != self._n * (self._n + 1) // 2:
                raise ValueError(f"a packed-upper normal matrix for {self._n} parameters needs "
                                 f"{self._n * (self._n + 1) // 2} values (got {packed.size})")
            self._matrix = packed.copy()
            self._rhs = rhs.copy()
        self._solved = False

    def n_parameters(self) -> int:
        """Number of unknowns."""
        return self._n

    # ------------------------------------------------------------------ accumulation
    def _require_unsolved(self, what: str) -> None:
        if self._solved:
            raise NormalEquationsError(f"linear_ls.{what}: the equations are already solved "
                                       "(call reset() to accumulate new ones)")

    def add_equation(self, right_hand_side: float, design_matrix_row: Any,
                     weight: float = 1.0) -> None:
        """Add the equation ``A_i · x = b_i`` with weight ``w_i``."""
        self._require_unsolved("add_equation")
        a = _vector(design_matrix_row, "design_matrix_row", self._n)
        b, w = float(right_hand_side), float(weight)
        if not (np.isfinite(b) and np.isfinite(w)):
            raise ValueError(f"right_hand_side ({b}) and weight ({w}) must be finite")
        self._matrix += w * _packed(np.outer(a, a))
        self._rhs += (w * b) * a

    def add_equations(self, right_hand_side: Any, design_matrix: Any, weights: Any = None,
                      negate_right_hand_side: bool = False) -> None:
        """Add the equations ``A x = b`` (``A x + b = 0`` with ``negate_right_hand_side``).

        ``design_matrix`` may be dense (numpy, a flex grid) or scipy-sparse.
        """
        self._require_unsolved("add_equations")
        b = _vector(right_hand_side, "right_hand_side")
        a = _matrix(design_matrix, b.size, self._n, "design_matrix")
        w = _weights(weights, b.size)
        self._matrix += _packed(_weighted_normal_matrix(a, w))
        atwb = np.asarray(a.T @ (w * b)).reshape(-1)
        self._rhs += -atwb if negate_right_hand_side else atwb

    def reset(self) -> None:
        """Forget every equation (the state right after construction)."""
        self._matrix[:] = 0.0
        self._rhs[:] = 0.0
        self._solved = False

    # ------------------------------------------------------------------ accessors
    def normal_matrix_packed_u(self) -> double:
        """``AᵀWA`` packed-upper, as a flex array sharing the equations' storage."""
        self._require_unsolved("normal_matrix_packed_u")
        return double._wrap(self._matrix)

    normal_matrix = normal_matrix_packed_u

    def right_hand_side(self) -> double:
        """``AᵀWb``, as a flex array sharing the equations' storage."""
        self._require_unsolved("right_hand_side")
        return double._wrap(self._rhs)

    def __iter__(self):
        yield self.normal_matrix_packed_u()
        yield self.right_hand_side()

    @property
    def solved(self) -> bool:
        """Whether :meth:`solve` has run since the last :meth:`reset`."""
        return self._solved

    # ------------------------------------------------------------------ solving
    def solve(self) -> None:
        """Solve by Cholesky factorisation ``AᵀWA = UᵀU`` (LAPACK ``dpotrf``/``dpotrs``).

        Raises
        ------
        NormalEquationsError
            If the normal matrix is not positive definite; the message names the first
            parameter (0-based) whose pivot vanished, i.e. one the equations do not determine
            independently of the earlier ones.
        """
        self._require_unsolved("solve")
        if self._n == 0:
            self._solved = True
            return
        full = symmetric_from_packed_u(self._matrix)
        if not np.all(np.isfinite(full)) or not np.all(np.isfinite(self._rhs)):
            raise NormalEquationsError("the normal equations hold non-finite values")
        factor, info = lapack.dpotrf(full, lower=0, clean=1)
        if info != 0:
            raise NormalEquationsError(
                f"the normal matrix ({self._n} parameters) is not positive definite: the pivot "
                f"of parameter {info - 1} vanished, so the equations do not determine it "
                "independently of the parameters before it (fix it, restrain it or damp the "
                "equations)")
        solution, info = lapack.dpotrs(factor, self._rhs, lower=0)
        if info != 0 or not np.all(np.isfinite(solution)):
            raise NormalEquationsError("the Cholesky solve failed (non-finite solution)")
        self._matrix[:] = _packed(factor)
        self._rhs[:] = solution
        self._solved = True

    def _require_solved(self, what: str) -> None:
        if not self._solved:
            raise NormalEquationsError(f"linear_ls.{what}: call solve() first")

    def cholesky_factor_packed_u(self) -> double:
        """The Cholesky factor U (``AᵀWA = UᵀU``), packed-upper (after :meth:`solve`)."""
        self._require_solved("cholesky_factor_packed_u")
        return double._wrap(self._matrix)

    cholesky_factor = cholesky_factor_packed_u

    def solution(self) -> double:
        """The solution x (after :meth:`solve`), sharing the equations' storage."""
        self._require_solved("solution")
        return double._wrap(self._rhs)


# ----------------------------------------------------------------------------- non_linear_ls
class non_linear_ls:
    """The Gauss-Newton linearisation of ``L(x) = ½ Σ wᵢ rᵢ(x)²``.

    Parameters
    ----------
    n_parameters : int
        Number of unknowns.

    Notes
    -----
    Adding residual rᵢ with gradient ∇rᵢ adds ``wᵢ rᵢ²`` to the objective and the equation
    ``∇rᵢ · δ = -rᵢ`` (weight wᵢ) to :meth:`step_equations`, whose right-hand side is then
    ``-∇L`` and whose solution is the Gauss-Newton step. Subclasses (with
    :class:`non_linear_ls_mixin`) define ``build_up``, ``step_forward`` and the rest of the
    iteration protocol; this ``__init__`` does not call ``super().__init__`` so that it can be
    initialised explicitly next to other bases, as DIALS's refinery adaptors do.
    """

    def __init__(self, n_parameters: int) -> None:
        if not isinstance(n_parameters, numbers.Integral) or n_parameters < 0:
            raise ValueError(f"n_parameters must be an integer >= 0 (got {n_parameters!r})")
        self._linearised = linear_ls(int(n_parameters))
        self._r_sq = 0.0
        self._n_equations = 0

    def n_parameters(self) -> int:
        """Number of unknowns."""
        return self._linearised.n_parameters()

    def n_equations(self) -> int:
        """Number of residuals added since the last :meth:`reset`."""
        return self._n_equations

    def add_residual(self, residual: float, weight: float = 1.0) -> None:
        """Add ``w r²`` to the objective only (no equation)."""
        r, w = float(residual), float(weight)
        if not (np.isfinite(r) and np.isfinite(w)):
            raise ValueError(f"residual ({r}) and weight ({w}) must be finite")
        self._r_sq += w * r * r
        self._n_equations += 1

    def add_residuals(self, residuals: Any, weights: Any = None) -> None:
        """Add ``Σ wᵢ rᵢ²`` to the objective only."""
        r = _vector(residuals, "residuals")
        w = _weights(weights, r.size)
        self._r_sq += float(np.dot(w, r * r))
        self._n_equations += r.size

    def add_equation(self, residual: float, grad_residual: Any, weight: float = 1.0) -> None:
        """Add one residual and its linearisation ``∇r · δ = -r``."""
        self.add_residual(residual, weight)
        self._linearised.add_equation(-float(residual), grad_residual, weight)

    def add_equations(self, residuals: Any, jacobian: Any, weights: Any = None,
                      negate_right_hand_side: bool = False) -> None:
        """Add residuals r and their Jacobian J (dense, flex grid or scipy sparse) at once.

        ``negate_right_hand_side`` is accepted for scitbx compatibility and must stay False:
        the linearised equations are always ``J δ = -r``.
        """
        if negate_right_hand_side:
            raise ValueError("non_linear_ls.add_equations: negate_right_hand_side is not "
                             "meaningful here (the equations are J δ = -r)")
        r = _vector(residuals, "residuals")
        j = _matrix(jacobian, r.size, self.n_parameters(), "jacobian")
        w = _weights(weights, r.size)
        self._linearised.add_equations(r, j, w, negate_right_hand_side=True)
        self._r_sq += float(np.dot(w, r * r))
        self._n_equations += r.size

    def objective(self) -> float:
        """``L(x) = ½ Σ wᵢ rᵢ²`` of the residuals added so far."""
        return self._r_sq / 2.0

    def step_equations(self) -> linear_ls:
        """The linearised equations, whose solution is the step."""
        return self._linearised

    def reset(self) -> None:
        """Forget every residual and equation."""
        self._linearised.reset()
        self._r_sq = 0.0
        self._n_equations = 0


class non_linear_ls_mixin:
    """The protocol the iteration drivers use; subclasses define the abstract methods.

    Combine as ``class problem(non_linear_ls, non_linear_ls_mixin)`` and define
    ``build_up(objective_only=False)`` (reset, then add the residuals -- and, unless
    ``objective_only``, their Jacobian -- at the current parameters), ``step_forward()``
    (apply :meth:`step`), ``step_backward()`` (undo it; Levenberg-Marquardt only) and
    ``parameter_vector_norm()``.
    """

    def parameter_vector_norm(self) -> float:
        raise NotImplementedError()

    def build_up(self, objective_only: bool = False) -> None:
        raise NotImplementedError()

    def step_equations(self) -> linear_ls:
        raise NotImplementedError()

    def objective(self) -> float:
        raise NotImplementedError()

    def step_forward(self) -> None:
        raise NotImplementedError()

    def opposite_of_gradient(self) -> double:
        """``-∇L``: the step equations' right-hand side."""
        return self.step_equations().right_hand_side()

    def normal_matrix_packed_u(self) -> double:
        """The step equations' normal matrix (shared storage)."""
        return self.step_equations().normal_matrix_packed_u()

    def solve(self) -> None:
        self.step_equations().solve()

    def solve_and_step_forward(self) -> None:
        self.solve()
        self.step_forward()

    def step(self) -> double:
        """The solved step."""
        return self.step_equations().solution()


# ----------------------------------------------------------------------------- iterations
class journaled_non_linear_ls:
    """Wraps a ``non_linear_ls`` and records, on ``journal``, what each build and solve gave.

    Histories (flex arrays on the journal): ``objective_history``, ``gradient_norm_history``
    (infinity-norm), ``parameter_vector_norm_history``, ``step_norm_history``; and, if
    tracked, ``gradient_history`` and ``step_history`` (lists of copies). Every other
    attribute is the wrapped object's.
    """

    def __init__(self, non_linear_ls: Any, journal: Any, track_gradient: bool,
                 track_step: bool) -> None:
        self.actual = non_linear_ls
        self.journal = journal
        journal.objective_history = double()
        journal.gradient_norm_history = double()
        journal.parameter_vector_norm_history = double()
        journal.step_norm_history = double()
        journal.gradient_history = [] if track_gradient else None
        journal.step_history = [] if track_step else None
        self.normal_equations_building_time = 0.0
        self.normal_equations_solving_time = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.actual, name)

    def build_up(self, objective_only: bool = False) -> None:
        t0 = time.perf_counter()
        self.actual.build_up(objective_only)
        self.normal_equations_building_time += time.perf_counter() - t0
        if objective_only:
            return
        journal = self.journal
        journal.parameter_vector_norm_history.append(float(self.actual.parameter_vector_norm()))
        journal.objective_history.append(float(self.actual.objective()))
        minus_gradient = np.asarray(self.actual.opposite_of_gradient())
        journal.gradient_norm_history.append(
            float(np.abs(minus_gradient).max()) if minus_gradient.size else 0.0)
        if journal.gradient_history is not None:
            journal.gradient_history.append(double(-minus_gradient))

    def solve(self) -> None:
        t0 = time.perf_counter()
        self.actual.solve()
        self.normal_equations_solving_time += time.perf_counter() - t0
        step = np.asarray(self.actual.step())
        self.journal.step_norm_history.append(float(np.linalg.norm(step)))
        if self.journal.step_history is not None:
            self.journal.step_history.append(double(step.copy()))

    def step_forward(self) -> None:
        self.actual.step_forward()

    def solve_and_step_forward(self) -> None:
        self.solve()
        self.step_forward()


class iterations:
    """Base of the iteration drivers: runs :meth:`do` on construction, as scitbx does.

    Parameters
    ----------
    non_linear_ls : object
        A :class:`non_linear_ls` with the :class:`non_linear_ls_mixin` protocol.
    **kwds
        Overrides of the class attributes (``n_max_iterations``, ``gradient_threshold``,
        ``step_threshold``, ``track_step``, ``track_gradient``, ``track_all``,
        ``damping_value``, ``tau`` ...); an unknown name raises ``TypeError``.
    """

    track_step = False
    track_gradient = False
    track_all = False
    n_max_iterations = 100
    gradient_threshold: float | None = None
    step_threshold: float | None = None
    damping_value = 0.0007

    def __init__(self, non_linear_ls: Any, **kwds: Any) -> None:
        self._adopt(kwds)
        self.n_iterations = 0
        self.non_linear_ls = self._journaled(non_linear_ls)
        self.do()

    def _adopt(self, kwds: dict) -> None:
        for name, value in kwds.items():
            if name.startswith("_") or not hasattr(type(self), name) or callable(
                    getattr(type(self), name)):
                raise TypeError(f"{type(self).__name__}: unknown option {name!r}")
            setattr(self, name, value)
        if self.track_all:
            self.track_step = self.track_gradient = True

    def _journaled(self, nls: Any) -> journaled_non_linear_ls:
        return journaled_non_linear_ls(nls, self, self.track_gradient, self.track_step)

    def has_gradient_converged_to_zero(self) -> bool:
        """Whether the last gradient's infinity-norm is ≤ ``gradient_threshold``."""
        eps = self.gradient_threshold
        return eps is not None and self.gradient_norm_history[-1] <= eps

    def had_too_small_a_step(self) -> bool:
        """Whether the last step's norm is ≤ ``step_threshold`` · (‖x‖ +
        ``step_threshold``)."""
        eps = self.step_threshold
        if eps is None:
            return False
        x = self.parameter_vector_norm_history[-1]
        h = self.step_norm_history[-1]
        return h <= eps * (x + eps)

    def do_damping(self, value: float) -> None:
        """Multiply the normal matrix's diagonal by (1 + value)."""
        a = self.non_linear_ls.normal_matrix_packed_u()
        a.matrix_packed_u_diagonal_add_in_place(value * np.asarray(a.matrix_packed_u_diagonal()))

    def do(self) -> None:
        raise NotImplementedError()


class naive_iterations(iterations):
    """Plain Gauss-Newton: build, stop on a small gradient, solve, stop on a small step."""

    def do(self) -> None:
        self.n_iterations = 0
        while self.n_iterations < self.n_max_iterations:
            self.non_linear_ls.build_up()
            if self.has_gradient_converged_to_zero():
                break
            self.non_linear_ls.solve()
            if self.had_too_small_a_step():
                break
            self.non_linear_ls.step_forward()
            self.n_iterations += 1

    def __str__(self) -> str:
        return "pure Gauss-Newton"


class naive_iterations_with_damping(iterations):
    """Gauss-Newton with the diagonal scaled by (1 + ``damping_value``) before each solve."""

    def do(self) -> None:
        self.n_iterations = 0
        while self.n_iterations < self.n_max_iterations:
            self.non_linear_ls.build_up()
            last = self.has_gradient_converged_to_zero()
            self.do_damping(self.damping_value)
            self.non_linear_ls.solve()
            too_small = self.had_too_small_a_step()
            self.non_linear_ls.step_forward()
            self.n_iterations += 1
            if last or too_small:
                break

    def __str__(self) -> str:
        return "pure Gauss-Newton with damping"


class _FixedLinearisation(non_linear_ls, non_linear_ls_mixin):
    """The commissioning API's one-shot problem: residuals and a Jacobian given once."""

    def __init__(self, residuals: Any, jacobian: Any, weights: Any, parameters: Any) -> None:
        r = _vector(residuals, "residuals")
        if sp.issparse(jacobian) or hasattr(jacobian, "shape") or hasattr(jacobian, "all"):
            shape = jacobian.shape if hasattr(jacobian, "shape") else tuple(jacobian.all())
        else:
            shape = np.asarray(jacobian, dtype=np.float64).shape
        if len(shape) != 2:
            raise ValueError(f"jacobian must be 2-dimensional (got shape {tuple(shape)})")
        super().__init__(n_parameters=int(shape[1]))
        self._r = r
        self._jacobian = _matrix(jacobian, r.size, int(shape[1]), "jacobian")
        self._w = _weights(weights, r.size)
        self._x_norm = 0.0 if parameters is None else float(
            np.linalg.norm(_vector(parameters, "parameters", int(shape[1]))))

    def build_up(self, objective_only: bool = False) -> None:
        self.reset()
        if objective_only:
            self.add_residuals(self._r, self._w)
        else:
            self.add_equations(self._r, self._jacobian, self._w)

    def parameter_vector_norm(self) -> float:
        return self._x_norm

    def step_forward(self) -> None:
        raise NormalEquationsError("a one-shot levenberg_marquardt_iterations(residuals=..., "
                                   "jacobian=...) has no parameters to step: apply solution()")


class levenberg_marquardt_iterations(iterations):
    """Levenberg-Marquardt iterations (scitbx) or one damped step (the commissioning API).

    Forms
    -----
    ``levenberg_marquardt_iterations(non_linear_ls, **options)``
        scitbx: iterate on construction until the gradient or the step is small or
        ``n_max_iterations`` is reached; ``n_iterations``, ``mu`` and the histories record
        the run.
    ``levenberg_marquardt_iterations(residuals=r, jacobian=J, [weights=w,] [parameters=x,]
    **options)``
        The commissioning API's sketch: nothing happens until :meth:`build_and_solve`, which
        solves ``(JᵀWJ + μ I) δ = -JᵀWr`` once with μ = ``tau`` · max diag(JᵀWJ); then
        :meth:`solution` returns δ (zeros when the gradient's infinity-norm is already ≤
        ``gradient_threshold``) and ``step_too_small`` says whether ‖δ‖ ≤ ``step_threshold``
        · (‖x‖ + ``step_threshold``) (‖x‖ = 0 unless ``parameters`` are given).
    """

    tau = 1e-3

    def __init__(self, non_linear_ls: Any = None, residuals: Any = None, jacobian: Any = None,
                 weights: Any = None, parameters: Any = None, **kwds: Any) -> None:
        self.mu_history = double()
        self._mu = 0.0
        if non_linear_ls is not None:
            if residuals is not None or jacobian is not None:
                raise TypeError("levenberg_marquardt_iterations: give either a non_linear_ls "
                                "object or residuals= and jacobian=, not both")
            super().__init__(non_linear_ls, **kwds)
            return
        if residuals is None or jacobian is None:
            raise TypeError("levenberg_marquardt_iterations needs a non_linear_ls object, or "
                            "residuals= and jacobian= (the one-shot form)")
        self._adopt(kwds)
        self.n_iterations = 0
        self.step_too_small = False
        self._solution: np.ndarray | None = None
        self.non_linear_ls = self._journaled(
            _FixedLinearisation(residuals, jacobian, weights, parameters))

    @property
    def mu(self) -> float:
        """The current damping; every value set is appended to ``mu_history``."""
        return self._mu

    @mu.setter
    def mu(self, value: float) -> None:
        self.mu_history.append(float(value))
        self._mu = float(value)

    def _initial_mu(self) -> float:
        normal = self.non_linear_ls.normal_matrix_packed_u()
        diagonal = np.asarray(normal.matrix_packed_u_diagonal())
        return self.tau * float(diagonal.max()) if diagonal.size else 0.0

    def do(self) -> None:
        nls = self.non_linear_ls
        self.n_iterations = 0
        nu = 2.0
        nls.build_up()
        if self.has_gradient_converged_to_zero():
            return
        self.mu = self._initial_mu()
        while self.n_iterations < self.n_max_iterations:
            nls.normal_matrix_packed_u().matrix_packed_u_diagonal_add_in_place(self.mu)
            objective = nls.objective()
            gradient = -np.asarray(nls.opposite_of_gradient()).copy()
            nls.solve()
            if self.had_too_small_a_step():
                break
            self.n_iterations += 1
            h = np.asarray(nls.step()).copy()
            expected_decrease = 0.5 * float(np.dot(h, self.mu * h - gradient))
            nls.step_forward()
            nls.build_up(objective_only=True)
            actual_decrease = objective - nls.objective()
            rho = actual_decrease / expected_decrease if expected_decrease != 0 else -1.0
            if rho > 0:
                if self.has_gradient_converged_to_zero():
                    break
                self.mu = nielsen_damping(self.mu, rho)
                nu = 2.0
            else:
                nls.step_backward()
                self.mu = self.mu * nu
                nu *= 2.0
            nls.build_up()

    # ------------------------------------------------------------------ one-shot form
    def build_and_solve(self) -> None:
        """One-shot form: build ``JᵀWJ`` and ``-JᵀWr``, damp the diagonal by μ, solve.

        Raises
        ------
        NormalEquationsError
            If the damped normal matrix is still not positive definite (for instance every
            derivative of a parameter is zero and the damping is zero too).
        """
        nls = self.non_linear_ls
        if not isinstance(nls.actual, _FixedLinearisation):
            raise TypeError("build_and_solve() belongs to the one-shot form "
                            "levenberg_marquardt_iterations(residuals=..., jacobian=...)")
        nls.build_up()
        n = nls.n_parameters()
        if n == 0 or self.has_gradient_converged_to_zero():
            self._solution = np.zeros(n)
            self.step_too_small = True
            return
        self.mu = self._initial_mu()
        nls.normal_matrix_packed_u().matrix_packed_u_diagonal_add_in_place(self.mu)
        nls.solve()
        self._solution = np.asarray(nls.step()).copy()
        self.step_too_small = self.had_too_small_a_step()
        self.n_iterations = 1

    def solution(self) -> double:
        """One-shot form: the step δ found by :meth:`build_and_solve` (a copy)."""
        if getattr(self, "_solution", None) is None:
            raise NormalEquationsError("call build_and_solve() before solution()")
        return double(self._solution.copy())

    def __str__(self) -> str:
        return "Levenberg-Marquardt"
