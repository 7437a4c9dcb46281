"""scitbx import path ``scitbx.lstbx.normal_eqns`` (facade over :mod:`xtalscale.fit.lstsq`)."""
from xtalscale.fit.lstsq import (  # noqa: F401  (re-exported scitbx names)
    NormalEquationsError,
    linear_ls,
    non_linear_ls,
    non_linear_ls_mixin,
)

__all__ = ["NormalEquationsError", "linear_ls", "non_linear_ls", "non_linear_ls_mixin"]
