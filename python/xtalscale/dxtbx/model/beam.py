"""dxtbx ``model.beam`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Beam, BeamFactory

__all__ = ["Beam", "BeamFactory"]
