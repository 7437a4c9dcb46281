"""DIALS import path ``dials.algorithms.scaling.scaling_options``: the scaling PHIL scope.

Implemented in :mod:`xtalscale.job.phil`.
"""
from __future__ import annotations

from xtalscale.job.phil import scaling_phil_scope as phil_scope

__all__ = ["phil_scope"]
