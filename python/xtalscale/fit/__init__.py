"""xtalscale.fit: the refinement engine (Ih table, target, normal equations, minimisers).

Consumes model blocks through ``xtalscale._core`` (DerivativesView); imports data and model
modules only.

API summary (stable names)
--------------------------
Ih table (:mod:`xtalscale.fit.ih_table`)
    ``IhTable(reflection_tables, space_group, indices_lists=None, nblocks=1,
    free_set_percentage=0, free_set_offset=0, additional_cols=None, anomalous=False,
    group_keys=None)`` -- DIALS's table; ``group_keys`` (int64 per row) groups by any key
    (voxels). ``IhTableBlock``: ``intensities``, ``variances``, ``weights``,
    ``inverse_scale_factors``, ``Ih_values``, ``derivatives``, ``calc_Ih()``, ``select``,
    ``select_on_groups``, ``sum_in_groups``, ``group_multiplicities``, ``calc_nh``,
    ``update_weights``, ``match_Ih_values_to_target``, ``as_reflection_table``,
    ``table_arrays()`` (group offsets, I, w, row map for the kernels), ``exclusion`` codes.
Target (:mod:`xtalscale.fit.target`)
    ``ScalingTarget`` / ``ScalingTargetFixedIH``: ``compute_functional_gradients(block)``
    (C++, envelope theorem), ``compute_normal_equations(block, kind)`` (C++, Ĩ eliminated),
    ``compute_residuals_and_gradients(block)`` (explicit DIALS Jacobian), ``rmsds``,
    restraints. :mod:`xtalscale.fit.restraints`: ``ScalingRestraintsCalculator``,
    ``SingleScalingRestraintsCalculator``.
Objectives (:mod:`xtalscale.fit.objectives`)
    ``ScalerObjective(scaler, target, apm)`` (DIALS scaler protocol) and
    ``ModelObjective(group_offsets, I, w, model, x0, ...)`` with ``model(x) -> [ModelBlockData]``
    (g, canonical CSR dg/dp, column offset, table rows) -- the direct path for many datasets,
    voxel keys and Python-defined components.
Minimisers (:mod:`xtalscale.fit.minimisers`)
    ``lbfgs``, ``gauss_newton``, ``levenberg_marquardt`` (DIALS termination rules, esds
    ``V = χ²_red N⁻¹``), ``solve_normal_equations`` (singular/indefinite handled), ``Journal``.
Refineries (:mod:`xtalscale.fit.refiner`)
    ``scaling_refinery(engine, scaler, target, prediction_parameterisation, max_iterations)``
    with engines ``SimpleLBFGS``, ``GaussNewton``, ``LevMar``; ``refine(objective,
    engine="auto")`` chooses by parameter count and says which in ``journal.solver``.
Scaler (:mod:`xtalscale.fit.scaler`)
    ``BasicScaler(models, tables, space_group)``: a minimal protocol implementation.

Kernels (``xtalscale._core.fit``): ``functional_and_gradient``, ``normal_equations``,
``calc_Ih``, ``sum_in_groups``, ``max_threads``; all take ``n_threads`` (OpenMP, results
bit-identical for any thread count) and release the GIL.
"""
from .ih_table import IhTable, IhTableBlock, IhTableError
from .minimisers import Journal, NonFiniteScales, RefinementFailed, gauss_newton, lbfgs, levenberg_marquardt
from .objectives import ModelBlockData, ModelObjective, ScalerObjective
from .refiner import refine, scaling_refinery
from .target import ScalingTarget, ScalingTargetFixedIH

__all__ = ["IhTable", "IhTableBlock", "IhTableError", "Journal", "NonFiniteScales", "RefinementFailed",
           "gauss_newton", "lbfgs", "levenberg_marquardt", "ModelBlockData", "ModelObjective",
           "ScalerObjective", "refine", "scaling_refinery", "ScalingTarget", "ScalingTargetFixedIH"]
