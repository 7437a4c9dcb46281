"""DIALS import path ``dials.algorithms.scaling.reflection_selection``. Implemented in
:mod:`xtalscale.job.reflection_selection`."""
from __future__ import annotations

from xtalscale.job.reflection_selection import calculate_scaling_subset_ranges

__all__ = ["calculate_scaling_subset_ranges"]
