"""DIALS import path ``dials.algorithms.refinement.parameterisation.scan_varying_model_parameters``.

Only the smoother is provided: ``GaussianSmoother(x_range, num_intervals)``, whose
``value_weight(x, param)`` / ``multi_value_weight(x, param)`` take the values or an object with a
``.value`` sequence and return ``(value, weight, sumweight)``.
"""
from __future__ import annotations

from xtalscale.smoothing import GaussianSmoother

__all__ = ["GaussianSmoother"]
