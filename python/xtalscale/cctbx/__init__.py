"""cctbx-shaped import path (facade): ``from xtalscale.cctbx import uctbx``."""
