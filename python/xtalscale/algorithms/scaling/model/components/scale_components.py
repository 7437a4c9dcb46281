"""DIALS import path ``dials.algorithms.scaling.model.components.scale_components``.

The components are implemented in :mod:`xtalscale.components` (C++ kernels underneath).
"""
from __future__ import annotations

from xtalscale.components import (  # noqa: F401  (re-exported DIALS names)
    LinearDoseDecay,
    QuadraticDoseDecay,
    ScaleComponentBase,
    SHScaleComponent,
    SingleBScaleFactor,
    SingleScaleFactor,
)
from xtalscale.scaling_utilities import calculate_harmonic_tables_from_selections  # noqa: F401

__all__ = [
    "ScaleComponentBase",
    "SingleScaleFactor",
    "SingleBScaleFactor",
    "LinearDoseDecay",
    "QuadraticDoseDecay",
    "SHScaleComponent",
]
