"""scitbx-shaped import path (facade): ``from xtalscale.scitbx import matrix``.

Only the subset documented in :mod:`xtalscale.fit.matrix` is provided.
"""
