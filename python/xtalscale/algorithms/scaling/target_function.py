"""DIALS path ``dials.algorithms.scaling.target_function``: re-exports of :mod:`xtalscale.fit.target`.

``ScalingTargetFunction`` is the commissioning API's name for DIALS's ``ScalingTarget``.
"""
from xtalscale.fit.target import ScalingTarget, ScalingTargetFixedIH
from xtalscale.fit.target import ScalingTarget as ScalingTargetFunction

__all__ = ["ScalingTarget", "ScalingTargetFixedIH", "ScalingTargetFunction"]
