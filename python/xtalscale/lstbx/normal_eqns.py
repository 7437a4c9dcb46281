"""scitbx import path ``scitbx.lstbx.normal_eqns`` (facade over :mod:`xtalscale.fit.lstsq`)."""
from xtalscale.fit.lstsq import (
    NormalEquationsError,
    linear_ls,
    non_linear_ls,
    non_linear_ls_mixin,
)

__all__ = ["NormalEquationsError", "linear_ls", "non_linear_ls", "non_linear_ls_mixin"]
