"""Minimisers of the scaling target: L-BFGS, Gauss–Newton, Levenberg–Marquardt.

They work on an *objective* (see :class:`Objective`): anything that can set parameters and
return ``f, ∇f`` (one C++ pass) or the normal equations (one C++ pass, Ĩ eliminated). Python
only does O(P) or O(P³) work per iteration; everything per observation is C++.

L-BFGS choice: a compact two-loop L-BFGS (m = 5 as scitbx) driven from Python with a
bracketing Wolfe line search, rather than scipy's L-BFGS-B. Reasons: DIALS's convergence rule
(relative RMSD change after every iteration) and the journal need a per-iteration hook with
the *accepted* point; trial steps that overflow the scales must be rejected and shortened,
which L-BFGS-B cannot do (it aborts its line search on a non-finite value); and the cost per
iteration is the C++ evaluation (10⁷ obs: ~0.1 s) against microseconds of Python. Exact
scitbx iterates cannot be reproduced without scitbx's bit-for-bit code anyway (spec 7.2).

Gauss–Newton and Levenberg–Marquardt follow DIALS's lstbx engines (spec 7.3): rmsd convergence
``|Δrmsd|/rmsd_prev < tol``, objective-increase stop for GN, LM's μ/ν schedule (μ₀ = 1e-3 max
diag N, ν doubling, stop at ν ≥ 8192), and the esds ``V = χ²_red (N [+ μI])⁻¹`` (spec 7.4).
Singular or indefinite systems never crash: parameters no observation touches (zero diagonal)
are fixed for the step with a journal message naming them; a remaining failure of Cholesky is
retried with increasing diagonal damping.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from .._core import fit as _core_fit
from .line_search import more_thuente

__all__ = ["Objective", "Journal", "RefinementFailed", "NonFiniteScales", "lbfgs",
           "gauss_newton", "levenberg_marquardt", "solve_normal_equations",
           "TARGET_ACHIEVED", "RMSD_CONVERGED", "OBJECTIVE_INCREASE", "MAX_ITERATIONS",
           "MAX_TRIAL_ITERATIONS", "DOF_TOO_LOW", "GRADIENT_CONVERGED", "LINE_SEARCH_FAILED"]

RMSD_CONVERGED = "RMSD no longer decreasing"
TARGET_ACHIEVED = "RMSD target achieved"
OBJECTIVE_INCREASE = "Refinement failure: objective increased"
MAX_ITERATIONS = "Reached maximum number of iterations"
MAX_TRIAL_ITERATIONS = "Reached maximum number of consecutive unsuccessful trial steps"
DOF_TOO_LOW = "Not enough degrees of freedom to refine"
GRADIENT_CONVERGED = "Gradient norm below threshold"
LINE_SEARCH_FAILED = "Line search failed to find a lower function value"
STEP_TOO_SMALL = "Step too small"


class RefinementFailed(RuntimeError):
    """A refinement that cannot proceed; ``journal`` holds the steps taken so far."""

    def __init__(self, message: str, journal: "Journal") -> None:
        super().__init__(f"{message}\n{journal.table()}")
        self.journal = journal


class NonFiniteScales(ArithmeticError):
    """Raised by an objective when parameters give non-finite or non-positive scales."""


class Objective(Protocol):
    """What the minimisers need (see :mod:`xtalscale.fit.objectives`)."""

    n_params: int

    def get_x(self) -> np.ndarray: ...
    def set_x(self, x: np.ndarray) -> None: ...  # may raise NonFiniteScales
    def f_and_grad(self) -> tuple[float, np.ndarray]: ...  # LBFGS functional Σ w r² (+ restraints)
    def normal_equations(self) -> tuple[np.ndarray, np.ndarray, float, int]: ...  # N, −JᵀWr, Σwr², n_eq
    def objective_only(self) -> float: ...  # Σ w r² (+ restraints)
    def rmsd(self) -> float: ...
    def n_reflections(self) -> int: ...
    def param_names(self) -> list[str]: ...


@dataclass
class Journal:
    """Per accepted step: objective, rmsd, gradient norm, step length, time; plus messages."""

    engine: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    reason_for_termination: str = ""
    solver: str = ""

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def __getitem__(self, key: str) -> list[Any]:
        """Column access as DIALS's ``history["rmsd"]`` (rmsd as one-element lists)."""
        if key == "rmsd":
            return [[r["rmsd"]] for r in self.rows]
        return [r.get(key) for r in self.rows]

    def __contains__(self, key: str) -> bool:
        return bool(self.rows) and key in self.rows[0]

    def get_nrows(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        lines = [f"engine {self.engine}" + (f" ({self.solver})" if self.solver else ""),
                 f"{'step':>4} {'objective':>14} {'rmsd':>12} {'|grad|':>11} {'step':>10} {'time/s':>8}"]
        for i, r in enumerate(self.rows):
            lines.append(f"{i:4d} {r['objective']:14.6g} {r['rmsd']:12.6g} {r.get('gradient_norm', float('nan')):11.3g}"
                         f" {r.get('step_length', 0.0):10.3g} {r.get('time', 0.0):8.3f}"
                         + ("  (previous normal matrix)" if r.get("chord") else ""))
        lines.extend(self.messages)
        if self.reason_for_termination:
            lines.append(self.reason_for_termination)
        return "\n".join(lines)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Vector dot product without BLAS: BLAS threads woken for every O(P) product cost far more
    than the product on a loaded machine (measured 20 ms per call at P = 10⁴)."""
    return float(np.einsum("i,i->", a, b))


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(_dot(a, a)))


def _rmsd_converged(journal: Journal, tolerance: float) -> bool:
    if len(journal.rows) < 2:
        return False
    r1, r2 = journal.rows[-1]["rmsd"], journal.rows[-2]["rmsd"]
    if r2 > 0:
        return abs((r2 - r1) / r2) < tolerance
    return True


def _record_step(journal: Journal, objective: Objective, f: float, gradient_norm: float, step_length: float,
                 t0: float, r_sq: float | None = None, **extra: Any) -> None:
    """A journal row at the objective's current point: f, its RMSD and reflection count, the
    gradient norm and step length, the time since ``t0`` and any ``extra`` columns.

    ``r_sq``: Σ w r² (restraints included) at this point, when the caller has it: an objective
    with ``rmsd_of`` turns it into the RMSD without another pass over the observations (at
    10⁶ observations a pass costs ~10 ms, and a fit records a row per step)."""
    rmsd_of = getattr(objective, "rmsd_of", None)
    rmsd = rmsd_of(r_sq) if (r_sq is not None and rmsd_of is not None) else objective.rmsd()
    journal.add(objective=f, rmsd=rmsd, gradient_norm=gradient_norm, step_length=step_length,
                time=time.perf_counter() - t0, num_reflections=objective.n_reflections(), **extra)


def _converged_without_equations(objective: Objective, journal: Journal, rmsd_tolerance: float,
                                 r_sq: float, t0: float, **extra: Any) -> bool:
    """At a newly accepted point whose r² is known: if its RMSD ends the refinement (DIALS's
    rule, against the last journal row), record the row and return True, so the normal
    equations are not built there only to be discarded (at 10⁶ observations a build costs
    about half a second). The esds then come from the last solve, one step before: the step
    changed the RMSD by less than ``rmsd_tolerance`` (relative), and the inverse normal matrix
    by as little."""
    _record_step(journal, objective, 0.5 * r_sq, float("nan"), 0.0, t0, r_sq=r_sq, **extra)
    if _rmsd_converged(journal, rmsd_tolerance):
        journal.reason_for_termination = RMSD_CONVERGED
        return True
    journal.rows.pop()
    return False


def _try_set(objective: Objective, x: np.ndarray) -> bool:
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            objective.set_x(x)
    except NonFiniteScales:
        return False
    return True


def _try_f_and_grad(objective: Objective, x: np.ndarray) -> tuple[float, np.ndarray] | None:
    if not np.all(np.isfinite(x)) or not _try_set(objective, x):
        return None
    try:
        f, g = objective.f_and_grad()
    except NonFiniteScales:
        return None
    if not (np.isfinite(f) and np.all(np.isfinite(g))):
        return None
    return f, g


# --------------------------------------------------------------------------- L-BFGS
class BlockDiagonalInverse:
    """An initial inverse Hessian for L-BFGS made of diagonal blocks: ``(2 B_k)⁻¹`` for each
    parameter range ``[a_k, b_k)`` of a matrix ``B`` (the Gauss–Newton matrix of ``Σ w r²`` is
    ``2 JᵀWJ``). Each block is factorised once (Cholesky, after the diagonal scaling
    solve_normal_equations uses; a block that will not factorise falls back to its diagonal)."""

    def __init__(self, matrix: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        self.blocks: list[tuple[int, int, np.ndarray, np.ndarray | None]] = []
        for a, b in ranges:
            block = np.array(matrix[a:b, a:b], dtype=np.float64)
            diag = np.diag(block).copy()
            good = np.isfinite(diag) & (diag > 0)
            scale = np.sqrt(np.where(good, diag, 1.0))
            lower = None
            if good.all() and np.all(np.isfinite(block)):
                try:
                    lower = np.linalg.cholesky(plus_diagonal(block / np.outer(scale, scale), 1e-10))
                except np.linalg.LinAlgError:
                    lower = None
            self.blocks.append((a, b, scale, lower))
        diag_all = np.diag(matrix).astype(np.float64)
        ok = np.isfinite(diag_all) & (diag_all > 0)
        fallback = float(np.max(diag_all[ok])) if ok.any() else 1.0
        #: 1/(2 d) for parameters outside every block and for blocks that did not factorise
        self.diagonal = 1.0 / (2.0 * np.where(ok, diag_all, fallback))

    def apply(self, v: np.ndarray) -> np.ndarray:
        """``H0 v``."""
        out = self.diagonal * v
        for a, b, scale, lower in self.blocks:
            if lower is not None:
                out[a:b] = 0.5 * _core_fit.cholesky_solve(lower, v[a:b] / scale) / scale
        return out


def _apply_h0(h0: Any, v: np.ndarray) -> np.ndarray:
    """The initial inverse Hessian (a diagonal vector or a BlockDiagonalInverse) times ``v``."""
    return h0.apply(v) if isinstance(h0, BlockDiagonalInverse) else h0 * v


def _two_loop(grad: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, float]],
              h0: Any = None) -> np.ndarray:
    """L-BFGS direction; ``h0`` is an initial inverse Hessian, diagonal or
    :class:`BlockDiagonalInverse` (else the usual sᵀy/yᵀy)."""
    q = grad.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * _dot(s, q)
        alphas.append(a)
        q -= a * y
    if h0 is not None:
        q = _apply_h0(h0, q)
    elif pairs:
        s, y, _ = pairs[-1]
        q *= _dot(s, y) / _dot(y, y)
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * _dot(y, q)
        q += (a - b) * s
    return -q


def _line_search(objective: Objective, x: np.ndarray, f0: float, g0: np.ndarray, d: np.ndarray,
                 alpha0: float, journal: Journal) -> tuple[float, np.ndarray, np.ndarray, float] | None:
    """Moré–Thuente search along ``d`` (scitbx's settings, :mod:`.line_search`); non-finite
    trial points are rejected and the step shortened. Returns (f, x, g, α) of the accepted
    point (the objective is left set there), or None when no point lowered f."""
    evaluated: dict[float, tuple[float, np.ndarray]] = {}
    last = [0.0]

    def phi(alpha: float) -> tuple[float, float] | None:
        last[0] = alpha
        trial = _try_f_and_grad(objective, x + alpha * d)
        if trial is None:
            journal.messages.append(f"step {alpha:.3g} gave non-finite scales: rejected and shortened")
            return None
        evaluated[alpha] = trial
        return trial[0], _dot(trial[1], d)

    result = more_thuente(phi, f0, _dot(g0, d), alpha0)
    if not result.converged:
        journal.messages.append(f"line search: {result.message} (after {result.evaluations} evaluations)")
    if result.alpha <= 0.0 or result.f >= f0 or result.alpha not in evaluated:
        return None
    f, g = evaluated[result.alpha]
    x_new = x + result.alpha * d
    if last[0] != result.alpha:  # the search ended elsewhere: back to the accepted point
        _try_set(objective, x_new)
    return f, x_new, g, result.alpha


def _preconditioner(objective: Objective, journal: Journal, blocks: bool = False) -> Any:
    """``1/(2 diag JᵀWJ)`` (the Gauss–Newton diagonal of ``Σ w r²``), or None if unavailable.
    ``blocks``: the objective's per-dataset blocks (``dataset_blocks``) where it offers them,
    as a :class:`BlockDiagonalInverse`."""
    if blocks:
        getter_blocks = getattr(objective, "dataset_blocks", None)
        found = getter_blocks() if getter_blocks is not None else None
        if found is not None:
            matrix, ranges = found
            journal.messages.append(f"L-BFGS preconditioned by {len(ranges)} per-dataset blocks of the "
                                    "normal matrix with Ĩ held fixed")
            return BlockDiagonalInverse(matrix, ranges)
    getter = getattr(objective, "diagonal", None)
    diag = getter() if getter is not None else None
    if diag is None:
        return None
    diag = np.asarray(diag, dtype=np.float64)
    good = np.isfinite(diag) & (diag > 0)
    if not np.any(good):
        return None
    floor = 1e-12 * float(np.max(diag[good]))
    h0 = 1.0 / (2.0 * np.where(good & (diag > floor), diag, np.max(diag[good])))
    journal.messages.append("L-BFGS preconditioned by the diagonal of the Ĩ-eliminated normal matrix")
    return h0


def lbfgs(objective: Objective, max_iterations: int | None = None, rmsd_tolerance: float = 1e-4,
          history: int = 5, journal: Journal | None = None, precondition: bool | str = True) -> Journal:
    """Minimise ``Σ w r²`` with L-BFGS; stops on DIALS's rules (spec 7.2).

    With ``precondition`` (default) the initial inverse Hessian is the diagonal of the
    Gauss–Newton matrix (one O(N k) C++ pass at the start): the scale, decay and absorption
    parameters differ in curvature by orders of magnitude, and unpreconditioned L-BFGS (DIALS's)
    under-converges on them. ``precondition="blocks"``: the inverse of the objective's
    per-dataset diagonal blocks of that matrix with Ĩ held fixed (``dataset_blocks``), which
    also captures the coupling of a dataset's own parameters (neighbouring smoother points,
    scale against B); the diagonal where the objective has no blocks. ``precondition=False`` is
    the plain scitbx-like algorithm.
    """
    journal = journal or Journal(engine="SimpleLBFGS")
    journal.correction_pairs = int(history)  # type: ignore[attr-defined]  # which L-BFGS ran
    t0 = time.perf_counter()
    x = objective.get_x().astype(np.float64).copy()
    first = _try_f_and_grad(objective, x)
    if first is None:
        raise RefinementFailed("the starting parameters give non-finite scales or target", journal)
    f, g = first
    h0 = _preconditioner(objective, journal, blocks=precondition == "blocks") if precondition else None
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    iteration = 0
    while True:
        gnorm = _norm(g)
        if gnorm <= 1e-5 * max(1.0, _norm(x)):
            journal.reason_for_termination = GRADIENT_CONVERGED
            break
        if max_iterations is not None and iteration >= max_iterations:
            journal.reason_for_termination = MAX_ITERATIONS
            break
        d = _two_loop(g, pairs, h0)
        if _dot(g, d) >= 0:  # not a descent direction: restart from steepest descent
            pairs.clear()
            d = -g if h0 is None else -_apply_h0(h0, g)
        alpha0 = 1.0 if (pairs or h0 is not None) else min(1.0, 1.0 / gnorm)
        found = _line_search(objective, x, f, g, d, alpha0, journal)
        if found is None:
            _try_set(objective, x)
            journal.reason_for_termination = LINE_SEARCH_FAILED
            journal.messages.append("line search failed; the last accepted parameters are kept")
            break
        f_new, x_new, g_new, alpha = found
        s, y = x_new - x, g_new - g
        sy = _dot(s, y)
        if sy > 1e-300:
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        x, f, g = x_new, f_new, g_new
        iteration += 1
        _record_step(journal, objective, f, _norm(g), _norm(s), t0, r_sq=f)
        if _rmsd_converged(journal, rmsd_tolerance):
            journal.reason_for_termination = RMSD_CONVERGED
            break
    return journal


# --------------------------------------------------------------------------- linear algebra
@dataclass
class Solution:
    step: np.ndarray
    inverse: Callable[[], np.ndarray]  # (N_used)⁻¹ in the full parameter space (fixed rows 0)
    messages: list[str]


def plus_diagonal(matrix: np.ndarray, value: float) -> np.ndarray:
    """A copy of the square ``matrix`` with ``value`` added to its diagonal (no n x n identity
    is made: at 1,176 parameters each ``value * np.eye(n)`` was 11 MB more to fill and add)."""
    out = np.array(matrix, dtype=np.float64, copy=True)
    out.flat[:: out.shape[0] + 1] += value
    return out


def solve_normal_equations(matrix: np.ndarray, rhs: np.ndarray, names: list[str] | None = None) -> Solution:
    """Solve ``N h = rhs`` by Cholesky; detect and handle singular/indefinite systems.

    Parameters on which no observation depends (zero row) are fixed (step 0) and named in the
    messages; if Cholesky still fails, the diagonal is damped by ``λ·max(diag)`` with λ from
    1e-12 upward until it succeeds. An undamped factor with a pivot² at rounding level (of
    the unit-diagonal scaled matrix) counts as failed: a singular system (the scale/Ĩ gauge)
    would otherwise factorise or not by the luck of rounding, and its step along the null
    direction would be rounding noise divided by rounding noise. Never returns NaN.
    (One BLAS thread, as the engines run: OpenBLAS's factorisations differ in the last bits
    between thread counts.)
    """
    n = rhs.size
    names = names or [f"p{j}" for j in range(n)]
    messages: list[str] = []
    diag = np.diag(matrix)
    free = np.isfinite(diag) & (diag > 0) & np.all(np.isfinite(matrix), axis=1)
    if not np.all(free):
        fixed = [names[j] for j in np.flatnonzero(~free)]
        messages.append(f"fixed {len(fixed)} parameter(s) that no observation determines: "
                        + ", ".join(fixed[:20]) + (" ..." if len(fixed) > 20 else ""))
    idx = np.flatnonzero(free)
    step = np.zeros(n)
    if idx.size == 0:
        return Solution(step, lambda: np.zeros((n, n)), messages)
    sub = matrix if idx.size == n else matrix[np.ix_(idx, idx)]  # no copy when all are free
    b = rhs[idx]
    scale = np.sqrt(np.diag(sub))
    scaled = sub / np.outer(scale, scale)  # symmetric diagonal scaling (as newer scitbx)
    damping = 0.0
    rounding_pivot = 1000.0 * idx.size * np.finfo(np.float64).eps
    for attempt in range(40):
        try:
            # numpy's Cholesky (LAPACK potrf), then forward and back substitution in C++: O(n²)
            # where numpy's general solver on each triangle was O(n³) (0.2 s per solve at
            # 1,176 parameters, 24 sweeps); no scipy import on this path
            damped = plus_diagonal(scaled, damping) if damping else scaled
            lower = np.linalg.cholesky(damped)
            if damping == 0.0 and np.min(np.diag(lower)) ** 2 <= rounding_pivot:
                raise np.linalg.LinAlgError("numerically singular")
            h = _core_fit.cholesky_solve(lower, b / scale) / scale
            if np.all(np.isfinite(h)):
                break
        except np.linalg.LinAlgError:
            pass
        damping = 1e-12 if damping == 0.0 else damping * 10.0
    else:
        messages.append("normal matrix could not be factorised; no step taken")
        return Solution(step, lambda: np.zeros((n, n)), messages)
    if damping:
        messages.append(f"normal matrix singular or indefinite: damped by {damping:.1e} x diag")
    step[idx] = h

    def inverse() -> np.ndarray:
        # the factorised (scaled, damped) matrix inverted by LAPACK's LU inverse: 2n³ flops,
        # where L⁻¹ by a general solve and then L⁻ᵀL⁻¹ took 4.7n³
        inv = np.linalg.inv(damped)
        inv = 0.5 * (inv + inv.T) / np.outer(scale, scale)
        full = np.zeros((n, n))
        full[np.ix_(idx, idx)] = inv
        return full

    return Solution(step, inverse, messages)


def _finish_esds(objective: Objective, solution: Solution | None, r_sq: float, n_eq: int,
                 journal: Journal) -> None:
    """``V = χ²_red N⁻¹`` (spec 7.4) handed to the objective's ``set_var_cov``; skipped for an
    objective whose ``wants_var_cov`` is False (a round whose esds a later round replaces: the
    inverse is O(P³), 0.16 s at 1,176 parameters)."""
    if solution is None or not journal.rows or not getattr(objective, "wants_var_cov", True):
        return
    dof = n_eq - objective.n_params
    if dof < 1:
        return
    var_cov = (r_sq / dof) * solution.inverse()
    setter = getattr(objective, "set_var_cov", None)
    if setter is not None:
        setter(var_cov)
    journal.var_cov = var_cov  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Gauss–Newton
def _start(objective: Objective, journal: Journal) -> tuple[list[str], np.ndarray, tuple] | None:
    """(names, x, normal equations) at the starting parameters; None (journal says why) when
    there are fewer equations than parameters. Non-finite starting scales raise."""
    names = objective.param_names()
    x = objective.get_x().astype(np.float64).copy()
    build_at = getattr(objective, "normal_equations_at", None)
    if build_at is None:
        if not _try_set(objective, x):
            raise RefinementFailed("the starting parameters give non-finite scales", journal)
        equations = objective.normal_equations()
    else:  # one evaluation of the model for both (a streaming scaler evaluates blocks anew)
        try:
            equations = build_at(x)
        except NonFiniteScales:
            raise RefinementFailed("the starting parameters give non-finite scales", journal) from None
    if equations[3] - objective.n_params < 1:
        journal.reason_for_termination = DOF_TOO_LOW
        return None
    return names, x, equations


def gauss_newton(objective: Objective, max_iterations: int | None = None, rmsd_tolerance: float = 1e-4,
                 journal: Journal | None = None) -> Journal:
    """DIALS's ``GaussNewtonIterations`` with the C++ normal equations (spec 7.3)."""
    journal = journal or Journal(engine="GaussNewton")
    t0 = time.perf_counter()
    start = _start(objective, journal)
    if start is None:
        return journal
    names, x, (matrix, rhs, r_sq, n_eq) = start
    solution = None
    iteration = 0
    while True:
        solution = solve_normal_equations(matrix, rhs, names)
        journal.messages.extend(solution.messages)
        _record_step(journal, objective, 0.5 * r_sq, float(np.linalg.norm(rhs)), float(np.linalg.norm(solution.step)),
                     t0, r_sq=r_sq, reduced_chi_squared=r_sq / max(1, n_eq - objective.n_params))
        last = (r_sq, n_eq)
        if _rmsd_converged(journal, rmsd_tolerance):
            journal.reason_for_termination = RMSD_CONVERGED
            break
        if len(journal.rows) > 1 and journal.rows[-1]["objective"] > journal.rows[-2]["objective"]:
            journal.reason_for_termination = OBJECTIVE_INCREASE
            break
        if max_iterations is not None and iteration >= max_iterations:
            journal.reason_for_termination = MAX_ITERATIONS
            break
        step = solution.step
        for _ in range(30):  # overflow guard: halve a step that gives non-finite scales
            if _try_set(objective, x + step):
                break
            journal.messages.append(f"step of length {np.linalg.norm(step):.3g} gave non-finite scales: halved")
            step = 0.5 * step
        else:
            _try_set(objective, x)
            journal.reason_for_termination = STEP_TOO_SMALL
            break
        x = x + step
        iteration += 1
        r_new = objective.objective_only()
        if _converged_without_equations(objective, journal, rmsd_tolerance, r_new, t0):
            last = (r_new, n_eq)
            break
        matrix, rhs, r_sq, n_eq = objective.normal_equations()
    _finish_esds(objective, solution, *last, journal)
    return journal


def _initial_damping(matrix: np.ndarray) -> float:
    """LevMar's first damping μ = 1e-3·max diag(N) (scitbx's and DIALS's rule)."""
    return 1e-3 * float(np.max(np.diag(matrix))) if matrix.size else 0.0


def levenberg_marquardt_step(objective: Objective, max_iterations: int | None = 1, rmsd_tolerance: float = 1e-4,
                             journal: Journal | None = None) -> Journal:
    """One Levenberg–Marquardt step from the current parameters, with LevMar's first damping
    (μ = 1e-3·max diag): one normal-matrix build, one solve, one objective evaluation; the step
    is kept only if it lowers the objective. No esds. For comparing alternatives cheaply (the
    Imid candidates of the intensity combination), not for a converged fit; ``max_iterations``
    and ``rmsd_tolerance`` are accepted for the engine signature and ignored."""
    journal = journal or Journal(engine="LevMarStep")
    t0 = time.perf_counter()
    start = _start(objective, journal)
    if start is None:
        return journal
    names, x, (matrix, rhs, r_sq, n_eq) = start
    mu = _initial_damping(matrix)
    solution = solve_normal_equations(plus_diagonal(matrix, mu), rhs, names)
    journal.messages.extend(solution.messages)
    _record_step(journal, objective, 0.5 * r_sq, float(np.linalg.norm(rhs)), float(np.linalg.norm(solution.step)),
                 t0, r_sq=r_sq, mu=mu)
    step = solution.step
    if _try_set(objective, x + step) and 0.5 * objective.objective_only() < 0.5 * r_sq:
        journal.reason_for_termination = MAX_ITERATIONS
    else:
        _try_set(objective, x)
        journal.reason_for_termination = "the step did not lower the objective: parameters kept"
    return journal


# --------------------------------------------------------------------------- Levenberg–Marquardt
def nielsen_damping(mu: float, rho: float) -> float:
    """Nielsen's damping after an accepted Levenberg-Marquardt step of gain ratio ``rho > 0``:
    ``mu · max(1/3, 1 - (2 rho - 1)³)`` (the rule of scitbx and of DIALS's LevMar).

    It lives here, not in :mod:`xtalscale.fit.lstsq` (which uses it too), so that the
    scaling engine does not load the lstbx layer it never uses."""
    return mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)


#: A chord step follows only an accepted step whose gain ratio was at least this: the
#: quadratic model was accurate, so the normal matrix it was built from still describes the
#: objective around the new point.
CHORD_MIN_GAIN = 0.5


def _chord_step(objective: Objective, journal: Journal, matrix: np.ndarray, mu: float, names: list[str],
                x: np.ndarray, f_at_x: float, t0: float) -> tuple[np.ndarray, float, Any] | None:
    """A Levenberg–Marquardt step at ``x`` with the *previous* point's damped normal matrix and
    the gradient at ``x`` (one f+g pass, no new matrix): a simplified-Newton ("chord") step.
    Returns ``(new x, new f, solution)`` when it lowers the objective, else None with the
    objective back at ``x``. ``f_and_grad`` gives ∇Σwr², so the right-hand side −JᵀWr is
    −½ of it."""
    _, grad = objective.f_and_grad()
    rhs = -0.5 * np.asarray(grad, dtype=np.float64)
    solution = solve_normal_equations(plus_diagonal(matrix, mu), rhs, names)
    _record_step(journal, objective, f_at_x, float(np.linalg.norm(rhs)), float(np.linalg.norm(solution.step)), t0,
                 r_sq=2.0 * f_at_x, mu=mu, chord=True)
    x_new = x + solution.step
    if _try_set(objective, x_new):
        f_new = 0.5 * objective.objective_only()
        if f_new < f_at_x:
            return x_new, f_new, solution
    _try_set(objective, x)
    journal.rows.pop()
    journal.messages.append("a step with the previous normal matrix did not lower the objective: "
                            "the normal equations are rebuilt")
    return None


def levenberg_marquardt(objective: Objective, max_iterations: int | None = 100, rmsd_tolerance: float = 1e-4,
                        journal: Journal | None = None, reuse_matrix: bool = False) -> Journal:
    """DIALS's ``LevenbergMarquardtIterations`` with the C++ normal equations (spec 7.3).

    ``reuse_matrix``: after an accepted step with a good gain ratio (≥ :data:`CHORD_MIN_GAIN`),
    first try a *chord* step — the gradient at the new point (one f+g pass) with the previous
    damped normal matrix — and build the normal equations only if the RMSD has not then
    converged by DIALS's rule. Near the optimum the matrix barely changes between steps, and
    an f+g pass costs about a third of a normal-matrix build (measured at 10⁶ observations);
    journal rows of chord steps carry ``chord=True``. The esds then come from that matrix."""
    journal = journal or Journal(engine="LevMar")
    max_iterations = 100 if max_iterations is None else max_iterations
    t0 = time.perf_counter()
    start = _start(objective, journal)
    if start is None:
        return journal
    names, x, (matrix, rhs, r_sq, n_eq) = start
    zero_rhs = [names[j] for j in np.flatnonzero(rhs == 0.0)]
    if zero_rhs:  # DIALS raises here; the solver fixes untouched parameters instead
        journal.messages.append("normal equations have an indeterminate solution for: " + ", ".join(zero_rhs[:20]))
    mu = _initial_damping(matrix)
    nu = 2.0
    solution = None
    iteration = 0
    f_old = 0.5 * r_sq
    while True:
        damped = plus_diagonal(matrix, mu)
        solution = solve_normal_equations(damped, rhs, names)
        journal.messages.extend(m for m in solution.messages if m not in journal.messages)
        _record_step(journal, objective, f_old, float(np.linalg.norm(rhs)), float(np.linalg.norm(solution.step)),
                     t0, r_sq=2.0 * f_old, mu=mu, reduced_chi_squared=r_sq / max(1, n_eq - objective.n_params))
        last = (r_sq, n_eq)
        if _rmsd_converged(journal, rmsd_tolerance):
            journal.reason_for_termination = RMSD_CONVERGED
            break
        if iteration >= max_iterations:
            journal.reason_for_termination = MAX_ITERATIONS
            break
        h = solution.step
        expected = 0.5 * float(h @ (mu * h + rhs))  # ½ hᵀ(μh − g), g = −rhs
        if expected == 0.0:
            journal.reason_for_termination = STEP_TOO_SMALL
            break
        iteration += 1
        f_new = np.inf
        if _try_set(objective, x + h):
            f_new = 0.5 * objective.objective_only()
        else:
            journal.messages.append(f"step of length {np.linalg.norm(h):.3g} gave non-finite scales: rejected")
        rho = (f_old - f_new) / expected if np.isfinite(f_new) else -1.0
        if rho > 0:
            x = x + h
            f_old = f_new
            mu = nielsen_damping(mu, rho)
            nu = 2.0
            if _converged_without_equations(objective, journal, rmsd_tolerance, 2.0 * f_new, t0, mu=mu):
                last = (2.0 * f_new, n_eq)
                break
            if reuse_matrix and rho >= CHORD_MIN_GAIN and iteration < max_iterations:
                chord = _chord_step(objective, journal, matrix, mu, names, x, f_old, t0)
                if chord is not None:
                    x, f_old, solution = chord
                    iteration += 1
                    if _converged_without_equations(objective, journal, rmsd_tolerance, 2.0 * f_old, t0, mu=mu):
                        last = (2.0 * f_old, n_eq)
                        break
            matrix, rhs, r_sq, n_eq = objective.normal_equations()
        else:
            _try_set(objective, x)
            journal.rows.pop()
            if nu >= 8192:
                journal.reason_for_termination = MAX_TRIAL_ITERATIONS
                objective.normal_equations()
                break
            mu *= nu
            nu *= 2.0
    _finish_esds(objective, solution, *last, journal)
    return journal
