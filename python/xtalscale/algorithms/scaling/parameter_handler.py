"""DIALS-shaped import path: ``dials.algorithms.scaling.parameter_handler``.

The implementation lives in :mod:`xtalscale.parameter_managers`.
"""
from xtalscale.parameter_managers import (  # noqa: F401
    ScalingParameterManagerGenerator,
    scaling_active_parameter_manager,
)

__all__ = ["ScalingParameterManagerGenerator", "scaling_active_parameter_manager"]
