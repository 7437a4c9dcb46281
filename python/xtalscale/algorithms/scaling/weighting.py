"""DIALS import path ``dials.algorithms.scaling.weighting`` (facade over
:mod:`xtalscale.fit.weighting`)."""
from __future__ import annotations

from xtalscale.fit.weighting import (
    CauchyWeights,
    GemanMcClureWeights,
    HuberWeights,
    UnityWeights,
    WeightingBase,
    get_weighting_scheme,
)

__all__ = [
    "CauchyWeights",
    "GemanMcClureWeights",
    "HuberWeights",
    "UnityWeights",
    "WeightingBase",
    "get_weighting_scheme",
]
