"""DIALS import path ``dials.algorithms.scaling.error_model.error_model``. Implemented in
:mod:`xtalscale.job.error_model` (``phil_scope`` in :mod:`xtalscale.job.phil`)."""
from __future__ import annotations

from xtalscale.job.error_model import (
    BasicErrorModel,
    ErrorModelBinner,
    calc_deltahl,
    calc_sigmaprime,
    extract_error_model_groups,
)
from xtalscale.job.phil import error_model_phil_scope as phil_scope

__all__ = ["BasicErrorModel", "ErrorModelBinner", "calc_deltahl", "calc_sigmaprime",
           "extract_error_model_groups", "phil_scope"]
