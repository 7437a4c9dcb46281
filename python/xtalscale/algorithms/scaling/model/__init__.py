"""DIALS-shaped import path: ``xtalscale.algorithms.scaling.model`` (ScalingModelBase and the built-in models).

``from xtalscale.algorithms.scaling.model import ScalingModelBase`` is the
commissioning API's import; the full DIALS module is
:mod:`xtalscale.algorithms.scaling.model.model`. The implementation lives in
:mod:`xtalscale.models`.
"""
from xtalscale.models import (  # noqa: F401
    ArrayScalingModel,
    DoseDecay,
    KBScalingModel,
    PhysicalScalingModel,
    ScalingModelBase,
    model_from_dict,
    register_scaling_model,
)

__all__ = [
    "ArrayScalingModel",
    "DoseDecay",
    "KBScalingModel",
    "PhysicalScalingModel",
    "ScalingModelBase",
    "model_from_dict",
    "register_scaling_model",
]
