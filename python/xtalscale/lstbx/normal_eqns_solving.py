"""scitbx import path ``scitbx.lstbx.normal_eqns_solving`` (facade over
:mod:`xtalscale.fit.lstsq`)."""
from xtalscale.fit.lstsq import (
    iterations,
    journaled_non_linear_ls,
    levenberg_marquardt_iterations,
    naive_iterations,
    naive_iterations_with_damping,
)

__all__ = [
    "iterations",
    "journaled_non_linear_ls",
    "levenberg_marquardt_iterations",
    "naive_iterations",
    "naive_iterations_with_damping",
]
