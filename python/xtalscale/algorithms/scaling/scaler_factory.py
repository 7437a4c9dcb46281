"""DIALS import path ``dials.algorithms.scaling.scaler_factory``. Implemented in
:mod:`xtalscale.job.scaler_factory`."""
from __future__ import annotations

from xtalscale.job.scaler_factory import (
    MultiScalerFactory,
    NullScalerFactory,
    ScalerFactory,
    SingleScalerFactory,
    TargetScalerFactory,
    create_scaler,
)

__all__ = ["MultiScalerFactory", "NullScalerFactory", "ScalerFactory", "SingleScalerFactory",
           "TargetScalerFactory", "create_scaler"]
