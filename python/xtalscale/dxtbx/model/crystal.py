"""dxtbx ``model.crystal`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Crystal, CrystalFactory  # noqa: F401

__all__ = ["Crystal", "CrystalFactory"]
