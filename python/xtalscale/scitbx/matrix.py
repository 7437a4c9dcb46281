"""scitbx import path ``scitbx.matrix`` (facade over :mod:`xtalscale.fit.matrix`, a subset)."""
from xtalscale.fit.matrix import col, diag, identity, rec, row, sqr, zeros

__all__ = ["col", "diag", "identity", "rec", "row", "sqr", "zeros"]
