"""DIALS-shaped import path: ``dials.algorithms.scaling.model.model``.

The implementation lives in :mod:`xtalscale.models`; ``model_phil_scope`` (freephil) in
:mod:`xtalscale.job.phil`. :func:`default_model_params` gives the same defaults as a plain
namespace.
"""
from xtalscale.job.phil import model_phil_scope  # noqa: F401
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
    "model_phil_scope",
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
