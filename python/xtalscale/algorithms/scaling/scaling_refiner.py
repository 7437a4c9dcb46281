"""DIALS path ``dials.algorithms.scaling.scaling_refiner``: re-exports of :mod:`xtalscale.fit.refiner`."""
from xtalscale.fit.refiner import (
    ScalingGaussNewtonIterations,
    ScalingLevenbergMarquardtIterations,
    ScalingRefinery,
    ScalingSimpleLBFGS,
    scaling_refinery,
    scaling_refinery_phil_str,
)

__all__ = ["ScalingGaussNewtonIterations", "ScalingLevenbergMarquardtIterations", "ScalingRefinery",
           "ScalingSimpleLBFGS", "scaling_refinery", "scaling_refinery_phil_str"]
