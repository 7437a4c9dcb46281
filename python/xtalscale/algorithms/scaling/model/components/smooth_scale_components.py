"""DIALS import path ``dials.algorithms.scaling.model.components.smooth_scale_components``.

The Gaussian smoothers come from :mod:`xtalscale.smoothing` (C++ core). Their ``value_weight`` /
``multi_value_weight`` results unpack as DIALS's wrappers' ``(value, weight, sumweight)`` tuples.
"""
from __future__ import annotations

from xtalscale.smoothing import (  # noqa: F401  (re-exported DIALS names)
    GaussianSmoother1D,
    GaussianSmoother2D,
    GaussianSmoother3D,
    nparam_to_val,
)

# ---- smoother re-exports end here; the smooth scale components follow below. ----
from xtalscale.components import (  # noqa: E402,F401  (re-exported DIALS names)
    SmoothBScaleComponent1D,
    SmoothMixin,
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
)
from xtalscale.scaling_utilities import row_multiply  # noqa: E402,F401
