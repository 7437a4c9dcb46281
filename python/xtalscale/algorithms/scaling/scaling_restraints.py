"""DIALS path ``dials.algorithms.scaling.scaling_restraints``: re-exports of :mod:`xtalscale.fit.restraints`."""
from xtalscale.fit.restraints import ScalingRestraintsCalculator, SingleScalingRestraintsCalculator

__all__ = ["ScalingRestraintsCalculator", "SingleScalingRestraintsCalculator"]
