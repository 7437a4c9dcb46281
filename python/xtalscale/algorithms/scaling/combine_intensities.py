"""DIALS import path ``dials.algorithms.scaling.combine_intensities``. Implemented in
:mod:`xtalscale.job.combine_intensities`."""
from __future__ import annotations

from xtalscale.job.combine_intensities import (
    calculate_combined_raw_intensities,
    combine_intensities,
)

__all__ = ["calculate_combined_raw_intensities", "combine_intensities"]
