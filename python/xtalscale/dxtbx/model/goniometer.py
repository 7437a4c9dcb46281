"""dxtbx ``model.goniometer`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Goniometer, GoniometerFactory

__all__ = ["Goniometer", "GoniometerFactory"]
