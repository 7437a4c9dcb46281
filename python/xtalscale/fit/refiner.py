"""Refineries (DIALS ``scaling_refiner``) and the automatic solver choice.

``scaling_refinery(engine, scaler, target, prediction_parameterisation, max_iterations)``
returns a refinery whose ``run()`` minimises with ``SimpleLBFGS``, ``GaussNewton`` or
``LevMar`` over any object offering the scaler protocol (see
:class:`xtalscale.fit.objectives.ScalerObjective`). ``history`` is the journal (DIALS's
``history["rmsd"]``, ``get_nrows()``, ``reason_for_termination``).

:func:`refine` picks the engine from the parameter count (full matrix up to
``FULL_MATRIX_MAX_PARAMS`` parameters, L-BFGS beyond, as DIALS drops its full-matrix round above
10 datasets) and records the choice in ``journal.solver``.
"""
from __future__ import annotations

from typing import Any, Callable

from .blas import single_threaded_blas
from .minimisers import Journal, gauss_newton, lbfgs, levenberg_marquardt, levenberg_marquardt_step
from .objectives import ScalerObjective

__all__ = ["scaling_refinery", "ScalingRefinery", "ScalingSimpleLBFGS", "ScalingGaussNewtonIterations",
           "ScalingLevenbergMarquardtIterations", "refine", "FULL_MATRIX_MAX_PARAMS", "SUBSTITUTE_LBFGS_HISTORY", "ENGINES",
           "scaling_refinery_phil_str"]

#: above this many parameters the dense normal matrix is not used automatically
FULL_MATRIX_MAX_PARAMS = 2000

#: L-BFGS correction pairs when L-BFGS stands in for the dense matrix (too many parameters);
#: an explicitly chosen SimpleLBFGS keeps DIALS's 5. With 5 pairs and the diagonal
#: preconditioner, 60 simulated sweeps (1.4 M observations, ~2,400 parameters;
#: ``bench/bench_scale_job.py --sweeps 60 --cell-scale 1.6``) were fitted to 0.97 % rms of the
#: truth (4.5 % in one sweep's last images, whose edge smoother parameters converge slowly);
#: with 20 pairs and the per-dataset blocks of the fixed-Ĩ normal matrix (minimisers.lbfgs) to
#: 0.50 %, and the full matrix (``--full-matrix-max-params 3000``) to 0.49 % in four times the time.
SUBSTITUTE_LBFGS_HISTORY = 20

scaling_refinery_phil_str = """
scaling_refinery
{
  engine = *SimpleLBFGS GaussNewton LevMar
    .type = choice
  refinement_order = *concurrent consecutive
    .type = choice
  max_iterations = None
    .type = int(value_min=1)
  rmsd_tolerance = 0.0001
    .type = float(value_min=1e-6)
  full_matrix_engine = GaussNewton *LevMar
    .type = choice
  full_matrix_max_iterations = None
    .type = int(value_min=1)
}
"""

ENGINES: dict[str, Callable[..., Journal]] = {
    "SimpleLBFGS": lbfgs, "GaussNewton": gauss_newton, "LevMar": levenberg_marquardt,
    "LevMarStep": levenberg_marquardt_step}


def _rmsd_tolerance(scaler: Any) -> float:
    try:
        return float(scaler.params.scaling_refinery.rmsd_tolerance)
    except AttributeError:
        return 1e-4


class ScalingRefinery:
    """A refinery: one engine over a scaler, a target and a parameter manager."""

    engine = "SimpleLBFGS"
    default_max_iterations: int | None = None

    def __init__(self, scaler: Any, target: Any, prediction_parameterisation: Any,
                 max_iterations: int | None = None, n_threads: int = 1, **_: Any) -> None:
        self._scaler = scaler
        self._target = target
        self._parameters = prediction_parameterisation
        self._rmsd_tolerance = _rmsd_tolerance(scaler)
        self._max_iterations = max_iterations if max_iterations is not None else self.default_max_iterations
        self.n_threads = n_threads
        self.history = Journal(engine=self.engine)
        #: LevMar only: try chord steps (the previous normal matrix with a new gradient)
        #: before rebuilding the normal equations (minimisers.levenberg_marquardt)
        self.reuse_matrix = False
        #: SimpleLBFGS only: correction pairs kept (None: the engine's default, DIALS's 5)
        self.lbfgs_history: int | None = None
        #: SimpleLBFGS only: precondition by per-dataset blocks (minimisers.lbfgs)
        self.lbfgs_blocks = False
        #: whether the run ends with the parameters' var-cov matrix and esds (full-matrix
        #: engines); False for a round whose esds a later round replaces
        self.want_var_cov = True

    @property
    def rmsd_tolerance(self) -> float:
        return self._rmsd_tolerance

    def set_tolerance(self, tolerance: float) -> None:
        self._rmsd_tolerance = float(tolerance)

    def run(self) -> Journal:
        objective = ScalerObjective(self._scaler, self._target, self._parameters, n_threads=self.n_threads)
        objective.wants_var_cov = self.want_var_cov
        extra: dict[str, Any] = {"reuse_matrix": True} if self.reuse_matrix and self.engine == "LevMar" else {}
        if self.lbfgs_history is not None and self.engine == "SimpleLBFGS":
            extra["history"] = int(self.lbfgs_history)
        if self.lbfgs_blocks and self.engine == "SimpleLBFGS":
            extra["precondition"] = "blocks"
        with single_threaded_blas():
            ENGINES[self.engine](objective, self._max_iterations, self._rmsd_tolerance, journal=self.history,
                                 **extra)
        return self.history

    def print_step_table(self) -> str:
        return self.history.table()

    def get_var_cov(self) -> Any:
        return getattr(self.history, "var_cov", None)


class ScalingSimpleLBFGS(ScalingRefinery):
    engine = "SimpleLBFGS"


class ScalingGaussNewtonIterations(ScalingRefinery):
    engine = "GaussNewton"
    gradient_threshold = 1.0e-10
    step_threshold = None
    damping_value = 0.0007
    max_shift_over_esd = 15
    convergence_as_shift_over_esd = 1e-5


class ScalingLevenbergMarquardtIterations(ScalingRefinery):
    engine = "LevMar"
    default_max_iterations = 100


class ScalingLevenbergMarquardtStep(ScalingRefinery):
    """One damped Gauss–Newton step (minimisers.levenberg_marquardt_step): a cheap refit for
    comparing alternatives, not a converged fit."""

    engine = "LevMarStep"
    default_max_iterations = 1


_CLASSES = {"SimpleLBFGS": ScalingSimpleLBFGS, "GaussNewton": ScalingGaussNewtonIterations,
            "LevMar": ScalingLevenbergMarquardtIterations, "LevMarStep": ScalingLevenbergMarquardtStep}


def scaling_refinery(engine: str, scaler: Any, target: Any, prediction_parameterisation: Any,
                     max_iterations: int | None) -> ScalingRefinery:
    """The refinery for ``engine`` ("SimpleLBFGS", "GaussNewton" or "LevMar")."""
    if engine not in _CLASSES:
        raise ValueError(f"engine must be one of {sorted(_CLASSES)}, got {engine!r}")
    return _CLASSES[engine](scaler, target=target, prediction_parameterisation=prediction_parameterisation,
                            max_iterations=max_iterations)


def refine(objective: Any, engine: str = "auto", max_iterations: int | None = None,
           rmsd_tolerance: float = 1e-4, full_matrix_max_params: int = FULL_MATRIX_MAX_PARAMS) -> Journal:
    """Minimise an objective; ``engine="auto"`` chooses by parameter count (journal says which).

    Auto: L-BFGS to convergence, then (if ``n_params <= full_matrix_max_params``) a
    Levenberg–Marquardt polish that also gives the esds; beyond that L-BFGS only (a dense
    ``P x P`` matrix is the wrong tool for 10³–10⁵ datasets).
    """
    if engine != "auto":
        if engine not in ENGINES:
            raise ValueError(f"engine must be 'auto' or one of {sorted(ENGINES)}, got {engine!r}")
        with single_threaded_blas():
            journal = ENGINES[engine](objective, max_iterations, rmsd_tolerance, journal=Journal(engine=engine))
        journal.solver = f"{engine} (forced)"
        return journal
    large = objective.n_params > full_matrix_max_params
    journal = lbfgs(objective, max_iterations, rmsd_tolerance, journal=Journal(engine="auto"),
                    history=SUBSTITUTE_LBFGS_HISTORY if large else 5)
    if not large:
        polish = levenberg_marquardt(objective, max_iterations, rmsd_tolerance, journal=Journal(engine="LevMar"))
        journal.rows.extend(polish.rows)
        journal.messages.extend(polish.messages)
        journal.reason_for_termination = polish.reason_for_termination
        if hasattr(polish, "var_cov"):
            journal.var_cov = polish.var_cov  # type: ignore[attr-defined]
        journal.solver = f"SimpleLBFGS then LevMar ({objective.n_params} parameters <= {full_matrix_max_params})"
    else:
        journal.solver = (f"SimpleLBFGS only ({objective.n_params} parameters > {full_matrix_max_params}: "
                          f"no dense matrix; {SUBSTITUTE_LBFGS_HISTORY} correction pairs)")
    return journal
