"""DIALS import path ``dials.algorithms.scaling.scaling_utilities`` (absorption geometry part).

Implemented in :mod:`xtalscale.scaling_utilities`.
"""
from __future__ import annotations

from xtalscale.scaling_utilities import (  # noqa: F401  (re-exported DIALS names)
    absorption_frame_vectors,
    align_axis_along_z,
    calc_crystal_frame_vectors,
    calc_theta_phi,
    sph_harm_table,
)
