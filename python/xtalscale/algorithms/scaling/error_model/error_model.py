"""DIALS import path ``dials.algorithms.scaling.error_model.error_model``.

Implemented in :mod:`xtalscale.error_model`.
"""
from __future__ import annotations

from xtalscale.error_model import BasicErrorModel

__all__ = ["BasicErrorModel"]
