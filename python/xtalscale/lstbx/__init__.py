"""scitbx-shaped import path ``scitbx.lstbx`` (facade): ``from xtalscale.lstbx import
normal_eqns, normal_eqns_solving``. The implementation lives in :mod:`xtalscale.fit.lstsq`."""
