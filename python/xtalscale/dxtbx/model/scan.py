"""dxtbx ``model.scan`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Scan, ScanFactory

__all__ = ["Scan", "ScanFactory"]
