"""DIALS import path ``dials.algorithms.scaling.scaling_utilities`` (absorption geometry part).

Implemented in :mod:`xtalscale.scaling_utilities` (geometry) and :mod:`xtalscale.job.prepare`
(reasons, prescaling correction, normalisation, Wilson outliers).
"""
from __future__ import annotations

from xtalscale.job.prepare import (  # noqa: F401,E402  (re-exported DIALS names)
    BadDatasetForScalingException,
    Reasons,
    calculate_prescaling_correction,
    quasi_normalisation,
    set_wilson_outliers,
)
from xtalscale.scaling_utilities import (  # noqa: F401  (re-exported DIALS names)
    absorption_frame_vectors,
    align_axis_along_z,
    calc_crystal_frame_vectors,
    calc_theta_phi,
    sph_harm_table,
)
