"""dxtbx ``model.goniometer`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Goniometer, GoniometerFactory  # noqa: F401

__all__ = ["Goniometer", "GoniometerFactory"]
