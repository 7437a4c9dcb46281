"""dxtbx ``model.beam`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Beam, BeamFactory  # noqa: F401

__all__ = ["Beam", "BeamFactory"]
