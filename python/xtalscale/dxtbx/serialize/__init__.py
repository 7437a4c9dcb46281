"""dxtbx ``serialize`` facade: ``from xtalscale.dxtbx.serialize import load``."""
from . import load  # noqa: F401
