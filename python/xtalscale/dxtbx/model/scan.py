"""dxtbx ``model.scan`` facade over :mod:`xtalscale.experiments`."""
from ...experiments import Scan, ScanFactory  # noqa: F401

__all__ = ["Scan", "ScanFactory"]
