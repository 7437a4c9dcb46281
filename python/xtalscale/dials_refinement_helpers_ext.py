"""Stand-in for DIALS's compiled ``dials_refinement_helpers_ext`` (its Gaussian smoothers).

``GaussianSmoother(x_range, num_intervals)``, ``GaussianSmoother2D(x_range, nx, y_range, ny)`` and
``GaussianSmoother3D(x_range, nx, y_range, ny, z_range, nz)``. Their ``value_weight`` and
``multi_value_weight`` return objects with ``get_value()``, ``get_weight()`` and
``get_sumweight()`` (which also unpack as ``(value, weight, sumweight)``).
"""
from __future__ import annotations

from xtalscale.smoothing import GaussianSmoother1D as GaussianSmoother
from xtalscale.smoothing import GaussianSmoother2D, GaussianSmoother3D

__all__ = ["GaussianSmoother", "GaussianSmoother2D", "GaussianSmoother3D"]
