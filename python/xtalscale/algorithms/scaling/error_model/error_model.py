"""DIALS import path ``dials.algorithms.scaling.error_model.error_model``.

The stored form is :class:`xtalscale.error_model.BasicErrorModel`; the class exported here,
:class:`xtalscale.job.error_model.BasicErrorModel`, extends it with what its refinement needs.
``phil_scope`` is in :mod:`xtalscale.job.phil`.
"""
from __future__ import annotations

from xtalscale.job.error_model import (  # noqa: F401
    BasicErrorModel,
    ErrorModelBinner,
    calc_deltahl,
    calc_sigmaprime,
    extract_error_model_groups,
)
from xtalscale.job.phil import error_model_phil_scope as phil_scope  # noqa: F401

__all__ = ["BasicErrorModel", "ErrorModelBinner", "calc_deltahl", "calc_sigmaprime",
           "extract_error_model_groups", "phil_scope"]
