"""DIALS import path ``dials.algorithms.scaling.scaling_library``. Implemented in
:mod:`xtalscale.job.library`."""
from __future__ import annotations

from xtalscale.job.library import (
    calculate_prescaling_correction,
    choose_initial_scaling_intensities,
    create_auto_scaling_model,
    create_Ih_table,
    create_scaling_model,
    merging_stats_from_scaled_array,
    scale_against_target,
    scale_single_dataset,
)

__all__ = [
    "calculate_prescaling_correction",
    "choose_initial_scaling_intensities",
    "create_Ih_table",
    "create_auto_scaling_model",
    "create_scaling_model",
    "merging_stats_from_scaled_array",
    "scale_against_target",
    "scale_single_dataset",
]
