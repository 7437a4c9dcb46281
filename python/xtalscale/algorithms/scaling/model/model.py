"""DIALS-shaped import path: ``dials.algorithms.scaling.model.model``.

The implementation lives in :mod:`xtalscale.models`. ``model_phil_scope`` is
replaced by :func:`default_model_params`, a namespace with DIALS's defaults.
"""
from xtalscale.models import (  # noqa: F401
    AUTO,
    ArrayScalingModel,
    DoseDecay,
    KBScalingModel,
    PhysicalScalingModel,
    ScalingModelBase,
    ScalingModelError,
    calc_n_param_from_bins,
    calculate_new_offset,
    create_scaling_model,
    default_model_params,
    determine_auto_absorption_params,
    initialise_smooth_input,
    model_from_dict,
    register_scaling_model,
    registered_scaling_models,
)

__all__ = [
    "AUTO",
    "ArrayScalingModel",
    "DoseDecay",
    "KBScalingModel",
    "PhysicalScalingModel",
    "ScalingModelBase",
    "ScalingModelError",
    "calc_n_param_from_bins",
    "calculate_new_offset",
    "create_scaling_model",
    "default_model_params",
    "determine_auto_absorption_params",
    "initialise_smooth_input",
    "model_from_dict",
    "register_scaling_model",
    "registered_scaling_models",
]
