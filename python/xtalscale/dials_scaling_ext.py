"""Stand-in for DIALS's compiled ``dials_scaling_ext`` (spec §1.16): component-related helpers.

A DIALS import path only: the helpers live in :mod:`xtalscale.scaling_utilities` (sparse and
harmonic helpers) and :mod:`xtalscale.smoothing` (the first-fixed smoother).
"""
from __future__ import annotations

from .scaling_utilities import (
    calc_lookup_index,
    calc_theta_phi,
    calculate_harmonic_tables_from_selections,
    create_sph_harm_lookup_table,
    create_sph_harm_table,
    elementwise_square,
    rotate_vectors_about_axis,
    row_multiply,
)
from .smoothing import GaussianSmootherFirstFixed

__all__ = [
    "GaussianSmootherFirstFixed",
    "row_multiply",
    "elementwise_square",
    "calc_theta_phi",
    "calc_lookup_index",
    "create_sph_harm_table",
    "create_sph_harm_lookup_table",
    "calculate_harmonic_tables_from_selections",
    "rotate_vectors_about_axis",
]
