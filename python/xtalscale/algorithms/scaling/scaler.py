"""DIALS import path ``dials.algorithms.scaling.scaler``. Implemented in :mod:`xtalscale.job.scaler`."""
from __future__ import annotations

from xtalscale.job.scaler import (
    MultiScaler,
    NullScaler,
    ScalerBase,
    SingleScaler,
    TargetScaler,
    calc_sf_variances,
)

__all__ = ["MultiScaler", "NullScaler", "ScalerBase", "SingleScaler", "TargetScaler", "calc_sf_variances"]
