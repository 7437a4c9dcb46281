"""DIALS import path ``dials.algorithms.scaling.algorithm``. Implemented in :mod:`xtalscale.job.algorithm`."""
from __future__ import annotations

from xtalscale.job.algorithm import (
    ScalingAlgorithm,
    do_error_analysis,
    do_intensity_combination,
    expand_and_do_outlier_rejection,
    prepare_input,
    scaling_algorithm,
)

__all__ = ["ScalingAlgorithm", "do_error_analysis", "do_intensity_combination",
           "expand_and_do_outlier_rejection", "prepare_input", "scaling_algorithm"]
