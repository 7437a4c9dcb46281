"""DIALS-shaped import path: ``dials.algorithms.scaling.active_parameter_managers``.

The implementation lives in :mod:`xtalscale.parameter_managers`.
"""
from xtalscale.parameter_managers import (  # noqa: F401
    ParameterManagerError,
    ParameterManagerGenerator,
    TargetInterface,
    active_parameter_manager,
    multi_active_parameter_manager,
    shared_active_parameter_manager,
)

__all__ = [
    "ParameterManagerError",
    "ParameterManagerGenerator",
    "TargetInterface",
    "active_parameter_manager",
    "multi_active_parameter_manager",
    "shared_active_parameter_manager",
]
