"""DIALS path ``dials.algorithms.scaling.target_function``: re-exports of :mod:`xtalscale.fit.target`."""
from xtalscale.fit.target import ScalingTarget, ScalingTargetFixedIH

__all__ = ["ScalingTarget", "ScalingTargetFixedIH"]
