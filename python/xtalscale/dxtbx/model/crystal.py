"""dxtbx ``model.crystal`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Crystal, CrystalFactory

__all__ = ["Crystal", "CrystalFactory"]
