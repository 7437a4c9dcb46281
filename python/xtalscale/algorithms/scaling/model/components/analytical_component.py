"""DIALS import path ``dials.algorithms.scaling.model.components.analytical_component``."""
from __future__ import annotations

from xtalscale.components import AnalyticalComponent  # noqa: F401  (re-exported DIALS name)

__all__ = ["AnalyticalComponent"]
