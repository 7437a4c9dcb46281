"""DIALS import path ``dials.algorithms.scaling.model.components.smooth_scale_components``.

The Gaussian smoothers come from :mod:`xtalscale.smoothing` (C++ core). Their ``value_weight`` /
``multi_value_weight`` results unpack as DIALS's wrappers' ``(value, weight, sumweight)`` tuples.
The smooth scale components come from :mod:`xtalscale.components`.
"""
from __future__ import annotations

from xtalscale.components import (  # noqa: F401  (re-exported DIALS names)
    SmoothBScaleComponent1D,
    SmoothMixin,
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
)
from xtalscale.scaling_utilities import row_multiply  # noqa: F401
from xtalscale.smoothing import (  # noqa: F401  (re-exported DIALS names)
    GaussianSmoother1D,
    GaussianSmoother2D,
    GaussianSmoother3D,
    nparam_to_val,
)
