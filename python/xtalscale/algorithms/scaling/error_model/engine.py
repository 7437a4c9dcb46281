"""DIALS import path ``dials.algorithms.scaling.error_model.engine``. Implemented in
:mod:`xtalscale.job.error_model`."""
from __future__ import annotations

from xtalscale.job.error_model import run_error_model_refinement

__all__ = ["run_error_model_refinement"]
